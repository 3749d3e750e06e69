"""Held connections in the daemon: the real service tree (make_service) on the
test's reactor, a mock IMAP server that does IDLE, a real Redis.

An ``idle = true`` account (the default) keeps one logged-in connection,
waits in IDLE without a worker slot, fetches within a second of new mail,
pauses fetching (not listening) under backpressure, is closed (DONE,
LOGOUT) when removed or when the daemon stops, and reconnects when changed.
"""

import json
import os
import time

import pytest_twisted
from twisted.internet import reactor

from fido_tx.sources.imap import held
from tests import daemon
from tests.support.mockimap import (
    IDLE_CAPABILITIES, Behaviour, MockIMAPServer, MockMailbox, sample_message)


def stream_ids(redis, account_id):
    client = redis.client()
    out = []
    for _, flat in client("XRANGE", "fido:messages", "-", "+"):
        fields = dict(zip(flat[::2], flat[1::2]))
        if fields[b"account"] == account_id.encode():
            out.append(int(fields[b"uid"]))
    return out


def account(port, user, **extra):
    a = {"id": user, "host": "127.0.0.1", "port": port, "security": "none",
         "username": user, "password": "pw"}
    a.update(extra)
    return a


class Daemon:
    def __init__(self, tmp_path, redis, users, workers=1, dry_run=False, poll_interval=3600.0):
        self.server = MockIMAPServer(reactor, {u: MockMailbox("pw", [sample_message(1, u)])
                                               for u in users})
        self.server.script(None, Behaviour(capabilities=IDLE_CAPABILITIES))
        self.port = self.server.listen()
        self.redis = redis
        self.directory = str(tmp_path)
        settings = daemon.settings_for(self.directory, redis.url, workers=workers,
                                       poll_interval=poll_interval, command_timeout=2.0)
        if dry_run:
            import attr

            settings = attr.evolve(settings, fido=attr.evolve(settings.fido, dry_run=True))
        self.settings = settings

    def write(self, accounts):
        path = os.path.join(self.directory, "accounts.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"accounts": accounts}, f)
        os.rename(tmp, path)

    def start(self, accounts):
        self.write(accounts)
        self.d = daemon.InProcessDaemon(reactor, self.settings)
        self.held = self.d.top.parts["held"]
        self.d.start()

    def until(self, predicate, timeout, what):
        return daemon.until(reactor, predicate, timeout, what)

    def idling(self, user):
        m = self.held.machines.get(user)
        return m is not None and m.state == held.IDLING

    @pytest_twisted.inlineCallbacks
    def stop(self):
        yield self.d.stop()
        yield self.server.stop()


@pytest_twisted.inlineCallbacks
def test_idle_account_held_without_a_slot_fetches_within_a_second(tmp_path, redis):
    h = Daemon(tmp_path, redis, ["a1", "a2", "a3"], workers=1)
    h.start([account(h.port, u) for u in ("a1", "a2", "a3")])
    try:
        # one worker, three held connections: none of them keeps the slot
        yield h.until(lambda: all(h.idling(u) for u in ("a1", "a2", "a3"))
                      and h.held.snapshot()["idling"] == 3, 10, "three accounts idling")
        assert h.d.scheduler.running_count == 0
        assert h.d.scheduler.held_count == 3
        assert h.held.snapshot()["idling"] == 3
        # the composition root's shared poll ticks: each IDLE's refresh waits on them
        assert h.held.pool.ticker is h.held.ticker
        assert h.held.ticker.quantum == h.settings.imap.poll_tick == 1.0
        assert h.held.ticker.pending == 3
        assert [stream_ids(redis, u) for u in ("a1", "a2", "a3")] == [[1], [1], [1]]
        for n in (2, 3):
            sent = time.monotonic()
            h.server.deliver("a2", sample_message(n, "a2"))
            yield h.until(lambda: stream_ids(redis, "a2") == list(range(1, n + 1)), 3,
                          f"message {n} in Redis")
            took = time.monotonic() - sent
            print(f"IDLE wake to Redis: {took * 1000:.0f} ms")
            assert took < 1.0
        yield h.until(lambda: h.server.mailbox("a2").flags(3) == {"\\Seen"}, 3,
                      "message 3 marked (after Redis had it)")
        assert h.server.mailbox("a2").logins == 1
        # each fetch reported (its result comes once the marking is done)
        yield h.until(lambda: len([r for a, r in h.d.results if a.id == "a2"]) == 3, 3,
                      "three results for a2")
        results = [r for a, r in h.d.results if a.id == "a2"]
        assert [r.fetched for r in results] == [1, 1, 1]
        assert h.d.scheduler.account_state("a2").state == "held"
    finally:
        started = time.monotonic()
        yield h.stop()
    took = time.monotonic() - started
    assert took < 3.0  # DONE and LOGOUT, not the grace period
    for u in ("a1", "a2", "a3"):
        names = [c.name for c in h.server.commands(u)]
        assert names[-2:] == ["IDLE", "LOGOUT"], names
    assert h.held.snapshot()["held"] == 0


@pytest_twisted.inlineCallbacks
def test_backpressure_stops_fetching_not_listening(tmp_path, redis):
    h = Daemon(tmp_path, redis, ["a1"])
    h.start([account(h.port, "a1")])
    try:
        yield h.until(lambda: h.idling("a1"), 10, "a1 idling")
        h.d.scheduler.pause("backlog")
        h.server.deliver("a1", sample_message(2, "a1"))
        yield daemon.until(reactor, lambda: False, 0.5, "nothing").addErrback(lambda f: None)
        assert stream_ids(redis, "a1") == [1]  # paused: not fetched
        assert len(h.server.open_connections("a1")) == 1  # but still held
        h.d.scheduler.resume("backlog")
        yield h.until(lambda: stream_ids(redis, "a1") == [1, 2], 3, "message 2 after resume")
        assert h.server.mailbox("a1").logins == 1
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_reload_closes_a_removed_account_and_reconnects_a_changed_one(tmp_path, redis):
    h = Daemon(tmp_path, redis, ["a1", "a2"])
    h.start([account(h.port, "a1"), account(h.port, "a2")])
    try:
        yield h.until(lambda: h.idling("a1") and h.idling("a2"), 10, "both idling")
        first = h.held.machines["a2"]
        h.write([account(h.port, "a2", mailbox="INBOX", after_fetch="delete")])
        h.d.top.parts["source"].reload()
        yield h.until(lambda: not h.server.open_connections("a1"), 5, "a1's connection closed")
        assert [c.name for c in h.server.commands("a1")][-1] == "LOGOUT"
        yield h.until(lambda: h.held.machines.get("a2") not in (None, first)
                      and h.idling("a2"), 5, "a2 reconnected")
        assert h.server.mailbox("a2").logins == 2
        h.server.deliver("a2", sample_message(2, "a2"))
        yield h.until(lambda: stream_ids(redis, "a2") == [1, 2], 3, "a2's new mail")
        # the changed after_fetch applies: message 2 is deleted (1 was seen before)
        yield h.until(lambda: h.server.mailbox("a2").uids() == [1], 3, "deleted after fetch")
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_dry_run_holds_examines_and_marks_nothing(tmp_path, redis):
    h = Daemon(tmp_path, redis, ["a1"], dry_run=True)
    h.start([account(h.port, "a1")])
    try:
        yield h.until(lambda: h.idling("a1"), 10, "a1 idling")
        h.server.deliver("a1", sample_message(2, "a1"))
        yield h.until(lambda: len([r for a, r in h.d.results if a.id == "a1"]) >= 2, 3,
                      "a second dry-run poll")
        names = {c.name for c in h.server.commands("a1")}
        assert "EXAMINE" in names and "SELECT" not in names
        assert not names & {"UID STORE", "UID MOVE", "UID EXPUNGE", "EXPUNGE"}
        assert stream_ids(redis, "a1") == []
        assert [r.fetched for a, r in h.d.results if a.id == "a1"][-1] == 2
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_idle_false_polls_with_fresh_sessions(tmp_path, redis):
    h = Daemon(tmp_path, redis, ["a1"], poll_interval=0.5)
    h.start([account(h.port, "a1", idle=False)])
    try:
        yield h.until(lambda: h.server.mailbox("a1").logins >= 2, 5, "two ordinary polls")
        assert "a1" not in h.held.machines
        assert h.server.commands("a1", "IDLE") == []
    finally:
        yield h.stop()
