"""Spread the start of many sessions over reactor turns.

Starting a session (the connect, name resolution, TLS set-up) costs about a
millisecond of the reactor thread.  When thousands start at once (the first
round after a start with many workers, a mass retry) they would all run in
one callback: the reactor stalls for seconds and every open connection waits.
:class:`StartPacer` lets at most ``per_turn`` sessions through per reactor
turn, in arrival order; the others wait for a later turn, with the network
handled in between.
"""

import collections

from twisted.internet import defer

__all__ = ["StartPacer"]


class StartPacer:
    """At most ``per_turn`` :meth:`wait` calls fire per reactor turn, FIFO."""

    def __init__(self, clock, per_turn=25):
        if per_turn < 1:
            raise ValueError("per_turn must be at least 1")
        self._clock = clock
        self.per_turn = per_turn
        self._queue = collections.deque()
        self._call = None

    @property
    def waiting(self):
        return len(self._queue)

    def wait(self):
        """A Deferred that fires (with ``None``) in a later reactor turn.

        Cancelling it withdraws the caller from the queue.
        """

        def cancel(d):
            try:
                self._queue.remove(d)
            except ValueError:
                pass

        d = defer.Deferred(cancel)
        self._queue.append(d)
        if self._call is None:
            self._call = self._clock.callLater(0, self._turn)
        return d

    def _turn(self):
        self._call = None
        for _ in range(min(self.per_turn, len(self._queue))):
            self._queue.popleft().callback(None)
        if self._queue and self._call is None:
            self._call = self._clock.callLater(0, self._turn)
