"""Shared poll ticks: held connections' periodic checks due on one grid, so
that many accounts' checks go out in one reactor turn.

On a machine like ours what costs CPU is the number of times the process
leaves ``epoll_wait`` on its own, not the Python work per event: 300 held
connections each polled by its own timer cost 0.74 ms of CPU per poll, the
same polls sent together in one turn 0.11 ms (bench/README.rst, "Held
connections").  :class:`PollTicker` rounds the due time of a check *down* to
a multiple of ``quantum`` seconds and keeps one ``DelayedCall`` per occupied
tick (not one per account): every account due on a tick is called in the
same reactor turn, their commands leave together and their answers come
back together.

- A check comes at most one quantum early, never late: ``poll_interval``
  stays the longest an account goes without one.  An account that polls
  every ``poll_interval`` (a multiple of the quantum) keeps its place on
  the grid; accounts keep the spread their start times gave them.
- ``quantum`` 0 turns it off: every call is the clock's own ``callLater``.
- It offers ``seconds()`` and ``callLater()``, so it stands in for the clock
  where only the check's timer should be rounded (``task.deferLater``,
  :class:`~fido_tx.sources.imap.idle.Idle`'s refresh).  Cancelling the
  last call of a tick cancels its ``DelayedCall``.
"""

import math

from twisted.logger import Logger

_log = Logger()

#: a time within this fraction of a quantum below a tick counts as on it
#: (``now + (tick - now)`` is not always ``tick`` in floating point)
_SLACK = 1e-6


class TickCall:
    """One call waiting for its tick (the part of ``IDelayedCall`` used here)."""

    __slots__ = ("_ticker", "_tick", "_f", "_args", "_kw", "_state")

    def __init__(self, ticker, tick, f, args, kw):
        self._ticker = ticker
        self._tick = tick
        self._f = f
        self._args = args
        self._kw = kw
        self._state = None  # None: waiting; "called"; "cancelled"

    def getTime(self):
        return self._ticker.at(self._tick)

    def active(self):
        return self._state is None

    def cancel(self):
        if self._state is not None:
            from twisted.internet import error

            raise (error.AlreadyCalled if self._state == "called"
                   else error.AlreadyCancelled)()
        self._state = "cancelled"
        self._ticker._forget(self)

    def _run(self):
        self._state = "called"
        f, args, kw = self._f, self._args, self._kw
        self._f = self._args = self._kw = None
        f(*args, **kw)


class PollTicker:
    """Calls due on a shared grid of ``quantum`` seconds; see the module
    docstring.

    :param clock: ``IReactorTime``.
    :param quantum: seconds between ticks (0: no grid, the clock's timers).
    """

    def __init__(self, clock, quantum=1.0):
        if quantum < 0:
            raise ValueError(f"quantum must be >= 0, got {quantum!r}")
        self.clock = clock
        self.quantum = float(quantum)
        #: tick number -> (DelayedCall, {TickCall: None} in arrival order)
        self._ticks = {}

    # -- the grid --------------------------------------------------------------

    def tick_of(self, when):
        """The number of the last tick at or before ``when``."""
        return math.floor(when / self.quantum + _SLACK)

    def at(self, tick):
        """Clock seconds of tick number ``tick``."""
        return tick * self.quantum

    def grid(self, when):
        """``when`` rounded down to the grid (itself without a grid)."""
        if not self.quantum:
            return when
        return self.at(self.tick_of(when))

    def until(self, when):
        """Seconds from now to ``when`` on the grid; 0 once that tick came."""
        left = self.grid(when) - self.clock.seconds()
        return left if left > self.quantum * _SLACK else 0.0

    @property
    def pending(self):
        """Calls waiting, over all ticks."""
        return sum(len(calls) for _, calls in self._ticks.values())

    @property
    def occupied(self):
        """Ticks with a call waiting (one ``DelayedCall`` each)."""
        return len(self._ticks)

    # -- the clock's part ------------------------------------------------------

    def seconds(self):
        return self.clock.seconds()

    def callLater(self, delay, f, *args, **kw):
        """Call ``f`` on the last tick at or before ``delay`` seconds from now;
        if that tick has passed (the time is within the current quantum),
        after exactly ``delay`` on the clock: a wait that is not on the grid
        (a token's renewal, a ``Retry-After``) is cut at most once, never
        into a loop of early wake-ups."""
        now = self.clock.seconds()
        delay = max(0.0, delay)
        if not self.quantum:
            return self.clock.callLater(delay, f, *args, **kw)
        tick = self.tick_of(now + delay)
        if self.at(tick) < now and delay > 0:
            return self.clock.callLater(delay, f, *args, **kw)
        call = TickCall(self, tick, f, args, kw)
        entry = self._ticks.get(tick)
        if entry is None:
            timer = self.clock.callLater(max(0.0, self.at(tick) - now), self._fire, tick)
            entry = self._ticks[tick] = (timer, {})
        entry[1][call] = None
        return call

    # -- inside ----------------------------------------------------------------

    def _forget(self, call):
        entry = self._ticks.get(call._tick)
        if entry is None:
            return
        timer, calls = entry
        calls.pop(call, None)
        if not calls:
            del self._ticks[call._tick]
            if timer.active():
                timer.cancel()

    def _fire(self, tick):
        _, calls = self._ticks.pop(tick, (None, {}))
        for call in list(calls):
            if not call.active():
                continue
            try:
                call._run()
            except Exception:
                _log.failure("poll tick: a scheduled check failed")
