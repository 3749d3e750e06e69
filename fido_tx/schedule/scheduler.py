"""The scheduler: a round-robin queue of accounts and a fixed number of worker slots.

A free slot takes the next account that is due and runs one mailbox session
for it (``run_session(account) -> Deferred[SessionResult]``).  When the
session ends, the account goes to the back of the queue, due again
``poll_interval`` seconds after the *start* of that session (later when it
failed: see :mod:`fido_tx.schedule.backoff`).

Ordering.  Waiting accounts sit in a heap keyed by ``(due_time, sequence)``:
the most overdue account goes first, and accounts equally due go in the
order they joined the back of the queue (round robin).  Accounts added by
:meth:`Scheduler.set_accounts` go to a deque in front of the heap: they are
fetched before any waiting account, in the order given, and that includes
accounts of an earlier addition that have not had their turn yet (so an
account just added in the web application is fetched within seconds even
while thousands from the first load still wait).  Removed accounts are
deleted lazily (their heap items are skipped when they surface; the heap is
compacted when stale items pile up), so every dispatch is O(log n) and
nothing scans the accounts per session.

Events, no polling loop.  The scheduler dispatches when a slot frees, when
the accounts change, when it is resumed or started, and when the earliest
due time comes: one ``clock.callLater``, moved as needed, and none at all
while paused, stopped, saturated or empty.

Invariants: at most ``workers`` sessions run; an account (by id) is never in
two sessions at once; an account is polled no more often than
``poll_interval``; one account's failures never delay another's turn; an
account is never lost, whatever its session does.

The parts: :mod:`~fido_tx.schedule.queue` (who is next),
:mod:`~fido_tx.schedule.sessions` (who runs, the slots, the stop),
:mod:`~fido_tx.schedule.slots` (held sessions asking for a slot again),
:mod:`~fido_tx.schedule.alarm` (the one timer),
:mod:`~fido_tx.schedule.ending` (a session's end as a result, its observers),
:mod:`~fido_tx.schedule.backoff` (when a failed account is due again).
"""

import random as _random

import attr
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from fido_tx.schedule import backoff as _backoff
from fido_tx.interfaces import ISchedulerView
from fido_tx.schedule.alarm import Alarm
from fido_tx.schedule.ending import ResultObservers, session_result
from fido_tx.schedule.queue import DueQueue, apply_accounts, by_id, due_now, requeue
from fido_tx.schedule.slots import SlotWaiters
from fido_tx.schedule.sessions import RunningSession, RunningSessions, SessionHandle  # noqa: F401

log = Logger()

#: a due time this close to now counts as now (float rounding of callLater)
_EPSILON = 1e-9

#: sessions started by one dispatch at most; the rest in the next reactor
#: turn.  Sessions that hold a connection give their worker slot back at
#: once, so ``workers`` does not bound them: 10,000 held accounts were all
#: started in one turn (~120 us each, a stall of over a second).
STARTS_PER_TURN = 100


@attr.s(frozen=True, slots=True, auto_attribs=True)
class AccountState:
    """One account as the scheduler sees it (for status and health)."""

    account_id: str
    #: consecutive failed sessions that count for backoff (0 = healthy)
    failures: int
    #: kind of the last counted failure, ``None`` when healthy
    last_kind: str | None
    #: "queued" (waiting for its turn), "running", "held" (a long-lived
    #: session that released its slot), or "blocked" (re-added while the
    #: session of its removed predecessor is still being cancelled)
    state: str
    #: clock seconds when it is due again; ``None`` while running or blocked
    next_due: float | None
    #: clock seconds of the start of its last session, ``None`` if never run
    last_started_at: float | None


def _account_state(entry, session):
    """The :class:`AccountState` of ``entry`` (``session``: its account's
    running session, or None)."""
    if session is not None and session.entry is entry:
        state, due = ("held" if session.held else "running"), None
    elif entry.blocked:
        state, due = "blocked", None
    else:
        state, due = "queued", entry.due
    return AccountState(
        account_id=entry.account.id,
        failures=entry.state.failures,
        last_kind=entry.state.last_kind,
        state=state,
        next_due=due,
        last_started_at=entry.started_at,
    )


def _backed_off(entry, result, due, now, settings, random):
    """When ``entry``'s account is due again after ``result``: at ``due``,
    later when it failed (the backoff, or a throttled session's Retry-After);
    the failure count goes into ``entry.state``."""
    entry.state = _backoff.record(entry.state, result.kind)
    if not _backoff.counts_as_failure(result.kind):
        return due
    return max(due, now + _backoff.delay(settings, entry.state, random, result.retry_after))


@implementer(ISchedulerView)
class Scheduler(service.Service):
    """Round-robin mailbox sessions over ``workers`` slots.

    :param clock: an ``IReactorTime`` (``task.Clock`` in tests).
    :param run_session: ``run_session(account) -> Deferred[SessionResult]``;
        expected never to errback (an errback is logged as a bug and counted
        as a ``protocol`` failure); cancelled with ``Deferred.cancel()`` when
        its account is removed or the stop grace period is over.
    :param workers: concurrent sessions.
    :param poll_interval: least seconds between the starts of two sessions of
        one account.
    :param backoff: a :class:`fido_tx.config.BackoffSettings`.
    :param random: a :class:`random.Random` for the backoff jitter.
    :param grace_period: seconds :meth:`stopService` waits for running
        sessions before cancelling them.
    :param handles: call ``run_session(account, handle)`` with a
        :class:`~fido_tx.schedule.sessions.SessionHandle`, through which a
        session that becomes long-lived releases its worker slot.

    A session that ends with ``SessionResult(skipped=True)`` is neither
    backed off nor reported to the result observers.
    """

    name = "scheduler"

    def __init__(
        self, clock, run_session, workers, poll_interval, backoff, random=None, grace_period=20.0,
        handles=False,
    ):
        if int(workers) < 1:
            raise ValueError(f"workers must be at least 1, not {workers!r}")
        if poll_interval < 0:
            raise ValueError(f"poll_interval must not be negative, not {poll_interval!r}")
        self._clock = clock
        self._run_session = run_session
        self._handles = handles
        self.workers = int(workers)
        self.poll_interval = float(poll_interval)
        self.backoff = backoff
        self._random = random if random is not None else _random.Random()
        self.grace_period = float(grace_period)

        #: account id -> Entry, in the order the accounts were added
        self._entries = {}
        self._sessions = RunningSessions(clock, self.grace_period)
        self._queue = DueQueue()
        self._paused = set()
        self._observers = ResultObservers()

        self._alarm = Alarm(clock, self._dispatch)
        self._dispatching = False
        self._slot_waiters = SlotWaiters()

        self.last_dispatch_at = None
        self.last_completion_at = None

    # -- introspection -------------------------------------------------

    @property
    def running_count(self):
        """Number of sessions in progress.

        (``running`` is taken: it is ``Service.running``, the started flag
        Twisted's service machinery relies on.)
        """
        return self._sessions.busy

    @property
    def held_count(self):
        """Sessions in progress that released their slot (held connections)."""
        return self._sessions.held

    @property
    def queued(self):
        """Accounts of the current set waiting for their turn (not running)."""
        in_session = sum(1 for s in self._sessions.values() if not s.entry.removed)
        return len(self._entries) - in_session

    @property
    def accounts(self):
        """The current set: ``{id: Account}`` (a copy)."""
        return {account_id: entry.account for account_id, entry in self._entries.items()}

    @property
    def paused_reasons(self):
        return frozenset(self._paused)

    @property
    def paused(self):
        return bool(self._paused)

    def running_ids(self):
        """Ids of the accounts in a session now."""
        return frozenset(self._sessions)

    def is_held(self, account_id):
        """Whether ``account_id``'s session released its slot (a held connection)."""
        session = self._sessions.get(account_id)
        return session is not None and session.held

    def poll_soon(self, account_ids):
        """Make the waiting ones of ``account_ids`` due now (an instance has
        just taken their leases); running or blocked ones are left alone."""
        due_now(self._entries, self._queue, self._sessions, account_ids, self._clock.seconds())
        self._reschedule()

    def stop_session(self, account_id):
        """Cancel the running session (or held connection) of ``account_id``,
        if any: nothing more is marked (its lease was lost to another
        instance).  The account stays in the set."""
        session = self._sessions.get(account_id)
        if session is not None and session.deferred is not None:
            session.cancel()

    def lag(self):
        """Seconds the most overdue waiting account has waited past its due time.

        0 when none is overdue.  Reported also while paused or stopped: it is
        the real wait, and the health check wants to see it grow.
        """
        worst = self._queue.earliest_due()
        return 0.0 if worst is None else max(0.0, self._clock.seconds() - worst)

    def account_state(self, account_id):
        """An :class:`AccountState` for the id, ``None`` when not in the set."""
        entry = self._entries.get(account_id)
        if entry is None:
            return None
        return _account_state(entry, self._sessions.get(account_id))

    # -- observers -----------------------------------------------------

    def add_result_observer(self, observer):
        """Call ``observer(account, result)`` after every session that ends with a result.

        ``account`` is the value the session ran with.  Sessions the scheduler
        cancelled (account removed, stop grace over) have no result and are
        not reported.  An observer that raises is logged and ignored.
        """
        self._observers.add(observer)

    def remove_result_observer(self, observer):
        self._observers.remove(observer)

    # -- control -------------------------------------------------------

    def set_accounts(self, accounts):
        """Make ``accounts`` the current set (matched by id); returns an
        :class:`~fido_tx.accounts.model.AccountsDiff`.

        Added accounts go to the front of the queue, in the order given.
        Removed accounts get no new session, and a session in progress for one
        is cancelled.  Changed accounts keep their place and timers; a running
        session finishes with the old value, the next one uses the new value.
        Unchanged accounts keep their place and timers.
        """
        new = by_id(accounts)
        # No dispatch until the whole change is in (a cancelled session frees
        # its slot at once, and the added accounts must be first to take it).
        held, self._dispatching = self._dispatching, True
        try:
            changes = apply_accounts(self._entries, self._queue, self._sessions, new,
                                     self._clock.seconds(), self.poll_interval)
        finally:
            self._dispatching = held
        self._dispatch()
        return changes

    def pause(self, reason):
        """Start no new session until every pause reason is resumed."""
        self._paused.add(reason)
        self._reschedule()

    def resume(self, reason):
        """Drop one pause reason (unknown reasons are ignored)."""
        self._paused.discard(reason)
        self._dispatch()

    def startService(self):
        super().startService()
        self._dispatch()

    def stopService(self):
        """Start no new session; wait for running ones, cancel them after the grace period.

        Returns a Deferred that fires when no session is running.
        """
        super().stopService()
        self._reschedule()
        return self._sessions.wait_until_empty()

    # -- dispatch ------------------------------------------------------

    def _can_start(self):
        return (self.running and not self._paused
                and self._sessions.busy < self.workers)

    def _dispatch(self):
        if self._dispatching:
            # A session ended synchronously inside run_session, or an observer
            # changed something: the outer loop sees it.
            return
        self._dispatching = True
        try:
            # A bound on starts per call, so that instant sessions with a
            # poll_interval of 0 cannot spin here forever.
            budget = min(len(self._entries) + self.workers, STARTS_PER_TURN)
            self._grant_slots()
            while self._can_start() and budget > 0:
                entry = self._queue.peek()
                if entry is None or (
                    not entry.front and entry.due > self._clock.seconds() + _EPSILON
                ):
                    break  # (a new account is always due, whatever the clock did)
                self._queue.pop(entry)
                budget -= 1
                self._start(entry)
        finally:
            self._dispatching = False
        self._reschedule(again=budget <= 0)

    def _grant_slots(self):
        """Held sessions with work go first: they have mail waiting."""
        self._slot_waiters.grant(self._can_start, self._sessions.take_slot)

    def _take_slot(self, session):
        d = self._slot_waiters.wait(session)
        self._dispatch()
        return d

    def _report(self, session, result):
        if result is not None and not result.skipped:
            # a held session's fetch is a completed poll (for /healthz too)
            self.last_completion_at = self._clock.seconds()
            self._observers.notify(session.account, result)

    def _reschedule(self, again=False):
        """Keep the one timer at the earliest due time, or none when it cannot help."""
        due = None
        if self._can_start():
            entry = self._queue.peek()
            if entry is not None:
                due = self._clock.seconds() if again or entry.front else entry.due
        self._alarm.at(due)

    # -- sessions ------------------------------------------------------

    def _start(self, entry):
        account = entry.account
        now = self._clock.seconds()
        entry.started_at = now
        self.last_dispatch_at = now
        session = RunningSession(entry, account, now)
        self._sessions[account.id] = session
        if self._handles:
            handle = SessionHandle(self._sessions, session, self._dispatch,
                                   on_take=self._take_slot, on_report=self._report)
            d = defer.maybeDeferred(self._run_session, account, handle)
        else:
            d = defer.maybeDeferred(self._run_session, account)
        session.deferred = d
        d.addBoth(self._ended, session)
        d.addErrback(self._internal_error, session)

    def _ended(self, outcome, session):
        self._finish(session, session_result(outcome, session))

    def _internal_error(self, reason, session):
        log.failure("scheduler error after the session of {account_id}", reason,
                    level=LogLevel.critical, account_id=session.account.id)
        # Never lose the account: make sure the slot is free and it is queued.
        account_id = session.account.id
        self._sessions.forget(session)
        entry = session.entry
        if (not entry.removed and entry.seq is None and not entry.blocked
                and account_id not in self._sessions):
            self._queue.push_back(entry, session.started_at + self.poll_interval)
        self._after_session()

    def _finish(self, session, result):
        """Account back in the queue, observers told, next session dispatched."""
        now = self._clock.seconds()
        self._sessions.forget(session)
        self.last_completion_at = now
        if result is not None and result.skipped:
            result = None  # the source had nothing to do: no backoff, no report
        entry = session.entry
        due = session.started_at + self.poll_interval
        if result is not None and not entry.removed:
            due = _backed_off(entry, result, due, now, self.backoff, self._random)
        requeue(self._entries, self._queue, session, due, now)
        if result is not None:
            self._observers.notify(session.account, result)
        self._after_session()

    def _after_session(self):
        self._sessions.check_empty()
        self._dispatch()
