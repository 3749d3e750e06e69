"""Redis Sentinel: find the master on every connect, follow a failover.

A ``redis+sentinel://`` URL names several sentinels and a master name.
:class:`SentinelEndpoint` is a client endpoint like any other, so the shared
connection's ``ClientService`` needs no change: each (re)connect asks the
sentinels in turn, beginning with the one that answered last, for
``SENTINEL get-master-addr-by-name``; checks with ``ROLE`` that the address
really is a master (a sentinel that has not noticed a failover yet may name a
demoted one); and connects there.  After a failover the old master's
connection breaks (or its writes answer ``READONLY``, which the connection
treats as a lost connection), the service reconnects, and the sentinels name
the new master.  Redis's own high-availability machinery decides; Fido only
follows it.

Every exchange with a sentinel or a candidate master has the connect
timeout as its deadline.  Nothing here logs a password.

:func:`resolve_master` does the same with the blocking RESP client, for the
``fido`` command.
"""

import attr
from twisted.internet import defer, endpoints, error as ierror, protocol
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from fido_tx.redis.resp import encode


class SentinelError(Exception):
    """No sentinel could name a reachable master."""


class _Replies:
    """An incremental RESP2 reader: ``feed(bytes)`` -> complete replies."""

    def __init__(self):
        self._buffer = b""

    def feed(self, data):
        self._buffer += data
        out = []
        while True:
            parsed = self._parse(0)
            if parsed is None:
                return out
            value, end = parsed
            out.append(value)
            self._buffer = self._buffer[end:]

    def _parse(self, pos):
        buf = self._buffer
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        prefix, rest, after = buf[pos:pos + 1], buf[pos + 1:eol], eol + 2
        if prefix in (b"+", b"-"):
            return (rest if prefix == b"+" else ReplyError(rest.decode("utf-8", "replace"))), after
        if prefix == b":":
            return int(rest), after
        if prefix == b"$":
            n = int(rest)
            if n < 0:
                return None, after
            if len(buf) < after + n + 2:
                return None
            return buf[after:after + n], after + n + 2
        if prefix == b"*":
            n = int(rest)
            if n < 0:
                return None, after
            items = []
            for _ in range(n):
                parsed = self._parse(after)
                if parsed is None:
                    return None
                value, after = parsed
                items.append(value)
            return items, after
        raise ValueError(f"not a RESP reply: {buf[pos:pos + 20]!r}")


class ReplyError(Exception):
    """An error reply."""


class _Ask(protocol.Protocol):
    """Send some commands, collect as many replies, hang up."""

    def __init__(self, commands, done):
        self.commands = commands
        self.done = done
        self.replies = []
        self.reader = _Replies()

    def connectionMade(self):
        self.transport.write(b"".join(encode(c) for c in self.commands))

    def dataReceived(self, data):
        try:
            self.replies.extend(self.reader.feed(data))
        except ValueError as e:
            self._finish(failure=e)
            return
        if len(self.replies) >= len(self.commands):
            self._finish()

    def connectionLost(self, reason):
        self._finish(failure=ConnectionError("connection closed before the answer"))

    def _finish(self, failure=None):
        if self.done.called:
            return
        if failure is None:
            self.done.callback(self.replies)
        else:
            self.done.errback(failure)
        self.transport.loseConnection()


def ask(reactor, endpoint, commands, timeout):
    """Connect to ``endpoint``, send ``commands``, fire with their replies
    (error replies as :class:`ReplyError` values); fails after ``timeout``."""
    done = defer.Deferred()
    built = []

    def build():
        built.append(_Ask(commands, done))
        return built[-1]

    factory = protocol.Factory.forProtocol(build)
    factory.noisy = False  # no "Starting factory" lines per connect
    connecting = endpoint.connect(factory)

    def not_connected(failure):
        if not done.called:
            done.errback(failure)

    connecting.addErrback(not_connected)

    def close(result):
        if not connecting.called:
            connecting.cancel()
        for proto in built:
            if proto.transport is not None:
                proto.transport.abortConnection()
        return result

    done.addBoth(close)
    done.addTimeout(timeout, reactor)
    return done


def _auth(username, password):
    if password is None:
        return []
    return [("AUTH", username, password) if username else ("AUTH", password)]


@implementer(IStreamClientEndpoint)
class SentinelEndpoint:
    """Connects to the master the sentinels of ``url`` name now."""

    def __init__(self, reactor, url, timeout):
        self.reactor = reactor
        self.url = url
        self.timeout = timeout
        self._order = list(url.sentinels)
        #: the master connected to last, ``(host, port)`` (for logs, tests)
        self.master = None

    def _tcp(self, host, port):
        tcp = endpoints.HostnameEndpoint(self.reactor, host, port, timeout=self.timeout)
        if not self.url.tls:
            return tcp
        from twisted.internet import ssl

        from fido_tx.lazytls import wrap_client_tls

        if self.url.ca_file:
            with open(self.url.ca_file, "rb") as f:
                trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(f.read())])
            return wrap_client_tls(ssl.optionsForClientTLS(host, trustRoot=trust), tcp)
        return wrap_client_tls(ssl.optionsForClientTLS(host), tcp)

    async def locate(self):
        """``(host, port)`` of the master, checked with ``ROLE``."""
        url = self.url
        problems = []
        for sentinel in list(self._order):
            where = "%s:%d" % sentinel
            try:
                replies = await ask(
                    self.reactor, self._tcp(*sentinel),
                    _auth(url.sentinel_username, url.sentinel_password)
                    + [("SENTINEL", "get-master-addr-by-name", url.master)],
                    self.timeout,
                )
                answer = replies[-1]
                if isinstance(answer, ReplyError) or not answer:
                    problems.append(f"sentinel {where}: no master named {url.master!r}")
                    continue
                host, port = answer[0].decode("ascii"), int(answer[1])
                role = (await ask(self.reactor, self._tcp(host, port),
                                  _auth(url.username, url.password) + [("ROLE",)],
                                  self.timeout))[-1]
            except (ierror.ConnectError, ConnectionError, defer.TimeoutError,
                    ierror.TimeoutError, ValueError, OSError) as e:
                problems.append(f"{where}: {type(e).__name__}")
                continue
            if isinstance(role, ReplyError) or not role or role[0] != b"master":
                problems.append(f"sentinel {where} named {host}:{port}, which is not a master")
                continue
            # ask this sentinel first next time
            self._order.remove(sentinel)
            self._order.insert(0, sentinel)
            return host, port
        raise SentinelError(
            f"no sentinel named a reachable master {url.master!r}: " + "; ".join(problems)
        )

    def connect(self, factory):
        async def go():
            host, port = await self.locate()
            self.master = (host, port)
            return await self._tcp(host, port).connect(factory)

        return defer.ensureDeferred(go())


def resolve_master(url, timeout=5.0):
    """The plain :class:`~fido_tx.redis.url.RedisURL` of the master that the
    sentinels of ``url`` name (blocking, for the ``fido`` command)."""
    from fido_tx.redis.resp import RedisReplyError, RespConnection

    problems = []
    for host, port in url.sentinels:
        probe = attr.evolve(url.at(host, port), username=url.sentinel_username,
                            password=url.sentinel_password, db=0)
        try:
            with RespConnection(probe, timeout) as conn:
                answer = conn.command("SENTINEL", "get-master-addr-by-name", url.master)
        except (OSError, RedisReplyError, ConnectionError) as e:
            problems.append(f"{host}:{port}: {type(e).__name__}")
            continue
        if answer:
            return url.at(answer[0].decode("ascii"), int(answer[1]))
        problems.append(f"{host}:{port}: no master named {url.master!r}")
    raise SentinelError(
        f"no sentinel named a master {url.master!r}: " + "; ".join(problems)
    )

