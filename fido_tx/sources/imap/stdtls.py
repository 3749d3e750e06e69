"""IMAP over TLS on Python's own ssl module: an SSLObject between two MemoryBIOs under a Twisted protocol, no pyOpenSSL.

What Twisted's ``TLSMemoryBIOProtocol`` does for pyOpenSSL, and asyncio's
``sslproto`` for asyncio, on ``ssl.SSLContext.wrap_bio``: bytes from the TCP
connection go into one ``ssl.MemoryBIO``, the plain text read from the
``ssl.SSLObject`` goes to the IMAP protocol, and what the IMAP protocol
writes comes out of the other BIO onto the TCP connection.  It needs none of
pyOpenSSL, cryptography, service_identity or Twisted's TLS modules (~12 MiB
of imports) and no cffi call per read or write.

- :func:`client_context`: one ``ssl.SSLContext`` per set of trust roots
  (the platform's plus an account's ``ca_file``), certificates and host
  names verified by OpenSSL itself (``check_hostname``), TLS 1.2 at least;
- :class:`TLSClientProtocol`: the TLS layer, an ``ITransport`` and
  ``IPushProducer`` to the IMAP protocol (pausing reads pauses the TCP
  connection: the in-flight byte budget);
- :class:`TLSEndpoint`: implicit TLS over any client endpoint (port 993);
- :func:`start_tls`: STARTTLS on an established connection.

A failed handshake (untrusted chain, wrong host name, a protocol alert) ends
the connection with the ``ssl.SSLError`` as the reason the IMAP protocol
sees: :func:`fido_tx.sources.imap.tlserror.tls_error` turns it into an error
of kind ``tls``.  A clean close writes close_notify and closes the TCP
connection without waiting for the server's (as IMAP's LOGOUT wants).
"""

import ssl

from twisted.internet import error as ierror
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from fido_tx import private

__all__ = ["TLSClientProtocol", "TLSEndpoint", "client_context", "start_tls"]

#: the most plain text taken from the TLS object at once (one record is at
#: most 16 KiB: a read never returns more than one)
READ_SIZE = 32 * 1024

#: what is fed to the incoming BIO at once: OpenSSL's memory BIO never
#: shrinks, so feeding the TCP connection's 64 KiB reads whole left each
#: connection that had read a large answer holding 131 KiB instead of 69
#: (client side, measured with 200 connections after a 256 KiB answer)
FEED_SIZE = 16 * 1024


def client_context(ca_file=None):
    """A client ``ssl.SSLContext`` trusting the platform's roots (OpenSSL's
    default paths) plus every certificate of the PEM file ``ca_file``;
    certificates required, host names checked, TLS 1.2 at least (as
    Twisted's ``CertificateOptions``).  Raises ``OSError`` or
    ``ssl.SSLError`` when ``ca_file`` cannot be read."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


@implementer(ITransport, IPushProducer)
class TLSClientProtocol(Protocol):
    """The TLS layer of one client connection.

    :param creator: makes the connection's ``ssl.SSLObject``:
        ``creator.client_object(incoming, outgoing)`` (see
        :class:`fido_tx.sources.imap.connect.TlsCreator`).
    :param wrapped: the application protocol.
    :param connect_wrapped: whether this layer connects ``wrapped`` (implicit
        TLS), or it is connected already (STARTTLS).
    :ivar reason: the ``Failure`` of the TLS error that ended the connection.
    """

    disconnecting = False
    reason = None

    def __init__(self, creator, wrapped, connect_wrapped=True):
        self.wrappedProtocol = wrapped
        self._connect_wrapped = connect_wrapped
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.tls = creator.client_object(self._incoming, self._outgoing)
        self.handshaking = True
        self._pending = []  # what the application wrote before the handshake ended
        self._close_after_handshake = False
        self._peer_closed = False
        #: closed on our side (aborted, or close_notify written): nothing more is read
        self._stopped = False

    # -- from the TCP connection -----------------------------------------------

    def connectionMade(self):
        if self._connect_wrapped:
            self.wrappedProtocol.makeConnection(self)
        self._handshake()

    def dataReceived(self, data):
        if len(data) <= FEED_SIZE:
            self._receive(data)
            return
        view = memoryview(data)
        for start in range(0, len(data), FEED_SIZE):
            self._receive(view[start:start + FEED_SIZE])

    def _receive(self, data):
        if self.tls is None or self._stopped:
            return  # closed on our side: what comes after is not read
        self._incoming.write(data)
        if self.handshaking and not self._handshake():
            return
        read, deliver = self.tls.read, self.wrappedProtocol.dataReceived
        # the application may close or abort in ``deliver``: read no further
        while not self._stopped:
            try:
                chunk = read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError as e:
                self._fail(e)
                return
            if not chunk:  # the server's close_notify (ssl reads it as b"")
                self._peer_closed = True
                self._shutdown()
                return
            deliver(chunk)
        if not self._stopped and self._outgoing.pending:  # a key update's answer
            self._flush()

    def connectionLost(self, reason):
        if self.reason is not None:
            reason = self.reason
        elif self._peer_closed:
            reason = Failure(ierror.ConnectionDone("TLS connection closed by the server"))
        self.connected = 0
        self.disconnecting = True
        self.tls = self._incoming = self._outgoing = self._pending = None
        # the application protocol's transport is this object: cut the cycle,
        # so both are freed by reference counting, not by the collector
        wrapped, self.wrappedProtocol = self.wrappedProtocol, None
        if wrapped is not None:
            wrapped.connectionLost(reason)

    # -- the handshake and its failure -----------------------------------------

    def _handshake(self):
        """Take the handshake one step; whether it is over."""
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except ssl.SSLError as e:  # untrusted, wrong host, an alert from the server
            self._fail(e)
            return False
        self.handshaking = False
        pending, self._pending = self._pending, []
        if pending:
            self._write(b"".join(pending))
        else:
            self._flush()
        if self._close_after_handshake:
            self._shutdown()
        return True

    def _fail(self, exc):
        """End the connection because of the TLS error ``exc`` (its alert
        written first); the application sees it as the reason."""
        if self.reason is None:
            self.reason = Failure(exc)
        self.disconnecting = True
        self._stopped = True
        if self._outgoing is not None:
            self._flush()
        self.transport.abortConnection()

    # -- to the TCP connection -------------------------------------------------

    def _flush(self):
        data = self._outgoing.read()
        if data:
            self.transport.write(data)

    def _write(self, data):
        tls = self.tls
        try:
            sent = tls.write(data)
            while sent < len(data):  # pragma: no cover - OpenSSL writes all into a memory BIO
                sent += tls.write(memoryview(data)[sent:])
        except ssl.SSLError as e:
            self._fail(e)
            return
        self._flush()

    def _shutdown(self):
        """close_notify, then the TCP connection closed once it is sent
        (the server's close_notify is not waited for)."""
        self._stopped = self.disconnecting = True
        try:
            self.tls.unwrap()
        except (ssl.SSLError, ValueError):
            pass  # SSLWantReadError: ours is written, the server's not read
        self._flush()
        self.transport.loseConnection()

    # -- ITransport for the application ----------------------------------------

    def write(self, data):
        if self.disconnecting or self.tls is None:
            return
        if self.handshaking:
            self._pending.append(bytes(data))
            return
        self._write(data)

    def writeSequence(self, data):
        self.write(b"".join(data))

    def loseConnection(self):
        """Write what is pending and close_notify, then close the TCP
        connection (after the handshake when it is not over yet)."""
        if self.disconnecting or self.tls is None:
            return
        self.disconnecting = True
        if self.handshaking:
            if self._pending:
                self._close_after_handshake = True
            else:
                self.transport.loseConnection()
            return
        self._shutdown()

    def abortConnection(self):
        self.disconnecting = True
        self._stopped = True
        if self.transport is not None:
            self.transport.abortConnection()

    def getPeer(self):
        return self.transport.getPeer()

    def getHost(self):
        return self.transport.getHost()

    def pauseProducing(self):
        self.transport.pauseProducing()

    def resumeProducing(self):
        self.transport.resumeProducing()

    def stopProducing(self):
        self.transport.stopProducing()

    def registerProducer(self, producer, streaming):
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self):
        self.transport.unregisterProducer()


class _TLSFactory(Factory):
    noisy = False

    def __init__(self, creator, factory):
        self.creator = creator
        self.factory = factory

    def buildProtocol(self, addr):
        wrapped = self.factory.buildProtocol(addr)
        if wrapped is None:  # pragma: no cover - the factory refused
            return None
        protocol = TLSClientProtocol(self.creator, wrapped)
        protocol.factory = self
        return protocol


@implementer(IStreamClientEndpoint)
class TLSEndpoint:
    """``endpoint`` with a :class:`TLSClientProtocol` under each protocol;
    ``connect`` fires with the application protocol (as ``wrapClientTLS``)."""

    def __init__(self, creator, endpoint):
        self.creator = creator
        self.endpoint = endpoint

    def connect(self, factory):
        d = self.endpoint.connect(_TLSFactory(self.creator, factory))
        return d.addCallback(lambda tls: tls.wrappedProtocol)


def start_tls(protocol, creator):
    """STARTTLS: put a :class:`TLSClientProtocol` between ``protocol`` and
    its TCP transport, which delivers to its ``protocol`` attribute (the
    application protocol, or an endpoint's wrapper forwarding to it); the
    handshake starts at once.  Returns the TLS transport: ``protocol``
    writes through it from now on."""
    transport = protocol.transport
    tls = private.swap_receiver(
        transport, lambda receiver: TLSClientProtocol(creator, receiver, connect_wrapped=False))
    protocol.transport = tls
    tls.makeConnection(transport)
    return tls
