"""Backpressure: stop fetching while the importer is behind.

While the stream holds more than ``max_backlog`` entries, the scheduler is
paused (reason ``"backlog"``): mail stays on the servers, where it is safe.
The store reports the stream's length after every append at no extra cost;
while paused, the length is read again every ``check_interval`` seconds (there
is no event for "the importer trimmed the stream"), and fetching resumes once
it is at or below the limit.
"""

from twisted.internet import task
from twisted.logger import Logger

log = Logger()


class Backpressure:
    reason = "backlog"

    def __init__(self, clock, store, scheduler, max_backlog, on_change=None, check_interval=5.0):
        self._clock = clock
        self._store = store
        self._scheduler = scheduler
        self._max = max_backlog
        self._on_change = on_change or (lambda paused, length: None)
        self._interval = check_interval
        self._loop = None
        self.paused = False

    def after_session(self, account, result):
        """A result observer: look at the length the last append returned."""
        length = getattr(self._store, "last_stream_length", None)
        if length is not None:
            self.observe(length)

    def observe(self, length):
        if self.paused or length <= self._max:
            return
        self.paused = True
        log.warn(
            "Redis stream holds {length} entries, over max_backlog {max_backlog}: "
            "fetching paused until the importer catches up (mail stays on the servers)",
            length=length, max_backlog=self._max,
        )
        self._scheduler.pause(self.reason)
        self._on_change(True, length)
        self._loop = task.LoopingCall(self._check)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False)

    def _check(self):
        d = self._store.backlog()
        d.addCallback(self._checked)
        # A failed read (Redis down) keeps the pause; the store's own
        # connection state pauses the scheduler for that.  Never let the
        # LoopingCall die.
        d.addErrback(lambda f: None)
        return d

    def _checked(self, length):
        if length > self._max or not self.paused:
            return
        self.paused = False
        self._loop.stop()
        self._loop = None
        log.info(
            "Redis stream down to {length} entries (max_backlog {max_backlog}): fetching resumed",
            length=length, max_backlog=self._max,
        )
        self._scheduler.resume(self.reason)
        self._on_change(False, length)

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
