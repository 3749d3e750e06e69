"""LOGIN and the poll's STATUS written together (RFC 3501 sec 5.5), on the mock server.

The daemon's sessions share one :class:`~fido_tx.sources.imap.connect.Connector`:
once a server's LOGIN answer carried its capabilities, the next sessions
write STATUS behind LOGIN, and LOGOUT is written without waiting for its
answer.  These tests run sessions with one shared connector and check what
the server received, in which order, and that a refused LOGIN lets the
pipelined STATUS do nothing.
"""

import pytest_twisted
from twisted.internet import reactor

from fido_tx import errors
from fido_tx.accounts.model import Account
from fido_tx.config import ImapSettings
from fido_tx.sources.imap.connect import Connector
from fido_tx.sources.imap.session import ImapSession
from fido_tx.testing import MemorySink
from tests.support.mockimap import MockIMAPServer, MockMailbox, sample_message

PASSWORD = "secret-pw"
SETTINGS = ImapSettings(connect_timeout=2.0, greeting_timeout=2.0, command_timeout=2.0,
                        logout_timeout=1.0)


def account(port, password=PASSWORD):
    return Account(id="acct-u", host="127.0.0.1", port=port, username="u",
                   password=password, security="none")


def session(acct, connector, sink):
    return ImapSession(reactor, acct, sink, SETTINGS, connector=connector)


def names(server, start=0):
    return [c.name for c in server.commands("u")[start:]]


@pytest_twisted.inlineCallbacks
def test_second_session_writes_status_with_login_and_polls_the_same():
    box = MockMailbox(PASSWORD, [sample_message(1, "u")], uidvalidity=7)
    server = MockIMAPServer(reactor, {"u": box})
    acct = account(server.listen())
    connector, sink = Connector(reactor), MemorySink()
    try:
        first = session(acct, connector, sink)
        result = yield first.poll()
        assert result.ok and result.fetched == 1, result
        assert not first.pipelined  # nothing known of the server yet
        assert connector.pipelines_login(acct)  # its LOGIN answer had CAPABILITY
        yield server.all_closed()
        before = len(server.commands("u"))
        box.append(sample_message(2, "u"))
        second = session(acct, connector, sink)
        result = yield second.poll()
        assert result.ok and result.fetched == 1, result
        assert second.pipelined
        yield server.all_closed()
        assert names(server, before) == ["LOGIN", "STATUS", "SELECT", "UID SEARCH",
                                         "UID FETCH", "UID FETCH", "UID STORE", "LOGOUT"]
        # an empty poll: LOGIN+STATUS, then LOGOUT (written, not waited for)
        before = len(server.commands("u"))
        result = yield session(acct, connector, sink).poll()
        assert result.ok and result.fetched == 0, result
        yield server.all_closed()
        assert names(server, before) == ["LOGIN", "STATUS", "LOGOUT"]
        assert sorted(int(m.id) for m in sink.entries) == [1, 2]
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_a_refused_login_with_status_behind_it_is_an_auth_error_and_selects_nothing():
    box = MockMailbox(PASSWORD, [sample_message(1, "u")], uidvalidity=7)
    server = MockIMAPServer(reactor, {"u": box})
    port = server.listen()
    connector, sink = Connector(reactor), MemorySink()
    try:
        result = yield session(account(port), connector, MemorySink()).poll()
        assert result.ok
        yield server.all_closed()
        before = len(server.commands("u"))
        bad = session(account(port, password="wrong"), connector, sink)
        result = yield bad.poll()
        assert bad.pipelined
        assert result.kind == errors.AUTH, result
        assert "wrong" not in result.debug and "wrong" not in result.message
        yield server.all_closed()
        assert names(server, before) == ["LOGIN", "STATUS", "LOGOUT"]
        assert sink.entries == []
        assert connector.pipelines_login(account(port))  # the server did nothing wrong
    finally:
        yield server.stop()


class _Swapper(__import__("twisted.internet.protocol", fromlist=["Protocol"]).Protocol):
    """Answers a SELECT and the command that came in the same packet in the
    wrong order (a server that mixes up pipelined commands); one message
    unseen, none found."""

    def connectionMade(self):
        self.transport.write(b"* OK [CAPABILITY IMAP4rev1] hi\r\n")

    def dataReceived(self, data):
        held = None
        for line in data.split(b"\r\n"):
            if not line:
                continue
            tag, _, rest = line.partition(b" ")
            verb = rest.split(b" ", 1)[0].upper()
            if verb == b"LOGIN":
                answer = tag + b" OK [CAPABILITY IMAP4rev1] in\r\n"
            elif verb == b"STATUS":
                answer = b"* STATUS INBOX (UNSEEN 1)\r\n" + tag + b" OK done\r\n"
            elif verb == b"SELECT":
                held = (b"* FLAGS (\\Seen)\r\n* OK [PERMANENTFLAGS (\\Seen \\*)] ok\r\n"
                        b"* OK [UIDVALIDITY 3] ok\r\n" + tag + b" OK selected\r\n")
                continue
            elif verb == b"UID":
                answer = b"* SEARCH\r\n" + tag + b" OK found\r\n"
            elif verb == b"LOGOUT":
                answer = b"* BYE bye\r\n" + tag + b" OK out\r\n"
            else:
                answer = tag + b" OK\r\n"
            self.transport.write(answer)
        if held is not None:
            self.transport.write(held)


@pytest_twisted.inlineCallbacks
def test_a_server_that_mixes_up_pipelined_commands_is_never_sent_them_again():
    from twisted.internet import protocol

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(_Swapper), interface="127.0.0.1")
    acct = account(port.getHost().port)
    connector = Connector(reactor)
    try:
        first = yield session(acct, connector, MemorySink()).poll()
        assert first.kind == errors.PROTOCOL and "mixed up" in first.message, first
        assert not connector.pipelines(acct) and not connector.pipelines_login(acct)
        second = session(acct, connector, MemorySink())
        result = yield second.poll()
        assert result.ok and result.fetched == 0, result  # SELECT, then SEARCH
        assert not second.pipelined
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_no_status_after_a_poll_that_found_mail_and_status_again_after_one_that_did_not():
    from fido_tx.sources.imap.identity import Epochs

    box = MockMailbox(PASSWORD, [sample_message(1, "u")], uidvalidity=7)
    server = MockIMAPServer(reactor, {"u": box})
    acct = account(server.listen())
    connector, sink, epochs = Connector(reactor), MemorySink(), Epochs()

    def poll():
        s = ImapSession(reactor, acct, sink, SETTINGS, connector=connector, epochs=epochs)
        return s, s.poll()

    try:
        first, d = poll()
        assert first.wants_status()  # nothing known of the mailbox yet
        result = yield d
        assert result.ok and result.fetched == 1, result
        yield server.all_closed()
        # it found mail: STATUS would decide nothing, SELECT and SEARCH follow
        box.append(sample_message(2, "u"))
        before = len(server.commands("u"))
        second, d = poll()
        assert not second.wants_status()
        result = yield d
        assert result.ok and result.fetched == 1, result
        yield server.all_closed()
        assert names(server, before) == ["LOGIN", "SELECT", "UID SEARCH", "UID FETCH",
                                         "UID FETCH", "UID STORE", "LOGOUT"]
        # it found mail again; this one finds nothing
        before = len(server.commands("u"))
        result = yield poll()[1]
        assert result.ok and result.fetched == 0, result
        yield server.all_closed()
        assert names(server, before) == ["LOGIN", "SELECT", "UID SEARCH", "LOGOUT"]
        # so the next one asks STATUS again (with LOGIN), which ends it
        before = len(server.commands("u"))
        third, d = poll()
        assert third.wants_status()
        result = yield d
        assert result.ok and result.fetched == 0, result
        yield server.all_closed()
        assert names(server, before) == ["LOGIN", "STATUS", "LOGOUT"]
        assert sorted(int(m.id) for m in sink.entries) == [1, 2]
    finally:
        yield server.stop()


def test_an_account_with_a_position_always_asks_status():
    from fido_tx.sources.imap.identity import Epochs

    epochs = Epochs()
    for fields in ({"select": "new"}, {"start_from": "now"}):
        acct = Account(id="acct-p", host="127.0.0.1", port=1, username="u",
                       password=PASSWORD, security="none", **fields)
        epochs.seen(acct.id, acct.mailbox, "7", found=True)
        s = ImapSession(reactor, acct, MemorySink(), SETTINGS, epochs=epochs)
        assert s.wants_status(), fields
    plain = account(1)
    epochs.seen(plain.id, plain.mailbox, "7", found=True)
    assert not ImapSession(reactor, plain, MemorySink(), SETTINGS, epochs=epochs).wants_status()
