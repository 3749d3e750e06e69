"""The sinks on the ISink contract (stream, list) against a real Redis, the
shared connection's scripts, the account state and the heartbeat, the
registry and the ``[delivery.NAME]`` config."""

import base64
import json
import os
import tempfile

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import config, errors, sinks
from fido_tx.accounts.model import Account
from fido_tx.config import RedisSettings
from fido_tx.outcome import SessionResult
from fido_tx.redis import keys
from fido_tx.redis.connection import RedisConnection
from fido_tx.redis.heartbeat import Heartbeat, HeartbeatWriter
from fido_tx.redis.state import AccountState
from fido_tx.service import DeliveryCheck
from fido_tx.sinks import stream as stream_mod
from fido_tx.sinks.message import Delivery, Message
from fido_tx.testing import FakeRedis, FakeScheduler


def _reactor():
    from twisted.internet import reactor

    return reactor


def _connection(url, **kw):
    settings = RedisSettings(url=url, connect_timeout=2.0, command_timeout=2.0)
    c = RedisConnection(_reactor(), settings, retry_policy=lambda attempt: 0.05 * attempt)
    return c


def _up(connection):
    connection.startService()
    if connection.connected:
        return defer.succeed(True)
    d = defer.Deferred()
    connection.add_connection_observer(lambda up: up and not d.called and d.callback(True))
    return d.addTimeout(10, _reactor())


def _ctx(connection, dry_run=False):
    return sinks.SinkContext(_reactor(), connection, dry_run=dry_run)


def _msg(uid, raw=None, account="acme", mailbox="INBOX", epoch="1234", **kw):
    if raw is None:
        raw = b"Subject: %d\r\n\r\nbody \x00\xff %d\r\n" % (uid, uid)
    return Message(account, mailbox, epoch, str(uid), raw, **kw)


def _build(kind, connection, **options):
    module = sinks.module(kind)
    opts = dict(module.OPTIONS, **options)
    return module.build("test", module.validate(opts, "/"), _ctx(connection))


# -- the stream sink on the new contract -------------------------------------------


@pytest_twisted.inlineCallbacks
def test_stream_deliver_appends_source_and_route_key_after_the_contract_fields(redis):
    c = _connection(redis.url)
    sink = _build("stream", c)
    try:
        yield _up(c)
        m = _msg(7, message_id="<m7@x>", route_key="support")
        delivery = yield sink.deliver([m])
        assert delivery == Delivery(confirmed=("7",), new=("7",))
        [(_, fields)] = redis.client()("XRANGE", "fido:messages", "-", "+")
        assert fields[0::2] == [
            b"account", b"mailbox", b"uidvalidity", b"uid", b"message_id", b"size",
            b"fetched_at", b"raw", b"source", b"route_key",
        ]
        assert fields[1::2][:6] == [b"acme", b"INBOX", b"1234", b"7", b"<m7@x>",
                                    str(len(m.raw)).encode()]
        assert fields[15] == m.raw
        assert fields[-4:] == [b"source", b"imap", b"route_key", b"support"]
        # same dedupe set as before the reshaping: old records keep working
        assert redis.client()("SMEMBERS", "fido:uids:{acme}:1234:INBOX") == [b"7"]
        again = yield sink.deliver([m, _msg(8)])
        assert again.confirmed == ("7", "8") and again.new == ("8",)
        assert sink.last_length == 2
        assert (yield sink.filter_new("acme", "INBOX", "1234", ["9", "7", "8", "10"])) == ["9", "10"]
        assert (yield sink.backlog()) == 2
    finally:
        yield c.stopService()


@pytest_twisted.inlineCallbacks
def test_a_graph_style_key_with_an_empty_epoch_is_deduplicated_too(redis):
    c = _connection(redis.url)
    sink = _build("stream", c)
    try:
        yield _up(c)
        gid = "AAMkAGI2TG93AAA="
        m = Message("acme", "Inbox", "", gid, b"x", source="graph")
        assert (yield sink.deliver([m])).new == (gid,)
        assert (yield sink.deliver([m])).new == ()
        assert (yield sink.filter_new("acme", "Inbox", "", [gid, "other"])) == ["other"]
    finally:
        yield c.stopService()


# -- the list sink -------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_list_pushes_one_json_document_per_message_deduplicated_like_the_stream(redis):
    c = _connection(redis.url)
    queue = _build("list", c)
    stream = _build("stream", c)
    try:
        yield _up(c)
        raw = b"From: a\r\n\r\n8-bit \xe4\xf6 NUL \x00\r\n"
        d = yield queue.deliver([_msg(1, raw, message_id="<a@x>"), _msg(2)])
        assert d.new == ("1", "2")
        docs = [json.loads(x) for x in redis.client()("LRANGE", "fido:messages:list", 0, -1)]
        first = docs[-1]  # LPUSH: the oldest is at the right
        assert list(first) == ["account", "mailbox", "uidvalidity", "uid", "message_id", "size",
                               "fetched_at", "raw", "source", "route_key"]
        assert base64.b64decode(first["raw"]) == raw
        assert (first["uid"], first["size"], first["route_key"]) == ("1", str(len(raw)), "")
        again = yield queue.deliver([_msg(1), _msg(3)])
        assert again.new == ("3",) and queue.last_length == 3
        # the same dedupe sets as the stream: a message in one is in the other
        assert (yield stream.deliver([_msg(1)])).new == ()
        assert redis.client()("HGET", "fido:account:acme", "fetched_total") == b"3"
        assert (yield queue.backlog()) == 3
    finally:
        yield c.stopService()


@pytest_twisted.inlineCallbacks
def test_a_dry_run_sink_writes_and_confirms_nothing(redis):
    c = _connection(redis.url)
    sink = stream_mod.build("test", {"stream": "s"}, _ctx(c, dry_run=True))
    try:
        yield _up(c)
        assert (yield sink.deliver([_msg(1)])) == Delivery()
        assert redis.client()("EXISTS", "s") == 0
    finally:
        yield c.stopService()


# -- the shared connection: scripts, errors --------------------------------------


@pytest_twisted.inlineCallbacks
def test_a_script_registered_later_still_runs_through_eval_on_noscript(redis):
    c = _connection(redis.url)
    try:
        yield _up(c)
        script = c.script("return ARGV[1] .. '!'")
        redis.client()("SCRIPT", "FLUSH")
        assert (yield script.run([], [b"hi"])) == b"hi!"
        assert (yield c.execute("PING")) in (b"PONG", "PONG")
    finally:
        yield c.stopService()


@pytest_twisted.inlineCallbacks
def test_a_refused_command_is_a_redis_error_naming_the_command(redis):
    c = _connection(redis.url)
    try:
        yield _up(c)
        redis.client()("SET", "fido:messages", "not a stream")
        sink = _build("stream", c)
        with pytest.raises(errors.FidoError) as caught:
            yield sink.deliver([_msg(1)])
        assert caught.value.kind == errors.REDIS
        assert "Redis refused delivery of 1 messages" in caught.value.message
        assert (yield sink.filter_new("acme", "INBOX", "1234", ["1"])) == ["1"]  # nothing recorded
    finally:
        yield c.stopService()


# -- account state and heartbeat on the shared connection -------------------------


@pytest_twisted.inlineCallbacks
def test_account_state_and_heartbeat_share_the_connection(redis):
    c = _connection(redis.url)
    state = AccountState(c)
    beats = Heartbeat(_reactor(), HeartbeatWriter(c), FakeScheduler(running_count=2, accounts={"a": 1}),
                      "host:1", interval=3600)
    try:
        yield _up(c)
        assert (yield state.record_session(SessionResult("acme", kind="auth", message="no"))) is True
        h = redis.client()("HGETALL", "fido:account:acme")
        fields = dict(zip(h[0::2], h[1::2]))
        assert (fields[b"state"], fields[b"last_error_kind"]) == (b"error", b"auth")
        beats.startService()
        for _ in range(50):
            if redis.client()("EXISTS", "fido:instance:host:1"):
                break
            yield _sleep(0.02)
        h = redis.client()("HGETALL", "fido:instance:host:1")
        fields = dict(zip(h[0::2], h[1::2]))
        assert (fields[b"accounts"], fields[b"sessions"]) == (b"1", b"2")
        assert 0 < redis.client()("TTL", "fido:instance:host:1") <= 45
    finally:
        beats.stopService()
        yield c.stopService()


def _sleep(seconds):
    from twisted.internet import task

    return task.deferLater(_reactor(), seconds, lambda: None)


class NotRunningTests(SynchronousTestCase):
    def test_best_effort_writes_fire_false_and_commands_fail_kind_redis(self):
        c = RedisConnection(MemoryReactorClock(), RedisSettings())
        self.assertIs(self.successResultOf(AccountState(c).update_account("a", {"x": 1})), False)
        self.assertIs(self.successResultOf(HeartbeatWriter(c).heartbeat("i", {"x": 1}, 45)), False)
        failure = self.failureResultOf(c.execute(b"PING"), errors.FidoError)
        self.assertEqual(failure.value.kind, errors.REDIS)

    def test_the_deadline_covers_waiting_for_a_connection(self):
        reactor = MemoryReactorClock()
        c = RedisConnection(reactor, RedisSettings(command_timeout=3.0))
        c.startService()
        sink = stream_mod.build("default", {"stream": "s"}, sinks.SinkContext(reactor, c))
        d = sink.deliver([_msg(1)])
        self.assertNoResult(d)
        reactor.advance(3.0)
        failure = self.failureResultOf(d, errors.FidoError)
        self.assertEqual(failure.value.kind, errors.REDIS)
        self.assertIn("gave up after 3 s", failure.value.message)
        self.successResultOf(c.stopService())

    def test_a_batch_of_several_accounts_is_refused(self):
        c = RedisConnection(MemoryReactorClock(), RedisSettings())
        sink = stream_mod.build("default", {"stream": "s"}, sinks.SinkContext(None, c))
        self.failureResultOf(sink.deliver([_msg(1), _msg(2, account="other")]), ValueError)
        self.assertEqual(self.successResultOf(sink.deliver([])), Delivery())
        self.assertEqual(self.successResultOf(sink.filter_new("a", "b", "1", [])), [])


# -- keys, registry, config ---------------------------------------------------------


class KeysTests(SynchronousTestCase):
    def test_the_layout_is_unchanged(self):
        self.assertEqual(keys.dedupe("acme", "INBOX", "1234"), b"fido:uids:{acme}:1234:INBOX")
        self.assertEqual(keys.dedupe("acme", "INBOX", 1234), b"fido:uids:{acme}:1234:INBOX")
        self.assertEqual(keys.account("acme"), b"fido:account:acme")
        self.assertEqual(keys.instance("h:1"), b"fido:instance:h:1")


class RegistryTests(SynchronousTestCase):
    def test_every_available_module_has_the_contract(self):
        for kind in ("stream", "list"):
            module = sinks.module(kind)
            self.assertEqual(module.KIND, kind)
            self.assertIsInstance(module.OPTIONS, dict)
            self.assertTrue(callable(module.validate) and callable(module.build))

    def test_delivery_sinks_builds_one_sink_per_table(self):
        settings = _settings('[delivery.queue]\nkind = "list"\nkey = "q"\n')
        c = RedisConnection(MemoryReactorClock(), RedisSettings())
        built = sinks.delivery_sinks(settings, sinks.SinkContext(None, c))
        self.assertEqual(sorted(built), ["default", "queue"])
        self.assertEqual((built["default"].kind, built["queue"].kind), ("stream", "list"))
        self.assertEqual((built["default"].target, built["queue"].target), (b"fido:messages", b"q"))


def _settings(text):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "fido.toml")
        with open(path, "w") as f:
            f.write(text)
        return config.read_settings(path)


class DeliveryConfigTests(SynchronousTestCase):
    def test_default_is_implied_from_the_redis_stream(self):
        s = _settings('[redis]\nstream = "mail:in"\n')
        self.assertEqual(s.deliveries, {})
        self.assertEqual(s.delivery_tables(),
                         {"default": config.DeliverySettings("stream", {"stream": "mail:in"})})
        # settings built in code too
        built = config.Settings(redis=RedisSettings(stream="other"))
        self.assertEqual(built.delivery_tables()["default"].options, {"stream": "other"})

    def test_an_explicit_default_wins_and_options_get_their_defaults(self):
        s = _settings('[delivery.default]\nkind = "list"\n')
        self.assertEqual(s.deliveries["default"], config.DeliverySettings("list", {"key": "fido:messages:list"}))

    def test_bad_tables_are_one_line_naming_the_key(self):
        cases = [
            ('[delivery.x]\nkind = "list"\nstream = "s"\n', "unknown key [delivery.x] stream"),
            ('[delivery.x]\nkey = "s"\n', "[delivery.x] kind: must be one of"),
            ('[delivery.x]\nkind = "carrier-pigeon"\n', "[delivery.x] kind: must be one of"),
            ('[delivery.x]\nkind = "list"\nkey = 3\n', "[delivery.x] key: expected a string, got integer"),
            ('[delivery.x]\nkind = "list"\nkey = ""\n', "[delivery.x] key: must not be empty"),
            ('[delivery.x]\nkind = "stream"\nstream = ""\n', "[delivery.x] stream: must not be empty"),
            ('[delivery]\nx = 1\n', "[delivery.x] must be a table"),
        ]
        for text, expected in cases:
            with self.assertRaises(config.ConfigError) as caught:
                _settings(text)
            message = str(caught.exception)
            self.assertIn(expected, message)
            self.assertNotIn("integer 3", message)  # values of delivery keys are never shown
            self.assertNotIn("\n", message)


class DeliveryCheckTests(SynchronousTestCase):
    def test_an_account_naming_no_table_is_left_out_with_one_line_reported_once(self):
        reports = []
        check = DeliveryCheck({"default": None}, report=lambda **kw: reports.append(kw))
        good = Account(id="a", host="h", username="u", password="p")
        bad = Account(id="b", host="h", username="u", password="p", delivery="nowhere")
        self.assertEqual(check([good, bad]), (good,))
        self.assertEqual(check([good, bad]), (good,))
        self.assertEqual(len(reports), 1)
        self.assertEqual(reports[0]["account"], "b")
        self.assertIn("[delivery.nowhere]", reports[0]["message"])
        self.assertEqual(check([good]), (good,))
