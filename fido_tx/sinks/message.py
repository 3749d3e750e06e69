"""The values that travel from a source to a sink.

A message's key is a :class:`MessageKey`: the account, the mailbox (IMAP
mailbox or Graph folder), an *epoch* (IMAP: UIDVALIDITY as a decimal string;
Graph: ``""``) and an *id* (IMAP: the UID as a decimal string; Graph: the
immutable message id).  Sinks deduplicate by key; nothing downstream of a
source knows it is IMAP.

A message may also carry an ``identity``: a short text that names its
content (the IMAP source's: :mod:`fido_tx.sources.imap.identity`), which
the sinks record beside the key (:mod:`fido_tx.sinks.identity`) to
recognise a message stored before under another key, and to tell a reused
key from the message stored under it.
"""

import attr

from fido_tx.timefmt import utc_now_iso


@attr.s(frozen=True, slots=True, auto_attribs=True)
class MessageKey:
    account: str
    mailbox: str
    epoch: str
    id: str


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Message:
    """One fetched message, exactly as the server sent it."""

    account: str
    mailbox: str
    epoch: str
    id: str
    raw: bytes = attr.ib(repr=False)
    message_id: str = ""
    fetched_at: str = attr.ib(factory=utc_now_iso)
    source: str = "imap"
    route_key: str = ""
    #: what names the content ("" : none, the key alone identifies it)
    identity: str = ""

    @property
    def key(self):
        return MessageKey(self.account, self.mailbox, self.epoch, self.id)

    @property
    def size(self):
        return len(self.raw)

    @property
    def uid(self):
        """The id as an entry shows it: the contract's decimal UID for IMAP,
        also for a message stored again under ``<uid>~<identity>`` after the
        server reused its UID (the dedupe record keeps the whole id; the
        entry's ``message_id`` and ``size`` tell the two apart)."""
        if self.source == "imap":
            return self.id.partition("~")[0]
        return self.id


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Delivery:
    """What a sink did with a batch: the session marks ``confirmed``, flags
    ``rejected`` and leaves the rest; ``error`` says why the rest was kept
    back (``None`` when nothing was)."""

    #: ids durably delivered, by this call or before
    confirmed: tuple = ()
    #: of those, the ids this call delivered
    new: tuple = ()
    #: ids the application refused for good (flag, leave, report ``rejected``)
    rejected: tuple = ()
    #: the :class:`~fido_tx.errors.FidoError` that kept the other ids back
    error: object = None
