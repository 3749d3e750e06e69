"""The same end-to-end scenarios on every IMAP server we test: Dovecot,
Cyrus and Courier (tests/support/{dovecot,cyrus,courier}.py).

Each server starts once for this module (test ids name it and its version,
e.g. ``[cyrus-3.6.1]``); every test uses users of its own, so tests share a
server but no mailbox.  The real daemon runs in-process against a fresh
Redis; the held-connection scenarios (IDLE, a held connection without
IDLE, a server restart) run HeldAccount + HeldImap into a MemorySink.
What differs between the servers, as Fido sees it, is asserted in
``test_capabilities_as_fido_sees_them`` and tabulated in README.rst ("IMAP
servers tested").
"""

import itertools
import os
import random

import attr
import pytest
import pytest_twisted
from twisted.internet import task, threads
from twisted.logger import Logger, formatEvent

from fido_tx.accounts.model import Account, parse_account
from fido_tx.config import BackoffSettings, ImapSettings
from fido_tx.sources import SourceContext
from fido_tx.sources.imap import held
from fido_tx.sources.imap import session as imap_session
from fido_tx.sources.imap.connect import Connector
from fido_tx.sources.imap.holding import HeldImap
from fido_tx.testing import MemorySink
from tests import daemon
from tests.support import courier as courier_support
from tests.support import cyrus as cyrus_support
from tests.support import dovecot as dovecot_support
from tests.support.dovecot import make_message
from tests.test_integration import TWO_MIB, run_once, stream_entries

SERVERS = {
    "dovecot": dovecot_support.version,
    "cyrus": cyrus_support.version,
    "courier": courier_support.version,
}

_names = itertools.count()


def _require_unpacked(name, module):
    _, _, reason = module.find()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is required in CI but cannot start: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module",
                params=[pytest.param(name, id=f"{name}-{version()}")
                        for name, version in SERVERS.items()])
def server(request):
    name = request.param
    if name == "dovecot":
        # IDLE: Dovecot's inotify instances are per system user (128), and
        # every test Dovecot on this machine mails as the same one; beyond
        # them Dovecot checks every mailbox_idle_check_interval (30 s)
        with dovecot_support.started(extra_config=DOVECOT_IDLE_CHECK) as started:
            yield started
        return
    module = {"cyrus": cyrus_support, "courier": courier_support}[name]
    _require_unpacked(name, module)
    cls = {"cyrus": cyrus_support.Cyrus, "courier": courier_support.Courier}[name]
    try:
        started = cls().start()
    except RuntimeError as e:
        pytest.fail(f"{name} did not start: {e}", pytrace=False)
    with started:
        print(f"\n{started.describe()} on 127.0.0.1:{started.port} "
              f"(implicit TLS {started.ssl_port})")
        yield started


def new_users(server, n, tag):
    users = {f"{tag}{next(_names)}": f"pw-{tag}-{k}-secret" for k in range(n)}
    server.add_users(users)
    return list(users)


def account(server, user, security="tls", **extra):
    return daemon.dovecot_account(server, user, security, **extra)


def by_account(entries):
    out = {}
    for e in entries:
        out.setdefault(e["account"].decode(), []).append(e)
    return out


#: the longest from APPEND to delivery on a held connection in IDLE:
#: Dovecot pushes after ~0.5 s, Cyrus (with idled) at once, Courier (with
#: IMAP_ENHANCEDIDLE and gamin) after ~1 s for the first change
IDLE_LATENCY = {"dovecot": 1.5, "cyrus": 1.5, "courier": 2.5}
DOVECOT_IDLE_CHECK = "mailbox_idle_check_interval = 1 secs\n"

# -- what the servers say ------------------------------------------------------

#: Capabilities that change what Fido does, per server, after login; and the
#: personal namespace (prefix, separator).  README.rst's table says the same.
EXPECTED = {
    "dovecot": dict(MOVE=True, UIDPLUS=True, CONDSTORE=True, QRESYNC=True, IDLE=True,
                    namespace=("", "."), uidnext_in_select=True),
    "cyrus": dict(MOVE=True, UIDPLUS=True, CONDSTORE=True, QRESYNC=True, IDLE=True,
                  namespace=("INBOX.", "."), uidnext_in_select=True),
    "courier": dict(MOVE=False, UIDPLUS=True, CONDSTORE=False, QRESYNC=False, IDLE=True,
                    namespace=("INBOX.", "."), uidnext_in_select=False),
}


def namespace_and_select(server, user):
    """The first personal namespace (prefix, separator) and whether SELECT
    INBOX answers with a UIDNEXT."""
    client = server.imap("starttls", user)
    try:
        typ, data = client.namespace()
        assert typ == "OK", data
        text = data[0].decode("utf-8")
        typ, _ = client.select("INBOX", readonly=True)
        assert typ == "OK"
        uidnext = "UIDNEXT" in client.untagged_responses
    finally:
        client.logout()
    # (("INBOX." ".")) ...
    prefix, separator = text.split('"')[1], text.split('"')[3]
    return (prefix, separator), uidnext


def test_capabilities_as_fido_sees_them(server):
    [user] = new_users(server, 1, "caps")
    caps = server.capabilities(user)
    print(f"\n{server.describe()}: {' '.join(caps)}")
    seen = {name: name in caps for name in ("MOVE", "UIDPLUS", "CONDSTORE", "QRESYNC", "IDLE")}
    seen["namespace"], seen["uidnext_in_select"] = namespace_and_select(server, user)
    client = server.imap("none")
    try:
        assert client.welcome.startswith(b"* OK [CAPABILITY "), client.welcome
    finally:
        client.shutdown()
    assert seen == EXPECTED[server.name]
    assert server.prefix == seen["namespace"][0]


# -- fetching --------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_every_security_mode_with_2mib_and_8bit_mail_lands_once_and_is_marked_seen(
        server, redis, tmp_path):
    from twisted.internet import reactor

    users = new_users(server, 3, "sec")
    sent = {}
    for k, user in enumerate(users):
        messages = [make_message(k * 10 + 1, 4096),
                    make_message(k * 10 + 2, 3000, eight_bit=True)]
        if k == 0:
            messages.append(make_message(k * 10 + 3, TWO_MIB, attachment=True, eight_bit=True))
        for raw in messages:
            server.add_message(user, raw)
        sent[user] = messages
    accounts = [account(server, u, sec) for u, sec in zip(users, ("tls", "starttls", "none"))]

    d = yield run_once(reactor, tmp_path, redis, accounts)
    assert [r.kind for _, r in d.results] == [None] * 3, [r.message for _, r in d.results]
    stored = by_account(stream_entries(redis))
    for user in users:
        raws = [e["raw"] for e in stored[user]]
        assert sorted(raws) == sorted(sent[user]), f"{user}: not byte-identical"
        assert all(e["mailbox"] == b"INBOX" for e in stored[user])
        assert set(server.flags(user).values()) == {"S"}, server.flags(user)
    assert any(len(e["raw"]) == TWO_MIB for e in stored[users[0]])

    again = yield run_once(reactor, tmp_path, redis, accounts)
    assert all(r.ok and r.fetched == 0 for _, r in again.results)
    assert len(stream_entries(redis)) == sum(len(m) for m in sent.values())


@pytest_twisted.inlineCallbacks
def test_after_fetch_delete_expunges(server, redis, tmp_path):
    from twisted.internet import reactor

    [user] = new_users(server, 1, "del")
    for i in range(3):
        server.add_message(user, make_message(100 + i, 2048))
    d = yield run_once(reactor, tmp_path, redis, [account(server, user, after_fetch="delete")])
    [(_, result)] = d.results
    assert result.ok, result.message
    assert len(stream_entries(redis)) == 3
    assert server.count(user) == 0


@pytest_twisted.inlineCallbacks
def test_move_from_a_non_ascii_mailbox_to_a_non_ascii_folder(server, redis, tmp_path):
    from twisted.internet import reactor

    [user] = new_users(server, 1, "move")
    source, target = "Eingänge", "Archivé 2026"
    server.create_folder(user, source)
    server.create_folder(user, target)
    sent = [make_message(200 + i, 2048, eight_bit=bool(i % 2)) for i in range(3)]
    for raw in sent:
        server.add_message(user, raw, folder=source)
    acct = account(server, user, "starttls", mailbox=server.mailbox(source),
                   after_fetch="move:" + server.mailbox(target))
    d = yield run_once(reactor, tmp_path, redis, [acct])
    [(_, result)] = d.results
    assert result.ok, result.message
    entries = stream_entries(redis)
    assert sorted(e["raw"] for e in entries) == sorted(sent)
    assert {e["mailbox"].decode("utf-8") for e in entries} == {server.mailbox(source)}
    assert server.count(user, source) == 0
    assert server.count(user, target) == 3
    # Moved as they were: \Seen only if the server marks on move (none does).
    assert set(server.flags(user, target).values()) <= {"", "S"}


@pytest_twisted.inlineCallbacks
def test_move_to_a_missing_folder_stores_once_and_reports_mailbox(server, redis, tmp_path):
    from twisted.internet import reactor

    [user] = new_users(server, 1, "nomove")
    sent = [make_message(300 + i, 2048) for i in range(2)]
    for raw in sent:
        server.add_message(user, raw)
    acct = account(server, user, "tls", after_fetch="move:" + server.mailbox("Nowhere"))
    for attempt in range(2):
        d = yield run_once(reactor, tmp_path, redis, [acct])
        [(_, result)] = d.results
        assert result.kind == "mailbox", (attempt, result.kind, result.message)
        assert "Nowhere" in result.message
        entries = stream_entries(redis)
        assert sorted(e["raw"] for e in entries) == sorted(sent), f"attempt {attempt}"
        # Nothing deleted, nothing created: the mail waits in INBOX.
        assert server.count(user) == 2
        assert "T" not in "".join(server.flags(user).values())
        assert not server.has_folder(user, "Nowhere")


# -- TLS session resumption ----------------------------------------------------

#: Does a later session resume the TLS session of an earlier one (at least
#: once in three)?  ``None``: it varies from run to run (not asserted).
#: Fido offers the last session over implicit TLS and STARTTLS alike (the
#: Connector's cache, per host, trust roots and port); the
#: servers differ: Cyrus builds a new TLS context (a new ticket key) on
#: every STARTTLS, and its implicit-TLS resumption depends on which imapd
#: process takes the connection; Courier's couriertls resumes neither.
#: Dovecot over STARTTLS resumes in most runs, but in some none of seven
#: sessions resumes (seen in CI and alone, with one imap-login process as
#: with four; the cause is not found): not asserted here.  That Fido offers
#: its session over STARTTLS is asserted against the loopback server in
#: tests/test_imap.py (test_tls_session_is_resumed_by_the_next_session...).
RESUMES = {
    "dovecot": {"tls": True, "starttls": None},
    "cyrus": {"tls": None, "starttls": False},
    "courier": {"tls": False, "starttls": False},
}


@pytest_twisted.inlineCallbacks
def test_tls_session_resumption_over_implicit_tls_and_starttls(server):
    from twisted.internet import reactor

    [user] = new_users(server, 1, "resume")
    seen = {}
    for security in ("tls", "starttls"):
        connector = Connector(reactor)  # its own TLS session cache
        acct = Account(id=user, host="localhost", username=user, password=server.users[user],
                       port=server.ssl_port if security == "tls" else server.port,
                       security=security, ca_file=server.ca_file)
        resumed = []
        # a TLS 1.3 ticket arrives after the handshake, racing a short
        # session under load: several tries, any resumed one counts
        for n in range(8):
            events = []
            result = yield imap_session.fetch_mailbox(
                reactor, acct, MemorySink(), ImapSettings(), log=Logger(observer=events.append),
                connector=connector)
            assert result.ok, result.debug
            resumed.append(any("TLS session resumed" in formatEvent(e) for e in events))
        assert not resumed[0]
        seen[security] = any(resumed[1:])
    print(f"\n{server.describe()}: TLS session resumed: {seen}")
    for security, expected in RESUMES[server.name].items():
        if expected is not None:
            assert seen[security] == expected, (security, seen)


# -- held connections and IDLE -------------------------------------------------
#
# HeldAccount + HeldImap (what the daemon runs for an ``idle = true``
# account) on each server, delivering into a MemorySink; mail is appended
# from another connection (imaplib, in a thread), as a mail client or an
# MDA would.

HELD = held.HeldSettings(idle_refresh=600.0, poll_interval=600.0, command_timeout=5.0,
                         logout_timeout=2.0, min_hold=1.0,
                         reconnect=BackoffSettings(initial=1.0, maximum=2.0, jitter=0.0))


class HeldOne:
    """One account held on ``server``, its results and what it delivered."""

    def __init__(self, server, user, security="starttls", **settings):
        from twisted.internet import reactor

        self.account = parse_account(account(server, user, security))
        self.sink = MemorySink()
        self.results = []
        source = HeldImap(self.account, SourceContext(reactor=reactor, sink=self.sink,
                                                      settings=ImapSettings()))
        self.machine = held.HeldAccount(
            self.account.id, self.account.host, source.open, source.poll, self.results.append,
            reactor, attr.evolve(HELD, **settings), held.HeldPool(), random.Random(0))
        self.states = []
        enter = self.machine._enter

        def record(state):  # every state (the machine's history keeps the last few)
            self.states.append(state)
            enter(state)

        self.machine._enter = record
        self.machine.start()

    def raws(self):
        return [m.raw for m in self.sink.entries]

    def waiting(self):
        """Waiting for mail: in IDLE (the server's ``+`` came), or a plain wait."""
        m = self.machine
        return m.state == held.WAITING or (m.state == held.IDLING and m.pool.idling == 1)

    def errors(self):
        return [r for r in self.results if not r.ok]


def _until(check, timeout, what):
    from twisted.internet import reactor

    deadline = reactor.seconds() + timeout
    while not check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        yield task.deferLater(reactor, 0.02, lambda: None)


until = pytest_twisted.inlineCallbacks(_until)


@pytest_twisted.inlineCallbacks
def append_and_time(server, h, user, raw):
    """Append ``raw`` from another connection; seconds until it is delivered."""
    from twisted.internet import reactor

    yield until(lambda: h.waiting(), 5, "back to waiting")
    yield threads.deferToThread(server.add_message, user, raw)
    appended = reactor.seconds()
    yield until(lambda: raw in h.raws(), 10, "delivered")
    return reactor.seconds() - appended


@pytest_twisted.inlineCallbacks
def test_held_idle_delivers_mail_appended_from_another_connection_within_a_second(server):
    [user] = new_users(server, 1, "idle")
    first = make_message(400, 2048)
    server.add_message(user, first)
    h = HeldOne(server, user)
    try:
        yield until(lambda: h.waiting() and h.raws() == [first], 10, "caught up and idling")
        sent, seconds = [first], []
        for i in range(3):
            raw = make_message(401 + i, 2048, eight_bit=bool(i % 2))
            sent.append(raw)
            seconds.append((yield append_and_time(server, h, user, raw)))
        print(f"\n{server.describe()}: appended -> delivered on the held connection: "
              + ", ".join(f"{s * 1000:.0f} ms" for s in seconds))
        assert max(seconds) < IDLE_LATENCY[server.name], seconds
        yield until(lambda: h.machine.state == held.IDLING, 5, "marked and idling")
        assert h.raws() == sent  # each once, in order
        assert h.errors() == []
        assert h.machine.reconnects == 0  # one connection for all of it
        assert held.WAITING not in h.states  # woken by IDLE, not polled
        assert set(server.flags(user).values()) == {"S"}
    finally:
        yield h.machine.stop(timeout=5)


@pytest_twisted.inlineCallbacks
def test_held_connection_without_idle_is_polled_on_the_connection(server):
    [user] = new_users(server, 1, "noidle")
    h = HeldOne(server, user, security="tls", idle=False, poll_interval=0.5)
    try:
        yield until(lambda: h.machine.state == held.WAITING, 10, "waiting")
        raw = make_message(450, 2048)
        seconds = yield append_and_time(server, h, user, raw)
        assert seconds < 1.5, seconds
        assert h.raws() == [raw]
        assert h.machine.reconnects == 0 and h.errors() == []
        assert held.IDLING not in h.states
    finally:
        yield h.machine.stop(timeout=5)


@pytest_twisted.inlineCallbacks
def test_held_connection_comes_back_after_a_server_restart_nothing_lost_or_twice(server):
    [user] = new_users(server, 1, "restart")
    sent = [make_message(500, 2048)]
    server.add_message(user, sent[0])
    h = HeldOne(server, user)
    try:
        yield until(lambda: h.machine.state == held.IDLING and h.raws() == sent, 10, "idling")
        yield threads.deferToThread(server.stop)
        yield until(lambda: h.machine.state != held.IDLING, 5, "connection lost")
        yield threads.deferToThread(server.start)
        for i in range(2):
            raw = make_message(501 + i, 2048)
            sent.append(raw)
            yield threads.deferToThread(server.add_message, user, raw)
        yield until(lambda: len(h.raws()) == len(sent), 15, "delivered after the restart")
        yield until(lambda: h.machine.state == held.IDLING, 5, "idling again")
        raw = make_message(503, 2048)
        sent.append(raw)
        seconds = yield append_and_time(server, h, user, raw)
        print(f"\n{server.describe()} restarted: {h.machine.reconnects} reconnects, "
              f"then appended -> delivered in {seconds * 1000:.0f} ms")
        yield until(lambda: h.machine.state == held.IDLING, 5, "marked and idling")
        assert sorted(h.raws()) == sorted(sent)  # nothing lost, nothing twice
        assert h.machine.reconnects >= 1
        assert h.errors() == []  # a restart is routine: no report
        assert set(server.flags(user).values()) == {"S"}
    finally:
        yield h.machine.stop(timeout=5)
