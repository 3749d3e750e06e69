"""One timer that turns a burst of file events into one load, bounded by a longest wait.

A burst of watcher events (create, write, close, rename) fires once,
``delay`` seconds after the last event, but at most ``max_wait`` seconds
after the first, so a file rewritten without pause is still loaded.  The
same timer also carries a retry (:meth:`Debouncer.schedule`): an event while
a retry waits turns it into a debounce.
"""

__all__ = ["Debouncer"]


class Debouncer:
    """Calls ``fire()`` on ``clock`` when a burst of :meth:`event` calls ends."""

    def __init__(self, clock, fire, delay, max_wait):
        self._clock = clock
        self._fire = fire
        self.delay = delay
        self.max_wait = max(max_wait, delay)
        self._pending = None
        self._burst_started = None

    @property
    def waiting(self):
        """A call of ``fire`` is scheduled."""
        return self._pending is not None

    def event(self):
        """Something changed: fire ``delay`` from now, unless the burst has
        lasted ``max_wait`` already."""
        now = self._clock.seconds()
        if self._pending is not None and self._pending.active():
            # A burst goes on (or a retry was waiting): push the call back,
            # but not past max_wait after the burst's first event.
            if self._burst_started is None:
                self._burst_started = now
            deadline = self._burst_started + self.max_wait
            self._pending.reset(max(0.0, min(self.delay, deadline - now)))
            return
        self.schedule(self.delay)
        self._burst_started = now

    def schedule(self, delay):
        """Fire ``delay`` seconds from now (a retry), replacing what waits."""
        self.cancel()
        self._pending = self._clock.callLater(delay, self._timer)

    def cancel(self):
        pending, self._pending = self._pending, None
        self._burst_started = None
        if pending is not None and pending.active():
            pending.cancel()

    def _timer(self):
        self._pending = None
        self._burst_started = None
        self._fire()
