"""The ONE Redis connection of a Fido process, shared by every Redis user.

The stream and list sinks, the account state (:mod:`fido_tx.redis.state`),
the heartbeat (:mod:`fido_tx.redis.heartbeat`) and backpressure all send their
commands through one :class:`RedisConnection`:

* a :class:`~twisted.application.internet.ClientService` on the endpoint of
  the URL (:mod:`fido_tx.redis.url`), speaking txredisapi's protocol
  (``charset=None``, ``convertNumbers=False``: payloads stay bytes); it
  reconnects by itself, waiting :func:`fido_tx.schedule.backoff.exponential`
  between attempts;
* a connection counts as up (:attr:`RedisConnection.connected`, observers
  called with True) only once Redis has answered AUTH/SELECT and the load of
  every registered script, within ``connect_timeout``: a stopped server whose
  kernel still accepts TCP is down;
* every command has a deadline of ``command_timeout`` seconds (all of them
  on one timer, :mod:`fido_tx.redis.deadlines`) that covers waiting for a
  connection too (txredisapi never answers a command issued
  while disconnected); a command that times out on a live connection aborts
  that connection (its reply could otherwise arrive later and be mistaken for
  another one's); every failure is a :class:`~fido_tx.errors.FidoError` of
  kind ``redis`` with a line an operator can act on;
* scripts (:meth:`RedisConnection.script`) run with ``EVALSHA``, falling back
  to ``EVAL`` when the server answers ``NOSCRIPT``; each is loaded on every
  new connection.

Needs Redis >= 6.2 (``SMISMEMBER``).  txredisapi is imported lazily:
importing it installs the default reactor.
"""

import hashlib
import random

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from fido_tx import errors, private
from fido_tx.interfaces import IRedisHealth
from fido_tx.redis import url as redisurl
from fido_tx.redis.deadlines import Deadlines
from fido_tx.schedule import backoff

log = Logger(namespace="fido_tx.redis.connection")


def redis_down(message="Redis is unreachable"):
    """The error a Redis user raises when it cannot reach Redis."""
    return errors.FidoError(errors.REDIS, message)


def reconnect_policy(initial=0.25, maximum=10.0, jitter=0.2, rng=None):
    """``f(attempt) -> seconds`` between reconnect attempts (the one formula)."""
    rng = rng or random.Random()
    return lambda attempt: backoff.exponential(attempt, initial, maximum, jitter, rng)


class Script:
    """A Lua script registered on a :class:`RedisConnection`."""

    def __init__(self, connection, source):
        self.source = source if isinstance(source, bytes) else source.encode("utf-8")
        self.sha = hashlib.sha1(self.source).hexdigest().encode("ascii")
        self._connection = connection

    def run(self, keys, args, what="script", then=None):
        """``EVALSHA`` (``EVAL`` on ``NOSCRIPT``) within the command deadline.

        ``then(proto, reply) -> Deferred`` runs next on the same connection
        (a ``WAIT`` that must follow the script's writes), within the same
        deadline; its result is the call's result.
        """
        keys, args = list(keys), list(args)

        def send(proto):
            d = self._evalsha(proto, keys, args)
            if then is not None:
                d.addCallback(lambda reply: then(proto, reply))
            return d

        return self._connection.run(what, send)

    def _evalsha(self, proto, keys, args):
        import txredisapi

        d = proto.execute_command(b"EVALSHA", self.sha, len(keys), *keys, *args)

        def noscript(failure):
            failure.trap(txredisapi.ResponseError)
            if not failure.getErrorMessage().startswith("NOSCRIPT"):
                return failure
            return proto.execute_command(b"EVAL", self.source, len(keys), *keys, *args)

        return d.addErrback(noscript)


def _demote_to_debug(event):
    """ClientService logs every reconnect attempt at info; the connection
    logs the outage once (lost / back), so those lines go out at debug."""
    if event.get("log_level", LogLevel.info) < LogLevel.warn:
        event = dict(event, log_level=LogLevel.debug)
    globalLogPublisher(event)


class _ClientService(ClientService):
    _log = Logger(namespace="fido_tx.redis.reconnect", observer=_demote_to_debug)


@implementer(IStreamClientEndpoint)
class _ObservedEndpoint:
    """An endpoint that tells the connection why an attempt failed."""

    def __init__(self, wrapped, connection):
        self._wrapped = wrapped
        self._connection = connection

    def connect(self, factory):
        return self._wrapped.connect(factory).addErrback(self._failed)

    def _failed(self, failure):
        self._connection._connect_failed(failure.getErrorMessage())
        return failure

    def __repr__(self):
        return f"<Redis {self._connection.url}>"


_protocol_class = None


def protocol_class():
    """txredisapi's RedisProtocol, writing commands piecewise
    (:func:`fido_tx.private.piecewise_redis_protocol`), reading replies in
    one pass (:func:`fido_tx.private.fast_reply_protocol`) and reporting its
    connection's life to its :class:`RedisConnection`.  Made on first use:
    importing txredisapi installs the default reactor."""
    global _protocol_class
    if _protocol_class is None:
        import txredisapi

        base = private.fast_reply_protocol(
            private.piecewise_redis_protocol(txredisapi.RedisProtocol))

        class FidoRedisProtocol(base):
            #: became the connection's ready protocol / already counted lost
            fido_ready = False
            fido_lost = False

            def __init__(self, connection, **kwargs):
                super().__init__(**kwargs)
                self.fido_connection = connection

            def connectionMade(self):
                self.fido_connection._setup(self)
                return super().connectionMade()

            def connectionLost(self, reason):
                # the connection is marked down first: txredisapi then fails
                # the pending commands, and their callers see connected=False
                try:
                    self.fido_connection._protocol_lost(self, reason)
                finally:
                    return super().connectionLost(reason)

        _protocol_class = FidoRedisProtocol
    return _protocol_class


class _ProtocolFactory(protocol.Factory):
    """Builds the protocols.  ``stopTrying``, ``connectionError`` and
    ``isLazy`` are what txredisapi's protocol calls on its factory when AUTH or
    SELECT fails; we keep retrying (with backoff) and log the reason."""

    noisy = False
    isLazy = False

    def __init__(self, connection):
        self._connection = connection

    def buildProtocol(self, addr):
        c = self._connection
        p = protocol_class()(
            c,
            charset=None,
            convertNumbers=False,
            password=c.url.password,
            username=c.url.username if c.url.password is not None else None,
            dbid=c.url.db or None,
        )
        p.factory = self
        p.callLater = c._reactor.callLater  # txredisapi's default is the global reactor
        return p

    def stopTrying(self):
        pass

    def connectionError(self, message):
        self._connection._connect_failed(message)


@implementer(IRedisHealth)
class RedisConnection(Service):
    """The shared Redis connection; a Twisted ``Service``.

    :param reactor: ``IReactorTime`` and what the URL needs (TCP, SSL, UNIX).
    :param settings: :class:`fido_tx.config.RedisSettings` (``url``,
        ``connect_timeout``, ``command_timeout``).
    :param retry_policy: ``f(attempt) -> seconds`` between reconnect attempts.
    :raises fido_tx.redis.url.RedisURLError: a bad ``settings.url``.
    """

    name = "redis"

    def __init__(self, reactor, settings, retry_policy=None):
        self._reactor = reactor
        self._settings = settings
        self.url = redisurl.parse(settings.url)
        self._retry_policy = retry_policy or reconnect_policy()
        self.connected = False
        self.last_error = None
        self._scripts = {}
        self._observers = []
        self._stop_hooks = []
        #: every command's deadline, on one timer
        self._deadlines = Deadlines(reactor, settings.command_timeout)
        self._proto = None
        self._waiters = []
        self._client = None
        self._stopping = False
        self._ever_connected = False
        self._down_logged = False
        self._failed_setups = 0
        self._setup_failed = False

    # -- what the users call --------------------------------------------------

    def script(self, source):
        """A :class:`Script` for ``source``, loaded on every new connection."""
        s = Script(self, source)
        self._scripts.setdefault(s.sha, s)
        return self._scripts[s.sha]

    def execute(self, *args):
        """Run one command; errbacks a ``redis`` FidoError on any failure."""
        what = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        return self.run(what, lambda proto: proto.execute_command(*args))

    def add_connection_observer(self, observer):
        """Call ``observer(connected: bool)`` on every connect and disconnect."""
        self._observers.append(observer)

    def add_stop_hook(self, hook):
        """Call ``hook()`` when the service stops, while commands can still
        be sent (a write-behind sends what it holds)."""
        self._stop_hooks.append(hook)

    def run(self, what, send):
        """Run ``send(protocol) -> Deferred`` once connected, within the
        command deadline; ``what`` names it in the error line."""
        if not self.running or self._stopping:
            return defer.fail(redis_down(f"Redis {what} failed: the connection is not running"))
        timeout = self._settings.command_timeout
        sent_on, timed_out = [], []

        def go(proto):
            sent_on.append(proto)
            return send(proto)

        def failed(failure):
            if failure.check(errors.FidoError):
                return failure
            raise self._classify(failure, what, timeout, sent_on, timed_out)

        if self._proto is not None:
            # connected: sent now (one Deferred less than waiting for ready)
            try:
                d = go(self._proto)
            except Exception:
                d = defer.fail()
        else:
            d = self._when_ready()
            d.addCallback(go)
        self._deadlines.track(d, lambda: timed_out.append(True))
        return d.addErrback(failed)

    def _classify(self, failure, what, timeout, sent_on, timed_out):
        import txredisapi

        if timed_out and sent_on:
            message = f"Redis did not answer {what} within {timeout:g} s"
            proto = sent_on[-1]
            self._protocol_lost(proto, Failure(TimeoutError(message)))  # down now
            if proto.transport is not None:
                proto.transport.abortConnection()
        elif timed_out:
            message = (
                f"Redis at {self.url} is unreachable"
                f" ({self.last_error or 'not connected'}); {what} gave up after {timeout:g} s"
            )
        elif failure.check(txredisapi.ResponseError):
            message = f"Redis refused {what}: {failure.getErrorMessage()}"
            if failure.getErrorMessage().startswith("READONLY") and sent_on:
                # a master demoted by a failover: drop the connection, so that
                # the reconnect asks the sentinels for the new master
                message += " (this server is a replica now: reconnecting)"
                proto = sent_on[-1]
                if proto.transport is not None:
                    proto.transport.abortConnection()
        else:
            message = f"Redis connection failed during {what}: {failure.getErrorMessage()}"
        return errors.FidoError(
            errors.REDIS, message,
            debug=f"url={self.url} error={failure.type.__name__}: {failure.getErrorMessage()}",
        )

    def _when_ready(self):
        if self._proto is not None:
            return defer.succeed(self._proto)

        def cancel(d):
            if d in self._waiters:
                self._waiters.remove(d)

        d = defer.Deferred(cancel)
        self._waiters.append(d)
        return d

    # -- lifecycle ------------------------------------------------------------

    def _retry_delay(self, attempt):
        # a connection that got TCP but failed AUTH/SELECT/load is a failed
        # attempt too (ClientService counts it a success)
        return self._retry_policy(attempt + self._failed_setups)

    def startService(self):
        Service.startService(self)
        self._stopping = False
        endpoint = _ObservedEndpoint(
            redisurl.endpoint(self._reactor, self.url, self._settings.connect_timeout), self
        )
        self._client = _ClientService(
            endpoint, _ProtocolFactory(self), retryPolicy=self._retry_delay, clock=self._reactor
        )
        self._client.startService()

    def stopService(self):
        """Send what the stop hooks hold, close the connection and stop
        reconnecting; fires when closed."""
        for hook in list(self._stop_hooks):
            try:
                hook()
            except Exception:
                log.failure("Redis stop hook {hook!r} failed", hook=hook)
        Service.stopService(self)
        self._stopping = True
        self._deadlines.stop()  # what is pending fails with the connection
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.errback(redis_down("the Redis connection is stopping"))
        client, self._client = self._client, None
        if client is None:
            return defer.succeed(None)
        return client.stopService()

    def _notify(self, up):
        for observer in list(self._observers):
            try:
                observer(up)
            except Exception:
                log.failure("Redis connection observer {observer!r} failed", observer=observer)

    def _setup(self, proto):
        """A new connection: ready once AUTH, SELECT and the script loads are
        answered, within ``connect_timeout``."""
        timeout = self._settings.connect_timeout
        self._setup_failed = False

        def too_slow():
            self._connect_failed(f"no answer to AUTH/SELECT/SCRIPT LOAD within {timeout:g} s")
            if proto.transport is not None:
                proto.transport.abortConnection()

        timer = self._reactor.callLater(timeout, too_slow)

        def authenticated(_):
            loads = [proto.execute_command(b"SCRIPT", b"LOAD", s.source)
                     for s in self._scripts.values()]
            if not loads:  # still one round trip: the server must answer
                loads.append(proto.execute_command(b"PING"))
            return defer.gatherResults(loads, consumeErrors=True)

        def loaded(_):
            if timer.active():
                timer.cancel()
                self._ready(proto)

        def failed(failure):
            if not timer.active():
                return  # too_slow() said why
            timer.cancel()
            failure = failure.value.subFailure if failure.check(defer.FirstError) else failure
            self._connect_failed(failure.getErrorMessage())
            if proto.transport is not None:
                proto.transport.abortConnection()

        d = proto.whenConnected()
        d.addCallback(authenticated)
        d.addCallbacks(loaded, failed)
        proto.whenDisconnected().addCallback(lambda _: timer.active() and timer.cancel())

    def _ready(self, proto):
        if self._stopping or not proto.connected or proto.transport is None:
            return
        self._proto = proto
        proto.fido_ready = True
        self.connected = True
        self.last_error = None
        self._failed_setups = 0
        if self._ever_connected:
            log.info("Redis connection to {url} is back; fetching resumes", url=str(self.url))
        else:
            log.info("Connected to Redis at {url}", url=str(self.url))
        self._ever_connected = True
        self._down_logged = False
        self._notify(True)
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(proto)

    def _protocol_lost(self, proto, reason):
        if proto is not self._proto:
            if not proto.fido_ready and not proto.fido_lost:
                # never became ready: a failed attempt (e.g. a TLS
                # certificate that does not verify)
                proto.fido_lost = True
                self._failed_setups += 1
                if not self._setup_failed:
                    self._connect_failed(reason.getErrorMessage())
            return
        self._proto = None
        self.connected = False
        if self._stopping:
            log.info("Redis connection to {url} closed", url=str(self.url))
        else:
            self.last_error = reason.getErrorMessage()
            self._down_logged = True
            log.warn(
                "Redis connection lost ({reason}); fetching paused until it is back",
                reason=self.last_error,
            )
        self._notify(False)

    def _connect_failed(self, message):
        self.last_error = message
        self._setup_failed = True
        if not self._down_logged and not self._stopping:
            self._down_logged = True
            log.warn(
                "Cannot connect to Redis at {url} ({reason}); retrying in the background",
                url=str(self.url),
                reason=message,
            )
