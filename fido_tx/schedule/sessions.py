"""The sessions in progress: the worker slots they occupy, the sessions that
released theirs (held connections), and waiting for them all to end when the
scheduler stops (the grace period, then cancellation)."""

from twisted.internet import defer
from twisted.logger import Logger

log = Logger(namespace="fido_tx.schedule.scheduler")

__all__ = ["RunningSession", "RunningSessions", "SessionHandle"]


class RunningSession:
    __slots__ = ("entry", "account", "started_at", "deferred", "cancelled", "held")

    def __init__(self, entry, account, started_at):
        self.entry = entry
        self.account = account
        self.started_at = started_at
        self.deferred = None
        #: the scheduler cancelled it (account removed, or stop grace over)
        self.cancelled = False
        #: the session released its worker slot (a long-lived, held connection)
        self.held = False

    def cancel(self):
        self.cancelled = True
        self.deferred.cancel()


class SessionHandle:
    """What a session may tell the scheduler about itself (given as
    ``run_session(account, handle)`` by a scheduler built with
    ``handles=True``)."""

    __slots__ = ("_sessions", "_session", "_on_release", "_on_take", "_on_report")

    def __init__(self, sessions, session, on_release, on_take=None, on_report=None):
        self._sessions = sessions
        self._session = session
        self._on_release = on_release
        self._on_take = on_take
        self._on_report = on_report

    @property
    def held(self):
        return self._session.held

    def release_slot(self):
        """The session has become long-lived (e.g. a connection held for
        IDLE): from now on it occupies no worker slot, is not counted in
        ``running_count`` (so not in /healthz's sessions), and another
        account may start in its place.  Its account still gets no second
        session until it ends; a stop still cancels it after the grace."""
        if self._sessions.release_slot(self._session):
            self._on_release()

    def take_slot(self):
        """A held session has work again (new mail on its connection):
        a Deferred that fires with ``release`` (a callable giving the slot
        back) once a worker slot is free and fetching is not paused
        (backpressure, Redis down).  Cancelling it withdraws the request."""
        if not self._session.held:
            return defer.succeed(self.release_slot)
        return self._on_take(self._session).addCallback(lambda _: self.release_slot)

    def report(self, result):
        """One poll of a long-lived session is over: its result goes to the
        result observers (log line, account state, metrics, reports) as a
        finished session's would; the session goes on."""
        self._on_report(self._session, result)


class RunningSessions(dict):
    """account id -> :class:`RunningSession` (sessions of removed accounts
    included until they end)."""

    def __init__(self, clock, grace_period):
        super().__init__()
        self._clock = clock
        self.grace_period = grace_period
        #: sessions that released their slot
        self.held = 0
        self._stop_waiters = []
        self._grace_call = None

    @property
    def busy(self):
        """Sessions that occupy a worker slot."""
        return len(self) - self.held

    def forget(self, session):
        if self.get(session.account.id) is session:
            del self[session.account.id]
            if session.held:
                self.held -= 1

    def release_slot(self, session):
        if session.held or self.get(session.account.id) is not session:
            return False
        session.held = True
        self.held += 1
        return True

    def take_slot(self, session):
        """A held session occupies a worker slot again (False if it ended)."""
        if not session.held or self.get(session.account.id) is not session:
            return False
        session.held = False
        self.held -= 1
        return True

    # -- stopping ------------------------------------------------------

    def wait_until_empty(self):
        """A Deferred that fires when no session runs; after the grace period
        the sessions still running are cancelled."""
        if not self:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._stop_waiters.append(waiter)
        if self._grace_call is None:
            self._grace_call = self._clock.callLater(self.grace_period, self._grace_over)
        return waiter

    def check_empty(self):
        """A session ended: fire the waiters if it was the last one."""
        if not self and self._stop_waiters:
            self._stopped()

    def _grace_over(self):
        self._grace_call = None
        sessions = list(self.values())
        if not sessions:
            return
        ids = sorted(s.account.id for s in sessions)
        log.warn(
            "stopping: cancelling {count} sessions still running after the "
            "{grace}s grace period: {ids}",
            count=len(ids), grace=self.grace_period,
            ids=", ".join(ids[:20]) + (", ..." if len(ids) > 20 else ""),
        )
        for session in sessions:
            session.cancel()
        if self and self._stop_waiters:
            log.error(
                "stopping: {count} sessions did not end when cancelled; not waiting for them",
                count=len(self),
            )
            self._stopped()

    def _stopped(self):
        if self._grace_call is not None:
            self._grace_call.cancel()
            self._grace_call = None
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)
