"""The composition root: one ``MultiService`` wiring every part of Fido.

Data flows one way::

    accounts file -> AccountsSource -> Scheduler -> sources.make_session -> sink of the account's delivery
                                           \\-> StatusTracker -> Reporter, metrics, account hash

One :class:`~fido_tx.redis.connection.RedisConnection` is shared by the
sinks (``[delivery.NAME]``), the account state, the heartbeat and
backpressure; its state pauses and resumes the scheduler.

This is the only module (with the CLI and the twistd entry point) that is
handed the real reactor; everything below gets it as a parameter.  Children
start in the order they are added and stop in reverse: the HTTP endpoint and
the accounts source stop first, then the scheduler lets running sessions finish
their batch (``grace_period``), and only then do the reporter and the Redis
connection close, so a session never loses its sink mid-batch.
"""

import os
import signal

from twisted.application import service
from twisted.internet import defer
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

import fido_tx
from fido_tx import private
from fido_tx.interfaces import IBacklog
from fido_tx.observe import logs
from fido_tx.redis.heartbeat import instance_id

log = Logger()


class StartupError(Exception):
    """The daemon cannot start; ``str()`` is one line (no traceback)."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


class FidoService(service.MultiService):
    """The daemon's top service.  Gives twistd Fido's log observer."""

    def __init__(self, observer=None):
        super().__init__()
        self._observer = observer
        self.parts = {}

    #: the reactor whose recorded exit signal a clean stop clears (twistd only)
    clean_exit_reactor = None

    def setServiceParent(self, parent):
        # twistd asks the application for an ILogObserver after makeService;
        # this is the supported way for a plugin to choose its log output.
        if self._observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self._observer)
        return super().setServiceParent(parent)

    @defer.inlineCallbacks
    def stopService(self):
        """Stop the children in reverse order, each once the previous one
        has stopped.

        ``MultiService.stopService`` stops them all at the same moment: the
        Redis store closed while the scheduler was still waiting out the
        grace period, so every running session's next store failed ("the
        store is not running") instead of finishing its batch.
        """
        service.Service.stopService(self)
        for child in reversed(list(self)):
            try:
                yield defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {child!r} failed", child=child)
        if self.clean_exit_reactor is not None:
            # twistd ends by re-raising the signal that stopped the reactor,
            # so a SIGTERM'd daemon would exit -15.  Every session has
            # finished its batch or been aborted unmarked by now: that is a
            # clean stop, and it exits 0.
            private.clear_exit_signal(self.clean_exit_reactor)
            log.info("Fido stopped cleanly")


class _RedisAtStart(service.Service):
    """Redis unreachable from the start (down, wrong password, NOAUTH) is
    an outage like one that begins later: the status tracker reports it
    after the same grace period.  The store notifies its observers only of
    connections made and lost, so this says "down" once at start unless the
    connection is already up; the first connection cancels it."""

    def __init__(self, store, status):
        self._store = store
        self._status = status

    def startService(self):
        super().startService()
        if not getattr(self._store, "connected", False):
            self._status.redis_state(False)

    def stopService(self):
        self._status.stop()
        return super().stopService()


class _ReloadOnHangup(service.Service):
    """SIGHUP (``systemctl reload fido``) reloads the accounts file now.

    Without it SIGHUP would end the process.  Only the twistd entry point
    installs it: a library or a test must not take over a signal.
    """

    def __init__(self, reactor, source):
        self._reactor = reactor
        self._source = source
        self._previous = None

    def _hangup(self, signum, frame):
        log.info("SIGHUP: reloading the accounts file")
        self._reactor.callFromThread(self._source.reload)

    def startService(self):
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self):
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        return super().stopService()


class _Stoppable(service.Service):
    """Runs a callable on stop (for parts that are not services themselves)."""

    def __init__(self, on_stop):
        self._on_stop = on_stop

    def stopService(self):
        self._on_stop()
        return super().stopService()


class DeliveryCheck:
    """Drops the accounts whose ``delivery`` names no ``[delivery.NAME]``
    table: one error line (and one ``config`` report) per account and
    problem, like the other bad entries of the accounts file."""

    def __init__(self, deliveries, report=None):
        self._names = frozenset(deliveries)
        self._report = report
        self._reported = frozenset()

    def __call__(self, accounts):
        kept, problems = [], {}
        for account in accounts:
            if account.delivery in self._names:
                kept.append(account)
            else:
                problems[account.id] = (
                    f"account {account.id}: delivery {account.delivery!r} names no "
                    f"[delivery.{account.delivery}] table in fido.toml (known: "
                    f"{', '.join(sorted(self._names))}); this account is left out until it is fixed"
                )
        for account_id, message in problems.items():
            if message not in self._reported:
                log.error("{problem}", problem=message, account_id=account_id)
                if self._report is not None:
                    self._report(message=message, account=account_id)
        self._reported = frozenset(problems.values())
        return tuple(kept)


def _session_factory(reactor, settings, sinks, dry_run, memory=None, held=None,
                     graph=None, positions=None, tls=None):
    """``f(account, handle=None) -> Deferred[SessionResult]``: a new session
    of the account's source (:func:`fido_tx.sources.make_session`) delivering
    to the sink of its ``delivery`` (``sinks``: name -> ISink), polled."""
    import attr

    from fido_tx import routing, sources
    from fido_tx.credentials import CredentialsContext, for_account
    from fido_tx.schedule import budget, pacer
    from fido_tx.sources.imap import identity as imap_identity
    from fido_tx.sources.imap.connect import Connector

    # OAuth2 token providers are shared per grant; Microsoft's rotated refresh
    # tokens are kept in the state dir, encrypted with the key file
    credentials_ctx = CredentialsContext(
        reactor=reactor, key_file=settings.fido.key_file,
        state_dir=settings.fido.state_dir or os.path.dirname(settings.fido.accounts_file))
    ctx = sources.SourceContext(
        reactor=reactor,
        sink=None,
        settings=settings.imap,
        # one budget for the bodies in flight of all sessions: memory stays
        # bounded whatever the number of workers
        budget=budget.ByteBudget(settings.imap.max_inflight_bytes),
        # and session starts spread over reactor turns: thousands starting
        # at once stalled the reactor for seconds (8.5 s for 10,000)
        pacer=pacer.StartPacer(reactor),
        # endpoints, TLS options and resumable TLS sessions, shared
        connector=Connector(reactor, tls=tls),
        # the UIDVALIDITY each mailbox was last polled in: a poll in the same
        # one needs no check of new UIDs against the messages stored before
        epochs=imap_identity.Epochs(),
        credentials=lambda account: for_account(account, credentials_ctx),
        dry_run=dry_run,
        debug=settings.log.level == "debug",
        memory=memory,
        # accounts with idle = true keep their connection and wait in IDLE
        held=held,
        # Graph: one HTTP pool, the per-mailbox gates, the Redis connection
        graph=graph,
        # IMAP select = "new" / start_from = "now": where each mailbox stands
        positions=positions,
    )

    # one context per delivery: a session sees only its own sink, which sets
    # each message's route_key when [routing] template is set
    router = routing.Router(settings.routing.template)
    contexts = {name: attr.evolve(ctx, sink=routing.routed(sink, router))
                for name, sink in sinks.items()}

    def session_factory(account, handle=None):
        return sources.make_session(account, contexts[account.delivery], handle).poll()

    return session_factory


def _sessions(top, reactor, settings, redis, sinks, ident, session_factory):
    """``(session_factory, held, balancer)``: the sources' sessions (unless a
    factory is given), the held connections (None unless IMAP IDLE may be
    used), the lease balancer around them (None unless ``[cluster] mode =
    "lease"``)."""
    handles = session_factory is None
    held = None
    if session_factory is None:
        session_factory, held = _sources(top, reactor, settings, redis, sinks,
                                         settings.fido.dry_run)
    balancer = None
    if settings.cluster.mode == "lease":
        balancer, session_factory = _leases(reactor, settings, redis, ident, session_factory,
                                            handles)
    return session_factory, held, balancer


def _scheduler(top, reactor, settings, session_factory, handles, redis, sinks, status, gate):
    """The scheduler (a child of ``top``, after what pauses it: Redis down,
    backpressure), with the result observers of the status side."""
    from fido_tx.schedule import scheduler as scheduler_mod

    fido = settings.fido
    sched = scheduler_mod.Scheduler(
        reactor,
        session_factory,
        workers=fido.workers,
        poll_interval=fido.poll_interval,
        backoff=settings.backoff,
        grace_period=fido.grace_period,
        handles=handles,
    )
    status.scheduler = sched
    sched.add_result_observer(gate.record)  # the tracker writes the history too

    _pause_while_redis_is_down(redis, sched, status, gate)
    # never connected yet: reported like an outage that begins later
    _RedisAtStart(redis, status).setServiceParent(top)
    if not fido.dry_run:
        _backpressure(top, reactor, sinks, sched, status, settings.redis.max_backlog)
    sched.setServiceParent(top)
    return sched


def _wire_balancer(top, balancer, sched, redis):
    """The lease balancer asks the scheduler what is busy, stops the sessions
    of leases lost, polls soon the accounts of leases gained."""
    balancer.is_busy = _lease_busy(balancer, sched)
    balancer.on_lost = sched.stop_session
    balancer.on_change = _lease_gained(balancer, sched)
    redis.add_connection_observer(lambda up: up and balancer.kick())
    balancer.setServiceParent(top)


def make_service(
    settings,
    reactor,
    created_config=False,
    twistd_logfile="",
    twistd_syslog=False,
    session_factory=None,
    observer=None,
    handle_signals=False,
):
    """Build the service tree for ``settings``.

    :param session_factory: ``f(account) -> Deferred[SessionResult]``; by
        default a session of the account's source (:mod:`fido_tx.sources`).
    :param observer: a log observer to install instead of the configured one
        (``False``: leave logging alone, for tests and the demo).
    :param handle_signals: reload the accounts file on SIGHUP (twistd only).
    """
    from fido_tx import resolve

    # every session resolves its server's name: answers kept for a minute
    resolve.install(reactor)

    top = FidoService(_daemon_observer(settings, reactor, observer, twistd_logfile,
                                       twistd_syslog) or None)
    _announce(settings, created_config)

    ident = instance_id()
    # TLS (pyOpenSSL, the servers' contexts) loaded now, before the reactor
    # runs, when the configuration uses it: not in the first TLS session's turn
    top.parts["tls"] = _tls_preload(settings, own_sources=session_factory is None)
    redis, sinks, account_state = _redis_parts(top, reactor, settings)

    reporter, metrics, status, gate, sessions = _status_parts(
        top, reactor, settings, redis, account_state)

    handles = session_factory is None  # a given factory takes the account only
    session_factory, held, balancer = _sessions(top, reactor, settings, redis, sinks, ident,
                                                session_factory)
    sched = _scheduler(top, reactor, settings, session_factory, handles, redis, sinks,
                       status, gate)
    if held is not None:
        # stops just before the scheduler: held connections start their DONE
        # and LOGOUT at once, and the scheduler's stop waits for them within
        # the one grace period
        held.setServiceParent(top)
    if balancer is not None:
        _wire_balancer(top, balancer, sched, redis)

    source = _accounts(top, reactor, settings, sinks, sched, status, gate, balancer,
                       handle_signals)

    health, view, instances = _watching(top, reactor, settings, ident, redis, sinks, sched,
                                        reporter, metrics, status, sessions, balancer, held)

    top.parts.update(
        redis=redis, sinks=sinks, account_state=account_state,
        reporter=reporter, metrics=metrics, status=status,
        scheduler=sched, source=source, health=health, gate=gate, sessions=sessions,
        view=view, instances=instances, balancer=balancer, held=held,
    )
    return top


def _daemon_observer(settings, reactor, observer, twistd_logfile, twistd_syslog):
    """The log observer ``make_service`` installs: ``observer`` when given,
    else the configured one (none under ``--syslog``), its buffered lines
    written when the reactor has stopped."""
    if observer is None and not twistd_syslog:
        observer = _log_observer(settings, twistd_logfile, reactor)
        # the buffered lines written before twistd's exit (atexit covers the
        # lines twistd logs after the reactor stops, on a clean exit)
        reactor.addSystemEventTrigger("after", "shutdown", observer.flush)
    return observer


def _leases(reactor, settings, redis, ident, session_factory, handles):
    """``[cluster] mode = "lease"``: the balancer, and a session factory that
    runs a session only while this instance holds the account's lease (the
    others end at once as ``skipped``: not backed off, not reported)."""
    from fido_tx.outcome import SessionResult
    from fido_tx.redis.lease import RedisLeases
    from fido_tx.schedule.cluster import LeaseBalancer

    ttl = settings.cluster.lease_ttl
    balancer = LeaseBalancer(reactor, RedisLeases(redis, ident, ttl), ttl)

    def leased(account, *handle):
        if not balancer.holds(account.id):
            balancer.giving_up.discard(account.id)
            return defer.succeed(SessionResult(account.id, skipped=True))
        if account.id in balancer.giving_up:  # its held connection was just ended
            return defer.succeed(SessionResult(account.id, skipped=True))
        return session_factory(account, *handle)

    #: accounts whose held connection was ended so that their lease can go
    balancer.giving_up = set()
    return balancer, leased


def _lease_gained(balancer, sched):
    """The balancer's ``on_change``: leases taken (maybe back) are polled
    soon, and a held connection may start again for them."""

    def gained(account_ids):
        balancer.giving_up.difference_update(account_ids)
        sched.poll_soon(account_ids)

    return gained


def _lease_busy(balancer, sched):
    """The balancer's ``is_busy``: a session runs for the account.  A held
    connection (idle, no slot) would run for ever: it is ended (DONE, LOGOUT)
    and no new one starts, so that a later tick can release the lease."""

    def is_busy(account_id):
        if account_id not in sched.running_ids():
            return False
        if sched.is_held(account_id) and account_id not in balancer.giving_up:
            balancer.giving_up.add(account_id)
            sched.stop_session(account_id)
        return account_id in sched.running_ids()

    return is_busy


def _log_observer(settings, twistd_logfile, reactor):
    try:
        return logs.make_observer(settings.log, twistd_logfile=twistd_logfile, clock=reactor)
    except OSError as e:
        where = settings.log.file or twistd_logfile
        raise StartupError(f"cannot open the log file {where} ([log] file): "
                           f"{e.strerror or e}") from None


def _announce(settings, created_config):
    fido = settings.fido
    if created_config:
        log.warn(
            "No fido.toml was found; wrote a commented default to {path} and "
            "running with it. Edit it (accounts_file, [redis] url) and restart.",
            path=settings.path,
        )
    log.info(
        "Fido {version} starting: config {path}, {workers} workers, poll every "
        "{poll_interval} s{dry}",
        version=fido_tx.__version__, path=settings.path or "(built-in)",
        workers=fido.workers, poll_interval=fido.poll_interval,
        dry=", DRY RUN: nothing is written to Redis or changed on the servers"
        if fido.dry_run else "",
    )


def _status_parts(top, reactor, settings, redis, account_state):
    """The reporter, the metrics (only with ``[http] listen``), the status
    tracker, its restore gate, and the session history."""
    from fido_tx.observe import history, report
    from fido_tx.observe import restore as restore_mod
    from fido_tx.observe import status as status_mod

    reporter = report.Reporter(reactor, settings.reporter)
    reporter.setServiceParent(top)

    # /metrics is the only reader of the counters: with the HTTP endpoint
    # off, neither they nor twisted.web and prometheus_client are loaded
    # (~5 MiB and ~50 ms of start-up)
    metrics = None
    if settings.http.listen:
        from fido_tx.observe import metrics as metrics_mod

        metrics = metrics_mod.Metrics()
    status = status_mod.StatusTracker(reactor, account_state, reporter, metrics,
                                      dry_run=settings.fido.dry_run, redis=redis)
    # the tracker starts each account from its hash in Redis: reports are
    # sent on real changes only, across restarts
    gate = restore_mod.RestoreGate(
        reactor, status, history.AccountStateReader(redis.execute), connected=False
    )
    sessions = history.SessionLog(reactor, redis.execute, keep=settings.http.recent_sessions,
                                  script=redis.script)
    # the history entry goes with the session's hash fields: one script call
    account_state.history = sessions
    return reporter, metrics, status, gate, sessions


def _watching(top, reactor, settings, ident, redis, sinks, sched, reporter, metrics, status,
              sessions, balancer, held):
    """What others watch: the heartbeat, the health check, and (with
    ``[http] listen``) /metrics, /healthz and the status page."""
    from fido_tx import sinks as sinks_mod
    from fido_tx.observe import health as health_mod
    from fido_tx.redis import heartbeat as heartbeat_mod

    dry_run = settings.fido.dry_run
    if not dry_run:
        heartbeat_mod.Heartbeat(
            reactor, heartbeat_mod.HeartbeatWriter(redis), sched, ident,
            accounts=(lambda: len(balancer.held)) if balancer is not None else None,
            held=held,
        ).setServiceParent(top)

    health = health_mod.Health(reactor, sched, redis, status=status)
    sched.add_result_observer(health.observe)
    view = instances = None
    if metrics is not None:
        default = sinks.get(sinks_mod.DEFAULT_DELIVERY)
        backlog = default if IBacklog.providedBy(default) else None
        metrics.bind(scheduler=sched, redis=redis, reporter=reporter, status=status,
                     backlog=backlog, held=held)
        view, instances = _serve_http(reactor, settings.http, top, metrics, health, view_parts=dict(
            tracker=status, scheduler=sched, redis=redis, backlog=backlog, sessions=sessions))
    return health, view, instances


def _sources(top, reactor, settings, redis, sinks, dry_run):
    """The sessions of every source, and the held IMAP connections."""
    import sys

    from fido_tx.redis.positions import MailboxPositions
    from fido_tx.schedule.ticker import PollTicker
    from fido_tx.sources import OnDemand
    from fido_tx.sources.imap.holding import HeldConnections

    held = HeldConnections(settings, ticker=PollTicker(reactor, settings.imap.poll_tick))

    def make_graph():  # for the first Graph session: no Graph code otherwise
        from fido_tx.sources import graph as graph_mod

        return graph_mod.GraphShared.create(
            reactor, redis=redis, settings=graph_mod.GraphSettings.from_imap(settings.imap))

    graph = OnDemand(make_graph)

    def close():
        if graph.value is not None:
            graph.value.close()
        oauth = sys.modules.get("fido_tx.credentials.oauth")  # imported by an OAuth2 account
        if oauth is not None:
            oauth.close_shared()

    _Stoppable(close).setServiceParent(top)
    factory = _session_factory(reactor, settings, sinks, dry_run, held=held, graph=graph,
                               positions=MailboxPositions(redis),
                               tls=top.parts["tls"].contexts)
    return factory, held


def _accounts(top, reactor, settings, sinks, sched, status, gate, balancer, handle_signals):
    """The accounts file, loaded now and watched: each change is applied to
    the scheduler (and the lease balancer, the restore gate, the tracker)."""
    from fido_tx.accounts import reload, watch

    fido = settings.fido
    routable = DeliveryCheck(sinks, report=status.report_config)

    def apply(accounts, diff):
        # the first load runs in makeService; a reload adding the first TLS
        # account preloads in its own turn
        top.parts["tls"].accounts(diff.added + diff.changed)
        gate.add([account.id for account in diff.added])
        accounts = routable(accounts)
        if balancer is not None:
            balancer.set_accounts(account.id for account in accounts)
        sched.set_accounts(accounts)
        for account in diff.removed:
            gate.forget(account.id)
            status.forget(account.id)

    source = reload.AccountsSource(
        reactor,
        fido.accounts_file,
        fido.key_file,
        apply=apply,
        watcher_factory=lambda path, callback: watch.make_watcher(
            reactor, path, callback, mode=fido.watch
        ),
        report=status.report_config,
        cache_path=os.path.join(
            fido.state_dir or os.path.dirname(fido.accounts_file), ".fido-accounts.last-good"
        ),
        shard=fido.shard,
    )
    # The first load happens now, so that a bad accounts file (with no last
    # good copy) stops the start with one line instead of a running daemon
    # that fetches nothing.
    source.load_initial()
    source.setServiceParent(top)
    if handle_signals:
        _ReloadOnHangup(reactor, source).setServiceParent(top)
        top.clean_exit_reactor = reactor
    return source


def _tls_preload(settings, own_sources):
    """The :class:`~fido_tx.tlspreload.TlsPreload` of the daemon, with the
    IMAP source's shared TLS contexts when its sessions are Fido's own, and
    what ``settings`` connect to over TLS preloaded."""
    from fido_tx.tlspreload import TlsPreload

    from fido_tx.sources.imap.connect import TlsContexts

    preload = TlsPreload(TlsContexts(), sessions=own_sources)
    preload.settings(settings)
    return preload


def _redis_parts(top, reactor, settings):
    """The one shared Redis connection (a child of ``top``), the sinks of the
    ``[delivery.NAME]`` tables on it, and the account state on it."""
    from fido_tx import sinks as sinks_mod
    from fido_tx.redis import connection as connection_mod
    from fido_tx.redis import state as state_mod

    redis = connection_mod.RedisConnection(reactor, settings.redis)
    redis.setServiceParent(top)
    ctx = sinks_mod.SinkContext(reactor, redis, dry_run=settings.fido.dry_run, log=log,
                                min_replicas=settings.redis.min_replicas,
                                replica_timeout=settings.redis.replica_timeout)
    sinks = sinks_mod.delivery_sinks(settings, ctx)
    for sink in sinks.values():
        # a sink with resources of its own (the webhook's connection pool, a
        # sidekiq redis_url connection) is a Service: started after the shared
        # connection, stopped before it
        if service.IService.providedBy(sink):
            sink.setServiceParent(top)
    # the account hashes written behind, a window's sessions in one send
    # (fido_tx.redis.state; bench/README "The Redis side")
    return redis, sinks, state_mod.AccountState(redis, clock=reactor,
                                                delay=state_mod.WRITE_BEHIND)


def _pause_while_redis_is_down(redis, sched, status, gate):
    """Redis down: no new sessions (running ones stop at their next message,
    because the sink refuses to confirm).  Start paused until connected."""
    sched.pause("redis")

    def redis_state(connected):
        if connected:
            sched.resume("redis")
        else:
            sched.pause("redis")
        status.redis_state(connected)
        gate.redis_state(connected)

    redis.add_connection_observer(redis_state)


def _backpressure(top, reactor, sinks, sched, status, max_backlog):
    """One watcher per delivery whose queue an importer drains."""
    from fido_tx import sinks as sinks_mod
    from fido_tx.schedule import backpressure

    for name, sink in sinks.items():
        if not IBacklog.providedBy(sink):
            continue
        pressure = backpressure.Backpressure(
            reactor, sink, sched, max_backlog, on_change=status.backlog_state,
            reason="backlog" if name == sinks_mod.DEFAULT_DELIVERY else f"backlog:{name}",
        )
        sched.add_result_observer(pressure.after_session)
        _Stoppable(pressure.stop).setServiceParent(top)


def _serve_http(reactor, http, top, metrics, health, view_parts):
    """The status page, ``/healthz`` and ``/metrics`` on ``http.listen``.

    :return: ``(StatusView, InstanceWatch)``.
    """
    from fido_tx.observe import history, listen, rate, view as view_mod

    parts = dict(view_parts)
    per_minute = rate.PerMinute(reactor)
    parts["scheduler"].add_result_observer(per_minute.record)
    instances = history.InstanceWatch(reactor, parts["redis"].execute)
    instances.setServiceParent(top)
    view = view_mod.StatusView(
        reactor, parts.pop("tracker"), throughput=per_minute, instances=instances, **parts
    )
    credentials = _credentials(http)

    def make_site():  # twisted.web is imported for the first connection
        from fido_tx.observe import web

        return web.make_site(metrics, health, view, credentials)

    site = listen.SiteOnFirstConnection(make_site)
    # listen now: a port in use or a bad address stops the start with one line
    port = listen.listen_now(reactor, http.listen, site)
    listen.HttpService(port).setServiceParent(top)
    exposed = listen.beyond_loopback(port)
    if exposed:
        log.warn(
            "/metrics and /healthz listen on {address}, beyond loopback, with no "
            "authentication: anyone who can reach it reads them. Set [http] listen "
            'to "tcp:9119:interface=127.0.0.1" or firewall the port.',
            address=exposed,
        )
    return view, instances


def _credentials(http):
    """``(username, password)`` of the status page, or None (config checked them)."""
    if not http.username:
        return None
    from fido_tx import config

    return http.username, config.read_password(http.password_file)
