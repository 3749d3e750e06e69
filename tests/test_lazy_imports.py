"""What a daemon imports for what it is configured to do (issue 15: memory).

A daemon with plain IMAP accounts and a Redis stream must not load pyOpenSSL,
cryptography, service_identity (12 MiB together), twisted.web, the Graph or
OAuth2 code: each test runs the daemon's start-up in a fresh interpreter
(``twistd`` imports the reactor inside fido's ``makeService``) and reads
``sys.modules``.  And a daemon started that way still speaks TLS, implicit
and STARTTLS, once an account asks for it.
"""

import json
import os
import subprocess
import sys
import textwrap
import time

from tests import daemon
from tests.support.dovecot import make_message

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: never imported by a daemon with plain IMAP accounts and a Redis stream
HEAVY = ("OpenSSL", "cryptography", "service_identity", "twisted.internet.ssl",
         "twisted.protocols.tls", "twisted.web", "twisted.mail", "treq",
         "fido_tx.sources.graph", "fido_tx.sources.graphapi", "fido_tx.credentials.oauth",
         "fido_tx.observe.web", "fido_tx.observe.html", "fido_tx.sinks.webhook",
         "fido_tx.sinks.sidekiq", "email.policy", "email.headerregistry")

#: runs in a fresh interpreter: fido's makeService as twistd calls it, then
#: prints the imported module names as JSON
_START = textwrap.dedent("""
    import json, sys
    from fido_tx import tap
    options = tap.Options()
    options.parseOptions(["--config", sys.argv[1]])
    tap.makeService(options)
    print(json.dumps(sorted(sys.modules)))
""")


def _modules_after_start(tmp_path, accounts, http_listen=""):
    directory = str(tmp_path)
    daemon.write_accounts(os.path.join(directory, "accounts.json"), accounts)
    config_path = os.path.join(directory, "fido.toml")
    daemon.write_config(config_path, directory, "redis://127.0.0.1:9/0")
    if http_listen:
        with open(config_path) as f:
            text = f.read().replace('listen = ""', f"listen = {json.dumps(http_listen)}")
        with open(config_path, "w") as f:
            f.write(text)
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _START, config_path], cwd=directory, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _loaded(modules, names):
    return sorted(m for m in modules for name in names if m == name or m.startswith(name + "."))


def _plain(k):
    return {"id": f"plain{k}", "host": "127.0.0.1", "port": 9, "security": "none",
            "username": f"user{k}", "password": "secret-password"}


def test_a_plain_imap_daemon_imports_no_tls_web_graph_or_oauth_code(tmp_path):
    modules = _modules_after_start(tmp_path, [_plain(1), _plain(2)])
    assert "twisted.internet.reactor" in modules and "txredisapi" in modules
    assert _loaded(modules, HEAVY) == []


def test_the_http_listener_imports_twisted_web_for_its_first_connection_only(tmp_path):
    # the default [http] listen: bound at start, twisted.web (3.6 MiB) and
    # prometheus_client (~24 ms of CPU) later
    modules = _modules_after_start(tmp_path, [_plain(1)], http_listen="tcp:0:interface=127.0.0.1")
    assert "fido_tx.observe.listen" in modules and "fido_tx.observe.metrics" in modules
    assert _loaded(modules, ("twisted.web", "fido_tx.observe.web", "OpenSSL",
                             "prometheus_client")) == []


#: runs in a fresh interpreter: makeService with [http] listen, sessions
#: counted before anything imported prometheus_client, then a scrape of
#: what /metrics serves; prints whether it was loaded before, and the text
_START_AND_SCRAPE = textwrap.dedent("""
    import json, sys
    from fido_tx import tap
    from fido_tx.outcome import SessionResult

    options = tap.Options()
    options.parseOptions(["--config", sys.argv[1]])
    top = tap.makeService(options)
    metrics = top.parts["metrics"]
    metrics.observe_session(SessionResult("plain1", fetched=2, bytes=300, seconds=0.2))
    metrics.observe_session(SessionResult("plain1", kind="auth", message="no", seconds=3))
    before = "prometheus_client" in sys.modules
    from prometheus_client import generate_latest

    print(json.dumps([before, generate_latest(metrics.registry).decode()]))
""")


def test_the_session_metrics_count_without_prometheus_client_until_scraped(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    directory = str(tmp_path)
    daemon.write_accounts(os.path.join(directory, "accounts.json"), [_plain(1)])
    config_path = os.path.join(directory, "fido.toml")
    daemon.write_config(config_path, directory, "redis://127.0.0.1:9/0")
    with open(config_path) as f:
        text = f.read().replace('listen = ""', 'listen = "tcp:0:interface=127.0.0.1"')
    with open(config_path, "w") as f:
        f.write(text)
    out = subprocess.run([sys.executable, "-c", _START_AND_SCRAPE, config_path], cwd=directory,
                         env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded_before, exposition = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded_before is False
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for family in text_string_to_metric_families(exposition) for s in family.samples}
    assert got[("fido_sessions_total", (("outcome", "ok"),))] == 1
    assert got[("fido_sessions_total", (("outcome", "auth"),))] == 1
    assert got[("fido_messages_fetched_total", ())] == 2
    assert got[("fido_bytes_fetched_total", ())] == 300
    assert got[("fido_session_duration_seconds_bucket", (("le", "0.25"),))] == 1
    assert got[("fido_session_duration_seconds_count", ())] == 2
    assert got[("fido_session_duration_seconds_sum", ())] == 3.2
    assert ("fido_sessions_created", (("outcome", "ok"),)) in got
    assert ("fido_accounts", (("state", "ok"),)) in got  # the scrape-time gauges too


#: runs in a fresh interpreter: makeService as twistd calls it (the reactor
#: not running), then, with argv[2], a reload of the accounts file written
#: there; prints the TLS modules loaded and the TLS options built after each
_START_AND_RELOAD = textwrap.dedent("""
    import json, sys
    from fido_tx import tap
    from fido_tx.accounts.loading import run_inline

    TLS = ("OpenSSL.SSL", "service_identity", "twisted.internet.ssl",
           "twisted.protocols.tls")

    def state(top):
        contexts = top.parts["tls"].contexts
        return [[m for m in TLS if m in sys.modules], sorted(k[0] for k in contexts._options),
                len(contexts._shared)]

    options = tap.Options()
    options.parseOptions(["--config", sys.argv[1]])
    top = tap.makeService(options)
    from twisted.internet import reactor
    assert not reactor.running
    out = [state(top)]
    if len(sys.argv) > 2:
        source = top.parts["source"]
        with open(sys.argv[2]) as f, open(source.path, "w") as g:
            g.write(f.read())
        source._run_blocking = run_inline  # the reload in this thread
        source.running = True
        source.reload()
        out.append(state(top))
    print(json.dumps(out))
""")


def _tls_after_start(tmp_path, accounts, reloaded=None):
    directory = str(tmp_path)
    daemon.write_accounts(os.path.join(directory, "accounts.json"), accounts)
    config_path = os.path.join(directory, "fido.toml")
    daemon.write_config(config_path, directory, "redis://127.0.0.1:9/0")
    args = [sys.executable, "-c", _START_AND_RELOAD, config_path]
    if reloaded is not None:
        args.append(os.path.join(directory, "next.json"))
        daemon.write_accounts(args[-1], reloaded)
    out = subprocess.run(args, cwd=directory, env=dict(os.environ, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


ALL_TLS = ["OpenSSL.SSL", "service_identity", "twisted.internet.ssl", "twisted.protocols.tls"]


def test_a_daemon_with_tls_accounts_loads_tls_before_the_reactor_runs(tmp_path):
    # not in the first TLS session's reactor turn (a 113 ms stall): the
    # modules, and each server's TLS options, all on one shared context
    accounts = [dict(_plain(1), security="tls", port=993, host="imap.example.test"),
                dict(_plain(2), security="starttls", port=143, host="mail.example.test"),
                dict(_plain(3), security="tls", port=993, host="imap.example.test"),
                _plain(4)]
    [(modules, hosts, shared)] = _tls_after_start(tmp_path, accounts)
    assert modules == ALL_TLS
    assert hosts == ["imap.example.test", "mail.example.test"]
    assert shared == 1


def test_a_plain_daemon_preloads_no_tls(tmp_path):
    [(modules, hosts, shared)] = _tls_after_start(tmp_path, [_plain(1), _plain(2)])
    assert (modules, hosts, shared) == ([], [], 0)


def test_a_reload_adding_the_first_tls_account_preloads_it(tmp_path):
    tls = dict(_plain(2), security="tls", port=993, host="imap.example.test")
    before, after = _tls_after_start(tmp_path, [_plain(1)], reloaded=[_plain(1), tls])
    assert before == [[], [], 0]
    assert after == [ALL_TLS, ["imap.example.test"], 1]


def test_a_rediss_url_loads_tls_before_the_reactor_runs(tmp_path):
    directory = str(tmp_path)
    daemon.write_accounts(os.path.join(directory, "accounts.json"), [_plain(1)])
    config_path = os.path.join(directory, "fido.toml")
    daemon.write_config(config_path, directory, "rediss://127.0.0.1:9/0")
    out = subprocess.run([sys.executable, "-c", _START_AND_RELOAD, config_path], cwd=directory,
                         env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    [(modules, hosts, shared)] = json.loads(out.stdout.strip().splitlines()[-1])
    assert modules == ALL_TLS and hosts == []


def test_an_ssl_http_listener_gets_a_reactor_with_tls(tmp_path):
    # the reactor's listenSSL needs pyOpenSSL when the reactor is imported
    import pytest

    from tests.support import tlsca

    pki = tlsca.files()
    listen = f"ssl:0:interface=127.0.0.1:privateKey={pki.localhost.key}:certKey={pki.localhost.cert}"
    try:
        modules = _modules_after_start(tmp_path, [_plain(1)], http_listen=listen)
    except AssertionError as e:  # pragma: no cover - a listener the config refuses
        pytest.fail(f"an ssl: listener was refused: {e}")
    assert "OpenSSL.SSL" in modules and "twisted.internet.ssl" in modules


def test_the_daemon_without_pyopenssl_at_start_fetches_over_tls_and_starttls(tmp_path, dovecot,
                                                                           redis):
    """twistd, Dovecot: a plain, a STARTTLS and an implicit-TLS account each
    deliver their messages (TLS layered by fido_tx.lazytls on a reactor that
    was imported without pyOpenSSL)."""
    users = {f"lazy{k}@fido.test": f"pw-lazy-{k}" for k in range(3)}
    dovecot.add_users(users)
    for k, user in enumerate(users):
        for i in range(3):
            dovecot.add_message(user, make_message(k * 10 + i, 2048))
    directory = str(tmp_path / "fido")
    os.makedirs(directory)
    accounts = [daemon.dovecot_account(dovecot, user, security)
                for user, security in zip(users, ("none", "starttls", "tls"))]
    daemon.write_accounts(os.path.join(directory, "accounts.json"), accounts)
    config_path = os.path.join(directory, "fido.toml")
    daemon.write_config(config_path, directory, redis.url, workers=3)
    log_path = os.path.join(directory, "fido.log")
    client = redis.client()
    proc = daemon.start_twistd(config_path, directory, log_path)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = client("XLEN", "fido:messages") == 9 and all(
                set(dovecot.flags(u).values()) == {"S"} for u in users)
            if done:
                break
            assert proc.poll() is None, daemon.log_tail(log_path)
            time.sleep(0.1)
        assert client("XLEN", "fido:messages") == 9, daemon.log_tail(log_path)
        for user in users:
            assert set(dovecot.flags(user).values()) == {"S"}, daemon.log_tail(log_path)
    finally:
        proc.terminate()
        proc.wait(30)
