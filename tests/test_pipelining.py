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
