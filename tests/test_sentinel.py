"""Redis Sentinel: URLs, and the endpoint following a real failover."""

import pytest
import pytest_twisted
from twisted.internet import protocol
from twisted.trial.unittest import SynchronousTestCase

from fido_tx.redis import url as redisurl
from fido_tx.redis.sentinel import SentinelEndpoint, SentinelError, ask, resolve_master
from tests.support import redis_server
from tests.support.sentinel import SentinelSetup


class SentinelURLTests(SynchronousTestCase):
    def test_several_sentinels_master_and_db(self):
        url = redisurl.parse("redis+sentinel://:pw@s1:26379,s2,[::1]:26380/mymaster/3")
        self.assertEqual(url.sentinels, (("s1", 26379), ("s2", 26379), ("::1", 26380)))
        self.assertEqual((url.master, url.db, url.password), ("mymaster", 3, "pw"))
        self.assertTrue(url.sentinel)
        self.assertFalse(url.tls)

    def test_tls_and_sentinel_password_are_kept_and_redacted(self):
        url = redisurl.parse(
            "rediss+sentinel://u:secret1@s1/m?sentinel_password=secret2&ca_file=/ca.pem")
        self.assertTrue(url.tls)
        self.assertEqual(url.sentinel_password, "secret2")
        self.assertEqual(url.ca_file, "/ca.pem")
        shown = url.redacted()
        self.assertNotIn("secret1", shown)
        self.assertNotIn("secret2", shown)
        self.assertNotIn("secret", redisurl.redact(
            "redis+sentinel://u:secret1@s1/m?sentinel_password=secret2"))

    def test_the_master_found_keeps_credentials_db_and_tls(self):
        url = redisurl.parse("rediss+sentinel://u:pw@s1/m/2?sentinel_password=x")
        master = url.at("10.0.0.5", 6380)
        self.assertEqual((master.scheme, master.host, master.port, master.db),
                         ("rediss", "10.0.0.5", 6380, 2))
        self.assertEqual((master.username, master.password), ("u", "pw"))
        self.assertIsNone(master.sentinel_password)

    def test_a_master_name_is_required(self):
        for text in ("redis+sentinel://s1", "redis+sentinel://s1/"):
            with self.assertRaises(redisurl.RedisURLError) as e:
                redisurl.parse(text)
            self.assertIn("name the master", str(e.exception))

    def test_bad_parts_are_one_line_errors(self):
        for text, words in [
            ("redis+sentinel://s1/m/x", "not a number"),
            ("redis+sentinel://s1/m/1/2", "/MASTER or /MASTER/db"),
            ("redis+sentinel://s1:0/m", "port 0"),
            ("redis+sentinel://s1/m?foo=1", "unknown parameter"),
        ]:
            with self.assertRaises(redisurl.RedisURLError) as e:
                redisurl.parse(text)
            self.assertIn(words, str(e.exception))


@pytest.fixture
def sentinels():
    binary = redis_server.require("redis-server", redis_server.find_redis_server())
    setup = SentinelSetup(binary).start()
    try:
        yield setup
    finally:
        setup.close()


def _role(reactor, endpoint):
    return ask(reactor, endpoint, [("ROLE",)], 5)


@pytest_twisted.ensureDeferred
async def test_the_endpoint_connects_to_the_master_and_follows_a_failover(sentinels):
    from twisted.internet import reactor

    url = redisurl.parse(sentinels.url)
    endpoint = SentinelEndpoint(reactor, url, 5)
    first = await endpoint.locate()
    assert first == ("127.0.0.1", sentinels.master.port)
    replies = await _role(reactor, endpoint)
    assert replies[0][0] == b"master"

    sentinels.sentinels[0].client()("SENTINEL", "FAILOVER", "fidomaster")
    from twisted.internet import threads

    new_port = await threads.deferToThread(sentinels.wait_failover, sentinels.master.port)
    assert new_port == sentinels.replica.port
    assert await endpoint.locate() == ("127.0.0.1", new_port)
    replies = await _role(reactor, endpoint)
    assert replies[0][0] == b"master"
    assert endpoint.master == ("127.0.0.1", new_port)
    # the blocking resolver of the fido command agrees
    assert resolve_master(url).port == new_port
    from fido_tx.redis.resp import RespConnection

    with RespConnection(url) as conn:  # what fido status uses
        assert conn.command("ROLE")[0] == b"master"


@pytest_twisted.ensureDeferred
async def test_no_reachable_sentinel_is_one_clear_error(sentinels):
    from twisted.internet import reactor

    url = redisurl.parse(
        f"redis+sentinel://127.0.0.1:{redis_server.free_port()}/fidomaster/0")
    with pytest.raises(SentinelError) as e:
        await SentinelEndpoint(reactor, url, 2).locate()
    assert "no sentinel named a reachable master 'fidomaster'" in str(e.value)
    url = redisurl.parse(f"redis+sentinel://127.0.0.1:{sentinels.sentinels[1].port}/nosuch/0")
    with pytest.raises(SentinelError) as e:
        await SentinelEndpoint(reactor, url, 2).locate()
    assert "no master named 'nosuch'" in str(e.value)


@pytest_twisted.ensureDeferred
async def test_min_replicas_confirms_only_what_a_replica_has(sentinels):
    """[redis] min_replicas: a batch is confirmed (and so marked) only once a
    replica has it; with the replica gone nothing is confirmed, and an id
    already delivered is not reported as delivered either, so the session
    marks nothing until the replica is back."""
    from twisted.internet import reactor

    from fido_tx import errors
    from fido_tx.config import RedisSettings
    from fido_tx.redis.connection import RedisConnection
    from fido_tx.sinks.message import Message
    from fido_tx.sinks.stream import StreamSink
    from tests.test_sinks import _up

    master = f"redis://127.0.0.1:{sentinels.master.port}/0"
    conn = RedisConnection(reactor, RedisSettings(url=master, connect_timeout=2.0,
                                                  command_timeout=5.0))
    await _up(conn)
    try:
        sink = StreamSink("default", conn, "s", min_replicas=1, replica_timeout=0.5)
        msg = lambda i: Message("acme", "INBOX", "7", str(i), b"Subject: x\r\n\r\n%d" % i)
        done = await sink.deliver([msg(1), msg(2)])
        assert done.confirmed == ("1", "2")
        assert sentinels.replica.client()("XLEN", "s") == 2

        sentinels.replica.stop(kill=True)
        with pytest.raises(errors.FidoError) as e:
            await sink.deliver([msg(3)])
        assert e.value.kind == errors.REDIS
        assert "only 0 of 1 Redis replicas" in e.value.message
        with pytest.raises(errors.FidoError):  # 3 is delivered, but not safe yet
            await sink.filter_new("acme", "INBOX", "7", ["3", "4"])

        sentinels.replica.start().wait_ping()
        await deferLater(reactor, 0.5)
        for _ in range(50):
            try:
                new = await sink.filter_new("acme", "INBOX", "7", ["3", "4"])
                break
            except errors.FidoError:
                await deferLater(reactor, 0.2)
        assert new == ["4"]
        assert sentinels.replica.client()("XLEN", "s") == 3
    finally:
        await conn.stopService()


def deferLater(reactor, seconds):
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_write_refused_as_readonly_drops_the_connection_to_find_the_master(sentinels):
    from twisted.internet import reactor

    from fido_tx import errors
    from fido_tx.config import RedisSettings
    from fido_tx.redis.connection import RedisConnection
    from tests.test_sinks import _up

    replica = f"redis://127.0.0.1:{sentinels.replica.port}/0"
    conn = RedisConnection(reactor, RedisSettings(url=replica, connect_timeout=2.0,
                                                  command_timeout=5.0))
    await _up(conn)
    states = []
    conn.add_connection_observer(states.append)
    try:
        with pytest.raises(errors.FidoError) as e:
            await conn.execute("SET", "k", "v")
        assert "READONLY" in e.value.message and "reconnecting" in e.value.message
        for _ in range(50):
            if False in states:
                break
            await deferLater(reactor, 0.02)
        assert False in states  # dropped; it reconnects, through the endpoint, by itself
    finally:
        await conn.stopService()
