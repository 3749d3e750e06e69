"""The IMAP source's side of a held connection: ``open`` and ``poll`` for
:class:`~fido_tx.sources.imap.held.HeldAccount`, made of the session's own
parts (:class:`~fido_tx.sources.imap.login.Login`,
:class:`~fido_tx.sources.imap.poll.MailboxPoll`).

- :meth:`HeldImap.open`: wait for the start pacer, connect, log in, SELECT
  (EXAMINE in a dry run) -> :class:`~fido_tx.sources.imap.held.HeldConnection`;
- :meth:`HeldImap.poll`: one check on the held connection: ``UID SEARCH``,
  ask the sink, fetch, deliver, mark, exactly as a session does (the worker
  slot is taken before, by the held account's ``ready``), without STATUS (RFC 3501: not on the
  selected mailbox) and without SELECT (the mailbox stays selected; a
  server that changes UIDVALIDITY under a selected mailbox closes it, and
  the reconnect selects again).

Both fail only as the session does: ``open`` errbacks with a
:class:`~fido_tx.errors.FidoError`; ``poll`` fires with a
:class:`~fido_tx.outcome.SessionResult` whose texts are scrubbed.

In the daemon, :class:`HeldSession` is the scheduler's session of an IMAP
account with ``idle = true``: it gives its worker slot back at once, holds
the connection for as long as the account is scheduled, takes a slot for
each fetch (:meth:`SessionHandle.take_slot`: this also waits while fetching
is paused), hands each fetch's result to the scheduler's observers
(:meth:`SessionHandle.report`), and ends (``skipped``) when stopped.
:class:`HeldConnections` is what they share (the per-host limit, the
counts for /metrics and the heartbeat) and starts stopping them all first
on SIGTERM (DONE, LOGOUT); the scheduler's stop then waits for them within
the same ``grace_period``.
"""

import gc
import random as _random

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import failure
from zope.interface import implementer

from fido_tx import errors
from fido_tx.credentials import for_account
from fido_tx.errors import FidoError
from fido_tx.interfaces import ISource
from fido_tx.outcome import SessionResult
from fido_tx.scrub import scrub
from fido_tx.sources.imap.client import ImapCommandError
from fido_tx.sources.imap.connect import Connector
from fido_tx.sources.imap.held import HeldAccount, HeldConnection, HeldPool, HeldSettings
from fido_tx.sources.imap.login import Login
from fido_tx.sources.imap.poll import MailboxPoll
from fido_tx.sources.imap.session import StepLog, new_session_id

_log = Logger()


class HeldMailboxPoll(MailboxPoll):
    """A :class:`MailboxPoll` on a mailbox that is already selected."""

    def __init__(self, info, *args, **kw):
        super().__init__(*args, **kw)
        self.info = info

    status_allowed = False  # no STATUS on the selected mailbox: UID SEARCH answers
    search_with_select = False  # no SELECT to write it behind

    async def select(self):
        return self.info


#: held connections being opened (connect, TLS, login, SELECT) at once
OPENING_MAX = 64
#: of which over TLS (implicit or STARTTLS): finishing a handshake costs
#: ~1.8 ms of CPU here, and the answers of all those opening can arrive in
#: one reactor turn: 64 at once made a 118 ms stretch of reactor work while
#: 10,000 TLS connections opened (issue 12's bound: 100 ms)
OPENING_TLS_MAX = 32


class OpeningBound:
    """How many held connections may be opening at once: at most ``limit``,
    of which at most ``tls_limit`` over TLS (shared by the daemon's held
    connections)."""

    def __init__(self, limit=OPENING_MAX, tls_limit=OPENING_TLS_MAX):
        self.all = defer.DeferredSemaphore(limit)
        self.tls = defer.DeferredSemaphore(max(1, min(limit, tls_limit)))

    async def run(self, f, tls):
        """``await f()`` within the bound; cancelled while waiting: nothing taken."""
        await self.all.acquire()
        try:
            if not tls:
                return await f()
            await self.tls.acquire()
            try:
                return await f()
            finally:
                self.tls.release()
        finally:
            self.all.release()


class HeldImap:
    """Open and poll one account's held connection.

    :param ctx: the :class:`fido_tx.sources.SourceContext` of every session.
    :param opening: an :class:`OpeningBound` shared by every held
        connection (or ``None``): how many may be
        opening at once.  The start pacer spaces the starts by reactor
        turns, but when 10,000 accounts start, turns are short: all the
        connects went out within seconds and their answers (greetings,
        logins, SELECTs) came back in bursts, hundreds in one reactor turn
        (stalls of 1.2-1.4 s).  With at most :data:`OPENING_MAX` opening,
        a turn has at most that many of them to read.
    """

    def __init__(self, account, ctx, opening=None):
        self.account = account
        self.ctx = ctx
        self.opening = opening
        self.log = ctx.log or _log
        self.connector = ctx.connector if ctx.connector is not None else Connector(ctx.reactor)
        self.credentials = None

    def _credentials(self):
        if self.credentials is None:
            self.credentials = (self.ctx.credentials or for_account)(self.account)
        return self.credentials

    def _forms(self):
        return self.credentials.secret_forms() if self.credentials is not None else ()

    # -- open ------------------------------------------------------------------

    def open(self):
        """Connect, log in, select: a Deferred[HeldConnection]; cancelling aborts."""
        return defer.ensureDeferred(self._open())

    async def _open(self):
        if self.opening is None:
            return await self._open_now()
        return await self.opening.run(self._open_now, self.account.security != "none")

    async def _open_now(self):
        ctx, account = self.ctx, self.account
        step = StepLog(self.log, account.id, new_session_id(), ctx.debug)
        if ctx.pacer is not None:
            await ctx.pacer.wait()
        login = Login(ctx.reactor, self.connector, account, ctx.settings,
                      self._credentials(), step)
        try:
            conn = await login.run()
            info = await MailboxPoll(conn, account, ctx.sink, ctx.settings, step,
                                     dry_run=ctx.dry_run).select()
        except BaseException as e:
            if login.connection is not None:
                login.connection.abort()
                login.connection.forget()
            if isinstance(e, ImapCommandError):
                raise FidoError(errors.PROTOCOL, str(e))
            if isinstance(e, FidoError):
                raise FidoError(e.kind, scrub(e.message, self._forms()),
                                scrub(e.debug, self._forms()))
            raise
        step("holding the connection ({exists} messages)", exists=info.exists)
        lifetime = self.credentials.lifetime() if not conn.proto.preauth else None
        renew_at, expires_at = lifetime if lifetime is not None else (None, None)
        return HeldConnection(client=conn.proto, capabilities=conn.caps, exists=info.exists,
                              state=(conn, info), on_close=conn.forget,
                              renew_at=renew_at, expires_at=expires_at)

    # -- the token (OAuth2) ------------------------------------------------------

    def renew(self):
        """A Deferred fired once a fresh secret is ready for the next login."""
        return self._credentials().secret()

    def invalidate(self):
        """The server refused (or expired) the secret the connection logged in with."""
        self._credentials().invalidate()

    # -- poll ------------------------------------------------------------------

    def poll(self, held):
        """One check on ``held``: a Deferred[SessionResult]; cancelling
        aborts the connection (nothing more is marked), and so does
        ``session_timeout`` (the result then says so)."""
        d = defer.ensureDeferred(self._poll(held))
        limit = self.ctx.settings.session_timeout
        if not limit:
            return d
        timer = self.ctx.reactor.callLater(limit, d.cancel)

        def done(result):
            if timer.active():
                timer.cancel()
                return result
            if isinstance(result, failure.Failure) and result.check(defer.CancelledError):
                return SessionResult(account_id=self.account.id, kind=errors.TIMEOUT,
                                     message=f"poll took longer than session_timeout "
                                             f"({limit:g} s)", dry_run=self.ctx.dry_run)
            return result

        return d.addBoth(done)

    async def _poll(self, held):
        ctx, account = self.ctx, self.account
        conn, info = held.state
        started = ctx.reactor.seconds()
        step = StepLog(self.log, account.id, new_session_id(), ctx.debug)
        p = HeldMailboxPoll(info, conn, account, ctx.sink, ctx.settings, step,
                            budget=ctx.budget, dry_run=ctx.dry_run, positions=ctx.positions,
                            epochs=ctx.epochs)
        error = None
        try:
            await p.run()
        except defer.CancelledError:
            conn.abort()
            raise
        except FidoError as e:
            error = e
        except ImapCommandError as e:
            error = FidoError(errors.PROTOCOL, str(e))
        fields = dict(account_id=account.id, fetched=p.fetched, bytes=p.bytes,
                      marked=p.marked, too_large=tuple(p.too_large), dry_run=ctx.dry_run,
                      seconds=max(0.0, ctx.reactor.seconds() - started),
                      session_id=step.session_id)
        if error is None:
            return SessionResult(**fields)
        forms = self._forms()
        debug = "\n".join([f"server: {account.host}:{account.port} ({account.security}), "
                           "held connection", error.debug] +
                          (["recent protocol lines:"] + ["  " + t for t in conn.proto.trace]
                           if conn.proto is not None else []))
        return SessionResult(kind=error.kind, message=scrub(error.message, forms),
                             debug=scrub(debug, forms), **fields,
                             retry_after=error.retry_after)


class GcFreezer:
    """``gc.freeze()`` when the first connection settles in IDLE (the
    start-up's objects: modules, settings, accounts), then every ``every``
    calls: each connection that settles in IDLE, and each held account
    started (thousands wait for their turn to open while 10,000 start, each
    a coroutine chain and its Deferreds: a full collection that walked them
    all was the longest stall left, 132 ms of CPU).

    Thousands of held connections are long-lived objects; every full
    collection walked all of them (3.6 s with 10,000 TLS connections, a
    stall of the reactor).  Frozen objects are not scanned again.

    Before each freeze the garbage is collected, so that none is frozen:
    the first time the young generations only (a full collection would walk
    every start-up object once more); later a full one, which walks only
    what came since the last freeze (``every`` connections' worth, a few
    milliseconds), because frozen objects are not walked.  A young
    collection alone froze the cyclic garbage that had reached the oldest
    generation while its connection was being set up (Twisted's
    ``HostnameEndpoint.connect`` makes a class per connect): ~3.4 KiB per
    held connection.
    """

    #: the daemon calls it for each held account started too (benches
    #: mirroring the daemon check this)
    counts_starts = True

    def __init__(self, every=250, freeze=None):
        self.every = every
        self.freeze = freeze or _collect_and_freeze
        self._since = every - 1  # the first one freezes
        self._first = True

    def __call__(self):
        self._since += 1
        if self._since >= self.every:
            self._since = 0
            first, self._first = self._first, False
            self.freeze(1 if first else 2)


def _collect_and_freeze(generation):
    gc.collect(generation)
    gc.freeze()


class HeldConnections(service.Service):
    """The held connections of one daemon: shared pool and settings, and
    the polite stop of them all (put it after the scheduler in the service
    tree, so that it stops first).

    :param settings: :class:`fido_tx.config.Settings`.
    :param ticker: a :class:`~fido_tx.schedule.ticker.PollTicker` (the
        composition root makes it on the reactor, ``[imap] poll_tick``).
    """

    name = "held-connections"

    def __init__(self, settings, random=None, ticker=None):
        self.settings = HeldSettings.from_settings(settings)
        #: called as held accounts start and as their connections settle
        self.freezer = GcFreezer()
        #: the shared ticks their checks are due on (see
        #: :mod:`fido_tx.schedule.ticker`; None: each account its own timer)
        self.ticker = ticker
        self.pool = HeldPool(settings.imap.max_connections_per_host, on_idle=self.freezer,
                             ticker=ticker)
        #: the connections being opened at once (see :class:`HeldImap`)
        self.opening = OpeningBound()
        self.random = random if random is not None else _random.Random()
        self.grace_period = settings.fido.grace_period
        #: account id -> HeldAccount
        self.machines = {}
        #: True once stopped: no new held connection
        self.stopping = False

    def snapshot(self):
        """``{"held", "idling", "reconnects", "fallback"}`` now, and
        ``"reasons"``: the reconnects by reason."""
        return dict(self.pool.snapshot(), reasons=dict(self.pool.reasons))

    def stopService(self):
        """Start stopping every held connection (DONE, LOGOUT; a fetch in
        progress gets ``grace_period``) and return at once: the scheduler's
        stop, next, waits for their sessions within the same grace period
        (one grace period in all, not two in a row)."""
        super().stopService()
        self.stopping = True
        machines = list(self.machines.values())
        if machines:
            _log.info("stopping {n} held connections (DONE, LOGOUT)", n=len(machines))
        for m in machines:
            m.stop(timeout=self.grace_period)


@implementer(ISource)
class HeldSession:
    """The scheduler's session of an ``idle = true`` IMAP account: lasts
    as long as its held connection (see the module docstring)."""

    def __init__(self, account, ctx, handle, held, fresh):
        self.account = account
        self.ctx = ctx
        self.handle = handle
        self.held = held
        #: ``() -> Deferred[SessionResult]``: an ordinary session (fallback)
        self.fresh = fresh
        self.machine = None

    def poll(self):
        account, held = self.account, self.held
        if held.stopping:  # the scheduler may still start sessions meanwhile
            return defer.succeed(SessionResult(account_id=account.id, skipped=True))
        source = HeldImap(account, self.ctx, opening=held.opening)
        machine = self.machine = HeldAccount(
            account.id, account.host, source.open, source.poll, self.handle.report,
            self.ctx.reactor, held.settings, held.pool, held.random,
            poll_fresh=self.fresh, ready=self.handle.take_slot, log=self.ctx.log,
            tokens=source)
        outer = defer.Deferred(lambda d: machine.stop(timeout=held.grace_period))
        held.machines[account.id] = machine
        self.handle.release_slot()  # a held connection waits without a slot

        def closed(_):
            if held.machines.get(account.id) is machine:
                del held.machines[account.id]
            if not outer.called:
                outer.callback(SessionResult(account_id=account.id, skipped=True))

        machine.start()
        machine.closed().addCallback(closed)
        held.freezer()
        return outer
