"""The scheduler's room for other sessions: ``skipped`` outcomes and held
(long-lived) sessions that release their worker slot.  On a task.Clock."""

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import errors
from fido_tx.accounts.model import Account
from fido_tx.config import BackoffSettings
from fido_tx.outcome import SessionResult
from fido_tx.schedule.scheduler import Scheduler

NO_JITTER = BackoffSettings(initial=100.0, maximum=400.0, auth_initial=1000.0,
                            auth_maximum=5000.0, jitter=0.0)


def account(account_id):
    return Account(id=account_id, host="imap.example.test", username="u", password="secret")


class Sessions:
    """``run_session(account, handle)`` whose Deferreds the test fires."""

    def __init__(self):
        self.started = []  # (account id, handle, deferred)

    def __call__(self, account, handle=None):
        d = defer.Deferred()
        self.started.append((account.id, handle, d))
        return d

    def ids(self):
        return [s[0] for s in self.started]


def scheduler(clock, sessions, workers=1, handles=True):
    s = Scheduler(clock, sessions, workers=workers, poll_interval=60, backoff=NO_JITTER,
                  handles=handles)
    s.startService()
    return s


class SkippedTests(SynchronousTestCase):
    def test_skipped_is_neither_reported_nor_backed_off(self):
        clock, sessions = task.Clock(), Sessions()
        sched = scheduler(clock, sessions)
        seen = []
        sched.add_result_observer(lambda a, r: seen.append(r))
        sched.set_accounts([account("a")])
        # a failure first: one failure counted
        sessions.started[0][2].callback(SessionResult("a", kind=errors.CONNECT))
        self.assertEqual(sched.account_state("a").failures, 1)
        clock.advance(100)
        self.assertEqual(sessions.ids(), ["a", "a"])
        sessions.started[1][2].callback(SessionResult("a", skipped=True))
        state = sched.account_state("a")
        self.assertEqual(state.failures, 1)  # not reset, not increased
        self.assertEqual(len(seen), 1)  # the skipped one was not reported
        self.assertEqual(state.next_due, 160.0)  # poll_interval after its start: no backoff


class HeldTests(SynchronousTestCase):
    def test_a_held_session_frees_its_slot(self):
        clock, sessions = task.Clock(), Sessions()
        sched = scheduler(clock, sessions, workers=1)
        sched.set_accounts([account("a"), account("b")])
        self.assertEqual(sessions.ids(), ["a"])
        self.assertEqual(sched.running_count, 1)
        handle = sessions.started[0][1]
        handle.release_slot()
        self.assertTrue(handle.held)
        # b starts in a's slot at once; a still runs, counted as held
        self.assertEqual(sessions.ids(), ["a", "b"])
        self.assertEqual((sched.running_count, sched.held_count), (1, 1))
        self.assertEqual(sched.account_state("a").state, "held")
        self.assertEqual(sched.account_state("b").state, "running")
        handle.release_slot()  # twice is once
        self.assertEqual(sched.held_count, 1)

    def test_a_held_account_gets_no_second_session_and_is_requeued_when_it_ends(self):
        clock, sessions = task.Clock(), Sessions()
        sched = scheduler(clock, sessions, workers=2)
        sched.set_accounts([account("a")])
        sessions.started[0][1].release_slot()
        clock.advance(3600)  # due many times over: still one session
        self.assertEqual(sessions.ids(), ["a"])
        sessions.started[0][2].callback(SessionResult("a"))
        self.assertEqual(sched.held_count, 0)
        self.assertEqual(sched.running_count, 1)  # due long ago: started again
        self.assertEqual(sessions.ids(), ["a", "a"])

    def test_stop_cancels_held_sessions_after_the_grace_period(self):
        clock, sessions = task.Clock(), Sessions()
        sched = scheduler(clock, sessions, workers=1)
        sched.set_accounts([account("a")])
        sessions.started[0][1].release_slot()
        stopped = sched.stopService()
        self.assertNoResult(stopped)
        clock.advance(sched.grace_period)
        self.successResultOf(stopped)
        self.assertTrue(sessions.started[0][2].called)  # cancelled
        self.assertEqual(sched.held_count, 0)

    def test_without_handles_run_session_gets_the_account_only(self):
        clock = task.Clock()
        calls = []
        sched = Scheduler(clock, lambda account: calls.append(account) or defer.Deferred(),
                          workers=1, poll_interval=60, backoff=NO_JITTER)
        sched.startService()
        sched.set_accounts([account("a")])
        self.assertEqual([a.id for a in calls], ["a"])


class SlotAgainTests(SynchronousTestCase):
    """A held session takes a worker slot again for each fetch."""

    def test_take_slot_waits_for_a_free_slot_and_goes_before_new_accounts(self):
        clock, sessions = task.Clock(), Sessions()
        sched = scheduler(clock, sessions, workers=1)
        sched.set_accounts([account("a"), account("b"), account("c")])
        ha = sessions.started[0][1]
        ha.release_slot()
        self.assertEqual(sessions.ids(), ["a", "b"])  # b took a's slot
        got = []
        ha.take_slot().addCallback(got.append)
        self.assertEqual(got, [])  # b holds the only slot
        sessions.started[1][2].callback(SessionResult("b"))
        self.assertEqual(len(got), 1)  # a goes before c
        self.assertEqual(sessions.ids(), ["a", "b"])
        self.assertEqual((sched.running_count, sched.held_count), (1, 0))
        got[0]()  # release: c starts
        self.assertEqual(sessions.ids(), ["a", "b", "c"])
        self.assertEqual((sched.running_count, sched.held_count), (1, 1))

    def test_take_slot_waits_while_paused(self):
        clock, sessions = task.Clock(), Sessions()
        sched = scheduler(clock, sessions, workers=2)
        sched.set_accounts([account("a")])
        ha = sessions.started[0][1]
        ha.release_slot()
        sched.pause("backlog")
        got = []
        d = ha.take_slot().addCallback(got.append)
        self.assertEqual(got, [])
        sched.resume("backlog")
        self.assertEqual(len(got), 1)
        self.assertEqual(sched.running_count, 1)

    def test_withdrawn_request_and_take_without_release(self):
        clock, sessions = task.Clock(), Sessions()
        sched = scheduler(clock, sessions, workers=1)
        sched.set_accounts([account("a"), account("b")])
        ha = sessions.started[0][1]
        got = []
        ha.take_slot().addCallback(got.append)  # never released: its own slot
        self.assertEqual(len(got), 1)
        ha.release_slot()
        d = ha.take_slot()
        d.cancel()
        self.failureResultOf(d)
        sessions.started[1][2].callback(SessionResult("b"))
        self.assertEqual(sched.running_count, 0)  # the withdrawn one took nothing

    def test_report_reaches_the_observers_and_the_session_goes_on(self):
        clock, sessions = task.Clock(), Sessions()
        sched = scheduler(clock, sessions, workers=1)
        seen = []
        sched.add_result_observer(lambda a, r: seen.append((a.id, r.fetched)))
        sched.set_accounts([account("a")])
        ha = sessions.started[0][1]
        ha.report(SessionResult("a", fetched=3))
        ha.report(SessionResult("a", skipped=True))
        self.assertEqual(seen, [("a", 3)])
        self.assertEqual(sched.account_state("a").state, "running")
        self.assertEqual(sched.last_completion_at, clock.seconds())
