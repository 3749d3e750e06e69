"""Mailbox sessions (fido_tx.sources.imap.session) against Twisted's own IMAP4Server.

The server runs over real loopback TCP with an in-memory mailbox; the tests
check what the session did on both sides: the sink's entries and the server's
flags and messages, and the command lines the server received.
"""


import pytest
import pytest_twisted
from twisted.cred import checkers, portal
from twisted.internet import defer, protocol
from twisted.mail import imap4
from zope.interface import implementer

from fido_tx import errors
from fido_tx.sources.imap import session as imap
from fido_tx.demo import memimap
from fido_tx.accounts.model import Account
from fido_tx.config import ImapSettings
from fido_tx.sources.imap.connect import Connector, TlsContexts
from fido_tx.sinks.message import Delivery
from fido_tx.testing import MemorySink

def redis_down():
    """What a Redis sink fails with while Redis is down (its own kind)."""
    return errors.FidoError(errors.REDIS, "Redis is not connected")


USER, PASSWORD = "fido@example.test", 'pa"ss\\word'

# --- an in-memory IMAP server ---------------------------------------------------


class FakeMailbox(memimap.MemoryMailbox):
    """The package's in-memory mailbox, announcing only the flags these tests
    need (no ``\\*``, but the too-large keyword) and a fixed UIDVALIDITY."""

    def __init__(self, flags=("\\Seen", "\\Deleted", "$FidoTooLarge"), uidvalidity=42):
        super().__init__(flags=flags, uidvalidity=uidvalidity)


@implementer(portal.IRealm)
class Realm:
    def __init__(self, account):
        self.account = account

    def requestAvatar(self, avatarId, mind, *interfaces):
        return imap4.IAccount, self.account, lambda: None


class RecordingServer(imap4.IMAP4Server):
    """IMAP4Server that records the lines it receives."""

    def lineReceived(self, line):
        self.factory.received.append(line)
        parts = line.split(b" ")
        refused = self.factory.refuse.get(parts[1].upper() if len(parts) > 1 else b"")
        if refused is not None:  # answer this command with NO or BAD, as told
            self.sendLine(parts[0] + b" " + refused + b" not here")
            return None
        return super().lineReceived(line)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.factory.lost_one()


class ServerFactory(protocol.Factory):
    def __init__(self, mailboxes, tls=None):
        self.received = []
        self.account = imap4.MemoryAccount(USER)
        for name, mbox in mailboxes.items():
            self.account.addMailbox(name, mbox)
        checker = checkers.InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(USER.encode(), PASSWORD.encode())
        self.portal = portal.Portal(Realm(self.account), [checker])
        self.tls = tls
        self.connections = 0
        self.refuse = {}  # command name -> b"NO" / b"BAD"
        self.closed = 0
        self._waiting_closed = []

    def lost_one(self):
        self.closed += 1
        if self.closed == self.connections:
            waiting, self._waiting_closed = self._waiting_closed, []
            for d in waiting:
                d.callback(None)

    def all_closed(self):
        """Fires once every connection the server took is closed (Fido
        writes LOGOUT and closes without waiting for the answer)."""
        if self.closed == self.connections:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting_closed.append(d)
        return d

    def buildProtocol(self, addr):
        self.connections += 1
        p = RecordingServer(
            chal={b"PLAIN": imap4.PLAINCredentials}, contextFactory=self.tls
        )
        p.portal = self.portal
        p.factory = self
        return p

    def commands(self):
        """Received command names (second word), e.g. ['CAPABILITY', 'LOGIN', ...]."""
        out = []
        for line in self.received:
            parts = line.split(b" ")
            if len(parts) >= 2:
                name = parts[1].upper()
                if name == b"UID" and len(parts) > 2:
                    name += b" " + parts[2].upper()
                out.append(name.decode())
        return out


@pytest.fixture
def server():
    """Start a server on a free loopback port; yields a function returning the factory."""
    from twisted.internet import reactor

    ports = []

    def start(mailboxes, tls=None):
        factory = ServerFactory(mailboxes, tls)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        factory.port = port.getHost().port
        factory.listening = port
        return factory

    yield start
    for p in ports:
        p.stopListening()


def account(port, **kw):
    fields = dict(id="acme", host="127.0.0.1", port=port, username=USER,
                  password=PASSWORD, security="none")
    fields.update(kw)
    return Account(**fields)


FAST = ImapSettings(connect_timeout=5, greeting_timeout=5, command_timeout=5,
                    logout_timeout=2)


def run(acct, sink, settings=FAST, dry_run=False, connector=None):
    from twisted.internet import reactor

    return imap.fetch_mailbox(reactor, acct, sink, settings, dry_run=dry_run,
                              connector=connector)


def message(n, body=b"hello", extra=b""):
    return (b"From: a@example.test\r\nMessage-ID: <m%d@example.test>\r\n" % n
            + extra + b"Subject: test %d\r\n\r\n" % n + body + b"\r\n")


# --- tests ------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_happy_path_stores_exact_bytes_and_marks_seen(server):
    box = FakeMailbox()
    odd = b"8-bit \xe9\xff and NUL \x00 bytes\r\nbare LF\n and CR\r end"
    raws = [message(1), message(2, odd), b"no header end at all \x80"]
    for raw in raws:
        box.add(raw)
    seen = box.add(message(9), flags=["\\Seen"])
    srv = server({"INBOX": box})
    sink = MemorySink()
    result = yield run(account(srv.port), sink)
    assert result.ok, (result.kind, result.message, result.debug)
    assert [m.raw for m in sink.entries] == raws
    assert [int(m.id) for m in sink.entries] == [1, 2, 3]
    assert [m.message_id for m in sink.entries] == ["<m1@example.test>", "<m2@example.test>", ""]
    assert {m.epoch for m in sink.entries} == {"42"}
    assert {m.source for m in sink.entries} == {"imap"}
    assert {m.mailbox for m in sink.entries} == {"INBOX"}
    assert result.fetched == 3 and result.marked == 3
    assert result.bytes == sum(len(r) for r in raws)
    assert all("\\Seen" in box.by_uid(u).flags for u in (1, 2, 3))
    assert seen == 4 and len(box.messages) == 4
    yield srv.all_closed()
    assert "LOGOUT" in srv.commands()
    assert any(b"BODY.PEEK[]" in line for line in srv.received)
    assert result.seconds >= 0 and not result.dry_run


@pytest_twisted.inlineCallbacks
def test_nothing_unseen_is_found_by_status_without_selecting(server):
    box = FakeMailbox()
    box.add(message(1), flags=["\\Seen"])
    srv = server({"INBOX": box})
    sink = MemorySink()
    result = yield run(account(srv.port), sink)
    assert result.ok and result.fetched == 0, result.debug
    yield srv.all_closed()
    commands = srv.commands()
    assert "STATUS" in commands
    assert "SELECT" not in commands and "SEARCH" not in " ".join(commands)
    assert commands[-1] == "LOGOUT"


@pytest_twisted.inlineCallbacks
def test_unseen_mail_reported_by_status_is_fetched(server):
    box = FakeMailbox()
    box.add(message(1), flags=["\\Seen"])
    box.add(message(2))
    srv = server({"INBOX": box})
    sink = MemorySink()
    result = yield run(account(srv.port), sink)
    assert result.ok and result.fetched == 1, result.debug
    assert [int(m.id) for m in sink.entries] == [2]
    assert srv.commands().index("STATUS") < srv.commands().index("SELECT")


@pytest_twisted.inlineCallbacks
def test_a_server_refusing_status_is_polled_with_select(server):
    """STATUS is an optimization: NO or BAD to it must never cost mail."""
    for answer in (b"NO", b"BAD"):
        box = FakeMailbox()
        box.add(message(1))
        srv = server({"INBOX": box})
        srv.refuse[b"STATUS"] = answer
        sink = MemorySink()
        result = yield run(account(srv.port), sink)
        assert result.ok and result.fetched == 1, (answer, result.debug)
        assert "STATUS" in srv.commands() and "SELECT" in srv.commands()


@pytest_twisted.inlineCallbacks
def test_batches_by_count_and_by_bytes(server):
    box = FakeMailbox()
    for n in range(7):
        box.add(message(n, b"x" * 1000))
    box.add(message(99, b"y" * 5000))  # larger than batch_bytes: its own batch
    box.add(message(100))
    srv = server({"INBOX": box})
    sink = MemorySink()
    settings = ImapSettings(command_timeout=5, batch_messages=3, batch_bytes=3000)
    result = yield run(account(srv.port), sink, settings)
    assert result.ok, result.debug
    stores = [tuple(map(int, c[1])) for c in sink.calls if c[0] == "deliver"]
    # 7 x ~1090 bytes: at most 2 fit in 3000 bytes
    assert stores == [(1, 2), (3, 4), (5, 6), (7,), (8,), (9,)]
    settings = ImapSettings(command_timeout=5, batch_messages=2, batch_bytes=10**6)
    box2 = FakeMailbox()
    for n in range(5):
        box2.add(message(n))
    srv2 = server({"INBOX": box2})
    sink2 = MemorySink()
    result = yield run(account(srv2.port), sink2, settings)
    assert [tuple(map(int, c[1])) for c in sink2.calls if c[0] == "deliver"] == [
        (1, 2), (3, 4), (5,)]
    assert result.fetched == 5


@pytest_twisted.inlineCallbacks
def test_already_stored_uids_are_marked_without_fetching(server):
    box = FakeMailbox()
    for n in range(3):
        box.add(message(n))
    srv = server({"INBOX": box})
    sink = MemorySink()
    sink._keys.add(("acme", "INBOX", "42", "2"))  # stored before a crash, never marked
    result = yield run(account(srv.port), sink)
    assert result.ok, result.debug
    assert [int(m.id) for m in sink.entries] == [1, 3]
    assert result.fetched == 2 and result.marked == 3
    assert all("\\Seen" in m.flags for m in box.messages)
    fetch_lines = [line for line in srv.received if b"BODY.PEEK" in line]
    assert fetch_lines and all(b" 2 " not in line and b"1:3" not in line for line in fetch_lines)


@pytest_twisted.inlineCallbacks
def test_sink_failure_marks_nothing(server):
    box = FakeMailbox()
    for n in range(3):
        box.add(message(n))
    srv = server({"INBOX": box})

    class FailingStore(MemorySink):
        def deliver(self, messages):
            self.calls.append(("deliver", tuple(m.id for m in messages)))
            return defer.fail(redis_down())

    sink = FailingStore()
    result = yield run(account(srv.port), sink)
    assert result.kind == errors.REDIS
    assert result.fetched == 0 and result.marked == 0
    assert all("\\Seen" not in m.flags for m in box.messages)
    assert "UID STORE" not in srv.commands()
    assert len([c for c in sink.calls if c[0] == "deliver"]) == 1  # stopped at once


@pytest_twisted.inlineCallbacks
def test_sink_filter_failure_is_redis(server):
    box = FakeMailbox()
    box.add(message(1))
    srv = server({"INBOX": box})
    sink = MemorySink()
    sink.fail = redis_down()
    result = yield run(account(srv.port), sink)
    assert result.kind == errors.REDIS
    assert "BODY.PEEK" not in b"".join(srv.received).decode("latin-1")


@pytest_twisted.inlineCallbacks
def test_select_no_is_mailbox_error(server):
    srv = server({"INBOX": FakeMailbox()})
    result = yield run(account(srv.port, mailbox="Nope"), MemorySink())
    assert result.kind == errors.MAILBOX
    assert "Nope" in result.message
    assert "127.0.0.1:%d" % srv.port in result.debug


@pytest_twisted.inlineCallbacks
def test_login_no_is_auth_error_and_password_not_in_debug(server):
    srv = server({"INBOX": FakeMailbox()})
    result = yield run(account(srv.port, password="wrong-secret"), MemorySink())
    assert result.kind == errors.AUTH
    assert "LOGIN failed" in result.message
    assert "wrong-secret" not in result.debug
    assert "LOGIN <redacted>" in result.debug


@pytest_twisted.inlineCallbacks
def test_authenticate_plain(server):
    box = FakeMailbox()
    box.add(message(1))
    srv = server({"INBOX": box})
    result = yield run(account(srv.port, auth="plain"), MemorySink())
    assert result.ok, result.debug
    assert "AUTHENTICATE" in srv.commands() and "LOGIN" not in srv.commands()
    result = yield run(account(srv.port, auth="plain", password="bad"), MemorySink())
    assert result.kind == errors.AUTH


@pytest_twisted.inlineCallbacks
def test_starttls_required_but_not_offered(server):
    srv = server({"INBOX": FakeMailbox()})
    result = yield run(account(srv.port, security="starttls"), MemorySink())
    assert result.kind == errors.TLS
    assert "STARTTLS" in result.message
    assert "LOGIN" not in srv.commands() and "AUTHENTICATE" not in srv.commands()
    assert not any(PASSWORD.encode() in line for line in srv.received)


@pytest_twisted.inlineCallbacks
def test_dry_run_changes_nothing(server):
    box = FakeMailbox()
    for n in range(3):
        box.add(message(n))
    srv = server({"INBOX": box})
    sink = MemorySink()
    result = yield run(account(srv.port), sink, dry_run=True)
    assert result.ok and result.dry_run
    assert result.fetched == 3 and result.marked == 0
    assert result.bytes == sum(m.getSize() for m in box.messages)
    assert not [c for c in sink.calls if c[0] == "deliver"]
    assert all(not m.flags for m in box.messages)
    assert "EXAMINE" in srv.commands() and "SELECT" not in srv.commands()
    assert "UID STORE" not in srv.commands()
    assert not any(b"BODY" in line for line in srv.received)


@pytest_twisted.inlineCallbacks
def test_delete_without_uidplus_expunges(server):
    box = FakeMailbox()
    for n in range(3):
        box.add(message(n))
    srv = server({"INBOX": box})
    sink = MemorySink()
    result = yield run(account(srv.port, after_fetch="delete"), sink)
    assert result.ok, result.debug
    assert box.messages == []
    assert len(sink.entries) == 3
    assert "EXPUNGE" in srv.commands() and "UID EXPUNGE" not in srv.commands()


@pytest_twisted.inlineCallbacks
def test_move_without_move_capability_copies_and_expunges(server):
    box, archive = FakeMailbox(), FakeMailbox()
    for n in range(2):
        box.add(message(n))
    srv = server({"INBOX": box, "Done/Ärchiv": archive})
    sink = MemorySink()
    result = yield run(account(srv.port, after_fetch="move:Done/Ärchiv"), sink)
    assert result.ok, result.debug
    assert box.messages == []
    assert [m.raw for m in archive.messages] == [e.raw for e in sink.entries]
    assert "UID COPY" in srv.commands() and "UID MOVE" not in srv.commands()
    assert any(b"Done/&AMQ-rchiv" in line for line in srv.received)


@pytest_twisted.inlineCallbacks
def test_oversized_message_skipped_and_flagged(server):
    box = FakeMailbox()
    box.add(message(1))
    big = box.add(message(2, b"z" * 5000))
    box.add(message(3))
    srv = server({"INBOX": box})
    sink = MemorySink()
    settings = ImapSettings(command_timeout=5, max_message_size=2000)
    result = yield run(account(srv.port), sink, settings)
    assert result.ok, result.debug
    assert result.too_large == (big,)
    assert [int(m.id) for m in sink.entries] == [1, 3]
    assert box.by_uid(big).flags == {"$FidoTooLarge"}
    # the next session does not even see it
    result = yield run(account(srv.port), sink, settings)
    assert result.ok and result.too_large == () and result.fetched == 0
    assert any(b"UNKEYWORD $FidoTooLarge" in line for line in srv.received)


@pytest_twisted.inlineCallbacks
def test_no_keyword_in_search_when_mailbox_has_no_keywords(server):
    box = FakeMailbox(flags=("\\Seen", "\\Deleted"))
    box.add(message(1, b"z" * 5000))
    srv = server({"INBOX": box})
    settings = ImapSettings(command_timeout=5, max_message_size=2000)
    result = yield run(account(srv.port), MemorySink(), settings)
    assert result.ok and result.too_large == (1,)
    # the search written behind SELECT asked for the keyword; SELECT's FLAGS
    # said the mailbox has none, so the search was made again without it
    searches = [line for line in srv.received if b" UID SEARCH " in line]
    assert len(searches) == 2 and b"UNKEYWORD" in searches[0], searches
    assert b"UNKEYWORD" not in searches[1]
    assert box.by_uid(1).flags == set()


@pytest_twisted.inlineCallbacks
def test_5000_uid_search_reply(server):
    box = FakeMailbox()
    for n in range(5000):
        box.add(b"Subject: %d\r\n\r\nx\r\n" % n)
    srv = server({"INBOX": box})
    sink = MemorySink()
    for n in range(1, 4999):  # all but two are stored already: mark them only
        sink._keys.add(("acme", "INBOX", "42", str(n)))
    result = yield run(account(srv.port), sink, ImapSettings(command_timeout=10))
    assert result.ok, result.debug
    assert [int(m.id) for m in sink.entries] == [4999, 5000]
    assert result.marked == 5000
    assert all("\\Seen" in m.flags for m in box.messages)


@pytest_twisted.inlineCallbacks
def test_cancel_aborts_the_connection(server):
    box = FakeMailbox()
    box.add(message(1))
    srv = server({"INBOX": box})
    gate = defer.Deferred()

    class SlowSink(MemorySink):
        def deliver(self, messages):
            self.calls.append(("deliver", tuple(m.id for m in messages)))
            return gate

    sink = SlowSink()
    d = run(account(srv.port), sink)
    for _ in range(200):
        if any(c[0] == "deliver" for c in sink.calls):
            break
        yield deferLater(0.01)
    assert any(c[0] == "deliver" for c in sink.calls)
    d.cancel()
    with pytest.raises(defer.CancelledError):
        yield d
    gate.callback(Delivery(("1",), ("1",)))  # the sink confirms late: nothing may be marked now
    yield deferLater(0.05)
    assert box.messages[0].flags == set()
    assert "UID STORE" not in srv.commands()


@pytest_twisted.inlineCallbacks
def test_connection_refused_and_dns(server):
    srv = server({"INBOX": FakeMailbox()})
    yield srv.listening.stopListening()
    result = yield run(account(srv.port), MemorySink())
    assert result.kind == errors.CONNECT, result.message
    result = yield run(account(srv.port, host="no-such-host.invalid"), MemorySink())
    assert result.kind == errors.DNS, result.message


def deferLater(seconds):
    from twisted.internet import reactor, task

    return task.deferLater(reactor, seconds, lambda: None)


# --- TLS ----------------------------------------------------------------------------


def _make_pki(directory):
    """A throwaway CA and a server certificate for DNS:localhost."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("Fido Test CA"))
        .issuer_name(name("Fido Test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False,
                          key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(pem))
    server_pem = cert.public_bytes(pem) + key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return str(ca_file), server_pem


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from twisted.internet import ssl

    ca_file, server_pem = _make_pki(tmp_path_factory.mktemp("pki"))
    pc = ssl.PrivateCertificate.loadPEM(server_pem)
    # session tickets on, as most IMAP servers have them (Twisted's default is off)
    options = ssl.CertificateOptions(privateKey=pc.privateKey.original,
                                     certificate=pc.original, enableSessionTickets=True)
    return ca_file, options


@pytest.fixture
def tls_server(pki):
    from twisted.internet import reactor

    ports = []

    def start(mailboxes, implicit=True):
        factory = ServerFactory(mailboxes, tls=None if implicit else pki[1])
        if implicit:
            port = reactor.listenSSL(0, factory, pki[1], interface="127.0.0.1")
        else:
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        factory.port = port.getHost().port
        return factory

    yield start
    for p in ports:
        p.stopListening()


@pytest_twisted.inlineCallbacks
def test_implicit_tls_with_ca_file(tls_server, pki):
    box = FakeMailbox()
    box.add(message(1))
    srv = tls_server({"INBOX": box})
    sink = MemorySink()
    acct = account(srv.port, host="localhost", security="tls", ca_file=pki[0])
    result = yield run(acct, sink)
    assert result.ok, result.debug
    assert [m.raw for m in sink.entries] == [message(1)]


@pytest_twisted.inlineCallbacks
def test_tls_host_mismatch_never_sends_password(tls_server, pki):
    srv = tls_server({"INBOX": FakeMailbox()})
    acct = account(srv.port, host="127.0.0.1", security="tls", ca_file=pki[0])
    result = yield run(acct, MemorySink())
    assert result.kind == errors.TLS, (result.kind, result.message)
    assert "does not match host '127.0.0.1'" in result.message
    assert srv.received == []


@pytest_twisted.inlineCallbacks
def test_tls_unknown_ca_is_named(tls_server):
    srv = tls_server({"INBOX": FakeMailbox()})
    acct = account(srv.port, host="localhost", security="tls")
    result = yield run(acct, MemorySink())
    assert result.kind == errors.TLS, (result.kind, result.message)
    assert "certificate verify failed" in result.message
    assert "issuer" in result.message
    assert srv.received == []


@pytest_twisted.inlineCallbacks
def test_starttls_upgrades_before_login(tls_server, pki):
    box = FakeMailbox()
    box.add(message(1))
    srv = tls_server({"INBOX": box}, implicit=False)
    sink = MemorySink()
    acct = account(srv.port, host="localhost", security="starttls", ca_file=pki[0])
    result = yield run(acct, sink)
    assert result.ok, result.debug
    assert len(sink.entries) == 1
    commands = srv.commands()
    assert commands.index("STARTTLS") < commands.index("LOGIN")
    assert commands[commands.index("STARTTLS") + 1] == "CAPABILITY"


@pytest_twisted.inlineCallbacks
def test_starttls_bad_certificate_never_sends_password(tls_server, pki):
    srv = tls_server({"INBOX": FakeMailbox()}, implicit=False)
    acct = account(srv.port, host="127.0.0.1", security="starttls", ca_file=pki[0])
    result = yield run(acct, MemorySink())
    assert result.kind == errors.TLS, (result.kind, result.message)
    assert "LOGIN" not in srv.commands()
    assert srv.commands()[-1] == "STARTTLS"


def _debug_texts(events):
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events]


@pytest.mark.parametrize("security", ["tls", "starttls"])
@pytest_twisted.inlineCallbacks
def test_tls_session_is_resumed_by_the_next_session_to_the_same_server(tls_server, pki,
                                                                       security):
    from twisted.internet import reactor
    from twisted.logger import Logger

    box = FakeMailbox()
    srv = tls_server({"INBOX": box}, implicit=security == "tls")
    acct = account(srv.port, host="localhost", security=security, ca_file=pki[0])
    connector = Connector(reactor)
    runs = []
    for n in range(2):
        events = []
        box.add(message(n + 1))
        result = yield imap.fetch_mailbox(reactor, acct, MemorySink(), FAST,
                                          log=Logger(observer=events.append),
                                          connector=connector)
        assert result.ok and result.fetched == 1, result.debug
        runs.append(_debug_texts(events))
    assert not any("resumed" in t for t in runs[0])
    resumed = [t for t in runs[1] if t.endswith(": TLS session resumed")]
    assert resumed and resumed[0].startswith("session acme s="), runs[1]
    # every debug line of one session carries the same session id
    ids = {t.split(" ")[2].rstrip(":") for t in runs[1] if t.startswith("session acme ")}
    assert len(ids) == 1 and len(ids.pop()) == len("s=3f9a2c")


@pytest_twisted.inlineCallbacks
def test_a_resumable_session_is_never_offered_to_another_host(tls_server, pki):
    """A session kept for localhost must not let 127.0.0.1 (not in the
    certificate) skip verification: it still fails before any login."""
    box = FakeMailbox()
    srv = tls_server({"INBOX": box})
    from twisted.internet import reactor

    connector = Connector(reactor)
    good = account(srv.port, host="localhost", security="tls", ca_file=pki[0])
    result = yield run(good, MemorySink(), connector=connector)
    assert result.ok, result.debug
    assert connector.tls.sessions  # kept for localhost
    bad = account(srv.port, host="127.0.0.1", security="tls", ca_file=pki[0])
    logins = srv.commands().count("LOGIN")
    result = yield run(bad, MemorySink(), connector=connector)
    assert result.kind == errors.TLS, (result.kind, result.message)
    assert srv.commands().count("LOGIN") == logins


def test_tls_options_are_shared_per_host_and_ca_file(pki):
    tls = TlsContexts()
    a = tls.options("mail.example.test", pki[0])
    assert tls.options("mail.example.test", pki[0]) is a
    assert tls.options("other.example.test", pki[0]) is not a
    assert tls.options("mail.example.test") is not a
    assert TlsContexts().options("mail.example.test", pki[0]) is not a  # no global


def test_hosts_with_the_same_roots_share_one_context(pki):
    tls = TlsContexts()
    a = tls.options("mail.example.test", pki[0])
    b = tls.options("other.example.test", pki[0])
    assert a._createConnection.__self__ is b._createConnection.__self__
    assert tls.options("mail.example.test")._createConnection.__self__ is not (
        a._createConnection.__self__)  # other roots: another context


@pytest_twisted.inlineCallbacks
def test_shared_context_still_checks_each_host(tls_server, pki):
    # the context is shared by localhost and 127.0.0.1; the host name check
    # is per connection: the certificate (for localhost) is refused for the other
    from twisted.internet import reactor

    box = FakeMailbox()
    box.add(message(1))
    srv = tls_server({"INBOX": box})
    connector = Connector(reactor)
    good = yield run(account(srv.port, host="localhost", security="tls", ca_file=pki[0]),
                     MemorySink(), connector=connector)
    assert good.ok, good.debug
    bad = yield run(account(srv.port, host="127.0.0.1", security="tls", ca_file=pki[0]),
                    MemorySink(), connector=connector)
    assert bad.kind == errors.TLS, (bad.kind, bad.message)
    assert "does not match host '127.0.0.1'" in bad.message


def test_unreadable_ca_file_is_a_config_error(tmp_path):
    with pytest.raises(errors.FidoError) as e:
        TlsContexts().options("x.example.test", str(tmp_path / "missing.pem"))
    assert e.value.kind == errors.CONFIG


# --- against a real Dovecot (MOVE, UIDPLUS, STARTTLS as deployed) -------------------


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory):
    from tests.support import dovecot as dc

    with dc.started(tmp_path_factory.mktemp("dovecot"),
                    users={"alice": "s3cret \"q\" ä"}) as server:
        yield server


def dovecot_account(server, **kw):
    fields = dict(id="dc", host="localhost", port=server.port, username="alice",
                  password=server.users["alice"], security="starttls",
                  ca_file=server.ca_file)
    fields.update(kw)
    return Account(**fields)


@pytest_twisted.inlineCallbacks
def test_dovecot_starttls_fetch_and_uid_move(dovecot):
    from tests.support import dovecot as dc

    dovecot.reset("alice")
    dovecot.create_folder("alice", "Ärchiv")
    big = dc.make_message(1, 2 * 1024 * 1024, eight_bit=True)
    small = dc.make_message(2, 4096)
    dovecot.add_message("alice", big)
    dovecot.add_message("alice", small)
    sink = MemorySink()
    result = yield run(dovecot_account(dovecot, after_fetch="move:Ärchiv"), sink)
    assert result.ok, result.debug
    assert [m.raw for m in sink.entries] == [big, small]
    assert all(m.message_id.startswith("<fido.") for m in sink.entries)
    assert dovecot.count("alice") == 0
    assert dovecot.count("alice", "Ärchiv") == 2


@pytest_twisted.inlineCallbacks
def test_dovecot_implicit_tls_delete_with_uidplus(dovecot):
    from tests.support import dovecot as dc

    dovecot.reset("alice")
    for i in range(3):
        dovecot.add_message("alice", dc.make_message(i, 2048))
    dovecot.add_message("alice", dc.make_message(9, 2048), flags="S")
    sink = MemorySink()
    acct = dovecot_account(dovecot, port=dovecot.ssl_port, security="tls",
                           after_fetch="delete")
    result = yield run(acct, sink)
    assert result.ok, result.debug
    assert result.fetched == 3 and result.marked == 3
    assert dovecot.count("alice") == 1  # the seen one stays


@pytest_twisted.inlineCallbacks
def test_dovecot_seen_and_wrong_password(dovecot):
    from tests.support import dovecot as dc

    dovecot.reset("alice")
    dovecot.add_message("alice", dc.make_message(1, 1000))
    result = yield run(dovecot_account(dovecot, password="nope"), MemorySink())
    assert result.kind == errors.AUTH, (result.kind, result.message)
    result = yield run(dovecot_account(dovecot, auth="plain"), MemorySink())
    assert result.ok, result.debug
    assert set(dovecot.flags("alice").values()) == {"S"}


@pytest_twisted.inlineCallbacks
def test_dovecot_saved_search_and_pipelined_marking_over_three_batches(dovecot):
    """Dovecot has SEARCHRES: the SEARCH and the sizes FETCH go in one write,
    and each batch's STORE with the next batch's FETCH; every message arrives
    intact, once, and is marked seen."""
    import imaplib
    import ssl

    from tests.support import dovecot as dc

    dovecot.reset("alice")
    bodies = [dc.make_message(i, 1000 + 37 * i) for i in range(60)]
    for body in bodies:
        dovecot.add_message("alice", body)
    imap = imaplib.IMAP4_SSL("localhost", dovecot.ssl_port,
                             ssl_context=ssl.create_default_context(cafile=dovecot.ca_file))
    secret = dovecot.users["alice"].encode("utf-8")
    imap.authenticate("PLAIN", lambda _: b"\0alice\0" + secret)
    assert b"SEARCHRES" in imap.capability()[1][0].split()  # the path under test is taken
    imap.logout()
    sink = MemorySink()
    settings = ImapSettings(command_timeout=5, batch_messages=25)
    result = yield run(dovecot_account(dovecot), sink, settings)
    assert result.ok, result.debug
    assert [m.raw for m in sink.entries] == bodies
    assert [c[1] for c in sink.calls if c[0] == "deliver"] == [
        tuple(str(u) for u in range(1, 26)), tuple(str(u) for u in range(26, 51)),
        tuple(str(u) for u in range(51, 61))]
    assert result.fetched == 60 and result.marked == 60
    assert set(dovecot.flags("alice").values()) == {"S"}


@pytest_twisted.inlineCallbacks
def test_sessions_share_the_inflight_budget_and_give_it_back(server):
    from twisted.internet import reactor

    from fido_tx.schedule.budget import ByteBudget

    budget = ByteBudget(2500)  # room for about two ~1 KB messages
    boxes = []
    for _ in range(2):
        box = FakeMailbox()
        for n in range(4):
            box.add(message(n, b"x" * 1000))
        boxes.append(box)
    seen_in_use = []

    class Sink(MemorySink):
        def deliver(self, messages):
            seen_in_use.append((budget.in_use, sum(m.size for m in messages)))
            return super().deliver(messages)

    sink = Sink()
    settings = ImapSettings(command_timeout=5, batch_messages=2, batch_bytes=10**6)
    ds = [imap.fetch_mailbox(reactor, account(server({"INBOX": box}).port, id=f"a{k}"),
                             sink, settings, budget=budget)
          for k, box in enumerate(boxes)]
    results = yield defer.gatherResults(ds)
    assert all(r.ok and r.fetched == 4 for r in results), [r.debug for r in results]
    assert len(sink.entries) == 8
    # a 2-message batch (~2.2 KB) fills the budget: never two batches at once
    assert seen_in_use and all(in_use == size for in_use, size in seen_in_use)
    assert budget.in_use == 0 and budget.waiting == 0
    # within the limit; beyond it only the elder's read-ahead (its overdraft)
    assert budget.peak_within <= 2500
    assert budget.peak <= 2500 + budget.read_ahead + budget.step


@pytest_twisted.inlineCallbacks
def test_a_finished_session_leaves_nothing_of_its_own_to_the_garbage_collector(server):
    """Sessions are freed by reference counting: with thousands of them, what
    they left in reference cycles was most of the collector's work (and its
    pauses).  Twisted's own connector cycle remains; ours must not."""
    import gc

    from twisted.internet import reactor, task

    box = FakeMailbox()
    box.add(message(1))
    srv = server({"INBOX": box})
    # one Connector for the process, as the composition root has it: the
    # sessions' own objects are what must not be left in cycles
    connector = Connector(reactor)
    result = yield run(account(srv.port), MemorySink(), connector=connector)  # warm up
    assert result.ok, result.debug
    box.add(message(2))
    yield task.deferLater(reactor, 0.05, lambda: None)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        result = yield run(account(srv.port), MemorySink(), connector=connector)
        assert result.ok and result.fetched == 1, result.debug
        yield task.deferLater(reactor, 0.05, lambda: None)  # connectionLost
        gc.collect()
        # the per-session factory stays in Twisted's connector cycle, emptied
        ours = sorted({type(o).__name__ for o in gc.garbage
                       if type(o).__module__.startswith("fido_tx.sources.imap.")}
                      - {"_OneProtocol"})
    finally:
        gc.set_debug(0)
        del gc.garbage[:]
        gc.enable()
    assert ours == []


# --- the sink contract: rejected ids, a partial delivery, a sink's bug -------------


@pytest_twisted.inlineCallbacks
def test_rejected_messages_are_flagged_left_and_reported(server):
    box = FakeMailbox(flags=("\\Seen", "\\Deleted", "$FidoTooLarge", "$FidoRejected"))
    for n in range(3):
        box.add(message(n))
    srv = server({"INBOX": box})
    sink = MemorySink()
    sink.reject = {"2"}
    result = yield run(account(srv.port), sink)
    assert result.kind == errors.REJECTED, (result.kind, result.message)
    assert "UID 2" in result.message and "$FidoRejected" in result.message
    assert result.fetched == 2 and result.marked == 2
    assert "$FidoRejected" in box.by_uid(2).flags and "\\Seen" not in box.by_uid(2).flags
    # the next poll leaves it alone: the search skips the keyword
    result = yield run(account(srv.port), sink)
    assert result.ok, result.message
    assert any(b"UNKEYWORD $FidoRejected" in line for line in srv.received)
    assert [int(m.id) for m in sink.entries] == [1, 3]


@pytest_twisted.inlineCallbacks
def test_a_delivery_error_marks_the_confirmed_and_ends_with_that_error(server):
    from fido_tx.errors import FidoError
    from fido_tx.sinks.message import Delivery

    box = FakeMailbox()
    for n in range(3):
        box.add(message(n))
    srv = server({"INBOX": box})

    class HalfSink(MemorySink):
        def deliver(self, messages):
            d = super().deliver(messages[:1])
            return d.addCallback(lambda r: Delivery(
                r.confirmed, r.new, (), FidoError(errors.DELIVERY, "webhook answered 503")))

    result = yield run(account(srv.port), HalfSink())
    assert (result.kind, result.message) == (errors.DELIVERY, "webhook answered 503")
    assert result.fetched == 1 and result.marked == 1
    assert "\\Seen" in box.by_uid(1).flags
    assert all("\\Seen" not in box.by_uid(u).flags for u in (2, 3))
    yield srv.all_closed()
    assert srv.commands()[-1] == "LOGOUT"  # a sink's failure: the server was fine


@pytest_twisted.inlineCallbacks
def test_a_sink_bug_is_an_internal_protocol_error_not_redis(server):
    box = FakeMailbox()
    box.add(message(1))
    srv = server({"INBOX": box})

    class BuggySink(MemorySink):
        def deliver(self, messages):
            raise KeyError("oops")

    result = yield run(account(srv.port), BuggySink())
    assert result.kind == errors.PROTOCOL
    assert "internal error" in result.message and "KeyError" in result.message
    assert "\\Seen" not in box.by_uid(1).flags
