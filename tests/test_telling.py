"""Telling people, through the whole daemon: reports to a real local HTTP
endpoint, secrets never leaked, the web application down or hanging never
slowing fetching, /healthz and /metrics over real HTTP."""

import io
import json
import os
import time

import attr
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher
from twisted.web import resource, server

from fido_tx import config
from fido_tx.observe import logs
from fido_tx import service
from tests import daemon
from tests.support.mockimap import Behaviour, Fault, MockIMAPServer, MockMailbox
from tests.support.redis_server import free_port

TOKEN = "tok-3f9a-very-secret-token"


class Capture(resource.Resource):
    """A web application endpoint: records POSTs; may hang or fail."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.bodies = []
        self.headers = []
        self.mode = "ok"

    def render_POST(self, request):
        self.headers.append(request.getHeader("authorization"))
        if self.mode == "hang":
            return server.NOT_DONE_YET
        self.bodies.append(json.loads(request.content.read()))
        request.setResponseCode(204)
        return b""


def _raw(user, i):
    return (f"Subject: {i}\r\nMessage-ID: <{user}.{i}@x>\r\n\r\nbody {user} {i}\r\n").encode()


def _account(port, user, password):
    return {"id": user, "host": "127.0.0.1", "port": port, "security": "none",
            "username": user, "password": password}


def _settings(directory, redis_url, reporter_url, poll_interval=0.2, listen="", workers=4):
    return attr.evolve(
        daemon.settings_for(
            directory, redis_url, workers, poll_interval,
            command_timeout=5, connect_timeout=5, greeting_timeout=5,
        ),
        backoff=config.BackoffSettings(
            initial=0.1, maximum=0.2, auth_initial=0.1, auth_maximum=0.2, jitter=0.1
        ),
        reporter=config.ReporterSettings(url=reporter_url, token=TOKEN, timeout=2),
        http=config.HttpSettings(listen=listen),
        log=config.LogSettings(level="debug"),
    )


_until = daemon.until


class LogCapture:
    """Every log event of the run, as text and JSON lines, at debug level."""

    def __init__(self):
        self.text = io.StringIO()
        self.json = io.StringIO()
        self._observers = [
            logs.make_observer(config.LogSettings(level="debug"), stream=self.text),
            logs.make_observer(config.LogSettings(level="debug", format="json"), stream=self.json),
        ]

    def __enter__(self):
        for o in self._observers:
            globalLogPublisher.addObserver(o)
        return self

    def __exit__(self, *exc):
        for o in self._observers:
            globalLogPublisher.removeObserver(o)

    def everything(self):
        return self.text.getvalue() + self.json.getvalue()


def _web(reactor):
    capture = Capture()
    port = reactor.listenTCP(0, server.Site(capture), interface="127.0.0.1")
    return capture, port, f"http://127.0.0.1:{port.getHost().port}/fido/errors"


def _start(reactor, tmp_path, redis, accounts, reporter_url, **kw):
    directory = str(tmp_path)
    with open(os.path.join(directory, "accounts.json"), "w") as f:
        json.dump({"accounts": accounts}, f)
    top = service.make_service(
        _settings(directory, redis.url, reporter_url, **kw), reactor, observer=False
    )
    results = []
    top.parts["scheduler"].add_result_observer(lambda a, r: results.append((a.id, r)))
    top.startService()
    return top, results


@pytest_twisted.inlineCallbacks
def test_ok_auth_auth_recovered_sends_two_reports_and_no_secret_anywhere(tmp_path, redis):
    from twisted.internet import reactor

    password = "pa55-word-never-shown"
    imap = MockIMAPServer(reactor, {"acme": MockMailbox(password, [_raw("acme", 1)])})
    imap_port = imap.listen()
    capture, web_port, url = _web(reactor)
    with LogCapture() as logged:
        # idle = false: a held connection logs in once, and this is about
        # logins that start failing on later polls
        account = dict(_account(imap_port, "acme", password), idle=False)
        top, results = _start(reactor, tmp_path, redis, [account], url)
        try:
            kinds = lambda: [r.kind for _, r in results]  # noqa: E731
            yield _until(reactor, lambda: len(results) >= 1, 5, "the first session")
            imap.script("acme", Behaviour(faults=(Fault(
                "LOGIN", "no", b"[AUTHENTICATIONFAILED] Authentication failed."),)))
            yield _until(reactor, lambda: kinds().count("auth") >= 2, 5, "two failed logins")
            imap.script("acme", Behaviour())
            yield _until(reactor, lambda: kinds()[-1] is None, 5, "the recovery")
            yield _until(reactor, lambda: len(capture.bodies) >= 2, 5, "the reports")
            yield task.deferLater(reactor, 0.5, lambda: None)  # nothing more comes
        finally:
            yield top.stopService()
            yield imap.stop()
            yield web_port.stopListening()
    assert kinds()[0] is None
    assert [b["kind"] for b in capture.bodies] == ["auth", "recovered"], capture.bodies
    first = capture.bodies[0]
    assert set(first) == {"account", "kind", "message", "debug", "occurred_at"}
    assert first["account"] == "acme"
    assert "AUTHENTICATIONFAILED" in first["message"] + first["debug"]
    assert "127.0.0.1" in first["debug"]
    assert all(h == f"Bearer {TOKEN}" for h in capture.headers)
    everything = json.dumps(capture.bodies) + logged.everything()
    assert "acme ok" in logged.text.getvalue() or "acme" in logged.text.getvalue()
    assert password not in everything
    assert TOKEN not in everything
    hash_ = redis.client()("HGETALL", "fido:account:acme")
    fields = dict(zip(hash_[::2], hash_[1::2]))
    assert fields[b"state"] == b"ok"
    assert fields[b"last_error_kind"] == b"auth"


@defer.inlineCallbacks
def _timed_run(reactor, tmp_path, redis, imap_port, url, n_good, bad, reports=None):
    accounts = [_account(imap_port, f"good{k:02d}", "pw") for k in range(n_good)]
    accounts += [_account(imap_port, b, "wrong") for b in bad]
    started = time.monotonic()
    top, results = _start(reactor, tmp_path, redis, accounts, url, poll_interval=3600, workers=4)
    good = {f"good{k:02d}" for k in range(n_good)}
    try:
        yield _until(reactor, lambda: good <= {i for i, r in results if r.ok}, 30, "the good accounts")
        took = time.monotonic() - started
        yield _until(reactor, lambda: set(bad) <= {i for i, r in results}, 10, "the bad accounts")
        if reports is not None:
            yield _until(reactor, lambda: len(reports) >= len(bad), 10, "the reports")
    finally:
        yield top.stopService()
    return took


@pytest_twisted.inlineCallbacks
def test_web_application_down_or_hanging_does_not_slow_twenty_good_accounts(tmp_path, redis):
    from twisted.internet import reactor

    users = {f"good{k:02d}": MockMailbox("pw", [_raw(f"good{k:02d}", i) for i in range(3)])
             for k in range(20)}
    bad = [f"bad{k}" for k in range(5)]
    users.update({b: MockMailbox("right", []) for b in bad})
    imap = MockIMAPServer(reactor, users)
    imap_port = imap.listen()
    capture, web_port, url = _web(reactor)
    closed = f"http://127.0.0.1:{free_port()}/fido/errors"
    timings = {}
    try:
        for label, target, mode in [("up", url, "ok"), ("hanging", url, "hang"), ("down", closed, "ok")]:
            capture.mode = mode
            redis.client()("FLUSHALL")
            for k in range(20):  # the same unseen mail every run
                box = imap.mailbox(f"good{k:02d}")
                for uid in box.uids():
                    box.flags(uid).discard("\\Seen")
            d = tmp_path / label
            d.mkdir()
            timings[label] = yield _timed_run(
                reactor, d, redis, imap_port, target, 20, bad,
                reports=capture.bodies if label == "up" else None,
            )
            if label == "up":
                assert sorted(b["account"] for b in capture.bodies) == bad
    finally:
        yield imap.stop()
        yield web_port.stopListening()
    print("run times of 20 good accounts by web application state:", timings)
    for label in ("hanging", "down"):
        assert timings[label] < timings["up"] * 2 + 0.5, timings


@pytest_twisted.inlineCallbacks
def test_healthz_goes_503_while_redis_is_down_and_200_when_back_and_metrics_parse(
    tmp_path, redis
):
    import treq
    from twisted.internet import reactor

    imap = MockIMAPServer(reactor, {"acme": MockMailbox("pw", [_raw("acme", 1)])})
    imap_port = imap.listen()
    http_port = free_port()
    top, results = _start(
        reactor, tmp_path, redis, [_account(imap_port, "acme", "pw")], "",
        listen=f"tcp:{http_port}:interface=127.0.0.1",
    )
    base = f"http://127.0.0.1:{http_port}"

    @defer.inlineCallbacks
    def get(path):
        response = yield treq.get(base + path, persistent=False)
        body = yield response.content()
        return response.code, body

    try:
        yield _until(reactor, lambda: len(results) >= 1, 5, "the first session")
        code, body = yield get("/healthz")
        assert code == 200, body
        assert json.loads(body)["status"] == "ok"

        code, body = yield get("/metrics")
        assert code == 200
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        sessions = families["fido_sessions"]
        ok = [s.value for s in sessions.samples
              if s.name == "fido_sessions_total" and s.labels.get("outcome") == "ok"]
        assert ok and ok[0] >= 1
        assert "fido_messages_fetched" in families

        redis.stop()
        deadline = time.monotonic() + 15
        while True:
            code, body = yield get("/healthz")
            if code == 503:
                break
            assert time.monotonic() < deadline, "healthz stayed 200 with Redis down"
            yield task.deferLater(reactor, 0.1, lambda: None)
        assert "redis" in json.loads(body)["reason"].lower()

        redis.start()
        deadline = time.monotonic() + 15
        while True:
            code, body = yield get("/healthz")
            if code == 200:
                break
            assert time.monotonic() < deadline, f"healthz stayed {code} with Redis back: {body}"
            yield task.deferLater(reactor, 0.2, lambda: None)
    finally:
        yield top.stopService()
        yield imap.stop()
