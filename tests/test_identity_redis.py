"""The identities the Redis sinks keep beside their dedupe records
(fido_tx.sinks.identity), against a real Redis: each sink (stream, list,
sidekiq, webhook) records a message's identity in its delivery's Lua step,
confirms without writing again a message whose identity it stored before
under another key, answers ``identities`` and ``recognise``, and leaves a
dedupe record of before the upgrade alone.  The bound (``KEEP``) evicts the
oldest."""

import pytest
import pytest_twisted

from fido_tx import sinks
from fido_tx.redis import keys
from fido_tx.sinks import identity
from fido_tx.sinks.message import Message
from tests.support import redisconn
from tests.support.gitlab_endpoint import GitLabEndpoint
from tests.test_webhook import SECRET, secret_file


def _reactor():
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def conn(redis):
    c = pytest_twisted.blockon(redisconn.shared_connection(_reactor(), redis.port))
    yield c
    pytest_twisted.blockon(redisconn.close(c))


@pytest.fixture
def endpoint():
    ep = GitLabEndpoint(_reactor(), SECRET).start()
    yield ep
    pytest_twisted.blockon(ep.stop())


def msg(uid, epoch="7", ident="", n=None, mailbox="INBOX"):
    n = uid if n is None else n
    raw = b"From: a@b.test\r\nMessage-ID: <%d@x>\r\n\r\nbody %d\r\n" % (n, n)
    return Message("acme", mailbox, epoch, str(uid), raw, identity=ident)


def build(kind, conn, tmp_path, endpoint):
    module = sinks.module(kind)
    options = dict(module.OPTIONS)
    if kind == "webhook":
        secret_file(tmp_path)
        options = {"url": endpoint.url(), "auth": "gitlab-jwt", "secret_file": "secret"}
    sink = module.build("t", module.validate(options, str(tmp_path)), sinks.SinkContext(reactor=_reactor(), redis=conn))
    if kind == "webhook":
        sink.startService()
    return sink


def written(kind, redis, endpoint):
    """How many messages the sink wrote (entries, documents, jobs, POSTs)."""
    r = redis.client()
    if kind == "stream":
        return r("XLEN", keys.DEFAULT_STREAM)
    if kind == "list":
        return r("LLEN", keys.DEFAULT_LIST)
    if kind == "sidekiq":
        return r("LLEN", "queue:default")
    return len(endpoint.requests)


@pytest.mark.parametrize("kind", ["stream", "list", "sidekiq", "webhook"])
@pytest_twisted.ensureDeferred
async def test_a_message_stored_before_under_another_uidvalidity_is_not_written_again(
        kind, conn, redis, tmp_path, endpoint):
    sink = build(kind, conn, tmp_path, endpoint)
    try:
        d = await sink.deliver([msg(1, ident="m1"), msg(2, ident="m2"), msg(3)])
        assert sorted(d.new) == ["1", "2", "3"]
        assert await sink.identities("acme", "INBOX", "7", ["1", "2", "3", "4"]) == \
            ["m1", "m2", "", ""]
        # UIDVALIDITY 8: the same two messages renumbered, and a new one
        d = await sink.deliver([msg(5, "8", "m1", n=1), msg(6, "8", "m2", n=2),
                                msg(7, "8", "m7")])
        assert sorted(d.confirmed) == ["5", "6", "7"] and d.new == ("7",), d
        assert written(kind, redis, endpoint) == 4
        assert await sink.filter_new("acme", "INBOX", "8", ["5", "6", "7", "9"]) == ["9"]
        assert await sink.identities("acme", "INBOX", "8", ["5", "7"]) == ["m1", "m7"]
        # another mailbox is another content index
        d = await sink.deliver([msg(1, ident="m1", mailbox="Other")])
        assert d.new == ("1",)
        r = redis.client()
        assert int(r("HGET", keys.account("acme"), "fetched_total")) == 5
    finally:
        if kind == "webhook":
            await sink.stopService()


@pytest.mark.parametrize("kind", ["stream", "sidekiq", "webhook"])
@pytest_twisted.ensureDeferred
async def test_recognise_records_what_was_stored_before_and_only_that(
        kind, conn, redis, tmp_path, endpoint):
    sink = build(kind, conn, tmp_path, endpoint)
    try:
        await sink.deliver([msg(1, ident="m1"), msg(2, ident="m2")])
        found = await sink.recognise("acme", "INBOX", "8", {"3": "m1", "4": "m9", "5": ""})
        assert found == ["3"]
        assert await sink.filter_new("acme", "INBOX", "8", ["3", "4", "5"]) == ["4", "5"]
        assert await sink.identities("acme", "INBOX", "8", ["3"]) == ["m1"]
        assert written(kind, redis, endpoint) == 2
    finally:
        if kind == "webhook":
            await sink.stopService()


def _script_calls(redis):
    stats = redis.client()("INFO", "commandstats")
    stats = stats.decode() if isinstance(stats, bytes) else stats
    return sum(int(line.split("calls=")[1].split(",")[0]) for line in stats.splitlines()
               if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")))


@pytest.mark.parametrize("kind", ["stream", "sidekiq", "webhook"])
@pytest_twisted.ensureDeferred
async def test_a_mailbox_with_nothing_recorded_is_recognised_without_a_round_trip(
        kind, conn, redis, tmp_path, endpoint):
    sink = build(kind, conn, tmp_path, endpoint)
    try:
        assert await sink.filter_new("acme", "INBOX", "7", ["1", "2"]) == ["1", "2"]
        before = _script_calls(redis)
        assert await sink.recognise("acme", "INBOX", "7", {"1": "m1", "2": "m2"}) == []
        assert _script_calls(redis) == before  # the EXISTS rode with the dedupe check
        await sink.deliver([msg(1, ident="m1")])
        # recorded now: under a new UIDVALIDITY the same message is recognised
        assert await sink.filter_new("acme", "INBOX", "8", ["5", "6"]) == ["5", "6"]
        assert await sink.recognise("acme", "INBOX", "8", {"5": "m1", "6": "m6"}) == ["5"]
        # without a dedupe check first, recognise asks Redis as before
        assert await sink.recognise("acme", "INBOX", "9", {"7": "m1"}) == ["7"]
    finally:
        if kind == "webhook":
            await sink.stopService()


@pytest.mark.parametrize("kind", ["stream", "list", "sidekiq", "webhook"])
@pytest_twisted.ensureDeferred
async def test_may_recognise_says_no_only_after_a_dedupe_check_found_nothing_recorded(
        kind, conn, redis, tmp_path, endpoint):
    sink = build(kind, conn, tmp_path, endpoint)
    try:
        assert sink.may_recognise("acme", "INBOX", "7")  # unsure: asked nothing yet
        assert await sink.filter_new("acme", "INBOX", "7", ["1", "2"]) == ["1", "2"]
        assert not sink.may_recognise("acme", "INBOX", "7")
        assert sink.may_recognise("acme", "INBOX", "7")  # used: unsure again
        assert sink.may_recognise("acme", "Other", "7")
        await sink.deliver([msg(1, ident="m1")])
        assert await sink.filter_new("acme", "INBOX", "8", ["5"]) == ["5"]
        assert sink.may_recognise("acme", "INBOX", "8")  # recorded now, in epoch 7
        # epoch 7 was checked (a delivery recorded in it): a restart skips it
        assert await sink.filter_new("acme", "INBOX", "7", ["5"]) == ["5"]
        assert not sink.may_recognise("acme", "INBOX", "7")
        assert await sink.recognise("acme", "INBOX", "8", {"5": "m1"}) == ["5"]
        assert await sink.filter_new("acme", "INBOX", "8", ["6"]) == ["6"]
        assert not sink.may_recognise("acme", "INBOX", "8")  # recognised in 8: now 8
    finally:
        if kind == "webhook":
            await sink.stopService()


@pytest_twisted.ensureDeferred
async def test_an_upgrade_keeps_the_old_dedupe_records_and_delivers_nothing_again(conn, redis):
    r = redis.client()
    r("SADD", keys.dedupe("acme", "INBOX", "7"), "1", "2")  # written before identities
    sink = sinks.module("stream").build("t", {"stream": keys.DEFAULT_STREAM},
                                        sinks.SinkContext(reactor=_reactor(), redis=conn))
    assert await sink.filter_new("acme", "INBOX", "7", ["1", "2", "3"]) == ["3"]
    assert await sink.identities("acme", "INBOX", "7", ["1", "2"]) == ["", ""]
    d = await sink.deliver([msg(1, ident="m1"), msg(3, ident="m3")])
    assert d.new == ("3",)
    # a message without identity (Graph) leaves no identity keys
    await sink.deliver([Message("g", "inbox", "", "AAk=", b"x")])
    assert r("KEYS", "fido:ident*{g}*") == []


@pytest_twisted.ensureDeferred
async def test_the_oldest_identities_leave_beyond_the_bound(conn, redis):
    script = conn.script(identity.lua(keep=3) + """
for i = 1, #ARGV, 2 do fido_remember(KEYS[1], KEYS[2], ARGV[i], ARGV[i + 1]) end
return redis.call('HLEN', KEYS[1])
""")
    ikey, qkey = keys.identities("acme", "INBOX")
    args = []
    for n in range(1, 6):
        args += [f"7:{n}", f"m{n}"]
    assert await script.run([ikey, qkey], args) == 7  # 3 messages, 2 fields each, e
    r = redis.client()
    assert r("LRANGE", qkey, 0, -1) == [b"7:5", b"7:4", b"7:3"]
    assert sorted(r("HKEYS", ikey)) == sorted(
        [b"u:7:3", b"u:7:4", b"u:7:5", b"i:m3", b"i:m4", b"i:m5", b"e"])
    # an identity stored again elsewhere stays while its newest place does
    await script.run([ikey, qkey], ["8:1", "m3", "8:2", "m6", "8:3", "m7"])
    assert r("HGET", ikey, "i:m3") == b"8:1"



@pytest.mark.parametrize("kind", ["stream", "list"])
@pytest_twisted.ensureDeferred
async def test_a_reused_uid_stored_again_keeps_the_contracts_decimal_uid_in_its_entry(
        conn, redis, tmp_path, endpoint, kind):
    import base64
    import json

    sink = build(kind, conn, tmp_path, endpoint)
    first = msg(1, ident="m0000000000000001")
    again = msg("1~m0000000000000002", ident="m0000000000000002", n=2)
    await sink.deliver([first])
    delivery = await sink.deliver([again])
    assert delivery.new == ("1~m0000000000000002",)
    r = redis.client()
    if kind == "stream":
        entries = r("XRANGE", keys.DEFAULT_STREAM, "-", "+")
        shown = [dict(zip(f[::2], f[1::2])) for _id, f in entries]
        uids = [e[b"uid"] for e in shown]
        raws = [e[b"raw"] for e in shown]
    else:
        docs = [json.loads(d) for d in reversed(r("LRANGE", keys.DEFAULT_LIST, 0, -1))]
        uids = [d["uid"].encode() for d in docs]
        raws = [base64.b64decode(d["raw"]) for d in docs]
    assert uids == [b"1", b"1"], "uid is a decimal string in every entry (DESIGN.md)"
    assert raws == [first.raw, again.raw]


def _calls(r, command):
    for line in r("INFO", "commandstats").decode().splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


@pytest.mark.parametrize("kind", ["stream", "list"])
@pytest_twisted.ensureDeferred
async def test_a_batch_records_its_identities_with_one_hset_and_one_lpush(
        conn, redis, tmp_path, endpoint, kind):
    sink = build(kind, conn, tmp_path, endpoint)
    r = redis.client()
    r("CONFIG", "RESETSTAT")
    # five messages, the fifth a second copy of the first (same identity)
    batch = [msg(u, ident=f"m{u}") for u in range(1, 5)] + [msg(5, ident="m1", n=1)]
    d = await sink.deliver(batch)
    assert sorted(d.confirmed) == ["1", "2", "3", "4", "5"]
    assert sorted(d.new) == ["1", "2", "3", "4"], "the copy is confirmed, not written again"
    # the account hash's HINCRBY is not an HSET; one HSET for the identities
    assert _calls(r, "hset") == 1 and _calls(r, "lpush") == (1 if kind == "stream" else 5)
    ikey, qkey = keys.identities("acme", "INBOX")
    assert r("HGET", ikey, "e") == b"7"
    assert r("HGET", ikey, "i:m1") == b"7:5" and r("HGET", ikey, "u:7:5") == b"m1"
    assert r("LRANGE", qkey, 0, -1) == [b"7:5", b"7:4", b"7:3", b"7:2", b"7:1"]
    assert await sink.identities("acme", "INBOX", "7", ["1", "2", "5"]) == ["m1", "m2", "m1"]


@pytest_twisted.ensureDeferred
async def test_a_noted_batch_beyond_the_bound_evicts_the_oldest(conn, redis):
    script = conn.script(identity.lua(keep=3) + """
for i = 1, #ARGV, 2 do fido_note(KEYS[1], KEYS[2], ARGV[i], ARGV[i + 1]) end
fido_flush()
return redis.call('HLEN', KEYS[1])
""")
    ikey, qkey = keys.identities("acme", "INBOX")
    assert await script.run([ikey, qkey], ["7:1", "m1", "7:2", "m2"]) == 5
    # three more: the two oldest leave, m1's newer place stays
    assert await script.run([ikey, qkey], ["8:1", "m1", "8:2", "m3", "8:3", "m4"]) == 7
    r = redis.client()
    assert r("LRANGE", qkey, 0, -1) == [b"8:3", b"8:2", b"8:1"]
    assert sorted(r("HKEYS", ikey)) == sorted(
        [b"u:8:1", b"u:8:2", b"u:8:3", b"i:m1", b"i:m3", b"i:m4", b"e"])
    assert r("HGET", ikey, "i:m1") == b"8:1" and r("HGET", ikey, "e") == b"8"


@pytest_twisted.ensureDeferred
async def test_a_batch_larger_than_one_unpack_records_every_identity(conn, redis, tmp_path,
                                                                    endpoint):
    """``[imap] batch_messages`` goes up to 10,000: the identities are
    written 1,000 messages (4,000 values) at a time, under Lua's bound."""
    sink = build("stream", conn, tmp_path, endpoint)
    r = redis.client()
    r("CONFIG", "RESETSTAT")
    d = await sink.deliver([msg(u, ident=f"m{u}") for u in range(1, 2502)])
    assert len(d.new) == 2501
    ikey, qkey = keys.identities("acme", "INBOX")
    assert r("LLEN", qkey) == 2501 and r("HLEN", ikey) == 2 * 2501 + 1
    assert _calls(r, "hset") == 3 and _calls(r, "lpush") == 1
    assert await sink.identities("acme", "INBOX", "7", ["1", "1000", "2501"]) == \
        ["m1", "m1000", "m2501"]
