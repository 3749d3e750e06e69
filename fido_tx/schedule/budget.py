"""A byte budget shared by every mailbox session: message bodies in flight, charged as they arrive.

Each session fetches a batch of bodies, hands it to the sink and drops it;
with ``workers`` sessions at once the bodies held could grow with
``workers``.  :class:`ByteBudget` caps them at ``limit`` bytes
(``[imap] max_inflight_bytes``), counted by what the servers SEND, not by
what they claim (RFC822.SIZE): a server claiming 50 MiB and trickling bytes
holds only what has arrived.

A session opens a :class:`Grant` before its ``UID FETCH`` (:meth:`ByteBudget.open`,
a small first reservation, first come first served) and attaches it to the
connection (:meth:`Grant.attach`); the reader calls :meth:`Grant.charge`
with every chunk of literal bytes.  A grant keeps ``read_ahead`` bytes
reserved beyond what has arrived (one transport read: 64 KiB), so a read
always fits in it; when it runs low the grant grows by ``step`` at once if
the budget has room, else the connection is paused
(``budget_pause``/``budget_resume`` on the attached protocol) until bytes
are released.  Bodies in memory are therefore at most the reservations,
which stay within ``limit`` -- except the elder's overdraft, below.

Fairness and progress:

- a session's reservation stays within its ``share`` (``limit / 4``): one
  session (a slow liar) cannot take the whole budget while others wait;
- requests within the share are served first come, first served (no
  overtaking: a waiting request is not starved by later ones);
- the **elder** (the oldest open grant) is never paused: what it needs
  beyond its share or beyond the free room is granted as *overdraft*, over
  the limit (:attr:`ByteBudget.overdrawn`), bounded by that grant's
  ``ceiling`` (its batch's literal bound).  A message larger than the share
  goes through when its session is the elder, as a large one did "alone"
  before, and N sessions each paused on a partial literal never deadlock:
  the elder always completes and releases, and the next oldest becomes the
  elder.  A grant waiting for elderhood does not block the others.

Bytes come back when the sink has confirmed the batch (:meth:`Grant.release`,
as before) or when the session ends or is cancelled (the poll releases in a
``finally``); :meth:`Grant.settle` gives back the unused read-ahead once the
``UID FETCH`` is complete.  The hot path, :meth:`Grant.charge`, is an add and
a compare per chunk; it never makes a Deferred.
"""

import collections

from twisted.internet import defer

__all__ = ["ByteBudget", "Grant", "READ_AHEAD", "STEP", "SHARE_DIVISOR"]

#: bytes a grant keeps reserved beyond what has arrived: one transport read
#: (Twisted's TCP reads 64 KiB at most), so the bytes of a read always fit
READ_AHEAD = 64 * 1024
#: what a grant grows by when its read-ahead runs low
STEP = 64 * 1024
#: a session's share of the budget: limit / SHARE_DIVISOR
SHARE_DIVISOR = 4

_NEVER = float("inf")


class Grant:
    """Bytes held from a :class:`ByteBudget` by one batch.

    :ivar nbytes: bytes reserved (``over`` of them as overdraft).
    :ivar used: bytes charged (arrived) so far.
    :ivar ceiling: the most this batch can need (``None``: unbounded).
    :ivar paused: the connection is paused, waiting for the budget.
    """

    __slots__ = ("_budget", "nbytes", "used", "over", "ceiling", "paused", "producer",
                 "_mark", "_d")

    def __init__(self, budget, nbytes, ceiling=None):
        self._budget = budget
        self.nbytes = nbytes
        self.used = 0
        self.over = 0
        self.ceiling = ceiling
        self.paused = False
        self.producer = None
        self._mark = _NEVER
        self._d = None

    def attach(self, producer, ceiling=None):
        """Charge the literal bytes ``producer`` (a
        :class:`~fido_tx.sources.imap.client.FidoIMAP4Client`) reads from
        now on (``producer.meter``), pausing it when the budget is full;
        ``ceiling``: the most the batch can need (its literal bound)."""
        if ceiling is not None:
            self.ceiling = ceiling
        self.producer = producer
        producer.meter = self
        self._set_mark()

    def charge(self, n):
        """``n`` literal bytes arrived (the reader's hot path)."""
        self.used += n
        if self.used > self._mark:
            budget = self._budget
            if budget is not None:
                budget._more(self)

    def settle(self):
        """The batch's bytes have all arrived: give back the unused
        reservation (the bodies themselves stay held until :meth:`release`)."""
        budget = self._budget
        self._detach()
        if budget is not None:
            budget._shrink(self, max(0, self.nbytes - self.used))

    def release(self):
        """Give everything back (once; later calls do nothing)."""
        self._detach()
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._release(self)

    def _detach(self):
        if self.paused and self._budget is not None:
            self._budget._unpause(self)  # its FETCH ended while it was paused
        producer, self.producer = self.producer, None
        self._mark = _NEVER
        if producer is not None and getattr(producer, "meter", None) is self:
            producer.meter = None

    def _set_mark(self):
        """Charges beyond the mark ask for more: the read-ahead ran low."""
        budget = self._budget
        if self.producer is None or budget is None:
            self._mark = _NEVER
        elif self.ceiling is not None and self.nbytes >= self.ceiling:
            self._mark = _NEVER  # all it can need is reserved
        else:
            self._mark = self.nbytes - budget.read_ahead

    def _need(self):
        """Bytes to add to the reservation: read-ahead plus a step beyond
        what arrived, never over the ceiling."""
        budget = self._budget
        want = self.used + budget.read_ahead + budget.step
        if self.ceiling is not None:
            want = min(want, self.ceiling)
        return max(0, want - self.nbytes)


class ByteBudget:
    """At most ``limit`` bytes reserved at once, plus the elder's overdraft
    (see the module docstring).

    :ivar in_use: bytes reserved and not yet released (overdraft included).
    :ivar overdrawn: the part of ``in_use`` over the limit (the elder's).
    :ivar peak: the largest ``in_use`` seen.
    :ivar peak_within: the largest ``in_use - overdrawn`` seen (at most
        ``limit``, but for a first grant larger than it).
    :ivar pauses: how many times a connection was paused for the budget.
    :ivar forced: bytes that arrived beyond a grant's reservation (a read
        larger than ``read_ahead``: none with Twisted's TCP), counted anyway.
    """

    def __init__(self, limit, share=None, read_ahead=READ_AHEAD, step=STEP):
        if limit <= 0:
            raise ValueError("limit must be positive")
        self.limit = int(limit)
        self.read_ahead = int(read_ahead)
        self.step = int(step)
        if share is None:
            share = max(self.limit // SHARE_DIVISOR,
                        min(self.limit, self.read_ahead + self.step))
        self.share = int(share)
        self.in_use = 0
        self.overdrawn = 0
        self.peak = 0
        self.peak_within = 0
        self.pauses = 0
        self.forced = 0
        #: grants and admissions waiting for room within the limit, in order
        self._waiting = collections.deque()
        #: grants paused at their share: they wait to become the elder
        self._elder_wait = set()
        #: open grants, oldest first (the first is the elder)
        self._holders = collections.OrderedDict()
        self._serial = 0

    @property
    def waiting(self):
        """Requests not granted yet (admissions and paused connections)."""
        return len(self._waiting) + len(self._elder_wait)

    @property
    def holders(self):
        """Open grants."""
        return len(self._holders)

    @property
    def first(self):
        """What :meth:`open` reserves at most up front."""
        return min(self.read_ahead + self.step, self.share)

    def open(self, claimed):
        """A Deferred firing with a :class:`Grant` of the first bytes of a
        batch whose bodies claim ``claimed`` bytes: ``min(claimed,``
        :attr:`first` ``)``; the rest is charged as it arrives."""
        return self.acquire(min(max(0, int(claimed)), self.first))

    def acquire(self, nbytes):
        """A Deferred firing with a :class:`Grant` of ``nbytes`` (>= 0),
        first come, first served; granted when it fits within the limit, or
        when no grant is open (a larger one then runs as the elder, its
        excess overdraft).

        Cancelling the Deferred withdraws the request.
        """
        grant = Grant(self, max(0, int(nbytes)))

        def cancel(d):
            try:
                self._waiting.remove(grant)
            except ValueError:
                pass
            grant._budget = None
            self._serve()  # a big request at the head may have gone

        grant._d = defer.Deferred(cancel)
        d = grant._d
        self._waiting.append(grant)
        self._serve()
        return d

    # -- inside ------------------------------------------------------------

    def _within(self):
        return self.in_use - self.overdrawn

    def _add(self, grant, within, over=0):
        grant.nbytes += within + over
        grant.over += over
        self.in_use += within + over
        self.overdrawn += over
        if self.in_use > self.peak:
            self.peak = self.in_use
        if within and self.in_use - self.overdrawn > self.peak_within:
            self.peak_within = self.in_use - self.overdrawn

    def _elder(self):
        return next(iter(self._holders)) if self._holders else None

    def _more(self, grant):
        """``grant``'s read-ahead ran low (or bytes arrived beyond it)."""
        if grant.used > grant.nbytes:  # a read larger than the read-ahead:
            self.forced += grant.used - grant.nbytes  # the bytes are here
            self._add(grant, grant.used - grant.nbytes)
        if grant.paused:
            return  # the rest of a read that arrived before the pause took
        if grant is self._elder():
            self._give_elder(grant, grant._need())
            return
        n = self._within_share(grant)
        if n and not self._waiting and self._within() + n <= self.limit:
            self._grow(grant, n)
        elif grant._need() == 0:
            grant._set_mark()
        else:
            self._pause(grant, at_share=n == 0)

    def _grow(self, grant, n):
        """Add ``n`` within ``grant``'s share; short of a read ahead (its
        share reached), it waits to be the elder."""
        self._add(grant, n)
        grant._set_mark()
        if grant.used > grant._mark:
            self._pause(grant, at_share=True)
            return False
        return True

    def _within_share(self, grant):
        """What ``grant`` may still add within its share (0: it is at it)."""
        return max(0, min(grant._need(), self.share - (grant.nbytes - grant.over)))

    def _give_elder(self, grant, n):
        """The elder is never paused: free room within its share first,
        the rest as overdraft."""
        room = min(self.limit - self._within(), self.share - (grant.nbytes - grant.over))
        within = max(0, min(n, room)) if not self._waiting else 0
        self._add(grant, within, n - within)
        grant._set_mark()

    def _pause(self, grant, at_share):
        if at_share:
            self._elder_wait.add(grant)  # only elderhood lets it go on
        else:
            self._waiting.append(grant)
        if grant.paused:
            return  # moved from the queue to the elder's wait
        grant.paused = True
        self.pauses += 1
        producer = grant.producer
        if producer is not None:
            producer.budget_pause()

    def _resume(self, grant):
        grant.paused = False
        grant._set_mark()
        producer = grant.producer
        if producer is not None:
            producer.budget_resume()

    def _unpause(self, grant):
        """``grant`` stops waiting (its batch is complete, or it is released):
        its connection reads again."""
        if grant.paused:
            self._elder_wait.discard(grant)
            try:
                self._waiting.remove(grant)
            except ValueError:
                pass
            self._resume(grant)

    def _serve(self):
        """Grant what can be granted: the elder's wait, then the queue in order."""
        elder = self._elder()
        if elder is not None and elder.paused:
            self._elder_wait.discard(elder)
            try:
                self._waiting.remove(elder)
            except ValueError:
                pass
            self._give_elder(elder, elder._need())
            self._resume(elder)
        while self._waiting:
            grant = self._waiting[0]
            if grant._d is not None:  # an admission
                n = grant.nbytes
                if self._holders and self._within() + n > self.limit:
                    return
                self._waiting.popleft()
                grant.nbytes = 0
                alone = not self._holders
                self._serial += 1
                self._holders[grant] = self._serial
                within = n if not alone else min(n, self.limit)
                self._add(grant, within, n - within)
                d, grant._d = grant._d, None
                d.callback(grant)
                continue
            n = self._within_share(grant)
            if n and self._within() + n > self.limit:
                return
            self._waiting.popleft()
            if self._grow(grant, n):
                self._resume(grant)

    def _shrink(self, grant, n):
        over = min(n, grant.over)
        grant.over -= over
        grant.nbytes -= n
        self.in_use -= n
        self.overdrawn -= over
        self._serve()

    def _release(self, grant):
        self._unpause(grant)
        self._holders.pop(grant, None)
        self.in_use -= grant.nbytes
        self.overdrawn -= grant.over
        grant.nbytes = grant.over = 0
        self._serve()
