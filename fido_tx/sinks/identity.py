"""What each stored message was, kept beside the dedupe record: the Lua the
Redis sinks share to recognise a message by its content.

A :class:`~fido_tx.sinks.message.Message` may carry an ``identity`` (the IMAP
source sets one: :mod:`fido_tx.sources.imap.identity`; Graph's immutable ids
need none).  Every sink that deduplicates records it in the same Lua step as
the dedupe record, in the hash ``fido:ident:{<account>}:<mailbox>``:

``u:<epoch>:<id>`` -> identity
    what was stored under that key: before marking a UID found already
    stored, the IMAP session compares it with what the server holds there
    now (a server that reused the UID holds another message).
``i:<identity>`` -> ``<epoch>:<id>``
    where it was stored last: a message whose key is new but whose identity
    is here (the mailbox's UIDVALIDITY changed, or the server renumbered it)
    is recorded under its new key and confirmed, not written again.

``e`` -> epoch
    the epoch of the last identity recorded: identities were checked in
    that epoch already (a delivery in it follows a poll's check, or the
    check itself recorded it), so the first poll after a restart in the
    same epoch skips the check, as a poll in an epoch this process polled
    before does (:class:`Unrecorded`, ``may_recognise``).

Bounded: the list ``fido:identq:{<account>}:<mailbox>`` holds the keys in
the order stored; beyond :data:`KEEP` per mailbox the oldest leaves both
(its ``i:`` field only when it still points there).  A message older than
that is recognised by its key only, as before identities existed.
A key without an identity recorded (stored before this existed, or
evicted) counts as "the same message": an upgrade delivers nothing again.
"""

from twisted.internet import defer

from fido_tx.redis import keys

#: messages per (account, mailbox) whose identity is kept, the most recent:
#: about 215 bytes of Redis memory each (bench/identity_memory.py), so at
#: most ~2.1 MiB per mailbox; the dedupe set costs ~48 bytes per message
KEEP = 10_000

#: Lua functions for a sink's script.  ``fido_known(ikey, identity)``: was a
#: message of that identity stored from this mailbox?  ``fido_remember(ikey,
#: qkey, loc, identity)``: record it as stored at ``loc`` (``epoch:id``).
#: ``fido_note`` records the same but holds the writes until ``fido_flush()``,
#: which writes what a script call noted with one ``HSET`` and one ``LPUSH``
#: per mailbox (a batch of 25 messages: 2 commands instead of 50; one per
#: 1,000 messages in larger batches: Lua's ``unpack`` is bounded;
#: ``fido_known`` sees what is noted).  An empty identity (a Graph message)
#: does nothing.
LUA = """
local fido_noted = {}
local function fido_known(ikey, identity)
  if identity == '' then return false end
  local p = fido_noted[ikey]
  if p and p.known[identity] then return true end
  return redis.call('HEXISTS', ikey, 'i:' .. identity) == 1
end
local function fido_evict(ikey, qkey, n)
  for _ = 1, n do
    local old = redis.call('RPOP', qkey)
    if not old then return end
    local was = redis.call('HGET', ikey, 'u:' .. old)
    redis.call('HDEL', ikey, 'u:' .. old)
    if was and redis.call('HGET', ikey, 'i:' .. was) == old then
      redis.call('HDEL', ikey, 'i:' .. was)
    end
  end
end
local function fido_epoch(loc)
  local c = string.find(loc, ':', 1, true)
  if c then return string.sub(loc, 1, c - 1) end
  return nil
end
local function fido_remember(ikey, qkey, loc, identity)
  if identity == '' then return end
  local e = fido_epoch(loc)
  if e then
    redis.call('HSET', ikey, 'u:' .. loc, identity, 'i:' .. identity, loc, 'e', e)
  else
    redis.call('HSET', ikey, 'u:' .. loc, identity, 'i:' .. identity, loc)
  end
  local n = redis.call('LPUSH', qkey, loc)
  if n > %d then fido_evict(ikey, qkey, n - %d) end
end
local function fido_note(ikey, qkey, loc, identity)
  if identity == '' then return end
  local p = fido_noted[ikey]
  if not p then
    p = {qkey = qkey, fields = {}, locs = {}, known = {}}
    fido_noted[ikey] = p
  end
  local f = p.fields
  f[#f + 1] = 'u:' .. loc
  f[#f + 1] = identity
  f[#f + 1] = 'i:' .. identity
  f[#f + 1] = loc
  p.locs[#p.locs + 1] = loc
  p.known[identity] = true
  p.e = fido_epoch(loc) or p.e
end
local function fido_chunked(command, key, values)
  local n
  for i = 1, #values, 4000 do
    n = redis.call(command, key, unpack(values, i, math.min(i + 3999, #values)))
  end
  return n
end
local function fido_flush()
  for ikey, p in pairs(fido_noted) do
    if p.e then
      p.fields[#p.fields + 1] = 'e'
      p.fields[#p.fields + 1] = p.e
    end
    fido_chunked('HSET', ikey, p.fields)
    local n = fido_chunked('LPUSH', p.qkey, p.locs)
    if n > %d then fido_evict(ikey, p.qkey, n - %d) end
  end
  fido_noted = {}
end
""" % (KEEP, KEEP, KEEP, KEEP)


#: KEYS = a dedupe set, the identity hash and list; ARGV = the epoch, then
#: (id, identity) pairs.  Records the ids whose identity was stored before
#: (under another key) and returns them; the others are left alone.
RECOGNISE_LUA = LUA + """
local found = {}
for i = 2, #ARGV, 2 do
  if fido_known(KEYS[2], ARGV[i + 1]) and redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 0 then
    redis.call('SADD', KEYS[1], ARGV[i])
    fido_remember(KEYS[2], KEYS[3], ARGV[1] .. ':' .. ARGV[i], ARGV[i + 1])
    found[#found + 1] = ARGV[i]
  end
end
return found
"""


def lua(keep=KEEP):
    """:data:`LUA` with another bound (tests)."""
    return LUA.replace(" > %d then" % KEEP, " > %d then" % keep).replace(
        " - %d) end" % KEEP, " - %d) end" % keep)


def location(message):
    """The ``<epoch>:<id>`` a message is recorded at."""
    return f"{message.epoch}:{message.id}"


def text_of(value):
    """A Redis reply as text (``""`` for nil)."""
    if value is None:
        return ""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


class Unrecorded:
    """What the last ``filter_new`` learnt of each (account, mailbox)'s
    identity hash, asked in the same write as its dedupe check (no round
    trip of its own): nothing recorded (a new mailbox, every first poll on
    a fresh Redis), or the epoch recorded last (``e``).  The sink's
    ``may_recognise`` right after it answers False in both cases when the
    poll's epoch is that one (the IMAP session then asks the server for no
    Message-IDs), and a :func:`recognise` of a mailbox with nothing
    recorded answers "none" without a round trip.  One entry per mailbox
    at most, dropped when used.  Skipping costs nothing in correctness:
    the delivery's script recognises identities too (the check before
    fetching only saves fetching bodies stored before)."""

    def __init__(self):
        self._state = {}  # (account, mailbox) -> "" (nothing) or the epoch

    def found(self, account_id, mailbox, exists, epoch=None):
        """``exists``: the identity hash does; ``epoch``: its ``e``."""
        key = (account_id, mailbox)
        if not exists:
            self._state[key] = ""
        elif epoch:
            self._state[key] = epoch
        else:
            self._state.pop(key, None)

    def take(self, account_id, mailbox):
        """Whether nothing is recorded there (and forget it)."""
        key = (account_id, mailbox)
        if self._state.get(key) == "":
            del self._state[key]
            return True
        return False

    def checked(self, account_id, mailbox, epoch):
        """Whether nothing is recorded there, or ``epoch`` was checked
        already (and forget it)."""
        state = self._state.pop((account_id, mailbox), None)
        return state is not None and state in ("", epoch)

    def __len__(self):
        return len(self._state)


def recognise(script, account_id, mailbox, epoch, identities, then=None, unrecorded=None):
    """Run :data:`RECOGNISE_LUA` (``script``, registered on the sink's
    connection) for ``identities`` (``{id: identity}``): Deferred, the ids
    recognised (and now recorded under their new key).  ``then`` as for
    :meth:`~fido_tx.redis.connection.Script.run` (a WAIT for replicas).
    ``unrecorded``: an :class:`Unrecorded` saying that the mailbox has no
    identity recorded (nothing to recognise, no round trip)."""
    pairs = [(i, ident) for i, ident in identities.items() if ident]
    if unrecorded is not None and unrecorded.take(account_id, mailbox):
        return defer.succeed([])
    if not pairs:
        return defer.succeed([])
    args = [epoch.encode("utf-8")]
    for i, ident in pairs:
        args += [i.encode("utf-8"), ident.encode("utf-8")]
    d = script.run([keys.dedupe(account_id, mailbox, epoch),
                    *keys.identities(account_id, mailbox)], args,
                   what=f"identity check of {len(pairs)} messages", then=then)
    return d.addCallback(lambda ids: [text_of(i) for i in ids or ()])


def stored(connection, account_id, mailbox, epoch, ids):
    """Deferred: the identity recorded for each of ``ids`` (``""`` where
    none is), in order: one ``HMGET``."""
    ids = list(ids)
    if not ids:
        return defer.succeed([])
    ikey, _ = keys.identities(account_id, mailbox)
    d = connection.execute(b"HMGET", ikey, *[f"u:{epoch}:{i}".encode("utf-8") for i in ids])
    return d.addCallback(lambda values: [text_of(v) for v in values])
