"""One timer for the deadlines of every Redis command of a connection.

Every command has the same deadline (``command_timeout`` after it is
issued), so deadlines come in the order commands are issued: they wait in a
queue, and ONE timer, set for the oldest, wakes up to cancel what is
overdue and is set again for the next.  ``Deferred.addTimeout`` per command
armed and cancelled a ``DelayedCall`` each, with two callbacks more
(~18 us a command under load, ``bench/README`` "The Redis side").  A command
answered in time stays in the queue until the timer passes it (a few
thousand entries at most, for a few seconds).
"""

from collections import deque


class Deadlines:
    """Cancels each tracked Deferred still unfired ``timeout`` seconds after
    :meth:`track`, calling its ``on_timeout()`` first."""

    def __init__(self, clock, timeout):
        self._clock = clock
        self.timeout = timeout
        self._queue = deque()
        self._timer = None

    def track(self, d, on_timeout):
        """Watch ``d``; return it."""
        self._queue.append((self._clock.seconds() + self.timeout, d, on_timeout))
        if self._timer is None:
            self._timer = self._clock.callLater(self.timeout, self._expire)
        return d

    def _expire(self):
        self._timer = None
        now = self._clock.seconds()
        queue = self._queue
        while queue:
            deadline, d, on_timeout = queue[0]
            if d.called and not d.paused:  # done (paused: waiting on another)
                queue.popleft()
                continue
            if deadline > now:
                break
            queue.popleft()
            on_timeout()
            d.cancel()
        while queue and queue[0][1].called and not queue[0][1].paused:
            queue.popleft()
        if queue:
            self._timer = self._clock.callLater(max(0.0, queue[0][0] - now), self._expire)

    def __len__(self):
        return len(self._queue)

    def stop(self):
        """Cancel the timer (the Deferreds are failed by their connection)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._queue.clear()
