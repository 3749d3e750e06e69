"""Held connections: one account's logged-in, selected connection kept
between polls, waiting in IDLE (or polled on the spot), replaced when lost.

:class:`HeldAccount` is an explicit state machine per account; its states
and the moves allowed between them are :data:`TRANSITIONS`::

    connecting -> fetching (catch up) -> idling <-> fetching
                                      -> waiting <-> fetching   (no IDLE)
    any of them -> backoff -> connecting        (lost, or cannot connect)
               -> fallback -> connecting        ("too many connections",
                                                 the per-host limit)
               -> closing -> closed             (stop)

It does no IMAP itself beyond IDLE, NOOP and LOGOUT: the collaborators are
injected, so it does not care how a connection is opened or a poll is run:

- ``open()`` -> Deferred[:class:`HeldConnection`]: connect, log in, select
  (errbacks with a :class:`~fido_tx.errors.FidoError`; cancelling it aborts);
- ``poll(conn)`` -> Deferred[:class:`~fido_tx.outcome.SessionResult`]: one
  fetch on the held connection (search, deliver, mark); it takes a worker
  slot and the byte budget itself, and never errbacks;
- ``report(result)``: every poll's result, and connection failures once
  they keep failing (``report_after`` in a row, or at once for ``auth``,
  ``tls``, ``config`` and ``mailbox``, which reconnecting will not cure);
- ``poll_fresh()`` (optional) -> Deferred[SessionResult]: one ordinary
  session on a fresh connection, for the fallback;
- ``ready()`` (optional) -> Deferred fired when fetching may go on, with a
  ``release()`` callable (or ``None``) called once the poll is over: the
  scheduler's worker slot.  While backpressure or a Redis outage pauses
  fetching, a woken connection waits here (it stops fetching, not
  listening: it stays logged in).

Checks: new mail announced by IDLE (EXISTS/RECENT) starts a fetch at once;
without IDLE (``idle = false`` or a server without it) the held connection
is polled every ``poll_interval``; with IDLE, ``poll_interval`` is still the
longest an account goes without a check (a server may not notify: Dovecot
beyond its inotify limit checks every 30 s).  Between checks, IDLE is
re-issued every ``idle_refresh`` and a NOOP proves the server still answers.
An EXISTS that arrives while a poll runs (between its SEARCH and its end)
is seen by the connection's observer and makes another poll.

Losing a connection that was held a while (``min_hold``) after a good poll
is routine (servers drop idle connections, restart, send BYE): it reconnects
at once, without a report.  Otherwise reconnects back off (``reconnect``
schedule, :mod:`fido_tx.schedule.backoff`).
"""

import re

import attr
from twisted.internet import defer, task
from twisted.logger import Logger

from fido_tx import errors
from fido_tx.config import BackoffSettings
from fido_tx.errors import FidoError
from fido_tx.outcome import SessionResult
from fido_tx.schedule import backoff
from fido_tx.sources.imap import idle as _idle
from fido_tx.sources.imap.client import ImapCommandError

_log = Logger()

CONNECTING = "connecting"
FETCHING = "fetching"
IDLING = "idling"
WAITING = "waiting"
BACKOFF = "backoff"
FALLBACK = "fallback"
CLOSING = "closing"
CLOSED = "closed"

_HOLDING = {FETCHING, IDLING, WAITING}

#: state -> the states it may move to
TRANSITIONS = {
    None: {CONNECTING, FALLBACK, CLOSED},
    CONNECTING: {FETCHING, BACKOFF, FALLBACK, CONNECTING, CLOSED},
    FETCHING: _HOLDING | {BACKOFF, CONNECTING, CLOSING},
    IDLING: _HOLDING | {BACKOFF, CONNECTING, CLOSING},
    WAITING: _HOLDING | {BACKOFF, CONNECTING, CLOSING},
    BACKOFF: {CONNECTING, FALLBACK, CLOSED},
    FALLBACK: {CONNECTING, FALLBACK, CLOSED},
    CLOSING: {CLOSED},
    CLOSED: set(),
}

#: failures reconnecting will not cure: reported the first time
_REPORT_AT_ONCE = frozenset([errors.AUTH, errors.TLS, errors.CONFIG, errors.MAILBOX])

_TOO_MANY = re.compile(r"\[(LIMIT|INUSE)\]|too many (simultaneous )?connections", re.I)


def too_many_connections(error):
    """Whether a failed connect/login says the server's connection limit is hit."""
    return isinstance(error, FidoError) and bool(_TOO_MANY.search(error.message))


@attr.s(slots=True)
class HeldConnection:
    """What ``open()`` hands over: a logged-in connection with the mailbox selected.

    :ivar client: the :class:`~fido_tx.sources.imap.client.FidoIMAP4Client`.
    :ivar capabilities: the server's, after login (upper-case bytes).
    :ivar exists: the message count SELECT reported (kept up to date).
    :ivar state: anything the opener wants ``poll`` to get back (the
        session object, the UIDVALIDITY, ...).
    :ivar on_close: called once the connection is closed or being aborted
        (drop what refers to it, so it is freed at once, not by the collector).
    """

    client = attr.ib()
    capabilities = attr.ib(default=frozenset())
    exists = attr.ib(default=None)
    state = attr.ib(default=None)
    on_close = attr.ib(default=None)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class HeldSettings:
    #: use IDLE when the server offers it (the account's ``idle``)
    idle: bool = True
    #: seconds before IDLE is ended and re-issued (under 29 minutes)
    idle_refresh: float = 600.0
    #: the longest an account goes without a check
    poll_interval: float = 60.0
    #: seconds for ``+``, DONE's answer and the NOOP probe
    command_timeout: float = 60.0
    logout_timeout: float = 5.0
    #: failures in a row (connects, early losses) before one is reported
    report_after: int = 3
    #: a connection lost sooner than this after it was opened counts as a failure
    min_hold: float = 30.0
    #: seconds on fresh-connection polling before holding is tried again
    fallback_retry: float = 600.0
    #: the reconnect schedule (first retry after 1 s, not the sessions' 30 s)
    reconnect: BackoffSettings = BackoffSettings(initial=1.0, maximum=300.0)
    #: an untagged FETCH without \\Seen (mail marked unread again) wakes too
    wake_on_unseen: bool = False

    @classmethod
    def from_settings(cls, settings, account_idle=True):
        """From :class:`fido_tx.config.Settings` and the account's ``idle``."""
        imap, b = settings.imap, settings.backoff
        return cls(
            idle=bool(account_idle),
            idle_refresh=getattr(imap, "idle_refresh", 600.0),
            poll_interval=settings.fido.poll_interval,
            command_timeout=imap.command_timeout,
            logout_timeout=imap.logout_timeout,
            reconnect=attr.evolve(b, initial=min(1.0, b.initial),
                                  maximum=min(300.0, b.maximum)),
        )


class HeldPool:
    """What all held connections share: the per-host limit and the counts
    for /metrics and ``fido status``.

    :param on_idle: called each time a connection starts to wait in IDLE
        (the daemon freezes the collector's view of settled connections).
    """

    def __init__(self, max_per_host=1000, on_idle=None):
        self.max_per_host = max_per_host
        self.on_idle = on_idle
        self._hosts = {}
        #: connections logged in and held now
        self.held = 0
        #: of those, waiting in IDLE now
        self.idling = 0
        #: connections replaced since start
        self.reconnects = 0
        #: accounts polling on fresh connections now (limits hit)
        self.fallback = 0

    def try_hold(self, host):
        """Take one of ``host``'s connection slots; False when all are taken."""
        n = self._hosts.get(host, 0)
        if n >= self.max_per_host:
            return False
        self._hosts[host] = n + 1
        return True

    def release(self, host):
        n = self._hosts.get(host, 0) - 1
        if n > 0:
            self._hosts[host] = n
        else:
            self._hosts.pop(host, None)

    def idle_started(self):
        self.idling += 1
        if self.on_idle is not None:
            self.on_idle()

    def idle_ended(self):
        self.idling -= 1

    def per_host(self, host):
        return self._hosts.get(host, 0)

    def snapshot(self):
        return {"held": self.held, "idling": self.idling,
                "reconnects": self.reconnects, "fallback": self.fallback}


class _Stopped(Exception):
    """Internal: stop() interrupted a wait."""


class _Lost(Exception):
    """Internal: the held connection is gone (``error`` says why).

    ``routine`` is False when it went down during a poll: that poll failed,
    so the loss counts towards a report even after a long hold.
    """

    def __init__(self, error, routine=True):
        super().__init__(error)
        self.error = error
        self.routine = routine


class HeldAccount:
    """One account's held connection; see the module docstring.

    :param host: the key of ``pool``'s per-host limit.
    :param clock: ``IReactorTime``.
    :param random: a :class:`random.Random` for backoff jitter.
    """

    def __init__(self, account_id, host, open, poll, report, clock, settings, pool,
                 random, poll_fresh=None, ready=None, log=None):
        self.account_id = account_id
        self.host = host
        self.open = open
        self.poll = poll
        self.report = report
        self.clock = clock
        self.settings = settings
        self.pool = pool
        self.random = random
        self.poll_fresh = poll_fresh
        self.ready = ready
        self.log = log or _log
        self.state = None
        #: states entered, in order (bounded; for tests and ``fido status``)
        self.history = []
        self.reconnects = 0
        self.conn = None
        self._backoff = backoff.HEALTHY
        self._stopping = False
        self._waiting = None  # the Deferred stop() interrupts
        self._idler = None
        self._polling = None
        self._dirty = False
        self._no_idle = False
        self._last_check = None
        self._fallback_until = None
        self._done = None
        self._closed_waiters = []

    # -- public ------------------------------------------------------------

    def start(self):
        """Start holding; returns self."""
        self._done = defer.ensureDeferred(self._run())
        self._done.addErrback(self._crashed)
        return self

    def stop(self, timeout=None):
        """End politely (DONE, LOGOUT); a Deferred fired once closed.

        A poll in flight is waited for; after ``timeout`` seconds (if given)
        it is cancelled and the connection aborted.
        """
        if self.state == CLOSED:
            return defer.succeed(None)
        self._stopping = True
        d = defer.Deferred()
        self._closed_waiters.append(d)  # before: the interrupt may end it at once
        self._interrupt()
        if timeout is not None:
            timer = self.clock.callLater(timeout, self._abort, timeout)
            d.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return d

    def closed(self):
        """A Deferred fired once the machine is closed (stopped or crashed)."""
        if self.state == CLOSED:
            return defer.succeed(None)
        d = defer.Deferred()
        self._closed_waiters.append(d)
        return d

    @property
    def idling(self):
        return self.state == IDLING

    # -- states --------------------------------------------------------------

    def _enter(self, state):
        if state not in TRANSITIONS[self.state]:
            raise AssertionError(f"held {self.account_id}: {self.state} -> {state}")
        self.state = state
        self.history.append(state)
        if len(self.history) > 16:  # thousands of these: keep it small
            del self.history[:8]

    def _interrupt(self):
        if self._idler is not None:
            self._idler.stop()
        if self._waiting is not None and not self._waiting.called:
            self._waiting.cancel()

    def _abort(self, timeout):
        polling = self._polling
        if polling is not None and not polling.called:
            self.log.warn("held {account_id}: still fetching after the {grace:g} s grace "
                          "period: cancelled (nothing more is marked; the next start "
                          "finds the rest)", account_id=self.account_id, grace=timeout)
            polling.cancel()
        conn = self.conn
        if conn is not None and not conn.client.closed and conn.client.transport is not None:
            conn.client.transport.abortConnection()

    async def _wait(self, d):
        """Await ``d`` (open, sleep, ready) so that stop() can interrupt it."""
        if self._stopping:
            d.cancel()
            raise _Stopped()
        self._waiting = d
        try:
            return await d
        except defer.CancelledError:
            if self._stopping:
                raise _Stopped()
            raise
        finally:
            self._waiting = None

    def _sleep(self, seconds):
        return self._wait(task.deferLater(self.clock, max(0.0, seconds)))

    # -- the loop ------------------------------------------------------------

    async def _run(self):
        try:
            while not self._stopping:
                if self._fallback_until is not None:
                    await self._fallback()
                elif not self.pool.try_hold(self.host):
                    self._start_fallback("max_connections_per_host reached for "
                                         f"{self.host}")
                else:
                    try:
                        await self._connection()
                    finally:
                        self.pool.release(self.host)
        except _Stopped:
            pass
        finally:
            self._closed()

    async def _connection(self):
        """Open, hold until lost or stopped, close."""
        self._enter(CONNECTING)
        try:
            conn = await self._wait(self.open())
        except _Stopped:
            raise
        except Exception as e:
            error = _as_error(e, errors.CONNECT)
            if too_many_connections(error):
                self._start_fallback(error.message)
                return
            await self._failed(error)
            return
        opened = self.clock.seconds()
        self.conn = conn
        self.pool.held += 1
        conn.client.observer = self._observer(conn)
        _idle.keepalive(conn.client.transport)
        lost = None
        try:
            await self._hold(conn)
        except _Lost as e:
            lost, routine = e.error, e.routine
        finally:
            self.pool.held -= 1
            conn.client.observer = None
            if self._stopping:
                self._enter(CLOSING)
                await _idle.logout(conn.client, self.settings.logout_timeout)
            elif not conn.client.closed and conn.client.transport is not None:
                conn.client.transport.abortConnection()
            self.conn = None
            if conn.on_close is not None:
                conn.on_close()
        if lost is None or self._stopping:
            return
        self.reconnects += 1
        self.pool.reconnects += 1
        held_for = self.clock.seconds() - opened
        if routine and self._backoff.failures == 0 and held_for >= self.settings.min_hold:
            self.log.debug("held {account_id}: connection lost after {seconds:.0f} s "
                           "({why}); reconnecting", account_id=self.account_id,
                           seconds=held_for, why=lost.message)
            return  # routine (idle timeout, restart, BYE): reconnect at once
        await self._failed(lost)

    async def _hold(self, conn):
        self._last_check = None
        await self._fetch(conn)  # what came while no connection was held
        while not self._stopping:
            if self._dirty or self._due() <= 0:
                await self._fetch(conn)
            elif self.settings.idle and not self._no_idle and _idle.supports_idle(
                    conn.capabilities):
                await self._idle_once(conn)
            else:
                await self._poll_wait(conn)

    def _due(self):
        """Seconds until the next check is due."""
        if self._last_check is None:
            return 0.0
        return self._last_check + self.settings.poll_interval - self.clock.seconds()

    async def _idle_once(self, conn):
        self._enter(IDLING)
        counted = []

        def on_idling():
            counted.append(True)
            self.pool.idle_started()

        refresh = min(self.settings.idle_refresh, self._due())
        self._idler = _idle.Idle(conn.client, self.clock, refresh, self.settings.command_timeout,
                                 exists=conn.exists, wake_on_unseen=self.settings.wake_on_unseen,
                                 on_idling=on_idling)
        try:
            end = await self._idler.start()
        except ImapCommandError as e:
            self.log.info("held {account_id}: server refused IDLE ({why}); polling the "
                          "held connection every {interval:g} s", account_id=self.account_id,
                          why=str(e), interval=self.settings.poll_interval)
            self._no_idle = True
            return
        except Exception as e:
            raise _Lost(_as_error(e, errors.PROTOCOL))
        finally:
            self._idler = None
            if counted:
                self.pool.idle_ended()
        if self._stopping:
            return
        if end.woken:
            self._dirty = True
        elif self._due() > 0:  # a refresh: is the server still there?
            try:
                woken, exists = await _idle.probe(conn.client, self.settings.command_timeout,
                                                  conn.exists)
            except Exception as e:
                raise _Lost(_as_error(e, errors.PROTOCOL))
            self._dirty = self._dirty or woken

    async def _poll_wait(self, conn):
        """No IDLE: wait on the held connection until the next check."""
        self._enter(WAITING)
        try:
            await self._sleep(self._due())
        except defer.CancelledError:  # woken early by an unsolicited EXISTS
            pass
        if conn.client.closed:
            raise _Lost(_as_error(conn.client.error, errors.PROTOCOL))

    async def _fetch(self, conn):
        """Poll on the held connection (again while new mail came meanwhile)."""
        self._enter(FETCHING)
        for _ in range(3):
            release = await self._ready()
            try:
                result = await self._poll_once(conn)
                if result.ok:
                    self._backoff = backoff.HEALTHY
                # reported before the slot is given back, as a session ending
                # is: backpressure judges it before another fetch may start
                self.report(result)
            finally:
                if release is not None:
                    release()
            if not self._dirty or self._stopping:
                return

    async def _ready(self):
        """Wait for ``ready()``: the ``release`` it gives, or ``None``."""
        if self.ready is None:
            return None
        release = await self._wait(self.ready())
        return release if callable(release) else None

    async def _poll_once(self, conn):
        self._dirty = False
        self._last_check = self.clock.seconds()
        self._polling = defer.maybeDeferred(self.poll, conn)
        try:
            result = await self._polling
        except defer.CancelledError:
            raise _Lost(FidoError(errors.TIMEOUT, "poll cancelled"), routine=False)
        except Exception as e:  # a poll never errbacks: a bug, keep holding safe
            self.log.failure("held {account_id}: poll failed", account_id=self.account_id)
            raise _Lost(_as_error(e, errors.PROTOCOL), routine=False)
        finally:
            self._polling = None
        if conn.client.closed or conn.client.error is not None:
            if result.ok:  # it finished its work, then the server went away
                self.report(result)
                raise _Lost(_as_error(conn.client.error, errors.PROTOCOL))
            raise _Lost(FidoError(result.kind, result.message, result.debug),
                        routine=False)
        return result

    def _observer(self, conn):
        """Watch every untagged response of the held connection."""

        def observe(segments):
            what, number = _idle.parse_untagged(segments[0])
            if what == b"EXISTS":
                if conn.exists is None or number > conn.exists:
                    self._wake()
                conn.exists = number
            elif what == b"RECENT" and number > 0:
                self._wake()
            elif what == b"EXPUNGE" and conn.exists:
                conn.exists -= 1

        return observe

    def _wake(self):
        self._dirty = True
        if self.state == WAITING and self._waiting is not None and not self._waiting.called:
            self._waiting.cancel()

    # -- failures and fallback --------------------------------------------------

    async def _failed(self, error):
        self._backoff = backoff.record(self._backoff, error.kind)
        if self._backoff.failures >= self.settings.report_after or error.kind in _REPORT_AT_ONCE:
            self.report(SessionResult(account_id=self.account_id, kind=error.kind,
                                      message=error.message, debug=error.debug))
        delay = backoff.delay(self.settings.reconnect, self._backoff, self.random)
        self.log.info("held {account_id}: {why}; reconnecting in {delay:.1f} s "
                      "(failure {n} in a row)", account_id=self.account_id, why=error.message,
                      delay=delay, n=self._backoff.failures)
        self._enter(BACKOFF)
        await self._sleep(delay)

    def _start_fallback(self, why):
        self.log.info("held {account_id}: {why}; polling with fresh connections for "
                      "{seconds:g} s", account_id=self.account_id, why=why,
                      seconds=self.settings.fallback_retry)
        self._fallback_until = self.clock.seconds() + self.settings.fallback_retry

    async def _fallback(self):
        self._enter(FALLBACK)
        self.pool.fallback += 1
        try:
            while self.clock.seconds() < self._fallback_until:
                if self.poll_fresh is not None:
                    release = await self._ready()
                    self._polling = defer.maybeDeferred(self.poll_fresh)
                    try:
                        self.report(await self._wait(self._polling))
                    finally:
                        self._polling = None
                        if release is not None:
                            release()
                await self._sleep(min(self.settings.poll_interval,
                                      self._fallback_until - self.clock.seconds()))
        finally:
            self.pool.fallback -= 1
        self._fallback_until = None

    # -- the end -------------------------------------------------------------

    def _closed(self):
        if self.state != CLOSED:
            if CLOSED in TRANSITIONS[self.state]:
                self._enter(CLOSED)
            else:  # an internal error escaped from holding: still end closed
                self.state = CLOSED
                self.history.append(CLOSED)
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(None)

    def _crashed(self, f):
        self.log.failure("held {account_id}: internal error", f, account_id=self.account_id)


def _as_error(exc, kind, message=None):
    """Any exception (or ``None``) as a :class:`FidoError`."""
    if isinstance(exc, FidoError):
        return exc
    if isinstance(exc, ImapCommandError):
        return FidoError(errors.PROTOCOL, str(exc))
    if exc is None:
        return FidoError(kind, message or "connection closed")
    return FidoError(kind, message or f"{type(exc).__name__}: {exc}")
