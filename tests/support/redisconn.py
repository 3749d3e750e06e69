"""The shared Redis connection (:class:`fido_tx.redis.connection.RedisConnection`)
for sink tests, child processes and the delivery bench."""

from twisted.internet import defer


def shared_connection(reactor, port):
    """Deferred: a started RedisConnection to ``127.0.0.1:port`` (commands
    issued before it is connected wait for it, within their deadline)."""
    from fido_tx.config import RedisSettings
    from fido_tx.redis.connection import RedisConnection

    conn = RedisConnection(reactor, RedisSettings(url=f"redis://127.0.0.1:{port}/0"))
    conn.startService()
    return defer.succeed(conn)


def close(conn):
    """Deferred: ``conn`` (from :func:`shared_connection`) stopped."""
    return defer.maybeDeferred(conn.stopService)
