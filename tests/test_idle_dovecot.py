"""Held connections against a real Dovecot and a real Redis: 200 accounts
waiting in IDLE, mail delivered into them reaching the Redis stream (p50 and
p99 latency printed), and a Dovecot restart in the middle: every account
reconnects, nothing lost, nothing twice.

Dovecot's IDLE watches each mailbox with inotify; all test mail belongs to
one system user whose ``fs.inotify.max_user_instances`` (128 here) runs out
at about 120 IDLE sessions, after which Dovecot re-checks every
``mailbox_idle_check_interval``: the config sets it to 1 s.
"""

import random
import time

import pytest_twisted
from twisted.internet import defer, reactor, task, threads

from fido_tx.accounts.model import Account
from fido_tx.config import BackoffSettings, ImapSettings, RedisSettings
from fido_tx.sources import SourceContext
from fido_tx.sources.imap import held
from fido_tx.sources.imap.holding import HeldImap
from tests.support import dovecot as dovecot_support
from tests.support.dovecot import make_message

N_ACCOUNTS = 200
IDLE_CONFIG = "mailbox_idle_check_interval = 1 secs\n"
IMAP = ImapSettings(connect_timeout=5.0, greeting_timeout=5.0, command_timeout=10.0)
HELD = held.HeldSettings(idle_refresh=600.0, poll_interval=600.0, command_timeout=10.0,
                         logout_timeout=2.0, min_hold=1.0,
                         reconnect=BackoffSettings(initial=0.5, maximum=2.0, jitter=0.2))


class Timing:
    """An ISink wrapper: when each message (by Message-ID) was confirmed."""

    def __init__(self, sink, clock):
        self.sink = sink
        self.kind = sink.kind
        self.clock = clock
        self.confirmed = {}  # message_id -> seconds
        self.deliveries = 0

    def filter_new(self, account_id, mailbox, epoch, ids):
        return self.sink.filter_new(account_id, mailbox, epoch, ids)

    def identities(self, account_id, mailbox, epoch, ids):
        return self.sink.identities(account_id, mailbox, epoch, ids)

    def may_recognise(self, account_id, mailbox, epoch):
        return self.sink.may_recognise(account_id, mailbox, epoch)

    def recognise(self, account_id, mailbox, epoch, identities):
        return self.sink.recognise(account_id, mailbox, epoch, identities)

    def deliver(self, messages):
        def confirmed(delivery):
            now = self.clock.seconds()
            done = set(delivery.confirmed)
            for m in messages:
                if m.id in done:
                    self.confirmed.setdefault(m.message_id, now)
            self.deliveries += len(delivery.new)
            return delivery

        return self.sink.deliver(messages).addCallback(confirmed)


def redis_sink(redis):
    """``(connection, sink)``: the real stream sink on a shared
    RedisConnection (started; the caller stops it)."""
    from fido_tx.redis.connection import RedisConnection
    from fido_tx.sinks import SinkContext, module

    connection = RedisConnection(reactor, RedisSettings(url=redis.url))
    connection.startService()
    stream = module("stream")
    sink = stream.build("default", stream.validate({"stream": "fido:messages"}, "."),
                        SinkContext(reactor=reactor, redis=connection))
    return connection, sink


@pytest_twisted.inlineCallbacks
def until(check, timeout, step=0.05):
    deadline = reactor.seconds() + timeout
    while not check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        yield task.deferLater(reactor, step, lambda: None)


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


def stream_message_ids(redis):
    client = redis.client()
    out = []
    for _, flat in client("XRANGE", "fido:messages", "-", "+"):
        fields = dict(zip((k.decode() for k in flat[::2]), flat[1::2]))
        out.append(fields["message_id"].decode())
    return out


@pytest_twisted.inlineCallbacks
def test_200_idle_accounts_latency_and_a_dovecot_restart(redis):
    started_at = time.monotonic()
    connection, stream = redis_sink(redis)
    try:
        yield run(redis, stream)
    finally:
        yield defer.maybeDeferred(connection.stopService)
    print(f"whole test {time.monotonic() - started_at:.1f} s")
    assert time.monotonic() - started_at < 60


@pytest_twisted.inlineCallbacks
def run(redis, stream):
    with dovecot_support.started(tls=False, extra_config=IDLE_CONFIG) as dovecot:
        users = {f"idle{k:03d}@fido.test": f"pw-{k}" for k in range(N_ACCOUNTS)}
        dovecot.add_users(users)
        sink = Timing(stream, reactor)
        ctx = SourceContext(reactor=reactor, sink=sink, settings=IMAP, debug=False)
        pool = held.HeldPool()
        machines = []
        for k, (user, password) in enumerate(users.items()):
            acct = Account(id=f"idle-{k:03d}", host="127.0.0.1", port=dovecot.port,
                           username=user, password=password, security="none")
            source = HeldImap(acct, ctx)
            machines.append(held.HeldAccount(acct.id, acct.host, source.open, source.poll,
                                             lambda r: None, reactor, HELD, pool,
                                             random.Random(k)).start())
        t0 = reactor.seconds()
        yield until(lambda: pool.idling == N_ACCOUNTS, timeout=30)
        print(f"\n{N_ACCOUNTS} accounts held in IDLE after {reactor.seconds() - t0:.2f} s")

        # -- latency: one message at a time into random accounts, 20 per second
        rng = random.Random(7)
        sent = {}
        for i in range(N_ACCOUNTS):
            user = rng.choice(list(users))
            raw = make_message(i, 2048)
            message_id = _message_id(raw)
            sent[message_id] = reactor.seconds()
            dovecot.add_message(user, raw)
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield until(lambda: all(m in sink.confirmed for m in sent), timeout=15)
        latencies = [sink.confirmed[m] - sent[m] for m in sent]
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        print(f"delivered-to-Redis latency over {len(latencies)} messages: "
              f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
              f"max {max(latencies) * 1000:.0f} ms (target p99 < 1000 ms)")
        assert p99 < 2.5  # the target is 1 s; this bound catches a polling fallback

        # -- restart: mail that arrives while Dovecot is down comes through once
        yield threads.deferToThread(dovecot.stop)
        yield until(lambda: pool.held == 0, timeout=10)
        down = {}
        for i in range(N_ACCOUNTS, N_ACCOUNTS + 50):
            raw = make_message(i, 1024)
            down[_message_id(raw)] = True
            dovecot.add_message(rng.choice(list(users)), raw)
        t1 = reactor.seconds()
        dovecot.process = None
        yield threads.deferToThread(dovecot.start)
        yield until(lambda: pool.idling == N_ACCOUNTS, timeout=30)
        print(f"every account back in IDLE {reactor.seconds() - t1:.2f} s after the "
              f"restart; {pool.reconnects} reconnects")
        assert all(m.reconnects >= 1 for m in machines)
        yield until(lambda: all(m in sink.confirmed for m in down), timeout=15)
        after = {}
        for i in range(N_ACCOUNTS + 50, N_ACCOUNTS + 60):
            raw = make_message(i, 1024)
            after[_message_id(raw)] = reactor.seconds()
            dovecot.add_message(rng.choice(list(users)), raw)
        yield until(lambda: all(m in sink.confirmed for m in after), timeout=10)

        yield defer.gatherResults([m.stop(timeout=5) for m in machines])
        ids = stream_message_ids(redis)
        expected = set(sent) | set(down) | set(after)
        assert len(ids) == len(set(ids)) == len(expected)  # nothing twice
        assert set(ids) == expected  # nothing lost
        assert sink.deliveries == len(expected)
        assert pool.snapshot()["held"] == 0


def _message_id(raw):
    from fido_tx.sources.imap.parse import extract_message_id

    return extract_message_id(raw)
