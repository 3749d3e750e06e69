"""fido check: the static check of fido.toml + accounts file, and --connect
against a real loopback IMAP server (fido_tx.demo.memimap)."""

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import attr
import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from fido_tx.accounts import model as accounts
from fido_tx.cmd import check
from fido_tx.cmd import cli
from fido_tx import config
from fido_tx import errors
from fido_tx.accounts.model import Account
from fido_tx.config import ImapSettings
from fido_tx.outcome import SessionResult

PASSWORD = "check-secret-pw"
BAD_PASSWORD = "wrong-secret-pw"


def entry(account_id, port=993, **kw):
    fields = {"id": account_id, "host": "imap.example.test", "port": port,
              "username": f"{account_id}@example.test", "password": PASSWORD}
    fields.update(kw)
    return fields


class _Files:
    """A temp directory with fido.toml (plain accounts file) and accounts.json."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="fido-check-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.roots = config.Roots(etc=self.path("etc"), deploy_globs=(),
                                  home=self.path("home"), is_root=False)

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def write(self, name, data, mode=0o600):
        with open(self.path(name), "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode())
        os.chmod(self.path(name), mode)
        return self.path(name)

    def setup_files(self, entries, extra="", mode=0o600, key_file='""'):
        conf = self.write("fido.toml", textwrap.dedent(f"""\
            [fido]
            accounts_file = "accounts.json"
            key_file = {key_file}
            {extra}
            [reporter]
            url = "https://app.example.test/fido"
            """))
        self.write("accounts.json", json.dumps({"accounts": entries}), mode)
        return conf

    def fido(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["check", *argv], stdout=out, stderr=err, environ={},
                          roots=self.roots)
        return status, out.getvalue(), err.getvalue()


class StaticCheckTests(_Files, SynchronousTestCase):
    def test_good_file_exits_0_with_summary(self):
        conf = self.setup_files([entry("acme-support"), entry("acme-billing")])
        status, out, err = self.fido("--config", conf)
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(lines[-1], "fido.toml OK: 2 accounts (2 in this shard), 0 problems")
        self.assertIn(f"config: {conf}", lines)
        self.assertFalse([line for line in lines if line.startswith(("problem", "warning"))], out)

    def test_bad_account_exits_1_naming_id_and_field(self):
        conf = self.setup_files([entry("acme-support"), entry("acme-billing", port=99999),
                                 entry("globex", security="ssl")])
        status, out, err = self.fido("--config", conf)
        self.assertEqual(status, 1)
        self.assertEqual(err, "")
        problems = [line for line in out.splitlines() if line.startswith("problem: ")]
        self.assertEqual(len(problems), 2, out)
        self.assertTrue(problems[0].startswith("problem: account acme-billing: port: "))
        self.assertTrue(problems[1].startswith("problem: account globex: security: "))
        self.assertIn("fido.toml OK: 1 account (1 in this shard), 2 problems", out)
        self.assertNotIn(PASSWORD, out)

    def test_bad_json_is_one_line_error(self):
        conf = self.setup_files([])
        self.write("accounts.json", '{"accounts": [')
        status, out, err = self.fido("--config", conf)
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("fido: error: "), err)
        self.assertIn("accounts.json: invalid JSON at line 1", err)

    def test_bad_config_is_one_line_error(self):
        conf = self.setup_files([entry("a")], extra="wokers = 3")
        status, out, err = self.fido("--config", conf)
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("wokers", err)

    def test_missing_config_is_one_line_and_creates_nothing(self):
        status, out, err = self.fido()
        self.assertEqual((status, out), (1, ""))
        self.assertIn("no fido.toml found", err)
        self.assertIn("fido init", err)
        self.assertFalse(os.path.exists(self.path("home")))

    def test_plain_accounts_file_readable_by_others_warns(self):
        conf = self.setup_files([entry("a")], mode=0o644)
        status, out, _err = self.fido("--config", conf)
        self.assertEqual(status, 0)  # a warning, not a problem
        [warning] = [line for line in out.splitlines() if line.startswith("warning: ")]
        self.assertIn(self.path("accounts.json"), warning)
        self.assertIn("readable by group or others", warning)

    def test_key_file_readable_by_others_warns(self):
        key = self.path("fido.key")
        with open(key, "wb") as f:
            f.write(accounts.generate_key() + b"\n")
        os.chmod(key, 0o640)
        conf = self.setup_files([], key_file='"fido.key"')
        self.write("accounts.json", accounts.encrypt_bytes(
            json.dumps({"accounts": [entry("a")]}).encode(), key), 0o644)
        status, out, _err = self.fido("--config", conf)
        self.assertEqual(status, 0, out)
        [warning] = [line for line in out.splitlines() if line.startswith("warning: ")]
        self.assertIn(key, warning)
        self.assertIn(f"(encrypted, key file {key})", out)
        self.assertIn("1 account (1 in this shard)", out)

    def test_other_shards_are_counted_not_errors(self):
        ids = [f"acct-{i}" for i in range(12)]
        conf = self.setup_files([entry(i) for i in ids], extra='shard = "2/3"')
        status, out, _err = self.fido("--config", conf)
        mine = sum(1 for i in ids if accounts.in_shard(i, "2/3"))
        self.assertTrue(0 < mine < 12)
        self.assertEqual(status, 0)
        self.assertIn(f"fido.toml OK: 12 accounts ({mine} in this shard), 0 problems", out)
        self.assertIn(f"note: {12 - mine} accounts belong to other shards", out)

    def test_empty_reporter_url_is_a_note(self):
        conf = self.setup_files([entry("a")])
        with open(conf) as f:
            text = f.read()
        text = text.replace('url = "https://app.example.test/fido"', 'url = ""')
        self.write("fido.toml", text)
        status, out, _err = self.fido("--config", conf)
        self.assertEqual(status, 0)
        self.assertIn("note: [reporter] url is empty", out)

    def test_accounts_with_select_new_or_start_from_now_get_a_note(self):
        conf = self.setup_files([entry("a"), entry("b", select="new"),
                                 entry("c", start_from="now")])
        status, out, _err = self.fido("--config", conf)
        self.assertEqual(status, 0)
        [note] = [line for line in out.splitlines() if "start_from" in line]
        self.assertTrue(note.startswith('note: 2 IMAP accounts with select = "new" or'), note)

    def test_json_without_connect(self):
        conf = self.setup_files([entry("a"), entry("b", port=0)], mode=0o644)
        status, out, _err = self.fido("--config", conf, "--json")
        self.assertEqual(status, 1)
        doc = json.loads(out)
        self.assertEqual((doc["accounts"], doc["in_shard"], doc["ok"], doc["connect"]),
                         (1, 1, False, None))
        self.assertEqual(doc["problems"], [{"account": "b", "index": 1, "field": "port",
                                            "message": "must be from 1 to 65535, got 0"}])
        self.assertEqual(len(doc["warnings"]), 1)

    def test_bad_concurrency_is_a_usage_error(self):
        conf = self.setup_files([entry("a")])
        status, _out, err = self.fido("--config", conf, "--connect", "--concurrency", "0")
        self.assertEqual(status, 2)
        self.assertIn("--concurrency must be more than 0", err)


# -- check_accounts with a fake session and a fake clock -----------------------------


class _FakeFetch:
    """fetch_mailbox's signature; each call returns a Deferred the test fires."""

    def __init__(self):
        self.calls = []
        self.cancelled = []

    def __call__(self, reactor, account, sink, settings, dry_run=False, log=None):
        d = defer.Deferred(lambda d: self.cancelled.append(account.id))
        self.calls.append((account, sink, settings, dry_run, d))
        return d


def _accounts(n):
    return [Account(id=f"a{i}", host="h", username="u", password=PASSWORD) for i in range(n)]


class CheckAccountsTests(SynchronousTestCase):
    def test_runs_at_most_concurrency_sessions_in_order_with_progress(self):
        clock, fetch, progress = task.Clock(), _FakeFetch(), []
        d = check.check_accounts(clock, _accounts(5), ImapSettings(), concurrency=2,
                                 progress=lambda *a: progress.append(a), fetch=fetch)
        self.assertEqual(len(fetch.calls), 2)
        self.assertEqual(progress, [(0, 5)])
        for _account, _sink, _settings, dry_run, _d in fetch.calls:
            self.assertTrue(dry_run)
        fetch.calls[1][4].callback(SessionResult("a1", fetched=3))
        self.assertEqual(len(fetch.calls), 3)
        for i in (0, 2, 3, 4):
            fetch.calls[i][4].callback(SessionResult(f"a{i}", kind=errors.AUTH, message="no"))
        results = self.successResultOf(d)
        self.assertEqual([a.id for a, _r in results], ["a0", "a1", "a2", "a3", "a4"])
        self.assertEqual([r.ok for _a, r in results], [False, True, False, False, False])
        self.assertEqual(progress[-1], (5, 5))
        self.assertEqual(len(progress), 6)

    def test_sink_says_every_uid_is_new_and_never_stores(self):
        clock, fetch = task.Clock(), _FakeFetch()
        check.check_accounts(clock, _accounts(1), ImapSettings(), fetch=fetch)
        sink = fetch.calls[0][1]
        self.assertEqual(self.successResultOf(sink.filter_new("a0", "INBOX", "1",
                                                              ["3", "1", "2"])),
                         ["3", "1", "2"])
        self.failureResultOf(sink.deliver([]), errors.FidoError)
        from zope.interface.verify import verifyObject

        from fido_tx.interfaces import ISink

        self.assertTrue(verifyObject(ISink, sink))

    def test_account_over_its_deadline_is_a_timeout_and_is_cancelled(self):
        clock, fetch = task.Clock(), _FakeFetch()
        d = check.check_accounts(clock, _accounts(2), ImapSettings(), timeout=7, fetch=fetch)
        settings = fetch.calls[0][2]
        self.assertEqual((settings.connect_timeout, settings.command_timeout), (7, 7))
        fetch.calls[0][4].callback(SessionResult("a0", seconds=0.1))
        clock.advance(7)
        [(_a0, r0), (_a1, r1)] = self.successResultOf(d)
        self.assertTrue(r0.ok)
        self.assertEqual((r1.kind, r1.message, r1.seconds), ("timeout", "no result within 7 s", 7))
        self.assertEqual(fetch.cancelled, ["a1"])

    def test_password_in_a_message_is_redacted(self):
        clock, fetch = task.Clock(), _FakeFetch()
        d = check.check_accounts(clock, _accounts(1), ImapSettings(), fetch=fetch)
        fetch.calls[0][4].callback(SessionResult(
            "a0", kind=errors.AUTH, message=f"server said {PASSWORD}", debug=PASSWORD))
        [(_a, r)] = self.successResultOf(d)
        self.assertEqual(r.message, "server said <redacted>")
        self.assertNotIn(PASSWORD, r.debug)

    def test_an_unexpected_failure_is_a_result(self):
        def fetch(*a, **kw):
            raise RuntimeError("boom")

        d = check.check_accounts(task.Clock(), _accounts(1), ImapSettings(), fetch=fetch)
        [(_a, r)] = self.successResultOf(d)
        self.assertEqual((r.kind, r.message), ("protocol", "unexpected error: RuntimeError: boom"))


class FormattingTests(SynchronousTestCase):
    def test_table_and_summary(self):
        a, b = _accounts(2)
        lines = check.format_results([
            (a, SessionResult("a0", fetched=10, too_large=(7, 9), seconds=0.5)),
            (b, SessionResult("a1", kind="auth", message="LOGIN rejected\nby server",
                              seconds=0.25)),
        ])
        self.assertEqual(lines[0].split(), ["ACCOUNT", "SERVER", "SECURITY", "RESULT", "SECONDS"])
        self.assertEqual(lines[1].split()[:6], ["a0", "h:993", "tls", "ok:", "12", "unseen"])
        self.assertIn("(2 over max_message_size)", lines[1])
        self.assertTrue(lines[1].endswith("0.50"))
        self.assertIn("auth: LOGIN rejected by server", lines[2])
        self.assertEqual(lines[-1], "checked 2 accounts: 1 ok, 1 failed (auth 1)")

    def test_the_table_shows_select_and_start_from_when_not_the_defaults(self):
        a, b = _accounts(2)
        b = attr.evolve(b, select="new", start_from="now")
        lines = check.format_results([(a, SessionResult("a0", fetched=3)),
                                      (b, SessionResult("a1", fetched=0))])
        self.assertEqual(lines[1].split()[3:], ["ok:", "3", "unseen", "0.00"])
        self.assertIn("ok: 0 new (select new, start_from now)", lines[2])
        report = check.Report(config_path="c", accounts_file="f", key_file="", shard="1/1",
                              accounts=(a, b), shard_accounts=(a, b))
        doc = check.document(report, [(a, SessionResult("a0")), (b, SessionResult("a1"))])
        modes = [(x["select"], x["start_from"]) for x in doc["connect"]["accounts"]]
        self.assertEqual(modes, [("unseen", "all"), ("new", "now")])

    def test_progress_bar_redraws_in_place_and_clears(self):
        out = io.StringIO()
        bar = check.ProgressBar(out, width=10)
        bar(0, 4)
        bar(2, 4)
        bar(4, 4)
        bar.clear()
        text = out.getvalue()
        self.assertNotIn("\n", text)
        self.assertEqual(text.split("\r")[1:4], ["checking 0/4 [..........]",
                                                 "checking 2/4 [#####.....]",
                                                 "checking 4/4 [##########]"])
        self.assertTrue(text.endswith("\r"))


# -- against a real loopback IMAP server ----------------------------------------------


def _message(n):
    return (b"From: a@example.test\r\nMessage-ID: <m%d@example.test>\r\n"
            b"Subject: test %d\r\n\r\nhello\r\n" % (n, n))


FAST = ImapSettings(connect_timeout=5, greeting_timeout=5, command_timeout=5, logout_timeout=2)


@pytest_twisted.inlineCallbacks
def test_check_accounts_against_memimap_reads_only():
    from twisted.internet import reactor

    from fido_tx.demo.memimap import MemoryIMAPFactory

    factory = MemoryIMAPFactory({"good": (PASSWORD, {"INBOX": [_message(i) for i in range(3)]})})
    inbox = factory.folders["good"]["INBOX"]
    inbox.messages[0].flags.add("\\Seen")
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        n = port.getHost().port
        good = Account(id="good-acct", host="127.0.0.1", port=n, security="none",
                       username="good", password=PASSWORD)
        bad = Account(id="bad-acct", host="127.0.0.1", port=n, security="none",
                      username="good", password=BAD_PASSWORD)
        progress = []
        results = yield check.check_accounts(reactor, [good, bad], FAST, concurrency=2,
                                             progress=lambda *a: progress.append(a), timeout=10)
    finally:
        yield port.stopListening()
    [(a1, r1), (a2, r2)] = results
    assert (a1, a2) == (good, bad)
    assert r1.ok and r1.dry_run, r1
    assert check.result_text(r1) == "ok: 2 unseen"
    assert r2.kind == "auth", r2
    assert BAD_PASSWORD not in r2.message + r2.debug
    assert progress[0] == (0, 2) and progress[-1] == (2, 2)
    # read-only: flags as before, nothing expunged
    assert [sorted(m.flags) for m in inbox.messages] == [["\\Seen"], [], []]


SERVER_SCRIPT = """
import sys
from twisted.internet import reactor
from fido_tx.demo.memimap import MemoryIMAPFactory
raw = b"From: a@example.test\\r\\nSubject: hi\\r\\n\\r\\nhello\\r\\n"
factory = MemoryIMAPFactory({"good": (sys.argv[1], {"INBOX": [raw] * 4})})
port = reactor.listenTCP(0, factory, interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.callLater(120, reactor.stop)
reactor.run()
"""


@pytest.fixture(scope="module")
def imap_server():
    """A memimap server in its own process (fido check --connect stops its reactor)."""
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, PASSWORD],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), "server did not start"
        yield int(line)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def connect_runs(imap_server, tmp_path_factory):
    """``fido check --connect`` and ``--connect --json`` in subprocesses, run at once."""
    tmp = tmp_path_factory.mktemp("connect")
    acct = {"host": "127.0.0.1", "port": imap_server, "security": "none", "username": "good"}
    (tmp / "accounts.json").write_text(json.dumps({"accounts": [
        dict(acct, id="good-acct", password=PASSWORD),
        dict(acct, id="bad-acct", password=BAD_PASSWORD),
    ]}))
    (tmp / "accounts.json").chmod(0o600)
    conf = tmp / "fido.toml"
    conf.write_text('[fido]\naccounts_file = "accounts.json"\nkey_file = ""\n')
    env = {k: v for k, v in os.environ.items() if k != "FIDO_CONFIG"}
    base = [sys.executable, "-m", "fido_tx", "check", "--config", str(conf), "--connect"]
    procs = {
        "text": subprocess.Popen(base + ["--timeout", "10"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env),
        "json": subprocess.Popen(base + ["--json"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env),
    }
    runs = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        runs[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return runs


def test_connect_prints_a_table_and_fails_for_the_bad_account(connect_runs, imap_server):
    done = connect_runs["text"]
    assert done.returncode == 1, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert "fido.toml OK: 2 accounts (2 in this shard), 0 problems" in lines
    assert "\r" not in done.stdout  # no progress bar on a pipe
    header = next(i for i, line in enumerate(lines) if line.startswith("ACCOUNT"))
    assert lines[header].split() == ["ACCOUNT", "SERVER", "SECURITY", "RESULT", "SECONDS"]
    good, bad = lines[header + 1], lines[header + 2]
    server = f"127.0.0.1:{imap_server}"
    assert good.split()[:6] == ["good-acct", server, "none", "ok:", "4", "unseen"]
    assert bad.split()[:4] == ["bad-acct", server, "none", "auth:"]
    assert lines[-1] == "checked 2 accounts: 1 ok, 1 failed (auth 1)"
    assert PASSWORD not in done.stdout and BAD_PASSWORD not in done.stdout


def test_connect_json_is_one_document(connect_runs):
    done = connect_runs["json"]
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    connect = doc["connect"]
    assert (connect["ok"], connect["failed"], connect["by_kind"]) == (1, 1, {"auth": 1})
    by_id = {a["id"]: a for a in connect["accounts"]}
    assert by_id["good-acct"]["ok"] and by_id["good-acct"]["unseen"] == 4
    assert by_id["bad-acct"]["kind"] == "auth" and by_id["bad-acct"]["unseen"] is None
    assert doc["ok"] is False
    assert BAD_PASSWORD not in done.stdout
