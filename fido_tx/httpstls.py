"""HTTPS for Fido's HTTP clients (treq's Agent): TLS on a reactor imported without pyOpenSSL, one OpenSSL context.

Two things ``twisted.web.client.Agent`` does by default that Fido cannot use:

- its endpoints wrap TLS with ``twisted.internet.endpoints.wrapClientTLS``,
  which refuses ("OpenSSL not available") in a daemon whose endpoints were
  imported without pyOpenSSL (:func:`fido_tx.private.import_twisted`): every
  OAuth2 token request, Graph call and https report failed under twistd.
  :class:`HttpsEndpoints` wraps with :func:`fido_tx.lazytls.wrap_client_tls`;
- its ``BrowserLikePolicyForHTTPS`` calls ``optionsForClientTLS`` for every
  new connection, and each builds its own OpenSSL context, loading the
  whole CA bundle: ~25-60 ms of the reactor's time and ~0.9 MiB per
  connection the pool opens.  :class:`HttpsPolicy` hands out the creators
  of a :class:`~fido_tx.sources.imap.connect.TlsContexts`: one per host, on
  one shared context.

Imported with the first HTTP client (it imports twisted.web).
"""

from twisted.internet.endpoints import HostnameEndpoint
from twisted.web.client import IAgentEndpointFactory
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

__all__ = ["HttpsEndpoints", "HttpsPolicy"]

#: endpoints kept before the cache is emptied
MAX_ENDPOINTS = 4096


@implementer(IPolicyForHTTPS)
class HttpsPolicy:
    """Verify every server against the platform's roots (as
    ``BrowserLikePolicyForHTTPS``), with the creators of ``contexts``."""

    def __init__(self, contexts=None):
        if contexts is None:
            from fido_tx.sources.imap.connect import TlsContexts

            contexts = TlsContexts()
        self.contexts = contexts

    def creatorForNetloc(self, hostname, port):
        return self.contexts.options(hostname.decode("ascii"))


@implementer(IAgentEndpointFactory)
class HttpsEndpoints:
    """The Agent's endpoints, one per (scheme, host, port), TLS through
    :mod:`fido_tx.lazytls` with :class:`HttpsPolicy`'s creators."""

    def __init__(self, reactor, connect_timeout=None, policy=None):
        self._reactor = reactor
        self._timeout = connect_timeout
        self.policy = policy if policy is not None else HttpsPolicy()
        self._endpoints = {}

    def endpointForURI(self, uri):
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if len(self._endpoints) >= MAX_ENDPOINTS:
                self._endpoints.clear()
            endpoint = self._endpoints[key] = self._make(uri)
        return endpoint

    def _make(self, uri):
        from twisted.web.error import SchemeNotSupported

        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"the host of {uri.toBytes()!r} is not ASCII") from None
        kwargs = {} if self._timeout is None else {"timeout": self._timeout}
        tcp = HostnameEndpoint(self._reactor, host, uri.port, **kwargs)
        if uri.scheme == b"http":
            return tcp
        if uri.scheme == b"https":
            from fido_tx.lazytls import wrap_client_tls

            return wrap_client_tls(self.policy.creatorForNetloc(uri.host, uri.port), tcp)
        raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
