"""Fakes of Fido's interfaces, shipped beside them (txacme's ``testing.py``,
treq's ``StubTreq``): every test, ours or a user's, uses the same
well-behaved doubles, each checked against its interface with
``verifyObject`` like the real object.
"""

from twisted.internet import defer
from zope.interface import implementer

from fido_tx.interfaces import ISink
from fido_tx.sinks.message import Delivery


@implementer(ISink)
class MemorySink:
    """An in-memory sink with switchable failure.

    ``entries`` is the list of delivered messages in order; ``fail`` set to
    an exception makes every call errback with it (an outage); ``reject`` a
    set of message ids the "application" refuses for good.
    """

    kind = "memory"

    def __init__(self):
        self.entries = []
        self._keys = set()
        self.fail = None
        self.reject = set()
        self.calls = []

    def filter_new(self, account_id, mailbox, epoch, ids):
        self.calls.append(("filter_new", account_id, tuple(ids)))
        if self.fail is not None:
            return defer.fail(self.fail)
        return defer.succeed(
            [i for i in ids if (account_id, mailbox, epoch, i) not in self._keys]
        )

    def deliver(self, messages):
        self.calls.append(("deliver", tuple(m.id for m in messages)))
        if self.fail is not None:
            return defer.fail(self.fail)
        confirmed, new, rejected = [], [], []
        for m in messages:
            if m.id in self.reject:
                rejected.append(m.id)
                continue
            key = (m.account, m.mailbox, m.epoch, m.id)
            if key not in self._keys:
                self._keys.add(key)
                self.entries.append(m)
                new.append(m.id)
            confirmed.append(m.id)
        return defer.succeed(Delivery(tuple(confirmed), tuple(new), tuple(rejected)))
