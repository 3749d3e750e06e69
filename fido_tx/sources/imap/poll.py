"""One poll of one mailbox on a logged-in connection.

STATUS (nothing unseen: done), SELECT (EXAMINE in a dry run) with UID SEARCH
written behind it (an account without a position; searched again in the
rare mailbox whose FLAGS leave out a keyword the first search excluded),
ask the sink which UIDs are new, mark the others, RFC822.SIZE, leave the
too-large ones flagged, then per batch: open a grant of the byte budget, UID
FETCH (the bodies charged to it as they arrive), deliver, mark what the sink
confirmed, flag what it rejected.

The order guarantees "never lose a message": a UID is marked (seen,
deleted, moved) only after the sink has confirmed it.  UIDs the sink already
holds (a crash between delivery and marking) are marked without being
fetched again, once the server is seen to hold there what was stored (a
reused UID is stored as new: :mod:`fido_tx.sources.imap.identity`, which
also recognises messages stored before under another UIDVALIDITY).

Search: ``UID SEARCH UNSEEN UNKEYWORD <too_large_keyword> UNKEYWORD
<rejected_keyword>`` for each keyword the mailbox can hold (``\\*`` or the
keyword in PERMANENTFLAGS, or the keyword already in FLAGS).  An account
with ``select = "new"`` or ``start_from = "now"`` searches a UID range above
its recorded position instead, and moves the position after the poll
(:mod:`fido_tx.sources.imap.select`).

Messages go to the sink as :class:`fido_tx.sinks.message.Message` with
``epoch = str(UIDVALIDITY)`` and ``id = str(UID)``.  The sink's own
:class:`~fido_tx.errors.FidoError` passes through unchanged; anything else it
raises is kind ``protocol`` ("internal error").
"""

from twisted.internet import defer
from twisted.logger import Logger

from fido_tx import errors
from fido_tx.errors import FidoError
from fido_tx.sinks.message import Message
from fido_tx.sources.imap import identity, marking, search
from fido_tx.sources.imap.client import FidoIMAP4Client, ImapCommandError
from fido_tx.sources.imap.marking import SIZE_CHUNK, command_error
from fido_tx.sources.imap.parse import (
    SelectInfo,
    _show,
    extract_message_id,
    fetch_handler,
    mailbox_name,
    response_code,
    uid_set,
)
from fido_tx.sources.imap.select import Selection

__all__ = ["MailboxPoll", "SIZE_CHUNK", "command_error"]

_log = Logger()
_ABSENT = object()


def _shielded(d):
    """A Deferred with ``d``'s result whose cancellation leaves ``d`` running:
    a session stopped during a delivery ends at once, and the sink finishes
    its write (nothing is marked: the next poll finds it delivered)."""
    outer = defer.Deferred()

    def forward(result):
        if not outer.called:
            outer.callback(result)  # a Failure errbacks

    d.addBoth(forward)
    return outer


async def sink_call(f, *args):
    """Call the sink: its FidoError passes through; a bug is ``protocol``."""
    try:
        return await _shielded(defer.maybeDeferred(f, *args))
    except (FidoError, defer.CancelledError):
        raise
    except Exception as e:
        raise FidoError(errors.PROTOCOL, f"internal error: the sink failed: "
                                         f"{type(e).__name__}: {e}")


def batches(uids, sizes, limit_n, limit_b):
    """Split ``uids`` into batches of at most ``limit_n`` messages and
    ``limit_b`` bytes (a larger message alone)."""
    limit_n = max(1, limit_n)
    batch, nbytes = [], 0
    for uid in uids:
        size = sizes[uid]
        if batch and (len(batch) >= limit_n or nbytes + size > limit_b):
            yield batch
            batch, nbytes = [], 0
        batch.append(uid)
        nbytes += size
    if batch:
        yield batch


class MailboxPoll:
    """Poll ``mailbox`` once on ``connection`` (an
    :class:`~fido_tx.sources.imap.login.ImapConnection`).  The counters say
    what it did, also when it ends with an error."""

    #: False on a selected mailbox (RFC 3501: no STATUS there), and where
    #: the session asks none (the last poll found mail: STATUS would decide
    #: nothing, SELECT follows anyway)
    status_allowed = True
    #: whether UID SEARCH may be written behind SELECT (False where
    #: :meth:`select` sends no SELECT)
    search_with_select = True

    def __init__(self, connection, account, sink, settings, step, budget=None,
                 dry_run=False, mailbox=None, positions=None, epochs=None, status=None):
        self.conn = connection
        #: the answer of a STATUS already written (pipelined with LOGIN)
        self.sent_status = status
        self.account = account
        self.sink = sink
        self.settings = settings
        self.step = step
        self.budget = budget
        self.dry_run = dry_run
        self.mailbox = mailbox if mailbox is not None else account.mailbox
        #: :class:`~fido_tx.sources.imap.identity.Epochs` (``None``: no
        #: check of new UIDs before their bodies: see identity.sizes)
        self.epochs = epochs
        # the connection's command, not a bound method: no cycle to the poll
        self.selection = Selection(account, self.mailbox, connection.command, positions,
                                   dry_run, settings.max_search_uids, step)
        self.fetched = 0
        self.bytes = 0
        self.marked = 0
        self.too_large = []
        self.rejected = []
        #: UIDs delivered under another id than their own: reused UIDs
        self.aliases = {}
        #: UIDs confirmed by the sink, to be marked with the next batch's FETCH
        self.unmarked = []
        #: ``{uid: (size, message_id or None)}`` fetched with the SEARCH
        #: (``None``: not; see :meth:`search_with_sizes`)
        self.prefetched = None

    def command(self, name, args=None, **kw):
        return self.conn.proto.command(name, args, **kw)

    async def run(self):
        selection = self.selection
        await selection.load()
        status = await selection.status(self.sent_status) if self.status_allowed else None
        if await selection.settled_by_status(status):
            self.step("nothing {what} to fetch (STATUS)", what=selection.what)
            return
        # an account without a position: UID SEARCH written behind SELECT
        early = None
        if self.search_with_select and not selection.tracked:
            early = search.SearchBehindSelect(self)
        try:
            info = await (self.select(early.write) if early else self.select())
        except BaseException:
            if early is not None:
                early.drop()  # refused with the SELECT: not read
            raise
        if not await selection.begin(info.uidvalidity, await selection.uidnext_of(info)):
            return
        uids = await self.search(info, status, await early.answer_for(info) if early else None)
        if uids:
            await self.take(info, uids)
        await selection.finish(uids)
        self.seen(str(info.uidvalidity), bool(uids))

    async def take(self, info, uids):
        """Ask the sink which of ``uids`` are new, mark the others (once
        the server still holds what was stored there), fetch the new."""
        epoch = str(info.uidvalidity)
        ids = await sink_call(self.sink.filter_new, self.account.id, self.mailbox, epoch,
                              [str(u) for u in uids])
        new_set = {int(i) for i in ids}
        already = [u for u in uids if u not in new_set]
        new = [u for u in uids if u in new_set]
        reuse = identity.Reuse(same=tuple(already))
        if already and not self.dry_run:
            reuse = await identity.check_stored(self, epoch, already, sink_call)
            self.aliases = reuse.fetch
        if reuse.same:
            self.step("{n} messages already stored, marking them", n=len(reuse.same))
            if not self.dry_run:
                await self.mark(list(reuse.same))
                self.marked += len(reuse.same)
        if new or reuse.fetch:
            await self.fetch_new(info, sorted(new + list(reuse.fetch)))
        if reuse.reports:
            raise FidoError(errors.PROTOCOL, reuse.error_text(self.mailbox))

    def seen(self, epoch, found=False):
        """This poll went through ``epoch``: later ones skip the check of
        new UIDs against messages stored before (identity.sizes); ``found``:
        it found mail (the next session asks no STATUS)."""
        if self.epochs is not None and not self.dry_run:
            self.epochs.seen(self.account.id, self.mailbox, epoch, found)

    async def fetch_new(self, info, new):
        sizes, new = await identity.sizes(self, str(info.uidvalidity), new, sink_call)
        fetchable = await self.leave_too_large(info, new, sizes)
        if self.dry_run:
            self.fetched = len(fetchable)
            self.bytes = sum(sizes[u] for u in fetchable)
            return
        settings = self.settings
        epoch = str(info.uidvalidity)
        for batch in batches(fetchable, sizes, settings.batch_messages, settings.batch_bytes):
            grant = None
            if self.budget is not None:
                # a first few KiB: the rest is charged as the bodies arrive
                grant = await self.budget.open(sum(sizes[u] for u in batch))
            try:
                error = await self.fetch_batch(batch, epoch, sizes, grant)
            finally:
                if grant is not None:
                    grant.release()
            if error is not None:
                await marking.mark_unmarked(self)
                raise error
        await marking.mark_unmarked(self)
        if self.rejected:
            await self.flag(info, self.rejected, settings.rejected_keyword)
            shown = ", ".join(str(u) for u in self.rejected[:20])
            more = "" if len(self.rejected) <= 20 else f" and {len(self.rejected) - 20} more"
            raise FidoError(errors.REJECTED,
                            f"the delivery refused {len(self.rejected)} message(s) for good: "
                            f"UID {shown}{more} in {self.mailbox!r}, left on the server "
                            f"flagged {settings.rejected_keyword}")

    async def leave_too_large(self, info, new, sizes):
        """The UIDs small enough to fetch; the others are flagged and left."""
        limit = self.settings.max_message_size
        fetchable = []
        for uid in new:
            size = sizes.get(uid)
            if size is None:  # expunged meanwhile
                continue
            if size > limit:
                self.too_large.append(uid)
            else:
                fetchable.append(uid)
        if self.too_large:
            self.step("{n} messages over max_message_size left on the server",
                      n=len(self.too_large))
            if not self.dry_run:
                await self.flag(info, self.too_large, self.settings.too_large_keyword)
        return fetchable

    async def flag(self, info, uids, keyword):
        if keyword and info.keywords_allowed(keyword):
            await self.store_flags(uids, keyword.encode("ascii", "replace"))

    # -- commands --------------------------------------------------------------

    async def select(self, then=None):
        """SELECT (EXAMINE in a dry run) the mailbox; ``then()`` is called
        right after the command is written (to write the next behind it)."""
        info = SelectInfo()

        def untagged(segments):
            if len(segments) == 1:
                info.feed(segments[0])

        verb = b"EXAMINE" if self.dry_run else b"SELECT"
        d = self.command(verb, mailbox_name(self.mailbox), untagged=untagged)
        if then is not None:
            then()
        try:
            text = await d
        except ImapCommandError as e:
            if e.status == b"NO":
                raise FidoError(errors.MAILBOX, f"cannot open mailbox {self.mailbox!r}: "
                                                f"{_show(e.text)}")
            raise FidoError(errors.PROTOCOL, f"{verb.decode()} failed: {e.status.decode()} "
                                             f"{_show(e.text)}")
        if response_code(text) == b"READ-ONLY" and not self.dry_run:
            raise FidoError(errors.MAILBOX, f"mailbox {self.mailbox!r} is read-only")
        if info.uidvalidity is None:
            raise FidoError(errors.PROTOCOL, f"server sent no UIDVALIDITY for {self.mailbox!r}")
        self.step("selected {mailbox}: {exists} messages, uidvalidity {uidvalidity}",
                  mailbox=self.mailbox, exists=info.exists, uidvalidity=info.uidvalidity)
        return info

    async def search(self, info, status=None, sent=None):
        """The UIDs to take (:func:`fido_tx.sources.imap.search.run`)."""
        return await search.run(self, info, status, sent)

    async def fetch_items(self, uids, items, collect, **limits):
        """``UID FETCH`` in chunks; ``collect(uid, items)`` per response;
        ``limits``: literal bounds for ``command()`` (body batches are one
        chunk)."""
        untagged = fetch_handler(collect)
        for i in range(0, len(uids), SIZE_CHUNK):
            chunk = uids[i:i + SIZE_CHUNK]
            try:
                await self.command(b"UID", b"FETCH " + uid_set(chunk) + b" " + items,
                                   untagged=untagged, **limits)
            except ImapCommandError as e:
                raise command_error(e, errors.PROTOCOL, "UID FETCH")

    async def sizes(self, uids):
        sizes = {}
        wanted = set(uids)

        def collect(uid, values):
            size = values.get(b"RFC822.SIZE")
            if uid in wanted and size is not None and size.isdigit():
                sizes[uid] = int(size)

        await self.fetch_items(uids, b"(UID RFC822.SIZE)", collect)
        return sizes

    async def fetch_batch(self, batch, epoch, sizes, grant=None):
        """Fetch, deliver and mark one batch; the delivery's error, if any.

        With :func:`~fido_tx.sources.imap.marking.pipelined`, the UIDs the
        sink confirmed are marked by a ``UID STORE`` written together with
        the next batch's ``UID FETCH`` (one round trip fewer per batch), or
        after the last batch: still only after the sink confirmed them."""
        bodies = {}
        wanted = set(batch)
        answered = set()
        wrong = []

        def collect(uid, values):
            body = values.get(b"BODY[]", _ABSENT)
            if uid not in wanted:
                if body is not _ABSENT:  # a flag update of another message is fine
                    wrong.append(f"the body of UID {uid}, which was not asked for")
                return
            answered.add(uid)
            if isinstance(body, bytes):
                if uid in bodies:
                    wrong.append(f"two bodies for UID {uid}")
                bodies[uid] = body

        # a body may not be (much) larger than its RFC822.SIZE (the bounds cut
        # it off); what arrives is charged to the budget as it arrives
        limits = FidoIMAP4Client.body_limits(
            {u: sizes[u] for u in batch}, self.settings.max_message_size + 1024 * 1024)
        if grant is not None:  # the bodies' bytes are charged as they arrive
            grant.attach(self.conn.proto, limits["literal_total"])
        await marking.fetch_bodies(self, batch, collect, limits)
        if grant is not None:
            grant.settle()  # all arrived: the unused reservation goes back
        # a UID with no answer at all was expunged meanwhile; an answer
        # without the body asked for is a broken server: nothing of the
        # batch is stored blind, the account is reported
        wrong.extend(f"no body (BODY[]) for UID {u}" for u in sorted(answered - set(bodies)))
        if wrong:
            bodies.clear()
            raise FidoError(errors.PROTOCOL, "the server's UID FETCH answer did not carry what "
                                             "was asked: " + "; ".join(wrong[:5]))
        messages = [self.message(epoch, uid, bodies[uid], sizes[uid])
                    for uid in batch if uid in bodies]
        bodies.clear()
        if not messages:
            return None
        self.step("storing {n} messages", n=len(messages))
        delivery = await sink_call(self.sink.deliver, messages)
        sizes = {m.id: m.size for m in messages}
        uid_of = {m.id: int(m.id.partition("~")[0]) for m in messages}
        del messages
        if grant is not None:
            grant.release()  # the bodies are delivered and dropped: the budget is free
        confirmed = [i for i in delivery.confirmed if i in sizes]
        self.fetched += len(confirmed)
        self.bytes += sum(sizes[i] for i in confirmed)
        self.rejected.extend(uid_of[i] for i in delivery.rejected if i in sizes)
        confirmed = [uid_of[i] for i in confirmed]
        if confirmed and marking.pipelined(self):
            self.unmarked = confirmed
        elif confirmed:
            await self.mark(confirmed)
            self.marked += len(confirmed)
        return delivery.error

    def message(self, epoch, uid, raw, size):
        """The Message of ``raw`` at ``uid`` (RFC822.SIZE ``size``)."""
        message_id = extract_message_id(raw)
        return Message(self.account.id, self.mailbox, epoch, self.aliases.get(uid) or str(uid),
                       raw, message_id=message_id, source="imap",
                       identity=identity.of(size, message_id, raw))

    # -- marking (fido_tx.sources.imap.marking) ---------------------------------

    async def store_flags(self, uids, flag):
        await marking.store_flags(self, uids, flag)

    async def mark(self, uids):
        await marking.mark(self, uids)
