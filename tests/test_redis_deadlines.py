"""Every Redis command's deadline on one timer (fido_tx.redis.deadlines)."""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fido_tx.redis.deadlines import Deadlines


class DeadlinesTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.deadlines = Deadlines(self.clock, 3.0)
        self.timed_out = []

    def track(self, name):
        return self.deadlines.track(defer.Deferred(), lambda: self.timed_out.append(name))

    def test_many_commands_share_one_timer(self):
        for k in range(100):
            self.track(k)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_each_unanswered_command_is_cancelled_at_its_own_deadline(self):
        a = self.track("a")
        self.clock.advance(1.0)
        b = self.track("b")
        answered = self.track("answered")
        answered.callback("ok")
        self.clock.advance(1.99)
        self.assertNoResult(a)
        self.clock.advance(0.01)
        self.failureResultOf(a, defer.CancelledError)
        self.assertNoResult(b)
        self.assertEqual(self.timed_out, ["a"])
        self.clock.advance(0.99)
        self.assertNoResult(b)
        self.clock.advance(0.01)
        self.failureResultOf(b, defer.CancelledError)
        self.assertEqual(self.timed_out, ["a", "b"])
        self.assertEqual(self.successResultOf(answered), "ok")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.deadlines), 0)

    def test_answered_commands_leave_no_timer_behind_once_passed(self):
        for k in range(10):
            self.track(k).callback(k)
        self.clock.advance(3.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.timed_out, [])

    def test_a_chain_waiting_on_another_deferred_is_not_done(self):
        inner = defer.Deferred()
        outer = defer.succeed(None)
        outer.addCallback(lambda _: inner)  # called, but paused on inner
        self.deadlines.track(outer, lambda: self.timed_out.append("outer"))
        self.clock.advance(3.0)
        self.assertEqual(self.timed_out, ["outer"])
        self.failureResultOf(outer, defer.CancelledError)

    def test_stop_drops_the_timer(self):
        self.track("a")
        self.deadlines.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.deadlines), 0)
