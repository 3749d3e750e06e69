"""A stand-in for the shared Redis connection (``execute``, ``script``) the
sinks take from ``SinkContext.redis``, over txredisapi, for tests of sinks
written before ``fido_tx.redis.connection`` landed: the same contract
(FidoError kind redis on failure, EVALSHA falling back to EVAL)."""

import hashlib

from twisted.internet import defer

from fido_tx import errors


class Script:
    def __init__(self, conn, source):
        self._conn = conn
        self.source = source.encode() if isinstance(source, str) else source
        self.sha = hashlib.sha1(self.source).hexdigest()

    def run(self, keys, args):
        keys, args = list(keys), list(args)
        d = self._conn.execute(b"EVALSHA", self.sha, len(keys), *keys, *args)

        def noscript(failure):
            failure.trap(errors.FidoError)
            if "NOSCRIPT" not in failure.value.debug:
                return failure
            return self._conn.execute(b"EVAL", self.source, len(keys), *keys, *args)

        return d.addErrback(noscript)


class SharedRedisStandIn:
    """``execute(*args) -> Deferred`` with a deadline; errors are FidoError."""

    def __init__(self, reactor, port, timeout=5.0):
        self._reactor = reactor
        self._port = port
        self._timeout = timeout
        self._client = None
        self.connected = False

    @defer.inlineCallbacks
    def connect(self):
        import txredisapi

        self._client = yield txredisapi.Connection(
            "127.0.0.1", self._port, reconnect=False, charset=None, convertNumbers=False
        )
        self.connected = True
        return self

    def disconnect(self):
        self.connected = False
        return self._client.disconnect() if self._client else defer.succeed(None)

    def execute(self, *args):
        d = self._client.execute_command(*args)
        d.addTimeout(self._timeout, self._reactor)

        def failed(failure):
            raise errors.FidoError(
                errors.REDIS, "Redis command failed", failure.getErrorMessage()
            )

        return d.addErrback(failed)

    def script(self, source):
        return Script(self, source)


def shared_connection(reactor, port):
    """Deferred: the real shared connection
    (:class:`fido_tx.redis.connection.RedisConnection`) when this Fido has it,
    else the stand-in above, connected to ``127.0.0.1:port``."""
    try:
        from fido_tx.redis.connection import RedisConnection
    except ImportError:
        return SharedRedisStandIn(reactor, port).connect()
    from fido_tx.config import RedisSettings

    conn = RedisConnection(reactor, RedisSettings(url=f"redis://127.0.0.1:{port}/0"))
    conn.startService()
    return defer.succeed(conn)


def close(conn):
    """Deferred: ``conn`` (from :func:`shared_connection`) closed."""
    if isinstance(conn, SharedRedisStandIn):
        return conn.disconnect()
    return defer.maybeDeferred(conn.stopService)
