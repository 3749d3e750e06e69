"""Held connections: one account's logged-in, selected connection kept
between polls, waiting in IDLE (or polled on the spot), replaced when lost.

:class:`HeldAccount` is an explicit state machine per account; its states
and the moves allowed between them are :data:`TRANSITIONS`::

    connecting -> fetching (catch up) -> idling <-> fetching
                                      -> waiting <-> fetching   (no IDLE)
    idling, waiting, fetching -> renewing -> connecting   (OAuth2 token
                                 renewing -> idling, ...   renewed, or not)
    any of them -> backoff -> connecting        (lost, or cannot connect)
               -> fallback -> connecting        ("too many connections",
                                                 the per-host limit)
               -> closing -> closed             (stop)

Its parts: :mod:`~fido_tx.sources.imap.heldwait` (IDLE or a plain wait
between checks), :mod:`~fido_tx.sources.imap.heldfetch` (a check: NOOP when
nothing was announced, the poll, its result), :mod:`~fido_tx.sources.imap.fallback` (fresh-connection
polling), :mod:`~fido_tx.sources.imap.reauth` (a fresh OAuth2 token before
the held one expires) and :mod:`~fido_tx.sources.imap.heldconn` (the connection, the
settings, the shared pool); this module keeps the states and the loop.

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
- ``tokens`` (optional): ``renew()`` -> Deferred fired once a fresh secret
  is ready for the next login, ``invalidate()`` the server refused the
  current one (see :mod:`~fido_tx.sources.imap.reauth`);
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
is seen by the connection's observer and makes another poll.  A check that
no EXISTS announced starts with a NOOP (Dovecot and Courier look for new
mail on NOOP or in IDLE, not on UID SEARCH).

Losing a connection that was held a while (``min_hold``) after a good poll
is routine (servers drop idle connections, restart, send BYE): it reconnects
at once, without a report.  Otherwise reconnects back off (``reconnect``
schedule, :mod:`fido_tx.schedule.backoff`).
"""

from twisted.internet import defer, task
from twisted.logger import Logger

from fido_tx import errors
from fido_tx.outcome import SessionResult
from fido_tx.schedule import backoff
from fido_tx.sources.imap import idle as _idle
from fido_tx.sources.imap.fallback import Fallback
from fido_tx.sources.imap.heldconn import (
    TOKEN_RENEWAL, HeldConnection, HeldPool, HeldSettings, Lost, Stopped, as_error,
    too_many_connections)
from fido_tx.sources.imap.heldfetch import HeldFetch
from fido_tx.sources.imap.heldwait import HeldWait
from fido_tx.sources.imap.reauth import Reauth

__all__ = ["HeldAccount", "HeldConnection", "HeldPool", "HeldSettings", "TRANSITIONS",
           "too_many_connections"]

_log = Logger()

CONNECTING = "connecting"
FETCHING = "fetching"
IDLING = "idling"
WAITING = "waiting"
RENEWING = "renewing"
BACKOFF = "backoff"
FALLBACK = "fallback"
CLOSING = "closing"
CLOSED = "closed"

_HOLDING = {FETCHING, IDLING, WAITING}

#: state -> the states it may move to
TRANSITIONS = {
    None: {CONNECTING, FALLBACK, CLOSED},
    CONNECTING: {FETCHING, BACKOFF, FALLBACK, CONNECTING, CLOSED},
    FETCHING: _HOLDING | {RENEWING, BACKOFF, CONNECTING, CLOSING},
    IDLING: _HOLDING | {RENEWING, BACKOFF, CONNECTING, CLOSING},
    WAITING: _HOLDING | {RENEWING, BACKOFF, CONNECTING, CLOSING},
    RENEWING: _HOLDING | {CONNECTING, CLOSING},
    BACKOFF: {CONNECTING, FALLBACK, CLOSED},
    FALLBACK: {CONNECTING, FALLBACK, CLOSED},
    CLOSING: {CLOSED},
    CLOSED: set(),
}

#: the longest a sink's Retry-After holds a held account's fetches back
MAX_HOLD_OFF = 3600.0

#: failures reconnecting will not cure: reported the first time
_REPORT_AT_ONCE = frozenset([errors.AUTH, errors.REAUTHORIZE, errors.TLS, errors.CONFIG,
                             errors.MAILBOX])


class HeldAccount:
    """One account's held connection; see the module docstring.

    :param host: the key of ``pool``'s per-host limit.
    :param clock: ``IReactorTime``.
    :param random: a :class:`random.Random` for backoff jitter.
    """

    def __init__(self, account_id, host, open, poll, report, clock, settings, pool,
                 random, poll_fresh=None, ready=None, log=None, tokens=None):
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
        self.tokens = tokens
        self.log = log or _log
        self.state = None
        #: states entered, in order (bounded; for tests and ``fido status``)
        self.history = []
        self.reconnects = 0
        self.conn = None
        #: stop() was called
        self.stopping = False
        #: new mail was announced: fetch again
        self.dirty = False
        #: the poll in flight (on the held connection or a fresh one)
        self.polling = None
        self.waits = HeldWait(self)
        self.fetch = HeldFetch(self)
        self.fallback = Fallback(self)
        self.reauth = Reauth(self)
        self._backoff = backoff.HEALTHY
        self._waiting = None  # the Deferred stop() interrupts
        #: clock time of the last check (a poll) on the held connection
        self.last_check = None
        #: clock time before which no fetch starts (a sink's Retry-After)
        self.not_before = None
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
        self.stopping = True
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

    # -- for the parts (HeldWait, HeldFetch, Fallback, Reauth) -------------------

    async def wait_for(self, d):
        """Await ``d`` (open, sleep, ready) so that stop() can interrupt it
        (:class:`~fido_tx.sources.imap.heldconn.Stopped`)."""
        if self.stopping:
            d.cancel()
            raise Stopped()
        self._waiting = d
        try:
            return await d
        except defer.CancelledError:
            if self.stopping:
                raise Stopped()
            raise
        finally:
            self._waiting = None

    def sleep(self, seconds):
        return self.wait_for(task.deferLater(self.clock, max(0.0, seconds)))

    async def take_slot(self):
        """Wait for ``ready()``: the ``release`` it gives, or ``None``."""
        if self.ready is None:
            return None
        release = await self.wait_for(self.ready())
        return release if callable(release) else None

    @property
    def ticker(self):
        """The shared :class:`~fido_tx.schedule.ticker.PollTicker` the checks
        are due on (the pool's), or None: each account its own timer (also
        when the grid is coarser than ``poll_interval``)."""
        ticker = self.pool.ticker
        if ticker is None or not 0 < ticker.quantum <= self.settings.poll_interval:
            return None
        return ticker

    def due(self):
        """Seconds until the next check is due (on the ticker's grid: rounded
        down to its tick, so that the checks of many accounts go out in one
        reactor turn)."""
        if self.last_check is None:
            return 0.0
        when = self.last_check + self.settings.poll_interval
        ticker = self.ticker
        if ticker is None:
            return when - self.clock.seconds()
        return ticker.until(when)

    def sleep_until_check(self):
        """Wait (interruptibly) until the next check or renewal: on the
        ticker's tick when there is one."""
        ticker = self.ticker
        if ticker is None:
            return self.sleep(self.next_wait())
        return self.wait_for(task.deferLater(ticker, max(0.0, self.next_wait())))

    def next_wait(self):
        """Seconds until a check is due (or, announced mail, may be fetched)
        or the connection is to be replaced."""
        check = 0.0 if self.dirty else self.due()
        return min(max(check, self.held_off()), self.reauth.until())

    def held_off(self):
        """Seconds still to wait before a fetch (see :meth:`hold_off`); 0: none."""
        if self.not_before is None:
            return 0.0
        return max(0.0, self.not_before - self.clock.seconds())

    def hold_off(self, seconds):
        """No fetch for ``seconds`` (a sink's ``Retry-After``, at most
        :data:`MAX_HOLD_OFF`); the connection stays held, new mail remembered."""
        self.not_before = self.clock.seconds() + min(float(seconds), MAX_HOLD_OFF)

    def fetched(self):
        """A poll succeeded: the failure counts start again."""
        self._backoff = backoff.HEALTHY
        self.reauth.fetched()

    def wake(self):
        """New mail: fetch at once (a plain wait is cut short)."""
        self.dirty = True
        if self.state == WAITING and self._waiting is not None and not self._waiting.called:
            self._waiting.cancel()

    # -- states --------------------------------------------------------------

    def _enter(self, state):
        if state not in TRANSITIONS[self.state]:
            raise AssertionError(f"held {self.account_id}: {self.state} -> {state}")
        self.state = state
        self.history.append(state)
        if len(self.history) > 16:  # thousands of these: keep it small
            del self.history[:8]

    def _interrupt(self):
        self.waits.interrupt()
        if self._waiting is not None and not self._waiting.called:
            self._waiting.cancel()

    def _abort(self, timeout):
        polling = self.polling
        if polling is not None and not polling.called:
            self.log.warn("held {account_id}: still fetching after the {grace:g} s grace "
                          "period: cancelled (nothing more is marked; the next start "
                          "finds the rest)", account_id=self.account_id, grace=timeout)
            polling.cancel()
        conn = self.conn
        if conn is not None and not conn.client.closed and conn.client.transport is not None:
            conn.client.transport.abortConnection()

    # -- the loop ------------------------------------------------------------

    async def _run(self):
        try:
            while not self.stopping:
                if self.fallback.active:
                    self._enter(FALLBACK)
                    await self.fallback.run()
                elif not self.pool.try_hold(self.host):
                    self.fallback.start(f"max_connections_per_host reached for {self.host}")
                else:
                    try:
                        await self._connection()
                    finally:
                        self.pool.release(self.host)
        except Stopped:
            pass
        finally:
            self._closed()

    async def _connection(self):
        """Open, hold until lost or stopped, close."""
        self._enter(CONNECTING)
        try:
            conn = await self.wait_for(self.open())
        except Stopped:
            raise
        except Exception as e:
            error = as_error(e, errors.CONNECT)
            if too_many_connections(error):
                self.fallback.start(error.message)
                return
            await self._failed(error)
            return
        opened = self.clock.seconds()
        lost = await self._held(conn)
        if lost is None or self.stopping:
            return
        reason = self.reauth.reason(lost)
        self.reconnects += 1
        self.pool.reconnected(reason)
        held_for = self.clock.seconds() - opened
        if self.reauth.quiet(reason) or (lost.routine and self._backoff.failures == 0
                                         and held_for >= self.settings.min_hold):
            self.log.debug("held {account_id}: connection replaced after {seconds:.0f} s "
                           "({why}); reconnecting", account_id=self.account_id,
                           seconds=held_for, why=lost.error.message)
            return  # routine (idle timeout, restart, BYE, a token): reconnect at once
        await self._failed(lost.error)

    async def _held(self, conn):
        """Hold ``conn`` until lost or stopped, then close it: the
        :class:`~fido_tx.sources.imap.heldconn.Lost`, or None."""
        self.conn = conn
        self.pool.held += 1
        conn.client.observer = self.waits.observer(conn)
        _idle.keepalive(conn.client.transport)
        self.reauth.held(conn)
        lost = None
        try:
            await self._hold(conn)
        except Lost as e:
            lost = e
        finally:
            self.pool.held -= 1
            conn.client.observer = None
            if self.stopping:
                self._enter(CLOSING)
                await _idle.logout(conn.client, self.settings.logout_timeout)
            elif lost is not None and lost.reason == TOKEN_RENEWAL:
                await _idle.logout(conn.client, self.settings.logout_timeout)
            elif not conn.client.closed and conn.client.transport is not None:
                conn.client.transport.abortConnection()
            self.conn = None
            if conn.on_close is not None:
                conn.on_close()
        return lost

    async def _hold(self, conn):
        self.last_check = None
        self._enter(FETCHING)
        await self.fetch.run(conn, synced=True)  # what came while no connection was held
        while not self.stopping:
            if self.reauth.due():
                self._enter(RENEWING)
                await self.reauth.renew()  # Lost when renewed: a new connection
            elif (self.dirty or self.due() <= 0) and self.held_off() <= 0:
                self._enter(FETCHING)
                await self.fetch.run(conn)
            elif self.waits.uses_idle(conn):
                self._enter(IDLING)
                await self.waits.idle(conn)
            else:
                self._enter(WAITING)
                await self.waits.plain(conn)

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
        await self.sleep(delay)

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
