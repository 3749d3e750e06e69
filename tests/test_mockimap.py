"""The mock IMAP server itself: normal operation with Twisted's IMAP4Client
and a raw client, and each scriptable behaviour."""

import base64
import os
import re
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, reactor, task
from twisted.mail import imap4

from tests.support import mockimap
from tests.support.mockimap import (
    Behaviour, Fault, MockIMAPServer, MockMailbox, RawClient, sample_message)


def connect_raw(port):
    return mockimap.connect_raw(reactor, port)


def connect_imap4(port):
    return endpoints.connectProtocol(
        endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), imap4.IMAP4Client())


@pytest.fixture
def server():
    s = MockIMAPServer(reactor, {
        "u1": MockMailbox("secret \"pw\"", [sample_message(i, "u1") for i in (1, 2, 3)],
                          uidvalidity=77, folders=("Archive",)),
    })
    yield s
    pytest_twisted.blockon(s.stop())


@pytest_twisted.inlineCallbacks
def test_imap4client_session_fetches_marks_and_expunges(server):
    port = server.listen()
    client = yield connect_imap4(port)
    yield task.deferLater(reactor, 0.05, lambda: None)  # the greeting
    yield client.login(b"u1", b'secret "pw"')
    selected = yield client.select("INBOX")
    assert selected["EXISTS"] == 3 and selected["UIDVALIDITY"] == 77
    assert "\\*" in selected["PERMANENTFLAGS"]
    uids = yield client.search(imap4.Query(unseen=True), uid=True)
    assert uids == [1, 2, 3]
    bodies = yield client.fetchSpecific("2:3", uid=True, peek=True)
    assert [b[0][-1] for b in bodies.values()] == [
        sample_message(2, "u1").decode("charmap"), sample_message(3, "u1").decode("charmap")]
    assert server.mailbox("u1").flags(2) == set()  # PEEK does not set \Seen
    yield client.addFlags("2", ["\\Seen"], uid=True, silent=True)
    yield client.addFlags("3", ["\\Deleted"], uid=True)
    yield client.expunge()
    yield client.logout()
    box = server.mailbox("u1")
    assert box.flags(2) == {"\\Seen"}
    assert box.uids() == [1, 2]
    assert [(f, u) for f, u, _ in box.expunged] == [("INBOX", 3)]
    login = server.commands("u1", "LOGIN")[0]
    assert login.args == (b"u1", b'secret "pw"')
    assert server.login_attempts == [("LOGIN", "u1", 'secret "pw"')]
    yield server.all_closed()


@pytest_twisted.inlineCallbacks
def test_raw_literal_login_plain_move_uid_expunge_and_body_sets_seen(server):
    port = server.listen()
    c = yield connect_raw(port)
    greeting = yield c.until(rb"\* OK [^\r\n]*\r\n")
    assert b"IMAP4rev1" in greeting and b"UIDPLUS" in greeting
    c.transport.write(b"a1 LOGIN u1 {11}\r\n")
    yield c.until(rb"\+ [^\r\n]*\r\n")
    c.transport.write(b'secret "pw"\r\n')
    out = yield c.until(rb"a1 (OK|NO)[^\r\n]*\r\n")
    assert b"a1 OK" in out
    out = yield c.command(b"a2", b"SELECT INBOX")
    assert b"* 3 EXISTS" in out and b"[UIDVALIDITY 77]" in out and b"[UIDNEXT 4]" in out
    out = yield c.command(b"a3", b"UID FETCH 1 (UID FLAGS RFC822.SIZE BODY[])")
    raw = sample_message(1, "u1")
    assert b"RFC822.SIZE %d" % len(raw) in out and b"{%d}\r\n" % len(raw) + raw in out
    assert server.mailbox("u1").flags(1) == {"\\Seen"}  # BODY[] (not PEEK) sets \Seen
    out = yield c.command(b"a4", b"UID SEARCH UNSEEN UNKEYWORD $FidoTooLarge")
    assert b"* SEARCH 2 3\r\n" in out
    out = yield c.command(b"a5", b"UID STORE 2 +FLAGS ($FidoTooLarge)")
    assert b"* 2 FETCH (UID 2 FLAGS ($FidoTooLarge))" in out
    out = yield c.command(b"a6", b"UID SEARCH UNSEEN UNKEYWORD $FidoTooLarge")
    assert b"* SEARCH 3\r\n" in out
    out = yield c.command(b"a7", b"UID MOVE 3 Archive")
    assert b"[COPYUID 1077 3 1]" in out and b"* 3 EXPUNGE" in out and b"a7 OK" in out
    assert server.mailbox("u1").uids("Archive") == [1]
    out = yield c.command(b"a8", b"UID MOVE 1 Nowhere")
    assert b"a8 NO [TRYCREATE]" in out
    yield c.command(b"a9", b"UID STORE 1:2 +FLAGS.SILENT (\\Deleted)")
    out = yield c.command(b"b1", b"UID EXPUNGE 2")
    assert b"* 2 EXPUNGE" in out and server.mailbox("u1").uids() == [1]
    out = yield c.command(b"b2", b"LOGOUT")
    assert b"* BYE" in out
    yield c.lost
    # AUTHENTICATE PLAIN, both with and without an initial response
    c = yield connect_raw(port)
    yield c.until(rb"\* OK [^\r\n]*\r\n")
    token = base64.b64encode(b'\0u1\0secret "pw"')
    c.transport.write(b"p1 AUTHENTICATE PLAIN\r\n")
    yield c.until(rb"\+ ?\r\n")
    c.transport.write(token + b"\r\n")
    out = yield c.until(rb"p1 (OK|NO)[^\r\n]*\r\n")
    assert b"p1 OK" in out
    c.transport.abortConnection()
    c = yield connect_raw(port)
    yield c.until(rb"\* OK [^\r\n]*\r\n")
    out = yield c.command(b"p2", b"AUTHENTICATE PLAIN " + base64.b64encode(b"\0u1\0wrong"))
    assert b"p2 NO [AUTHENTICATIONFAILED]" in out
    assert server.login_attempts[-2:] == [
        ("AUTHENTICATE PLAIN", "u1", 'secret "pw"'), ("AUTHENTICATE PLAIN", "u1", "wrong")]
    out = yield c.command(b"p3", b"SELECT INBOX")
    assert b"p3 BAD" in out  # not authenticated
    out = yield c.command(b"p4", b"FROB")
    assert b"p4 BAD" in out
    c.transport.abortConnection()
    yield server.all_closed()
    assert server.connection_count() == 3


@pytest_twisted.inlineCallbacks
def test_connect_close_reset_and_silent(server):
    for mode in ("close", "reset"):
        server.script("u1", Behaviour(connect=mode))
        c = yield connect_raw(server.listen(account="u1"))
        yield c.lost
        assert c.received == b""
    server.script("u1", Behaviour(connect="silent"))
    c = yield connect_raw(server.listen(account="u1"))
    with pytest.raises(defer.TimeoutError):
        yield c.until(rb"\r\n", timeout=0.3)
    assert c.received == b"" and len(server.open_connections("u1")) == 1
    c.transport.abortConnection()


@pytest_twisted.inlineCallbacks
def test_default_script_applies_to_unbound_ports(server):
    server.script(None, Behaviour(greeting_delay=0.3))
    port = server.listen()
    started = time.monotonic()
    c = yield connect_raw(port)
    yield c.until(rb"\* OK [^\r\n]*\r\n")
    assert 0.25 < time.monotonic() - started < 2
    c.transport.abortConnection()


@pytest_twisted.inlineCallbacks
def test_no_bad_bye_and_truncate_faults(server):
    server.script("u1", Behaviour(faults=(
        Fault("SELECT", "no", b"[NONEXISTENT] gone", nth=1),
        Fault("EXAMINE", "bad"),
        Fault("UID SEARCH", "truncate"),
        Fault("NOOP", "bye", b"shutting down"),
    )))
    c = yield connect_raw(server.listen())
    yield c.until(rb"\* OK [^\r\n]*\r\n")
    yield c.command(b"a1", b'LOGIN u1 "secret \\"pw\\""')
    out = yield c.command(b"a2", b"SELECT INBOX")
    assert out == b"a2 NO [NONEXISTENT] gone\r\n"
    out = yield c.command(b"a3", b"SELECT INBOX")  # nth=1: only the first
    assert b"a3 OK" in out
    out = yield c.command(b"a4", b"EXAMINE INBOX")
    assert out.startswith(b"a4 BAD")
    out = yield c.command(b"a5", b"UID SEARCH ALL")
    assert out == b"* SEARC\r\na5 OK done\r\n"
    c.transport.write(b"a6 NOOP\r\n")
    yield c.lost
    assert c.buffer == b"* BYE shutting down\r\n"
    assert [x.name for x in server.commands("u1")] == [
        "LOGIN", "SELECT", "SELECT", "EXAMINE", "UID SEARCH", "NOOP"]


@pytest_twisted.inlineCallbacks
def test_drop_in_the_middle_of_a_fetch_literal(server):
    big = sample_message(9, "u1", size=20000)
    server.mailbox("u1").append(big)
    server.script("u1", Behaviour(faults=(Fault("UID FETCH", "drop", after_bytes=5000),)))
    c = yield connect_raw(server.listen())
    yield c.until(rb"\* OK [^\r\n]*\r\n")
    yield c.command(b"a1", b'LOGIN u1 "secret \\"pw\\""')
    yield c.command(b"a2", b"SELECT INBOX")
    c.transport.write(b"a3 UID FETCH 4 (UID BODY.PEEK[])\r\n")
    yield c.lost
    assert len(c.buffer) == 5000
    assert c.buffer.startswith(b"* 4 FETCH (UID 4 BODY[] {%d}\r\n" % len(big))


@pytest_twisted.inlineCallbacks
def test_garbage_replace_inject_and_silent_logout(server):
    server.script("u1", Behaviour(faults=(
        Fault("CAPABILITY", "garbage"),
        Fault("NOOP", "replace", b"* 1 FETCH (UID {5}\r\nab\r\n$TAG OK fine\r\n"),
        Fault("CHECK", "inject", b"* 99 EXISTS\r\n"),
        Fault("LOGOUT", "silent"),
    )))
    c = yield connect_raw(server.listen(account="u1"))
    yield c.until(rb"\* OK [^\r\n]*\r\n")
    c.transport.write(b"a0 CAPABILITY\r\n")
    out = yield c.until(re.escape(mockimap.GARBAGE))
    assert out == mockimap.GARBAGE
    yield c.command(b"a1", b'LOGIN u1 "secret \\"pw\\""')
    yield c.command(b"a2", b"SELECT INBOX")
    out = yield c.command(b"a3", b"NOOP")
    assert out == b"* 1 FETCH (UID {5}\r\nab\r\na3 OK fine\r\n"
    out = yield c.command(b"a4", b"CHECK")
    assert out == b"* 99 EXISTS\r\na4 OK NOOP completed\r\n"
    with pytest.raises(defer.TimeoutError):
        yield c.command(b"a5", b"LOGOUT", timeout=0.3)
    assert server.open_connections()
    c.transport.abortConnection()


@pytest_twisted.inlineCallbacks
def test_trickle_sends_at_the_set_rate(server):
    raw = sample_message(1, "u1", size=1000)
    server.mailbox("u1").append(raw)
    server.script("u1", Behaviour(faults=(Fault("UID FETCH", "trickle", rate=2000),)))
    c = yield connect_raw(server.listen())
    yield c.until(rb"\* OK [^\r\n]*\r\n")
    yield c.command(b"a1", b'LOGIN u1 "secret \\"pw\\""')
    yield c.command(b"a2", b"SELECT INBOX")
    started = time.monotonic()
    out = yield c.command(b"a3", b"UID FETCH 4 BODY.PEEK[]")
    elapsed = time.monotonic() - started
    assert raw in out
    expected = len(out) / 2000.0
    assert expected * 0.8 < elapsed < expected * 2 + 0.3, (elapsed, expected)
    c.transport.abortConnection()


@pytest_twisted.inlineCallbacks
def test_search_override_uidvalidity_per_session_and_connection_limit(server):
    server.script("u1", Behaviour(search_uids=tuple(range(1, 5001)), uidvalidity=(5, 6),
                                  max_connections=1))
    port = server.listen()
    seen = []
    for _ in range(2):
        c = yield connect_raw(port)
        yield c.until(rb"\* OK [^\r\n]*\r\n")
        yield c.command(b"a1", b'LOGIN u1 "secret \\"pw\\""')
        out = yield c.command(b"a2", b"SELECT INBOX")
        seen.append(int(re.search(rb"UIDVALIDITY (\d+)", out).group(1)))
        out = yield c.command(b"a3", b"UID SEARCH UNSEEN")
        assert out.split(b"\r\n")[0].split()[2:] == [b"%d" % i for i in range(1, 5001)]
        # a second session of the same user while this one is logged in
        other = yield connect_raw(port)
        yield other.until(rb"\* OK [^\r\n]*\r\n")
        out = yield other.command(b"b1", b'LOGIN u1 "secret \\"pw\\""')
        assert b"b1 NO [LIMIT]" in out
        other.transport.abortConnection()
        yield c.command(b"a4", b"LOGOUT")
        yield c.lost
    assert seen == [5, 6]
    assert server.connection_count("u1") == 4


@pytest_twisted.inlineCallbacks
def test_starttls_login_disabled_and_implicit_tls(server):
    tlsca = pytest.importorskip("tests.support.tlsca")
    from twisted.internet import ssl

    pki = tlsca.files()
    server.tls = (pki.localhost.cert, pki.localhost.key)
    server.script(None, Behaviour(starttls=True, login_disabled=True))
    c = yield connect_raw(server.listen())
    greeting = yield c.until(rb"\* OK [^\r\n]*\r\n")
    assert b"STARTTLS" in greeting and b"LOGINDISABLED" in greeting
    out = yield c.command(b"a1", b"LOGIN u1 x")
    assert b"a1 NO [PRIVACYREQUIRED]" in out
    c.transport.abortConnection()

    trust = ssl.Certificate.loadPEM(pki.ca_pem)
    client = yield connect_imap4(server.listen())
    yield task.deferLater(reactor, 0.05, lambda: None)
    yield client.startTLS(ssl.optionsForClientTLS("localhost", trustRoot=trust))
    caps = yield client.getCapabilities(useCache=False)
    assert b"STARTTLS" not in caps and b"LOGINDISABLED" not in caps
    yield client.login(b"u1", b'secret "pw"')
    yield client.logout()

    port = server.listen(implicit_tls=True)
    endpoint = endpoints.wrapClientTLS(
        ssl.optionsForClientTLS("localhost", trustRoot=trust),
        endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    c = yield endpoints.connectProtocol(endpoint, RawClient(reactor))
    yield c.until(rb"\* OK [^\r\n]*\r\n")
    out = yield c.command(b"a1", b'LOGIN u1 "secret \\"pw\\""')
    assert b"a1 OK" in out
    c.transport.loseConnection()
    yield server.all_closed()
    assert [r.tls for r in server.connections] == [False, True, True]


def test_runs_in_its_own_process():
    from tests.support.redis_server import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.mockimap", "--port", str(port),
         "--accounts", "3", "--messages", "2"],
        stdout=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert b"listening" in proc.stdout.readline()
        import imaplib

        imap = imaplib.IMAP4("127.0.0.1", port, timeout=5)
        imap.login("user3", "password")
        typ, data = imap.select("INBOX")
        assert (typ, data) == ("OK", [b"2"])
        typ, data = imap.uid("FETCH", "2", "(BODY.PEEK[])")
        assert data[0][1] == sample_message(2, "user3")
        with pytest.raises(imaplib.IMAP4.error):
            imaplib.IMAP4("127.0.0.1", port, timeout=5).login("user4", "password")
        imap.logout()
    finally:
        proc.terminate()
        proc.wait(10)
