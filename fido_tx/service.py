"""The composition root: one ``MultiService`` wiring every part of Fido.

Data flows one way::

    accounts file -> AccountsSource -> Scheduler -> fetch_mailbox -> RedisStore
                                           \\-> StatusTracker -> Reporter, metrics, account hash

This is the only module (with the CLI and the twistd entry point) that is
handed the real reactor; everything below gets it as a parameter.  Children
start in the order they are added and stop in reverse: the HTTP endpoint and
the accounts source stop first, then the scheduler lets running sessions finish
their batch (``grace_period``), and only then do the reporter and the Redis
connection close, so a session never loses its sink mid-batch.
"""

import os
import signal
import socket

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

import fido_tx
from fido_tx.observe import logs

log = Logger()

HEARTBEAT_INTERVAL = 15.0
HEARTBEAT_TTL = 45


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
            self.clean_exit_reactor._exitSignal = None
            log.info("Fido stopped cleanly")


class _Heartbeat(service.Service):
    """Writes ``fido:instance:<id>`` with a TTL so others can see we are alive."""

    def __init__(self, clock, store, scheduler, instance_id):
        self._store = store
        self._scheduler = scheduler
        self.instance_id = instance_id
        self._loop = task.LoopingCall(self._beat)
        self._loop.clock = clock

    def _beat(self):
        mapping = {
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "version": fido_tx.__version__,
            "accounts": str(len(self._scheduler.accounts)),
            "sessions": str(self._scheduler.running_count),
        }
        d = self._store.heartbeat(self.instance_id, mapping, HEARTBEAT_TTL)
        d.addErrback(lambda f: None)  # Redis down: the store logs that once

    def startService(self):
        super().startService()
        self._loop.start(HEARTBEAT_INTERVAL, now=True)

    def stopService(self):
        if self._loop.running:
            self._loop.stop()
        return super().stopService()


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


def instance_id():
    return f"{socket.gethostname()}:{os.getpid()}"


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

    :param session_factory: ``f(account) -> Deferred[SessionResult]``; the
        IMAP session by default (tests may pass another source).
    :param observer: a log observer to install instead of the configured one
        (``False``: leave logging alone, for tests and the demo).
    :param handle_signals: reload the accounts file on SIGHUP (twistd only).
    """
    from fido_tx.schedule import backpressure
    from fido_tx.schedule import budget
    from fido_tx.observe import health as health_mod
    from fido_tx.sources.imap import session as imap
    from fido_tx.schedule import pacer
    from fido_tx.accounts import reload
    from fido_tx.observe import report
    from fido_tx import resolve
    from fido_tx.schedule import scheduler as scheduler_mod
    from fido_tx.observe import status as status_mod
    from fido_tx.redis import store as store_mod
    from fido_tx.accounts import watch

    # every session resolves its server's name: answers kept for a minute
    resolve.install(reactor)

    if observer is None and not twistd_syslog:
        try:
            observer = logs.make_observer(settings.log, twistd_logfile=twistd_logfile)
        except OSError as e:
            where = settings.log.file or twistd_logfile
            raise StartupError(f"cannot open the log file {where} ([log] file): "
                               f"{e.strerror or e}") from None
    top = FidoService(observer or None)
    fido = settings.fido
    dry_run = fido.dry_run

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
        dry=", DRY RUN: nothing is written to Redis or changed on the servers" if dry_run else "",
    )

    ident = instance_id()
    store = store_mod.RedisStore(reactor, settings.redis, instance_id=ident)
    store.setServiceParent(top)

    reporter = report.Reporter(reactor, settings.reporter)
    reporter.setServiceParent(top)

    # /metrics is the only reader of the counters: with the HTTP endpoint
    # off, neither they nor twisted.web and prometheus_client are loaded
    # (~5 MiB and ~50 ms of start-up)
    metrics = None
    if settings.http.listen:
        from fido_tx.observe import metrics as metrics_mod

        metrics = metrics_mod.Metrics()
    status = status_mod.StatusTracker(reactor, store, reporter, metrics, dry_run=dry_run)

    if session_factory is None:
        # one budget for the bodies in flight of all sessions: memory stays
        # bounded whatever the number of workers
        inflight = budget.ByteBudget(settings.imap.max_inflight_bytes)
        # and session starts spread over reactor turns: thousands starting
        # at once stalled the reactor for seconds (8.5 s for 10,000)
        starts = pacer.StartPacer(reactor)
        debug = settings.log.level == "debug"

        def session_factory(account):
            return imap.fetch_mailbox(reactor, account, store, settings.imap, dry_run=dry_run,
                                      budget=inflight, pacer=starts, debug=debug)

    sched = scheduler_mod.Scheduler(
        reactor,
        session_factory,
        workers=fido.workers,
        poll_interval=fido.poll_interval,
        backoff=settings.backoff,
        grace_period=fido.grace_period,
    )
    status.scheduler = sched
    sched.add_result_observer(status.record)

    # Redis down: no new sessions (running ones stop at their next message,
    # because the store refuses to confirm).  Start paused until connected.
    sched.pause("redis")

    def redis_state(connected):
        if connected:
            sched.resume("redis")
        else:
            sched.pause("redis")
        status.redis_state(connected)

    store.add_connection_observer(redis_state)
    _RedisAtStart(store, status).setServiceParent(top)

    if not dry_run:
        pressure = backpressure.Backpressure(
            reactor, store, sched, settings.redis.max_backlog, on_change=status.backlog_state
        )
        sched.add_result_observer(pressure.after_session)
        _Stoppable(pressure.stop).setServiceParent(top)

    sched.setServiceParent(top)

    def apply(accounts, diff):
        sched.set_accounts(accounts)
        for account in diff.removed:
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

    if not dry_run:
        _Heartbeat(reactor, store, sched, ident).setServiceParent(top)

    health = health_mod.Health(reactor, sched, store, status=status)
    sched.add_result_observer(health.observe)
    if metrics is not None:
        from fido_tx.observe import web

        metrics.bind(scheduler=sched, store=store, reporter=reporter, status=status)
        site = web.make_site(metrics, health)
        # listen now: a port in use or a bad address stops the start with one line
        port = web.listen_now(reactor, settings.http.listen, site)
        web.HttpService(port).setServiceParent(top)
        exposed = web.beyond_loopback(port)
        if exposed:
            log.warn(
                "/metrics and /healthz listen on {address}, beyond loopback, with no "
                "authentication: anyone who can reach it reads them. Set [http] listen "
                'to "tcp:9119:interface=127.0.0.1" or firewall the port.',
                address=exposed,
            )

    top.parts.update(
        store=store, reporter=reporter, metrics=metrics, status=status,
        scheduler=sched, source=source, health=health,
    )
    return top
