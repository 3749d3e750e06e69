"""The tracker starting from the account hashes: reports across restarts."""

from hypothesis import given, settings as hsettings, strategies as st
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import errors
from fido_tx.accounts.model import Account
from fido_tx.observe.history import AccountStateReader
from fido_tx.observe.restore import RestoreGate
from fido_tx.observe.status import StatusTracker
from fido_tx.outcome import SessionResult
from tests.support.fake_redis import FakeRedisExecute
from fido_tx.testing import FakeReporter

ACME = Account(id="acme", host="imap.example.com", password="pw-secret")
AUTH = SessionResult("acme", kind=errors.AUTH, message="[AUTHENTICATIONFAILED] bad password")
OK = SessionResult("acme", fetched=2)


class HashStore:
    """The store's two writes, into the fake Redis hashes."""

    def __init__(self, redis):
        self.redis = redis
        self.connected = True

    def record_session(self, result, extra=None, account=None):
        fields = {"state": "ok"} if result.ok else {
            "state": "error", "last_error_kind": result.kind, "last_error": result.message,
            "last_error_at": "2026-11-29T10:00:00.000Z"}
        fields.update(extra or {})
        return self.update_account(result.account_id, fields)

    def update_account(self, account_id, fields):
        args = [x for kv in fields.items() for x in kv]
        return self.redis("HSET", f"fido:account:{account_id}", *args)


class Run:
    """One run of Fido: a tracker and its gate over the same fake Redis."""

    def __init__(self, redis, clock=None):
        self.clock = clock or task.Clock()
        self.reporter = FakeReporter()
        self.tracker = StatusTracker(self.clock, HashStore(redis), self.reporter)
        self.gate = RestoreGate(self.clock, self.tracker, AccountStateReader(redis))

    def session(self, result, account=ACME):
        self.gate.record(account, result)


class RestartTests(SynchronousTestCase):
    def setUp(self):
        self.redis = FakeRedisExecute()

    def _failing_before_restart(self):
        first = Run(self.redis)
        first.gate.add(["acme"])
        first.session(OK)
        first.session(AUTH)
        first.session(AUTH)
        self.assertEqual(first.reporter.kinds, [("acme", "auth")])
        return Run(self.redis)

    def test_failing_before_and_recovering_after_gets_exactly_one_recovered(self):
        second = self._failing_before_restart()
        second.gate.add(["acme"])
        second.session(OK)
        second.session(OK)
        self.assertEqual(second.reporter.kinds, [("acme", "recovered")])
        self.assertIn("auth", second.reporter.reports[0]["message"])
        self.assertIn("AUTHENTICATIONFAILED", second.reporter.reports[0]["message"])

    def test_still_failing_after_a_restart_is_not_reported_again(self):
        second = self._failing_before_restart()
        second.gate.add(["acme"])
        second.session(AUTH)
        self.assertEqual(second.reporter.kinds, [])
        self.assertEqual(second.tracker.state_of("acme").state, "auth")
        self.assertIsNotNone(second.tracker.state_of("acme").failing_since)

    def test_a_new_kind_after_a_restart_is_reported(self):
        second = self._failing_before_restart()
        second.gate.add(["acme"])
        second.session(SessionResult("acme", kind=errors.CONNECT, message="refused"))
        self.assertEqual(second.reporter.kinds, [("acme", "connect")])

    def test_working_before_and_failing_after_is_reported_once(self):
        first = Run(self.redis)
        first.gate.add(["acme"])
        first.session(OK)
        second = Run(self.redis)
        second.gate.add(["acme"])
        second.session(AUTH)
        second.session(AUTH)
        self.assertEqual(second.reporter.kinds, [("acme", "auth")])
        self.assertEqual(second.tracker.state_of("acme").fetched_total, 0)

    def test_a_hash_written_before_reported_existed_counts_its_error_as_reported(self):
        self.redis.data[b"fido:account:acme"] = {
            b"state": b"error", b"last_error_kind": b"auth", b"last_error": b"old words",
            b"failing_since": b"2026-11-28T09:00:00.000Z", b"fetched_total": b"41"}
        run = Run(self.redis)
        run.gate.add(["acme"])
        status = run.tracker.state_of("acme")
        self.assertEqual((status.state, status.reported, status.fetched_total),
                         ("auth", "auth", 41))
        self.assertEqual(run.tracker.failing_ids(), {"acme"})
        run.session(OK)
        self.assertEqual(run.tracker.failing_ids(), set())
        self.assertEqual(run.reporter.kinds, [("acme", "recovered")])
        self.assertIn("2026-11-28T09:00:00", run.reporter.reports[0]["debug"])

    def test_the_tracker_writes_what_was_reported(self):
        run = Run(self.redis)
        run.gate.add(["acme"])
        run.session(AUTH)
        self.assertEqual(self.redis.data[b"fido:account:acme"][b"reported"], b"auth")
        run.session(OK)
        self.assertEqual(self.redis.data[b"fido:account:acme"][b"reported"], b"ok")


class ControlledReader:
    def __init__(self):
        self.reads = []

    def read(self, ids):
        d = defer.Deferred()
        self.reads.append((list(ids), d))
        return d


class GateTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.reporter = FakeReporter()
        self.tracker = StatusTracker(self.clock, None, self.reporter)
        self.reader = ControlledReader()
        self.gate = RestoreGate(self.clock, self.tracker, self.reader, give_up_after=300)

    def test_a_result_during_the_read_waits_for_the_hash(self):
        self.gate.add(["acme"])
        self.gate.record(ACME, AUTH)
        self.assertIsNone(self.tracker.state_of("acme"))
        self.reader.reads[0][1].callback(
            {"acme": {"state": "error", "last_error_kind": "auth", "reported": "auth"}})
        self.assertEqual(self.reporter.kinds, [])  # the same failure as before the restart
        self.assertEqual(self.gate.pending, frozenset())

    def test_redis_down_keeps_results_waiting_until_it_is_back(self):
        self.gate.add(["acme"])
        self.reader.reads[0][1].errback(errors.FidoError(errors.REDIS, "unreachable"))
        self.gate.record(ACME, OK)
        self.assertEqual(self.gate.pending, frozenset(["acme"]))
        self.gate.redis_state(True)
        self.reader.reads[1][1].callback(
            {"acme": {"state": "error", "last_error_kind": "auth", "reported": "auth"}})
        self.assertEqual(self.reporter.kinds, [("acme", "recovered")])

    def test_nothing_is_read_before_redis_is_up(self):
        gate = RestoreGate(self.clock, self.tracker, self.reader, connected=False)
        gate.add(["acme"])
        gate.record(ACME, AUTH)
        self.assertEqual(self.reader.reads, [])
        gate.redis_state(False)
        self.assertEqual(self.reader.reads, [])
        gate.redis_state(True)
        self.reader.reads[0][1].callback({"acme": {"state": "ok", "reported": "ok"}})
        self.assertEqual(self.reporter.kinds, [("acme", "auth")])

    def test_accounts_added_during_a_read_are_read_next(self):
        self.gate.add(["a"])
        self.gate.add(["b"])
        self.assertEqual(len(self.reader.reads), 1)
        self.reader.reads[0][1].callback({})
        self.assertEqual(self.reader.reads[1][0], ["b"])

    def test_after_give_up_after_the_results_count_as_new(self):
        self.gate.add(["acme"])
        self.reader.reads[0][1].errback(errors.FidoError(errors.REDIS, "unreachable"))
        self.gate.record(ACME, AUTH)
        self.clock.advance(300)
        self.assertEqual(self.reporter.kinds, [("acme", "auth")])
        self.gate.record(ACME, AUTH)
        self.assertEqual(len(self.reporter.kinds), 1)

    def test_a_known_account_is_not_read_again_and_a_removed_one_is_dropped(self):
        self.gate.record(ACME, OK)  # not waiting: straight through
        self.assertEqual(self.tracker.state_of("acme").state, "ok")
        self.gate.add(["acme", "gone"])
        self.assertEqual(self.reader.reads[0][0], ["gone"])
        self.gate.forget("gone")
        self.reader.reads[0][1].callback({"gone": {"state": "ok"}})
        self.assertIsNone(self.tracker.state_of("gone"))


class HashParsingTests(SynchronousTestCase):
    """Whatever an account hash holds (another version, a person with
    redis-cli), reading it back never raises."""

    @given(st.dictionaries(
        st.sampled_from(["state", "last_error_kind", "last_error", "failing_since",
                         "last_error_at", "last_success_at", "fetched_total", "reported", "x"]),
        st.text(max_size=40),
    ))
    @hsettings(max_examples=300, deadline=None)
    def test_any_hash_reads_back_or_is_new(self, fields):
        tracker = StatusTracker(task.Clock(), None, FakeReporter())
        status = tracker.restore("a", fields)
        if fields.get("state"):
            self.assertIsNotNone(status)
            self.assertIsInstance(status.fetched_total, int)
            tracker.record(ACME, SessionResult("a"))  # and the next result works
            self.assertEqual(tracker.state_of("a").state, "ok")
        else:
            self.assertIsNone(status)
