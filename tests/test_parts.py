"""The small parts split out of AccountsSource and Scheduler, each alone:
the debounce timer, the last good copy, the scheduler's alarm, the slot
queue of held sessions, and a session's end as a result."""

import os

from hypothesis import given, settings as hsettings, strategies as st
from twisted.internet import defer, task
from twisted.python import failure
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import errors
from fido_tx.accounts.debounce import Debouncer
from fido_tx.accounts.lastgood import LastGoodCopy, path_signature
from fido_tx.outcome import SessionResult
from fido_tx.schedule.alarm import Alarm
from fido_tx.schedule.ending import ResultObservers, session_result
from fido_tx.schedule.slots import SlotWaiters


class DebouncerTests(SynchronousTestCase):
    def make(self, delay=0.2, max_wait=1.0):
        self.clock = task.Clock()
        self.fired = []
        return Debouncer(self.clock, lambda: self.fired.append(self.clock.seconds()),
                         delay, max_wait)

    def test_a_burst_fires_once_delay_after_its_last_event(self):
        d = self.make()
        for _ in range(3):
            d.event()
            self.clock.advance(0.1)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [0.4])
        self.assertFalse(d.waiting)

    @hsettings(max_examples=50, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=19), min_size=1, max_size=40))
    def test_an_endless_burst_still_fires_within_max_wait_of_its_first_event(self, gaps):
        """Events less than ``delay`` apart (gaps in hundredths of a second)."""
        d = self.make(delay=0.2, max_wait=1.0)
        for gap in gaps:
            if self.fired:
                break
            d.event()
            for _ in range(gap):
                self.clock.advance(0.01)
        while not self.fired and self.clock.seconds() < 5.0:
            self.clock.advance(0.01)
        self.assertTrue(self.fired)
        self.assertLessEqual(self.fired[0], 1.0 + 0.01 + 1e-9)

    def test_an_event_turns_a_waiting_retry_into_a_debounce(self):
        d = self.make()
        d.schedule(5.0)  # a retry
        self.clock.advance(1.0)
        d.event()
        self.clock.advance(0.2)
        self.assertEqual(self.fired, [1.2])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_leaves_no_timer(self):
        d = self.make()
        d.event()
        d.cancel()
        self.clock.advance(10)
        self.assertEqual((self.fired, self.clock.getDelayedCalls()), ([], []))


class LastGoodCopyTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.source = os.path.join(self.dir, "accounts.json")
        self.copy = LastGoodCopy(os.path.join(self.dir, "last-good"), self.source)

    def write(self, data):
        with open(self.source, "wb") as f:
            f.write(data)
        return path_signature(self.source)

    def test_the_loaded_version_is_saved_mode_0600(self):
        sig = self.write(b'{"accounts": []}')
        self.assertIsNone(self.copy.save(sig))
        self.assertTrue(self.copy.holds(sig))
        with open(self.copy.path, "rb") as f:
            self.assertEqual(f.read(), b'{"accounts": []}')
        self.assertEqual(os.stat(self.copy.path).st_mode & 0o777, 0o600)

    def test_a_version_newer_than_the_one_loaded_is_not_saved(self):
        sig = self.write(b"one")
        os.utime(self.source, ns=(1, 1))  # the file changed after the load
        self.assertIsNone(self.copy.save(sig))
        self.assertFalse(self.copy.holds(sig))
        self.assertFalse(self.copy.exists())

    def test_a_copy_that_cannot_be_written_is_a_one_line_warning(self):
        blocked = LastGoodCopy(os.path.join(self.dir, "missing", "last-good"), self.source)
        warning = blocked.save(self.write(b"one"))
        self.assertIn("FileNotFoundError", warning)
        self.assertNotIn("\n", warning)

    def test_no_path_keeps_nothing(self):
        none = LastGoodCopy(None, self.source)
        self.assertIsNone(none.save(self.write(b"one")))
        self.assertFalse(none.exists())


class AlarmTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.fired = []
        self.alarm = Alarm(self.clock, lambda: self.fired.append(self.clock.seconds()))

    def test_moved_not_recreated_and_off_with_none(self):
        self.alarm.at(10.0)
        [call] = self.clock.getDelayedCalls()
        self.alarm.at(4.0)
        self.assertEqual(self.clock.getDelayedCalls(), [call])
        self.assertEqual(call.getTime(), 4.0)
        self.alarm.at(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(self.alarm.due)

    def test_a_past_due_time_goes_off_at_once_and_only_once(self):
        self.clock.advance(100)
        self.alarm.at(50.0)
        self.clock.advance(0)
        self.assertEqual(self.fired, [100.0])
        self.clock.advance(100)
        self.assertEqual(self.fired, [100.0])


class _Session:
    def __init__(self, cancelled=False):
        self.cancelled = cancelled
        self.account = type("A", (), {"id": "acct"})()


class SlotWaitersTests(SynchronousTestCase):
    def test_first_come_first_served_while_slots_are_free(self):
        waiters = SlotWaiters()
        a, b, c = _Session(), _Session(), _Session()
        got = []
        for s in (a, b, c):
            waiters.wait(s).addCallback(lambda _, s=s: got.append(s))
        free = [2]

        def can_start():
            return free[0] > 0

        def take(session):
            free[0] -= 1
            return True

        waiters.grant(can_start, take)
        self.assertEqual(got, [a, b])
        self.assertEqual(len(waiters), 1)

    def test_a_cancelled_request_is_withdrawn(self):
        waiters = SlotWaiters()
        d = waiters.wait(_Session())
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(len(waiters), 0)

    def test_a_session_that_ended_meanwhile_gets_no_slot(self):
        waiters = SlotWaiters()
        d = waiters.wait(_Session())
        waiters.grant(lambda: True, lambda session: False)
        self.assertNoResult(d)
        self.assertEqual(len(waiters), 0)


class SessionResultTests(SynchronousTestCase):
    def test_a_result_is_itself(self):
        r = SessionResult(account_id="acct")
        self.assertIs(session_result(r, _Session()), r)

    def test_a_cancelled_session_has_no_result(self):
        f = failure.Failure(defer.CancelledError())
        self.assertIsNone(session_result(f, _Session(cancelled=True)))

    def test_an_errback_or_a_wrong_type_is_a_protocol_failure_logged_as_a_bug(self):
        f = failure.Failure(ZeroDivisionError("boom"))
        r = session_result(f, _Session())
        self.assertEqual((r.account_id, r.kind), ("acct", errors.PROTOCOL))
        self.assertEqual(r.message, "internal error: ZeroDivisionError: boom")
        r = session_result(42, _Session())
        self.assertEqual(r.message, "internal error: TypeError: run_session returned int, "
                                    "not SessionResult")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError, TypeError)), 2)

    def test_a_cancellation_the_scheduler_did_not_ask_for_is_a_failure(self):
        r = session_result(failure.Failure(defer.CancelledError()), _Session())
        self.assertEqual(r.kind, errors.PROTOCOL)
        self.flushLoggedErrors(defer.CancelledError)

    def test_an_observer_that_raises_does_not_stop_the_others(self):
        observers, seen = ResultObservers(), []
        observers.add(lambda account, result: 1 / 0)
        observers.add(lambda account, result: seen.append(result))
        observers.notify(_Session().account, "r")
        self.assertEqual(seen, ["r"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
