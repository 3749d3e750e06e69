"""Session starts spread over reactor turns (fido_tx.schedule.pacer)."""

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from fido_tx.schedule.pacer import StartPacer


class TurnClock:
    """A reactor's timed calls by turn: :meth:`turn` runs the calls pending
    at its start (calls scheduled meanwhile wait for the next turn, as in
    ``runUntilCurrent``).  ``task.Clock.advance(0)`` would run them all."""

    def __init__(self):
        self.pending = []

    def callLater(self, delay, f, *args):
        assert delay == 0
        self.pending.append((f, args))
        return object()  # stands for the IDelayedCall

    def turn(self):
        calls, self.pending = self.pending, []
        for f, args in calls:
            f(*args)


class StartPacerTests(SynchronousTestCase):
    def test_at_most_per_turn_fire_per_turn_in_order(self):
        clock = TurnClock()
        pacer = StartPacer(clock, per_turn=2)
        fired = []
        for k in range(5):
            pacer.wait().addCallback(lambda _, k=k: fired.append(k))
        self.assertEqual(fired, [])  # never in the caller's own turn
        clock.turn()
        self.assertEqual(fired, [0, 1])
        clock.turn()
        self.assertEqual(fired, [0, 1, 2, 3])
        clock.turn()
        self.assertEqual(fired, [0, 1, 2, 3, 4])
        self.assertEqual(pacer.waiting, 0)
        self.assertEqual(clock.pending, [])

    def test_task_clock_advance_serves_everyone(self):
        clock = task.Clock()
        pacer = StartPacer(clock, per_turn=2)
        ds = [pacer.wait() for _ in range(5)]
        clock.advance(0)
        for d in ds:
            self.successResultOf(d)

    def test_cancelled_wait_is_withdrawn(self):
        clock = task.Clock()
        pacer = StartPacer(clock, per_turn=1)
        first, second = pacer.wait(), pacer.wait()
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        clock.advance(0)
        self.successResultOf(second)
        self.assertEqual(pacer.waiting, 0)

    def test_a_wait_after_a_drained_queue_schedules_a_new_turn(self):
        clock = task.Clock()
        pacer = StartPacer(clock, per_turn=3)
        d1 = pacer.wait()
        clock.advance(0)
        self.successResultOf(d1)
        self.assertEqual(clock.getDelayedCalls(), [])
        d2 = pacer.wait()
        self.assertNoResult(d2)
        clock.advance(0)
        self.successResultOf(d2)

    def test_per_turn_must_be_positive(self):
        self.assertRaises(ValueError, StartPacer, task.Clock(), 0)
