"""Where each IMAP mailbox stands: the highest UID handled, per UIDVALIDITY.

``select = "new"`` takes every UID above the recorded one, and ``start_from
= "now"`` records where a mailbox stands before taking anything
(:mod:`fido_tx.sources.imap.select`).  The record is the hash
``fido:imap:position:{<account>}:<mailbox>`` with one field, the
UIDVALIDITY in decimal, whose value is the UID (:mod:`fido_tx.redis.keys`).

It is written after the messages up to that UID are delivered and marked, so
a crash in between leaves it lower, never higher: the next poll finds those
messages again, the sink's dedupe record says they are delivered, and they
are only marked.  One Lua step keeps it monotonic within a UIDVALIDITY and
replaces it when the UIDVALIDITY changes.
"""

from zope.interface import implementer

from fido_tx.interfaces import IMailboxPositions
from fido_tx.redis import keys, text

#: KEYS[1] the hash; ARGV: the epoch, the UID.  Returns 1 when written.
ADVANCE_LUA = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and tonumber(current) >= tonumber(ARGV[2]) then
  return 0
end
if not current then
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


def newest(fields):
    """``(epoch, uid)`` of an ``HGETALL`` reply (flat list or dict), or
    ``None``; with several fields (a record written by hand) the highest
    epoch counts."""
    if isinstance(fields, dict):
        pairs = list(fields.items())
    else:
        fields = list(fields or ())
        pairs = list(zip(fields[0::2], fields[1::2]))
    found = []
    for epoch, uid in pairs:
        epoch, uid = text(epoch), text(uid)
        if uid.isdigit():
            found.append((int(epoch) if epoch.isdigit() else -1, epoch, int(uid)))
    if not found:
        return None
    _, epoch, uid = max(found)
    return epoch, uid


@implementer(IMailboxPositions)
class MailboxPositions:
    """:class:`~fido_tx.interfaces.IMailboxPositions` on a shared
    :class:`~fido_tx.redis.connection.RedisConnection`."""

    def __init__(self, connection):
        self._connection = connection
        self._advance = connection.script(ADVANCE_LUA)

    def get(self, account_id, mailbox):
        d = self._connection.execute(b"HGETALL", keys.imap_position(account_id, mailbox))
        return d.addCallback(newest)

    def advance(self, account_id, mailbox, epoch, uid):
        return self._advance.run([keys.imap_position(account_id, mailbox)],
                                 [str(epoch), str(int(uid))],
                                 what=f"position of {account_id} {mailbox}")
