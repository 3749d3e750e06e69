"""Messages fetched per minute over the last hour, in memory.

A ring of ``minutes`` counters indexed by the minute number: adding is O(1),
reading the series O(minutes); nothing grows with time or with accounts.
:meth:`PerMinute.record` is a scheduler result observer.
"""


class PerMinute:
    def __init__(self, clock, minutes=60):
        self._clock = clock
        self.minutes = minutes
        self._counts = [0] * minutes
        #: the minute number each slot holds
        self._stamps = [None] * minutes

    def add(self, count, when=None):
        minute = int((self._clock.seconds() if when is None else when) // 60)
        slot = minute % self.minutes
        if self._stamps[slot] != minute:
            self._stamps[slot] = minute
            self._counts[slot] = 0
        self._counts[slot] += count

    def record(self, account, result):
        """The scheduler's result observer: counts ``result.fetched``."""
        if result.fetched and not result.dry_run:
            self.add(result.fetched)

    def series(self):
        """``[(minute start in clock seconds, count), ...]``, oldest first,
        ending with the current minute; minutes without messages count 0."""
        now = int(self._clock.seconds() // 60)
        out = []
        for minute in range(now - self.minutes + 1, now + 1):
            slot = minute % self.minutes
            out.append((minute * 60, self._counts[slot] if self._stamps[slot] == minute else 0))
        return out
