"""Tests for the Redis parts on the shared connection (fido_tx.redis.connection,
the stream sink, the account state, the heartbeat) and fido_tx.redis.url.

URL parsing and the "never connected" deadline are synchronous unit tests;
everything else runs against a real redis-server (the ``redis`` fixture, or
servers started here for appendonly, unix sockets, passwords and TLS).
"""

import os
import signal
import subprocess
import sys
import tempfile
import time

import attr
import pytest
import pytest_twisted
from hypothesis import assume, given, settings as hsettings, strategies as st
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import errors
from fido_tx.redis import url as redisurl
from fido_tx.config import RedisSettings
from fido_tx.interfaces import ISink
from fido_tx.outcome import SessionResult
from fido_tx.redis.connection import RedisConnection
from fido_tx.redis.heartbeat import HeartbeatWriter
from fido_tx.redis.keys import account as account_key, dedupe as uids_key
from fido_tx.redis.state import AccountState
from fido_tx.sinks.message import Delivery, Message
from fido_tx.sinks.stream import StreamSink, entry_fields
from tests.support import redis_server


# -- URLs ---------------------------------------------------------------------


class RedisURLTests(SynchronousTestCase):
    def test_defaults(self):
        u = redisurl.parse("redis://localhost")
        self.assertEqual(
            (u.scheme, u.host, u.port, u.db, u.username, u.password, u.tls),
            ("redis", "localhost", 6379, 0, None, None, False),
        )

    def test_full_tcp_url_with_user_password_and_db(self):
        u = redisurl.parse("redis://fido:s%40cr%3At@10.0.0.5:6380/3")
        self.assertEqual((u.host, u.port, u.db), ("10.0.0.5", 6380, 3))
        self.assertEqual((u.username, u.password), ("fido", "s@cr:t"))

    def test_password_without_user(self):
        u = redisurl.parse("redis://:secret@h/0")
        self.assertEqual((u.username, u.password), (None, "secret"))

    def test_db_as_query_parameter(self):
        self.assertEqual(redisurl.parse("redis://h?db=5").db, 5)

    def test_rediss_is_tls_and_takes_a_ca_file(self):
        u = redisurl.parse("rediss://h:6390/1?ca_file=/etc/fido/ca.pem")
        self.assertTrue(u.tls)
        self.assertEqual(u.ca_file, "/etc/fido/ca.pem")

    def test_ipv6_host(self):
        u = redisurl.parse("redis://[::1]:7000/2")
        self.assertEqual((u.host, u.port, u.db), ("::1", 7000, 2))
        self.assertEqual(u.to_url(), "redis://[::1]:7000/2")

    def test_unix_socket_with_db_and_password(self):
        u = redisurl.parse("unix://:pw@/run/redis/redis.sock?db=4")
        self.assertEqual((u.scheme, u.path, u.db, u.password), ("unix", "/run/redis/redis.sock", 4, "pw"))

    def test_bad_urls_are_rejected_with_a_message(self):
        for bad in [
            "", "http://h", "redis://", "redis://h:99999", "redis://h/x",
            "redis://h/-1", "redis://h?timeout=3", "unix://host/path", "unix://relative",
            "redis://h/1?db=2", "redis://h:0", "redis://h#frag",
        ]:
            with self.subTest(url=bad):
                self.assertRaises(redisurl.RedisURLError, redisurl.parse, bad)

    def test_redacted_hides_the_password(self):
        u = redisurl.parse("redis://user:hunter2@h:6379/0")
        self.assertEqual(u.redacted(), "redis://user:***@h:6379/0")
        self.assertEqual(str(u), "redis://user:***@h:6379/0")
        self.assertNotIn("hunter2", repr(u))

    def test_errors_never_contain_the_password(self):
        for bad in [
            "redis://u:hunter2@h:notaport", "redis://u:hun/ter2@h", "redis://u:hunter2@h/x",
            "ftp://u:hunter2@h", "redis://u:hunter2@", "redis://u:hunter2@h?x=1",
        ]:
            with self.subTest(url=bad):
                with self.assertRaises(redisurl.RedisURLError) as caught:
                    redisurl.parse(bad)
                self.assertNotIn("hunter", str(caught.exception))
                self.assertNotIn("ter2", str(caught.exception))

    def test_redact_text_that_does_not_parse(self):
        self.assertEqual(redisurl.redact("redis://u:p/w@h:x"), "redis://u:***@h:x")
        self.assertEqual(redisurl.redact("redis://u:pw@h"), "redis://u:***@h:6379/0")

    def test_the_connection_refuses_a_bad_url_at_construction(self):
        self.assertRaises(
            redisurl.RedisURLError, RedisConnection, MemoryReactorClock(), RedisSettings(url="http://x")
        )


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_hosts = st.one_of(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9]{1,8}){0,2}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: a.compressed),
)
_paths = st.lists(
    st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/"), min_size=1, max_size=8),
    min_size=1, max_size=3,
).map(lambda parts: "/" + "/".join(parts))


@st.composite
def _urls(draw):
    scheme = draw(st.sampled_from(redisurl.SCHEMES))
    password = draw(st.one_of(st.none(), _text))
    username = draw(st.one_of(st.none(), _text.filter(bool)))
    db = draw(st.integers(0, 10000))
    if scheme == "unix":
        return redisurl.RedisURL(
            scheme="unix", path=draw(_paths), db=db, username=username, password=password
        )
    if scheme in redisurl.SENTINEL_SCHEMES:
        sentinels = tuple(draw(st.lists(
            st.tuples(_hosts, st.integers(1, 65535)), min_size=1, max_size=3)))
        return redisurl.RedisURL(
            scheme=scheme, host=sentinels[0][0], port=sentinels[0][1], db=db,
            username=username, password=password, sentinels=sentinels,
            master=draw(_text.filter(bool)),
            sentinel_password=draw(st.one_of(st.none(), _text.filter(bool))),
            ca_file=draw(st.one_of(st.just(""), _paths)) if scheme == "rediss+sentinel" else "",
        )
    return redisurl.RedisURL(
        scheme=scheme, host=draw(_hosts), port=draw(st.integers(1, 65535)), db=db,
        username=username, password=password,
        ca_file=draw(st.one_of(st.just(""), _paths)) if scheme == "rediss" else "",
    )


class RedisURLPropertyTests(SynchronousTestCase):
    @hsettings(max_examples=200, deadline=None)
    @given(_urls())
    def test_format_then_parse_round_trips(self, url):
        self.assertEqual(redisurl.parse(url.to_url()), url)

    @hsettings(max_examples=100, deadline=None)
    @given(_urls(), st.text(st.characters(whitelist_categories=("L", "N")), min_size=6, max_size=20))
    def test_redacted_url_parses_and_never_shows_the_password(self, url, secret):
        assume(secret not in attr.evolve(url, password=None).to_url())
        url = attr.evolve(url, password=secret)
        shown = url.redacted()
        self.assertNotIn(secret, shown)
        expected = attr.evolve(url, password="***")
        if url.sentinel_password is not None:
            expected = attr.evolve(expected, sentinel_password="***")
        self.assertEqual(redisurl.parse(shown), expected)


# -- never connected: deadlines with a fake reactor ---------------------------


class NeverConnectedTests(SynchronousTestCase):
    """A reactor that never completes a connection: txredisapi would wait forever."""

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.connection = RedisConnection(
            self.clock, RedisSettings(url="redis://127.0.0.1:1/0", command_timeout=3.0)
        )
        self.sink = StreamSink("default", self.connection, "fido:messages")
        self.state = AccountState(self.connection)
        self.connection.startService()
        self.addCleanup(self.connection.stopService)

    def test_provides_the_sink_interface(self):
        self.assertTrue(ISink.providedBy(self.sink))

    def test_deliver_errbacks_kind_redis_at_the_deadline(self):
        d = self.sink.deliver([Message("a", "INBOX", "1", "1", b"x")])
        self.assertNoResult(d)
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        failure = self.failureResultOf(d, errors.FidoError)
        self.assertEqual(failure.value.kind, errors.REDIS)
        self.assertIn("unreachable", failure.value.message)

    def test_every_command_has_the_deadline(self):
        pending = [
            self.sink.filter_new("a", "INBOX", "1", ["1", "2"]),
            self.sink.backlog(),
            self.connection.execute(b"PING"),
        ]
        self.clock.advance(3.01)
        for d in pending:
            self.assertEqual(self.failureResultOf(d, errors.FidoError).value.kind, errors.REDIS)

    def test_best_effort_writes_fire_false_instead_of_failing(self):
        pending = [
            self.state.update_account("a", {"state": "ok"}),
            self.state.record_session(SessionResult("a")),
            HeartbeatWriter(self.connection).heartbeat("me", {"pid": 1}, 30),
        ]
        self.clock.advance(3.01)
        self.assertEqual([self.successResultOf(d) for d in pending], [False, False, False])

    def test_stop_fails_waiting_commands_at_once(self):
        d = self.sink.backlog()
        self.connection.stopService()
        self.assertEqual(self.failureResultOf(d, errors.FidoError).value.kind, errors.REDIS)
        later = self.sink.deliver([Message("a", "INBOX", "1", "1", b"x")])
        self.failureResultOf(later, errors.FidoError)

    def test_dry_run_session_writes_nothing(self):
        d = self.state.record_session(SessionResult("a", dry_run=True))
        self.assertEqual(self.successResultOf(d), True)

    def test_empty_calls_need_no_redis(self):
        self.assertEqual(self.successResultOf(self.sink.deliver([])), Delivery())
        self.assertEqual(self.successResultOf(self.sink.filter_new("a", "I", "1", [])), [])

    def test_a_batch_of_several_accounts_is_refused(self):
        d = self.sink.deliver([Message("a", "INBOX", "1", "1", b"x"),
                               Message("b", "INBOX", "1", "2", b"y")])
        self.failureResultOf(d, ValueError)

    def test_not_connected(self):
        self.assertFalse(self.connection.connected)


# -- real Redis ---------------------------------------------------------------


def _reactor():
    from twisted.internet import reactor

    return reactor


def _fast_retry(attempt):
    return 0.05 * attempt


@attr.s(frozen=True, auto_attribs=True)
class _Redis:
    """The Redis parts of a daemon on one shared connection."""

    connection: RedisConnection
    sink: StreamSink
    state: AccountState
    beats: HeartbeatWriter


def _make_store(url, **kw):
    settings = RedisSettings(
        url=url,
        connect_timeout=kw.pop("connect_timeout", 2.0),
        command_timeout=kw.pop("command_timeout", 2.0),
    )
    c = RedisConnection(_reactor(), settings, retry_policy=kw.pop("retry_policy", _fast_retry))
    parts = _Redis(c, StreamSink("default", c, kw.pop("stream", "fido:messages")),
                   AccountState(c), HeartbeatWriter(c))
    c.startService()
    return parts


def _next_state(store, wanted, timeout=10):
    """A Deferred that fires when the store's connection state becomes ``wanted``."""
    if store.connection.connected == wanted:
        return defer.succeed(wanted)
    d = defer.Deferred()

    def observer(up):
        if up == wanted and not d.called:
            d.callback(up)

    store.connection.add_connection_observer(observer)
    return d.addTimeout(timeout, _reactor())


def _sleep(seconds):
    from twisted.internet import task

    return task.deferLater(_reactor(), seconds, lambda: None)


def _entries(client, stream="fido:messages"):
    return client("XRANGE", stream, "-", "+")


def _msg(uid, raw=None, account="acme", mailbox="INBOX", uidvalidity=1234, **kw):
    if raw is None:
        raw = b"Subject: %d\r\n\r\nbody %d\r\n" % (uid, uid)
    return Message(account, mailbox, str(uidvalidity), str(uid), raw, **kw)


class _Logs:
    """Collects formatted log lines while installed."""

    def __init__(self):
        self.lines = []

    def __call__(self, event):
        level = event.get("log_level")
        text = f"[{level.name if level else '?'}] " + (formatEvent(event) or "")
        if event.get("log_failure") is not None:
            text += " " + event["log_failure"].getTraceback()
        self.lines.append(text)

    def __enter__(self):
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self)

    def text(self):
        return "\n".join(self.lines)


@pytest_twisted.inlineCallbacks
def test_batch_becomes_one_entry_per_message_with_the_contract_fields_byte_exact(redis):
    store = _make_store(redis.url)
    try:
        yield _next_state(store, True)
        messages = [
            _msg(1, b"From: a\r\n\r\n8-bit \xe4\xf6\xfc\xff and NUL \x00 end\r\n", message_id="<m1@x>"),
            _msg(2, b"\x00" * 10 + bytes(range(256)) * 4),
            _msg(3, b"X" * (2 * 1024 * 1024 - 6) + b"\r\n\x00\xff\r\n"),
            _msg(4, b"", message_id="<caf\udce9@x>"),
        ]
        confirmed = yield store.sink.deliver(messages)
        assert confirmed.confirmed == ("1", "2", "3", "4")
        assert confirmed.new == ("1", "2", "3", "4")
        entries = _entries(redis.client())
        assert len(entries) == 4
        for (entry_id, fields), m in zip(entries, messages):
            # the contract's fields in order, then source and route_key
            assert fields == entry_fields(m)
            assert fields[-4:] == [b"source", b"imap", b"route_key", b""]
            assert fields[15] == m.raw
            assert fields[1::2][:4] == [b"acme", b"INBOX", b"1234", m.id.encode()]
        assert [f for f in entries[0][1][0::2]] == [
            b"account", b"mailbox", b"uidvalidity", b"uid",
            b"message_id", b"size", b"fetched_at", b"raw", b"source", b"route_key",
        ]
        assert entries[2][1][11] == b"2097152"  # 2 MiB exactly
        assert store.sink.last_length == 4
        assert (yield store.sink.backlog()) == 4
    finally:
        yield store.connection.stopService()


@pytest_twisted.inlineCallbacks
def test_storing_the_same_messages_again_adds_nothing_and_still_confirms(redis):
    store = _make_store(redis.url)
    try:
        yield _next_state(store, True)
        first = [_msg(u) for u in (10, 11, 12)]
        yield store.sink.deliver(first)
        again = [_msg(u) for u in (11, 12, 13)]  # later fetch: new fetched_at
        confirmed = yield store.sink.deliver(again)
        assert confirmed.confirmed == ("11", "12", "13")
        assert confirmed.new == ("13",)
        entries = _entries(redis.client())
        assert [e[1][7] for e in entries] == [b"10", b"11", b"12", b"13"]
        assert store.sink.last_length == 4
        confirmed = yield store.sink.deliver(first + again)
        assert confirmed.new == ()
        assert len(_entries(redis.client())) == 4
        assert redis.client()("HGET", account_key("acme"), "fetched_total") == b"4"
    finally:
        yield store.connection.stopService()


@pytest_twisted.inlineCallbacks
def test_dedupe_is_per_account_mailbox_and_uidvalidity(redis):
    store = _make_store(redis.url)
    try:
        yield _next_state(store, True)
        yield store.sink.deliver([_msg(1), _msg(1, mailbox="Sent"), _msg(2, uidvalidity=99)])
        other = yield store.sink.deliver([_msg(1, account="globex")])
        assert other.new == ("1",)
        assert len(_entries(redis.client())) == 4
        assert redis.client()("SMEMBERS", uids_key("acme", "INBOX", 1234)) == [b"1"]
        assert (yield store.sink.filter_new("acme", "INBOX", "99", ["1", "2", "3"])) == ["1", "3"]
        assert redis.client()("HGET", account_key("acme"), "fetched_total") == b"3"
        assert redis.client()("HGET", account_key("globex"), "fetched_total") == b"1"
    finally:
        yield store.connection.stopService()


@pytest_twisted.inlineCallbacks
def test_filter_new_returns_the_unstored_uids_in_order(redis):
    store = _make_store(redis.url)
    try:
        yield _next_state(store, True)
        assert (yield store.sink.filter_new("acme", "INBOX", "1234", ["5", "3", "9"])) == ["5", "3", "9"]
        yield store.sink.deliver([_msg(3), _msg(7)])
        assert (yield store.sink.filter_new("acme", "INBOX", "1234", ["9", "7", "5", "3", "1"])) == ["9", "5", "1"]
        assert (yield store.sink.filter_new("acme", "INBOX", "1235", ["3", "7"])) == ["3", "7"]
        many = [str(u) for u in range(1, 20001)]
        assert (yield store.sink.filter_new("acme", "INBOX", "1234", many)) == [
            u for u in many if u not in ("3", "7")
        ]
    finally:
        yield store.connection.stopService()


@pytest_twisted.inlineCallbacks
def test_fetched_total_counts_only_new_entries(redis):
    store = _make_store(redis.url)
    try:
        yield _next_state(store, True)
        for batch in ([1, 2], [2, 3, 4], [1, 4], [5]):
            yield store.sink.deliver([_msg(u) for u in batch])
        assert redis.client()("HGET", account_key("acme"), "fetched_total") == b"5"
        assert len(_entries(redis.client())) == 5
    finally:
        yield store.connection.stopService()


@pytest_twisted.inlineCallbacks
def test_record_session_keeps_the_account_hash_current(redis):
    store = _make_store(redis.url)
    client = redis.client()

    def account():
        flat = client("HGETALL", account_key("acme"))
        return {k.decode(): v.decode() for k, v in zip(flat[0::2], flat[1::2])}

    try:
        yield _next_state(store, True)
        ok = yield store.state.record_session(
            SessionResult("acme", kind=errors.AUTH, message="login refused"),
            started_at_iso="2026-01-01T00:00:00.000Z",
        )
        assert ok is True
        state = account()
        assert state["state"] == "error"
        assert state["last_error"] == "login refused"
        assert state["last_error_kind"] == "auth"
        assert state["last_attempt_at"] == "2026-01-01T00:00:00.000Z"
        assert "last_success_at" not in state

        yield store.state.record_session(SessionResult("acme", fetched=3),
                                   extra={"failing_since": ""})
        state = account()
        assert state["failing_since"] == ""  # extra fields ride in the same HSET
        assert state["state"] == "ok"
        assert state["last_success_at"].endswith("Z")
        assert state["last_attempt_at"] <= state["last_success_at"]
        assert state["last_error_kind"] == "auth"  # kept for history

        before = account()
        yield store.state.record_session(SessionResult("acme", kind=errors.CONNECT, dry_run=True))
        assert account() == before

        yield store.state.update_account("acme", {"state": "backoff", "next_attempt_at": 5})
        assert account()["next_attempt_at"] == "5"
    finally:
        yield store.connection.stopService()


@pytest_twisted.inlineCallbacks
def test_heartbeat_writes_the_instance_hash_with_a_ttl(redis):
    store = _make_store(redis.url)
    try:
        yield _next_state(store, True)
        assert (yield store.beats.heartbeat("host-a:42", {"pid": 42, "sessions": "3"}, 30)) is True
        assert (yield store.beats.heartbeat("host-a:42", {"accounts": 7}, 60)) is True
        client = redis.client()
        assert client("HGET", "fido:instance:host-a:42", "sessions") == b"3"
        assert client("HGET", "fido:instance:host-a:42", "accounts") == b"7"
        assert 50 < client("TTL", "fido:instance:host-a:42") <= 60
    finally:
        yield store.connection.stopService()


@pytest_twisted.inlineCallbacks
def test_redis_down_fails_commands_in_time_and_tells_observers_then_reconnects(redis):
    store = _make_store(redis.url, command_timeout=0.5)
    states = []
    store.connection.add_connection_observer(states.append)
    try:
        with _Logs() as logs:
            yield _next_state(store, True)
            yield store.sink.deliver([_msg(1)])
            lost = _next_state(store, False)
            redis.stop()
            yield lost
            assert store.connection.connected is False
            assert states == [True, False]

            # commands issued while disconnected: txredisapi alone would hang
            for call in (
                lambda: store.sink.deliver([_msg(2)]),
                lambda: store.sink.filter_new("acme", "INBOX", "1234", ["2"]),
                lambda: store.sink.backlog(),
            ):
                started = time.monotonic()
                with pytest.raises(errors.FidoError) as caught:
                    yield call()
                assert caught.value.kind == errors.REDIS
                assert 0.45 < time.monotonic() - started < 1.5

            back = _next_state(store, True)
            redis.start()
            yield back
            assert states == [True, False, True]
            confirmed = yield store.sink.deliver([_msg(2)])
            assert confirmed.new == ("2",)
        text = logs.text()
        assert text.count("Redis connection lost") == 1
        assert "fetching paused until it is back" in text
        assert text.count("is back; fetching resumes") == 1
        retries = [line for line in logs.lines if "Scheduling retry" in line]
        assert retries and all(line.startswith("[debug]") for line in retries)
    finally:
        yield store.connection.stopService()


@pytest_twisted.inlineCallbacks
def test_a_command_waiting_for_the_connection_runs_when_redis_comes_back(redis):
    store = _make_store(redis.url, command_timeout=5.0)
    try:
        yield _next_state(store, True)
        lost = _next_state(store, False)
        redis.stop()
        yield lost
        d = store.sink.deliver([_msg(1)])
        yield _sleep(0.2)
        assert not d.called
        redis.start()
        confirmed = yield d
        assert confirmed.new == ("1",)
    finally:
        yield store.connection.stopService()


@pytest_twisted.inlineCallbacks
def test_restart_with_appendonly_keeps_the_dedupe_record(redis):
    redis.stop()
    server = redis_server.RedisServer(redis.binary, appendonly=True).start()
    store = _make_store(server.url)
    try:
        yield _next_state(store, True)
        yield store.sink.deliver([_msg(u) for u in (1, 2, 3)])
        lost = _next_state(store, False)
        server.stop(kill=True)
        yield lost
        back = _next_state(store, True)
        server.start()
        yield back
        confirmed = yield store.sink.deliver([_msg(u) for u in (2, 3, 4)])
        assert confirmed.confirmed == ("2", "3", "4")
        assert confirmed.new == ("4",)
        assert [e[1][7] for e in _entries(server.client())] == [b"1", b"2", b"3", b"4"]
    finally:
        yield store.connection.stopService()
        server.stop()


@pytest_twisted.inlineCallbacks
def test_redis_killed_while_a_store_is_in_flight_fails_it_and_recovers(redis):
    store = _make_store(redis.url, command_timeout=5.0)
    try:
        yield _next_state(store, True)
        big = [_msg(u, b"y" * (4 * 1024 * 1024)) for u in range(1, 9)]
        d = store.sink.deliver(big)
        redis.stop(kill=True)
        with pytest.raises(errors.FidoError) as caught:
            yield d
        assert caught.value.kind == errors.REDIS
        back = _next_state(store, True)
        redis.start()
        yield back
        assert (yield store.sink.filter_new("acme", "INBOX", "1234", ["1"])) == ["1"]
    finally:
        yield store.connection.stopService()


@pytest_twisted.inlineCallbacks
def test_a_stuck_redis_times_out_the_command_and_the_connection_is_replaced(redis):
    store = _make_store(redis.url, command_timeout=0.5, connect_timeout=0.3)
    pid = redis.process.pid
    try:
        yield _next_state(store, True)
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(errors.FidoError) as caught:
                yield store.sink.deliver([_msg(1)])
            assert caught.value.kind == errors.REDIS
            assert "did not answer" in caught.value.message
            assert time.monotonic() - started < 1.5
            assert store.connection.connected is False  # aborted: a late reply cannot be misread
            # the kernel still accepts connections, but none becomes ready,
            # and each such attempt counts for the backoff
            with _Logs() as logs:
                yield _sleep(1.0)
            assert store.connection.connected is False
            assert "no answer to AUTH/SELECT/SCRIPT LOAD within 0.3 s" in store.connection.last_error
            retries = [line for line in logs.lines if "Scheduling retry" in line]
            assert 1 <= len(retries) <= 3
        finally:
            os.kill(pid, signal.SIGCONT)
        yield _next_state(store, True)
        # the stuck store did run once Redis woke up; storing again dedupes
        confirmed = yield store.sink.deliver([_msg(1), _msg(2)])
        assert confirmed.confirmed == ("1", "2")
        assert len(_entries(redis.client())) == 2
    finally:
        yield store.connection.stopService()


@pytest_twisted.inlineCallbacks
def test_stop_service_closes_and_does_not_reconnect(redis):
    store = _make_store(redis.url)
    yield _next_state(store, True)
    states = []
    store.connection.add_connection_observer(states.append)
    yield store.connection.stopService()
    assert store.connection.connected is False
    assert states == [False]
    yield _sleep(0.3)
    assert store.connection.connected is False
    clients = redis.client()("CLIENT", "LIST")
    assert clients.count(b"\n") == 1  # only the asking client


# -- other transports and authentication --------------------------------------


class _Server:
    """A redis-server with arbitrary arguments, stopped by pid."""

    def __init__(self, *args):
        self.directory = tempfile.mkdtemp(prefix="fido-redis-c-")
        binary = redis_server.require("redis-server", redis_server.find_redis_server())
        self.process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--dir", self.directory, "--save", "",
             "--logfile", os.path.join(self.directory, "redis.log"), *args],
            stdout=subprocess.DEVNULL, stderr=sys.stderr,
        )

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def _wait_for(check, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError("redis-server did not come up")


@pytest.fixture
def unix_redis():
    import socket

    directory = tempfile.mkdtemp(prefix="fido-sock-")
    path = os.path.join(directory, "redis.sock")
    server = _Server("--port", "0", "--unixsocket", path, "--unixsocketperm", "700")

    def ping():
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(0.5)
            s.connect(path)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")

    try:
        _wait_for(ping)
        yield path
    finally:
        server.stop()


@pytest_twisted.inlineCallbacks
def test_unix_socket_url_works(unix_redis):
    store = _make_store(f"unix://{unix_redis}?db=2")
    try:
        yield _next_state(store, True)
        confirmed = yield store.sink.deliver([_msg(1)])
        assert confirmed.new == ("1",)
        assert (yield store.sink.filter_new("acme", "INBOX", "1234", ["1", "2"])) == ["2"]
        assert (yield store.sink.backlog()) == 1
    finally:
        yield store.connection.stopService()


@pytest.fixture
def password_redis():
    port = redis_server.free_port()
    server = _Server("--port", str(port), "--requirepass", "Pa55-w0rd!")

    def up():
        import socket

        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"-NOAUTH")

    try:
        _wait_for(up)
        yield port
    finally:
        server.stop()


@pytest_twisted.inlineCallbacks
def test_password_authenticates_and_never_reaches_the_log(password_redis):
    with _Logs() as logs:
        store = _make_store(f"redis://:Pa55-w0rd%21@127.0.0.1:{password_redis}/1")
        try:
            yield _next_state(store, True)
            yield store.sink.deliver([_msg(1)])
            assert (yield store.sink.backlog()) == 1
        finally:
            yield store.connection.stopService()
    assert "Connected to Redis at redis://:***@127.0.0.1" in logs.text()
    assert "Pa55" not in logs.text()


@pytest_twisted.inlineCallbacks
def test_wrong_password_keeps_it_down_and_says_why_without_the_password(password_redis):
    with _Logs() as logs:
        store = _make_store(
            f"redis://:wrong-Secret@127.0.0.1:{password_redis}/0", command_timeout=0.7
        )
        try:
            with pytest.raises(errors.FidoError) as caught:
                yield store.sink.backlog()
            assert caught.value.kind == errors.REDIS
            assert store.connection.connected is False
            shown = str(caught.value) + caught.value.debug
            assert "auth" in shown.lower()
            assert "wrong-Secret" not in shown
        finally:
            yield store.connection.stopService()
    assert "wrong-Secret" not in logs.text()
    assert logs.text().count("Cannot connect to Redis") == 1


@pytest.fixture
def tls_redis():
    from tests.support import tlsca

    pki = tlsca.files()
    port = redis_server.free_port()
    server = _Server(
        "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", pki.localhost.cert, "--tls-key-file", pki.localhost.key,
        "--tls-ca-cert-file", pki.ca, "--tls-auth-clients", "no",
    )

    def up():
        import socket

        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True

    try:
        _wait_for(up)
        if server.process.poll() is not None:
            pytest.skip("this redis-server has no TLS support")
        yield port, pki
    finally:
        server.stop()


@pytest_twisted.inlineCallbacks
def test_rediss_verifies_the_server_and_works(tls_redis):
    port, pki = tls_redis
    store = _make_store(f"rediss://localhost:{port}/0?ca_file={pki.ca}")
    try:
        yield _next_state(store, True)
        confirmed = yield store.sink.deliver([_msg(1, b"over TLS \x00\xff")])
        assert confirmed.new == ("1",)
    finally:
        yield store.connection.stopService()


@pytest_twisted.inlineCallbacks
def test_rediss_refuses_a_server_it_cannot_verify(tls_redis):
    port, pki = tls_redis
    # the certificate is for localhost and 127.0.0.1, signed by a CA we do not trust
    store = _make_store(f"rediss://localhost:{port}/0?ca_file={pki.other_ca}", command_timeout=0.7)
    try:
        with pytest.raises(errors.FidoError) as caught:
            yield store.sink.backlog()
        assert caught.value.kind == errors.REDIS
        assert "certificate verify failed" in caught.value.message
        assert store.connection.connected is False
    finally:
        yield store.connection.stopService()


# -- account state written behind: a window's sessions in one send ----------------


class _CountingTransportConnection:
    """What AccountState needs of a connection, recording each command and
    the clock time it was sent at."""

    connected = True

    def __init__(self, clock):
        self.clock = clock
        self.sent = []
        self.hooks = []

    def script(self, source):
        conn = self

        class _Script:
            def run(self, keys, args, what="script", then=None):
                conn.sent.append((conn.clock.seconds(), "EVALSHA", keys[0]))
                return defer.succeed(1)

        return _Script()

    def execute(self, *args):
        self.sent.append((self.clock.seconds(), args[0], args[1]))
        return defer.succeed(1)

    def add_stop_hook(self, hook):
        self.hooks.append(hook)


class WriteBehindTests(SynchronousTestCase):
    def test_a_windows_session_writes_go_out_together_at_its_end(self):
        from twisted.internet.task import Clock

        clock = Clock()
        conn = _CountingTransportConnection(clock)
        state = AccountState(conn, clock=clock, delay=0.05)
        first = state.record_session(SessionResult("a"))
        clock.advance(0.03)
        second = state.record_session(SessionResult("b"))
        third = state.update_account("c", {"failing_since": ""})
        self.assertEqual(conn.sent, [])
        self.assertNoResult(first)
        clock.advance(0.02)
        self.assertEqual([(t, key) for t, _, key in conn.sent],
                         [(0.05, account_key("a")), (0.05, account_key("b")),
                          (0.05, account_key("c"))])
        for d in (first, second, third):
            self.assertIs(self.successResultOf(d), True)
        # the next session opens a new window
        state.record_session(SessionResult("d"))
        clock.advance(0.049)
        self.assertEqual(len(conn.sent), 3)
        clock.advance(0.001)
        self.assertEqual(len(conn.sent), 4)

    def test_without_a_delay_every_write_goes_out_at_once(self):
        from twisted.internet.task import Clock

        conn = _CountingTransportConnection(Clock())
        state = AccountState(conn)
        self.assertIs(self.successResultOf(state.record_session(SessionResult("a"))), True)
        self.assertEqual(len(conn.sent), 1)
        self.assertEqual(conn.hooks, [])

    def test_the_connection_stopping_sends_what_is_held(self):
        from twisted.internet.task import Clock

        clock = Clock()
        conn = _CountingTransportConnection(clock)
        state = AccountState(conn, clock=clock, delay=0.05)
        d = state.record_session(SessionResult("a"))
        self.assertEqual(conn.hooks, [state.flush])
        conn.hooks[0]()
        self.assertEqual(len(conn.sent), 1)
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(clock.getDelayedCalls(), [])


@pytest_twisted.inlineCallbacks
def test_held_account_writes_reach_redis_when_the_connection_stops(redis):
    settings = RedisSettings(url=redis.url, connect_timeout=2.0, command_timeout=2.0)
    c = RedisConnection(_reactor(), settings, retry_policy=_fast_retry)
    state = AccountState(c, clock=_reactor(), delay=30.0)
    c.startService()
    up = defer.Deferred()
    c.add_connection_observer(lambda ok: ok and not up.called and up.callback(None))
    yield up.addTimeout(10, _reactor())
    held = state.record_session(SessionResult("acme", kind="auth", message="no"))
    assert redis.client()("EXISTS", account_key("acme")) == 0
    yield c.stopService()
    yield held
    for _ in range(100):  # the server reads the commands before the close
        if redis.client()("EXISTS", account_key("acme")):
            break
        yield _sleep(0.01)
    assert redis.client()("HGET", account_key("acme"), "last_error_kind") == b"auth"
