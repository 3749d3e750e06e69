"""The SEARCH and the sizes FETCH of a poll in one write (RFC 5182 SEARCHRES).

``UID SEARCH RETURN (SAVE) <criteria>`` keeps the result on the server as
``$``; ``UID FETCH $ (UID RFC822.SIZE ...)``, written right behind it (the
client's ``command(pipelined=True)``), answers with the UIDs found and
their sizes: one round trip instead of two.  Used only when the server has
SEARCHRES and STATUS counted 1 to :data:`~fido_tx.sources.imap.marking.SIZE_CHUNK`
unseen messages, which bounds what the FETCH brings; otherwise the poll
searches and fetches the sizes apart, as always.
"""

from twisted.internet import defer

from fido_tx import errors
from fido_tx.sources.imap import identity
from fido_tx.sources.imap.client import ImapCommandError
from fido_tx.sources.imap.marking import SIZE_CHUNK, command_error
from fido_tx.sources.imap.parse import fetch_handler


def usable(poll, status):
    """Whether the SEARCH and the sizes FETCH go in one write (RFC 5182
    SEARCHRES: ``UID SEARCH RETURN (SAVE)`` then ``UID FETCH $``): the
    server has it and STATUS counted at most :data:`SIZE_CHUNK` unseen
    messages (``$`` holds them all: the FETCH is bounded by that)."""
    if not status or poll.selection.new or b"SEARCHRES" not in poll.conn.caps:
        return False
    unseen = status.get(b"UNSEEN")
    return unseen is not None and 0 < unseen <= SIZE_CHUNK


async def search_with_sizes(poll, info, keywords):
    """The UIDs found, their sizes (and, where :func:`identity.sizes`
    will want them, Message-IDs) kept in the poll's ``prefetched``: one round
    trip instead of the SEARCH's and the sizes FETCH's."""
    items = identity.items_for(poll, str(info.uidvalidity))
    query = b"SEARCH RETURN (SAVE)" + poll.selection.query(keywords)[len(b"SEARCH"):]
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
