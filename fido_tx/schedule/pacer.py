"""Spread the start of many sessions over reactor turns.

Starting a session (the connect, name resolution, TLS set-up) costs about a
millisecond of the reactor thread.  When thousands start at once (the first
round after a start with many workers, a mass retry) they would all run in
one callback: the reactor stalls for seconds and every open connection waits.
:class:`StartPacer` lets at most ``per_turn`` sessions through per pacer
turn, in arrival order; the others wait for a later turn, with the network
handled in between.

A pacer turn ends with the pacer's own ``callLater(0)``, armed only once
``per_turn`` starts have gone through since the last one: a daemon whose
sessions start one or a few at a time (the steady state: a worker frees up,
the next account starts) lets them through at once, in the caller's turn,
and arms one timer per ``per_turn`` starts instead of one per start (each
``callLater(0)`` is a reactor iteration).  In one reactor turn at most
``2 * per_turn`` start: those let through before the pacer's turn ran in it
and those it lets through.
"""

import collections

from twisted.internet import defer

__all__ = ["StartPacer"]


class StartPacer:
    """At most ``per_turn`` :meth:`wait` calls fire per pacer turn, FIFO."""

    def __init__(self, clock, per_turn=25):
        if per_turn < 1:
            raise ValueError("per_turn must be at least 1")
        self._clock = clock
        self.per_turn = per_turn
        self._queue = collections.deque()
        self._call = None
        #: starts let through since the pacer's last turn
        self._through = 0

    @property
    def waiting(self):
        return len(self._queue)

    def wait(self):
        """A Deferred that fires (with ``None``) now if fewer than
        ``per_turn`` starts went through since the pacer's last turn and
        nobody waits, else in a later reactor turn.

        Cancelling it withdraws the caller from the queue.
        """
        if not self._queue and self._through < self.per_turn:
            self._through += 1
            return defer.succeed(None)

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
        n = min(self.per_turn, len(self._queue))
        self._through = n
        for _ in range(n):
            self._queue.popleft().callback(None)
        if self._queue and self._call is None:
            self._call = self._clock.callLater(0, self._turn)
