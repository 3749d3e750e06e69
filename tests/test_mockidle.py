"""IDLE in the mock IMAP server (tests/support/mockimap.py): what the held
connection tests rely on, checked with a raw client on loopback."""

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from tests.support import mockimap
from tests.support.mockimap import (
    IDLE_CAPABILITIES, Behaviour, IdleBehaviour, MockIMAPServer, MockMailbox, sample_message)


@pytest.fixture
def server():
    s = MockIMAPServer(reactor, {"u1": MockMailbox("pw", [sample_message(1, "u1")]),
                                 "u2": MockMailbox("pw")})
    s.script(None, Behaviour(capabilities=IDLE_CAPABILITIES))
    yield s
    pytest_twisted.blockon(s.stop())


@pytest_twisted.inlineCallbacks
def selected(server, user="u1"):
    c = yield mockimap.connect_raw(reactor, server.listen())
    greeting = yield c.until(rb"\* OK [^\r\n]*\r\n")
    yield c.command(b"a1", b"LOGIN " + user.encode() + b" pw")
    yield c.command(b"a2", b"SELECT INBOX")
    return c, greeting


@pytest_twisted.inlineCallbacks
def test_idle_pushes_exists_and_ends_with_done(server):
    c, greeting = yield selected(server)
    assert b" IDLE" in greeting
    c.transport.write(b"a3 IDLE\r\n")
    yield c.until(rb"\+ idling\r\n")
    assert server.idling("u1") == 1
    uid = server.deliver("u1", sample_message(2, "u1"))
    assert uid == 2
    out = yield c.until(rb"\* \d+ EXISTS\r\n")
    assert out.endswith(b"* 2 EXISTS\r\n")
    server.deliver("u2", sample_message(1, "u2"))  # another user's mail: nothing here
    c.transport.write(b"DONE\r\n")
    out = yield c.until(rb"a3 OK[^\r\n]*\r\n")
    assert b"EXISTS" not in out
    assert server.idling() == 0
    out = yield c.command(b"a4", b"UID SEARCH UNSEEN")
    assert b"* SEARCH 1 2\r\n" in out


@pytest_twisted.inlineCallbacks
def test_idle_refused_when_not_advertised(server):
    server.script("u2", Behaviour())  # no IDLE capability
    c, _ = yield selected(server, "u2")
    out = yield c.command(b"a3", b"IDLE")
    assert b"a3 BAD" in out


@pytest_twisted.inlineCallbacks
def test_idle_drop_with_bye_after_n_seconds(server):
    server.script_idle("u1", IdleBehaviour(drop_after=0.2, drop_with="bye"))
    c, _ = yield selected(server)
    c.transport.write(b"a3 IDLE\r\n")
    yield c.until(rb"\+ idling\r\n")
    out = yield c.until(rb"\* BYE [^\r\n]*\r\n")
    assert b"Disconnected for inactivity" in out
    yield c.lost


@pytest_twisted.inlineCallbacks
def test_idle_drop_by_closing(server):
    server.script_idle(None, IdleBehaviour(drop_after=0.1))
    c, _ = yield selected(server)
    c.transport.write(b"a3 IDLE\r\n")
    yield c.until(rb"\+ idling\r\n")
    yield c.lost
    assert b"BYE" not in c.buffer


@pytest_twisted.inlineCallbacks
def test_silent_mid_idle_answers_nothing_and_stays_open(server):
    server.script_idle("u1", IdleBehaviour(silent=True))
    c, _ = yield selected(server)
    c.transport.write(b"a3 IDLE\r\n")
    yield c.until(rb"\+ idling\r\n")
    server.deliver("u1", sample_message(2, "u1"))
    c.transport.write(b"DONE\r\na4 NOOP\r\n")
    yield task.deferLater(reactor, 0.3, lambda: None)
    assert c.buffer == b""
    assert len(server.open_connections("u1")) == 1


@pytest_twisted.inlineCallbacks
def test_goes_silent_after_n_seconds(server):
    server.script_idle("u1", IdleBehaviour(drop_after=0.1, drop_with="silent"))
    c, _ = yield selected(server)
    c.transport.write(b"a3 IDLE\r\n")
    yield c.until(rb"\+ idling\r\n")
    yield task.deferLater(reactor, 0.2, lambda: None)
    c.transport.write(b"DONE\r\n")
    yield task.deferLater(reactor, 0.2, lambda: None)
    assert c.buffer == b""


@pytest_twisted.inlineCallbacks
def test_too_many_connections_refuses_login(server):
    server.script("u1", Behaviour(capabilities=IDLE_CAPABILITIES, max_connections=1))
    c1, _ = yield selected(server)
    c2 = yield mockimap.connect_raw(reactor, server.listen())
    yield c2.until(rb"\* OK [^\r\n]*\r\n")
    out = yield c2.command(b"b1", b"LOGIN u1 pw")
    assert b"b1 NO [LIMIT] Too many" in out


@pytest_twisted.inlineCallbacks
def test_something_else_than_done_is_bad(server):
    c, _ = yield selected(server)
    c.transport.write(b"a3 IDLE\r\n")
    yield c.until(rb"\+ idling\r\n")
    c.transport.write(b"a4 NOOP\r\n")
    out = yield c.until(rb"a3 BAD[^\r\n]*\r\n")
    assert b"Expected DONE" in out


@pytest_twisted.inlineCallbacks
def test_control_channel_delivers_and_pushes_exists(server):
    from twisted.internet import endpoints

    c, _ = yield selected(server)
    c.transport.write(b"a3 IDLE\r\n")
    yield c.until(rb"\+ idling\r\n")
    listening = mockimap.listen_control(reactor, server, 0)
    ctl = yield endpoints.connectProtocol(
        endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", listening.getHost().port),
        mockimap.RawClient(reactor))
    ctl.transport.write(b"DELIVER u1\nDELIVER nobody\nHELLO\n")
    out = yield ctl.until(rb"BAD\n")
    assert out == b"OK 2\nNO unknown user\nBAD\n"
    yield c.until(rb"\* 2 EXISTS\r\n")
    ctl.transport.loseConnection()
    yield listening.stopListening()


@pytest_twisted.inlineCallbacks
def test_mail_between_idles_is_announced_when_the_next_idle_starts(server):
    c, _ = yield selected(server)
    server.deliver("u1", sample_message(2, "u1"))  # selected, not idling
    c.transport.write(b"a3 IDLE\r\n")
    out = yield c.until(rb"\* \d+ EXISTS\r\n")
    assert out == b"+ idling\r\n* 2 EXISTS\r\n"
    c.transport.write(b"DONE\r\n")
    yield c.until(rb"a3 OK[^\r\n]*\r\n")
    c.transport.write(b"a4 IDLE\r\n")
    yield c.until(rb"\+ idling\r\n")
    yield task.deferLater(reactor, 0.1, lambda: None)
    assert c.buffer == b""  # announced once
