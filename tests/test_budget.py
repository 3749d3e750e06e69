"""The shared in-flight byte budget (fido_tx.schedule.budget)."""

from hypothesis import given, settings, strategies as st
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from fido_tx.schedule.budget import ByteBudget


class ByteBudgetTests(SynchronousTestCase):
    def test_grants_at_once_while_under_the_limit(self):
        b = ByteBudget(100)
        g1 = self.successResultOf(b.acquire(60))
        g2 = self.successResultOf(b.acquire(40))
        self.assertEqual((g1.nbytes, g2.nbytes, b.in_use), (60, 40, 100))

    def test_waits_until_enough_is_released(self):
        b = ByteBudget(100)
        g1 = self.successResultOf(b.acquire(70))
        d = b.acquire(50)
        self.assertNoResult(d)
        self.assertEqual(b.waiting, 1)
        g1.release()
        self.assertEqual(self.successResultOf(d).nbytes, 50)
        self.assertEqual(b.in_use, 50)

    def test_first_come_first_served_no_overtaking(self):
        b = ByteBudget(100)
        g1 = self.successResultOf(b.acquire(90))
        big = b.acquire(80)
        small = b.acquire(5)  # would fit now, but must not overtake `big`
        self.assertNoResult(big)
        self.assertNoResult(small)
        g1.release()
        self.successResultOf(big)
        self.successResultOf(small)
        self.assertEqual(b.in_use, 85)

    def test_request_larger_than_the_budget_runs_alone(self):
        b = ByteBudget(100)
        g1 = self.successResultOf(b.acquire(10))
        huge = b.acquire(500)
        self.assertNoResult(huge)
        g1.release()
        g = self.successResultOf(huge)
        self.assertEqual(b.in_use, 500)
        after = b.acquire(1)
        self.assertNoResult(after)
        g.release()
        self.successResultOf(after)

    def test_release_twice_counts_once(self):
        b = ByteBudget(100)
        g = self.successResultOf(b.acquire(30))
        g.release()
        g.release()
        self.assertEqual(b.in_use, 0)

    def test_cancelled_request_is_withdrawn_and_unblocks_the_queue(self):
        b = ByteBudget(100)
        g1 = self.successResultOf(b.acquire(50))
        big = b.acquire(80)
        small = b.acquire(20)
        self.assertNoResult(small)
        big.cancel()
        self.failureResultOf(big, defer.CancelledError)
        self.assertEqual(self.successResultOf(small).nbytes, 20)
        self.assertEqual(b.in_use, 70)
        g1.release()
        self.assertEqual(b.in_use, 20)

    def test_zero_byte_request_is_granted(self):
        b = ByteBudget(1)
        self.successResultOf(b.acquire(1))
        self.successResultOf(b.acquire(0))

    def test_limit_must_be_positive(self):
        self.assertRaises(ValueError, ByteBudget, 0)

    @settings(max_examples=60, deadline=None)
    @given(limit=st.integers(1, 50),
           ops=st.lists(st.tuples(st.booleans(), st.integers(0, 80)), max_size=40))
    def test_never_over_the_limit_unless_alone_and_everyone_is_served(self, limit, ops):
        b = ByteBudget(limit)
        granted, pending = [], []
        for is_acquire, n in ops:
            if is_acquire or not granted:
                d = b.acquire(n)
                pending.append(d)
                d.addCallback(granted.append)
            else:
                granted.pop(0).release()
            over = b.in_use > limit
            # "alone" in bytes: a grant of 0 bytes holds nothing in flight
            holding = [g for g in granted if g.nbytes]
            self.assertTrue(not over or len(holding) == 1, (b.in_use, limit, granted))
            self.assertLessEqual(b.in_use, max(limit, b.peak))
        while granted:  # releasing everything serves every waiter
            granted.pop(0).release()
        self.assertTrue(all(d.called for d in pending))
        self.assertEqual(b.in_use, 0)
        self.assertEqual(b.waiting, 0)
