"""The shared in-flight byte budget (fido_tx.schedule.budget)."""

from hypothesis import given, settings, strategies as st
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from fido_tx.schedule.budget import ByteBudget
from fido_tx.sources.imap.client import FidoIMAP4Client


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


# -- admission by the bytes that arrive ----------------------------------------


class Producer:
    """What a grant pauses: the protocol's budget_pause/budget_resume."""

    def __init__(self):
        self.meter = None
        self.paused = False
        self.pauses = 0

    def budget_pause(self):
        assert not self.paused
        self.paused = True
        self.pauses += 1

    def budget_resume(self):
        assert self.paused
        self.paused = False


def small_budget(limit=100):
    # share = max(100 // 4, min(100, 10 + 10)) = 25; a first grant 20
    return ByteBudget(limit, read_ahead=10, step=10)


def attached(budget, claimed, ceiling):
    grant = SynchronousTestCase().successResultOf(budget.open(claimed))
    producer = Producer()
    grant.attach(producer, ceiling)
    return grant, producer


class ArrivalTests(SynchronousTestCase):
    def test_a_batch_reserves_a_little_up_front_whatever_its_bodies_claim(self):
        b = small_budget()
        g = self.successResultOf(b.open(50 * 1024 * 1024))
        self.assertEqual((g.nbytes, b.in_use), (20, 20))
        self.assertEqual(self.successResultOf(b.open(5)).nbytes, 5)

    def test_the_reservation_grows_with_the_bytes_that_arrive(self):
        b = small_budget()
        g, p = attached(b, 1000, 1000)
        g.charge(5)
        self.assertEqual(g.nbytes, 20)  # still a read ahead of what arrived
        g.charge(10)
        self.assertEqual((g.used, g.nbytes), (15, 35))  # 15 + read ahead + step
        self.assertFalse(p.paused)

    def test_a_session_that_reached_its_share_is_paused_while_others_go_on(self):
        b = small_budget()
        elder, _ = attached(b, 1000, 1000)
        liar, lp = attached(b, 10 ** 9, 10 ** 9)  # claims a lot, trickles
        for _ in range(4):
            liar.charge(5)
        self.assertTrue(lp.paused)
        self.assertLessEqual(liar.nbytes, b.share)
        self.assertLessEqual(liar.used, liar.nbytes)
        # the rest of the budget still serves a healthy batch at once
        healthy, hp = attached(b, 25, 25)
        for n in (10, 10, 5):
            healthy.charge(n)
        self.assertFalse(hp.paused)
        self.assertEqual(healthy.used, 25)

    def test_a_full_budget_pauses_the_connection_until_bytes_are_released(self):
        b = ByteBudget(60, share=40, read_ahead=10, step=10)
        a, _ = attached(b, 20, 20)
        c, _ = attached(b, 20, 20)
        d, dp = attached(b, 100, 100)
        self.assertEqual(b.in_use, 60)
        d.charge(15)  # read-ahead low, no room: paused
        self.assertTrue(dp.paused)
        self.assertEqual(b.waiting, 1)
        c.release()
        self.assertFalse(dp.paused)
        self.assertLessEqual(b.in_use - b.overdrawn, 60)
        self.assertGreaterEqual(d.nbytes, d.used + b.read_ahead)

    def test_the_elder_is_never_paused_its_excess_is_overdraft(self):
        b = small_budget()
        big, bp = attached(b, 500, 500)  # a message larger than the share
        others = [attached(b, 20, 20) for _ in range(4)]
        for _ in range(50):
            big.charge(10)
        self.assertEqual(bp.pauses, 0)
        self.assertEqual(big.used, 500)
        self.assertLessEqual(b.in_use - b.overdrawn, b.limit)
        self.assertGreater(b.overdrawn, 0)
        self.assertEqual(b.overdrawn, big.over)  # only the elder overdraws
        big.release()
        for g, _ in others:
            g.release()
        self.assertEqual((b.in_use, b.overdrawn), (0, 0))

    def test_sessions_paused_on_partial_literals_do_not_deadlock(self):
        b = small_budget(60)  # share 20
        grants = [attached(b, 20, 200) for _ in range(3)]
        for g, _ in grants[1:]:
            g.charge(15)
        self.assertTrue(all(p.paused for _, p in grants[1:]))
        # every non-elder is paused holding part of a literal; the elder goes on
        elder, ep = grants[0]
        for _ in range(20):
            elder.charge(10)
        self.assertFalse(ep.paused)
        elder.settle()
        elder.release()
        # the next oldest is the elder now: it reads again
        second, sp = grants[1]
        self.assertFalse(sp.paused)
        while second.used < 200:
            second.charge(min(10, 200 - second.used))
            self.assertFalse(sp.paused)
        second.release()
        third, tp = grants[2]
        self.assertFalse(tp.paused)
        third.release()
        self.assertEqual((b.in_use, b.overdrawn, b.waiting, b.holders), (0, 0, 0, 0))

    def test_settle_gives_back_the_unused_reservation_and_keeps_the_bodies(self):
        b = small_budget()
        g, p = attached(b, 1000, 1000)
        g.charge(12)
        g.settle()
        self.assertEqual((g.nbytes, b.in_use), (12, 12))
        self.assertIsNone(p.meter)
        g.charge(100)  # no longer metered (a later command's literal): ignored
        self.assertEqual(b.in_use, 12)
        g.release()
        self.assertEqual(b.in_use, 0)

    def test_a_fetch_ending_while_paused_resumes_the_connection(self):
        b = small_budget(60)
        attached(b, 20, 20)
        attached(b, 20, 20)
        g, p = attached(b, 100, 100)
        g.charge(15)
        self.assertTrue(p.paused)
        g.settle()  # the read that paused it also held the tagged OK
        self.assertFalse(p.paused)
        self.assertEqual(b.waiting, 0)

    def test_a_release_while_paused_leaks_nothing(self):
        b = small_budget(60)
        keep = [attached(b, 20, 20) for _ in range(2)]
        g, p = attached(b, 100, 100)
        g.charge(15)
        self.assertTrue(p.paused)
        g.release()  # the session was cancelled (session_timeout)
        self.assertFalse(p.paused)
        g.release()
        for k, _ in keep:
            k.release()
        self.assertEqual((b.in_use, b.overdrawn, b.waiting, b.holders), (0, 0, 0, 0))

    def test_a_read_larger_than_the_read_ahead_is_counted_all_the_same(self):
        b = small_budget()
        attached(b, 20, 20)
        g, p = attached(b, 100, 100)
        g.charge(50)  # a reactor that reads more than read_ahead at once
        self.assertEqual((g.nbytes, b.forced, b.in_use), (50, 30, 70))
        self.assertTrue(p.paused)  # over its share: it waits to be the elder


class Batch:
    """One simulated session's batch: ``total`` literal bytes to arrive."""

    def __init__(self, budget, total):
        self.total = total
        self.producer = Producer()
        self.grant = None
        self.done = False
        self.d = budget.open(total)
        self.d.addCallback(self._admitted)

    def _admitted(self, grant):
        self.grant = grant
        grant.attach(self.producer, self.total)
        return grant

    @property
    def readable(self):
        return self.grant is not None and not self.done and not self.producer.paused \
            and self.grant.used < self.total

    def read(self, chunks):
        """One transport read, in chunks, all charged even if it pauses."""
        room = self.total - self.grant.used
        for c in chunks:
            c = min(c, room)
            room -= c
            if c:
                self.grant.charge(c)

    def finish(self):
        if self.grant is not None and self.grant.used == self.total:
            self.grant.settle()
        self.stop()

    def stop(self):
        self.done = True
        if self.grant is None:
            self.d.addErrback(lambda f: f.trap(defer.CancelledError))
            self.d.cancel()
        else:
            self.grant.release()


def check_invariants(b, batches):
    open_ = [x for x in batches if x.grant is not None and not x.done]
    assert b.in_use == sum(x.grant.nbytes for x in open_)
    assert b.overdrawn == sum(x.grant.over for x in open_)
    assert b.in_use - b.overdrawn <= b.limit, (b.in_use, b.overdrawn, b.limit)
    elder = open_[0] if open_ else None  # admitted in order: the first open is the elder
    for x in open_:
        g = x.grant
        assert g.used <= g.nbytes, (g.used, g.nbytes)  # reads fit the read-ahead
        assert g.paused == x.producer.paused
        if x is not elder:
            assert g.over == 0
            assert g.nbytes <= b.share
        else:
            assert not g.paused or g.used == x.total  # the elder is never paused
    assert b.forced == 0


class SchedulingProperties(SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(limit=st.integers(20, 200), read_ahead=st.integers(1, 10), step=st.integers(1, 10),
           ops=st.lists(st.tuples(st.sampled_from(["open", "read", "read", "read", "finish",
                                                   "stop"]),
                                  st.integers(0, 400),
                                  st.lists(st.integers(1, 10), max_size=4)),
                        max_size=60))
    def test_never_over_the_limit_always_progress_no_leaked_byte(self, limit, read_ahead,
                                                                   step, ops):
        b = ByteBudget(limit, read_ahead=read_ahead, step=step)
        batches = []
        for op, n, chunks in ops:
            live = [x for x in batches if not x.done]
            if op == "open" or not live:
                batches.append(Batch(b, n))
            elif op == "read":
                readable = [x for x in live if x.readable]
                if readable:
                    x = readable[n % len(readable)]
                    x.read(one_read(chunks, read_ahead))
            elif op == "finish":
                done = [x for x in live if x.grant is not None and x.grant.used == x.total]
                if done:
                    done[n % len(done)].finish()
            else:
                live[n % len(live)].stop()
            check_invariants(b, sorted(batches, key=lambda x: _order(b, x)))
        # progress: every batch completes, one read at a time, whatever is paused
        for _ in range(100_000):
            live = [x for x in batches if not x.done]
            if not live:
                break
            readable = [x for x in live if x.readable]
            complete = [x for x in live if x.grant is not None and x.grant.used == x.total]
            if complete:
                complete[0].finish()
            elif readable:
                readable[-1].read([read_ahead])
            else:
                raise AssertionError(f"deadlock: {[(x.grant and (x.grant.used, x.grant.nbytes, x.grant.paused), x.total) for x in live]}")
            check_invariants(b, sorted(batches, key=lambda x: _order(b, x)))
        self.assertEqual((b.in_use, b.overdrawn, b.waiting, b.holders), (0, 0, 0, 0))


def one_read(chunks, most):
    """Chunks of one transport read: at most ``most`` bytes together."""
    out = []
    for c in chunks:
        c = min(c, most - sum(out))
        if c <= 0:
            break
        out.append(c)
    return out


def _order(budget, batch):
    """Admission order (the elder first); batches not admitted last."""
    serial = budget._holders.get(batch.grant) if batch.grant is not None else None
    return (serial is None, serial or 0)


class PausedConnectionTests(SynchronousTestCase):
    """The real client paused by the budget mid-literal (StringTransport, Clock)."""

    def setUp(self):
        self.clock = task.Clock()
        self.proto = FidoIMAP4Client(self.clock, greeting_timeout=10, command_timeout=5,
                                     min_literal_rate=1000)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.proto.dataReceived(b"* OK hello\r\n")
        self.budget = ByteBudget(10_000, share=4000, read_ahead=1000, step=1000)
        self.elder = self.successResultOf(self.budget.acquire(8000))  # fills the budget
        self.grant = self.successResultOf(self.budget.open(50_000))
        self.grant.attach(self.proto, 60_000)
        self.bodies = []
        self.done = self.proto.command(
            b"UID", b"FETCH 1 (UID BODY.PEEK[])",
            untagged=lambda segments: self.bodies.append(segments[1]),
            **FidoIMAP4Client.body_limits({1: 50_000}, 10 ** 6))
        self.proto.dataReceived(b"* 1 FETCH (UID 1 BODY[] {50000}\r\n")

    def feed(self, n, pieces=1):
        for _ in range(pieces):
            self.proto.dataReceived(b"x" * n)

    def test_a_full_budget_pauses_reading_and_the_server_is_not_blamed_for_the_wait(self):
        self.feed(1000, 2)
        self.assertTrue(self.proto.budget_paused)
        self.assertEqual(self.transport.producerState, "paused")
        self.clock.advance(120)  # command_timeout 5 s, rate checks every 5 s
        self.assertFalse(self.transport.disconnecting)
        self.assertIsNone(self.proto.error)
        self.elder.release()
        self.assertEqual(self.transport.producerState, "producing")
        self.assertFalse(self.proto.budget_paused)

    def test_after_the_pause_the_deadline_and_the_rate_apply_again(self):
        self.feed(1000, 2)
        self.elder.release()
        self.clock.advance(4.9)
        self.assertIsNone(self.proto.error)
        self.clock.advance(0.2)  # 5 s of the server's own silence
        self.assertTrue(self.transport.disconnecting)
        self.assertIn("UID FETCH", self.proto.error.message)

    def test_the_whole_literal_arrives_once_bytes_are_released(self):
        self.feed(1000, 2)
        self.elder.release()
        self.feed(1000, 48)  # the grant is the elder now: never paused again
        self.proto.dataReceived(b")\r\n0001 OK done\r\n")
        self.successResultOf(self.done)
        self.assertEqual([len(b) for b in self.bodies], [50_000])
        self.assertEqual(self.grant.used, 50_000)
        self.assertLessEqual(self.grant.used, self.grant.nbytes)
        self.grant.settle()
        self.grant.release()
        self.assertEqual(self.budget.in_use, 0)

    def test_a_literal_announced_in_the_read_that_paused_is_not_rate_checked_meanwhile(self):
        # this read ends the first body and announces the next one (a FETCH of
        # two messages): the new literal's rate check must wait for the resume
        self.feed(1000, 1)
        self.proto.dataReceived(b"x" * 49_000 + b")\r\n* 2 FETCH (UID 2 BODY[] {50000}\r\n")
        self.assertTrue(self.proto.budget_paused)
        self.clock.advance(120)
        self.assertIsNone(self.proto.error)
        self.assertFalse(self.transport.disconnecting)
