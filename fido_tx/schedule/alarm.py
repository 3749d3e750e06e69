"""One timer kept at a due time: moved when the time changes, gone when nothing is due.

The scheduler has no polling loop: it dispatches when the earliest due
account comes due, through this one ``clock.callLater``, moved (not
re-created) as the earliest due time changes, and cancelled while paused,
stopped, saturated or empty.
"""

__all__ = ["Alarm"]


class Alarm:
    """Calls ``fire()`` on ``clock`` at the time last given to :meth:`at`."""

    def __init__(self, clock, fire):
        self._clock = clock
        self._fire = fire
        self._call = None
        self._due = None

    @property
    def due(self):
        """Clock seconds it goes off at, None when it is off."""
        return self._due

    def at(self, due):
        """Go off at clock seconds ``due`` (at once when past); None: off."""
        if due is None:
            if self._call is not None:
                self._call.cancel()
                self._call = None
                self._due = None
            return
        if self._call is not None and self._due == due:
            return
        delay = max(0.0, due - self._clock.seconds())
        if self._call is not None:
            self._call.reset(delay)
        else:
            self._call = self._clock.callLater(delay, self._went_off)
        self._due = due

    def _went_off(self):
        self._call = None
        self._due = None
        self._fire()
