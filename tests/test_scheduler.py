"""Tests for fido_tx.schedule.scheduler: round robin over worker slots, on a fake clock."""

import random

import attr
from hypothesis import settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet import defer, task
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import errors
from fido_tx.accounts.model import Account
from fido_tx.config import BackoffSettings
from fido_tx.outcome import SessionResult
from fido_tx.accounts.model import AccountsDiff
from fido_tx.schedule.scheduler import Scheduler

NO_JITTER = BackoffSettings(
    initial=100.0, maximum=400.0, auth_initial=1000.0, auth_maximum=5000.0, jitter=0.0
)


def account(account_id, host="imap.example.test"):
    return Account(id=account_id, host=host, username=f"{account_id}@example.test",
                   password="secret")


def accounts(*ids):
    return [account(i) for i in ids]


@attr.s(auto_attribs=True, eq=False)
class Call:
    account: Account
    at: float
    deferred: defer.Deferred
    cancelled: bool = False


class FakeSessions:
    """``run_session`` whose Deferreds the test fires, checking the scheduler's promises."""

    def __init__(self, clock):
        self.clock = clock
        self.calls = []
        self.active = {}
        self.violations = []
        #: unless False, sessions end at once with this kind (a synchronous Deferred)
        self.instant = False
        #: called with each Call at start (model checks in the state machine)
        self.on_start = None

    def __call__(self, acct):
        if acct.id in self.active:
            self.violations.append(f"{acct.id} started while in a session")
        call = Call(acct, self.clock.seconds(), None)
        self.calls.append(call)
        if self.on_start is not None:
            self.on_start(call)
        if self.instant is not False:
            call.deferred = defer.succeed(SessionResult(acct.id, kind=self.instant))
            return call.deferred

        def cancel(d):
            call.cancelled = True
            self.active.pop(acct.id, None)

        call.deferred = defer.Deferred(cancel)
        self.active[acct.id] = call
        return call.deferred

    @property
    def started_ids(self):
        return [c.account.id for c in self.calls]

    def running_ids(self):
        return sorted(self.active)

    def oldest(self):
        """The id of the session that started first among the running ones."""
        return min(self.active.values(), key=self.calls.index).account.id

    def finish(self, account_id, kind=None, **fields):
        call = self.active.pop(account_id)
        call.deferred.callback(SessionResult(account_id, kind=kind, **fields))
        return call

    def fail(self, account_id, exception):
        call = self.active.pop(account_id)
        call.deferred.errback(exception)
        return call


class SchedulerTestCase(SynchronousTestCase):
    def make(self, workers=1, poll_interval=60.0, backoff=NO_JITTER, start=True, **kw):
        self.clock = task.Clock()
        self.sessions = FakeSessions(self.clock)
        self.results = []
        self.scheduler = Scheduler(self.clock, self.sessions, workers, poll_interval, backoff,
                                   random=random.Random(1), **kw)
        self.scheduler.add_result_observer(lambda a, r: self.results.append((a, r)))
        if start:
            self.scheduler.startService()
        return self.scheduler

    def finish_all(self, kind=None):
        for account_id in self.sessions.running_ids():
            self.sessions.finish(account_id, kind)

    def tearDown(self):
        if hasattr(self, "sessions"):
            self.assertEqual(self.sessions.violations, [])


class RoundRobinTests(SchedulerTestCase):
    def test_round_robin_order(self):
        self.make(workers=1)
        self.scheduler.set_accounts(accounts("a", "b", "c"))
        for _ in range(3):
            self.finish_all()
        self.assertEqual(self.sessions.started_ids, ["a", "b", "c"])
        self.clock.advance(60)
        for _ in range(3):
            self.finish_all()
        self.assertEqual(self.sessions.started_ids, ["a", "b", "c", "a", "b", "c"])

    def test_starts_over_when_the_queue_is_exhausted(self):
        self.make(workers=1, poll_interval=10.0)
        self.scheduler.set_accounts(accounts("a", "b", "c"))
        for _ in range(4):
            for _ in range(3):
                self.clock.advance(1)
                self.finish_all()
            self.clock.advance(10)
        self.assertEqual(self.sessions.started_ids, ["a", "b", "c"] * 4 + ["a"])

    def test_overloaded_round_robin_serves_everyone_in_turn(self):
        # Sessions slower than poll_interval / accounts: everyone is overdue
        # all the time, and the order stays the same round after round.
        self.make(workers=2, poll_interval=1.0)
        ids = [f"a{i}" for i in range(7)]
        self.scheduler.set_accounts(accounts(*ids))
        for _ in range(7 * 3):
            self.clock.advance(1)
            self.sessions.finish(self.sessions.oldest())
        started = self.sessions.started_ids
        self.assertEqual(sorted(started[:7]), ids)
        self.assertEqual(started[7:14], started[:7])
        self.assertEqual(started[14:21], started[:7])

    def test_workers_limit_respected(self):
        self.make(workers=3)
        self.scheduler.set_accounts(accounts(*"abcdefgh"))
        self.assertEqual(self.sessions.running_ids(), ["a", "b", "c"])
        self.assertEqual(self.scheduler.running_count, 3)
        self.assertEqual(self.scheduler.queued, 5)
        self.sessions.finish("b")
        self.assertEqual(self.sessions.running_ids(), ["a", "c", "d"])
        self.clock.advance(1000)
        self.assertEqual(len(self.sessions.active), 3)

    def test_one_reactor_turn_starts_at_most_starts_per_turn_sessions(self):
        # 10,000 held accounts (whose sessions give their slot back at
        # once) all started in one turn stalled the reactor for a second
        from fido_tx.schedule.scheduler import STARTS_PER_TURN

        n = 2 * STARTS_PER_TURN + 10
        self.make(workers=n)
        self.scheduler.set_accounts(accounts(*[f"a{i}" for i in range(n)]))
        self.assertEqual(len(self.sessions.active), STARTS_PER_TURN)
        # the rest at once after (task.Clock runs the new zero-delay calls
        # in the same advance; the reactor in its next turns)
        self.clock.advance(0)
        self.assertEqual(len(self.sessions.active), n)
        self.assertEqual(self.sessions.started_ids, [f"a{i}" for i in range(n)])

    def test_never_two_sessions_for_one_account(self):
        self.make(workers=4, poll_interval=10.0)
        self.scheduler.set_accounts(accounts("a"))
        self.clock.advance(500)  # far past its due time, still in its session
        self.assertEqual(self.sessions.started_ids, ["a"])
        self.sessions.finish("a")
        # due long ago (measured from the start): runs again at once
        self.assertEqual(self.sessions.started_ids, ["a", "a"])

    def test_poll_interval_respected_from_session_start(self):
        self.make(workers=5, poll_interval=60.0)
        self.scheduler.set_accounts(accounts("a"))
        self.clock.advance(20)
        self.sessions.finish("a")
        self.clock.advance(39.9)
        self.assertEqual(self.sessions.started_ids, ["a"])
        self.clock.advance(0.1)
        self.assertEqual(self.sessions.started_ids, ["a", "a"])
        self.assertEqual(self.sessions.calls[1].at, 60.0)

    def test_equally_due_accounts_go_in_round_robin_order(self):
        self.make(workers=3, poll_interval=30.0)
        self.scheduler.set_accounts(accounts("a", "b", "c"))
        # all started at 0, so all due at 30; they rejoin the back as c, a, b
        self.sessions.finish("c")
        self.sessions.finish("a")
        self.sessions.finish("b")
        self.scheduler.workers = 1  # (a test-only shrink, to see the order)
        self.clock.advance(30)
        self.finish_all()
        self.finish_all()
        self.finish_all()
        self.assertEqual(self.sessions.started_ids[3:], ["c", "a", "b"])

    def test_instant_sessions_run_once_per_interval(self):
        self.make(workers=2, poll_interval=10.0)
        sessions = self.sessions

        def instant(acct):
            sessions.calls.append(Call(acct, self.clock.seconds(), None))
            return defer.succeed(SessionResult(acct.id))

        self.scheduler._run_session = instant
        self.scheduler.set_accounts(accounts("a", "b", "c"))
        self.assertEqual(sessions.started_ids, ["a", "b", "c"])
        self.clock.advance(10)
        self.assertEqual(sessions.started_ids, ["a", "b", "c"] * 2)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_zero_poll_interval_with_instant_sessions_does_not_spin(self):
        self.make(workers=1, poll_interval=0.0)
        count = []

        def instant(acct):
            count.append(acct.id)
            return defer.succeed(SessionResult(acct.id))

        self.scheduler._run_session = instant
        self.scheduler.set_accounts(accounts("a", "b"))
        # set_accounts returned after a bounded number of sessions and left
        # the rest to the next reactor turn (task.Clock would spin on it)
        self.assertTrue(0 < len(count) <= 4)
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), self.clock.seconds())

    def test_nothing_starts_before_start_service(self):
        self.make(start=False)
        self.scheduler.set_accounts(accounts("a", "b"))
        self.clock.advance(100)
        self.assertEqual(self.sessions.calls, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.scheduler.startService()
        self.assertEqual(self.sessions.started_ids, ["a"])


class TimerTests(SchedulerTestCase):
    def test_one_timer_at_the_earliest_due_time(self):
        self.make(workers=3, poll_interval=60.0)
        self.scheduler.set_accounts(accounts("a", "b"))
        self.clock.advance(5)
        self.sessions.finish("a")  # due 60
        self.clock.advance(5)
        self.sessions.finish("b")  # due 60 too
        calls = self.clock.getDelayedCalls()
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0].getTime(), 60.0)

    def test_no_timer_when_nothing_waits(self):
        self.make(workers=3)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.scheduler.set_accounts(accounts("a"))
        self.assertEqual(self.clock.getDelayedCalls(), [])  # running, nothing queued

    def test_no_timer_while_saturated(self):
        self.make(workers=1)
        self.scheduler.set_accounts(accounts("a", "b"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timer_moves_earlier_when_an_earlier_account_queues(self):
        self.make(workers=2, poll_interval=60.0)
        self.scheduler.set_accounts(accounts("a"))
        self.clock.advance(10)
        self.scheduler.set_accounts(accounts("a", "b"))  # b starts at 10
        self.clock.advance(1)
        self.sessions.finish("b")  # due 70
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [70.0])
        self.sessions.finish("a")  # due 60
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [60.0])


class AccountChangeTests(SchedulerTestCase):
    def test_set_accounts_reports_the_changes(self):
        self.make(start=False)
        self.scheduler.set_accounts(accounts("a", "b", "c"))
        changes = self.scheduler.set_accounts(
            [account("d"), account("a"), account("b", host="other.test")])
        self.assertEqual(changes, AccountsDiff(
            added=(account("d"),), removed=(account("c"),),
            changed=(account("b", host="other.test"),), unchanged=(account("a"),)))
        self.assertFalse(changes.empty)
        self.assertTrue(self.scheduler.set_accounts(
            [account("d"), account("a"), account("b", host="other.test")]).empty)
        self.assertEqual(sorted(self.scheduler.accounts), ["a", "b", "d"])

    def test_duplicate_ids_are_refused(self):
        self.make()
        self.assertRaises(ValueError, self.scheduler.set_accounts, accounts("a", "a"))

    def test_added_account_starts_before_fifty_waiting_due_accounts(self):
        self.make(workers=1, poll_interval=60.0)
        waiting = [f"w{i:02}" for i in range(50)]
        self.scheduler.set_accounts(accounts(*waiting))
        for _ in range(50):
            self.finish_all()
        self.clock.advance(600)  # all 50 are overdue; w00 is running
        self.assertEqual(self.sessions.running_ids(), ["w00"])
        self.scheduler.set_accounts(accounts(*waiting, "new1", "new2"))
        self.sessions.finish("w00")
        self.assertEqual(self.sessions.running_ids(), ["new1"])
        self.sessions.finish("new1")
        self.assertEqual(self.sessions.running_ids(), ["new2"])
        self.sessions.finish("new2")
        self.assertEqual(self.sessions.running_ids(), ["w01"])

    def test_added_accounts_go_in_the_order_given(self):
        self.make(workers=1)
        self.scheduler.set_accounts(accounts("a"))
        self.scheduler.set_accounts(accounts("a", "z", "m", "b"))
        for _ in range(4):
            self.finish_all()
        self.assertEqual(self.sessions.started_ids, ["a", "z", "m", "b"])

    def test_later_addition_goes_before_earlier_additions_still_waiting(self):
        self.make(workers=1)
        self.scheduler.set_accounts(accounts("a", "b", "c"))  # a runs, b and c wait
        self.clock.advance(5)
        self.scheduler.set_accounts(accounts("a", "b", "c", "x", "y"))
        self.assertEqual(self.scheduler.lag(), 5.0)  # b and c have waited since 0
        for _ in range(5):
            self.finish_all()
        self.assertEqual(self.sessions.started_ids, ["a", "x", "y", "b", "c"])

    def test_removed_running_account_is_cancelled_and_never_started_again(self):
        self.make(workers=2)
        self.scheduler.set_accounts(accounts("a", "b"))
        call = self.sessions.calls[0]
        self.scheduler.set_accounts(accounts("b"))
        self.assertTrue(call.cancelled)
        self.assertIsNone(self.successResultOf(call.deferred))  # CancelledError handled
        self.assertEqual(self.scheduler.running_count, 1)
        self.clock.advance(1000)
        self.finish_all()
        self.clock.advance(1000)
        self.assertNotIn("a", self.sessions.started_ids[1:])
        self.assertEqual(self.results[0][1].account_id, "b")
        self.assertEqual([r.account_id for _, r in self.results], ["b"])  # no result for a
        self.assertIsNone(self.scheduler.account_state("a"))

    def test_removed_waiting_account_is_never_started(self):
        self.make(workers=1)
        self.scheduler.set_accounts(accounts("a", "b", "c"))
        self.scheduler.set_accounts(accounts("a", "c"))
        for _ in range(3):
            self.clock.advance(100)
            self.finish_all()
        self.assertNotIn("b", self.sessions.started_ids)
        self.assertEqual(self.scheduler.queued + self.scheduler.running_count, 2)

    def test_freed_slot_of_removed_account_goes_to_added_account(self):
        self.make(workers=1)
        self.scheduler.set_accounts(accounts("a", "b"))
        self.finish_all()
        self.finish_all()
        self.clock.advance(60)  # a runs, b is due and waits
        self.assertEqual(self.sessions.running_ids(), ["a"])
        self.scheduler.set_accounts(accounts("b", "c"))  # a cancelled, c added
        self.assertEqual(self.sessions.started_ids, ["a", "b", "a", "c"])

    def test_readded_account_waits_for_its_cancelled_session_to_end(self):
        self.make(workers=3)
        closing = defer.Deferred()
        plain = self.sessions

        def slow_to_cancel(acct):
            d = plain(acct)
            # the session cleans up (closes its connection) before it ends
            d.addBoth(lambda r: closing.addCallback(lambda _: r))
            return d

        self.scheduler._run_session = slow_to_cancel
        self.scheduler.set_accounts(accounts("a"))
        self.scheduler.set_accounts([])
        self.assertEqual(self.scheduler.running_count, 1)  # still closing
        self.scheduler.set_accounts(accounts("a"))
        self.assertEqual(self.sessions.started_ids, ["a"])
        self.assertEqual(self.scheduler.account_state("a").state, "blocked")
        closing.callback(None)
        self.assertEqual(self.sessions.started_ids, ["a", "a"])

    def test_changed_running_account_finishes_then_uses_the_new_value(self):
        self.make(workers=1)
        self.scheduler.set_accounts(accounts("a", "b", "c"))
        self.scheduler.set_accounts([account("a", host="new.test"), account("b"),
                                     account("c")])
        call = self.sessions.calls[0]
        self.assertFalse(call.cancelled)
        self.sessions.finish("a")
        self.assertEqual(self.results[0][0].host, "imap.example.test")  # the old value ran
        self.finish_all()
        self.finish_all()
        self.clock.advance(60)
        self.assertEqual(self.sessions.started_ids, ["a", "b", "c", "a"])
        self.assertEqual(self.sessions.calls[-1].account.host, "new.test")

    def test_changed_waiting_account_keeps_its_place(self):
        self.make(workers=1)
        self.scheduler.set_accounts(accounts("a", "b", "c"))
        self.scheduler.set_accounts([account("a"), account("b", host="new.test"),
                                     account("c")])
        for _ in range(3):
            self.finish_all()
        self.assertEqual(self.sessions.started_ids, ["a", "b", "c"])
        self.assertEqual(self.sessions.calls[1].account.host, "new.test")

    def test_changed_password_is_a_change(self):
        self.make(start=False)
        self.scheduler.set_accounts(accounts("a"))
        changes = self.scheduler.set_accounts(
            [attr.evolve(account("a"), password="other")])
        self.assertEqual(len(changes.changed), 1)

    def test_unchanged_accounts_keep_their_timers(self):
        self.make(workers=2, poll_interval=60.0)
        self.scheduler.set_accounts(accounts("a", "b"))
        self.clock.advance(10)
        self.finish_all()  # both due at 60
        self.clock.advance(20)
        self.scheduler.set_accounts(accounts("a", "b", "c"))  # c runs now
        self.sessions.finish("c")
        self.assertEqual(self.sessions.started_ids, ["a", "b", "c"])
        self.assertEqual(self.scheduler.account_state("a").next_due, 60.0)
        self.clock.advance(29.9)
        self.assertEqual(self.sessions.started_ids, ["a", "b", "c"])
        self.clock.advance(0.1)
        self.assertEqual(self.sessions.started_ids, ["a", "b", "c", "a", "b"])

    def test_changed_failing_account_drops_its_backoff(self):
        self.make(workers=1, poll_interval=10.0)
        self.scheduler.set_accounts(accounts("a"))
        self.sessions.finish("a", errors.AUTH)  # auth backoff: 600 s or so
        self.assertGreater(self.scheduler.account_state("a").next_due, 300)
        self.clock.advance(5)
        self.scheduler.set_accounts([attr.evolve(account("a"), password="fixed")])
        self.assertEqual(self.scheduler.account_state("a").failures, 0)
        self.clock.advance(4.9)
        self.assertEqual(self.sessions.started_ids, ["a"], "poll_interval still holds")
        self.clock.advance(0.1)
        self.assertEqual(self.sessions.started_ids, ["a", "a"])
        self.assertEqual(self.sessions.calls[-1].account.password, "fixed")

    def test_unchanged_accounts_keep_their_backoff(self):
        self.make(workers=1, poll_interval=10.0)
        self.scheduler.set_accounts(accounts("a"))
        self.sessions.finish("a", errors.TIMEOUT)
        self.scheduler.set_accounts(accounts("a"))
        state = self.scheduler.account_state("a")
        self.assertEqual((state.failures, state.next_due), (1, 100.0))


class BackoffTests(SchedulerTestCase):
    def test_failures_back_off_exponentially_capped_and_reset_on_success(self):
        self.make(workers=1, poll_interval=60.0)
        self.scheduler.set_accounts(accounts("a"))
        expected_gaps = [100.0, 200.0, 400.0, 400.0]
        for gap in expected_gaps:
            start = self.clock.seconds()
            self.sessions.finish("a", errors.CONNECT)
            self.assertEqual(self.scheduler.account_state("a").next_due, start + gap)
            self.clock.advance(gap - 0.5)
            self.assertEqual(self.scheduler.running_count, 0)
            self.clock.advance(0.5)
            self.assertEqual(self.scheduler.running_count, 1)
        self.assertEqual(self.scheduler.account_state("a").failures, 4)
        start = self.clock.seconds()
        self.sessions.finish("a")
        state = self.scheduler.account_state("a")
        self.assertEqual((state.failures, state.next_due), (0, start + 60.0))

    def test_backoff_counts_from_the_end_of_a_long_failed_session(self):
        self.make(workers=1, poll_interval=60.0)
        self.scheduler.set_accounts(accounts("a"))
        self.clock.advance(30)
        self.sessions.finish("a", errors.TIMEOUT)
        self.assertEqual(self.scheduler.account_state("a").next_due, 130.0)

    def test_short_backoff_never_beats_poll_interval(self):
        self.make(workers=1, poll_interval=60.0,
                  backoff=BackoffSettings(initial=5.0, maximum=10.0, jitter=0.0))
        self.scheduler.set_accounts(accounts("a"))
        self.sessions.finish("a", errors.TIMEOUT)
        self.assertEqual(self.scheduler.account_state("a").next_due, 60.0)

    def test_throttled_waits_its_retry_after_instead_bounded_by_the_maximum(self):
        self.make(workers=1, poll_interval=60.0)
        self.scheduler.set_accounts(accounts("a"))
        for retry_after, gap in ((250.0, 250.0), (10.0, 60.0), (5000.0, 400.0)):
            start = self.clock.seconds()
            self.sessions.finish("a", errors.THROTTLED, retry_after=retry_after)
            self.assertEqual(self.scheduler.account_state("a").next_due, start + gap)
            self.clock.advance(gap)
            self.assertEqual(self.scheduler.running_count, 1)
        start = self.clock.seconds()
        self.sessions.finish("a", errors.THROTTLED)  # no Retry-After: the backoff
        self.assertEqual(self.scheduler.account_state("a").next_due, start + 400.0)

    def test_auth_failures_back_off_harder(self):
        self.make(workers=1, poll_interval=60.0)
        self.scheduler.set_accounts(accounts("a"))
        self.sessions.finish("a", errors.AUTH)
        self.assertEqual(self.scheduler.account_state("a").next_due, 1000.0)
        self.clock.advance(1000)
        self.sessions.finish("a", errors.AUTH)
        self.assertEqual(self.scheduler.account_state("a").next_due, 3000.0)
        self.assertEqual(self.scheduler.account_state("a").last_kind, errors.AUTH)

    def test_redis_failure_is_not_the_accounts_failure(self):
        self.make(workers=1, poll_interval=60.0)
        self.scheduler.set_accounts(accounts("a"))
        self.sessions.finish("a", errors.REDIS)
        state = self.scheduler.account_state("a")
        self.assertEqual((state.failures, state.next_due), (0, 60.0))

    def test_jitter_is_applied(self):
        self.make(workers=1, poll_interval=1.0, backoff=BackoffSettings(
            initial=100.0, maximum=1000.0, jitter=0.2))
        self.scheduler.set_accounts(accounts("a"))
        dues = []
        for _ in range(5):
            self.sessions.finish("a", errors.TIMEOUT)
            now = self.clock.seconds()
            due = self.scheduler.account_state("a").next_due
            dues.append(due - now)
            self.scheduler.set_accounts([])  # reset the streak: remove and re-add
            self.scheduler.set_accounts(accounts("a"))
        self.assertTrue(all(80.0 <= d <= 120.0 for d in dues), dues)
        self.assertGreater(len(set(dues)), 1)

    def test_one_accounts_failures_never_delay_another(self):
        self.make(workers=1, poll_interval=60.0)
        self.scheduler.set_accounts(accounts("bad", "good"))
        for _ in range(5):
            running = self.sessions.running_ids()
            for account_id in running:
                self.sessions.finish(account_id, errors.TIMEOUT if account_id == "bad" else None)
            if self.sessions.active:
                continue
            self.clock.advance(60)
        good = [c.at for c in self.sessions.calls if c.account.id == "good"]
        self.assertEqual(good[:4], [0.0, 60.0, 120.0, 180.0])


class PauseTests(SchedulerTestCase):
    def test_pause_with_two_reasons(self):
        self.make(workers=2)
        self.scheduler.set_accounts(accounts("a"))
        self.scheduler.pause("redis")
        self.scheduler.pause("backlog")
        self.assertEqual(self.scheduler.paused_reasons, {"redis", "backlog"})
        self.scheduler.set_accounts(accounts("a", "b"))
        self.sessions.finish("a")  # a running session continues to its end
        self.clock.advance(500)
        self.assertEqual(self.sessions.started_ids, ["a"])
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no polling while paused
        self.scheduler.resume("redis")
        self.assertEqual(self.sessions.started_ids, ["a"])
        self.scheduler.resume("nonsense")
        self.scheduler.resume("backlog")
        self.assertEqual(self.scheduler.paused_reasons, frozenset())
        self.assertEqual(self.sessions.started_ids, ["a", "b", "a"])

    def test_lag_is_reported_while_paused(self):
        self.make(workers=1)
        self.scheduler.set_accounts(accounts("a"))
        self.sessions.finish("a")
        self.scheduler.pause("redis")
        self.assertEqual(self.scheduler.lag(), 0.0)
        self.clock.advance(90)
        self.assertEqual(self.scheduler.lag(), 30.0)

    def test_pause_from_a_result_observer_applies_before_the_next_session(self):
        self.make(workers=1)

        def observer(acct, result):
            if result.kind == errors.REDIS:
                self.scheduler.pause("redis")

        self.scheduler.add_result_observer(observer)
        self.scheduler.set_accounts(accounts("a", "b"))
        self.sessions.finish("a", errors.REDIS)
        self.assertEqual(self.sessions.started_ids, ["a"])


class IntrospectionTests(SchedulerTestCase):
    def test_counts_times_and_lag(self):
        self.make(workers=1)
        self.assertIsNone(self.scheduler.last_dispatch_at)
        self.scheduler.set_accounts(accounts("a", "b"))
        self.assertEqual((self.scheduler.running_count, self.scheduler.queued), (1, 1))
        self.assertEqual(self.scheduler.last_dispatch_at, 0.0)
        self.clock.advance(7)
        self.assertEqual(self.scheduler.lag(), 7.0)  # b waits since it was added
        self.sessions.finish("a")
        self.assertEqual(self.scheduler.last_completion_at, 7.0)
        self.assertEqual(self.scheduler.last_dispatch_at, 7.0)
        self.assertEqual(self.scheduler.lag(), 0.0)
        self.assertEqual(self.scheduler.account_state("b").state, "running")
        a = self.scheduler.account_state("a")
        self.assertEqual((a.state, a.next_due, a.last_started_at), ("queued", 60.0, 0.0))
        self.assertEqual(self.scheduler.running_ids(), {"b"})


class ObserverTests(SchedulerTestCase):
    def test_failing_observer_does_not_stop_scheduling(self):
        self.make(workers=1)
        self.scheduler.add_result_observer(lambda a, r: 1 / 0)
        later = []
        self.scheduler.add_result_observer(lambda a, r: later.append(r.account_id))
        self.scheduler.set_accounts(accounts("a", "b"))
        self.sessions.finish("a")
        self.assertEqual(self.sessions.started_ids, ["a", "b"])
        self.sessions.finish("b")
        self.assertEqual(later, ["a", "b"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)

    def test_observers_get_every_result(self):
        self.make(workers=2)
        self.scheduler.set_accounts(accounts("a", "b"))
        self.sessions.finish("b", errors.TLS, message="bad cert")
        self.sessions.finish("a", fetched=3)
        self.assertEqual([(a.id, r.kind, r.fetched) for a, r in self.results],
                         [("b", "tls", 0), ("a", None, 3)])


class BrokenSessionTests(SchedulerTestCase):
    def test_errbacking_session_is_a_logged_protocol_failure(self):
        self.make(workers=1)
        self.scheduler.set_accounts(accounts("a", "b"))
        self.sessions.fail("a", RuntimeError("boom"))
        [(acct, result)] = self.results
        self.assertEqual((acct.id, result.kind), ("a", errors.PROTOCOL))
        self.assertIn("RuntimeError: boom", result.message)
        self.assertIn("Traceback", result.debug)
        self.assertEqual(self.sessions.started_ids, ["a", "b"])  # slot freed
        self.assertEqual(self.scheduler.account_state("a").failures, 1)  # not lost
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.sessions.finish("b")
        self.clock.advance(60)
        self.sessions.finish("b")
        self.clock.advance(39.9)
        self.assertEqual(self.sessions.started_ids, ["a", "b", "b"])
        self.clock.advance(0.1)  # a's backoff (100 s) is over
        self.assertEqual(self.sessions.started_ids, ["a", "b", "b", "a"])

    def test_logs_never_show_the_password(self):
        self.make(workers=1)
        with capturedLogs() as events:
            self.scheduler.set_accounts(accounts("a", "b"))
            self.sessions.fail("a", RuntimeError("boom"))
            self.scheduler.add_result_observer(lambda a, r: 1 / 0)
            self.sessions.finish("b")
        self.flushLoggedErrors(RuntimeError, ZeroDivisionError)
        self.assertGreaterEqual(len(events), 2)
        for event in events:
            text = formatEvent(event)
            if "log_failure" in event:
                text += event["log_failure"].getTraceback()
            self.assertNotIn("secret", text)

    def test_run_session_raising_is_survived(self):
        self.make(workers=1)

        def broken(acct):
            raise KeyError(acct.id)

        self.scheduler._run_session = broken
        self.scheduler.set_accounts(accounts("a", "b"))
        self.assertEqual([r.kind for _, r in self.results], ["protocol", "protocol"])
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 2)
        self.assertEqual(self.scheduler.queued, 2)

    def test_non_result_is_a_protocol_failure(self):
        self.make(workers=1)
        self.scheduler._run_session = lambda acct: defer.succeed("nonsense")
        self.scheduler.set_accounts(accounts("a"))
        self.assertEqual(self.results[0][1].kind, errors.PROTOCOL)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_stray_cancellation_not_ours_is_a_failure(self):
        self.make(workers=1)
        self.scheduler.set_accounts(accounts("a"))
        self.sessions.fail("a", defer.CancelledError())
        self.assertEqual(self.results[0][1].kind, errors.PROTOCOL)
        self.assertEqual(len(self.flushLoggedErrors(defer.CancelledError)), 1)


class StopTests(SchedulerTestCase):
    def test_stop_with_nothing_running_is_immediate(self):
        self.make()
        self.assertIsNone(self.successResultOf(self.scheduler.stopService()))

    def test_stop_waits_for_running_sessions_then_cancels_after_grace(self):
        self.make(workers=2, grace_period=20.0)
        self.scheduler.set_accounts(accounts("a", "b", "c"))
        stopped = self.scheduler.stopService()
        self.assertNoResult(stopped)
        self.sessions.finish("a")
        self.assertEqual(self.sessions.started_ids, ["a", "b"])  # no new session
        self.clock.advance(19.9)
        self.assertNoResult(stopped)
        with capturedLogs() as events:
            self.clock.advance(0.1)
        self.successResultOf(stopped)
        warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("cancelling 1 sessions", warnings[0])
        self.assertIn(": b", warnings[0])
        self.assertTrue(self.sessions.calls[1].cancelled)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual([r.account_id for _, r in self.results], ["a"])
        # b is not lost: a restart serves it again
        self.scheduler.startService()
        self.assertEqual(self.sessions.started_ids, ["a", "b", "c"])

    def test_stop_fires_when_sessions_end_within_grace(self):
        self.make(workers=2)
        self.scheduler.set_accounts(accounts("a", "b"))
        stopped = self.scheduler.stopService()
        self.sessions.finish("a")
        self.assertNoResult(stopped)
        self.sessions.finish("b")
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.sessions.calls[1].cancelled)


class SchedulerMachine(RuleBasedStateMachine):
    """Random account changes, time, session endings and pauses; invariants hold."""

    IDS = [f"m{i}" for i in range(6)]

    @initialize(workers=st.integers(1, 3), poll=st.sampled_from([10.0, 60.0]),
                seed=st.integers(0, 1000))
    def setup(self, workers, poll, seed):
        self.clock = task.Clock()
        self.sessions = FakeSessions(self.clock)
        self.sessions.on_start = self.on_start
        self.poll = poll
        self.backoff = BackoffSettings(initial=5.0, maximum=40.0, auth_initial=20.0,
                                       auth_maximum=100.0, jitter=0.2)
        self.scheduler = Scheduler(self.clock, self.sessions, workers, poll, self.backoff,
                                   random=random.Random(seed))
        self.scheduler.startService()
        self.model = {}
        self.last_start = {}

    def on_start(self, call):
        acct, now = call.account, call.at
        if self.model.get(acct.id) != acct:
            self.sessions.violations.append(f"{acct.id} started with {acct!r} not in the set")
        if self.scheduler.paused:
            self.sessions.violations.append(f"{acct.id} started while paused")
        previous = self.last_start.get(acct.id)
        if previous is not None and now - previous < self.poll - 1e-6:
            self.sessions.violations.append(
                f"{acct.id} started at {now} only {now - previous}s after {previous}")
        self.last_start[acct.id] = now
        if len(self.sessions.active) >= self.scheduler.workers:
            self.sessions.violations.append("more sessions than workers")

    @rule(entries=st.lists(st.tuples(st.sampled_from(IDS), st.sampled_from(["h0", "h1"])),
                           unique_by=lambda e: e[0], max_size=6))
    def set_accounts(self, entries):
        new = {i: account(i, host=h) for i, h in entries}
        for account_id in self.model:
            if account_id not in new:
                # a re-added account is a new account: it may run at once
                self.last_start.pop(account_id, None)
        self.model = new
        changes = self.scheduler.set_accounts(list(new.values()))
        assert {a.id for a in changes.added} | {a.id for a in changes.changed} | {
            a.id for a in changes.unchanged} == set(new)

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 4.9, 5.0, 10.0, 30.0, 60.0, 150.0]))
    def advance(self, seconds):
        self.clock.advance(seconds)

    @precondition(lambda self: self.sessions.active)
    @rule(index=st.integers(0, 10),
          kind=st.sampled_from([None, None, errors.TIMEOUT, errors.AUTH, errors.REDIS]))
    def finish(self, index, kind):
        running = self.sessions.running_ids()
        self.sessions.finish(running[index % len(running)], kind)

    @precondition(lambda self: self.sessions.active)
    @rule(index=st.integers(0, 10))
    def session_bug(self, index):
        running = self.sessions.running_ids()
        self.sessions.fail(running[index % len(running)], RuntimeError("bug"))

    @rule(reason=st.sampled_from(["redis", "backlog"]))
    def pause(self, reason):
        self.scheduler.pause(reason)

    @rule(reason=st.sampled_from(["redis", "backlog"]))
    def resume(self, reason):
        self.scheduler.resume(reason)

    @rule(instant=st.sampled_from([False, False, None, errors.TIMEOUT]))
    def instant_sessions(self, instant):
        self.sessions.instant = instant

    @invariant()
    def promises_kept(self):
        if not hasattr(self, "scheduler"):
            return
        s = self.scheduler
        assert self.sessions.violations == [], self.sessions.violations
        assert s.running_count <= s.workers
        assert s.running_ids() == set(self.sessions.active)
        # removed accounts' sessions were cancelled (this fake cancels at once)
        assert set(self.sessions.active) <= set(self.model)
        assert s.accounts == self.model
        assert s.queued + len(set(self.sessions.active) & set(self.model)) == len(self.model)
        calls = self.clock.getDelayedCalls()
        assert len(calls) <= 1, calls
        if not s.paused and s.running_count < s.workers:
            # nothing is left waiting past its due time while a slot is free
            assert s.lag() == 0.0, s.lag()
            dues = [s.account_state(i).next_due for i in self.model
                    if s.account_state(i).state == "queued"]
            if dues:
                # the one timer is pending, at the earliest due time
                assert len(calls) == 1, (dues, calls)
                assert abs(calls[0].getTime() - min(dues)) < 1e-6, (calls[0].getTime(), dues)
                assert min(dues) > self.clock.seconds()
            else:
                assert calls == [], calls
        elif s.paused:
            assert calls == []

    def teardown(self):
        if not hasattr(self, "scheduler"):
            return
        # No starvation: resumed, with sessions ending, every account runs.
        self.sessions.instant = False
        for reason in ["redis", "backlog"]:
            self.scheduler.resume(reason)
        begin = len(self.sessions.calls)
        for _ in range(len(self.model) + 2):
            for account_id in self.sessions.running_ids():
                self.sessions.finish(account_id)
            self.clock.advance(150.0)
        ran = {c.account.id for c in self.sessions.calls[begin:]}
        assert ran == set(self.model), (ran, set(self.model))
        assert self.sessions.violations == [], self.sessions.violations


class SchedulerPropertyTests(SynchronousTestCase):
    def test_random_operations_keep_the_invariants(self):
        run_state_machine_as_test(
            SchedulerMachine,
            settings=settings(max_examples=100, stateful_step_count=30, deadline=None),
        )
        self.flushLoggedErrors(RuntimeError)
