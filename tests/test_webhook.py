"""The webhook sink (fido_tx.sinks.webhook) against a GitLab-like endpoint
that checks the JWT with PyJWT, on loopback, with a real Redis for the
dedupe record: only 2xx is delivered; 500 and down retry and deliver once;
401 keeps the mail; 400 is rejected; a hang ends at the deadline."""

import base64
import os
import shutil
import tempfile
import time

import attr
import jwt as pyjwt
import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from fido_tx import errors
from fido_tx.interfaces import ISink
from fido_tx.redis import keys
from fido_tx.sinks import jwt, webhook
from fido_tx.sinks.message import Message, MessageKey
from tests.support.gitlab_endpoint import GitLabEndpoint, check_token
from tests.support import redisconn

SECRET = base64.b64encode(bytes(range(32))).decode() + "\n"


def _reactor():
    from twisted.internet import reactor

    return reactor


@attr.s(frozen=True, auto_attribs=True)
class Ctx:
    reactor: object
    redis: object
    dry_run: bool = False
    log: object = None


def secret_file(tmp_path, text=SECRET, name="secret"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def message(i, raw=None, route_key="", account="acme", epoch="7"):
    raw = raw or f"From: a@b.test\r\nSubject: {i}\r\n\r\nbody {i}\r\n".encode()
    return Message(account, "INBOX", epoch, str(i), raw, route_key=route_key)


# -- synchronous: signing, options, headers ------------------------------------


class SigningTests(SynchronousTestCase):
    def test_pyjwt_accepts_our_token(self):
        key = bytes(range(32))
        token = jwt.gitlab_token(key, 1_700_000_000.97)
        claims = pyjwt.decode(token, key, algorithms=["HS256"], issuer="gitlab-mailroom")
        self.assertEqual(claims["iat"], 1_700_000_000)  # floor: never in the future
        self.assertEqual(len(claims["nonce"]), 24)
        self.assertEqual(pyjwt.get_unverified_header(token)["alg"], "HS256")
        self.assertEqual(check_token(token, SECRET, now=1_700_000_000.0), "")
        self.assertEqual(check_token(token, SECRET, now=1_699_999_999.5), "iat in the future")
        self.assertEqual(check_token(token, SECRET, now=1_700_000_301), "iat too old")

    def test_nonce_differs_each_time(self):
        key = bytes(32)
        self.assertNotEqual(jwt.gitlab_token(key, 1.0), jwt.gitlab_token(key, 1.0))

    def test_wrong_key_is_refused_by_pyjwt(self):
        token = jwt.gitlab_token(bytes(32), time.time())
        self.assertIn("Signature", check_token(token, SECRET))

    def test_idempotency_key_is_stable_per_message_key(self):
        a = webhook.idempotency_key(MessageKey("acme", "INBOX", "7", "1"))
        self.assertEqual(a, webhook.idempotency_key(MessageKey("acme", "INBOX", "7", "1")))
        self.assertNotEqual(a, webhook.idempotency_key(MessageKey("acme", "INBOX", "7", "2")))
        self.assertNotEqual(a, webhook.idempotency_key(MessageKey("acme", "INBOX", "8", "1")))


class ValidateTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def write(self, name, text):
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(text)
        return name

    def check(self, **options):
        return webhook.validate(dict({"url": "https://gitlab.example.com/api"}, **options), self.dir)

    def error(self, **options):
        with self.assertRaises(ValueError) as e:
            self.check(**options)
        return str(e.exception)

    def test_gitlab_secret_checked_and_path_resolved(self):
        self.write("s", SECRET)
        o = self.check(auth="gitlab-jwt", secret_file="s")
        self.assertEqual(o["secret_file"], os.path.join(os.path.abspath(self.dir), "s"))
        self.assertNotIn(SECRET.strip(), repr(o))

    def test_bad_secrets_one_line_naming_the_key(self):
        short = base64.b64encode(b"x" * 16).decode()
        self.write("short", short)
        self.write("junk", "not base64 at all!")
        for name, why in (("short", "16 bytes"), ("junk", "not base64"), ("missing", "cannot read")):
            text = self.error(auth="gitlab-jwt", secret_file=name)
            self.assertTrue(text.startswith("secret_file: "), text)
            self.assertIn(why, text)
            self.assertNotIn("\n", text)
            self.assertNotIn(short, text)
        self.assertIn("secret_file: required", self.error(auth="gitlab-jwt"))

    def test_other_options(self):
        self.assertIn("url: required", self._no_url())
        self.assertIn("url:", self.error(url="ftp://x"))
        self.assertIn("auth:", self.error(auth="digest"))
        self.assertIn("timeout:", self.error(timeout=0))
        self.assertIn("concurrency:", self.error(concurrency=0))
        self.assertIn("unknown key bogus", self.error(bogus=1))
        self.assertIn("token_file: required", self.error(auth="bearer"))
        self.write("empty", "\n")
        self.assertIn("token_file:", self.error(auth="bearer", token_file="empty"))
        self.assertIn("password_file: required", self.error(auth="basic", username="u"))
        self.assertEqual(self.check(timeout=5)["timeout"], 5.0)

    def _no_url(self):
        with self.assertRaises(ValueError) as e:
            webhook.validate({}, self.dir)
        return str(e.exception)

    def test_bearer_and_basic_headers_and_repr(self):
        self.write("tok", "s3cret-token\n")
        self.write("pw", "pa55word\n")
        clock = task.Clock()
        o = self.check(auth="bearer", token_file="tok")
        sink = webhook.WebhookSink("app", o, reactor=clock, redis=None)
        self.assertEqual(sink._auth.headers(), [(b"Authorization", b"Bearer s3cret-token")])
        self.assertNotIn("s3cret", repr(sink._auth) + repr(sink.__dict__))
        o = self.check(auth="basic", username="fido", password_file="pw")
        sink = webhook.WebhookSink("app", o, reactor=clock, redis=None)
        expected = b"Basic " + base64.b64encode(b"fido:pa55word")
        self.assertEqual(sink._auth.headers(), [(b"Authorization", expected)])
        verifyObject(ISink, sink)

    def test_jwt_iat_follows_the_reactor_clock(self):
        self.write("s", SECRET)
        clock = task.Clock()
        clock.advance(1_700_000_123.9)
        sink = webhook.WebhookSink("g", self.check(auth="gitlab-jwt", secret_file="s"),
                                   reactor=clock, redis=None)
        [(name, token)] = sink._auth.headers()
        self.assertEqual(name, b"Gitlab-Mailroom-Api-Request")
        claims = pyjwt.decode(token, bytes(range(32)), algorithms=["HS256"],
                              issuer="gitlab-mailroom", options={"verify_iat": False})
        self.assertEqual(claims["iat"], 1_700_000_123)


# -- against the endpoint and a real Redis -------------------------------------


@pytest.fixture
def endpoint():
    ep = GitLabEndpoint(_reactor(), SECRET).start()
    yield ep
    pytest_twisted.blockon(ep.stop())


@pytest.fixture
def conn(redis):
    c = pytest_twisted.blockon(redisconn.shared_connection(_reactor(), redis.port))
    yield c
    pytest_twisted.blockon(redisconn.close(c))


def make_sink(tmp_path, endpoint, conn, **extra):
    options = {"url": endpoint.url(), "auth": "gitlab-jwt", "secret_file": "secret"}
    options.update(extra)
    secret_file(tmp_path)
    o = webhook.validate(options, str(tmp_path))
    sink = webhook.build("gitlab", o, Ctx(_reactor(), conn))
    sink.startService()
    return sink


@pytest_twisted.ensureDeferred
async def test_delivers_raw_message_as_gitlab_expects(tmp_path, endpoint, conn, redis):
    sink = make_sink(tmp_path, endpoint, conn)
    try:
        raw8 = b"From: a@b.test\r\nSubject: caf\xe9\r\n\r\ncr\xe8me \x00\xff\r\n"
        msgs = [message(1, route_key="group-proj-1-issue-"), message(2, raw=raw8)]
        self_check = await sink.filter_new("acme", "INBOX", "7", ["1", "2"])
        assert self_check == ["1", "2"]
        d = await sink.deliver(msgs)
        assert sorted(d.confirmed) == ["1", "2"] and sorted(d.new) == ["1", "2"]
        assert d.error is None and d.rejected == ()
        assert len(endpoint.requests) == 2
        by_body = {r.body: r for r in endpoint.requests}
        assert set(by_body) == {msgs[0].raw, raw8}  # byte for byte
        for m in msgs:
            r = by_body[m.raw]
            assert r.jwt_ok, r.jwt_error
            assert r.path == "/api/v4/internal/mail_room/incoming_email"
            assert r.headers["content-type"] == "text/plain"
            assert r.headers["idempotency-key"] == webhook.idempotency_key(m.key)
        assert by_body[msgs[0].raw].headers["x-fido-route-key"] == "group-proj-1-issue-"
        assert "x-fido-route-key" not in by_body[raw8].headers
        members = redis.client()("SMEMBERS", keys.dedupe("acme", "INBOX", "7"))
        assert sorted(members) == [b"1", b"2"]
        # delivered before: confirmed again, not posted again
        assert await sink.filter_new("acme", "INBOX", "7", ["1", "2", "3"]) == ["3"]
        d = await sink.deliver(msgs)
        assert sorted(d.confirmed) == ["1", "2"] and d.new == ()
        assert len(endpoint.requests) == 2
    finally:
        await sink.stopService()


@pytest_twisted.ensureDeferred
async def test_500_retries_then_delivers_once_with_same_key(tmp_path, endpoint, conn):
    sink = make_sink(tmp_path, endpoint, conn)
    try:
        endpoint.mode = "error"
        d = await sink.deliver([message(5)])
        assert d.confirmed == () and d.new == () and d.rejected == ()
        assert d.error.kind == errors.DELIVERY and "answered 500" in d.error.message
        assert await sink.filter_new("acme", "INBOX", "7", ["5"]) == ["5"]
        endpoint.mode = "ok"
        d = await sink.deliver([message(5)])
        assert d.confirmed == ("5",) and d.error is None
        d = await sink.deliver([message(5)])
        assert d.new == ()
        keys = {r.headers["idempotency-key"] for r in endpoint.requests}
        assert len(endpoint.requests) == 2 and len(keys) == 1
        assert len(endpoint.delivered()) == 1
    finally:
        await sink.stopService()


@pytest_twisted.ensureDeferred
async def test_down_is_a_delivery_error_then_delivers_when_back(tmp_path, endpoint, conn):
    sink = make_sink(tmp_path, endpoint, conn)
    try:
        await endpoint.stop()
        d = await sink.deliver([message(1), message(2)])
        assert d.confirmed == () and d.error.kind == errors.DELIVERY
        assert "refused" in d.error.message
        endpoint.start()
        d = await sink.deliver([message(1), message(2)])
        assert sorted(d.confirmed) == ["1", "2"] and d.error is None
        assert len(endpoint.delivered()) == 2
    finally:
        await sink.stopService()


@pytest_twisted.ensureDeferred
async def test_401_keeps_the_mail_and_says_check_the_secret(tmp_path, endpoint, conn):
    sink = make_sink(tmp_path, endpoint, conn)
    try:
        endpoint.mode = "unauthorized"
        d = await sink.deliver([message(1)])
        assert d.confirmed == () and d.rejected == ()
        assert d.error.kind == errors.DELIVERY
        assert "401" in d.error.message and "secret_file" in d.error.message
        assert SECRET.strip() not in str(d.error) + d.error.debug
    finally:
        await sink.stopService()


@pytest_twisted.ensureDeferred
async def test_wrong_secret_is_refused_by_the_endpoint(tmp_path, endpoint, conn):
    other = base64.b64encode(b"\x01" * 32).decode()
    secret_file(tmp_path, other, "other")
    o = webhook.validate({"url": endpoint.url(), "auth": "gitlab-jwt",
                          "secret_file": "other"}, str(tmp_path))
    sink = webhook.build("gitlab", o, Ctx(_reactor(), conn))
    try:
        d = await sink.deliver([message(1)])
        assert d.error.kind == errors.DELIVERY and "401" in d.error.message
        assert not endpoint.requests[0].jwt_ok
    finally:
        await sink.stopService()


@pytest_twisted.ensureDeferred
async def test_429_is_throttled_with_its_retry_after_and_the_delivery_holds_back(
        tmp_path, endpoint, conn):
    sink = make_sink(tmp_path, endpoint, conn)
    try:
        endpoint.mode = "throttled"
        d = await sink.deliver([message(1), message(2)])
        assert d.confirmed == () and d.rejected == () and d.error.kind == errors.THROTTLED
        assert d.error.retry_after == 120
        assert "answered 429 (Retry-After: 120): nothing marked" in d.error.message
        assert await sink.filter_new("acme", "INBOX", "7", ["1", "2"]) == ["1", "2"]
        posts = len(endpoint.requests)
        # within the window: no POST at all, for this account or any other
        endpoint.mode = "ok"
        for account in ("acme", "other"):
            d = await sink.deliver([message(3, account=account)])
            assert d.confirmed == () and d.error.kind == errors.THROTTLED, d
            assert 0 < d.error.retry_after <= 120
        assert len(endpoint.requests) == posts
    finally:
        await sink.stopService()


@pytest_twisted.ensureDeferred
async def test_429_with_an_http_date_or_none_and_delivery_after_the_window(
        tmp_path, endpoint, conn):
    from email.utils import formatdate

    sink = make_sink(tmp_path, endpoint, conn)
    try:
        endpoint.mode = "throttled"
        endpoint.retry_after = formatdate(time.time() + 1, usegmt=True)
        d = await sink.deliver([message(1)])
        assert d.error.kind == errors.THROTTLED and 0 <= d.error.retry_after <= 2, d.error
        await task.deferLater(_reactor(), d.error.retry_after + 0.05, lambda: None)
        endpoint.mode = "ok"
        d = await sink.deliver([message(1)])
        assert d.confirmed == ("1",) and d.error is None
        endpoint.mode, endpoint.retry_after = "throttled", None
        d = await sink.deliver([message(2)])
        assert d.error.retry_after == webhook.THROTTLE_DEFAULT
        assert "no Retry-After" in d.error.message
        endpoint.retry_after = "999999"
        sink._throttled_until = None
        d = await sink.deliver([message(2)])
        assert d.error.retry_after == webhook.MAX_RETRY_AFTER
    finally:
        await sink.stopService()


@pytest_twisted.ensureDeferred
async def test_400_is_rejected_not_delivered(tmp_path, endpoint, conn):
    sink = make_sink(tmp_path, endpoint, conn)
    try:
        endpoint.mode = "bad_request"
        d = await sink.deliver([message(1), message(2)])
        assert d.rejected == ("1", "2") and d.confirmed == () and d.error is None
        assert await sink.filter_new("acme", "INBOX", "7", ["1", "2"]) == ["1", "2"]
    finally:
        await sink.stopService()


@pytest_twisted.ensureDeferred
async def test_hang_ends_at_the_deadline_with_bounded_concurrency(tmp_path, endpoint, conn):
    sink = make_sink(tmp_path, endpoint, conn, timeout=0.5, concurrency=2)
    try:
        endpoint.mode = "hang"
        started = time.monotonic()
        first = sink.deliver([message(i) for i in range(1, 5)])
        await task.deferLater(_reactor(), 0.3, lambda: None)
        assert len(endpoint.requests) <= 2  # concurrency 2: the others wait
        d = await first
        elapsed = time.monotonic() - started
        assert d.confirmed == () and d.error.kind == errors.DELIVERY
        assert "within 0.5 s" in d.error.message
        assert len(endpoint.requests) <= 4
        # two rounds of the 0.5 s deadline (unbounded, all four would end
        # together after one); the upper bound only says it did not hang
        assert 0.9 <= elapsed < 5.0
        endpoint.mode = "ok"
        d = await sink.deliver([message(1)])
        assert d.confirmed == ("1",)
    finally:
        await sink.stopService()


class _LosesSADD:
    """The shared connection, but the record after the 2xx fails: a crash
    between the POST and the record, seen from the sink."""

    def __init__(self, conn):
        self._conn = conn

    def execute(self, *args):
        return self._conn.execute(*args)

    def script(self, source):
        if source != webhook.RECORD_LUA:
            return self._conn.script(source)
        return _FailingScript()


class _FailingScript:
    def run(self, keys, args, what="script", then=None):
        return defer.fail(errors.FidoError(errors.REDIS, "Redis connection lost"))


@pytest_twisted.ensureDeferred
async def test_crash_between_post_and_record_repeats_one_post_same_key(tmp_path, endpoint, conn):
    secret_file(tmp_path)
    o = webhook.validate({"url": endpoint.url(), "auth": "gitlab-jwt",
                          "secret_file": "secret"}, str(tmp_path))
    broken = webhook.build("gitlab", o, Ctx(_reactor(), _LosesSADD(conn)))
    healthy = webhook.build("gitlab", o, Ctx(_reactor(), conn))
    try:
        d = await broken.deliver([message(9)])
        assert d.confirmed == () and d.error.kind == errors.REDIS  # nothing marked
        d = await healthy.deliver([message(9)])
        assert d.confirmed == ("9",)
        d = await healthy.deliver([message(9)])
        assert d.new == ()
        assert len(endpoint.requests) == 2
        assert len({r.headers["idempotency-key"] for r in endpoint.requests}) == 1
    finally:
        await broken.stopService()
        await healthy.stopService()


@pytest_twisted.ensureDeferred
async def test_dry_run_posts_nothing(tmp_path, endpoint, conn):
    secret_file(tmp_path)
    o = webhook.validate({"url": endpoint.url()}, str(tmp_path))
    sink = webhook.build("gitlab", o, Ctx(_reactor(), conn, dry_run=True))
    d = await sink.deliver([message(1)])
    assert d.confirmed == () and endpoint.requests == []
    await sink.stopService()


ENDPOINT_PROCESS = """
import json, sys
from twisted.internet import reactor
from tests.support.gitlab_endpoint import GitLabEndpoint
ep = GitLabEndpoint(reactor, open(sys.argv[1]).read()).start()
log = open(sys.argv[2], "a")
old = ep._site.resource.render_POST
def render(request):
    result = old(request)
    r = ep.requests[-1]
    log.write(json.dumps({"key": r.headers.get("idempotency-key"), "ok": r.jwt_ok,
                          "body": r.body.decode()}) + "\\n")
    log.flush()
    return result
ep._site.resource.render_POST = render
print(ep.port, flush=True)
reactor.run()
"""


def test_sigkill_between_post_and_record_repeats_only_those_posts(redis, tmp_path):
    """A real crash: the child POSTs 5 messages, GitLab answers 200, and the
    child is SIGKILLed while its dedupe write is stuck.  The next run POSTs
    each of them once more with the same Idempotency-Key; the run after that
    POSTs nothing."""
    import json
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    secret = secret_file(tmp_path)
    log = tmp_path / "posts.jsonl"
    server = subprocess.Popen([sys.executable, "-c", ENDPOINT_PROCESS, secret, str(log)],
                              cwd=root, env=env, stdout=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{int(server.stdout.readline())}/api/v4/internal/mail_room/incoming_email"
        args = [sys.executable, "-m", "tests.support.webhook_child", str(redis.port), url, secret, "5"]
        child = subprocess.Popen(args + ["stall"], cwd=root, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        try:
            line = child.stdout.readline()
            assert line == b"stalled\n", child.stderr.read()
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        first = [json.loads(x) for x in log.read_text().splitlines()]
        assert len(first) == 5 and all(p["ok"] for p in first)
        assert redis.client()("EXISTS", keys.dedupe("acme", "INBOX", "7")) == 0
        again = subprocess.run(args + ["run"], cwd=root, env=env, capture_output=True, timeout=60)
        assert again.stdout.split() == [b"new", b"1", b"2", b"3", b"4", b"5"], again.stderr
        third = subprocess.run(args + ["run"], cwd=root, env=env, capture_output=True, timeout=60)
        assert third.stdout.split() == [b"new"], third.stderr
        posts = [json.loads(x) for x in log.read_text().splitlines()]
        assert len(posts) == 10  # each message exactly twice: the crash repeated only those
        by_body = {}
        for p in posts:
            by_body.setdefault(p["body"], set()).add(p["key"])
        assert len(by_body) == 5 and all(len(keys) == 1 for keys in by_body.values())
    finally:
        server.terminate()
        server.wait()
