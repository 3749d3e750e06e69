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
