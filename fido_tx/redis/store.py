"""The Redis sink: exactly-once append to the stream, account state, backlog.

Keys (``<...>`` are taken verbatim from the account, message or config):

``<stream>`` (``[redis] stream``, default ``fido:messages``)
    One entry per message, ``XADD <stream> * account … raw`` with the contract
    fields in the contract's order (:meth:`fido_tx.sinks.base.Message.fields`).
``fido:uids:{<account>}:<uidvalidity>:<mailbox>``
    The dedupe record: a set of the UIDs (decimal) of that mailbox and
    UIDVALIDITY that are in the stream.  A new UIDVALIDITY starts a new set;
    old sets are left for the operator (or a later cleanup) to delete.  The
    braces make the account a Redis Cluster hash tag.
``fido:account:<id>``
    Hash, the contract's per-account state: ``state`` (``ok``/``error``; other
    modules may set more), ``last_attempt_at``, ``last_success_at``,
    ``last_error``, ``last_error_kind``, ``last_error_at`` (an addition:
    when ``last_error`` happened), ``fetched_total`` (incremented by the store
    script, so it counts exactly the entries added).
``fido:instance:<instance id>``
    Hash with a TTL: the heartbeat of one Fido process (:meth:`heartbeat`).

Exactly once: :meth:`RedisStore.store` sends ONE Lua script call per batch
(``EVALSHA``; ``EVAL`` when the server answers ``NOSCRIPT``; the script is
loaded on every new connection).
For each message it checks the dedupe set, ``XADD``\\ s the entry and then
``SADD``\\ s the UID; Redis runs a script atomically, and with ``appendonly``
the script's writes are replicated and persisted as one unit, so a crash or a
restart leaves every message either stored and recorded, or neither.  The
order (check, append, record) means an error inside the script can at worst
leave an entry without its record (a possible duplicate later), never a record
without its entry (a lost message).  The script also counts the new entries
into ``fetched_total`` and returns the stream length, kept in
:attr:`RedisStore.last_stream_length` for backpressure without another round
trip.  ``store()`` fires with a :class:`ConfirmedUIDs`: every UID of the batch
(new and stored before), with ``.new`` the ones this call appended.

Connection: a :class:`~twisted.application.internet.ClientService` on the
endpoint of the URL (:mod:`fido_tx.redis.url`), speaking txredisapi's protocol
(``charset=None``, ``convertNumbers=False``: payloads stay bytes).  It
reconnects by itself with jittered exponential backoff.  Every command has a
deadline of ``command_timeout`` seconds that covers waiting for a connection
too, because txredisapi never answers a command issued while disconnected; a
command that times out on a live connection aborts that connection (its reply
could otherwise arrive later and be mistaken for another one's).  Such a
store may still have been applied by Redis; that is safe: nothing is marked on
the IMAP server, and the next session's ``filter_new`` or ``store`` sees the
UIDs as stored.  A connection counts as up (``connected``, observers called
with True) only once Redis has answered AUTH/SELECT and the script load, within
``connect_timeout``: a stopped server whose kernel still accepts TCP is down.

Needs Redis >= 6.2 (``SMISMEMBER``).  txredisapi is imported lazily: importing
it installs the default reactor.
"""

import hashlib
import os
import random
import socket

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.logger import Logger, LogLevel, globalLogPublisher
from zope.interface import implementer

from fido_tx import errors
from fido_tx.redis import url as redisurl
from fido_tx.scrub import scrub
from fido_tx.sinks.base import IMessageSink, redis_down, utc_now_iso

log = Logger()

#: fields per message in the store script's ARGV: the set index, the UID, and
#: the 16 values of Message.fields()
_STRIDE = 18

_STORE_SOURCE = b"""
local stream = KEYS[1]
local new = 0
local reply = {0}
for i = 1, #ARGV, 18 do
  local set = KEYS[tonumber(ARGV[i])]
  local uid = ARGV[i + 1]
  if redis.call('SISMEMBER', set, uid) == 0 then
    redis.call('XADD', stream, '*', unpack(ARGV, i + 2, i + 17))
    redis.call('SADD', set, uid)
    new = new + 1
    reply[new + 1] = tonumber(uid)
  end
end
if new > 0 then
  redis.call('HINCRBY', KEYS[2], 'fetched_total', new)
end
reply[1] = redis.call('XLEN', stream)
return reply
"""


class _Script:
    def __init__(self, source):
        self.source = source
        self.sha = hashlib.sha1(source).hexdigest().encode("ascii")


STORE_SCRIPT = _Script(_STORE_SOURCE)


def uids_key(account_id, mailbox, uidvalidity):
    """The dedupe set of one (account, mailbox, uidvalidity)."""
    return f"fido:uids:{{{account_id}}}:{int(uidvalidity)}:{mailbox}".encode("utf-8")


def account_key(account_id):
    return f"fido:account:{account_id}".encode("utf-8")


def instance_key(instance_id):
    return f"fido:instance:{instance_id}".encode("utf-8")


class ConfirmedUIDs(list):
    """The UIDs a :meth:`RedisStore.store` call confirmed, in the order given.

    A plain list for :class:`~fido_tx.sinks.base.IMessageSink` callers; ``new`` is
    the list of those that this call added to the stream (the others were
    stored before).
    """

    def __init__(self, confirmed, new):
        super().__init__(confirmed)
        self.new = new


def _retry_policy(initial=0.25, factor=2.0, maximum=10.0):
    """Seconds before reconnect attempt ``n`` (1, 2, …): exponential, ±20% jitter."""

    def policy(attempt):
        delay = min(initial * factor ** min(attempt - 1, 30), maximum)
        return delay * random.uniform(0.8, 1.2)

    return policy


def _demote_to_debug(event):
    """ClientService logs every reconnect attempt at info; the store logs the
    outage once (lost / back), so those lines go out at debug level."""
    if event.get("log_level", LogLevel.info) < LogLevel.warn:
        event = dict(event, log_level=LogLevel.debug)
    globalLogPublisher(event)


class _ClientService(ClientService):
    _log = Logger(namespace="fido_tx.redis.store.reconnect", observer=_demote_to_debug)


@implementer(IStreamClientEndpoint)
class _ObservedEndpoint:
    """An endpoint that tells the store why a connection attempt failed."""

    def __init__(self, wrapped, store):
        self._wrapped = wrapped
        self._store = store

    def connect(self, factory):
        d = self._wrapped.connect(factory)
        d.addErrback(self._failed)
        return d

    def _failed(self, failure):
        self._store._connect_failed(failure.getErrorMessage())
        return failure

    def __repr__(self):
        return f"<Redis {self._store.url}>"


def _encode(arg):
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode("utf-8")
    if isinstance(arg, int):
        return b"%d" % arg
    raise TypeError(f"cannot send {type(arg).__name__} to Redis")


def _command_pieces(args):
    """RESP for one command, as a list of pieces (the arguments themselves
    are not copied)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        arg = _encode(arg)
        out.append(b"$%d\r\n" % len(arg))
        out.append(arg)
        out.append(b"\r\n")
    return out


def _build_command(*args, **kwargs):
    """RESP for one command: what txredisapi's ``_build_command`` makes, with
    one join instead of two encode calls and a bytearray copy per argument
    (it was 40% of the store's CPU time with 450 arguments per batch)."""
    return b"".join(_command_pieces(args))


_protocol_class = None


def _protocol():
    """txredisapi's RedisProtocol with the faster command encoder (made on
    first use: importing txredisapi installs the default reactor)."""
    global _protocol_class
    if _protocol_class is None:
        import txredisapi

        class _RedisProtocol(txredisapi.RedisProtocol):
            def _build_command(self, *args, **kwargs):
                # txredisapi writes what this returns.  A batch's command
                # carries every message body: joining it here made one more
                # copy of up to max_inflight_bytes, which the transport then
                # joins again.  Hand the pieces to the transport instead and
                # let txredisapi write nothing (write(b"") is a no-op).
                if self.pipelining or self.transport is None:
                    return _build_command(*args)
                self.transport.writeSequence(_command_pieces(args))
                return b""

        _protocol_class = _RedisProtocol
    return _protocol_class


class _ProtocolFactory(protocol.Factory):
    """Builds txredisapi protocols for the store's ClientService.

    ``stopTrying``, ``connectionError`` and ``isLazy`` are what txredisapi's
    protocol calls on its factory when AUTH or SELECT fails; we keep retrying
    (with backoff) and let the store log the reason.
    """

    noisy = False
    isLazy = False

    def __init__(self, store):
        self._store = store

    def buildProtocol(self, addr):
        url = self._store.url
        p = _protocol()(
            charset=None,
            convertNumbers=False,
            password=url.password,
            username=url.username if url.password is not None else None,
            dbid=url.db or None,
        )
        p.factory = self
        # txredisapi uses the global reactor's callLater; use ours
        p.callLater = self._store._reactor.callLater
        lost = p.connectionLost

        def connectionLost(reason):
            # the store is marked down first: txredisapi then fails the
            # pending commands, and their callers must see connected=False
            try:
                if p is not self._store._proto:
                    # never became ready: ClientService counts it a success
                    # (TCP connected), the store counts it a failed attempt
                    self._store._failed_setups += 1
                    if not self._store._setup_failed:
                        # e.g. a TLS certificate that does not verify
                        self._store._connect_failed(reason.getErrorMessage())
                self._store._lost(p, reason)
            finally:
                return lost(reason)

        p.connectionLost = connectionLost
        made = p.connectionMade

        def connectionMade():
            self._store._setup(p)
            return made()

        p.connectionMade = connectionMade
        return p

    def stopTrying(self):
        pass

    def connectionError(self, message):
        self._store._connect_failed(message)


@implementer(IMessageSink)
class RedisStore(Service):
    """The Redis stream sink and account state store; a Twisted ``Service``.

    :param reactor: provides ``IReactorTime`` and the reactor interfaces the
        URL needs (TCP, SSL through TLS memory BIO, UNIX).
    :param settings: :class:`fido_tx.config.RedisSettings`.
    :param instance_id: names this process for :meth:`heartbeat`; default
        ``<hostname>:<pid>``.
    :param retry_policy: ``f(attempt) -> seconds`` between reconnect attempts
        (tests make it short).
    :raises fido_tx.redis.url.RedisURLError: a bad ``settings.url``.

    :ivar connected: True while a connection is up and ready (authenticated,
        db selected).
    :ivar last_stream_length: the stream's length after the last successful
        :meth:`store` or :meth:`backlog`, or None.
    """

    name = "redis"

    def __init__(self, reactor, settings, instance_id=None, retry_policy=None):
        self._reactor = reactor
        self._settings = settings
        self.url = redisurl.parse(settings.url)
        self.stream = settings.stream.encode("utf-8")
        self.instance_id = instance_id or f"{socket.gethostname()}:{os.getpid()}"
        self._retry_policy = retry_policy or _retry_policy()
        self.connected = False
        self.last_stream_length = None
        self._observers = []
        self._proto = None
        self._waiters = []
        self._client = None
        self._stopping = False
        self._ever_connected = False
        self._down_since_logged = False
        self._last_error = None
        self._failed_setups = 0
        self._setup_failed = False

    def _retry_delay(self, attempt):
        return self._retry_policy(attempt + self._failed_setups)

    # -- lifecycle ------------------------------------------------------------

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
        """Close the connection and stop reconnecting; fires when closed."""
        Service.stopService(self)
        self._stopping = True
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.errback(redis_down("the Redis store is stopping"))
        client, self._client = self._client, None
        if client is None:
            return defer.succeed(None)
        return client.stopService()

    def add_connection_observer(self, observer):
        """Call ``observer(connected: bool)`` on every connect and disconnect."""
        self._observers.append(observer)

    def _notify(self, up):
        for observer in list(self._observers):
            try:
                observer(up)
            except Exception:
                log.failure("Redis connection observer {observer!r} failed", observer=observer)

    def _setup(self, proto):
        """A new connection: usable once AUTH, SELECT and a first command
        (loading the store script) are answered, within ``connect_timeout``.

        A connection is not ready just because the TCP (or TLS) connect
        succeeded: a stopped or overloaded server's kernel still accepts it.
        """
        timeout = self._settings.connect_timeout
        self._setup_failed = False

        def too_slow():
            self._connect_failed(f"no answer to AUTH/SELECT/SCRIPT LOAD within {timeout:g} s")
            if proto.transport is not None:
                proto.transport.abortConnection()

        timer = self._reactor.callLater(timeout, too_slow)

        def authenticated(_):
            # load the script now, so that the first store() finds it cached
            return proto.execute_command(b"SCRIPT", b"LOAD", STORE_SCRIPT.source)

        def loaded(_):
            if timer.active():
                timer.cancel()
                self._ready(proto)

        def failed(failure):
            if not timer.active():
                return  # too_slow() said why
            timer.cancel()
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
        self.connected = True
        self._last_error = None
        self._failed_setups = 0
        if self._ever_connected:
            log.info("Redis connection to {url} is back; fetching resumes", url=str(self.url))
        else:
            log.info("Connected to Redis at {url}", url=str(self.url))
        self._ever_connected = True
        self._down_since_logged = False
        self._notify(True)
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(proto)

    def _lost(self, proto, reason):
        if proto is not self._proto:
            return
        self._proto = None
        self.connected = False
        if self._stopping:
            log.info("Redis connection to {url} closed", url=str(self.url))
        else:
            self._last_error = reason.getErrorMessage()
            self._down_since_logged = True
            log.warn(
                "Redis connection lost ({reason}); fetching paused until it is back",
                reason=self._last_error,
            )
        self._notify(False)

    def _connect_failed(self, message):
        self._last_error = message
        self._setup_failed = True
        if not self._down_since_logged and not self._stopping:
            self._down_since_logged = True
            log.warn(
                "Cannot connect to Redis at {url} ({reason}); retrying in the background",
                url=str(self.url),
                reason=message,
            )

    # -- running commands -----------------------------------------------------

    def _when_ready(self):
        if self._proto is not None:
            return defer.succeed(self._proto)

        def cancel(d):
            if d in self._waiters:
                self._waiters.remove(d)

        d = defer.Deferred(cancel)
        self._waiters.append(d)
        return d

    def _run(self, what, send):
        """Run ``send(protocol) -> Deferred`` once connected, within the deadline.

        Errbacks with a ``redis`` FidoError on every failure.
        """
        if not self.running or self._stopping:
            return defer.fail(redis_down(f"Redis {what} failed: the store is not running"))
        timeout = self._settings.command_timeout
        sent_on = []
        timed_out = []

        def go(proto):
            sent_on.append(proto)
            return send(proto)

        def on_timeout(result, _timeout):
            timed_out.append(True)
            return result

        def failed(failure):
            if failure.check(errors.FidoError):
                return failure
            import txredisapi

            if timed_out:
                if sent_on:
                    message = f"Redis did not answer {what} within {timeout:g} s"
                    proto = sent_on[-1]
                    # mark it down now (the abort reports back a turn later)
                    self._lost(proto, Failure(TimeoutError(message)))
                    if proto.transport is not None:
                        proto.transport.abortConnection()
                else:
                    message = (
                        f"Redis at {self.url} is unreachable"
                        f" ({self._last_error or 'not connected'}); {what} gave up after {timeout:g} s"
                    )
            elif failure.check(txredisapi.ResponseError):
                message = f"Redis refused {what}: {failure.getErrorMessage()}"
            else:
                message = f"Redis connection failed during {what}: {failure.getErrorMessage()}"
            raise errors.FidoError(
                errors.REDIS,
                message,
                debug=f"url={self.url} error={failure.type.__name__}: {failure.getErrorMessage()}",
            )

        d = self._when_ready()
        d.addCallback(go)
        d.addTimeout(timeout, self._reactor, onTimeoutCancel=on_timeout)
        d.addErrback(failed)
        return d

    def _execute(self, what, *args):
        return self._run(what, lambda proto: proto.execute_command(*args))

    @staticmethod
    def _evalsha(proto, script, keys, args):
        import txredisapi

        d = proto.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

        def noscript(failure):
            failure.trap(txredisapi.ResponseError)
            if not failure.getErrorMessage().startswith("NOSCRIPT"):
                return failure
            return proto.execute_command("EVAL", script.source, len(keys), *keys, *args)

        return d.addErrback(noscript)

    # -- IMessageSink ---------------------------------------------------------

    def filter_new(self, account_id, mailbox, uidvalidity, uids):
        """The UIDs of ``uids`` not stored yet, in the order given."""
        uids = [int(u) for u in uids]
        if not uids:
            return defer.succeed([])
        key = uids_key(account_id, mailbox, uidvalidity)
        d = self._execute("SMISMEMBER", b"SMISMEMBER", key, *uids)

        def pick(flags):
            return [u for u, stored in zip(uids, flags) if not int(stored)]

        return d.addCallback(pick)

    def store(self, messages):
        """Append the messages not stored yet; fire with a :class:`ConfirmedUIDs`."""
        messages = list(messages)
        if not messages:
            return defer.succeed(ConfirmedUIDs([], []))
        keys = [self.stream, account_key(messages[0].account)]
        index = {}
        args = []
        for m in messages:
            if m.account != messages[0].account:
                return defer.fail(ValueError("store() takes the messages of one account"))
            set_key = uids_key(m.account, m.mailbox, m.uidvalidity)
            if set_key not in index:
                keys.append(set_key)
                index[set_key] = len(keys)
            args.append(index[set_key])
            args.append(m.uid)
            args.extend(m.fields())
        d = self._run(
            f"store of {len(messages)} messages",
            lambda proto: self._evalsha(proto, STORE_SCRIPT, keys, args),
        )

        def confirmed(reply):
            self.last_stream_length = int(reply[0])
            return ConfirmedUIDs([m.uid for m in messages], [int(u) for u in reply[1:]])

        return d.addCallback(confirmed)

    # -- stream and account state ---------------------------------------------

    def backlog(self):
        """The stream's length (``XLEN``)."""

        def got(n):
            self.last_stream_length = int(n)
            return self.last_stream_length

        return self._execute("XLEN", b"XLEN", self.stream).addCallback(got)

    def _best_effort(self, what, d):
        def ok(_):
            return True

        def failed(failure):
            level = log.warn if self.connected else log.debug
            level("{what} not written: {error}", what=what, error=failure.getErrorMessage())
            return False

        return d.addCallbacks(ok, failed)

    def update_account(self, account_id, fields):
        """``HSET fido:account:<id>`` the given fields; best-effort.

        Fires with True when written, False when not (the error is logged);
        never errbacks.
        """
        if not fields:
            return defer.succeed(True)
        args = []
        for name, value in fields.items():
            args.append(name)
            args.append(value if isinstance(value, bytes) else str(value).encode("utf-8"))
        d = self._execute("HSET", b"HSET", account_key(account_id), *args)
        return self._best_effort(f"state of account {account_id}", d)

    def record_session(self, result, started_at_iso=None, extra=None):
        """Keep ``fido:account:<id>`` current after a session; best-effort.

        A dry-run session writes nothing.  ``last_attempt_at`` is when the
        session started (``started_at_iso``, else now); a success sets
        ``state=ok`` and ``last_success_at``, a failure ``state=error``,
        ``last_error``, ``last_error_kind`` and ``last_error_at`` (the last
        error is kept after a success, for history).  ``extra`` fields go
        into the same ``HSET`` (one round trip per session).
        """
        if result.dry_run:
            return defer.succeed(True)
        now = utc_now_iso()
        fields = {"last_attempt_at": started_at_iso or now}
        if result.ok:
            fields["state"] = "ok"
            fields["last_success_at"] = now
        else:
            fields["state"] = "error"
            # the session scrubbed it with the account's secrets; the
            # patterns once more for whatever a library wrote into it
            fields["last_error"] = scrub(result.message)
            fields["last_error_kind"] = result.kind
            fields["last_error_at"] = now
        if extra:
            fields.update(extra)
        return self.update_account(result.account_id, fields)

    def heartbeat(self, instance_id, mapping=None, ttl=None):
        """``HSET fido:instance:<id> …`` and ``EXPIRE`` it after ``ttl`` s; best-effort.

        Called as ``heartbeat(instance_id, mapping, ttl)`` or
        ``heartbeat(mapping, ttl)`` (then :attr:`instance_id` is used).  Fires
        True when written, False when not; never errbacks (safe in a
        ``LoopingCall``).
        """
        if not isinstance(instance_id, str):
            instance_id, mapping, ttl = self.instance_id, instance_id, mapping
        key = instance_key(instance_id)
        args = []
        for name, value in dict(mapping or {}).items():
            args.append(name)
            args.append(value if isinstance(value, bytes) else str(value).encode("utf-8"))

        def send(proto):
            sent = []
            if args:
                sent.append(proto.execute_command(b"HSET", key, *args))
            sent.append(proto.execute_command(b"EXPIRE", key, int(ttl)))
            return defer.gatherResults(sent, consumeErrors=True)

        d = self._run("heartbeat", send)
        return self._best_effort(f"heartbeat of {instance_id}", d)
