"""Live accounts changes through the whole daemon: real inotify on a real
directory, the mock IMAP server, a real Redis."""

import json
import os
import time

import attr
import pytest_twisted
from twisted.internet import defer, task

from fido_tx import config
from fido_tx import service
from tests import daemon
from tests.support.mockimap import Behaviour, Fault, MockIMAPServer, MockMailbox


def _raw(user, i):
    return (
        f"From: a@example.org\r\nTo: {user}@acme.test\r\nSubject: {i}\r\n"
        f"Message-ID: <{user}.{i}@example.org>\r\n\r\nbody {i}\r\n"
    ).encode()


def _account(port, user, password="pw"):
    return {"id": user, "host": "127.0.0.1", "port": port, "security": "none",
            "username": user, "password": password}


def _write(path, accounts, how):
    data = json.dumps({"accounts": accounts})
    if how == "rename":
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with open(path, "r+") as f:
            f.seek(0)
            f.write(data)
            f.truncate()


def _settings(directory, redis_url, workers, poll_interval):
    return attr.evolve(
        daemon.settings_for(
            directory, redis_url, workers, poll_interval,
            command_timeout=5, connect_timeout=5, greeting_timeout=5,
        ),
        backoff=config.BackoffSettings(
            initial=0.2, maximum=0.5, auth_initial=0.2, auth_maximum=0.5, jitter=0.1
        ),
    )


def _entries_for(redis, account_id):
    out = []
    for _id, flat in redis.client()("XRANGE", "fido:messages", "-", "+"):
        fields = dict(zip(flat[::2], flat[1::2]))
        if fields[b"account"] == account_id.encode():
            out.append(fields)
    return out


_until = daemon.until


class Harness:
    def __init__(self, reactor, tmp_path, redis, users, workers=2, poll_interval=3600.0):
        self.reactor = reactor
        self.redis = redis
        self.server = MockIMAPServer(
            reactor, {u: MockMailbox(pw, [_raw(u, i) for i in range(n)]) for u, (pw, n) in users.items()}
        )
        self.port = self.server.listen()
        self.directory = str(tmp_path)
        self.path = os.path.join(self.directory, "accounts.json")
        self.workers = workers
        self.poll_interval = poll_interval
        self.starts = []  # (clock seconds, account id) of every session start

    def start(self, accounts):
        _write(self.path, accounts, "rename")
        settings = _settings(self.directory, self.redis.url, self.workers, self.poll_interval)
        self.top = service.make_service(
            settings, self.reactor, observer=False, session_factory=self._session
        )
        from fido_tx.sources.imap import session as imap

        self._imap = imap
        self._settings = settings
        self.scheduler = self.top.parts["scheduler"]
        self.source = self.top.parts["source"]
        self.results = []
        self.scheduler.add_result_observer(lambda a, r: self.results.append((a, r)))
        self.top.startService()

    def _session(self, account):
        self.starts.append((time.monotonic(), account.id, account.password))
        return self._imap.fetch_mailbox(
            self.reactor, account, self.top.parts["sinks"]["default"], self._settings.imap
        )

    def ids(self):
        return {a.id for a in self.source.accounts}

    @defer.inlineCallbacks
    def stop(self):
        yield self.top.stopService()
        yield self.server.stop()


@pytest_twisted.inlineCallbacks
def test_added_account_is_fetched_within_two_seconds_while_fifty_wait(tmp_path, redis):
    from twisted.internet import reactor

    users = {f"busy{k:02d}": ("pw", 1) for k in range(50)}
    users["newcomer"] = ("pw", 3)
    h = Harness(reactor, tmp_path, redis, users, workers=2)
    # Each busy mailbox takes 0.4 s to open: 50 of them on 2 workers queue ~10 s.
    for k in range(50):
        h.server.script(f"busy{k:02d}", Behaviour(faults=(Fault("SELECT", "delay", delay=0.4),)))
    busy = [_account(h.port, f"busy{k:02d}") for k in range(50)]
    h.start(busy)
    try:
        yield _until(reactor, lambda: len(h.starts) >= 2, 5, "the first sessions")
        changed_at = time.monotonic()
        _write(h.path, busy + [_account(h.port, "newcomer")], "rename")
        yield _until(
            reactor, lambda: len(_entries_for(redis, "newcomer")) == 3, 2.0,
            "the added account's mail in Redis",
        )
        took = time.monotonic() - changed_at
        print(f"added account in Redis {took:.2f} s after the change")
        waiting = 50 - len({a for _, a, _ in h.starts if a.startswith("busy")})
        assert waiting >= 30, f"only {waiting} accounts were still waiting"
        assert took < 2.0
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_removed_account_gets_no_session_after_an_in_place_rewrite(tmp_path, redis):
    from twisted.internet import reactor

    users = {"keep": ("pw", 1), "drop": ("pw", 1)}
    h = Harness(reactor, tmp_path, redis, users, workers=2, poll_interval=0.2)
    h.start([_account(h.port, "keep"), _account(h.port, "drop")])
    try:
        yield _until(reactor, lambda: {"keep", "drop"} <= {a for _, a, _ in h.starts}, 5,
                     "both accounts polled")
        _write(h.path, [_account(h.port, "keep")], "in-place")
        yield _until(reactor, lambda: h.ids() == {"keep"}, 3, "the removal applied")
        applied_at = time.monotonic()
        keep_before = sum(1 for _, a, _ in h.starts if a == "keep")
        yield task.deferLater(reactor, 1.0, lambda: None)
        late = [t for t, a, _ in h.starts if a == "drop" and t > applied_at]
        assert late == [], "a removed account was polled after the change"
        assert sum(1 for _, a, _ in h.starts if a == "keep") > keep_before, "polling stopped"
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_changed_password_takes_effect_on_the_next_session(tmp_path, redis):
    from twisted.internet import reactor

    users = {"acme": ("right-password", 2)}
    h = Harness(reactor, tmp_path, redis, users, workers=1, poll_interval=0.2)
    h.start([_account(h.port, "acme", "wrong-password")])
    try:
        yield _until(reactor, lambda: any(r.kind == "auth" for _, r in h.results), 5,
                     "the failed login")
        assert _entries_for(redis, "acme") == []
        _write(h.path, [_account(h.port, "acme", "right-password")], "rename")
        # the entries are in Redis before their session has marked them,
        # logged out and reported: wait for its result too
        yield _until(reactor, lambda: len(_entries_for(redis, "acme")) == 2
                     and h.results[-1][1].ok, 5, "the mail after the password change")
        passwords = [p for _, a, p in h.starts]
        first_right = passwords.index("right-password")
        assert all(p == "right-password" for p in passwords[first_right:])
        assert h.results[-1][1].ok
    finally:
        yield h.stop()
