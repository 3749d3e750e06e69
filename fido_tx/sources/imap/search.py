"""The UID SEARCH of one poll: written behind SELECT (an account without a
position), with the sizes in one write (RFC 5182 SEARCHRES: ``UID SEARCH
RETURN (SAVE)`` then ``UID FETCH $``), or alone.

Functions of the :class:`~fido_tx.sources.imap.poll.MailboxPoll` they
search for (its connection, settings, selection and step log), as in
:mod:`~fido_tx.sources.imap.marking`.
"""

from twisted.internet import defer
from twisted.logger import Logger

from fido_tx import errors
from fido_tx.sources.imap import identity
from fido_tx.sources.imap.client import ImapCommandError
from fido_tx.sources.imap.marking import SIZE_CHUNK, command_error
from fido_tx.sources.imap.parse import fetch_handler
from fido_tx.sources.imap.select import search_handler

_log = Logger()


def keywords(poll, info):
    """The ``UNKEYWORD`` part of the search: each keyword the mailbox
    knows (``info`` None: every configured one)."""
    wanted = b""
    for kw in (poll.settings.too_large_keyword, poll.settings.rejected_keyword):
        if kw and (info is None or info.keyword_known(kw)):
            wanted += b" UNKEYWORD " + kw.encode("ascii", "replace")
    return wanted


def send(poll, wanted):
    """Write the UID SEARCH: a Deferred firing with the set of UIDs found."""
    found = set()
    d = poll.command(b"UID", poll.selection.query(wanted), untagged=search_handler(found))
    return d.addCallback(lambda _: found)


async def run(poll, info, status=None, sent=None):
    """The UIDs to take; ``sent``: the answer of the search already
    written (behind SELECT); else with the sizes in one write when
    :func:`saves` says so (``status``: STATUS's answer)."""
    try:
        if sent is None and saves(poll, status):
            found = set(await with_sizes(poll, info, keywords(poll, info)))
        else:
            if sent is None:
                sent = send(poll, keywords(poll, info))
            found = await sent
    except ImapCommandError as e:
        raise command_error(e, errors.PROTOCOL, "UID SEARCH")
    uids = poll.selection.keep(found)
    ignored = poll.conn.proto.search_ignored
    what = poll.selection.what
    if ignored:
        _log.info("session {account_id}: {n} {what} messages; taking the first {taken} "
                  "([imap] max_search_uids), the rest next poll", what=what,
                  account_id=poll.account.id, n=len(uids) + ignored, taken=len(uids))
    poll.step("{n} {what} messages", n=len(uids), what=what)
    return uids


def saves(poll, status):
    """Whether the SEARCH and the sizes FETCH go in one write (RFC 5182
    SEARCHRES: ``UID SEARCH RETURN (SAVE)`` then ``UID FETCH $``): the
    server has it and STATUS counted at most :data:`SIZE_CHUNK` unseen
    messages (``$`` holds them all: the FETCH is bounded by that)."""
    if not status or poll.selection.new or b"SEARCHRES" not in poll.conn.caps:
        return False
    unseen = status.get(b"UNSEEN")
    return unseen is not None and 0 < unseen <= SIZE_CHUNK


async def with_sizes(poll, info, wanted):
    """The UIDs found, their sizes (and, where :func:`identity.sizes`
    will want them, Message-IDs) kept in the poll's ``prefetched``: one round
    trip instead of the SEARCH's and the sizes FETCH's."""
    items = identity.items_for(poll, str(info.uidvalidity))
    query = b"SEARCH RETURN (SAVE)" + poll.selection.query(wanted)[len(b"SEARCH"):]
    got = {}

    def collect(uid, values):
        size = values.get(b"RFC822.SIZE")
        if isinstance(size, bytes) and size.isdigit():
            got[uid] = (int(size), identity.message_id_of(values))

    search = poll.command(b"UID", query)
    fetch = poll.command(b"UID", b"FETCH $ " + items, untagged=fetch_handler(collect),
                         pipelined=True)
    try:
        await search
    except defer.CancelledError:
        fetch.addErrback(lambda _: None)
        raise
    except Exception:
        try:  # the connection stays usable: the FETCH's answer first
            await fetch
        except Exception:
            pass
        raise
    try:
        await fetch
    except ImapCommandError as e:
        raise command_error(e, errors.PROTOCOL, "UID FETCH $")
    poll.prefetched = got
    return got


class SearchBehindSelect:
    """The UID SEARCH of a poll written right behind its SELECT.

    An account without a position searches what SELECT cannot change but
    for the keywords (``UNKEYWORD``): the search asks for every configured
    one, and SELECT's FLAGS say afterwards whether that was the search to
    make; if not (a mailbox that cannot hold them), its answer is dropped
    and the search made again (a SEARCH changes nothing).
    """

    def __init__(self, poll):
        self.poll = poll
        self.wanted = keywords(poll, None)
        self.sent = None

    def write(self):
        self.sent = send(self.poll, self.wanted)

    def drop(self):
        if self.sent is not None:
            self.sent.addErrback(lambda f: None)

    async def answer_for(self, info):
        """The search's Deferred when it asked what ``info`` calls for,
        else ``None`` (once its answer is in: the connection is free)."""
        if self.sent is None:
            return None
        if self.wanted == keywords(self.poll, info):
            return self.sent
        self.drop()
        try:
            await self.sent
        except Exception:
            pass
        return None
