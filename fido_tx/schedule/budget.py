"""A byte budget shared by every mailbox session: bounds message bodies in flight.

Each session fetches a batch of bodies, hands it to the sink and drops it.
With ``workers`` sessions at once the bodies held at one moment grow with
``workers`` (every session may hold a whole batch, and the sink's encoding
of it).  :class:`ByteBudget` caps that: a session asks for the batch's size
(by ``RFC822.SIZE``) before its ``UID FETCH`` and gives it back once the
sink has confirmed the batch.

Grants are first come, first served: a large request at the head of the
queue is not overtaken by smaller ones behind it (it would starve).  A
request larger than the whole budget is granted when nothing else is in
flight, so one large message still runs, alone.
"""

import collections

from twisted.internet import defer

__all__ = ["ByteBudget", "Grant"]


class Grant:
    """Bytes held from a :class:`ByteBudget`; :meth:`release` gives them back
    (once; later calls do nothing)."""

    __slots__ = ("_budget", "nbytes")

    def __init__(self, budget, nbytes):
        self._budget = budget
        self.nbytes = nbytes

    def release(self):
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._release(self.nbytes)


class ByteBudget:
    """At most ``limit`` bytes granted at once (see the module docstring).

    :ivar in_use: bytes granted and not yet released.
    :ivar peak: the largest ``in_use`` seen.
    """

    def __init__(self, limit):
        if limit <= 0:
            raise ValueError("limit must be positive")
        self.limit = int(limit)
        self.in_use = 0
        self.peak = 0
        self._waiting = collections.deque()  # (nbytes, Deferred)

    @property
    def waiting(self):
        """Requests not granted yet."""
        return len(self._waiting)

    def acquire(self, nbytes):
        """A Deferred firing with a :class:`Grant` of ``nbytes`` (>= 0).

        Cancelling the Deferred withdraws the request.
        """
        nbytes = max(0, int(nbytes))

        def cancel(d):
            try:
                self._waiting.remove(entry)
            except ValueError:
                pass
            self._grant_waiting()  # a big request at the head may have gone

        d = defer.Deferred(cancel)
        entry = (nbytes, d)
        self._waiting.append(entry)
        self._grant_waiting()
        return d

    def _fits(self, nbytes):
        return self.in_use == 0 or self.in_use + nbytes <= self.limit

    def _grant_waiting(self):
        while self._waiting and self._fits(self._waiting[0][0]):
            nbytes, d = self._waiting.popleft()
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
            d.callback(Grant(self, nbytes))

    def _release(self, nbytes):
        self.in_use -= nbytes
        self._grant_waiting()
