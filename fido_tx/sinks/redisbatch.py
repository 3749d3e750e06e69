"""What the Redis sinks (stream, list) share: the dedupe sets and the one
Lua call per batch.

Exactly once: a sink's :meth:`RedisBatchSink.deliver` sends ONE script call
per batch.  For each message the script checks the dedupe set
``fido:uids:{<account>}:<epoch>:<mailbox>``, writes the message (``XADD`` or
``LPUSH``), then ``SADD``\\ s its id and notes its identity
(:mod:`fido_tx.sinks.identity`: a message whose identity is recorded already
is recorded under its new key but not written again), and after the loop
writes the batch's identities (one ``HSET`` and one ``LPUSH`` per mailbox);
Redis runs a script
atomically and, with ``appendonly``, persists its writes as one unit, so a
crash leaves every message either delivered and recorded, or neither.  The order (check, write,
record) means an error inside the script can at worst leave a message without
its record (a possible duplicate later), never a record without its message
(a lost one).  The script also counts the new messages into the account
hash's ``fetched_total`` and returns the queue's length, kept in
``last_length`` for backpressure without another round trip.

Replicas (``[redis] min_replicas = N``): Redis replicates asynchronously, so
a write acknowledged by a master that dies before a replica has it is lost
at a failover.  With N > 0 nothing is confirmed (so nothing is marked on the
mail server) until N replicas have it: after the script, on the same
connection, ``INCR fido:replication:probe`` then ``WAIT N timeout``.  The
probe is a write that is always replicated, and replication is one ordered
stream, so a replica that has the probe has every earlier write, this
connection's and any earlier connection's.  ``filter_new`` does the same
before it answers that some ids are delivered already (those are marked
without a new delivery, so they must be safe too).  Fewer than N answers in
time is a ``redis`` error: nothing is marked, fetching pauses, and the next
poll finds the batch delivered and waits again.
"""

from twisted.internet import defer

from fido_tx import errors
from fido_tx.redis import keys, text
from fido_tx.sinks import identity
from fido_tx.sinks.message import Delivery

#: the script's frame: KEYS = target, account hash, then per (mailbox, epoch)
#: its dedupe set and per mailbox its identity hash and list; ARGV per
#: message = set index, id, identity-hash index, ``epoch:id``, identity, then
#: the sink's values (from ``ARGV[i + 5]``).  %(write)s writes one message;
#: %(length)s is the queue length command.  A message whose identity is
#: known (stored before under another key) is recorded, not written.
_SCRIPT = identity.LUA + """
local target = KEYS[1]
local new = 0
local reply = {0}
for i = 1, #ARGV, %(stride)d do
  local set = KEYS[tonumber(ARGV[i])]
  local id = ARGV[i + 1]
  local ik = tonumber(ARGV[i + 2])
  if redis.call('SISMEMBER', set, id) == 0 then
    if not fido_known(KEYS[ik], ARGV[i + 4]) then
      %(write)s
      new = new + 1
      reply[new + 1] = id
    end
    redis.call('SADD', set, id)
    fido_note(KEYS[ik], KEYS[ik + 1], ARGV[i + 3], ARGV[i + 4])
  end
end
fido_flush()
if new > 0 then
  redis.call('HINCRBY', KEYS[2], 'fetched_total', new)
end
reply[1] = redis.call('%(length)s', target)
return reply
"""

#: ARGV values per message before the sink's own
FRAME = 5


def batch_script(stride, write, length):
    """The script of a sink with ``stride - FRAME`` values per message."""
    return (_SCRIPT % {"stride": stride, "write": write, "length": length}).encode("utf-8")


def filter_new(connection, account_id, mailbox, epoch, ids, min_replicas=0,
               replica_timeout=5.0, unrecorded=None):
    """Deferred: the ids of ``ids`` not in the dedupe set, in the order given
    (the items themselves).  With ``min_replicas``, an answer that some are
    delivered already waits for the replicas first (see the module
    docstring).  Every sink with a dedupe record in Redis uses this.
    ``unrecorded`` (an :class:`~fido_tx.sinks.identity.Unrecorded`): also
    ask, in the same write, whether the mailbox has identities recorded."""
    ids = list(ids)
    if not ids:
        return defer.succeed([])
    dedupe = keys.dedupe(account_id, mailbox, epoch)
    if not min_replicas and unrecorded is None:
        d = connection.execute(b"SMISMEMBER", dedupe, *ids)
        return d.addCallback(lambda flags: [i for i, f in zip(ids, flags) if not int(f)])

    def send(proto):
        d = proto.execute_command(b"SMISMEMBER", dedupe, *ids)
        if unrecorded is not None:
            d = _with_identities(proto, d, account_id, mailbox, unrecorded)
        if not min_replicas:
            return d.addCallback(lambda flags: [i for i, f in zip(ids, flags) if not int(f)])

        def flags(flags):
            new = [i for i, f in zip(ids, flags) if not int(f)]
            if len(new) == len(ids):
                return new
            return wait_for_replicas(proto, min_replicas, replica_timeout).addCallback(
                lambda _: new)

        return d.addCallback(flags)

    return connection.run("dedupe check", send)


def _with_identities(proto, d, account_id, mailbox, unrecorded):
    """``d`` (the dedupe check) once an ``EXISTS`` and an ``HGET e`` of the
    identity hash, written right behind it (one write, the replies read
    together), told ``unrecorded`` whether anything is recorded, and the
    epoch recorded last."""
    ikey = keys.identities(account_id, mailbox)[0]
    exists = proto.execute_command(b"EXISTS", ikey)
    epoch = proto.execute_command(b"HGET", ikey, b"e")
    both = defer.gatherResults([d, exists, epoch], consumeErrors=True)

    def seen(replies):
        flags, n, e = replies
        unrecorded.found(account_id, mailbox, bool(int(n)), identity.text_of(e))
        return flags

    return both.addCallbacks(seen, lambda f: f.value.subFailure)


def wait_for_replicas(proto, min_replicas, replica_timeout):
    """``INCR`` the probe and ``WAIT`` for the replicas on ``proto`` (see the
    module docstring); errback with a ``redis`` FidoError when too few answer."""
    d = proto.execute_command(b"INCR", keys.REPLICATION_PROBE)
    d.addCallback(lambda _: proto.execute_command(
        b"WAIT", min_replicas, int(replica_timeout * 1000)))

    def counted(n):
        if int(n) < min_replicas:
            raise errors.FidoError(
                errors.REDIS,
                f"only {int(n)} of {min_replicas} Redis replicas confirmed the "
                f"writes within {replica_timeout:g} s ([redis] min_replicas): "
                "nothing is marked until they catch up; check the replicas",
            )
        return n

    return d.addCallback(counted)


class RedisBatchSink:
    """Base of the Redis sinks: subclasses set ``kind``, ``STRIDE``,
    ``SOURCE`` (from :func:`batch_script`), ``LENGTH`` and ``encode(message)
    -> [values]`` (``STRIDE - FRAME`` of them).

    :ivar last_length: the queue's length after the last delivery or
        :meth:`backlog`, or None.
    """

    kind = None

    def __init__(self, name, connection, target, dry_run=False, min_replicas=0,
                 replica_timeout=5.0):
        self.name = name
        self.min_replicas = min_replicas
        self.replica_timeout = replica_timeout
        self.target = target.encode("utf-8") if isinstance(target, str) else target
        self.dry_run = dry_run
        self.last_length = None
        self._connection = connection
        self._script = connection.script(self.SOURCE)
        self._recognise = connection.script(identity.RECOGNISE_LUA)
        self._unrecorded = identity.Unrecorded()

    def filter_new(self, account_id, mailbox, epoch, ids):
        """The ids of ``ids`` not delivered yet, in the order given (the
        items themselves, so a caller's ints come back as ints)."""
        return filter_new(self._connection, account_id, mailbox, epoch, ids,
                          self.min_replicas, self.replica_timeout, self._unrecorded)

    def identities(self, account_id, mailbox, epoch, ids):
        """The identity recorded with each of ``ids`` ("" where none)."""
        return identity.stored(self._connection, account_id, mailbox, epoch, ids)

    def may_recognise(self, account_id, mailbox, epoch):
        """False when the last ``filter_new`` found no identity recorded,
        or ``epoch`` recorded as checked already."""
        return not self._unrecorded.checked(account_id, mailbox, epoch)

    def recognise(self, account_id, mailbox, epoch, identities):
        """Record and return the ids whose identity was stored before."""
        return identity.recognise(self._recognise, account_id, mailbox, epoch, identities,
                                  then=self._then_wait(bool), unrecorded=self._unrecorded)

    def _then_wait(self, needed):
        """A ``then`` that WAITs for the replicas when ``needed(reply)``."""
        if not self.min_replicas:
            return None

        def then(proto, reply):
            if not needed(reply):
                return defer.succeed(reply)
            return self._wait(proto).addCallback(lambda _: reply)

        return then

    def _wait(self, proto):
        return wait_for_replicas(proto, self.min_replicas, self.replica_timeout)

    def deliver(self, messages):
        """Write the messages not delivered yet; fire with a Delivery.

        In a dry run nothing is written and nothing confirmed.
        """
        messages = list(messages)
        if not messages or self.dry_run:
            return defer.succeed(Delivery())
        account = messages[0].account
        if any(m.account != account for m in messages):
            return defer.fail(ValueError("deliver() takes the messages of one account"))
        script_keys = [self.target, keys.account(account)]
        index, args = {}, []
        for m in messages:
            set_key = keys.dedupe(m.account, m.mailbox, m.epoch)
            if set_key not in index:
                script_keys.append(set_key)
                index[set_key] = len(script_keys)
            ident_keys = keys.identities(m.account, m.mailbox)
            if ident_keys[0] not in index:
                script_keys.extend(ident_keys)
                index[ident_keys[0]] = len(script_keys) - 1
            args += [index[set_key], m.id, index[ident_keys[0]], identity.location(m),
                     m.identity]
            args.extend(self.encode(m))
        d = self._script.run(script_keys, args, what=f"delivery of {len(messages)} messages",
                             then=self._then_wait(lambda reply: True))

        def delivered(reply):
            self.last_length = int(reply[0])
            return Delivery(
                confirmed=tuple(m.id for m in messages),
                new=tuple(text(i) for i in reply[1:]),
            )

        return d.addCallback(delivered)

    def backlog(self):
        """The queue's length now."""

        def got(n):
            self.last_length = int(n)
            return self.last_length

        return self._connection.execute(self.LENGTH.encode("ascii"), self.target).addCallback(got)
