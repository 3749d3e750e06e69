"""The whole daemon (``make_service`` in-process, or ``twistd -n fido``)
against a real Dovecot and a real Redis, when things go wrong:

* Redis down (at start, while idle, and killed mid-fetch): nothing is marked
  on the server that Redis does not hold, and the daemon reconnects by itself
  when Redis is back;
* backpressure: a stream over ``max_backlog`` stops fetching (mail stays
  unmarked), is logged and reported once, and fetching resumes once the
  importer has trimmed the stream;
* a message over ``max_message_size``: left on the server unmarked, flagged
  ``$FidoTooLarge``, reported (kind ``too_large``) and not fetched again;
* SIGTERM while fetching: the daemon exits within ``grace_period``, and the
  next run completes the job exactly once.
"""

import json
import os
import signal
import time

import attr
import pytest
import pytest_twisted
from twisted.internet import defer, task, threads
from twisted.logger import globalLogPublisher
from twisted.web import resource, server

from fido_tx import config
from tests import daemon
from tests.support.dovecot import make_message
from tests.support.proxy import FaultProxy

STREAM = "fido:messages"
FAST_BACKOFF = config.BackoffSettings(
    initial=0.5, maximum=2.0, auth_initial=0.5, auth_maximum=2.0, jitter=0.2
)


# -- fixtures and helpers -----------------------------------------------------------






class Collector(resource.Resource):
    """The web application's report endpoint: keeps every POSTed JSON body."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.bodies = []
        self.authorization = []

    def render_POST(self, request):
        self.bodies.append(json.loads(request.content.read()))
        self.authorization.append(request.getHeader("authorization"))
        request.setHeader(b"content-type", b"application/json")
        return b"{}"

    def kinds(self, account=None):
        return [b["kind"] for b in self.bodies if account is None or b["account"] == account]


@pytest.fixture
def reporter_endpoint():
    """``(collector, url)``: a real HTTP server on 127.0.0.1, port 0."""
    from twisted.internet import reactor

    collector = Collector()
    port = reactor.listenTCP(0, server.Site(collector), interface="127.0.0.1")
    try:
        yield collector, f"http://127.0.0.1:{port.getHost().port}/fido/report"
    finally:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


class LogCapture:
    """Events of the global log publisher (the daemon in-process logs there)."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def matching(self, namespace, text):
        return [
            e for e in self.events
            if e.get("log_namespace", "").startswith(namespace)
            and text in (e.get("log_format") or "")
        ]

    def __enter__(self):
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self)


def sleep(seconds):
    from twisted.internet import reactor

    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_until(predicate, timeout, explain, interval=0.05):
    """Poll ``predicate()`` until true; fail with ``explain()`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {explain()}")
        yield sleep(interval)


def xlen(redis):
    try:
        return redis.client()("XLEN", STREAM)
    except (OSError, RuntimeError):
        return None


def stream_entries(redis):
    out = []
    for _, flat in redis.client()("XRANGE", STREAM, "-", "+"):
        out.append(dict(zip((k.decode() for k in flat[::2]), flat[1::2])))
    return out


def entry_key(e):
    return (e["account"], e["mailbox"], e["uidvalidity"], e["uid"])


def assert_no_duplicates(entries):
    keys = [entry_key(e) for e in entries]
    dups = sorted({k for k in keys if keys.count(k) > 1})
    assert not dups, f"duplicate stream entries: {dups[:10]}"
    ids = [e["message_id"] for e in entries]
    assert len(ids) == len(set(ids)), "one message stored under two keys"


def provision(dovecot, prefix, n_accounts, per_account, size=2048, start=0):
    """``{user: [raw, ...]}``; Message-IDs are unique across the test."""
    users = {f"{prefix}{k:02d}@fido.test": f"{prefix}-pw-{k}" for k in range(n_accounts)}
    dovecot.add_users(users)
    sent = {}
    for k, user in enumerate(users):
        sent[user] = []
        for i in range(per_account):
            raw = make_message(start + k * 1000 + i, size, tag=sum(prefix.encode()) % 1000)
            dovecot.add_message(user, raw)
            sent[user].append(raw)
    return sent


def diagnose(d, dovecot=None, redis=None):
    """What the in-process daemon and the servers were doing, for failures."""
    sched = d.scheduler
    lines = [
        f"stream length {xlen(redis) if redis is not None else '?'}; "
        f"store connected {d.top.parts['redis'].connected}; "
        f"paused {sorted(sched.paused_reasons)}; running {sorted(sched.running_ids())}",
        "last results: " + "; ".join(
            f"{r.account_id} {r.kind or 'ok'} {r.fetched} {r.message}" for _, r in d.results[-8:]
        ),
    ]
    if dovecot is not None:
        lines.append("--- dovecot log tail ---\n" + dovecot.read_log()[-2500:])
    return "\n".join(lines)


def seen_count(dovecot, users):
    return sum(1 for u in users for f in dovecot.flags(u).values() if "S" in f)


def all_flags(dovecot, users):
    return {u: dovecot.flags(u) for u in users}


def in_process(reactor, tmp_path, redis_url, accounts, workers=4, poll_interval=1.0,
               imap=None, **sections):
    """An :class:`daemon.InProcessDaemon` with fast backoff and ``sections``
    (``redis={...}``, ``reporter=ReporterSettings(...)``...) replaced."""
    directory = str(tmp_path / "fido")
    os.makedirs(directory, exist_ok=True)
    daemon.write_accounts(os.path.join(directory, "accounts.json"), accounts)
    settings = daemon.settings_for(
        directory, redis_url, workers=workers, poll_interval=poll_interval,
        connect_timeout=3.0, greeting_timeout=3.0, command_timeout=5.0, logout_timeout=1.0,
        **(imap or {}),
    )
    redis_changes = sections.pop("redis", {})
    settings = attr.evolve(
        settings, backoff=FAST_BACKOFF, redis=attr.evolve(settings.redis, **redis_changes),
        **sections,
    )
    return daemon.InProcessDaemon(reactor, settings)


# -- 1. Redis down --------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_nothing_is_marked_while_redis_is_down_and_the_daemon_reconnects_by_itself(
    tmp_path, dovecot, aof_redis
):
    from twisted.internet import reactor

    sent = provision(dovecot, "rdown", 4, 5)
    users = list(sent)
    accounts = [daemon.dovecot_account(dovecot, u, "none") for u in users]
    aof_redis.stop()  # down before the daemon starts
    d = in_process(reactor, tmp_path, aof_redis.url, accounts, poll_interval=0.5)
    store = d.top.parts["redis"]
    d.start()
    try:
        yield sleep(2.0)
        assert not store.connected
        assert seen_count(dovecot, users) == 0, all_flags(dovecot, users)
        assert d.results == [], "a session ran while Redis was down"

        # Redis back on the same port: the daemon finds it by itself.
        yield threads.deferToThread(aof_redis.start)
        yield wait_until(
            lambda: xlen(aof_redis) == 20 and seen_count(dovecot, users) == 20, 30,
            lambda: f"{seen_count(dovecot, users)} seen\n{diagnose(d, dovecot, aof_redis)}",
        )

        # Down again while the daemon runs; new mail arrives meanwhile.
        yield threads.deferToThread(aof_redis.stop)
        yield wait_until(lambda: not store.connected, 10, lambda: "store still connected")
        for k, user in enumerate(users):
            for i in range(3):
                raw = make_message(5000 + k * 10 + i, 1500)
                dovecot.add_message(user, raw)
                sent[user].append(raw)
        yield sleep(2.0)  # four poll intervals
        assert seen_count(dovecot, users) == 20, (
            "a message was marked while Redis was down", all_flags(dovecot, users))

        yield threads.deferToThread(aof_redis.start)
        yield wait_until(
            lambda: xlen(aof_redis) == 32 and seen_count(dovecot, users) == 32, 30,
            lambda: f"{seen_count(dovecot, users)} seen\n{diagnose(d, dovecot, aof_redis)}",
        )
    finally:
        yield d.stop()

    entries = stream_entries(aof_redis)
    assert_no_duplicates(entries)
    for user in users:
        account_id = user.split("@")[0].encode()
        assert sorted(e["raw"] for e in entries if e["account"] == account_id) == sorted(
            sent[user]
        )
        assert set(dovecot.flags(user).values()) == {"S"}


def seen_ids(dovecot, users):
    return {mid for u in users for mid, f in dovecot.flags(u).items() if "S" in f}


@pytest_twisted.inlineCallbacks
def test_redis_killed_mid_fetch_leaves_nothing_marked_that_is_not_stored(
    tmp_path, dovecot, aof_redis
):
    from twisted.internet import reactor

    sent = provision(dovecot, "rkill", 3, 12, size=20 * 1024)
    users = list(sent)
    total = 36
    # slow IMAP, small batches: Redis dies while every session is mid-mailbox
    proxy = FaultProxy(reactor, "127.0.0.1", dovecot.port, seed=0)
    proxy.slow(100 * 1024)
    accounts = [daemon.dovecot_account(dovecot, u, "none", port=proxy.port) for u in users]
    # a store waits for Redis to come back at most command_timeout
    d = in_process(reactor, tmp_path, aof_redis.url, accounts, workers=3, poll_interval=0.5,
                   imap={"batch_messages": 2}, redis={"command_timeout": 2.0})
    store = d.top.parts["redis"]

    def explain():
        return diagnose(d, dovecot, aof_redis)

    d.start()
    try:
        yield wait_until(lambda: (xlen(aof_redis) or 0) >= 6, 20, explain)
        assert d.scheduler.running_count == 3, "no session mid-fetch\n" + explain()
        yield threads.deferToThread(aof_redis.stop, True)  # SIGKILL
        yield wait_until(lambda: not store.connected and d.scheduler.running_count == 0, 15,
                         explain)
        marked = seen_ids(dovecot, users)
        yield sleep(1.5)
        assert seen_ids(dovecot, users) == marked, "marked while Redis was down"
        assert len(marked) < total

        yield threads.deferToThread(aof_redis.start)
        stored = {e["message_id"].decode() for e in stream_entries(aof_redis)}
        assert marked <= stored, f"marked but not in Redis: {sorted(marked - stored)}"
        print(f"Redis killed at {len(stored)}/{total} stored, {len(marked)} marked")
        proxy.heal()
        yield wait_until(
            lambda: xlen(aof_redis) == total and seen_count(dovecot, users) == total, 30,
            explain,
        )
    finally:
        yield d.stop()
        yield proxy.stop()
    entries = stream_entries(aof_redis)
    assert_no_duplicates(entries)
    assert sorted(e["raw"] for e in entries) == sorted(r for m in sent.values() for r in m)


# -- 2. backpressure --------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_backlog_over_max_stops_fetching_until_the_importer_trims_the_stream(
    tmp_path, dovecot, redis, reporter_endpoint
):
    from twisted.internet import reactor

    collector, url = reporter_endpoint
    sent = provision(dovecot, "backlog", 3, 4)
    users = list(sent)
    accounts = [daemon.dovecot_account(dovecot, u, "none") for u in users]
    # One worker: the accounts run one after the other.  The first two
    # accounts' sessions take the stream to 4 (at most 5: go on), then to 8:
    # over the limit, so the third account must wait.
    d = in_process(
        reactor, tmp_path, redis.url, accounts, workers=1, poll_interval=1.0,
        redis={"max_backlog": 5},
        reporter=config.ReporterSettings(url=url, token="reporter-token-x"),
    )

    def explain():
        return diagnose(d, dovecot, redis)

    def fetched_users():
        return [u for u in users if set(dovecot.flags(u).values()) == {"S"}]

    with LogCapture() as logs:
        d.start()
        try:
            yield wait_until(lambda: d.scheduler.paused_reasons == {"backlog"}, 20, explain)
            yield wait_until(lambda: collector.bodies, 10, lambda: "no report\n" + explain())
            sessions = len(d.results)
            yield sleep(1.5)  # time enough for more sessions, if any were started
            assert len(d.results) == sessions, "a session ran while paused\n" + explain()
            assert xlen(redis) == 8, explain()
            done = fetched_users()
            assert len(done) == 2, f"fetched {done}\n{explain()}"
            [waiting] = [u for u in users if u not in done]
            assert set(dovecot.flags(waiting).values()) == {""}, "marked while paused"
            [report] = collector.bodies
            assert (report["account"], report["kind"]) == ("*", "redis")
            assert "max_backlog" in report["message"] and "8" in report["message"]
            assert collector.authorization == ["Bearer reporter-token-x"]
            assert len(logs.matching("fido_tx.schedule.backpressure", "over max_backlog")) == 1

            # The importer consumes the stream.
            consumed = stream_entries(redis)
            assert redis.client()("XTRIM", STREAM, "MAXLEN", "0") == 8
            yield wait_until(
                lambda: len(fetched_users()) == 3 and xlen(redis) == 4,
                20,  # the backlog is re-read every 5 s while paused
                explain,
            )
            yield wait_until(lambda: len(collector.bodies) == 2, 10,
                             lambda: f"reports {collector.bodies}\n{explain()}")
            assert not d.scheduler.paused_reasons
        finally:
            yield d.stop()

    assert collector.kinds() == ["redis", "recovered"], collector.bodies
    assert collector.bodies[1]["account"] == "*"
    assert len(logs.matching("fido_tx.schedule.backpressure", "over max_backlog")) == 1
    assert len(logs.matching("fido_tx.schedule.backpressure", "fetching resumed")) == 1
    entries = consumed + stream_entries(redis)
    assert len(entries) == 12
    assert_no_duplicates(entries)
    assert sorted(e["raw"] for e in entries) == sorted(r for m in sent.values() for r in m)


# -- 3. oversized message ---------------------------------------------------------------


def keyword_uids(dovecot, user, keyword):
    """``{uid: (size, flags text)}`` of the messages carrying ``keyword``."""
    client = dovecot.imap("starttls", user)
    try:
        client.select("INBOX", readonly=True)
        typ, data = client.uid("SEARCH", "KEYWORD", keyword)
        assert typ == "OK", data
        found = {}
        for uid in data[0].split():
            typ, data = client.uid("FETCH", uid, "(FLAGS RFC822.SIZE)")
            text = data[0].decode()
            size = int(text.split("RFC822.SIZE ")[1].split(")")[0].split()[0])
            found[int(uid)] = (size, text[text.index("FLAGS (") + 7:].split(")")[0])
        return found
    finally:
        client.logout()


@pytest_twisted.inlineCallbacks
def test_oversized_message_stays_on_the_server_flagged_reported_once_and_not_fetched_again(
    tmp_path, dovecot, redis, reporter_endpoint
):
    from twisted.internet import reactor

    collector, url = reporter_endpoint
    user = "big@fido.test"
    dovecot.add_user(user, "big-secret-pw")
    small = [make_message(9000 + i, 3000) for i in range(3)]
    big = make_message(9100, 40 * 1024, attachment=True)
    for raw in (small[0], small[1], big, small[2]):
        dovecot.add_message(user, raw)
    account = daemon.dovecot_account(dovecot, user, "starttls")
    d = in_process(
        reactor, tmp_path, redis.url, [account], workers=2, poll_interval=1.0,
        imap={"max_message_size": 10 * 1024},
        reporter=config.ReporterSettings(url=url, token="reporter-token-y"),
    )
    d.start()
    try:
        yield wait_until(lambda: len([r for _, r in d.results if r.ok]) >= 2, 20,
                         lambda: diagnose(d, dovecot, redis))
        yield wait_until(lambda: collector.bodies, 10,
                         lambda: "no report\n" + diagnose(d, dovecot, redis))
    finally:
        yield d.stop()

    [(uid, (size, flag_text))] = keyword_uids(dovecot, user, "$FidoTooLarge").items()
    assert size == len(big)
    assert "\\Seen" not in flag_text and "$FidoTooLarge" in flag_text
    first, *later = [r for _, r in d.results if r.ok]
    assert first.fetched == 3 and first.too_large == (uid,), first
    assert later and all(r.fetched == 0 and r.bytes == 0 for r in later), later
    assert all(r.too_large == () for r in later), "the big message was looked at again"

    entries = stream_entries(redis)
    assert sorted(e["raw"] for e in entries) == sorted(small)
    assert all(int(e["size"]) <= 10 * 1024 for e in entries)
    flags = dovecot.flags(user)
    big_id = "<fido.9100.40960.0@fido.test>"
    # Maildir letters: "a" is the first keyword of the folder ($FidoTooLarge)
    assert "S" not in flags.pop(big_id), "the big message was marked \\Seen"
    assert set(flags.values()) == {"S"}

    [report] = collector.bodies
    assert report["account"] == "big" and report["kind"] == "too_large"
    assert str(uid) in report["message"]
    assert set(report) == {"account", "kind", "message", "debug", "occurred_at"}
    assert "big-secret-pw" not in json.dumps(collector.bodies)


# -- 4. graceful stop -------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_sigterm_while_fetching_exits_within_the_grace_period_and_the_next_run_completes(
    tmp_path, dovecot, redis
):
    from twisted.internet import reactor

    per_account, size = 40, 30 * 1024
    sent = provision(dovecot, "term", 4, per_account, size=size)
    users = list(sent)
    total = len(users) * per_account
    # Slow IMAP (in this test's reactor) so that sessions are still busy
    # when the grace period ends.
    proxy = FaultProxy(reactor, "127.0.0.1", dovecot.port, seed=0)
    proxy.slow(150 * 1024)
    accounts = [daemon.dovecot_account(dovecot, u, "none", port=proxy.port) for u in users]
    directory = str(tmp_path / "fido")
    os.makedirs(directory)
    daemon.write_accounts(os.path.join(directory, "accounts.json"), accounts)
    config_path = os.path.join(directory, "fido.toml")
    grace = 2.0
    daemon.write_config(
        config_path, directory, redis.url, workers=4, poll_interval=1,
        fido_extra=f"grace_period = {grace}\n",
        extra="[imap]\nbatch_messages = 4\ncommand_timeout = 10\n",
    )
    log_path = os.path.join(directory, "fido.log")

    def tail():
        return f"\n--- daemon log tail ---\n{daemon.log_tail(log_path)}"

    proc = daemon.start_twistd(config_path, directory, log_path)
    try:
        yield wait_until(lambda: (xlen(redis) or 0) >= 24 or proc.poll() is not None, 30,
                         lambda: f"{xlen(redis)} entries{tail()}", interval=0.1)
        assert proc.poll() is None, f"the daemon exited early{tail()}"
        at_term = xlen(redis)
        assert at_term < total, f"all {total} fetched before SIGTERM: not a mid-fetch stop"
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        yield wait_until(lambda: proc.poll() is not None, grace + 10,
                         lambda: f"still running after SIGTERM{tail()}", interval=0.1)
        took = time.monotonic() - signalled
        # A graceful stop exits 0 (Fido clears the signal twistd would re-raise).
        assert proc.returncode == 0, f"exit {proc.returncode}{tail()}"
        print(f"SIGTERM at {at_term}/{total} entries; exited in {took:.2f} s "
              f"(grace {grace:g} s)")
        assert "grace period" in daemon.log_tail(log_path, 20000), (
            "sessions finished before the grace period ended: the test did not "
            f"exercise a cancelled session{tail()}")

        # Never lost: whatever is \Seen on the server is in the stream.
        stored_ids = {e["message_id"].decode() for e in stream_entries(redis)}
        for user in users:
            for message_id, letters in dovecot.flags(user).items():
                if "S" in letters:
                    assert message_id in stored_ids, f"{message_id} marked but not stored"
        unmarked = len(stored_ids) - seen_count(dovecot, users)
        print(f"after the stop: {len(stored_ids)} stored, {unmarked} of them not yet marked")

        # The next run finishes the job, fast this time.
        proxy.heal()
        proc = daemon.start_twistd(config_path, directory, log_path)
        yield wait_until(
            lambda: xlen(redis) == total and seen_count(dovecot, users) == total
            or proc.poll() is not None, 60,
            lambda: f"{xlen(redis)} entries, {seen_count(dovecot, users)} seen{tail()}",
            interval=0.1,
        )
        assert proc.poll() is None, f"the daemon exited{tail()}"
        proc.send_signal(signal.SIGTERM)
        yield wait_until(lambda: proc.poll() is not None, grace + 10,
                         lambda: f"still running after SIGTERM{tail()}", interval=0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        yield proxy.stop()

    entries = stream_entries(redis)
    assert_no_duplicates(entries)
    assert len(entries) == total
    for user in users:
        account_id = user.split("@")[0].encode()
        assert sorted(e["raw"] for e in entries if e["account"] == account_id) == sorted(
            sent[user]
        )
        assert set(dovecot.flags(user).values()) == {"S"}
