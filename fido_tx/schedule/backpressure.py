"""Backpressure: stop fetching while the importer is behind.

While a delivery's queue (the stream, the list) holds more than
``max_backlog`` entries, the scheduler is paused (reason ``"backlog"`` for
the default delivery, ``"backlog:<name>"`` for another): mail stays on the
servers, where it is safe.  The sink (an :class:`~fido_tx.interfaces.IBacklog`)
knows its queue's length after every delivery at no extra cost;
while paused, the length is read again every ``check_interval`` seconds (there
is no event for "the importer trimmed the stream"), and fetching resumes once
it is at or below the limit.
"""

from twisted.internet import task
from twisted.logger import Logger

log = Logger()


class Backpressure:
    """:param backlog: an :class:`~fido_tx.interfaces.IBacklog`.
    :param scheduler: has ``pause(reason)``/``resume(reason)``
        (:class:`~fido_tx.interfaces.ISchedulerView`)."""

    reason = "backlog"

    def __init__(self, clock, backlog, scheduler, max_backlog, on_change=None, check_interval=5.0,
                 reason=None):
        self._clock = clock
        self._backlog = backlog
        if reason is not None:
            self.reason = reason
        self._scheduler = scheduler
        self._max = max_backlog
        self._on_change = on_change or (lambda paused, length: None)
        self._interval = check_interval
        self._loop = None
        self.paused = False

    def after_session(self, account, result):
        """A result observer: look at the length the last append returned."""
        length = self._backlog.last_length
        if length is not None:
            self.observe(length)

    def observe(self, length):
        if self.paused or length <= self._max:
            return
        self.paused = True
        log.warn(
            "Redis {what} holds {length} entries, over max_backlog {max_backlog}: "
            "fetching paused until the importer catches up (mail stays on the servers)",
            length=length, max_backlog=self._max, what=self._what(),
        )
        self._scheduler.pause(self.reason)
        self._on_change(True, length)
        self._loop = task.LoopingCall(self._check)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False)

    def _check(self):
        d = self._backlog.backlog()
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
            "Redis {what} down to {length} entries (max_backlog {max_backlog}): fetching resumed",
            length=length, max_backlog=self._max, what=self._what(),
        )
        self._scheduler.resume(self.reason)
        self._on_change(False, length)

    def _what(self):
        name = self.reason.partition(":")[2]
        return f"queue of delivery {name}" if name else "stream"

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
