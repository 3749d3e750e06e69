"""Marking what was stored: ``after_fetch`` (seen, delete, move) and flags,
in chunks of :data:`~fido_tx.sources.imap.poll.SIZE_CHUNK` UIDs, on the
connection of a :class:`~fido_tx.sources.imap.poll.MailboxPoll`.

Move uses ``UID MOVE`` where the server has MOVE, else ``UID COPY`` then
``\\Deleted`` and an expunge; an expunge is ``UID EXPUNGE`` of the marked
UIDs where the server has UIDPLUS, else ``EXPUNGE``.
"""

from twisted.internet import defer

from fido_tx import errors
from fido_tx.errors import FidoError
from fido_tx.sources.imap.client import ImapCommandError
from fido_tx.sources.imap.parse import _show, mailbox_name, uid_set

#: UIDs per ``UID FETCH (RFC822.SIZE)`` and per marking command
SIZE_CHUNK = 1000


def command_error(exc, kind_for_no=errors.MAILBOX, doing=""):
    """A command's error as a FidoError: NO is ``kind_for_no``, BAD
    ``protocol``; anything else passes unchanged."""
    if isinstance(exc, ImapCommandError):
        kind = kind_for_no if exc.status == b"NO" else errors.PROTOCOL
        return FidoError(kind, f"{doing or exc.command} failed: {exc.status.decode()} "
                               f"{_show(exc.text)}")
    return exc


async def store_flags(poll, uids, flag):
    for i in range(0, len(uids), SIZE_CHUNK):
        chunk = uids[i:i + SIZE_CHUNK]
        try:
            await poll.command(
                b"UID", b"STORE " + uid_set(chunk) + b" +FLAGS.SILENT (" + flag + b")")
        except ImapCommandError as e:
            raise command_error(e, errors.MAILBOX, "UID STORE")


def store_seen(poll, uids):
    """Write ``UID STORE <uids> +FLAGS.SILENT (\\Seen)`` while the next
    command is written after it (pipelined: see
    :func:`fetch_bodies`): its
    Deferred, not awaited here.  ``uids``: at most :data:`SIZE_CHUNK`."""
    return poll.command(b"UID", b"STORE " + uid_set(uids) + b" +FLAGS.SILENT (\\Seen)")


def marked(poll, uids):
    """Count and say that ``uids`` were marked (``after_fetch``)."""
    poll.marked += len(uids)
    poll.step("marked {n} messages ({action})", n=len(uids), action=poll.account.after_fetch)


async def expunge(poll, uids):
    try:
        if b"UIDPLUS" in poll.conn.caps:
            await poll.command(b"UID", b"EXPUNGE " + uid_set(uids))
        else:
            await poll.command(b"EXPUNGE")
    except ImapCommandError as e:
        raise command_error(e, errors.MAILBOX, "EXPUNGE")


async def mark(poll, uids):
    for i in range(0, len(uids), SIZE_CHUNK):
        await mark_chunk(poll, uids[i:i + SIZE_CHUNK])


async def mark_chunk(poll, uids):
    action = poll.account.after_fetch
    target = poll.account.move_target
    if action == "seen":
        await store_flags(poll, uids, b"\\Seen")
    elif action == "delete":
        await store_flags(poll, uids, b"\\Deleted")
        await expunge(poll, uids)
    elif target is not None:
        await move(poll, uids, target)
    else:
        raise FidoError(errors.CONFIG, f"unknown after_fetch {action!r}")
    poll.step("marked {n} messages ({action})", n=len(uids), action=action)


async def move(poll, uids, target):
    folder = mailbox_name(target)
    try:
        if b"MOVE" in poll.conn.caps:
            await poll.command(b"UID", b"MOVE " + uid_set(uids) + b" " + folder)
            return
        await poll.command(b"UID", b"COPY " + uid_set(uids) + b" " + folder)
    except ImapCommandError as e:
        raise command_error(e, errors.MAILBOX, f"moving messages to {target!r}")
    await store_flags(poll, uids, b"\\Deleted")
    await expunge(poll, uids)


def pipelined(poll):
    """Whether a batch's marking is written with the next batch's FETCH:
    ``after_fetch = "seen"`` is one ``UID STORE +FLAGS.SILENT``, whose
    answer cannot be mistaken for the FETCH's (delete and move expunge:
    marked on their own, before the next FETCH)."""
    return (not poll.dry_run and poll.account.after_fetch == "seen"
            and poll.settings.batch_messages <= SIZE_CHUNK)


async def fetch_bodies(poll, batch, collect, limits):
    """``UID FETCH`` the bodies of ``batch``, with the last batch's
    ``UID STORE`` written just before it (pipelined) when there is one.
    The STORE's failure is raised after the FETCH's answer (the
    connection stays usable), the FETCH's own first."""
    marks, poll.unmarked = poll.unmarked, []
    if not marks:
        await poll.fetch_items(batch, b"(UID BODY.PEEK[])", collect, **limits)
        return
    store = store_seen(poll, marks)
    fetch_error = None
    try:
        await poll.fetch_items(batch, b"(UID BODY.PEEK[])", collect, pipelined=True,
                               **limits)
    except defer.CancelledError:
        store.addErrback(lambda _: None)  # the session is stopping
        raise
    except Exception as e:
        fetch_error = e
    try:
        await store
    except Exception as e:
        if fetch_error is None:
            raise command_error(e, errors.MAILBOX, "UID STORE")
    else:
        marked(poll, marks)
    if fetch_error is not None:
        raise fetch_error


async def mark_unmarked(poll):
    """Mark what the last batch's delivery confirmed (see :func:`fetch_bodies`)."""
    marks, poll.unmarked = poll.unmarked, []
    if marks:
        await poll.mark(marks)
        poll.marked += len(marks)
