"""Where fetched messages go: the sink interface, its value type, and a fake.

A sink confirms messages; only confirmed messages are ever marked on the IMAP
server.  The Redis stream (:mod:`fido_tx.redis.store`) is the first sink; a
Sidekiq-compatible list or a webhook are later ones, each a new module that
provides :class:`IMessageSink`.

:class:`MemorySink` is the fake for tests, shipped next to the interface (the
txacme habit) so that every test uses the same well-behaved double.
"""

from datetime import datetime, timezone

import attr
from twisted.internet import defer
from zope.interface import Interface, implementer

from fido_tx import errors
from fido_tx.timefmt import utc_now_iso


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Message:
    """One fetched message, exactly as the server sent it."""

    account: str
    mailbox: str
    uidvalidity: int
    uid: int
    raw: bytes = attr.ib(repr=False)
    message_id: str = ""
    fetched_at: str = attr.ib(factory=utc_now_iso)

    @property
    def size(self):
        return len(self.raw)

    def fields(self):
        """The stream entry's fields, in the contract's order, as bytes."""
        return [
            b"account", self.account.encode("utf-8"),
            b"mailbox", self.mailbox.encode("utf-8"),
            b"uidvalidity", str(self.uidvalidity).encode("ascii"),
            b"uid", str(self.uid).encode("ascii"),
            b"message_id", self.message_id.encode("utf-8", "surrogateescape"),
            b"size", str(len(self.raw)).encode("ascii"),
            b"fetched_at", self.fetched_at.encode("ascii"),
            b"raw", self.raw,
        ]


class IMessageSink(Interface):
    """Stores messages exactly once per (account, mailbox, uidvalidity, uid)."""

    def filter_new(account_id, mailbox, uidvalidity, uids):
        """
        Which of ``uids`` are not stored yet.

        :return: Deferred firing with a list of the UIDs (ints) that are not
            stored, in the order given.  Errbacks with a
            :class:`~fido_tx.errors.FidoError` of kind ``redis`` when the sink
            cannot answer (the caller then fetches nothing).
        """

    def store(messages):
        """
        Store a batch of messages atomically per message, deduplicated.

        :param messages: a sequence of :class:`Message` of one account.
        :return: Deferred firing with the list of UIDs that are now confirmed
            (newly stored, or stored before: both may be marked on the server).
            Errbacks with a ``redis`` :class:`~fido_tx.errors.FidoError` when
            nothing can be confirmed; then nothing may be marked.
        """


@implementer(IMessageSink)
class MemorySink:
    """An in-memory sink for tests, with switchable failure.

    ``entries`` is the list of stored messages in order; ``fail`` set to an
    exception makes every call errback with it (a Redis outage).
    """

    def __init__(self):
        self.entries = []
        self._keys = set()
        self.fail = None
        self.calls = []

    def _key(self, account, mailbox, uidvalidity, uid):
        return (account, mailbox, uidvalidity, uid)

    def filter_new(self, account_id, mailbox, uidvalidity, uids):
        self.calls.append(("filter_new", account_id, tuple(uids)))
        if self.fail is not None:
            return defer.fail(self.fail)
        return defer.succeed(
            [u for u in uids if self._key(account_id, mailbox, uidvalidity, u) not in self._keys]
        )

    def store(self, messages):
        self.calls.append(("store", tuple(m.uid for m in messages)))
        if self.fail is not None:
            return defer.fail(self.fail)
        confirmed = []
        for m in messages:
            key = self._key(m.account, m.mailbox, m.uidvalidity, m.uid)
            if key not in self._keys:
                self._keys.add(key)
                self.entries.append(m)
            confirmed.append(m.uid)
        return defer.succeed(confirmed)


def redis_down(message="Redis is unreachable"):
    """The error a sink raises when it cannot confirm anything."""
    return errors.FidoError(errors.REDIS, message)
