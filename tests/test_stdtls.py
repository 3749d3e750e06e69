"""IMAP's TLS layer on Python's ssl module (fido_tx.sources.imap.stdtls).

Each test joins a :class:`TLSClientProtocol` to Twisted's pyOpenSSL server
(``TLSMemoryBIOProtocol``, an independent implementation) over two
``StringTransport``s and moves the bytes between them by hand: handshake,
verification failures and their error text, resumption, STARTTLS, flow
control and both kinds of close.
"""

import ssl

from twisted.internet import error as ierror
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from fido_tx import errors
from fido_tx.sources.imap import stdtls
from fido_tx.sources.imap.connect import TlsContexts
from fido_tx.sources.imap.tlserror import tls_error
from tests.support import tlsca


class App(Protocol):
    """The application protocol on either side: records what it gets."""

    def __init__(self):
        self.data = b""
        self.made = 0
        self.lost = None

    def connectionMade(self):
        self.made += 1

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = reason


class TCP(StringTransport):
    """The client's TCP connection: delivers to its ``protocol`` attribute."""

    protocol = None
    aborted = False

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()


_SERVER_OPTIONS = {}


def _server_options(certificate):
    """Twisted's server TLS options for the test PKI's ``certificate``: one
    context each, so a session it issued can be resumed (as Dovecot does)."""
    from OpenSSL import SSL
    from twisted.internet import ssl as tssl

    options = _SERVER_OPTIONS.get(certificate)
    if options is None:
        pair = getattr(tlsca.files(), certificate)
        with open(pair.key) as k, open(pair.cert) as c:
            options = tssl.PrivateCertificate.loadPEM(k.read() + c.read()).options()
        context = options.getContext()
        context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        context.set_session_id(b"fido-test")
        _SERVER_OPTIONS[certificate] = options
    return options


class Pair:
    """A TLS client and Twisted's TLS server, the bytes moved by :meth:`pump`."""

    def __init__(self, creator, implicit=True, certificate="localhost"):
        from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

        server_options = _server_options(certificate)
        self.server_app = App()
        factory = TLSMemoryBIOFactory(server_options, False,
                                      Factory.forProtocol(lambda: self.server_app))
        factory.protocol = TLSMemoryBIOProtocol  # writes at once: no reactor needed
        self.server = factory.buildProtocol(None)
        self.server_tcp = StringTransport()
        self.server.makeConnection(self.server_tcp)
        self.app = App()
        self.tcp = TCP()
        self.creator = creator
        if implicit:
            self.tls = stdtls.TLSClientProtocol(creator, self.app)
            self.tcp.protocol = self.tls
            self.tls.makeConnection(self.tcp)

    def pump(self):
        for _ in range(50):
            out = self.tcp.value()
            self.tcp.clear()
            if out:
                self.server.dataReceived(out)
            back = self.server_tcp.value()
            self.server_tcp.clear()
            if back:
                self.tcp.protocol.dataReceived(back)
            if not out and not back:
                return

    def lose(self):
        """The TCP connection ends (as the reactor reports it)."""
        why = ierror.ConnectionDone() if not self.tcp.aborted else ierror.ConnectionLost()
        self.tcp.protocol.connectionLost(Failure(why))


def creator(contexts=None, host="localhost", ca=True):
    contexts = contexts if contexts is not None else TlsContexts()
    return contexts.creator(host, tlsca.files().ca if ca else None, 993)


class HandshakeTests(SynchronousTestCase):
    def test_what_is_written_before_the_handshake_arrives_after_it(self):
        pair = Pair(creator())
        self.assertEqual(pair.app.made, 1)  # connected at once: its deadline covers the handshake
        pair.app.transport.write(b"a001 CAPABILITY\r\n")
        self.assertTrue(pair.tls.handshaking)
        pair.pump()
        self.assertFalse(pair.tls.handshaking)
        self.assertEqual(pair.server_app.data, b"a001 CAPABILITY\r\n")
        pair.server_app.transport.write(b"* OK ready\r\n")
        pair.app.transport.writeSequence([b"a002 ", b"NOOP\r\n"])
        pair.pump()
        self.assertEqual(pair.app.data, b"* OK ready\r\n")
        self.assertEqual(pair.server_app.data, b"a001 CAPABILITY\r\na002 NOOP\r\n")
        self.assertIsInstance(pair.tls.tls, ssl.SSLObject)
        self.assertIn(pair.tls.tls.version(), ("TLSv1.2", "TLSv1.3"))

    def test_it_is_a_transport_and_a_push_producer(self):
        from twisted.internet.interfaces import IPushProducer, ITransport

        pair = Pair(creator())
        verifyObject(ITransport, pair.tls)
        verifyObject(IPushProducer, pair.tls)
        self.assertEqual(pair.tls.getPeer(), pair.tcp.getPeer())
        self.assertEqual(pair.tls.getHost(), pair.tcp.getHost())

    def test_a_large_answer_arrives_whole_in_record_sized_pieces(self):
        pair = Pair(creator())
        pair.pump()
        body = bytes(range(256)) * 4096  # 1 MiB
        pair.server_app.transport.write(body)
        pair.pump()
        self.assertEqual(pair.app.data, body)


class VerificationTests(SynchronousTestCase):
    def test_an_untrusted_chain_fails_before_anything_is_sent(self):
        pair = Pair(creator(ca=False))
        pair.app.transport.write(b"a001 LOGIN user secret\r\n")
        pair.pump()
        self.assertTrue(pair.tcp.aborted)
        self.assertEqual(pair.server_app.data, b"")
        pair.lose()
        error = tls_error(pair.app.lost, host="localhost")
        self.assertEqual(error.kind, errors.TLS)
        self.assertEqual(error.message,
                         "certificate verify failed: unable to get local issuer certificate")

    def test_a_certificate_for_another_host_is_refused(self):
        pair = Pair(creator(), certificate="wrong_name")  # for wrong.example
        pair.app.transport.write(b"a001 LOGIN user secret\r\n")
        pair.pump()
        self.assertEqual(pair.server_app.data, b"")
        pair.lose()
        error = tls_error(pair.app.lost, host="localhost")
        self.assertEqual(error.kind, errors.TLS)
        self.assertEqual(error.message, "certificate does not match host 'localhost'")
        self.assertIn("mismatch", error.debug)

    def test_an_ip_address_not_in_the_certificate_is_refused(self):
        pair = Pair(creator(host="127.0.0.2"))  # the certificate names 127.0.0.1
        pair.pump()
        self.assertEqual(pair.server_app.data, b"")
        pair.lose()
        self.assertEqual(tls_error(pair.app.lost, host="127.0.0.2").message,
                         "certificate does not match host '127.0.0.2'")

    def test_a_plain_connection_loss_is_no_tls_error(self):
        pair = Pair(creator())
        pair.pump()
        pair.lose()
        self.assertIsNone(tls_error(pair.app.lost))
        self.assertTrue(pair.app.lost.check(ierror.ConnectionDone))

    def test_a_server_speaking_no_tls_is_a_handshake_failure(self):
        app = App()
        tcp = TCP()
        tls = stdtls.TLSClientProtocol(creator(), app)
        tcp.protocol = tls
        tls.makeConnection(tcp)
        tls.dataReceived(b"* OK IMAP4rev1 plain text here\r\n")
        self.assertTrue(tcp.aborted)
        tls.connectionLost(Failure(ierror.ConnectionLost()))
        error = tls_error(app.lost)
        self.assertEqual(error.kind, errors.TLS)
        self.assertEqual(error.message, "TLS handshake failed: wrong version number")


class ResumptionTests(SynchronousTestCase):
    def test_the_next_connection_resumes_the_remembered_session(self):
        contexts = TlsContexts()
        first = Pair(creator(contexts))
        first.app.transport.write(b"a001 NOOP\r\n")
        first.pump()
        first.server_app.transport.write(b"a001 OK\r\n")
        first.pump()  # a TLS 1.3 ticket comes after the handshake
        self.assertIs(first.creator.resumed(), False)
        first.creator.remember_session()
        self.assertEqual(len(contexts.sessions), 1)
        second = Pair(creator(contexts))
        second.pump()
        self.assertIs(second.creator.resumed(), True)

    def test_a_session_is_kept_per_host(self):
        contexts = TlsContexts()
        first = Pair(creator(contexts))
        first.pump()
        first.creator.remember_session()
        other = creator(contexts, host="127.0.0.1")
        self.assertNotEqual(other.key, first.creator.key)
        self.assertIs(other.context, first.creator.context)  # one context per ca_file

    def test_one_context_per_ca_file(self):
        contexts = TlsContexts()
        self.assertIs(contexts.ssl_context(tlsca.files().ca), contexts.ssl_context(tlsca.files().ca))
        self.assertIsNot(contexts.ssl_context(), contexts.ssl_context(tlsca.files().ca))
        context = contexts.ssl_context()
        self.assertEqual(context.verify_mode, ssl.CERT_REQUIRED)
        self.assertTrue(context.check_hostname)
        self.assertEqual(context.minimum_version, ssl.TLSVersion.TLSv1_2)

    def test_an_unreadable_ca_file_is_a_config_error(self):
        for content in (None, b"not a certificate\n"):
            path = self.mktemp()
            if content is not None:
                with open(path, "wb") as f:
                    f.write(content)
            with self.assertRaises(errors.FidoError) as caught:
                TlsContexts().ssl_context(path)
            self.assertEqual(caught.exception.kind, errors.CONFIG)
            self.assertIn("cannot read ca_file", caught.exception.message)


class StartTLSTests(SynchronousTestCase):
    def test_starttls_switches_an_established_connection(self):
        pair = Pair(creator(), implicit=False)
        pair.tcp.protocol = pair.app
        pair.app.makeConnection(pair.tcp)
        pair.app.transport.write(b"a001 STARTTLS\r\n")
        self.assertEqual(pair.tcp.value(), b"a001 STARTTLS\r\n")
        pair.tcp.clear()
        tls = stdtls.start_tls(pair.app, pair.creator)
        self.assertIs(pair.app.transport, tls)
        self.assertIs(pair.tcp.protocol, tls)
        self.assertEqual(pair.tcp.value()[:1], b"\x16")  # the ClientHello, at once
        pair.app.transport.write(b"a002 CAPABILITY\r\n")
        pair.pump()
        self.assertEqual(pair.server_app.data, b"a002 CAPABILITY\r\n")
        pair.server_app.transport.write(b"* CAPABILITY IMAP4rev1\r\n")
        pair.pump()
        self.assertEqual(pair.app.data, b"* CAPABILITY IMAP4rev1\r\n")
        self.assertEqual(pair.app.made, 1)  # not connected a second time

    def test_a_transport_without_a_protocol_attribute_is_refused(self):
        app = App()
        app.makeConnection(StringTransport())
        with self.assertRaises(TypeError):
            stdtls.start_tls(app, creator())


class FlowAndCloseTests(SynchronousTestCase):
    def test_pausing_reads_pauses_the_tcp_connection(self):
        pair = Pair(creator())
        pair.pump()
        pair.app.transport.pauseProducing()
        self.assertEqual(pair.tcp.producerState, "paused")
        pair.app.transport.resumeProducing()
        self.assertEqual(pair.tcp.producerState, "producing")
        pair.app.transport.stopProducing()
        self.assertEqual(pair.tcp.producerState, "stopped")

    def test_a_clean_close_writes_close_notify_and_closes_tcp_at_once(self):
        pair = Pair(creator())
        pair.pump()
        pair.app.transport.write(b"a009 LOGOUT\r\n")
        pair.app.transport.loseConnection()
        self.assertTrue(pair.tcp.disconnecting)  # not waiting for the server's close_notify
        self.assertFalse(pair.tcp.aborted)
        pair.app.transport.write(b"too late\r\n")
        pair.pump()
        self.assertEqual(pair.server_app.data, b"a009 LOGOUT\r\n")
        self.assertTrue(pair.server_tcp.disconnecting)  # the server read our close_notify
        pair.lose()
        self.assertTrue(pair.app.lost.check(ierror.ConnectionDone))

    def test_a_close_during_the_handshake_sends_what_was_written_after_it(self):
        pair = Pair(creator())
        pair.app.transport.write(b"a001 LOGOUT\r\n")
        pair.app.transport.loseConnection()
        self.assertFalse(pair.tcp.disconnecting)
        pair.pump()
        self.assertEqual(pair.server_app.data, b"a001 LOGOUT\r\n")
        self.assertTrue(pair.tcp.disconnecting)

    def test_the_servers_close_notify_is_a_clean_close(self):
        pair = Pair(creator())
        pair.pump()
        pair.server_app.transport.write(b"* BYE\r\n")
        pair.server_app.transport.loseConnection()
        pair.pump()
        self.assertEqual(pair.app.data, b"* BYE\r\n")
        self.assertTrue(pair.tcp.disconnecting)
        self.assertFalse(pair.tcp.aborted)
        pair.tcp.protocol.connectionLost(Failure(ierror.ConnectionLost()))
        self.assertTrue(pair.app.lost.check(ierror.ConnectionDone))

    def test_abort_reaches_tcp_and_nothing_more_is_delivered(self):
        pair = Pair(creator())
        pair.pump()
        pair.app.transport.abortConnection()
        self.assertTrue(pair.tcp.aborted)
        pair.server_app.transport.write(b"* 1 EXISTS\r\n")
        pair.pump()
        self.assertEqual(pair.app.data, b"")
        pair.lose()
        self.assertIsNotNone(pair.app.lost)
        self.assertIsNone(pair.tls.tls)  # the TLS object freed with the connection
        self.assertIsNone(pair.tls.wrappedProtocol)  # no cycle left for the collector


class EndpointTests(SynchronousTestCase):
    def test_connect_fires_with_the_application_protocol(self):
        from twisted.internet import defer

        tcp = TCP()

        class Endpoint:
            def connect(self, factory):
                protocol = factory.buildProtocol(None)
                tcp.protocol = protocol
                protocol.makeConnection(tcp)
                return defer.succeed(protocol)

        endpoint = stdtls.TLSEndpoint(creator(), Endpoint())
        app = self.successResultOf(endpoint.connect(Factory.forProtocol(App)))
        self.assertIsInstance(app, App)
        self.assertIsInstance(app.transport, stdtls.TLSClientProtocol)
        self.assertIs(app.transport.wrappedProtocol, app)
        self.assertEqual(tcp.value()[:1], b"\x16")  # the ClientHello


class DeadlineTests(SynchronousTestCase):
    def test_a_server_that_never_finishes_the_handshake_is_cut_by_the_greeting_deadline(self):
        from twisted.internet import task

        from fido_tx.errors import FidoError
        from fido_tx.sources.imap.client import FidoIMAP4Client

        clock = task.Clock()
        proto = FidoIMAP4Client(clock, greeting_timeout=10, command_timeout=5)
        tcp = TCP()
        tls = stdtls.TLSClientProtocol(creator(), proto)
        tcp.protocol = tls
        tls.makeConnection(tcp)
        self.assertEqual(tcp.value()[:1], b"\x16")  # the ClientHello, never answered
        clock.advance(9.9)
        self.assertFalse(tcp.aborted)
        clock.advance(0.2)
        self.assertTrue(tcp.aborted)
        tls.connectionLost(Failure(ierror.ConnectionAborted()))
        error = self.failureResultOf(proto.greeting, FidoError).value
        self.assertEqual(error.kind, errors.TIMEOUT)
        self.assertIn("greeting", error.message)

    def test_starttls_handshake_is_cut_by_the_next_commands_deadline(self):
        from twisted.internet import task

        from fido_tx.errors import FidoError
        from fido_tx.sources.imap.client import FidoIMAP4Client

        clock = task.Clock()
        proto = FidoIMAP4Client(clock, greeting_timeout=10, command_timeout=5)
        tcp = TCP()
        tcp.protocol = proto
        proto.makeConnection(tcp)
        proto.dataReceived(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n")
        d = proto.command(b"STARTTLS")
        proto.dataReceived(b"0001 OK begin TLS\r\n")
        self.successResultOf(d)
        proto.start_tls(creator())
        self.assertIsInstance(proto.transport, stdtls.TLSClientProtocol)
        capability = proto.command(b"CAPABILITY")  # held until the handshake ends
        clock.advance(5.1)
        self.assertTrue(tcp.aborted)
        proto.transport.connectionLost(Failure(ierror.ConnectionAborted()))
        self.assertEqual(self.failureResultOf(capability, FidoError).value.kind, errors.TIMEOUT)


class SessionRenewalTests(SynchronousTestCase):
    def test_a_resumed_session_is_kept_then_renewed(self):
        from fido_tx.sources.imap import connect

        contexts = TlsContexts()
        first = Pair(creator(contexts))
        first.pump()
        first.creator.remember_session()
        kept = contexts.sessions[first.creator.key]
        seen = []
        for n in range(connect.SESSION_RENEW_AFTER):
            pair = Pair(creator(contexts))
            pair.pump()
            self.assertIs(pair.creator.resumed(), True)
            pair.creator.remember_session()
            seen.append(contexts.sessions[pair.creator.key] is kept)
        # kept while it resumes (no copy read from ssl), renewed after that many
        self.assertEqual(seen, [True] * (connect.SESSION_RENEW_AFTER - 1) + [False])

    def test_a_full_handshake_replaces_the_kept_session(self):
        contexts = TlsContexts()
        first = Pair(creator(contexts))
        first.pump()
        first.creator.remember_session()
        kept = contexts.sessions[first.creator.key]
        contexts.sessions[first.creator.key] = None  # nothing offered: a full handshake
        pair = Pair(creator(contexts))
        pair.pump()
        self.assertIs(pair.creator.resumed(), False)
        pair.creator.remember_session()
        self.assertIsNotNone(contexts.sessions[pair.creator.key])
        self.assertIsNot(contexts.sessions[pair.creator.key], kept)


class CloseWhileReadingTests(SynchronousTestCase):
    def test_a_close_in_the_middle_of_a_read_stays_a_clean_close(self):
        pair = Pair(creator())
        pair.pump()

        class Closing(App):
            def dataReceived(self, data):
                App.dataReceived(self, data)
                self.transport.loseConnection()  # e.g. a LOGOUT written, then closed

        closing = Closing()
        closing.transport = pair.tls
        pair.tls.wrappedProtocol = closing
        # two records in one TCP read: the second is not read after the close
        pair.server_app.transport.write(b"a" * 20000)
        pair.tcp.protocol.dataReceived(pair.server_tcp.value())
        self.assertEqual(len(closing.data), 16384)
        self.assertTrue(pair.tcp.disconnecting)
        self.assertIsNone(pair.tls.reason)
        pair.lose()
        self.assertTrue(closing.lost.check(ierror.ConnectionDone))
