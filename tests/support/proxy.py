"""A fault-injecting TCP proxy on loopback, for tests against real servers.

Put it between Fido and a real Dovecot or Redis, in the test's own reactor::

    proxy = FaultProxy(reactor, "127.0.0.1", redis.port, seed=1234)
    url = f"redis://127.0.0.1:{proxy.port}/0"
    proxy.cut_all()                        # abort every connection now
    proxy.cut_randomly(per_chunk=0.05)     # each forwarded chunk: 5% chance to cut
    proxy.cut_randomly(per_second=0.5)     # each connection: ~50% chance a second
    proxy.stall(2.0)                       # forward nothing for 2 s (then flush)
    proxy.slow(4096)                       # at most 4096 bytes/s each way, per connection
    proxy.refuse(3.0)                      # connections refused (not listening) for 3 s
    proxy.schedule([(0.5, "cut_all"), (1.0, ("stall", 2.0)), (4.0, proxy.heal)])
    proxy.heal()                           # back to plain forwarding
    yield proxy.stop()

Randomness comes from ``random.Random(seed)``; without a seed one is chosen,
printed (pytest shows it on failure) and kept in ``proxy.seed``.
"""

import os
import random
from collections import deque

from twisted.internet import defer, endpoints, protocol, task

TICK = 0.05  # seconds: pacing granularity of ``slow``
HIGH_WATER = 256 * 1024  # queued bytes before the sending side is paused


class _Pipe:
    """One direction of one proxied connection: queue, pace, forward."""

    def __init__(self, proxy, pair, source, sink):
        self.proxy, self.pair = proxy, pair
        self.source, self.sink = source, sink
        self.queue = deque()
        self.queued = 0
        self.timer = None

    def feed(self, data):
        p = self.proxy.cut_per_chunk
        if p and self.proxy.random.random() < p:
            self.proxy._event("cut connection %d at random (chunk)" % self.pair.id)
            self.pair.cut()
            return
        self.queue.append(data)
        self.queued += len(data)
        self.pump()

    def pump(self):
        if self.timer is not None and self.timer.active():
            return
        self.timer = None
        if self.proxy.stalled:
            self.source.transport.pauseProducing()
            return
        rate = self.proxy.rate
        while self.queue and self.pair.open:
            data = self.queue.popleft()
            if rate:
                chunk = max(1, int(rate * TICK))
                if len(data) > chunk:
                    self.queue.appendleft(data[chunk:])
                    data = data[:chunk]
                self.queued -= len(data)
                self.sink.transport.write(data)
                self.timer = self.proxy.reactor.callLater(len(data) / rate, self.pump)
                break
            self.queued -= len(data)
            self.sink.transport.write(data)
        if self.pair.open:
            if self.queued > HIGH_WATER:
                self.source.transport.pauseProducing()
            else:
                self.source.transport.resumeProducing()

    def cancel(self):
        if self.timer is not None and self.timer.active():
            self.timer.cancel()


class _End(protocol.Protocol):
    def __init__(self, pair, name):
        self.pair, self.name = pair, name

    def dataReceived(self, data):
        self.pair.received(self, data)

    def connectionLost(self, reason):
        self.pair.lost(self)


class _Pair:
    """A client connection and its upstream connection."""

    def __init__(self, proxy, ident):
        self.proxy, self.id = proxy, ident
        self.client = _ClientEnd(self, "client")
        self.upstream = None
        self.pipes = {}
        self.open = True

    def upstream_connected(self, upstream):
        if not self.open:
            upstream.transport.abortConnection()
            return
        self.upstream = upstream
        self.pipes = {
            "client": _Pipe(self.proxy, self, self.client, upstream),
            "upstream": _Pipe(self.proxy, self, upstream, self.client),
        }
        self.client.transport.resumeProducing()
        for pipe in self.pipes.values():
            pipe.pump()

    def upstream_failed(self, failure):
        self.proxy._event("connection %d: upstream connect failed: %s"
                          % (self.id, failure.getErrorMessage()))
        self.cut()

    def received(self, end, data):
        self.pipes[end.name].feed(data)

    def lost(self, end):
        if self.open:
            # the other side follows, after what is queued for it is sent
            self.open = False
            other = self.upstream if end is self.client else self.client
            if other is not None and other.transport is not None:
                pipe = self.pipes.get(end.name)
                if pipe is not None and pipe.queue:
                    other.transport.write(b"".join(pipe.queue))
                other.transport.loseConnection()
        self._finish(end)

    def _finish(self, end):
        for pipe in self.pipes.values():
            pipe.cancel()
        self.proxy._lost(self)

    def cut(self):
        self.open = False
        for pipe in self.pipes.values():
            pipe.cancel()
        for end in (self.client, self.upstream):
            if end is not None and end.transport is not None:
                end.transport.abortConnection()

    def pump(self):
        for pipe in self.pipes.values():
            pipe.pump()


class _ClientFactory(protocol.Factory):
    def __init__(self, proxy):
        self.proxy = proxy

    def buildProtocol(self, addr):
        return self.proxy._accept()


class _ClientEnd(_End):
    def connectionMade(self):
        self.transport.pauseProducing()
        self.pair.proxy._connect_upstream(self.pair)


class _Reject(protocol.Protocol):
    def connectionMade(self):
        self.transport.abortConnection()


class FaultProxy:
    """A TCP proxy from ``127.0.0.1:<port>`` (a free port) to a target.

    :ivar port: the proxy's listening port.
    :ivar seed: the seed of :attr:`random`.
    :ivar accepted: connections accepted so far.
    :ivar events: ``(seconds since start, text)`` of each injected fault.
    """

    def __init__(self, reactor, target_host, target_port, seed=None, interface="127.0.0.1",
                 connect_timeout=5.0):
        self.reactor = reactor
        self.target = (target_host, target_port)
        self.interface = interface
        self.connect_timeout = connect_timeout
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "big")
        self.seed = seed
        print(f"FaultProxy seed={seed}")
        self.random = random.Random(seed)
        self.pairs = {}
        self.accepted = 0
        self.events = []
        self._started = reactor.seconds()
        self._calls = []
        self._ticker = None
        self._refuse_mode = None
        self.stalled = False
        self.rate = 0
        self.cut_per_chunk = 0.0
        self.cut_per_second = 0.0
        self._listening = None
        self._stopping = defer.succeed(None)
        self.port = 0
        self._listen()

    # -- plumbing ------------------------------------------------------------
    def _listen(self):
        self._listening = self.reactor.listenTCP(self.port, _ClientFactory(self),
                                                 interface=self.interface)
        self.port = self._listening.getHost().port

    def _accept(self):
        self.accepted += 1
        if self._refuse_mode == "close":
            self._event("aborted new connection %d" % self.accepted)
            return _Reject()
        pair = _Pair(self, self.accepted)
        self.pairs[pair.id] = pair
        return pair.client

    def _connect_upstream(self, pair):
        endpoint = endpoints.TCP4ClientEndpoint(
            self.reactor, self.target[0], self.target[1], timeout=self.connect_timeout)
        d = endpoints.connectProtocol(endpoint, _End(pair, "upstream"))
        d.addCallbacks(pair.upstream_connected, pair.upstream_failed)

    def _lost(self, pair):
        self.pairs.pop(pair.id, None)

    def _event(self, text):
        self.events.append((round(self.reactor.seconds() - self._started, 3), text))

    def _later(self, seconds, f, *args):
        self._calls = [c for c in self._calls if c.active()]
        call = self.reactor.callLater(seconds, f, *args)
        self._calls.append(call)
        return call

    @property
    def open_connections(self):
        return len(self.pairs)

    # -- faults --------------------------------------------------------------
    def cut_all(self):
        """Abort every proxied connection now (both sides)."""
        self._event("cut all %d connections" % len(self.pairs))
        for pair in list(self.pairs.values()):
            pair.cut()

    def cut_randomly(self, per_chunk=0.0, per_second=0.0):
        """Cut connections at random: with probability ``per_chunk`` at each
        forwarded chunk, and/or about ``per_second`` per connection-second
        (checked every 0.1 s).  Zero turns it off."""
        self.cut_per_chunk = per_chunk
        self.cut_per_second = per_second
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._ticker = None
        if per_second:
            p = 1.0 if per_second >= 1 else 1 - (1 - per_second) ** 0.1
            self._ticker = task.LoopingCall(self._tick, p)
            self._ticker.clock = self.reactor
            self._ticker.start(0.1, now=False)

    def _tick(self, p):
        for pair in list(self.pairs.values()):
            if self.random.random() < p:
                self._event("cut connection %d at random (time)" % pair.id)
                pair.cut()

    def stall(self, seconds=None):
        """Stop forwarding (both ways, all connections) for ``seconds``
        (``None``: until :meth:`heal` or ``stall(0)``); data is kept."""
        self._event("stall %s s" % seconds)
        self.stalled = bool(seconds is None or seconds > 0)
        if self.stalled and seconds is not None:
            self._later(seconds, self._unstall)
        if not self.stalled:
            self._unstall()

    def _unstall(self):
        self.stalled = False
        for pair in list(self.pairs.values()):
            pair.pump()

    def slow(self, rate):
        """Forward at most ``rate`` bytes/s per direction per connection
        (0: unlimited)."""
        self._event("rate %s B/s" % rate)
        self.rate = rate
        for pair in list(self.pairs.values()):
            pair.pump()

    def refuse(self, seconds=None, mode="refuse"):
        """Refuse new connections for ``seconds`` (``None``: until heal).

        ``mode="refuse"`` stops listening (clients get ECONNREFUSED; the port
        is listened on again afterwards); ``mode="close"`` accepts and aborts
        at once.  Established connections are untouched.
        """
        self._event("refuse (%s) %s s" % (mode, seconds))
        self._refuse_mode = mode
        if mode == "refuse" and self._listening is not None:
            listening, self._listening = self._listening, None
            self._stopping = defer.maybeDeferred(listening.stopListening)
        if seconds is not None:
            self._later(seconds, self.accept)

    def accept(self):
        """Accept new connections again."""
        self._refuse_mode = None

        def relisten(_):
            if self._listening is None:
                self._listen()

        if self._listening is None:
            self._stopping.addCallback(relisten)

    def heal(self):
        """Back to plain forwarding: no cuts, stall, rate limit or refusal."""
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
        self.cut_randomly(0, 0)
        self.rate = 0
        self.accept()
        self._unstall()
        self._event("heal")

    def schedule(self, steps):
        """Run faults later: ``[(delay, action), ...]``, delays in seconds
        from now; an action is a callable, a method name (``"cut_all"``) or
        a tuple of a name and its arguments (``("stall", 2.0)``)."""
        for delay, action in steps:
            if isinstance(action, str):
                action = (action,)
            if isinstance(action, tuple):
                name, *args = action
                f = getattr(self, name)
                self._later(delay, f, *args)
            else:
                self._later(delay, action)

    def stop(self):
        """Stop listening, cancel the schedule, abort every connection."""
        for call in self._calls:
            if call.active():
                call.cancel()
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        for pair in list(self.pairs.values()):
            pair.cut()
        listening, self._listening = self._listening, None
        if listening is None:
            return defer.succeed(None)
        return defer.maybeDeferred(listening.stopListening)

