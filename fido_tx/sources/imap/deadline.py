"""The timers of one IMAP connection: a command deadline and a literal rate check.

:class:`Deadline` is one deadline and at most one pending ``DelayedCall`` per
connection.  A timer cancelled and created per command, and reset per chunk
of every literal, was a reactor heap operation each time; now arming and
progress only move the deadline, and the call, when it fires early, waits
for the rest.

:class:`LiteralRate` checks, every ``interval`` seconds while a large literal
arrives, that at least ``minimum`` bytes/s came in.
"""


class Deadline:
    """Calls ``expired(what, seconds)`` after ``seconds`` without progress.

    :meth:`arm` starts (or restarts) the wait, :meth:`progress` restarts it
    from now with the same length, :meth:`disarm` stops waiting (a pending
    call then finds nothing to do), :meth:`cancel` drops the call too.
    """

    __slots__ = ("clock", "expired", "_call", "_at", "seconds", "what")

    def __init__(self, clock, expired):
        self.clock = clock
        self.expired = expired
        self._call = None
        self._at = None
        self.seconds = None
        self.what = ""

    def arm(self, seconds, what):
        self.seconds = seconds
        self.what = what
        self._at = at = self.clock.seconds() + seconds
        call = self._call
        if call is None or not call.active():
            self._call = self.clock.callLater(seconds, self._fired)
        elif call.getTime() > at:  # sooner than the pending call
            # cancelled and scheduled anew: DelayedCall.reset() to a sooner
            # time searches the reactor's heap linearly, and with thousands
            # of held connections (each with a timer minutes ahead) every
            # command after an IDLE did that: stopping 10,000 took 5 minutes
            call.cancel()
            self._call = self.clock.callLater(seconds, self._fired)

    @property
    def armed(self):
        """Whether a deadline is set (a pending call alone is not one)."""
        return self._at is not None

    def disarm(self):
        self._at = None

    def progress(self):
        if self._at is not None:
            self._at = self.clock.seconds() + self.seconds

    def cancel(self):
        """The connection is over: nothing may keep it alive or fire later."""
        self._at = None
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fired(self):
        self._call = None
        at = self._at
        if at is None:
            return
        now = self.clock.seconds()
        if now < at:
            self._call = self.clock.callLater(at - now, self._fired)
            return
        self._at = None
        self.expired(self.what, self.seconds)


class LiteralRate:
    """Calls ``too_slow(rate)`` when a literal arrives slower than ``minimum``
    bytes/s, measured over windows of ``interval`` seconds.

    Started only for a literal larger than one window at the minimum rate
    (a smaller one is covered by the command deadline).
    """

    __slots__ = ("clock", "minimum", "interval", "too_slow", "window", "paused", "_call")

    def __init__(self, clock, minimum, interval, too_slow):
        self.clock = clock
        self.minimum = minimum
        self.interval = interval
        self.too_slow = too_slow
        #: bytes received in the current window
        self.window = 0
        #: while set (Fido itself stopped reading), a due check does nothing
        self.paused = False
        self._call = None

    def start(self, size):
        self.window = 0
        if size > self.minimum * self.interval:
            self._call = self.clock.callLater(self.interval, self._check)

    def stop(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _check(self):
        self._call = None
        if self.paused:  # the owner starts a fresh window when it reads again
            return
        rate = self.window / self.interval
        if rate < self.minimum:
            self.too_slow(rate)
            return
        self.window = 0
        self._call = self.clock.callLater(self.interval, self._check)
