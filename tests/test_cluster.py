"""Leases balanced over instances (fido_tx.schedule.cluster), on a fake clock."""

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fido_tx.errors import FidoError
from fido_tx.schedule.cluster import LeaseBalancer, owner
from fido_tx.testing import LeaseWorld, MemoryLeases

TTL = 30.0
ACCOUNTS = [f"acct-{i}" for i in range(300)]

ids = st.text("abcdefghij0123456789:-", min_size=1, max_size=12)


class OwnerTests(SynchronousTestCase):
    @given(st.lists(ids, min_size=1, max_size=8, unique=True), st.lists(ids, max_size=50))
    @settings(max_examples=200, deadline=None)
    def test_the_owner_is_alive_and_a_leaver_moves_only_its_own(self, members, accounts):
        before = {a: owner(a, members) for a in accounts}
        for a, o in before.items():
            self.assertIn(o, members)
        gone = members[0]
        after = {a: owner(a, members[1:]) for a in accounts}
        for a in accounts:
            if before[a] != gone:
                self.assertEqual(after[a], before[a])

    def test_a_joiner_takes_only_what_it_gains_and_about_its_share(self):
        three = ["host-a:1", "host-b:2", "host-c:3"]
        four = three + ["host-d:4"]
        moved = [a for a in ACCOUNTS if owner(a, three) != owner(a, four)]
        self.assertTrue(all(owner(a, four) == "host-d:4" for a in moved))
        self.assertTrue(50 <= len(moved) <= 100, len(moved))  # about 300 / 4

    def test_no_members_no_owner(self):
        self.assertIsNone(owner("a", []))


class Cluster:
    def __init__(self, n):
        self.clock = Clock()
        self.world = LeaseWorld(self.clock)
        self.busy = set()
        self.lost = []
        self.instances = {}
        for i in range(n):
            self.add(f"host-{i}:{100 + i}")

    def add(self, name):
        b = LeaseBalancer(self.clock, MemoryLeases(self.world, name, TTL), TTL,
                          is_busy=lambda a, name=name: (name, a) in self.busy,
                          on_lost=lambda a, name=name: self.lost.append((name, a)))
        b.set_accounts(ACCOUNTS)
        b.startService()
        self.instances[name] = b
        return b

    def kill(self, name):
        """SIGKILL: no more ticks, nothing released."""
        b = self.instances.pop(name)
        if b._timer is not None:
            b._timer.cancel()
        b.running = False

    def run(self, seconds, step=1.0):
        for _ in range(int(seconds / step)):
            self.clock.advance(step)
            self.check_exclusive()

    def check_exclusive(self):
        owners = {}
        for name, b in self.instances.items():
            for a in b.held:
                assert a not in owners, f"{a} held by {owners[a]} and {name}"
                assert self.world.holder(a) == name
                owners[a] = name
        return owners

    def counts(self):
        return sorted(len(b.held) for b in self.instances.values())


class BalancerTests(SynchronousTestCase):
    def test_three_instances_share_the_accounts_without_overlap(self):
        c = Cluster(3)
        c.run(2 * TTL)
        owners = c.check_exclusive()
        self.assertEqual(len(owners), 300)
        self.assertTrue(all(70 <= n <= 130 for n in c.counts()), c.counts())

    def test_a_steady_cluster_does_not_thrash(self):
        c = Cluster(3)
        c.run(2 * TTL)
        before = c.check_exclusive()
        c.run(5 * TTL)
        self.assertEqual(c.check_exclusive(), before)
        self.assertEqual(c.lost, [])

    def test_a_killed_instance_s_accounts_are_taken_over_within_ttl_and_a_tick(self):
        c = Cluster(3)
        c.run(2 * TTL)
        victim = "host-1:101"
        orphans = set(c.instances[victim].held)
        c.kill(victim)
        c.run(TTL + TTL / 3 + 1)
        owners = c.check_exclusive()
        self.assertEqual(set(owners), set(ACCOUNTS))
        self.assertTrue(all(owners[a] != victim for a in orphans))

    def test_a_joining_instance_gets_its_share(self):
        c = Cluster(3)
        c.run(2 * TTL)
        c.add("host-9:109")
        c.run(2 * TTL)
        self.assertEqual(len(c.check_exclusive()), 300)
        self.assertTrue(all(50 <= n <= 110 for n in c.counts()), c.counts())

    def test_a_busy_account_is_released_only_after_its_session(self):
        c = Cluster(1)
        c.run(TTL)
        first = c.instances["host-0:100"]
        moving = [a for a in ACCOUNTS if owner(a, ["host-0:100", "host-9:109"]) == "host-9:109"]
        c.busy.add(("host-0:100", moving[0]))
        joiner = c.add("host-9:109")
        c.run(TTL)
        self.assertTrue(first.holds(moving[0]))
        self.assertFalse(joiner.holds(moving[0]))
        c.busy.clear()
        c.run(TTL)
        self.assertFalse(first.holds(moving[0]))
        self.assertTrue(joiner.holds(moving[0]))

    def test_a_lease_taken_by_another_is_reported_lost(self):
        c = Cluster(1)
        c.run(TTL)
        b = c.instances["host-0:100"]
        victim = sorted(b.held)[0]
        c.world.leases[victim] = ("intruder", c.clock.seconds() + 1000)
        c.clock.advance(b.interval + 0.1)
        self.assertIn(("host-0:100", victim), c.lost)
        self.assertFalse(b.holds(victim))

    def test_redis_unreachable_longer_than_the_ttl_gives_every_lease_up(self):
        c = Cluster(1)
        c.run(TTL)
        b = c.instances["host-0:100"]
        held = len(b.held)
        c.world.fail = FidoError("redis", "down")
        c.clock.advance(TTL / 2)
        self.assertEqual(len(b.held), held)  # a short outage changes nothing
        c.clock.advance(TTL)
        self.assertEqual(len(b.held), 0)
        self.assertEqual(len(c.lost), held)

    def test_stopping_releases_everything_and_leaves(self):
        c = Cluster(2)
        c.run(TTL)
        b = c.instances.pop("host-0:100")
        self.successResultOf(b.stopService())
        self.assertNotIn("host-0:100", c.world.members)
        self.assertFalse(any(h == "host-0:100" for h, _ in c.world.leases.values()))
        c.run(TTL)
        self.assertEqual(len(c.check_exclusive()), 300)
