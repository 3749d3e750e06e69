"""The in-memory source: mailboxes that are Python objects.

The proof of the source seam (no change to the session or the scheduler
was needed for it) and the tests' source: an account with ``source =
"memory"`` reads the :class:`MemoryMailbox` of its id in the
:class:`MemoryMailboxes` of the :class:`~fido_tx.sources.SourceContext`.
A poll delivers the unseen messages to the sink in batches of
``batch_messages`` and marks what the sink confirmed per the account's
``after_fetch`` (seen, delete, move:FOLDER); ids the sink rejects get the
``rejected_keyword`` flag and end the poll with kind ``rejected``.
"""

import attr
from twisted.internet import defer
from zope.interface import implementer

from fido_tx import errors
from fido_tx.errors import FidoError
from fido_tx.interfaces import ISource
from fido_tx.outcome import SessionResult
from fido_tx.sinks.message import Message

__all__ = ["MemoryMailbox", "MemoryMailboxes", "MemorySession", "build"]


@attr.s(slots=True, auto_attribs=True)
class MemoryMessage:
    id: str
    raw: bytes
    folder: str = "INBOX"
    flags: set = attr.ib(factory=set)


class MemoryMailbox:
    """One account's messages (``epoch`` plays UIDVALIDITY)."""

    def __init__(self, epoch="1"):
        self.epoch = epoch
        self.messages = []
        self._next = 1
        #: the result of the next polls is ``skipped`` while this is > 0
        self.skip = 0
        #: an exception the next poll ends with (a broken server)
        self.fail = None

    def add(self, raw, folder="INBOX", flags=()):
        m = MemoryMessage(str(self._next), raw, folder, set(flags))
        self._next += 1
        self.messages.append(m)
        return m.id

    def unseen(self, folder, rejected_keyword="$FidoRejected"):
        """Messages of ``folder`` neither seen nor rejected before."""
        return [m for m in self.messages if m.folder == folder and "\\Seen" not in m.flags
                and rejected_keyword not in m.flags]

    def by_id(self, message_id):
        return next(m for m in self.messages if m.id == message_id)


class MemoryMailboxes(dict):
    """account id -> :class:`MemoryMailbox` (created on first use)."""

    def __missing__(self, account_id):
        box = self[account_id] = MemoryMailbox()
        return box


@implementer(ISource)
class MemorySession:
    def __init__(self, account, ctx):
        self.account = account
        self.ctx = ctx
        self.box = ctx.memory[account.id]
        self.fetched = self.bytes = self.marked = 0

    def poll(self):
        return defer.ensureDeferred(self._poll())

    async def _poll(self):
        if self.box.skip > 0:
            self.box.skip -= 1
            return SessionResult(account_id=self.account.id, skipped=True)
        try:
            if self.box.fail is not None:
                raise self.box.fail
            await self._deliver_unseen()
        except FidoError as e:
            return self._result(e.kind, e.message)
        return self._result()

    def _result(self, kind=None, message=""):
        return SessionResult(account_id=self.account.id, kind=kind, message=message,
                             fetched=self.fetched, bytes=self.bytes, marked=self.marked,
                             dry_run=self.ctx.dry_run)

    async def _deliver_unseen(self):
        account, box, sink = self.account, self.box, self.ctx.sink
        unseen = {m.id: m for m in box.unseen(account.mailbox,
                                                  self.ctx.settings.rejected_keyword)}
        if not unseen:
            return
        new = set(await sink.filter_new(account.id, account.mailbox, box.epoch, list(unseen)))
        if self.ctx.dry_run:
            self.fetched = len(new)
            self.bytes = sum(len(unseen[i].raw) for i in new)
            return
        self._mark([i for i in unseen if i not in new])
        ids = [i for i in unseen if i in new]
        rejected = []
        step = max(1, self.ctx.settings.batch_messages)
        for start in range(0, len(ids), step):
            batch = [Message(account.id, account.mailbox, box.epoch, i, unseen[i].raw,
                             source="memory") for i in ids[start:start + step]]
            delivery = await sink.deliver(batch)
            confirmed = [i for i in delivery.confirmed if i in unseen]
            self.fetched += len(confirmed)
            self.bytes += sum(len(unseen[i].raw) for i in confirmed)
            self._mark(confirmed)
            for i in delivery.rejected:
                unseen[i].flags.add(self.ctx.settings.rejected_keyword)
                rejected.append(i)
            if delivery.error is not None:
                raise delivery.error
        if rejected:
            raise FidoError(errors.REJECTED, f"the delivery refused {len(rejected)} "
                                             f"message(s) for good: {', '.join(rejected)}")

    def _mark(self, ids):
        action, target = self.account.after_fetch, self.account.move_target
        for i in ids:
            m = self.box.by_id(i)
            if action == "seen":
                m.flags.add("\\Seen")
            elif action == "delete":
                self.box.messages.remove(m)
            else:
                m.folder = target
            self.marked += 1


def build(account, ctx, handle=None):
    """The :data:`fido_tx.sources.SOURCES` factory."""
    return MemorySession(account, ctx)
