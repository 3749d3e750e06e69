"""Reporter: contract JSON, retries, drops, timeouts, queue bound, no secrets.

Unit tests drive the reporter with ``treq.testing.StubTreq`` and a ``Clock``;
the async tests run it against a real twisted.web server on 127.0.0.1.
"""

import json
import socket

import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server

from fido_tx.config import ReporterSettings
from fido_tx.observe.report import REDACTED, Reporter, scrub

TOKEN = "tok-3b1f9c27e8a54d6f"
PASSWORD = "hunter2-very-secret"


class Recorder(resource.Resource):
    """Records each request; answers with scripted codes (default 200).

    A code of ``None`` means: hang (never answer).  ``retry_after`` adds the
    header to 429/503 answers.
    """

    isLeaf = True

    def __init__(self, codes=(), retry_after=None):
        super().__init__()
        self.codes = list(codes)
        self.retry_after = retry_after
        self.requests = []
        self.hanging = []

    def render_POST(self, request):
        body = request.content.read()
        self.requests.append(
            {
                "body": body,
                "authorization": request.getHeader(b"authorization"),
                "content_type": request.getHeader(b"content-type"),
            }
        )
        code = self.codes.pop(0) if self.codes else 200
        if code is None:
            self.hanging.append(request)
            return server.NOT_DONE_YET
        request.setResponseCode(code)
        if self.retry_after is not None and code in (429, 503):
            request.setHeader(b"Retry-After", str(self.retry_after).encode())
        return b'{"ok": true}' if code < 300 else b"nope"

    @property
    def bodies(self):
        return [json.loads(r["body"]) for r in self.requests]


def settings(url="http://127.0.0.1:9/report", **kw):
    kw.setdefault("token", TOKEN)
    kw.setdefault("timeout", 5.0)
    return ReporterSettings(url=url, **kw)


class Fixed:
    """A random.Random stand-in without jitter."""

    def uniform(self, a, b):
        return 1.0


def make(codes=(), retry_after=None, **kw):
    rec = Recorder(codes, retry_after)
    stub = StubTreq(rec)
    clock = task.Clock()
    reporter = Reporter(
        clock,
        settings(**{k: v for k, v in kw.items() if k in ("queue_size", "timeout", "url")}),
        http_client=stub,
        random=Fixed(),
        **{k: v for k, v in kw.items() if k in ("concurrency", "retry_initial", "retry_max")},
    )
    return reporter, rec, stub, clock


class ReporterUnitTests(SynchronousTestCase):
    def test_report_returns_at_once_and_posts_contract_json_later(self):
        reporter, rec, stub, clock = make()
        reporter.startService()
        reporter.report("acme-support", "auth", "LOGIN rejected", "S: a1 NO", "2026-01-01T00:00:00.000Z")
        self.assertEqual(rec.requests, [])  # nothing on the caller's stack
        self.assertEqual(reporter.queue_length, 1)
        clock.advance(0)
        stub.flush()
        self.assertEqual(
            rec.bodies,
            [
                {
                    "account": "acme-support",
                    "kind": "auth",
                    "message": "LOGIN rejected",
                    "debug": "S: a1 NO",
                    "occurred_at": "2026-01-01T00:00:00.000Z",
                }
            ],
        )
        self.assertEqual(rec.requests[0]["authorization"], b"Bearer " + TOKEN.encode())
        self.assertEqual(rec.requests[0]["content_type"], b"application/json")
        self.assertEqual((reporter.sent, reporter.queue_length), (1, 0))

    def test_occurred_at_defaults_to_the_clock_time(self):
        reporter, rec, stub, clock = make()
        clock.advance(1700000000.25)
        reporter.startService()
        reporter.report("a", "dns", "no such host")
        clock.advance(0)
        self.assertEqual(rec.bodies[0]["occurred_at"], "2023-11-14T22:13:20.250Z")

    def test_5xx_is_retried_with_exponential_backoff_then_delivered(self):
        reporter, rec, stub, clock = make(codes=[500, 502, 503], retry_initial=2.0)
        reporter.startService()
        reporter.report("a", "auth", "m")
        clock.advance(0)
        self.assertEqual(len(rec.requests), 1)
        clock.advance(1.9)
        self.assertEqual(len(rec.requests), 1)
        clock.advance(0.1)  # 2 s after the first failure
        self.assertEqual(len(rec.requests), 2)
        clock.advance(3.9)
        self.assertEqual(len(rec.requests), 2)
        clock.advance(0.1)  # 4 s after the second
        self.assertEqual(len(rec.requests), 3)
        clock.advance(8)
        self.assertEqual(len(rec.requests), 4)
        self.assertEqual((reporter.sent, reporter.retries, reporter.queue_length), (1, 3, 0))
        self.assertEqual(len({r["body"] for r in rec.requests}), 1)  # the same report

    def test_backoff_is_capped(self):
        reporter, rec, stub, clock = make(codes=[500] * 6, retry_initial=1.0, retry_max=4.0)
        reporter.startService()
        reporter.report("a", "auth", "m")
        clock.advance(0)
        for _ in range(5):
            clock.advance(4.0)
        self.assertEqual(len(rec.requests), 6)

    def test_429_retry_after_is_honoured(self):
        reporter, rec, stub, clock = make(codes=[429], retry_after=7, retry_initial=1.0)
        reporter.startService()
        reporter.report("a", "auth", "m")
        clock.advance(0)
        clock.advance(6.9)
        self.assertEqual(len(rec.requests), 1)
        clock.advance(0.1)
        self.assertEqual(len(rec.requests), 2)
        self.assertEqual(reporter.sent, 1)

    def test_huge_retry_after_is_capped_by_retry_max(self):
        reporter, rec, stub, clock = make(codes=[503], retry_after=86400, retry_initial=1.0, retry_max=60.0)
        reporter.startService()
        reporter.report("a", "auth", "m")
        clock.advance(0)
        clock.advance(59.9)
        self.assertEqual(len(rec.requests), 1)
        clock.advance(0.1)  # retry_max, not a day
        self.assertEqual(len(rec.requests), 2)

    def test_retry_after_zero_does_not_spin(self):
        reporter, rec, stub, clock = make(codes=[429, 429], retry_after=0, retry_initial=2.0)
        reporter.startService()
        reporter.report("a", "auth", "m")
        clock.advance(0)
        clock.advance(1.9)
        self.assertEqual(len(rec.requests), 1)
        clock.advance(0.1)
        self.assertEqual(len(rec.requests), 2)

    def test_4xx_is_dropped_without_retry(self):
        reporter, rec, stub, clock = make(codes=[400, 200])
        reporter.startService()
        reporter.report("a", "auth", "m")
        clock.advance(0)
        clock.advance(1000)
        self.assertEqual(len(rec.requests), 1)
        self.assertEqual((reporter.rejected, reporter.sent, reporter.queue_length), (1, 0, 0))
        self.flushLoggedErrors()

    def test_hanging_server_times_out_the_whole_request_and_retries(self):
        reporter, rec, stub, clock = make(codes=[None], timeout=3.0, retry_initial=1.0)
        reporter.startService()
        reporter.report("a", "auth", "m")
        clock.advance(0)
        stub.flush()
        self.assertEqual((len(rec.requests), reporter.in_flight), (1, 1))
        clock.advance(3.0)  # the deadline cancels the request
        stub.flush()
        self.assertEqual(reporter.retries, 1)
        clock.advance(1.0)
        stub.flush()
        self.assertEqual(len(rec.requests), 2)
        self.assertEqual((reporter.sent, reporter.queue_length), (1, 0))

    def test_queue_bound_drops_the_oldest_and_counts(self):
        reporter, rec, stub, clock = make(queue_size=3)
        for i in range(5):
            reporter.report(f"acct-{i}", "auth", "m")
        self.assertEqual((reporter.queue_length, reporter.dropped), (3, 2))
        reporter.startService()
        clock.advance(0)
        self.assertEqual([b["account"] for b in rec.bodies], ["acct-2", "acct-3", "acct-4"])
        self.assertEqual(reporter.sent, 3)

    def test_at_most_concurrency_deliveries_run_at_once(self):
        reporter, rec, stub, clock = make(codes=[None] * 10, concurrency=4)
        reporter.startService()
        for i in range(10):
            reporter.report(f"acct-{i}", "auth", "m")
        clock.advance(0)
        stub.flush()
        self.assertEqual((len(rec.requests), reporter.in_flight, reporter.queue_length), (4, 4, 10))

    def test_empty_url_disables_reporting(self):
        reporter, rec, stub, clock = make(url="")
        reporter.startService()
        reporter.report("a", "auth", "m")
        clock.advance(0)
        self.assertEqual((rec.requests, reporter.queue_length), ([], 0))
        self.assertFalse(reporter.enabled)

    def test_no_report_body_contains_the_token_or_a_password(self):
        reporter, rec, stub, clock = make()
        reporter.startService()
        reporter.report(
            "a",
            "auth",
            f"LOGIN failed, token was {TOKEN}",
            f"C: a001 LOGIN bob {PASSWORD}\r\nS: a001 NO\r\npassword={PASSWORD}\r\n"
            f"url redis://u:{PASSWORD}@h:6379\r\nAuthorization: Bearer {TOKEN}",
        )
        reporter.report("b", "auth", "x", "C: a2 AUTHENTICATE PLAIN AGJvYgBodW50ZXIy", secrets=["AGJvYgBodW50ZXIy"])
        reporter.report("c", "auth", f"pw is {PASSWORD}", "", secrets=[PASSWORD])
        clock.advance(0)
        self.assertEqual(len(rec.requests), 3)
        for r in rec.requests:
            self.assertNotIn(TOKEN.encode(), r["body"])
            self.assertNotIn(PASSWORD.encode(), r["body"])
            self.assertNotIn(b"AGJvYgBodW50ZXIy", r["body"])
        self.assertIn(REDACTED, rec.bodies[0]["debug"])

    def test_stop_cancels_pending_work(self):
        reporter, rec, stub, clock = make(codes=[500], retry_initial=10.0)
        reporter.startService()
        reporter.report("a", "auth", "m")
        clock.advance(0)
        reporter.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(100)
        self.assertEqual(len(rec.requests), 1)


class ScrubTests(SynchronousTestCase):
    def test_imap_credentials_are_redacted_but_prose_is_kept(self):
        self.assertEqual(scrub("a001 LOGIN bob hunter2\r\n"), f"a001 LOGIN {REDACTED}\r\n")
        self.assertEqual(scrub("C: x AUTHENTICATE PLAIN AGJv"), f"C: x AUTHENTICATE {REDACTED}")
        kept = "LOGIN rejected: [AUTHENTICATIONFAILED] Authentication failed."
        self.assertEqual(scrub(kept), kept)
        self.assertEqual(scrub("* CAPABILITY IMAP4rev1 LOGIN-REFERRALS"), "* CAPABILITY IMAP4rev1 LOGIN-REFERRALS")

    def test_key_value_pairs_urls_and_headers(self):
        self.assertEqual(scrub("password=abc x"), f"password={REDACTED} x")
        self.assertEqual(scrub('{"password": "a b"}'), f'{{"password": {REDACTED}}}')
        self.assertEqual(scrub("redis://u:pw@h/0"), f"redis://u:{REDACTED}@h/0")
        self.assertEqual(scrub("Authorization: Bearer xyz"), f"Authorization: Bearer {REDACTED}")

    def test_any_case_and_text_whose_lower_case_changes_length(self):
        self.assertEqual(scrub("PASSWORD=x Token=y"), f"PASSWORD={REDACTED} Token={REDACTED}")
        self.assertEqual(scrub("\u0130 db_Password: x"), f"\u0130 db_Password: {REDACTED}")
        self.assertEqual(scrub("the secret is out"), "the secret is out")

    def test_literal_secrets(self):
        self.assertEqual(scrub("x swordfish y", ["swordfish"]), f"x {REDACTED} y")
        self.assertEqual(scrub("a b c", ["b"]), "a b c")  # too short to search for


# -- against a real HTTP server ------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listen(rec, port=0):
    from twisted.internet import reactor

    site = server.Site(rec)
    site.log = lambda request: None
    return reactor.listenTCP(port, site, interface="127.0.0.1")


def real_reporter(port, **kw):
    from twisted.internet import reactor

    s = settings(
        url=f"http://127.0.0.1:{port}/fido/report",
        timeout=kw.pop("timeout", 5.0),
        queue_size=kw.pop("queue_size", 1000),
    )
    kw.setdefault("retry_initial", 0.05)
    kw.setdefault("retry_max", 0.2)
    reporter = Reporter(reactor, s, **kw)
    reporter.startService()
    return reporter


def idle(reporter, timeout=10.0):
    from twisted.internet import reactor

    return reporter.when_idle().addTimeout(timeout, reactor)


@pytest_twisted.inlineCallbacks
def test_real_server_happy_path_and_persistent_connection():
    rec = Recorder()
    port = listen(rec)
    reporter = real_reporter(port.getHost().port)
    try:
        for i in range(3):
            reporter.report(f"acct-{i}", "connect", "connection refused", "imap.example.com:993")
        yield idle(reporter)
        assert sorted(b["account"] for b in rec.bodies) == ["acct-0", "acct-1", "acct-2"]
        assert all(r["authorization"] == b"Bearer " + TOKEN.encode() for r in rec.requests)
        assert reporter.sent == 3
    finally:
        yield reporter.stopService()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_real_server_5xx_is_retried_then_succeeds():
    rec = Recorder(codes=[503, 500])
    port = listen(rec)
    reporter = real_reporter(port.getHost().port)
    try:
        reporter.report("a", "auth", "m")
        yield idle(reporter)
        assert len(rec.requests) == 3
        assert (reporter.sent, reporter.retries) == (1, 2)
    finally:
        yield reporter.stopService()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_real_server_4xx_is_dropped():
    rec = Recorder(codes=[422])
    port = listen(rec)
    reporter = real_reporter(port.getHost().port)
    try:
        reporter.report("a", "auth", "m")
        reporter.report("b", "auth", "m")
        yield idle(reporter)
        assert len(rec.requests) == 2
        assert (reporter.sent, reporter.rejected) == (1, 1)
    finally:
        yield reporter.stopService()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_real_server_hanging_times_out_and_is_retried():
    rec = Recorder(codes=[None])
    port = listen(rec)
    reporter = real_reporter(port.getHost().port, timeout=0.3)
    try:
        reporter.report("a", "auth", "m")
        yield idle(reporter)
        assert len(rec.requests) == 2
        assert (reporter.sent, reporter.retries) == (1, 1)
    finally:
        yield reporter.stopService()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_real_server_down_reports_wait_and_are_delivered_when_it_comes_up():
    from twisted.internet import reactor

    portnum = free_port()
    reporter = real_reporter(portnum)
    rec = Recorder()
    port = None
    try:
        reporter.report("a", "auth", "m")
        reporter.report("b", "tls", "m")
        yield task.deferLater(reactor, 0.4, lambda: None)
        assert reporter.retries >= 2 and reporter.sent == 0
        assert reporter.queue_length == 2
        port = listen(rec, portnum)
        yield idle(reporter)
        assert sorted(b["account"] for b in rec.bodies) == ["a", "b"]
        assert reporter.sent == 2
    finally:
        yield reporter.stopService()
        if port is not None:
            yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_real_server_queue_bound_drops_oldest_while_server_is_down():
    portnum = free_port()
    reporter = real_reporter(portnum, queue_size=5, concurrency=1)
    rec = Recorder()
    port = None
    try:
        for i in range(12):
            reporter.report(f"acct-{i:02}", "auth", "m")
        # dispatch happens from the reactor: all twelve met a full queue of five
        assert (reporter.dropped, reporter.queue_length) == (7, 5)
        port = listen(rec, portnum)
        yield idle(reporter)
        assert [b["account"] for b in rec.bodies] == [f"acct-{i:02}" for i in range(7, 12)]
        assert all(TOKEN.encode() not in r["body"] for r in rec.requests)
    finally:
        yield reporter.stopService()
        if port is not None:
            yield port.stopListening()
