"""Parse RESP2 replies from Redis in one pass over what arrived, for the protocol.

txredisapi's own reader is a line receiver: it decodes every line to ``str``,
keeps a stack of objects per array, and after each bulk string it pauses the
transport and hands the rest of the data back with ``callLater(0)``, so a
reply with k bulk strings (a delivery's new ids, an ``HGETALL``) takes k
reactor turns and two ``epoll_ctl`` each.  :func:`parse` reads every complete
reply in a buffer with index arithmetic, and the protocol
(:func:`fido_tx.private.fast_reply_protocol`) hands each one to txredisapi's
``replyReceived``, which fires the command's Deferred as before.

The values are txredisapi's with ``charset=None, convertNumbers=False`` (what
Fido's connection uses; ``tests/test_redis_replies.py`` checks them against
txredisapi's reader): ``+status`` is ``str``, ``:n`` is ``int``, ``$`` is
``bytes`` (``$-1`` is None), ``*`` is a ``list`` (``*-1`` is None), ``-error``
is ``error(text)`` (txredisapi's ``ResponseError``), nested or not.
"""

_CRLF = b"\r\n"


class Incomplete(Exception):
    """The buffer ends inside a reply; ``need`` bytes in all would be the
    least worth trying again with (0: unknown)."""

    def __init__(self, need=0):
        super().__init__(need)
        self.need = need


class BadReply(Exception):
    """Not RESP: the connection cannot be trusted past this point."""


def _one(buf, pos, error):
    """``(value, next position)`` of the reply at ``pos``."""
    end = buf.find(_CRLF, pos)
    if end < 0:
        raise Incomplete()
    token = buf[pos]
    if token == 36:  # $ bulk string
        n = int(buf[pos + 1:end])
        if n < 0:
            return None, end + 2
        stop = end + 2 + n
        if len(buf) < stop + 2:
            raise Incomplete(stop + 2)
        return buf[end + 2:stop], stop + 2
    if token == 58:  # : integer
        return int(buf[pos + 1:end]), end + 2
    if token == 42:  # * array
        n = int(buf[pos + 1:end])
        pos = end + 2
        if n < 0:
            return None, pos
        items = []
        append = items.append
        for _ in range(n):
            value, pos = _one(buf, pos, error)
            append(value)
        return items, pos
    if token == 43:  # + status
        return buf[pos + 1:end].decode("utf-8", "replace"), end + 2
    if token == 45:  # - error
        return error(buf[pos + 1:end].decode("utf-8", "replace")), end + 2
    raise BadReply(f"unexpected byte {bytes([token])!r} at the start of a Redis reply")


def parse(buf, error=Exception):
    """``(replies, consumed, need)``: every complete reply at the start of
    ``buf`` (bytes), the bytes they took, and for the incomplete rest the
    total length worth waiting for (0: try again on any new data).

    :raises BadReply: not RESP (a number that is not one included).
    """
    replies = []
    pos = 0
    size = len(buf)
    need = 0
    try:
        while pos < size:
            value, pos_after = _one(buf, pos, error)
            replies.append(value)
            pos = pos_after
    except Incomplete as e:
        need = e.need - pos if e.need else 0
    except (ValueError, IndexError) as e:
        raise BadReply(f"malformed Redis reply: {e}") from None
    return replies, pos, need
