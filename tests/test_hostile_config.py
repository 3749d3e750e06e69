"""Bad numbers, files that are not files, and what the start makes of them
(README "Bounds"): one line naming the key or the file, never a hang, never a
traceback; ``fido check`` finds what the daemon would refuse."""

import io
import json
import os
import shutil
import socket
import tempfile
import threading
import types

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import boundedfile, config
from fido_tx.accounts import model as accounts_mod
from fido_tx.cmd import check
from fido_tx.config import ConfigError
from fido_tx.observe import health as health_mod
from fido_tx.observe import report as report_mod
from fido_tx.outcome import SessionResult


class _Dir:
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="fido-hostile-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def path(self, name):
        return os.path.join(self.dir, name)

    def write(self, name, text):
        with open(self.path(name), "w") as f:
            f.write(text)
        return self.path(name)

    def error(self, text):
        path = self.write("fido.toml", text)
        message = str(self.assertRaises(ConfigError, config.read_settings, path))
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith(path + ": "), message)
        return message[len(path) + 2:]


class NumberBoundsTests(_Dir, SynchronousTestCase):
    def test_each_number_out_of_bounds_is_one_line_naming_the_key(self):
        cases = [
            ("[fido]\nworkers = 4611686018427387904\n", "[fido] workers: must be from 1 to 10000"),
            ("[fido]\nworkers = 10001\n", "[fido] workers: must be from 1 to 10000"),
            ("[fido]\npoll_interval = 1e-9\n", "[fido] poll_interval: must be from 1 s"),
            ("[fido]\npoll_interval = 86401\n", "[fido] poll_interval: must be from 1 s to 86400 s"),
            ("[fido]\ngrace_period = 1e9\n", "[fido] grace_period: must be from 0 s to 3600 s"),
            ("[imap]\ncommand_timeout = 1e12\n", "[imap] command_timeout: must be at most 86400 s"),
            ("[imap]\nsession_timeout = 1e12\n", "[imap] session_timeout: must be from 0 s"),
            ("[imap]\nbatch_messages = 1000000\n", "[imap] batch_messages: must be from 1 to 10000"),
            ("[imap]\nbatch_bytes = 10\n", "[imap] batch_bytes: must be from 1024"),
            ("[imap]\nmax_message_size = 1099511627776\n", "[imap] max_message_size: must be"),
            ("[imap]\nmax_inflight_bytes = 100\n", "[imap] max_inflight_bytes: must be"),
            ("[imap]\nmax_search_uids = 0\n", "[imap] max_search_uids: must be from 1 to 1e+06"),
            ("[imap]\nmin_literal_rate = 1099511627776\n", "[imap] min_literal_rate: must be"),
            ("[backoff]\nmaximum = 1e12\n", "[backoff] maximum: must be at most 604800 s"),
            ("[redis]\ncommand_timeout = 1e12\n", "[redis] command_timeout: must be at most"),
            ("[redis]\nmax_backlog = 10000000000\n", "[redis] max_backlog: must be from 1"),
            ("[reporter]\nqueue_size = 1000000000\n", "[reporter] queue_size: must be from 1"),
            ("[reporter]\ntimeout = 1e12\n", "[reporter] timeout: must be at most 86400 s"),
            ("[log]\nmax_rotated_files = 1000000\n", "[log] max_rotated_files: must be from 1"),
            ("[log]\nrotate_length = 10\n", "[log] rotate_length: must be from 1024"),
        ]
        for text, expected in cases:
            self.assertIn(expected, self.error(text), text)

    def test_the_defaults_are_within_the_bounds(self):
        config.parse_settings(tomllib_defaults(), self.path("fido.toml"))

    def test_reporter_url_with_user_info_is_refused_without_showing_the_password(self):
        message = self.error('[reporter]\nurl = "https://app:s3cr3t-pw@example.com/fido"\n')
        self.assertIn("[reporter] url: must not hold user:password@", message)
        self.assertNotIn("s3cr3t-pw", message)
        self.assertIn("example.com/fido", message)

    def test_http_listen_that_cannot_be_parsed(self):
        for value in ("bogus:x", "tcp:x", "ssl:443:privateKey"):
            message = self.error(f'[http]\nlisten = "{value}"\n')
            self.assertIn("[http] listen: cannot use", message)

    def test_log_file_that_is_a_directory(self):
        os.mkdir(self.path("logs"))
        message = self.error('[log]\nfile = "logs"\n')
        self.assertIn("[log] file:", message)
        self.assertIn("is a directory", message)


def tomllib_defaults():
    import tomllib

    return tomllib.loads(config.default_text())


class FileTests(_Dir, SynchronousTestCase):
    def fifo(self, name):
        path = self.path(name)
        os.mkfifo(path)
        return path

    def no_hang(self, f, *args):
        """Run ``f`` in a thread: a FIFO must not block it (fails after 10 s)."""
        box = []

        def run():
            try:
                box.append(("ok", f(*args)))
            except Exception as e:  # noqa: BLE001 - handed back to the test
                box.append(("error", e))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(10)
        self.assertTrue(box, f"{f.__name__} hung on a FIFO")
        return box[0]

    def test_config_fifo_is_one_line_not_a_hang(self):
        path = self.fifo("fido.toml")
        kind, value = self.no_hang(config.read_settings, path)
        self.assertEqual(kind, "error")
        self.assertIsInstance(value, ConfigError)
        self.assertEqual(str(value), f"{path}: is a FIFO (named pipe), not a regular config file")

    def test_config_dev_zero_is_refused_before_reading(self):
        e = self.assertRaises(ConfigError, config.read_settings, "/dev/zero")
        self.assertIn("is a character device", str(e))

    def test_config_over_the_size_limit(self):
        path = self.write("fido.toml", "# " + "x" * config.MAX_CONFIG_BYTES + "\n")
        e = self.assertRaises(ConfigError, config.read_settings, path)
        self.assertIn("over the limit of 1048576 bytes for a config file", str(e))

    def test_accounts_fifo_and_dev_zero(self):
        path = self.fifo("accounts.json")
        kind, value = self.no_hang(accounts_mod.load_accounts, path)
        self.assertEqual(kind, "error")
        self.assertIsInstance(value, accounts_mod.AccountsFileError)
        self.assertIn("is a FIFO", str(value))
        e = self.assertRaises(accounts_mod.AccountsFileError, accounts_mod.load_accounts,
                              "/dev/zero")
        self.assertIn("is a character device, not a regular accounts file", str(e))

    def test_accounts_over_the_size_limit(self):
        path = self.path("accounts.json")
        with open(path, "wb") as f:
            f.truncate(boundedfile.MAX_ACCOUNTS_BYTES + 1)  # sparse: nothing written
        e = self.assertRaises(accounts_mod.AccountsFileError, accounts_mod.load_accounts, path)
        self.assertIn("over the limit of 67108864 bytes", str(e))

    def test_key_file_fifo(self):
        path = self.fifo("fido.key")
        kind, value = self.no_hang(accounts_mod.read_keys, path)
        self.assertEqual(kind, "error")
        self.assertIn("is a FIFO", str(value))

    def test_a_regular_file_reads_whole(self):
        path = self.write("a.txt", "hello")
        self.assertEqual(boundedfile.read_regular(path, 5), b"hello")
        self.assertRaises(boundedfile.FileRefused, boundedfile.read_regular, path, 4)


class CheckTests(_Dir, SynchronousTestCase):
    def run_check(self, extra=""):
        self.write("accounts.json", json.dumps({"accounts": []}))
        os.chmod(self.path("accounts.json"), 0o600)
        self.write("fido.toml", '[fido]\naccounts_file = "accounts.json"\nkey_file = ""\n' + extra)
        out, err = io.StringIO(), io.StringIO()
        args = types.SimpleNamespace(config=self.path("fido.toml"), stdout=out, stderr=err,
                                     environ={}, connect=False, json=False)
        return check.main(args), out.getvalue(), err.getvalue()

    def test_what_the_config_refuses_check_refuses_with_one_line(self):
        for extra, expected in (
            ('[http]\nlisten = "bogus:x"\n', "[http] listen: cannot use 'bogus:x'"),
            ('[log]\nfile = "."\n', "[log] file:"),
            ('[reporter]\nurl = "https://u:pw@example.com/"\n', "must not hold user:password@"),
        ):
            status, out, err = self.run_check(extra)
            self.assertEqual(status, 1, extra)
            self.assertEqual(err.count("\n"), 1, err)
            self.assertIn(expected, err)
            self.assertNotIn("Traceback", err)

    def test_a_port_in_use_is_a_warning(self):
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        status, out, err = self.run_check(f'[http]\nlisten = "tcp:{port}:interface=127.0.0.1"\n')
        self.assertIn(f"warning: [http] listen 'tcp:{port}:interface=127.0.0.1': cannot listen",
                      out)
        self.assertEqual(status, 0, out + err)

    def test_listening_beyond_loopback_is_a_warning(self):
        # the status page has a password then; /metrics and /healthz have none
        self.write("page.pw", "a-page-password\n")
        os.chmod(self.path("page.pw"), 0o600)
        status, out, err = self.run_check(
            '[http]\nlisten = "tcp:0:interface=0.0.0.0"\nusername = "ops"\n'
            'password_file = "page.pw"\n')
        self.assertIn("listens beyond loopback", out, err)

    def test_a_log_file_that_cannot_be_created(self):
        self.write("blocker", "a file where a directory should be")
        status, out, err = self.run_check('[log]\nfile = "blocker/fido.log"\n')
        self.assertEqual(status, 1)
        self.assertIn("problem: [log] file", out)
        self.assertIn("is not a directory", out)

    def test_tcp_listen_address(self):
        self.assertEqual(check.tcp_listen_address("tcp:9119:interface=127.0.0.1"),
                         ("127.0.0.1", 9119))
        self.assertEqual(check.tcp_listen_address("9119"), ("0.0.0.0", 9119))
        self.assertEqual(check.tcp_listen_address("tcp6:80:interface=\\:\\:1"), ("::1", 80))
        self.assertIsNone(check.tcp_listen_address("unix:/tmp/x"))


class ReporterEscapeTests(SynchronousTestCase):
    def test_control_characters_are_escaped(self):
        self.assertEqual(report_mod.escape("ok\x1b[31mred\nFAKE LINE\r\u202e"),
                         "ok\\x1b[31mred\\x0aFAKE LINE\\x0d\\u202e")
        self.assertEqual(report_mod.escape("plain été"), "plain été")


class HealthStoreFailureTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        from fido_tx.testing import FakeRedis, FakeScheduler

        self.health = health_mod.Health(self.clock, FakeScheduler(), FakeRedis(connected=True))

    def result(self, kind=None, fetched=0):
        return SessionResult("a", kind=kind, message="WRONGTYPE Operation against a key"
                             if kind else "", fetched=fetched)

    def test_stores_failing_longer_than_the_threshold_fail_the_check(self):
        self.health.observe(None, self.result("redis"))
        self.clock.advance(119)
        self.health.observe(None, self.result("redis"))
        self.assertTrue(self.health.check()[0])
        self.health.observe(None, self.result())  # nothing new: proves nothing
        self.clock.advance(2)
        healthy, body = self.health.check()
        self.assertFalse(healthy)
        self.assertIn("every store has failed for 121 s", body["reason"])
        self.assertIn("WRONGTYPE", body["reason"])
        self.health.observe(None, self.result(fetched=3))  # stored: over
        self.assertTrue(self.health.check()[0])


class RedisAtStartTests(SynchronousTestCase):
    """Redis unreachable from the start is reported after the grace period."""

    def test_never_connected_is_reported_like_an_outage(self):
        from fido_tx import service

        status = types.SimpleNamespace(calls=[], redis_state=None, stop=None)
        status.redis_state = status.calls.append
        status.stop = lambda: status.calls.append("stop")
        watch = service._RedisAtStart(types.SimpleNamespace(connected=False), status)
        watch.startService()
        watch.stopService()
        self.assertEqual(status.calls, [False, "stop"])

    def test_already_connected_says_nothing(self):
        from fido_tx import service

        status = types.SimpleNamespace(calls=[])
        status.redis_state = status.calls.append
        status.stop = lambda: None
        watch = service._RedisAtStart(types.SimpleNamespace(connected=True), status)
        watch.startService()
        self.assertEqual(status.calls, [])

    def test_the_tracker_reports_after_the_grace_period_and_clears_on_connect(self):
        from fido_tx.observe.status import StatusTracker

        clock = task.Clock()
        store = types.SimpleNamespace(connected=False, _last_error="WRONGPASS invalid password")
        reporter = types.SimpleNamespace(sent=[])
        reporter.report = lambda *a, **kw: reporter.sent.append((a, kw))
        tracker = StatusTracker(clock, store, reporter)
        tracker.redis_state(False)  # what _RedisAtStart does
        clock.advance(29)
        self.assertEqual(tracker.global_problems, {})
        clock.advance(2)
        self.assertIn("redis", tracker.global_problems)
        self.assertEqual(reporter.sent[0][0][:2], ("*", "redis"))
        tracker.redis_state(True)
        self.assertEqual(tracker.global_problems, {})
