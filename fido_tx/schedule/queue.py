"""The scheduler's queue of waiting accounts: a FIFO of new accounts in front
of a heap keyed by ``(due_time, sequence)``.

The most overdue account goes first, and accounts equally due go in the
order they joined the back of the queue (round robin).  New accounts go to
the front FIFO (latest addition first, in the order given within one
addition).  Removed or re-queued accounts are deleted lazily: their items
are skipped when they surface, and the heap is compacted when stale items
pile up, so every operation is O(log n).
"""

import collections
import heapq

from twisted.logger import Logger

from fido_tx.accounts.model import AccountsDiff
from fido_tx.schedule import backoff as _backoff

log = Logger(namespace="fido_tx.schedule.scheduler")

#: compact the heap when more than this many stale items and half of it
COMPACT_MIN = 1024

__all__ = ["DueQueue", "Entry", "apply_accounts", "by_id", "due_now", "requeue"]


class Entry:
    """Mutable bookkeeping for one account in the current set."""

    __slots__ = ("account", "state", "due", "seq", "front", "removed", "blocked", "started_at")

    def __init__(self, account, due):
        self.account = account
        self.state = _backoff.HEALTHY
        #: real due time (clock seconds); for a new account, when it was added
        self.due = due
        #: sequence number of its queue item; ``None`` when not queued
        self.seq = None
        #: queued in the front FIFO (new account) rather than the heap
        self.front = False
        self.removed = False
        self.blocked = False
        self.started_at = None


class DueQueue:
    """Waiting :class:`Entry` objects (see the module docstring)."""

    def __init__(self):
        #: new accounts, latest addition first: deque of (seq, entry)
        self._front = collections.deque()
        #: waiting accounts: heap of (due, seq, entry)
        self._heap = []
        self._stale = 0
        self._seq = 0

    def _next_seq(self):
        self._seq += 1
        return self._seq

    def push_front(self, entry):
        entry.seq = self._next_seq()
        entry.front = True
        self._front.appendleft((entry.seq, entry))

    def push_back(self, entry, due):
        """Queue ``entry`` (again) at ``due``; an older item of it goes stale."""
        if entry.seq is not None:
            self._stale += 1
        entry.due = due
        entry.seq = self._next_seq()
        entry.front = False
        heapq.heappush(self._heap, (due, entry.seq, entry))

    def discard(self, entry):
        """Take ``entry`` out (lazily)."""
        if entry.seq is not None:
            entry.seq = None
            self._stale += 1

    def peek_front(self):
        front = self._front
        while front:
            seq, entry = front[0]
            if entry.seq == seq and not entry.removed:
                return entry
            front.popleft()
            self._stale -= 1
        return None

    def peek_front_oldest(self):
        """The longest waiting new account (the right end: batches go in on the left)."""
        front = self._front
        while front:
            seq, entry = front[-1]
            if entry.seq == seq and not entry.removed:
                return entry
            front.pop()
            self._stale -= 1
        return None

    def peek_heap(self):
        heap = self._heap
        while heap:
            _, seq, entry = heap[0]
            if entry.seq == seq and not entry.removed:
                return entry
            heapq.heappop(heap)
            self._stale -= 1
        return None

    def earliest_due(self):
        """The earliest due time of a waiting account (``None``: none waits)."""
        dues = [e.due for e in (self.peek_front_oldest(), self.peek_heap()) if e is not None]
        return min(dues) if dues else None

    def peek(self):
        """The next account to run (front first), or ``None``."""
        entry = self.peek_front()
        if entry is not None:
            return entry
        return self.peek_heap()

    def pop(self, entry):
        """Remove ``entry``, which :meth:`peek` just returned."""
        if entry.front:
            self._front.popleft()
        else:
            heapq.heappop(self._heap)
        entry.seq = None
        entry.front = False

    def compact(self):
        if self._stale <= COMPACT_MIN or self._stale * 2 <= len(self._heap) + len(self._front):
            return
        self._heap = [item for item in self._heap if item[2].seq == item[1] and not item[2].removed]
        heapq.heapify(self._heap)
        self._front = collections.deque(
            item for item in self._front if item[1].seq == item[0] and not item[1].removed
        )
        self._stale = 0


def apply_accounts(entries, queue, sessions, new, now, poll_interval):
    """Make ``new`` (id -> Account) the current set of ``entries`` (id ->
    :class:`Entry`) queued in ``queue``; sessions of removed accounts are
    cancelled.  Returns an :class:`~fido_tx.accounts.model.AccountsDiff`.

    Added accounts go to the front, in the order given (before every earlier
    addition still waiting).  Changed accounts keep their place and timers,
    except that a failing one is due again at the next ``poll_interval``
    boundary (an operator fixed what made it fail).
    """
    added, changed, unchanged = [], [], []
    removed = [_remove(entries, queue, sessions, account_id)
               for account_id in [i for i in entries if i not in new]]
    to_front = []
    for account_id, account in new.items():
        entry = entries.get(account_id)
        if entry is None:
            added.append(account)
            entry = entries[account_id] = Entry(account, now)
            if account_id in sessions:
                # The removed predecessor's session has not ended yet
                # (a canceller that does not fire at once); wait for it.
                entry.blocked = True
            else:
                to_front.append(entry)
        elif entry.account == account:
            unchanged.append(account)
        else:
            changed.append(account)
            _change(entry, account, queue, sessions, now, poll_interval)
    # This batch goes before everything waiting, earlier additions too.
    for entry in reversed(to_front):
        queue.push_front(entry)
    queue.compact()
    return AccountsDiff(tuple(added), tuple(removed), tuple(changed), tuple(unchanged))


def _remove(entries, queue, sessions, account_id):
    """Drop an account from the set (its session, if any, is cancelled);
    returns its Account."""
    entry = entries.pop(account_id)
    entry.removed = True
    queue.discard(entry)
    session = sessions.get(account_id)
    if session is not None and session.entry is entry:
        log.debug("cancelling the session of removed account {account_id}",
                  account_id=account_id)
        session.cancel()
    return entry.account


def _change(entry, account, queue, sessions, now, poll_interval):
    """The account's settings changed: the next session uses ``account``."""
    account_id = account.id
    entry.account = account
    if entry.state.failures and account_id not in sessions:
        # An operator fixed what made it fail (a new password,
        # host or mailbox): try again at the next poll_interval
        # boundary, not after an auth backoff of hours.
        entry.state = _backoff.HEALTHY
        if entry.seq is not None and not entry.front:
            since = entry.started_at if entry.started_at is not None else now
            due = max(now, since + poll_interval)
            if due < entry.due:
                queue.push_back(entry, due)
    session = sessions.get(account_id)
    if session is not None and session.held and session.entry is entry:
        # A held connection lives as long as its session, with the
        # account it started with: end it; the account is due again
        # at once and reconnects with what changed.
        log.debug("restarting the held session of changed account {account_id}",
                  account_id=account_id)
        session.cancel()
        if entry.seq is not None and not entry.front:
            queue.push_back(entry, now)


def requeue(entries, queue, session, due, now):
    """A session ended: its account back in the queue at ``due``; or, when
    the account was removed meanwhile, its re-added successor (blocked until
    now) to the front."""
    entry = session.entry
    if not entry.removed:
        queue.push_back(entry, due)
        return
    successor = entries.get(session.account.id)
    if successor is not None and successor.blocked:
        successor.blocked = False
        successor.due = now  # waiting (for lag) from now on
        queue.push_front(successor)


def due_now(entries, queue, sessions, account_ids, now):
    """Make the waiting ones of ``account_ids`` due ``now``; running,
    blocked, new or already due ones are left alone."""
    for account_id in account_ids:
        entry = entries.get(account_id)
        if (entry is None or entry.blocked or entry.front or account_id in sessions
                or entry.due is None or entry.due <= now):
            continue
        queue.push_back(entry, now)


def by_id(accounts):
    """``{id: Account}`` in the order given; a ValueError on a duplicate id."""
    new = {}
    for account in accounts:
        if account.id in new:
            raise ValueError(f"duplicate account id {account.id!r}")
        new[account.id] = account
    return new
