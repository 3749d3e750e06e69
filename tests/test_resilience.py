"""Resilience of one mailbox session against misbehaving IMAP servers.

Each test scripts one misbehaviour on the mock server (tests/support/mockimap.py)
for one account and checks the session's SessionResult kind, that nothing was
marked on the server that the sink had not stored, that the connection was
released, and that a healthy account fetched at the same time was not held
up by the faulty one.
"""

import attr
import pytest
import pytest_twisted
from hypothesis import given, settings, strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from fido_tx import errors
from fido_tx.sources.imap import client as imapproto
from fido_tx.accounts.model import Account
from fido_tx.config import ImapSettings
from fido_tx.sources.imap.session import fetch_mailbox
from fido_tx.outcome import SessionResult
from fido_tx.testing import MemorySink
from tests.support.mockimap import (
    TOO_MANY_CONNECTIONS, Behaviour, Fault, MockIMAPServer, MockMailbox, parse_set,
    sample_message)
from tests.support.redis_server import free_port

PASSWORD = 'pa ss"word\\1'
SHORT = ImapSettings(connect_timeout=1.0, greeting_timeout=0.5, command_timeout=0.5,
                     logout_timeout=0.3, min_literal_rate=4096)
MARKING = ("UID STORE", "UID MOVE", "UID COPY", "UID EXPUNGE")


def mailbox(n=3, size=0, user="u"):
    return MockMailbox(PASSWORD, [sample_message(i, user, size) for i in range(1, n + 1)],
                       uidvalidity=100, folders=("Archive",))


def account(user, port, after_fetch="seen", password=PASSWORD):
    return Account(id="acct-" + user, host="127.0.0.1", port=port, username=user,
                   password=password, security="none", after_fetch=after_fetch)


def marked_uids(server, user):
    """Every UID the client asked the server to flag, copy, move or expunge."""
    uids = set()
    for c in server.commands(user):
        if c.name in MARKING:
            want = parse_set(c.args[0], 10**6)
            uids |= {u for u in range(1, 10**4) if want(u)}
        elif c.name == "EXPUNGE":
            uids |= {m.uid for m in server.mailbox(user).folders["INBOX"].messages
                     if "\\Deleted" in m.flags}
    return uids


def stored_uids(sink, account_id):
    return {int(m.id) for m in sink.entries if m.account == account_id}


def check_invariants(server, user, sink):
    """Nothing marked on the server that the sink has not stored."""
    assert marked_uids(server, user) <= stored_uids(sink, "acct-" + user)


@defer.inlineCallbacks
def timed(d):
    started = reactor.seconds()
    result = yield d
    return result, reactor.seconds() - started


@defer.inlineCallbacks
def run_with_healthy(server, faulty_user, faulty_account, imap_settings=SHORT, sink=None):
    """Run the faulty account and a healthy one concurrently; compare the
    healthy one's duration with a baseline run of an identical healthy
    account alone."""
    sink = sink or MemorySink()
    baseline_sink, healthy_sink = MemorySink(), MemorySink()
    for user in ("h1", "h2"):
        server.accounts[user] = mailbox(5, size=3000, user=user)
    h1 = account("h1", server.listen(account="h1"))
    h2 = account("h2", server.listen(account="h2"))
    base, base_seconds = yield timed(fetch_mailbox(reactor, h1, baseline_sink, SHORT))
    assert base.ok and base.fetched == 5, base
    # a session must end on its own: the timeout here only keeps a hung
    # session from hanging the test run
    faulty_d = timed(fetch_mailbox(reactor, faulty_account, sink, imap_settings)
                     .addTimeout(10, reactor))
    healthy, healthy_seconds = yield timed(fetch_mailbox(reactor, h2, healthy_sink, SHORT))
    result, seconds = yield faulty_d
    assert isinstance(result, SessionResult)
    assert healthy.ok and healthy.fetched == 5, healthy
    assert healthy_seconds < 3 * base_seconds + 0.2, (healthy_seconds, base_seconds)
    yield server.all_closed().addTimeout(2, reactor)  # every connection released
    check_invariants(server, faulty_user, sink)
    return result, seconds, sink


@pytest.fixture
def server():
    s = MockIMAPServer(reactor, {"u": mailbox()})
    yield s
    pytest_twisted.blockon(s.stop())


def scripted(server, behaviour, **kw):
    server.script("u", behaviour)
    return account("u", server.listen(account="u"), **kw)


@pytest_twisted.inlineCallbacks
def test_refused_connection_is_a_connect_error(server):
    acct = account("u", free_port())  # nothing listens there
    result, _, sink = yield run_with_healthy(server, "u", acct)
    assert result.kind == errors.CONNECT, result
    assert sink.entries == []


@pytest_twisted.inlineCallbacks
def test_connection_closed_at_once_is_a_connect_error(server):
    acct = scripted(server, Behaviour(connect="reset"))
    result, _, _ = yield run_with_healthy(server, "u", acct)
    assert result.kind == errors.CONNECT, result


@pytest_twisted.inlineCallbacks
def test_never_greeted_is_a_timeout(server):
    acct = scripted(server, Behaviour(connect="silent"))
    result, seconds, _ = yield run_with_healthy(server, "u", acct)
    assert result.kind == errors.TIMEOUT, result
    assert 0.4 < seconds < 2


@pytest_twisted.inlineCallbacks
def test_late_greeting_within_the_timeout_is_fine(server):
    acct = scripted(server, Behaviour(greeting_delay=0.3))
    result, seconds, sink = yield run_with_healthy(server, "u", acct)
    assert result.ok and result.fetched == 3 and result.marked == 3, result
    assert seconds >= 0.3
    assert all(server.mailbox("u").flags(uid) == {"\\Seen"} for uid in (1, 2, 3))


@pytest_twisted.inlineCallbacks
def test_no_on_select_is_a_mailbox_error(server):
    acct = scripted(server, Behaviour(faults=(Fault("SELECT", "no", b"[NONEXISTENT] gone"),)))
    result, _, sink = yield run_with_healthy(server, "u", acct)
    assert result.kind == errors.MAILBOX, result
    assert sink.entries == [] and marked_uids(server, "u") == set()


@pytest_twisted.inlineCallbacks
def test_no_on_login_is_an_auth_error_and_the_password_was_sent_intact(server):
    acct = scripted(server, Behaviour(faults=(
        Fault("LOGIN", "no", b"[AUTHENTICATIONFAILED] Invalid credentials"),)))
    result, _, _ = yield run_with_healthy(server, "u", acct)
    assert result.kind == errors.AUTH, result
    (login,) = server.commands("u", "LOGIN")
    assert login.args == (b"u", PASSWORD.encode())  # as a literal, byte for byte
    assert PASSWORD not in result.message + result.debug


@pytest_twisted.inlineCallbacks
def test_wrong_password_is_an_auth_error(server):
    acct = account("u", server.listen(account="u"), password="wrong")
    result, _, _ = yield run_with_healthy(server, "u", acct)
    assert result.kind == errors.AUTH, result


@pytest_twisted.inlineCallbacks
def test_too_many_connections_is_a_connect_error_not_auth(server):
    acct = scripted(server, Behaviour(faults=(TOO_MANY_CONNECTIONS,)))
    result, _, _ = yield run_with_healthy(server, "u", acct)
    assert result.kind == errors.CONNECT, result


@pytest_twisted.inlineCallbacks
def test_connection_limit_reached_is_a_connect_error(server):
    # a first session stays logged in (its SEARCH answer is delayed) ...
    acct = scripted(server, Behaviour(max_connections=1, faults=(
        Fault("UID SEARCH", "delay", delay=1.0),)))
    sink = MemorySink()
    first = fetch_mailbox(reactor, acct, sink, attr.evolve(SHORT, command_timeout=3))
    yield task.deferLater(reactor, 0.2, lambda: None)
    assert server.logged_in("u") == 1
    # ... so the second one is turned away at LOGIN
    result, _, _ = yield run_with_healthy(server, "u", acct, sink=sink)
    assert result.kind == errors.CONNECT, result
    assert (yield first).ok


@pytest_twisted.inlineCallbacks
def test_bad_answer_is_a_protocol_error(server):
    acct = scripted(server, Behaviour(faults=(Fault("UID SEARCH", "bad", b"Syntax error"),)))
    result, _, sink = yield run_with_healthy(server, "u", acct)
    assert result.kind == errors.PROTOCOL, result
    assert sink.entries == []


@pytest_twisted.inlineCallbacks
def test_garbage_is_a_protocol_error(server):
    acct = scripted(server, Behaviour(faults=(Fault("UID FETCH", "garbage", nth=2),)))
    result, _, sink = yield run_with_healthy(server, "u", acct)
    assert result.kind == errors.PROTOCOL, result
    assert sink.entries == [] and marked_uids(server, "u") == set()


@pytest_twisted.inlineCallbacks
def test_unknown_status_in_a_tagged_answer_is_a_protocol_error(server):
    """``A0003 OK* ...`` (found by the Hypothesis test below).  The session
    must end with ``protocol``, not hang: a hung session never gives its
    worker slot back to the scheduler."""
    acct = scripted(server, Behaviour(faults=(
        Fault("UID SEARCH", "replace", b"$TAG OK* SEARCH 1 2 3\r\n"),)))
    result, _, sink = yield run_with_healthy(server, "u", acct)
    assert result.kind == errors.PROTOCOL, result
    assert sink.entries == []


@pytest_twisted.inlineCallbacks
def test_truncated_fetch_response_is_a_protocol_error(server):
    acct = scripted(server, Behaviour(faults=(Fault("UID FETCH", "truncate"),)))
    result, _, sink = yield run_with_healthy(server, "u", acct)
    assert result.kind == errors.PROTOCOL, result
    assert sink.entries == []


@pytest_twisted.inlineCallbacks
def test_drop_in_the_middle_of_a_literal_stores_and_marks_nothing(server):
    server.accounts["u"] = mailbox(3, size=20000)
    # the second UID FETCH carries the bodies: cut inside the second message
    acct = scripted(server, Behaviour(faults=(
        Fault("UID FETCH", "drop", after_bytes=30000, nth=2),)))
    result, _, sink = yield run_with_healthy(server, "u", acct)
    assert result.kind in (errors.PROTOCOL, errors.CONNECT), result
    assert sink.entries == [] and marked_uids(server, "u") == set()
    assert all(server.mailbox("u").flags(uid) == set() for uid in (1, 2, 3))


@pytest_twisted.inlineCallbacks
def test_drop_after_a_first_batch_keeps_what_was_stored_and_marked(server):
    server.accounts["u"] = mailbox(4, size=2000)
    settings_ = attr.evolve(SHORT, batch_messages=2)
    acct = scripted(server, Behaviour(faults=(
        Fault("UID FETCH", "drop", after_bytes=3000, nth=3),)))
    result, _, sink = yield run_with_healthy(server, "u", acct, settings_)
    assert result.kind == errors.PROTOCOL, result
    assert stored_uids(sink, "acct-u") == {1, 2} and marked_uids(server, "u") == {1, 2}
    assert result.fetched == 2 and result.marked == 2


@pytest_twisted.inlineCallbacks
def test_untagged_bye_is_a_protocol_error(server):
    acct = scripted(server, Behaviour(faults=(Fault("UID SEARCH", "bye", b"Shutting down"),)))
    result, _, _ = yield run_with_healthy(server, "u", acct)
    assert result.kind == errors.PROTOCOL, result
    assert "Shutting down" in result.message + result.debug


@pytest_twisted.inlineCallbacks
def test_trickle_below_min_literal_rate_is_a_timeout(server, monkeypatch):
    # check the rate every 0.3 s instead of 5 s, so the test is short
    monkeypatch.setattr(imapproto.FidoIMAP4Client, "literal_check_interval", 0.3)
    server.accounts["u"] = mailbox(1, size=20000)
    acct = scripted(server, Behaviour(faults=(Fault("UID FETCH", "trickle", rate=1000, nth=2),)))
    result, seconds, sink = yield run_with_healthy(server, "u", acct)
    assert result.kind == errors.TIMEOUT, result
    assert seconds < 3
    assert sink.entries == [] and marked_uids(server, "u") == set()


@pytest_twisted.inlineCallbacks
def test_never_answered_logout_does_not_hold_the_session(server):
    # LOGOUT is written and the connection closed behind it: the answer is
    # not waited for (run_with_healthy checks every connection is closed)
    acct = scripted(server, Behaviour(faults=(Fault("LOGOUT", "silent"),)))
    result, seconds, sink = yield run_with_healthy(server, "u", acct)
    assert result.ok and result.fetched == 3 and result.marked == 3, result
    assert seconds < SHORT.logout_timeout
    assert server.commands(name="LOGOUT")
    assert stored_uids(sink, "acct-u") == {1, 2, 3}
    assert all(server.mailbox("u").flags(uid) == {"\\Seen"} for uid in (1, 2, 3))


@pytest_twisted.inlineCallbacks
def test_search_with_5000_uids_is_fine(server):
    server.accounts["u"] = mailbox(20)
    acct = scripted(server, Behaviour(search_uids=tuple(range(1, 5001))), after_fetch="delete")
    result, _, sink = yield run_with_healthy(server, "u", acct)
    assert result.ok, result
    assert stored_uids(sink, "acct-u") == set(range(1, 21))
    assert server.mailbox("u").uids() == []  # all 20 existing ones deleted


@pytest_twisted.inlineCallbacks
def test_uidvalidity_change_stores_messages_again_under_the_new_one(server):
    acct = scripted(server, Behaviour(uidvalidity=(5, 6)), after_fetch="move:Archive")
    sink = MemorySink()
    first = yield fetch_mailbox(reactor, acct, sink, SHORT)
    assert first.ok and first.fetched == 3
    # the server renumbered its mailbox: new UIDVALIDITY, UIDs from 1 again
    box = server.mailbox("u")
    box.folders["INBOX"].uidnext = 1
    for n in (11, 12, 13, 14):
        box.append(sample_message(n, "u"))
    result, _, sink = yield run_with_healthy(server, "u", acct, sink=sink)
    assert result.ok and result.fetched == 4, result
    assert sorted((int(m.epoch), int(m.id)) for m in sink.entries) == [
        (5, 1), (5, 2), (5, 3), (6, 1), (6, 2), (6, 3), (6, 4)]
    assert server.mailbox("u").uids() == [] and len(box.uids("Archive")) == 7


# --- TLS: STARTTLS is required, never skipped -----------------------------------


@pytest.fixture
def pki():
    from tests.support import tlsca

    return tlsca.files()


def tls_account(port, security, pki, user="u"):
    return Account(id="acct-" + user, host="127.0.0.1", port=port, username=user,
                   password=PASSWORD, security=security, ca_file=pki.ca)


@pytest_twisted.inlineCallbacks
def test_starttls_not_offered_is_a_tls_error_and_no_password_is_sent(server, pki):
    server.tls = (pki.localhost.cert, pki.localhost.key)
    server.script("u", Behaviour(starttls=False))
    acct = tls_account(server.listen(account="u"), "starttls", pki)
    result, _, _ = yield run_with_healthy(server, "u", acct)
    assert result.kind == errors.TLS, result
    assert server.commands("u", "LOGIN") == [] and server.commands("u", "AUTHENTICATE") == []


@pytest_twisted.inlineCallbacks
def test_starttls_refused_is_a_tls_error(server, pki):
    server.tls = (pki.localhost.cert, pki.localhost.key)
    server.script("u", Behaviour(starttls=True, faults=(Fault("STARTTLS", "no"),)))
    acct = tls_account(server.listen(account="u"), "starttls", pki)
    result, _, _ = yield run_with_healthy(server, "u", acct)
    assert result.kind == errors.TLS, result
    assert server.commands("u", "LOGIN") == []


@pytest_twisted.inlineCallbacks
def test_starttls_with_logindisabled_logs_in_over_tls(server, pki):
    server.tls = (pki.localhost.cert, pki.localhost.key)
    server.script("u", Behaviour(starttls=True, login_disabled=True))
    acct = tls_account(server.listen(account="u"), "starttls", pki)
    result, _, sink = yield run_with_healthy(server, "u", acct)
    assert result.ok and result.fetched == 3, result
    (record,) = [r for r in server.connections if r.user == "u"]
    assert record.tls
    names = [c.name for c in record.commands]
    assert names.index("STARTTLS") < min(
        names.index(n) for n in ("LOGIN", "AUTHENTICATE") if n in names)


@pytest_twisted.inlineCallbacks
def test_implicit_tls_fetches(server, pki):
    server.tls = (pki.localhost.cert, pki.localhost.key)
    acct = tls_account(server.listen(account="u", implicit_tls=True), "tls", pki)
    result, _, sink = yield run_with_healthy(server, "u", acct)
    assert result.ok and result.fetched == 3, result


# --- Hypothesis: arbitrary server answers -------------------------------------

COMMANDS = ["CAPABILITY", "LOGIN", "SELECT", "UID SEARCH", "UID FETCH", "UID STORE",
            "UID MOVE", "UID EXPUNGE", "LOGOUT", "*"]


def _lines():
    n = st.integers(0, 6)
    literal = st.binary(max_size=12).flatmap(
        lambda body: st.integers(-2, 2).map(
            lambda skew: b"{%d}\r\n" % max(0, len(body) + skew) + body))
    return st.one_of(
        st.builds(lambda s, u: b"* %d FETCH (UID %d RFC822.SIZE 20)\r\n" % (s, u), n, n),
        st.builds(lambda s, u, lit: b"* %d FETCH (UID %d BODY[] " % (s, u) + lit + b")\r\n",
                  n, n, literal),
        st.builds(lambda u: b"* SEARCH" + b"".join(b" %d" % x for x in u) + b"\r\n",
                  st.lists(n, max_size=4)),
        st.sampled_from([b"$TAG OK done\r\n", b"$TAG NO nope\r\n", b"$TAG BAD what\r\n",
                         b"+ more\r\n", b"* BYE bye\r\n", b"* OK [UIDVALIDITY 7] x\r\n",
                         b"* 3 EXISTS\r\n", b"* 1 EXPUNGE\r\n", b"$TAG OK", b"\r\n",
                         b"* OK [PERMANENTFLAGS (\\Seen)] x\r\n", b"* CAPABILITY IMAP4rev1\r\n"]),
        st.binary(max_size=30),
    )


faults = st.builds(
    Fault,
    command=st.sampled_from(COMMANDS),
    action=st.sampled_from(["no", "bad", "bye", "drop", "garbage", "truncate", "replace",
                            "inject", "silent"]),
    text=st.lists(_lines(), max_size=4).map(b"".join),
    after_bytes=st.one_of(st.none(), st.integers(0, 400)),
    nth=st.integers(0, 3),
)

FUZZ = ImapSettings(connect_timeout=1.0, greeting_timeout=0.3, command_timeout=0.3,
                    logout_timeout=0.2, min_literal_rate=1, batch_messages=2)


@settings(max_examples=80, deadline=None)
@given(faults=st.lists(faults, min_size=1, max_size=3),
       after_fetch=st.sampled_from(["seen", "delete", "move:Archive"]),
       greeting_delay=st.sampled_from([0.0, 0.0, 0.2]))
def test_arbitrary_server_answers_never_break_the_session(faults, after_fetch, greeting_delay):
    """In memory (iosim and a fake clock): the session always ends with a
    SessionResult, never marks what the sink has not stored, and closes
    its connection."""
    clock = MemoryReactorClock()
    server = MockIMAPServer(clock, {"u": mailbox()})
    server.script("u", Behaviour(faults=tuple(faults), greeting_delay=greeting_delay))
    acct = account("u", 143, after_fetch=after_fetch)
    sink = MemorySink()
    outcome = []
    fetch_mailbox(clock, acct, sink, FUZZ).addBoth(outcome.append)
    pumps = []
    for _ in range(2000):  # 100 s of fake time, far beyond every timeout
        while len(clock.tcpClients) > len(pumps):
            host, port, factory, _, _ = clock.tcpClients[len(pumps)]
            client = factory.buildProtocol(IPv4Address("TCP", host, port))
            served = server.build_protocol("u")
            pumps.append(iosim.connect(served, iosim.makeFakeServer(served), client,
                                       iosim.makeFakeClient(client), greet=False, clock=clock))
        for pump in pumps:
            pump.flush()
        if outcome:
            break
        clock.advance(0.05)
    for pump in pumps:
        pump.flush()
    assert len(outcome) == 1, "the session never ended"
    (result,) = outcome
    assert isinstance(result, SessionResult), result
    assert result.kind is None or result.kind in errors.FAILURE_KINDS
    assert len(pumps) == 1
    assert server.open_connections() == [], "the connection was not released"
    check_invariants(server, "u", sink)


# --- a real Dovecot behind the fault-injecting proxy ---------------------------


@pytest.fixture
def dovecot(tmp_path):
    from tests.support import dovecot as dc

    with dc.started(tmp_path / "dovecot", users={"alice": PASSWORD}) as server:
        yield server


def dovecot_account(proxy, dovecot):
    return Account(id="acct-alice", host="127.0.0.1", port=proxy.port, username="alice",
                   password=PASSWORD, security="starttls", ca_file=dovecot.ca_file)


@pytest_twisted.inlineCallbacks
def test_dovecot_behind_random_cuts_marks_only_stored_messages_and_gets_everything(dovecot):
    """Seeded random cuts of the TCP connection to a real Dovecot: every
    session ends with a result, a message is \\Seen on the server only once the
    sink has it, and repeated sessions get every message exactly once."""
    from tests.support.dovecot import make_message

    from tests.support.proxy import FaultProxy

    n = 12
    for i in range(n):
        dovecot.add_message("alice", make_message(i, 20000))
    proxy = FaultProxy(reactor, "127.0.0.1", dovecot.port, seed=20261122)
    try:
        proxy.cut_randomly(per_chunk=0.1)
        acct = dovecot_account(proxy, dovecot)
        sink = MemorySink()
        kinds = []
        settings_ = attr.evolve(SHORT, command_timeout=5, greeting_timeout=5, batch_messages=3)
        for attempt in range(40):
            if attempt == 20:
                # Cuts on one chunk in ten can, by chance, fail twenty sessions
                # in a row; the link heals so the run always converges.
                proxy.heal()
            result = yield fetch_mailbox(reactor, acct, sink, settings_).addTimeout(30, reactor)
            kinds.append(result.kind)
            seen = {uid for uid, letters in dovecot.flags_by_uid("alice").items()
                    if "S" in letters}
            assert seen <= stored_uids(sink, "acct-alice"), (seen, kinds)
            if result.ok and len(seen) == n:
                break
        assert any(k is not None for k in kinds), "the proxy never cut anything"
        assert kinds[-1] is None, kinds
        assert set(kinds) <= {None, errors.PROTOCOL, errors.CONNECT, errors.TLS,
                              errors.TIMEOUT}, kinds
        assert len(sink.entries) == n  # exactly once each
        assert {m.message_id for m in sink.entries} == {
            "<fido.%d.20000.0@fido.test>" % i for i in range(n)}
    finally:
        yield proxy.stop()


@pytest_twisted.inlineCallbacks
def test_dovecot_behind_a_stalled_link_is_a_timeout_and_other_sessions_go_on(dovecot):
    from tests.support.dovecot import make_message

    from tests.support.proxy import FaultProxy

    dovecot.add_message("alice", make_message(1, 2000))
    stalled = FaultProxy(reactor, "127.0.0.1", dovecot.port, seed=1)
    healthy = FaultProxy(reactor, "127.0.0.1", dovecot.port, seed=2)
    try:
        stalled.stall(None)
        sink = MemorySink()
        slow = fetch_mailbox(reactor, dovecot_account(stalled, dovecot), MemorySink(),
                             attr.evolve(SHORT, greeting_timeout=2))
        good = yield fetch_mailbox(reactor, dovecot_account(healthy, dovecot), sink,
                                   attr.evolve(SHORT, command_timeout=5))
        assert good.ok and good.fetched == 1, good
        assert not slow.called  # the healthy session did not wait for the stalled one
        result = yield slow
        assert result.kind == errors.TIMEOUT, result
    finally:
        yield stalled.stop()
        yield healthy.stop()


class _Chatterbox(__import__("twisted.internet.protocol", fromlist=["Protocol"]).Protocol):
    """Logs anyone in, then answers SELECT with an untagged line every 0.1 s
    and never a tagged one: each line resets command_timeout's silence clock.
    Like a real server, it answers nothing written behind the SELECT (a
    pipelined UID SEARCH) before the SELECT's own answer."""

    def connectionMade(self):
        self.transport.write(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hello\r\n")
        self.loop = None

    def dataReceived(self, data):
        for line in data.split(b"\r\n"):
            if not line or self.loop is not None:
                continue
            tag, _, rest = line.partition(b" ")
            verb = rest.split(b" ", 1)[0].upper()
            if verb == b"SELECT":
                self.loop = task.LoopingCall(self.transport.write, b"* OK still working\r\n")
                self.loop.start(0.1)
            elif verb == b"CAPABILITY":
                self.transport.write(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n" + tag + b" OK done\r\n")
            else:
                self.transport.write(tag + b" OK done\r\n")

    def connectionLost(self, reason):
        if self.loop is not None and self.loop.running:
            self.loop.stop()


@pytest_twisted.inlineCallbacks
def test_a_server_that_talks_forever_is_cut_off_by_session_timeout():
    from twisted.internet import protocol

    factory = protocol.Factory.forProtocol(_Chatterbox)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    account = Account(id="chatty", host="127.0.0.1", port=port.getHost().port,
                      security="none", username="u", password="p")
    limits = attr.evolve(SHORT, command_timeout=0.5, session_timeout=1.5)
    sink = MemorySink()
    try:
        result = yield fetch_mailbox(reactor, account, sink, limits)
    finally:
        yield port.stopListening()
    assert result.kind == errors.TIMEOUT, result
    assert "session_timeout" in result.message
    assert 1.4 < result.seconds < 3.0, result.seconds
    assert sink.entries == []
