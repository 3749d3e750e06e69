"""Shared poll ticks (fido_tx.schedule.ticker): held accounts' checks due on
one grid, one timer per occupied tick, never late, removal cancels.

Synchronous: task.Clock; the held accounts are test_held's harness (a
FidoIMAP4Client on a scripted StringTransport server) sharing one pool.
"""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import error, task
from twisted.trial.unittest import SynchronousTestCase

from fido_tx.schedule.ticker import PollTicker
from fido_tx.sources.imap import held
from tests.test_held import ConfigTests, Harness


class PollTickerTests(SynchronousTestCase):
    def test_calls_due_in_one_quantum_share_one_timer_and_one_turn(self):
        clock = task.Clock()
        ticker = PollTicker(clock, 1.0)
        fired = []
        clock.advance(0.3)
        ticker.callLater(2.7, fired.append, "a")  # 3.0: on the tick
        clock.advance(0.4)
        ticker.callLater(2.9, fired.append, "b")  # 3.6: rounded down to 3.0
        self.assertEqual((ticker.occupied, ticker.pending, len(clock.getDelayedCalls())),
                         (1, 2, 1))
        clock.advance(2.29)  # 2.99
        self.assertEqual(fired, [])
        clock.advance(0.01)
        self.assertEqual(fired, ["a", "b"])
        self.assertEqual((ticker.occupied, clock.getDelayedCalls()), (0, []))

    def test_a_call_is_never_late_and_at_most_one_quantum_early(self):
        clock = task.Clock()
        ticker = PollTicker(clock, 5.0)
        times = []
        for delay in (0.0, 4.9, 5.0, 7.5, 9.99, 60.0):
            ticker.callLater(delay, lambda d=delay: times.append((d, clock.seconds())))
        clock.pump([0.0] + [1.0] * 60)
        self.assertEqual(times, [(0.0, 0.0), (4.9, 0.0), (5.0, 5.0), (7.5, 5.0),
                                 (9.99, 5.0), (60.0, 60.0)])

    def test_a_wait_within_the_current_quantum_is_exact_not_a_loop(self):
        clock = task.Clock()
        ticker = PollTicker(clock, 1.0)
        clock.advance(10.5)
        fired = []
        ticker.callLater(0.2, fired.append, 1)  # 10.7 -> tick 10, gone: 10.7 exactly
        ticker.callLater(0, fired.append, 0)  # now: the next turn
        clock.advance(0)
        self.assertEqual(fired, [0])
        clock.advance(0.19)
        self.assertEqual(fired, [0])
        clock.advance(0.01)
        self.assertEqual(fired, [0, 1])

    def test_cancelling_the_last_call_of_a_tick_cancels_its_timer(self):
        clock = task.Clock()
        ticker = PollTicker(clock, 1.0)
        fired = []
        a = ticker.callLater(3, fired.append, "a")
        b = ticker.callLater(3.5, fired.append, "b")
        a.cancel()
        self.assertFalse(a.active())
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        b.cancel()
        self.assertEqual((clock.getDelayedCalls(), ticker.occupied), ([], 0))
        self.assertRaises(error.AlreadyCancelled, b.cancel)
        clock.advance(10)
        self.assertEqual(fired, [])

    def test_a_failing_call_does_not_stop_the_others_of_its_tick(self):
        clock = task.Clock()
        ticker = PollTicker(clock, 1.0)
        fired = []
        ticker.callLater(1, lambda: 1 / 0)
        c = ticker.callLater(1, fired.append, "b")
        clock.advance(1)
        self.assertEqual(fired, ["b"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertRaises(error.AlreadyCalled, c.cancel)

    def test_quantum_zero_is_the_clocks_own_timer(self):
        clock = task.Clock()
        ticker = PollTicker(clock, 0)
        fired = []
        ticker.callLater(2.5, fired.append, 1)
        clock.advance(2.4)
        self.assertEqual(fired, [])
        clock.advance(0.1)
        self.assertEqual(fired, [1])
        self.assertEqual(ticker.until(7.3), 7.3 - 2.5)


class PollTickConfigTests(SynchronousTestCase):
    load = ConfigTests.load

    def test_poll_tick_default_value_and_bounds(self):
        from fido_tx.config import ConfigError

        self.assertEqual(self.load("").imap.poll_tick, 1.0)
        self.assertEqual(self.load("[imap]\npoll_tick = 5\n").imap.poll_tick, 5)
        self.assertEqual(self.load("[imap]\npoll_tick = 0\n").imap.poll_tick, 0)
        for bad in ("-1", "61"):
            e = self.assertRaises(ConfigError, self.load, f"[imap]\npoll_tick = {bad}\n")
            self.assertIn("[imap] poll_tick", str(e))


def run_until(clock, end):
    """Advance ``clock`` from one timer to the next (exact times) up to ``end``."""
    for _ in range(100_000):
        calls = [c.getTime() for c in clock.getDelayedCalls()]
        nxt = min(calls) if calls else end + 1
        if nxt > end:
            clock.rightNow = max(clock.rightNow, end)
            return
        clock.rightNow = max(clock.rightNow, nxt)  # exactly (no float sum)
        clock.advance(0)
    raise AssertionError(f"timers still firing at {clock.seconds()}: a busy loop "
                         f"({sorted(c.getTime() for c in clock.getDelayedCalls())[:5]})")


class HeldOnTicksTests(SynchronousTestCase):
    def accounts(self, clock, ticker, n, starts, interval, idle):
        pool = held.HeldPool(ticker=ticker)
        hs = []
        for k in range(n):
            h = Harness(self, clock=clock, pool=pool, account_id=f"a{k}", idle_caps=idle,
                        poll_interval=interval, idle_refresh=600.0)
            clock.callLater(starts[k], h.machine.start)
            hs.append(h)
        return pool, hs

    @settings(max_examples=40, deadline=None)
    @given(quantum=st.sampled_from([0.5, 1.0, 2.0, 5.0]),
           ticks=st.integers(1, 40),
           starts=st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=6),
           idle=st.booleans(), stop_one=st.booleans())
    def test_every_account_checked_within_poll_interval_on_the_grid(
            self, quantum, ticks, starts, idle, stop_one):
        clock = task.Clock()
        ticker = PollTicker(clock, quantum)
        interval = quantum * ticks
        pool, hs = self.accounts(clock, ticker, len(starts), starts, interval, idle)
        end = max(starts) + 4 * interval + 1
        stopped = None
        if stop_one:
            stopped = hs[0]
            clock.callLater(starts[0] + 1.5 * interval, stopped.machine.stop)
        run_until(clock, end)
        for h in hs:
            times = [t for t, _ in h.polls]
            until = stopped_at = None
            if h is stopped:
                stopped_at = starts[0] + 1.5 * interval
                self.assertEqual(h.machine.state, held.CLOSED)
                self.assertTrue(all(t <= stopped_at for t in times))
                until = stopped_at
            else:
                until = end
            self.assertAlmostEqual(times[0], starts[hs.index(h)])  # the catch-up poll
            for before, after in zip(times, times[1:]):
                self.assertLessEqual(after - before, interval + 1e-9)  # never late
                # on a tick, and never twice in one
                self.assertAlmostEqual(after / quantum, round(after / quantum), places=6)
                self.assertGreater(ticker.tick_of(after), ticker.tick_of(before))
            self.assertLess(until - times[-1], interval + 1e-9)
        if stopped is not None:
            # its waiting check went with it; the others' still wait on ticks
            self.assertEqual(ticker.pending, len(hs) - 1)

    def test_accounts_due_in_one_quantum_are_checked_in_one_turn(self):
        clock = task.Clock()
        ticker = PollTicker(clock, 1.0)
        pool, hs = self.accounts(clock, ticker, 3, [0.1, 0.4, 0.9], 10.0, idle=False)
        run_until(clock, 1.0)
        self.assertEqual(ticker.occupied, 1)  # all three due on tick 10
        run_until(clock, 10.0)
        self.assertEqual([h.polls[-1][0] for h in hs], [10.0, 10.0, 10.0])
        for h in hs:
            h.machine.stop()
        run_until(clock, 11.0)
        self.assertEqual((ticker.pending, ticker.occupied), (0, 0))

    def test_idle_refresh_and_check_wait_on_the_tick(self):
        clock = task.Clock()
        ticker = PollTicker(clock, 1.0)
        pool, hs = self.accounts(clock, ticker, 2, [0.2, 0.7], 60.0, idle=True)
        run_until(clock, 61.0)
        self.assertEqual([[t for t, _ in h.polls] for h in hs], [[0.2, 60.0], [0.7, 60.0]])
        self.assertEqual(hs[0].server.commands(), [b"IDLE", b"DONE", b"NOOP", b"IDLE"])

    def test_a_grid_coarser_than_poll_interval_is_not_used(self):
        clock = task.Clock()
        ticker = PollTicker(clock, 5.0)
        pool, hs = self.accounts(clock, ticker, 1, [0.3], 2.0, idle=False)
        run_until(clock, 6.4)
        self.assertEqual([t for t, _ in hs[0].polls], [0.3, 2.3, 4.3, 6.3])
        self.assertEqual(ticker.pending, 0)
