"""fido_tx.httpclient over real loopback: one deadline over headers AND body,
bounded bodies, failures as FidoError kinds."""

import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web import resource, server

from fido_tx import errors
from fido_tx.httpclient import HttpClient, check_url, is_loopback
from tests.support.redis_server import free_port


class Slow(resource.Resource):
    """Headers at once, then part of the body, then nothing (or more, chunked)."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.calls = []

    def render_GET(self, request):
        what = request.path.decode()
        if what == "/stall":
            request.write(b"part of a body")
            self.calls.append(reactor.callLater(30, lambda: None))
            return server.NOT_DONE_YET
        if what == "/chunked":  # no Content-Length: 64 KiB writes
            for _ in range(8):
                request.write(b"x" * 65536)
            request.finish()
            return server.NOT_DONE_YET
        if what == "/long":
            return b"y" * 200_000  # Content-Length known up front
        return b"ok"


@pytest.fixture
def site():
    root = Slow()
    port = reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}", root
    for call in root.calls:
        if call.active():
            call.cancel()
    port.stopListening()


@pytest_twisted.inlineCallbacks
def test_deadline_covers_a_stalled_body(site):
    base, _ = site
    http = HttpClient(reactor, timeout=0.5)
    started = time.monotonic()
    try:
        yield http.request("GET", base + "/stall")
    except errors.FidoError as e:
        assert e.kind == errors.TIMEOUT and "0.5 s" in e.message
    else:
        raise AssertionError("no timeout")
    finally:
        yield http.close()
    assert 0.45 < time.monotonic() - started < 3


@pytest_twisted.inlineCallbacks
def test_bodies_are_bounded_and_small_ones_pass(site):
    base, _ = site
    http = HttpClient(reactor, timeout=5)
    try:
        ok = yield http.request("GET", base + "/ok", max_body=10)
        assert (ok.code, ok.body) == (200, b"ok")
        for path in ("/chunked", "/long"):
            with pytest.raises(errors.FidoError) as e:
                yield http.request("GET", base + path, max_body=100_000)
            assert e.value.kind == errors.TOO_LARGE
        again = yield http.request("GET", base + "/ok")  # the pool still works
        assert again.body == b"ok"
    finally:
        yield http.close()


@pytest_twisted.inlineCallbacks
def test_refused_connection_is_connect():
    http = HttpClient(reactor, timeout=5)
    try:
        with pytest.raises(errors.FidoError) as e:
            yield http.request("GET", f"http://127.0.0.1:{free_port()}/")
        assert e.value.kind == errors.CONNECT
    finally:
        yield http.close()


def test_loopback_and_url_rules():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.0.0.1") and not is_loopback("login.microsoftonline.com")
    assert check_url("https://graph.microsoft.com", "x")
    with pytest.raises(ValueError, match="graph_endpoint"):
        check_url("http://graph.microsoft.com", "graph_endpoint")
