"""The lease scripts (fido_tx.redis.lease) against a real Redis."""

import time

from twisted.internet import defer

from fido_tx.redis.lease import CLUSTER_KEY, RedisLeases, lease_key


class _Script:
    def __init__(self, client, source):
        self.client, self.source = client, source

    def run(self, keys, args):
        return defer.succeed(self.client("EVAL", self.source, str(len(keys)), *keys,
                                         *[str(a) for a in args]))


class _BlockingConnection:
    """Just enough of RedisConnection (``script``) over the blocking client."""

    def __init__(self, client):
        self.client = client

    def script(self, source):
        return _Script(self.client, source)


def _result(d):
    out = []
    d.addBoth(out.append)
    return out[0]


def test_leases_are_exclusive_renewed_by_the_holder_and_released_by_it_only(redis):
    client = redis.client()
    a = RedisLeases(_BlockingConnection(client), "inst-a", ttl=2)
    b = RedisLeases(_BlockingConnection(client), "inst-b", ttl=2)
    assert _result(a.acquire(["x", "y"])) == {"x", "y"}
    assert _result(b.acquire(["x", "y", "z"])) == {"z"}
    assert client("GET", lease_key("x")) == b"inst-a"
    assert 0 < client("PTTL", lease_key("x")) <= 2000
    assert _result(b.renew(["x"])) == set()  # not b's to renew
    assert _result(a.renew(["x", "z"])) == {"x"}
    assert _result(b.release(["x"])) == 0  # nor to release
    assert client("GET", lease_key("x")) == b"inst-a"
    assert _result(a.release(["x", "y"])) == 2
    assert _result(b.acquire(["x"])) == {"x"}


def test_a_lease_expires_when_its_holder_stops_renewing(redis):
    client = redis.client()
    a = RedisLeases(_BlockingConnection(client), "inst-a", ttl=0.3)
    b = RedisLeases(_BlockingConnection(client), "inst-b", ttl=0.3)
    assert _result(a.acquire(["x"])) == {"x"}
    time.sleep(0.4)
    assert _result(b.acquire(["x"])) == {"x"}
    assert _result(a.renew(["x"])) == set()


def test_members_expire_and_leave(redis):
    client = redis.client()
    a = RedisLeases(_BlockingConnection(client), "inst-a", ttl=0.3)
    b = RedisLeases(_BlockingConnection(client), "inst-b", ttl=5)
    assert _result(a.members()) == ["inst-a"]
    assert _result(b.members()) == ["inst-a", "inst-b"]
    time.sleep(0.4)
    assert _result(b.members()) == ["inst-b"]
    _result(b.release([], leave=True))
    assert client("ZCARD", CLUSTER_KEY) == 0
