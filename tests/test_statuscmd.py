"""fido status against a real redis-server: table, --json, auth, unreachable Redis."""

import argparse
import io
import json

from twisted.trial.unittest import SynchronousTestCase

from fido_tx.cmd import cli
from fido_tx.cmd import status as statuscmd
from fido_tx.config import RedisSettings, Settings
from tests.support.redis_server import free_port


def args(**kw):
    out, err = io.StringIO(), io.StringIO()
    ns = argparse.Namespace(json=False, redis_url=None, config=None, stdout=out, stderr=err)
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns, out, err


def populate(r):
    r("HSET", "fido:account:acme-support", "state", "ok",
      "last_attempt_at", "2026-11-22T16:00:00.000Z", "last_success_at", "2026-11-22T16:00:00.000Z",
      "fetched_total", "12")
    r("HSET", "fido:account:acme-billing", "state", "error", "last_error_kind", "auth",
      "last_error", "LOGIN rejected: [AUTHENTICATIONFAILED] Authentication failed.",
      "last_attempt_at", "2026-11-22T16:01:00.000Z", "last_error_at", "2026-11-22T16:01:00.000Z",
      "last_success_at", "2026-11-20T10:00:00.000Z", "failing_since", "2026-11-21T08:00:00.000Z",
      "fetched_total", "3")
    r("HSET", "fido:account:globex", "state", "error", "last_error_kind", "dns",
      "last_error", "imap.globex.test: no such host", "last_attempt_at", "2026-11-22T16:02:00.000Z")
    r("HSET", "fido:instance:web1:4242", "host", "web1", "pid", "4242", "version", "0.1.0",
      "accounts", "3", "sessions", "1")
    r("EXPIRE", "fido:instance:web1:4242", "45")
    r("SET", "fido:unrelated", "x")


def test_table_shows_summary_failing_accounts_and_instances(redis):
    populate(redis.client())
    ns, out, err = args(redis_url=redis.url)
    assert statuscmd.main(ns) == 0, err.getvalue()
    text = out.getvalue()
    assert "Accounts: 3 (1 ok, 2 failing: auth 1, dns 1)" in text
    lines = text.splitlines()
    billing = next(line for line in lines if line.startswith("acme-billing"))
    assert "auth" in billing and "2026-11-21 08:00" in billing
    assert "2026-11-20 10:00" in billing and "LOGIN rejected" in billing
    globex = next(line for line in lines if line.startswith("globex"))
    assert "dns" in globex and "no such host" in globex and "never" in globex
    assert not any(line.startswith("acme-support") for line in lines)  # ok: not in the failing table
    assert "Instances alive: 1" in text
    inst = next(line for line in lines if line.startswith("web1:4242"))
    assert inst.split()[:6] == ["web1:4242", "web1", "4242", "0.1.0", "3", "1"]
    assert err.getvalue() == ""


def test_json_is_one_document(redis):
    populate(redis.client())
    ns, out, err = args(redis_url=redis.url, json=True)
    assert statuscmd.main(ns) == 0
    doc = json.loads(out.getvalue())
    assert doc["summary"] == {"total": 3, "ok": 1, "failing": 2, "unknown": 0,
                              "by_kind": {"auth": 1, "dns": 1}}
    by_id = {a["id"]: a for a in doc["accounts"]}
    assert by_id["acme-billing"]["kind"] == "auth"
    assert by_id["acme-billing"]["failing_since"] == "2026-11-21T08:00:00.000Z"
    assert by_id["acme-support"]["kind"] is None and by_id["acme-support"]["fetched_total"] == 12
    assert by_id["globex"]["last_success_at"] is None
    [inst] = doc["instances"]
    assert (inst["host"], inst["pid"], inst["version"], inst["accounts"], inst["sessions"]) == (
        "web1", 4242, "0.1.0", 3, 1)
    assert 0 < inst["expires_in"] <= 45


def test_many_accounts_are_all_scanned(redis):
    r = redis.client()
    for i in range(1200):
        r("HSET", f"fido:account:a{i:04}", "state", "ok")
    ns, out, err = args(redis_url=redis.url, json=True)
    assert statuscmd.main(ns) == 0
    assert json.loads(out.getvalue())["summary"]["total"] == 1200


def test_password_and_db_from_settings_and_never_printed(redis):
    r = redis.client()
    r("SELECT", "0")
    r("CONFIG", "SET", "requirepass", "pw-Zq81xv")
    raw = statuscmd.RespConnection  # populate db 3 through an authenticated connection
    from fido_tx.redis import url as redisurl

    url = f"redis://:pw-Zq81xv@127.0.0.1:{redis.port}/3"
    with raw(redisurl.parse(url)) as conn:
        conn.command("HSET", "fido:account:x", "state", "error", "last_error_kind", "tls",
                     "last_error", "certificate verify failed")
    ns, out, err = args()
    assert statuscmd.main(ns, settings=Settings(redis=RedisSettings(url=url))) == 0, err.getvalue()
    assert "failing: tls 1" in out.getvalue()
    assert "pw-Zq81xv" not in out.getvalue()
    bad = f"redis://:wrong-pass-77@127.0.0.1:{redis.port}/3"
    ns, out, err = args(redis_url=bad)
    assert statuscmd.main(ns) == 1
    assert "wrong-pass-77" not in err.getvalue()
    assert err.getvalue().startswith("fido: error: cannot read Redis at redis://:***@")
    assert err.getvalue().count("\n") == 1


class UnreachableTests(SynchronousTestCase):
    def test_unreachable_redis_is_one_line_and_exit_1(self):
        ns, out, err = args(redis_url=f"redis://127.0.0.1:{free_port()}/0")
        self.assertEqual(statuscmd.main(ns), 1)
        self.assertEqual(out.getvalue(), "")
        line = err.getvalue()
        self.assertTrue(line.startswith("fido: error: cannot read Redis at redis://127.0.0.1:"), line)
        self.assertIn("refused", line.lower())
        self.assertEqual(line.count("\n"), 1)

    def test_bad_url_is_one_line(self):
        ns, out, err = args(redis_url="http://nope")
        self.assertEqual(statuscmd.main(ns), 1)
        self.assertIn("scheme must be", err.getvalue())

    def test_format_text_without_instances(self):
        doc = statuscmd.shape("redis://h:6379/0", {"fido:account:a": {"state": "ok"}}, {})
        text = "\n".join(statuscmd.format_text(doc))
        self.assertIn("Accounts: 1 (1 ok, 0 failing)", text)
        self.assertIn("Instances alive: 0", text)


def test_through_the_fido_command_with_a_config_file(redis, tmp_path):
    populate(redis.client())
    conf = tmp_path / "fido.toml"
    conf.write_text(f'[redis]\nurl = "{redis.url}"\n')
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(["status", "--json", "--config", str(conf)], stdout=out, stderr=err,
                      environ={})
    assert status == 0, err.getvalue()
    assert json.loads(out.getvalue())["summary"]["total"] == 3


def test_through_the_fido_command_redis_down(tmp_path):
    conf = tmp_path / "fido.toml"
    conf.write_text(f'[redis]\nurl = "redis://127.0.0.1:{free_port()}/0"\n')
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(["status", "--config", str(conf)], stdout=out, stderr=err, environ={})
    assert status == 1
    assert err.getvalue().startswith("fido: error: ") and err.getvalue().count("\n") == 1


class _Stop:
    """A sleep that lets ``n`` redraws happen, then is Ctrl-C."""

    def __init__(self, n, between=None):
        self.n = n
        self.slept = []
        self.between = between

    def __call__(self, seconds):
        self.slept.append(seconds)
        if len(self.slept) >= self.n:
            raise KeyboardInterrupt
        if self.between is not None:
            self.between(len(self.slept))


def test_watch_redraws_until_ctrl_c_and_exits_0(redis):
    r = redis.client()
    populate(r)

    def between(i):  # an account recovers between two redraws
        r("HSET", "fido:account:globex", "state", "ok")

    sleep = _Stop(2, between)
    ns, out, err = args(redis_url=redis.url, watch=5.0, sleep=sleep)
    assert statuscmd.main(ns) == 0, err.getvalue()
    screens = out.getvalue().split(statuscmd.CLEAR)[1:]
    assert len(screens) == 2
    assert sleep.slept == [5.0, 5.0]
    assert screens[0].startswith("Every 5 s: fido status")
    assert "2 failing" in screens[0]
    assert "1 failing" in screens[1] and "globex" not in screens[1]


def test_watch_through_the_fido_command_defaults_to_two_seconds(redis):
    for argv, watch in ((["status", "--watch", "--redis-url", redis.url], 2.0),
                        (["status", "--watch", "0.5"], 0.5), (["status"], None)):
        assert cli.build_parser(argv=argv).parse_args(argv).watch == watch


class WatchUnitTests(SynchronousTestCase):
    def test_redis_down_is_a_line_on_the_screen_and_the_watch_goes_on(self):
        port = free_port()
        sleep = _Stop(3)
        ns, out, err = args(redis_url=f"redis://127.0.0.1:{port}/0", watch=1.0, sleep=sleep)
        self.assertEqual(statuscmd.main(ns), 0)
        screens = out.getvalue().split(statuscmd.CLEAR)[1:]
        self.assertEqual(len(screens), 3)
        self.assertIn("cannot read Redis", screens[-1])

    def test_watch_with_json_or_no_time_is_one_line_and_exit_1(self):
        for kw in (dict(watch=2.0, json=True), dict(watch=0.0)):
            ns, out, err = args(redis_url="redis://127.0.0.1:1/0", **kw)
            self.assertEqual(statuscmd.main(ns), 1)
            self.assertEqual(len(err.getvalue().splitlines()), 1)
            self.assertIn("--watch", err.getvalue())


def test_ctrl_c_ends_a_real_watch_with_exit_0(redis, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    populate(redis.client())
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # SIGINT as at a terminal, even when the test runner was started in the
    # background (a shell's ``cmd &`` ignores SIGINT, and the child inherits it)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fido_tx", "status", "--watch", "0.2", "--redis-url", redis.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 20
        seen = b""
        while seen.count(statuscmd.CLEAR.encode()) < 2 and time.monotonic() < deadline:
            seen += os.read(proc.stdout.fileno(), 65536)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert seen.count(statuscmd.CLEAR.encode()) >= 2, seen
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
