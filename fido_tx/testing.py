"""Fakes of Fido's interfaces, shipped beside them (txacme's ``testing.py``,
treq's ``StubTreq``): every test, ours or a user's, uses the same
well-behaved doubles, each checked against its interface with
``verifyObject`` like the real object.
"""

from twisted.internet import defer
from zope.interface import implementer

from fido_tx.interfaces import ISink
from fido_tx.sinks.message import Delivery


@implementer(ISink)
class MemorySink:
    """An in-memory sink with switchable failure.

    ``entries`` is the list of delivered messages in order; ``fail`` set to
    an exception makes every call errback with it (an outage); ``reject`` a
    set of message ids the "application" refuses for good.
    """

    kind = "memory"

    def __init__(self):
        self.entries = []
        self._keys = set()
        self.fail = None
        self.reject = set()
        self.calls = []

    def filter_new(self, account_id, mailbox, epoch, ids):
        self.calls.append(("filter_new", account_id, tuple(ids)))
        if self.fail is not None:
            return defer.fail(self.fail)
        return defer.succeed(
            [i for i in ids if (account_id, mailbox, epoch, i) not in self._keys]
        )

    def deliver(self, messages):
        self.calls.append(("deliver", tuple(m.id for m in messages)))
        if self.fail is not None:
            return defer.fail(self.fail)
        confirmed, new, rejected = [], [], []
        for m in messages:
            if m.id in self.reject:
                rejected.append(m.id)
                continue
            key = (m.account, m.mailbox, m.epoch, m.id)
            if key not in self._keys:
                self._keys.add(key)
                self.entries.append(m)
                new.append(m.id)
            confirmed.append(m.id)
        return defer.succeed(Delivery(tuple(confirmed), tuple(new), tuple(rejected)))


class LeaseWorld:
    """The Redis side of :class:`MemoryLeases`: leases and members with
    expiry times on one clock, shared by several instances' fakes."""

    def __init__(self, clock):
        self.clock = clock
        self.leases = {}  # account id -> (instance id, expires at)
        self.members = {}  # instance id -> expires at
        self.fail = None

    def holder(self, account_id):
        entry = self.leases.get(account_id)
        if entry is None or entry[1] <= self.clock.seconds():
            return None
        return entry[0]


class MemoryLeases:
    """A fake of :class:`fido_tx.redis.lease.RedisLeases` over a :class:`LeaseWorld`."""

    def __init__(self, world, instance_id, ttl):
        self.world = world
        self.instance_id = instance_id
        self.ttl = ttl

    def _call(self, f, *args):
        if self.world.fail is not None:
            return defer.fail(self.world.fail)
        return defer.succeed(f(*args))

    def members(self):
        def go():
            now = self.world.clock.seconds()
            self.world.members[self.instance_id] = now + self.ttl
            for m, until in list(self.world.members.items()):
                if until <= now:
                    del self.world.members[m]
            return sorted(self.world.members)

        return self._call(go)

    def _held_after(self, ids, take):
        now = self.world.clock.seconds()
        held = set()
        for a in ids:
            holder = self.world.holder(a)
            if holder == self.instance_id or (take and holder is None):
                self.world.leases[a] = (self.instance_id, now + self.ttl)
                held.add(a)
        return held

    def acquire(self, account_ids):
        return self._call(self._held_after, list(account_ids), True)

    def renew(self, account_ids):
        return self._call(self._held_after, list(account_ids), False)

    def release(self, account_ids, leave=False):
        def go():
            n = 0
            for a in account_ids:
                if self.world.holder(a) == self.instance_id:
                    del self.world.leases[a]
                    n += 1
            if leave:
                self.world.members.pop(self.instance_id, None)
            return n

        return self._call(go)
