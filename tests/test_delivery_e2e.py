"""IMAP -> Fido's session -> webhook or sidekiq delivery, end to end on
loopback: an IMAP server (Twisted's, in memory), the session as the daemon
runs it, the GitLab-like endpoint checking the JWT with PyJWT, a real Redis.
Only what the application accepted is marked \\Seen."""

import base64

import attr
import pytest_twisted
from twisted.internet import task

from fido_tx.redis import keys
from fido_tx.sinks import sidekiq, webhook
from tests.support import redisconn
from tests.support.gitlab_endpoint import GitLabEndpoint
from tests.test_imap import FakeMailbox, account, message, run, server  # noqa: F401

SECRET = base64.b64encode(bytes(range(32))).decode()


def _reactor():
    from twisted.internet import reactor

    return reactor


@attr.s(auto_attribs=True)
class Ctx:
    reactor: object
    redis: object
    dry_run: bool = False
    log: object = None


def seen(box, uid):
    return "\\Seen" in box.by_uid(uid).flags


@pytest_twisted.ensureDeferred
async def test_imap_to_gitlab_webhook(server, redis, tmp_path):  # noqa: F811
    (tmp_path / "secret").write_text(SECRET)
    endpoint = GitLabEndpoint(_reactor(), SECRET).start()
    conn = await redisconn.shared_connection(_reactor(), redis.port)
    options = webhook.validate(
        {"url": endpoint.url(), "auth": "gitlab-jwt", "secret_file": "secret"}, str(tmp_path))
    sink = webhook.build("gitlab", options, Ctx(_reactor(), conn))
    box = FakeMailbox(flags=("\\Seen", "\\Deleted", "$FidoTooLarge", "$FidoRejected"))
    raws = [message(1), message(2, b"8-bit \xe9\xff and NUL \x00")]
    for raw in raws:
        box.add(raw)
    srv = server({"INBOX": box})
    acct = account(srv.port)
    try:
        endpoint.mode = "error"  # GitLab answers 500: nothing is marked
        result = await run(acct, sink)
        assert not result.ok and result.kind == "delivery", result
        assert "answered 500; will retry" in result.message
        assert not seen(box, 1) and not seen(box, 2)
        endpoint.mode, endpoint.retry_after = "throttled", "1"  # 429: throttled, unmarked
        result = await run(acct, sink)
        assert result.kind == "throttled" and result.retry_after == 1.0, result
        assert "answered 429 (Retry-After: 1): nothing marked" in result.message
        assert not seen(box, 1) and not seen(box, 2)
        await task.deferLater(_reactor(), 1.05, lambda: None)  # the pause it asked for
        endpoint.mode = "unauthorized"  # wrong secret: nothing is marked
        result = await run(acct, sink)
        assert result.kind == "delivery"
        assert "answered 401: check the secret_file" in result.message
        assert not seen(box, 1) and not seen(box, 2)
        endpoint.mode = "ok"
        result = await run(acct, sink)
        assert result.ok and result.marked == 2, result
        assert seen(box, 1) and seen(box, 2)
        assert sorted(r.body for r in endpoint.delivered()) == sorted(raws)
        assert all(r.jwt_ok for r in endpoint.requests)
        # each message was POSTed four times, always with its own same key
        keys_by_body = {}
        for r in endpoint.requests:
            keys_by_body.setdefault(r.body, set()).add(r.headers["idempotency-key"])
        assert [len(k) for k in keys_by_body.values()] == [1, 1]
        assert redis.client()("HGET", keys.account("acme"), "fetched_total") == b"2"
        result = await run(acct, sink)  # nothing new: no POST
        assert result.ok and len(endpoint.requests) == 8
        box.add(message(3))
        endpoint.mode = "bad_request"  # refused for good: flagged, never \Seen
        result = await run(acct, sink)
        assert result.kind == "rejected", result
        assert not seen(box, 3) and "$FidoRejected" in box.by_uid(3).flags
        posts = len(endpoint.requests)
        result = await run(acct, sink)  # not offered again
        assert len(endpoint.requests) == posts
    finally:
        await sink.stopService()
        await redisconn.close(conn)
        await endpoint.stop()


@pytest_twisted.ensureDeferred
async def test_imap_to_sidekiq(server, redis):  # noqa: F811
    conn = await redisconn.shared_connection(_reactor(), redis.port)
    sink = sidekiq.build("jobs", sidekiq.validate({}, "."), Ctx(_reactor(), conn))
    box = FakeMailbox()
    raws = [message(1), message(2, b"caf\xe9")]
    for raw in raws:
        box.add(raw)
    srv = server({"INBOX": box})
    try:
        result = await run(account(srv.port), sink)
        assert result.ok and result.marked == 2, result
        assert seen(box, 1) and seen(box, 2)
        r = redis.client()
        jobs = r("LRANGE", "queue:default", 0, -1)
        assert len(jobs) == 2 and r("SMEMBERS", "queues") == [b"default"]
        box.add(message(3))
        result = await run(account(srv.port), sink)
        assert result.ok and result.marked == 1
        assert r("LLEN", "queue:default") == 3
        assert r("HGET", keys.account("acme"), "fetched_total") == b"3"
    finally:
        await redisconn.close(conn)
