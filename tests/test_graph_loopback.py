"""The Graph source and the token providers over real loopback HTTP: the fake
token endpoint and the fake Graph service listening on 127.0.0.1, Fido's own
HttpClient with its connection pool, real time."""

import base64
import os
import time
from urllib.parse import quote

import attr

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site

from fido_tx import errors
from fido_tx.accounts.model import Account, OAuth
from fido_tx.credentials import oauth
from fido_tx.httpclient import HttpClient
from fido_tx.sources import graph, graphapi
from fido_tx.testing import MemorySink
from tests.support.graphserver import FakeGraph
from tests.support.oauthserver import FakeTokenEndpoint
from tests.test_graph import FakeRedis, SourceContext, mime

USER = "helpdesk@contoso.test"
SECRET = "loopback-secret-2468"


class Loopback:
    def __init__(self, tmp_path, timeout=10.0):
        self.tokens = FakeTokenEndpoint(clock=reactor, expires_in=3600)
        self.tokens.add_client("app-1", SECRET)
        self.graph = FakeGraph(tokens=self.tokens, clock=reactor)
        root = Resource()
        root.putChild(b"token", self.tokens)
        root.putChild(b"v1.0", self.graph)
        self.port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        base = f"http://127.0.0.1:{self.port.getHost().port}"
        self.graph.base_url = base
        self.graph.mailbox(USER)
        self.http = HttpClient(reactor, timeout=timeout)
        self.sink = MemorySink()
        providers = oauth.Providers(reactor, self.http,
                                    oauth.RefreshTokenStore.in_dir(str(tmp_path)))
        self.ctx = SourceContext(reactor, self.sink,
                                 graph.GraphShared(self.http, graphapi.Gates(reactor), FakeRedis()),
                                 lambda account: oauth.for_account(account, providers))
        self.account = Account(
            id="contoso-helpdesk", source="graph", user=USER, mailbox="Inbox",
            graph_endpoint=base, oauth=OAuth(provider="microsoft", client_id="app-1",
                                             client_secret=SECRET, token_url=base + "/token"))

    @defer.inlineCallbacks
    def close(self):
        self.graph.stop()
        yield self.http.close()
        yield self.port.stopListening()


@pytest_twisted.inlineCallbacks
def test_loopback_session_with_retry_after_measured_and_no_secret_logged(tmp_path):
    events = []
    globalLogPublisher.addObserver(events.append)
    lo = Loopback(tmp_path)
    try:
        big = mime(0) + os.urandom(2 * 1024 * 1024)
        ids = [lo.graph.add_message(USER, big)] + [
            lo.graph.add_message(USER, mime(n)) for n in range(1, 60)]
        lo.graph.throttle(1, retry_after=1)
        started = time.monotonic()
        result = yield graph.build(lo.account, lo.ctx).poll()
        elapsed = time.monotonic() - started
        assert result.kind is None, result.message
        assert result.fetched == 60 and result.marked == 60
        assert sorted(m.id for m in lo.sink.entries) == sorted(ids)
        assert [m.raw for m in lo.sink.entries if m.id == ids[0]] == [big]
        times = [t for t, *_ in lo.graph.log]
        assert lo.graph.codes[0] == 429
        assert 0.95 <= times[1] - times[0] < 3.0, times[:2]
        assert elapsed >= 0.95
        assert lo.graph.most_in_flight[USER.lower()] <= 4
        # the next session reuses the token: no second token request
        again = yield graph.build(lo.account, lo.ctx).poll()
        assert (again.kind, again.fetched) == (None, 0)
        assert len(lo.tokens.requests) == 1
    finally:
        globalLogPublisher.removeObserver(events.append)
        yield lo.close()
    text = "\n".join(formatEvent(e) + repr(e) for e in events) + repr(result) + result.debug
    assert "contoso-helpdesk" in text
    for secret in [SECRET] + lo.tokens.issued:
        for form in (secret, quote(secret, safe=""), base64.b64encode(secret.encode()).decode()):
            assert form not in text


@pytest_twisted.inlineCallbacks
def test_loopback_graph_that_never_answers_times_out(tmp_path):
    lo = Loopback(tmp_path, timeout=1.0)
    try:
        lo.graph.delay = 30.0
        started = time.monotonic()
        result = yield graph.build(lo.account, lo.ctx).poll()
        assert result.kind == errors.TIMEOUT, result
        assert time.monotonic() - started < 5
    finally:
        lo.graph.delay = 0
        yield lo.close()


class BlockingRedis:
    """``execute(*args) -> Deferred`` over the test helper's blocking client
    (the shared RedisConnection has the same method)."""

    def __init__(self, server):
        from tests.support.redis_server import RespClient

        self._client = RespClient(server.port)

    def execute(self, *args):
        return defer.maybeDeferred(self._client, *args)


@pytest_twisted.inlineCallbacks
def test_delta_link_kept_in_real_redis_across_restarts(tmp_path, redis):
    lo = Loopback(tmp_path)
    account = attr.evolve(lo.account, select="new")
    try:
        first = [lo.graph.add_message(USER, mime(n)) for n in range(12)]
        shared = graph.GraphShared(lo.http, graphapi.Gates(reactor), BlockingRedis(redis))
        ctx = attr.evolve(lo.ctx, graph=shared)
        result = yield graph.build(account, ctx).poll()
        assert (result.kind, result.fetched) == (None, 12), result.message
        link = RespClientFor(redis)("GET", graph.delta_key(account))
        assert b"$deltatoken=" in link
        # a restart: new objects, the same Redis
        later = lo.graph.add_message(USER, mime(99))
        shared = graph.GraphShared(lo.http, graphapi.Gates(reactor), BlockingRedis(redis))
        result = yield graph.build(account, attr.evolve(lo.ctx, graph=shared)).poll()
        assert (result.kind, result.fetched) == (None, 1), result.message
        assert sorted(m.id for m in lo.sink.entries) == sorted(first + [later])
        listing = [q for _, _, path, q, _ in lo.graph.log if path.endswith("/delta")]
        assert any("$deltatoken" in q for q in listing)
    finally:
        yield lo.close()


def RespClientFor(server):
    from tests.support.redis_server import RespClient

    return RespClient(server.port)


@pytest_twisted.inlineCallbacks
def test_graph_into_the_stream_sink_on_the_shared_redis_connection(tmp_path, redis):
    """The Graph source, the real stream sink and the shared RedisConnection
    (delta links too) on a real Redis: each message once, byte for byte, with
    the contract's fields for Graph."""
    from fido_tx import sinks
    from fido_tx.config import RedisSettings
    from fido_tx.redis.connection import RedisConnection

    connection = RedisConnection(reactor, RedisSettings(url=redis.url, connect_timeout=2.0,
                                                        command_timeout=2.0))
    connection.startService()
    if not connection.connected:
        up = defer.Deferred()
        connection.add_connection_observer(lambda ok: ok and not up.called and up.callback(1))
        yield up.addTimeout(10, reactor)
    module = sinks.module("stream")
    sink = module.build("default", module.validate(dict(module.OPTIONS), "/"),
                        sinks.SinkContext(reactor, connection))
    lo = Loopback(tmp_path)
    lo.ctx = attr.evolve(lo.ctx, sink=sink, graph=graph.GraphShared(
        lo.http, graphapi.Gates(reactor), connection))
    account = attr.evolve(lo.account, select="new")
    try:
        raw = {lo.graph.add_message(USER, mime(n) + bytes(range(256))): mime(n) + bytes(range(256))
               for n in range(12)}
        first = yield graph.build(account, lo.ctx).poll()
        assert (first.kind, first.fetched) == (None, 12), first.message
        lo.graph.forget_delta_tokens(USER)  # a 410 next time: a full resync
        extra = lo.graph.add_message(USER, mime(50))
        raw[extra] = mime(50)
        second = yield graph.build(account, lo.ctx).poll()
        assert (second.kind, second.fetched) == (None, 1), second.message
    finally:
        yield lo.close()
        yield connection.stopService()
    client = redis.client()
    entries = client("XRANGE", "fido:messages", "-", "+")
    fields = [dict(zip(e[1][::2], e[1][1::2])) for e in entries]
    assert len(fields) == 13
    assert sorted(f[b"uid"].decode() for f in fields) == sorted(raw)
    for f in fields:
        assert f[b"raw"] == raw[f[b"uid"].decode()]
        assert (f[b"account"], f[b"mailbox"], f[b"uidvalidity"], f[b"source"]) == (
            b"contoso-helpdesk", b"Inbox", b"", b"graph")
    assert b"$deltatoken=" in client("GET", graph.delta_key(account))
