"""Held sessions waiting for a worker slot, first come, first served.

A held connection (IDLE) occupies no slot while it waits; when it has mail
again it asks for one (``SessionHandle.take_slot``) and waits here.  Waiting
sessions go before any new session: they have mail waiting.
"""

import collections

from twisted.internet import defer

__all__ = ["SlotWaiters"]


class SlotWaiters:
    """The queue of ``(session, Deferred)`` asking for a slot."""

    def __init__(self):
        self._waiting = collections.deque()

    def __len__(self):
        return len(self._waiting)

    def wait(self, session):
        """A Deferred that fires when :meth:`grant` gives ``session`` a slot;
        cancelling it withdraws the request."""

        def withdraw(d):
            try:
                self._waiting.remove((session, d))
            except ValueError:
                pass

        d = defer.Deferred(withdraw)
        self._waiting.append((session, d))
        return d

    def grant(self, can_start, take_slot):
        """Give slots in order while ``can_start()``; ``take_slot(session)``
        is False for a session that no longer needs one (it ended)."""
        while self._waiting and can_start():
            session, d = self._waiting.popleft()
            if take_slot(session):
                d.callback(None)
