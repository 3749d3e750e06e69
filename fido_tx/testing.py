"""Fakes of Fido's interfaces, shipped beside them (txacme's ``testing.py``,
treq's ``StubTreq``): every test, ours or a user's, uses the same
well-behaved doubles, each checked against its interface with
``verifyObject`` like the real object.
"""

from twisted.internet import defer
from zope.interface import implementer

from fido_tx.interfaces import (
    IAccountState,
    IBacklog,
    IHeartbeatWriter,
    IMailboxPositions,
    IRedisHealth,
    IReporterView,
    ISchedulerView,
    ISink,
    IStatusSummary,
)
from fido_tx.sinks.message import Delivery


@implementer(ISink)
class MemorySink:
    """An in-memory sink with switchable failure.

    ``entries`` is the list of delivered messages in order; ``fail`` set to
    an exception makes every call errback with it (an outage); ``reject`` a
    set of message ids the "application" refuses for good.  Identities are
    kept per (account, mailbox) as the Redis sinks keep them (unbounded):
    ``recognised`` lists the messages confirmed by identity, not delivered.
    """

    kind = "memory"

    def __init__(self):
        self.entries = []
        self._keys = set()
        self.fail = None
        self.reject = set()
        self.calls = []
        self.recognised = []
        self._identity_at = {}  # (account, mailbox, epoch, id) -> identity
        self._identities = set()  # (account, mailbox, identity)
        self._epoch_of = {}  # (account, mailbox) -> epoch of the last identity

    def filter_new(self, account_id, mailbox, epoch, ids):
        self.calls.append(("filter_new", account_id, tuple(ids)))
        if self.fail is not None:
            return defer.fail(self.fail)
        return defer.succeed(
            [i for i in ids if (account_id, mailbox, epoch, i) not in self._keys]
        )

    def identities(self, account_id, mailbox, epoch, ids):
        self.calls.append(("identities", account_id, tuple(ids)))
        if self.fail is not None:
            return defer.fail(self.fail)
        return defer.succeed(
            [self._identity_at.get((account_id, mailbox, epoch, i), "") for i in ids])

    def may_recognise(self, account_id, mailbox, epoch):
        """False when no identity is recorded for the mailbox, or the last
        one was recorded in ``epoch`` (as the Redis sinks learn it with
        ``filter_new``)."""
        return self._epoch_of.get((account_id, mailbox), epoch) != epoch

    def recognise(self, account_id, mailbox, epoch, identities):
        self.calls.append(("recognise", account_id, tuple(identities)))
        if self.fail is not None:
            return defer.fail(self.fail)
        found = []
        for i, ident in identities.items():
            key = (account_id, mailbox, epoch, i)
            if ident and (account_id, mailbox, ident) in self._identities \
                    and key not in self._keys:
                self._keys.add(key)
                self._identity_at[key] = ident
                self._epoch_of[(account_id, mailbox)] = epoch
                found.append(i)
        return defer.succeed(found)

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
                content = (m.account, m.mailbox, m.identity)
                if m.identity and content in self._identities:
                    self.recognised.append(m)
                else:
                    self.entries.append(m)
                    new.append(m.id)
                if m.identity:
                    self._identity_at[key] = m.identity
                    self._identities.add(content)
                    self._epoch_of[(m.account, m.mailbox)] = m.epoch
            confirmed.append(m.id)
        return defer.succeed(Delivery(tuple(confirmed), tuple(new), tuple(rejected)))


# -- the Redis side -------------------------------------------------------------


@implementer(IRedisHealth, IAccountState, IHeartbeatWriter)
class FakeRedis:
    """The Redis side without Redis: the connection's health, the account
    hash and the heartbeat, recorded.

    ``sessions`` are the results given to :meth:`record_session`;
    ``updates`` ``(account_id, fields)`` of every hash write (a session's
    ``extra`` included); ``beats`` ``(instance_id, mapping, ttl)``.
    :meth:`set_connected` changes ``connected`` and tells the observers.
    """

    def __init__(self, connected=True):
        self.connected = connected
        self.last_error = None
        self.sessions = []
        self.updates = []
        self.beats = []
        self._observers = []

    def add_connection_observer(self, observer):
        self._observers.append(observer)

    def set_connected(self, up, error=None):
        self.connected = up
        self.last_error = None if up else (error or "connection refused")
        for observer in list(self._observers):
            observer(up)

    def update_account(self, account_id, fields):
        self.updates.append((account_id, dict(fields)))
        return defer.succeed(self.connected)

    def record_session(self, result, started_at_iso=None, extra=None, account=None):
        self.sessions.append(result)
        if extra:  # written with the session's fields, in one HSET
            self.updates.append((result.account_id, dict(extra)))
        return defer.succeed(self.connected)

    def heartbeat(self, instance_id, mapping, ttl):
        self.beats.append((instance_id, dict(mapping), ttl))
        return defer.succeed(self.connected)


@implementer(IBacklog)
class FakeBacklog:
    """A delivery queue: ``length`` is what :meth:`backlog` answers (``fail``
    True makes it errback), ``last_length`` what the last delivery saw."""

    def __init__(self, length=0):
        self.last_length = None
        self.length = length
        self.fail = False
        self.reads = 0

    def backlog(self):
        self.reads += 1
        if self.fail:
            return defer.fail(RuntimeError("redis down"))
        return defer.succeed(self.length)


@implementer(IMailboxPositions)
class MemoryPositions:
    """Mailbox positions in a dict ``{(account, mailbox): (epoch, uid)}``
    (``records``); ``fail`` True makes every call errback a ``redis``
    FidoError; ``writes`` lists each :meth:`advance` call."""

    def __init__(self):
        self.records = {}
        self.writes = []
        self.fail = False

    def _down(self):
        from fido_tx import errors

        return defer.fail(errors.FidoError(errors.REDIS, "Redis is not connected"))

    def get(self, account_id, mailbox):
        if self.fail:
            return self._down()
        return defer.succeed(self.records.get((account_id, mailbox)))

    def advance(self, account_id, mailbox, epoch, uid):
        if self.fail:
            return self._down()
        self.writes.append((account_id, mailbox, str(epoch), int(uid)))
        current = self.records.get((account_id, mailbox))
        if current is not None and current[0] == str(epoch) and current[1] >= int(uid):
            return defer.succeed(0)
        self.records[(account_id, mailbox)] = (str(epoch), int(uid))
        return defer.succeed(1)


# -- the scheduler and the status side --------------------------------------------


class _FakeAccountState:
    def __init__(self, next_due):
        self.next_due = next_due


@implementer(ISchedulerView)
class FakeScheduler:
    """What the status side reads of the scheduler, settable.

    ``due`` maps account ids to their ``next_due``; ``lag_seconds`` is what
    :meth:`lag` answers; :meth:`pause`/:meth:`resume` edit ``reasons``.
    """

    def __init__(self, running_count=0, accounts=None, lag=0.0):
        self.running_count = running_count
        self.accounts = dict(accounts or {})
        self.last_completion_at = None
        self.lag_seconds = lag
        self.reasons = set()
        self.due = {}

    @property
    def paused_reasons(self):
        return frozenset(self.reasons)

    @property
    def paused(self):
        return bool(self.reasons)

    def lag(self):
        return self.lag_seconds

    def account_state(self, account_id):
        if account_id not in self.due and account_id not in self.accounts:
            return None
        return _FakeAccountState(self.due.get(account_id))

    def pause(self, reason):
        self.reasons.add(reason)

    def resume(self, reason):
        self.reasons.discard(reason)


@implementer(IReporterView)
class FakeReporter:
    """Records reports; ``kinds`` lists ``(account, kind)`` in order."""

    def __init__(self, queue_length=0, dropped=0):
        self.reports = []
        self.queue_length = queue_length
        self.dropped = dropped

    def report(self, account_id, kind, message, debug="", occurred_at=None, secrets=()):
        self.reports.append(
            dict(account=account_id, kind=kind, message=message, debug=debug,
                 occurred_at=occurred_at, secrets=tuple(secrets))
        )

    @property
    def kinds(self):
        return [(r["account"], r["kind"]) for r in self.reports]


@implementer(IStatusSummary)
class FakeStatus:
    """A status tracker's ``summary()``: ``counts`` as given."""

    def __init__(self, counts=None):
        self.counts = dict(counts or {})

    def summary(self):
        return dict(self.counts)
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
