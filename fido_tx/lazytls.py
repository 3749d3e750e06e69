"""Client TLS that loads pyOpenSSL only when a connection uses it.

The daemon imports Twisted without pyOpenSSL (:func:`fido_tx.private.
import_twisted`): then ``endpoints.wrapClientTLS`` refuses (it checked for
pyOpenSSL when it was imported) and a TCP transport has no ``startTLS``.
:func:`wrap_client_tls` does the same with public Twisted, importing
``twisted.protocols.tls`` (and so pyOpenSSL) on the first TLS connection
when nothing loaded it before (:mod:`fido_tx.tlspreload` does at start-up
when the configuration uses TLS): :func:`wrap_client_tls`, implicit TLS
over any client endpoint (``rediss://``, a Sentinel over TLS, HTTPS for the
webhook, the reporter, OAuth2 and Graph).  IMAP's TLS does not come here:
it is Python's ssl module (:mod:`fido_tx.sources.imap.stdtls`).
"""

from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

__all__ = ["TLSEndpoint", "wrap_client_tls"]


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

