"""The fault-injecting proxy against an echo server and a real redis-server."""

import time

import pytest
import pytest_twisted
from twisted.internet import defer, error, protocol, reactor, task

from tests.support.mockimap import connect_raw
from tests.support.proxy import FaultProxy


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)

    def connectionLost(self, reason):
        self.factory.lost += 1


@pytest.fixture
def echo():
    factory = protocol.Factory.forProtocol(Echo)
    factory.lost = 0
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    port.factory_ = factory
    yield port
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.fixture
def proxy(echo):
    p = FaultProxy(reactor, "127.0.0.1", echo.getHost().port, seed=42)
    yield p
    pytest_twisted.blockon(p.stop())


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.inlineCallbacks
def test_forwards_both_ways_and_closes_the_other_side(proxy, echo):
    c = yield connect_raw(reactor, proxy.port)
    c.transport.write(b"hello\r\n")
    out = yield c.until(rb"hello\r\n")
    assert out == b"hello\r\n"
    payload = bytes(range(256)) * 2000  # 512 KB, above the high-water mark
    c.transport.write(payload + b"END\r\n")
    out = yield c.until(rb"END\r\n", timeout=10)
    assert out == payload + b"END\r\n"
    assert proxy.accepted == 1 and proxy.open_connections == 1
    c.transport.loseConnection()
    yield c.lost
    yield sleep(0.1)
    assert proxy.open_connections == 0 and echo.factory_.lost == 1


@pytest_twisted.inlineCallbacks
def test_cut_all_aborts_every_connection(proxy, echo):
    clients = []
    for _ in range(3):
        c = yield connect_raw(reactor, proxy.port)
        c.transport.write(b"x\r\n")
        yield c.until(rb"x\r\n")
        clients.append(c)
    proxy.cut_all()
    yield defer.gatherResults([c.lost for c in clients])
    yield sleep(0.1)
    assert echo.factory_.lost == 3
    assert proxy.events[-1][1] == "cut all 3 connections"
    c = yield connect_raw(reactor, proxy.port)  # new connections still work
    c.transport.write(b"y\r\n")
    yield c.until(rb"y\r\n")
    c.transport.loseConnection()


@pytest_twisted.inlineCallbacks
def test_stall_holds_data_then_delivers_it(proxy):
    c = yield connect_raw(reactor, proxy.port)
    proxy.stall(0.4)
    started = time.monotonic()
    c.transport.write(b"late\r\n")
    yield c.until(rb"late\r\n")
    assert 0.35 < time.monotonic() - started < 2
    c.transport.loseConnection()


@pytest_twisted.inlineCallbacks
def test_slow_limits_the_rate(proxy):
    c = yield connect_raw(reactor, proxy.port)
    proxy.slow(20000)
    started = time.monotonic()
    c.transport.write(b"z" * 8000 + b"\r\n")
    yield c.until(rb"z\r\n")
    elapsed = time.monotonic() - started
    assert 0.3 < elapsed < 1.5, elapsed  # 8 KB each way at 20 KB/s, pipelined
    proxy.slow(0)
    started = time.monotonic()
    c.transport.write(b"q" * 8000 + b"\r\n")
    yield c.until(rb"q\r\n")
    assert time.monotonic() - started < 0.3
    c.transport.loseConnection()


@pytest_twisted.inlineCallbacks
def test_refuse_then_accept_again(proxy):
    proxy.refuse(0.5)
    yield sleep(0.05)
    with pytest.raises(error.ConnectionRefusedError):
        yield connect_raw(reactor, proxy.port)
    yield sleep(0.6)
    c = yield connect_raw(reactor, proxy.port)
    c.transport.write(b"back\r\n")
    yield c.until(rb"back\r\n")
    c.transport.loseConnection()
    proxy.refuse(mode="close")
    c = yield connect_raw(reactor, proxy.port)
    yield c.lost
    assert c.received == b""
    proxy.heal()
    c = yield connect_raw(reactor, proxy.port)
    c.transport.write(b"ok\r\n")
    yield c.until(rb"ok\r\n")
    c.transport.loseConnection()


@pytest_twisted.inlineCallbacks
def test_random_cuts_are_seeded(echo):
    def cut_pattern(seed):
        # the decisions for a sequence of chunks depend only on the seed
        p = FaultProxy(reactor, "127.0.0.1", echo.getHost().port, seed=seed)
        p.cut_per_chunk = 0.3
        return p, [p.random.random() < 0.3 for _ in range(20)]

    (a, pa), (b, pb) = cut_pattern(7), cut_pattern(7)
    assert pa == pb and a.seed == 7
    yield a.stop()
    yield b.stop()
    unseeded = FaultProxy(reactor, "127.0.0.1", echo.getHost().port)
    assert isinstance(unseeded.seed, int)
    yield unseeded.stop()

    p = FaultProxy(reactor, "127.0.0.1", echo.getHost().port, seed=1)
    p.cut_randomly(per_chunk=1.0)
    c = yield connect_raw(reactor, p.port)
    c.transport.write(b"gone\r\n")
    yield c.lost
    assert c.received == b"" and "at random (chunk)" in p.events[-1][1]
    p.cut_randomly(per_second=50)  # about certain within one 0.1 s tick
    c = yield connect_raw(reactor, p.port)
    started = time.monotonic()
    yield c.lost
    assert time.monotonic() - started < 1.0
    yield p.stop()


@pytest_twisted.inlineCallbacks
def test_schedule_runs_actions_in_order(proxy):
    c = yield connect_raw(reactor, proxy.port)
    proxy.schedule([(0.1, ("stall", None)), (0.3, "cut_all")])
    yield sleep(0.2)
    c.transport.write(b"never\r\n")
    yield c.lost
    assert c.received == b""
    assert [e for _, e in proxy.events] == ["stall None s", "cut all 1 connections"]


@pytest_twisted.inlineCallbacks
def test_against_a_real_redis(redis):
    p = FaultProxy(reactor, "127.0.0.1", redis.port, seed=3)
    try:
        c = yield connect_raw(reactor, p.port)
        c.transport.write(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
        out = yield c.until(rb"\$5\r\nvalue\r\n")
        assert out == b"+OK\r\n$5\r\nvalue\r\n"
        p.stall(0.3)
        started = time.monotonic()
        c.transport.write(b"PING\r\n")
        yield c.until(rb"\+PONG\r\n")
        assert time.monotonic() - started > 0.25
        p.cut_all()
        yield c.lost
        assert redis.client()("GET", "k") == b"value"  # redis itself is fine
    finally:
        yield p.stop()
