"""Client TLS that loads pyOpenSSL only when a connection uses it.

The daemon imports Twisted without pyOpenSSL (:func:`fido_tx.private.
import_twisted`): then ``endpoints.wrapClientTLS`` refuses (it checked for
pyOpenSSL when it was imported) and a TCP transport has no ``startTLS``.
These two do the same with public Twisted where they can, importing
``twisted.protocols.tls`` (and so pyOpenSSL) on the first TLS connection
when nothing loaded it before (:mod:`fido_tx.tlspreload` does at start-up
when the configuration uses TLS):

- :func:`wrap_client_tls`: implicit TLS over any client endpoint (IMAP on
  993, ``rediss://``, a Sentinel over TLS, an HTTPS webhook);
- :func:`start_tls`: STARTTLS on a connected transport.
"""

from twisted.internet.interfaces import IStreamClientEndpoint, ITLSTransport
from zope.interface import implementer

from fido_tx import private

__all__ = ["TLSEndpoint", "start_tls", "wrap_client_tls"]


@implementer(IStreamClientEndpoint)
class TLSEndpoint:
    """``endpoint`` with a TLS layer made by ``creator`` (an
    ``IOpenSSLClientConnectionCreator``): what ``wrapClientTLS`` returns."""

    def __init__(self, creator, endpoint):
        self.creator = creator
        self.endpoint = endpoint

    def connect(self, factory):
        from twisted.protocols.tls import TLSMemoryBIOFactory

        wrapping = TLSMemoryBIOFactory(self.creator, True, factory)
        return self.endpoint.connect(wrapping).addCallback(lambda tls: tls.wrappedProtocol)


def wrap_client_tls(creator, endpoint):
    """``endpoint`` wrapped in client TLS (``wrapClientTLS`` without
    needing pyOpenSSL before the first connection)."""
    return TLSEndpoint(creator, endpoint)


def start_tls(protocol, creator):
    """Switch ``protocol``'s connection to TLS made by ``creator``.

    Returns the transport ``protocol`` now writes to: its own (Twisted's
    ``startTLS``) when the transport offers it, else the TLS layer put
    between them (:func:`fido_tx.private.start_tls_on`)."""
    transport = protocol.transport
    if ITLSTransport.providedBy(transport):
        transport.startTLS(creator)
        return transport
    return private.start_tls_on(transport, protocol, creator)
