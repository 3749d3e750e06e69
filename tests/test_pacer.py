"""Session starts spread over reactor turns (fido_tx.schedule.pacer)."""

from hypothesis import given, settings, strategies as st
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
        self.assertEqual(fired, [0, 1])  # the first per_turn go through at once
        clock.turn()
        self.assertEqual(fired, [0, 1, 2, 3])
        clock.turn()
        self.assertEqual(fired, [0, 1, 2, 3, 4])
        self.assertEqual(pacer.waiting, 0)
        clock.turn()
        self.assertEqual(clock.pending, [])

    def test_sparse_starts_arm_one_timer_per_per_turn_starts(self):
        clock = TurnClock()
        pacer = StartPacer(clock, per_turn=3)
        timers = 0
        for _ in range(30):
            d = pacer.wait()
            timers += len(clock.pending)
            while clock.pending:
                clock.turn()
            self.successResultOf(d)
        self.assertEqual(timers, 9)  # starts 4, 7, ..., 28 wait a turn: not all 30

    def test_a_wait_behind_queued_ones_keeps_its_place(self):
        clock = TurnClock()
        pacer = StartPacer(clock, per_turn=1)
        fired = []
        pacer.wait().addCallback(lambda _: fired.append(0))
        pacer.wait().addCallback(lambda _: fired.append(1))
        clock.turn()
        pacer.wait().addCallback(lambda _: fired.append(2))
        self.assertEqual(fired, [0, 1])
        clock.turn()
        self.assertEqual(fired, [0, 1, 2])

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
        self.successResultOf(pacer.wait())
        first, second = pacer.wait(), pacer.wait()
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        clock.advance(0)
        self.successResultOf(second)
        self.assertEqual(pacer.waiting, 0)

    def test_a_wait_after_a_drained_queue_schedules_a_new_turn(self):
        clock = task.Clock()
        pacer = StartPacer(clock, per_turn=1)
        self.successResultOf(pacer.wait())
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


class StartPacerPropertyTests(SynchronousTestCase):
    @given(per_turn=st.integers(1, 5),
           ops=st.lists(st.sampled_from(["wait", "wait", "wait", "turn", "cancel"]),
                        max_size=60))
    @settings(max_examples=200, deadline=None)
    def test_per_turn_bound_fifo_and_no_one_left_waiting(self, per_turn, ops):
        clock = TurnClock()
        pacer = StartPacer(clock, per_turn=per_turn)
        fired, waiting, cancelled = [], [], set()
        since_turn = [0]

        def on_fire(_, k):
            fired.append(k)
            since_turn[0] += 1

        def turn():
            since_turn[0] = 0
            clock.turn()
            self.assertLessEqual(since_turn[0], per_turn)

        for n, op in enumerate(ops):
            if op == "wait":
                d = pacer.wait()
                d.addCallbacks(on_fire, lambda f: None, callbackArgs=(n,))
                waiting.append((n, d))
            elif op == "turn":
                turn()
            elif waiting:
                n_, d = waiting.pop(0)
                if not d.called:
                    cancelled.add(n_)
                d.cancel()
            # between two pacer turns, at most per_turn starts go through
            self.assertLessEqual(since_turn[0], per_turn)
        while clock.pending:
            turn()
        expected = [n for n, op in enumerate(ops) if op == "wait" and n not in cancelled]
        self.assertEqual(fired, expected)  # everyone not cancelled, in order
        self.assertEqual(pacer.waiting, 0)
