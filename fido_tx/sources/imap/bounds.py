"""What a server may send in answer to one command, counted before it is held.

:class:`CommandBounds` holds the counters of one command of a
:class:`~fido_tx.sources.imap.client.FidoIMAP4Client` against its
:class:`Limits` (taken from the protocol's ``max_*`` attributes and the
command's own literal bounds); every check raises a ``protocol``
:class:`~fido_tx.errors.FidoError` that names the bound, and the protocol
then aborts the connection.  README "Bounds" lists them.

:func:`body_limits` turns the sizes a server claimed (RFC822.SIZE) into the
literal bounds of a ``UID FETCH`` of those bodies, so that what arrives is
what the in-flight budget granted, plus slack.
"""

import re

import attr

from fido_tx import errors
from fido_tx.errors import FidoError

_UID_ITEM = re.compile(rb"\bUID (\d{1,10})\b", re.I)

#: slack over a message's claimed RFC822.SIZE allowed for its BODY[] literal:
#: fixed bytes plus a fraction (1/8) of the claim
BODY_SLACK_BYTES = 64 * 1024
BODY_SLACK_FRACTION = 8


def body_limits(claimed, largest):
    """The literal bounds of a ``UID FETCH`` of bodies, as ``command()``
    keyword arguments: each literal at most the largest claimed size plus
    slack (never over ``largest``: max_message_size plus slack), all of them
    at most the claims' sum plus slack, and per UID its own claim plus slack.

    :param claimed: ``{uid: RFC822.SIZE}``.
    """
    caps = {uid: min(largest, size + BODY_SLACK_BYTES + size // BODY_SLACK_FRACTION)
            for uid, size in claimed.items()}
    return dict(literal_each=max(caps.values(), default=0),
                literal_total=sum(caps.values()), literal_caps=caps)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Limits:
    """The bounds of one command (see the protocol's attributes)."""

    #: literal bytes of one response, all its literals together
    literal_each: int
    #: literal bytes of all the responses to the command
    literal_total: int
    #: ``{uid: bytes}``: the largest literal of a response naming that UID
    literal_caps: dict | None
    response_literals: int
    response_text: int
    untagged: int
    untagged_bytes: int
    search_uids: int


def make_limits(values, literal_each=None, literal_total=None, literal_caps=None):
    """:class:`Limits` from a connection's ``max_*`` ``values`` (literal,
    command literal, response literals, response text, untagged, untagged
    bytes, search UIDs), the literal ones overridden when given."""
    return Limits(
        literal_each=values[0] if literal_each is None else literal_each,
        literal_total=values[1] if literal_total is None else literal_total,
        literal_caps=literal_caps,
        response_literals=values[2],
        response_text=values[3],
        untagged=values[4],
        untagged_bytes=values[5],
        search_uids=values[6],
    )


#: the Limits of commands with a connection's own bounds, by those values:
#: most commands, built once and shared by every connection with the same
#: settings (a Limits per command was ~1% of an empty poll's profile)
_DEFAULTS = {}


def command_bounds(values, literal_each=None, literal_total=None, literal_caps=None, what=""):
    """The :class:`CommandBounds` of one command (see :func:`make_limits`)."""
    if literal_each is None and literal_total is None and literal_caps is None:
        limits = _DEFAULTS.get(values)
        if limits is None:
            if len(_DEFAULTS) >= 64:  # settings changed many times: start again
                _DEFAULTS.clear()
            limits = _DEFAULTS[values] = make_limits(values)
    else:
        limits = make_limits(values, literal_each, literal_total, literal_caps)
    return CommandBounds(limits, what)


class CommandBounds:
    """The counters of one command; ``what`` names it in messages.

    :ivar search_ignored: UIDs of SEARCH responses dropped by the bound.
    """

    def __init__(self, limits, what=""):
        self.limits = limits
        self.what = what or "the server"
        self.search_ignored = 0
        self._literal = 0
        self._untagged = 0
        self._bytes = 0
        self._search_uids = 0
        self._resp_literal = 0
        self._resp_text = 0
        self._resp_literals = 0

    def _cut(self, message):
        raise FidoError(errors.PROTOCOL, message + ": cut off")

    def admit_literal(self, texts, size):
        """A literal of ``size`` bytes announced at the end of ``texts[-1]``
        (``texts``: the text parts of the response so far): count it against
        every bound before any of it is held."""
        lim, what = self.limits, self.what
        self._resp_literal += size
        self._literal += size
        self._resp_text += len(texts[-1])
        self._resp_literals += 1
        caps = lim.literal_caps
        if caps:
            m = _UID_ITEM.search(b" ".join(texts))
            uid = int(m.group(1)) if m else None
            if uid is not None and uid in caps and size > caps[uid]:
                self._cut(f"server sent a {size} byte message body for UID {uid} after "
                          f"claiming a smaller RFC822.SIZE (at most {caps[uid]} bytes "
                          f"allowed); the server is broken or hostile")
        if self._resp_literal > lim.literal_each:
            self._cut(f"server announced {self._resp_literal} bytes of literal data in one "
                      f"response to {what}, over the limit of {lim.literal_each} bytes")
        if self._literal > lim.literal_total:
            self._cut(f"server sent {self._literal} bytes of literal data in answer to {what}, "
                      f"over the limit of {lim.literal_total} bytes for that command")
        if self._resp_literals > lim.response_literals or self._resp_text > lim.response_text:
            self._cut(f"server chained more than {lim.response_literals} literals or "
                      f"{lim.response_text} bytes of text in one response to {what}")

    def response_done(self):
        self._resp_literal = self._resp_text = self._resp_literals = 0

    def count_line(self, nbytes):
        self._bytes += nbytes
        if self._bytes > self.limits.untagged_bytes:
            self._cut(f"server sent more than {self.limits.untagged_bytes} bytes of responses "
                      f"to {self.what} without completing it")

    def count_untagged(self):
        self._untagged += 1
        if self._untagged > self.limits.untagged:
            self._cut(f"server sent more than {self.limits.untagged} untagged responses to "
                      f"{self.what} without completing it")

    def bound_search(self, text):
        """A SEARCH response cut to what the bound still admits (``None``:
        nothing), before anything parses it."""
        count = text.count(b" ")
        room = self.limits.search_uids - self._search_uids
        if count <= room:
            self._search_uids += count
            return text
        self.search_ignored += count - max(room, 0)
        if room <= 0:
            return None
        self._search_uids += room
        pos = 0
        for _ in range(room + 1):
            pos = text.find(b" ", pos + 1)
            if pos == -1:
                return text
        return text[:pos]
