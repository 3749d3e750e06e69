"""Reaching an IMAP server: endpoints, TLS options and TLS session resumption.

Two objects, created once by the composition root and shared by every
session (tests make their own, so nothing global needs clearing):

- :class:`TlsContexts`: for IMAP, one ``ssl.SSLContext`` per set of trust
  roots (building one loads the CA bundle: ~0.9 MiB) and the TLS session of
  the last logged-in connection per server, offered to the next one
  (resumption); IMAP's TLS layer is :mod:`fido_tx.sources.imap.stdtls`
  (Python's ssl module, no pyOpenSSL).  For HTTPS (treq: OAuth2, Graph, the
  webhook, the reporter), the pyOpenSSL client TLS options per ``(host,
  ca_file)``, all hosts with the same trust roots sharing one OpenSSL
  context.
- :class:`Connector`: a :class:`HostnameEndpoint` per (host, port, timeout)
  and :meth:`Connector.connect`, which opens one connection within
  ``connect_timeout`` and classifies what went wrong.  When the host is an
  IP address, or the reactor's :class:`~fido_tx.resolve.CachingResolver`
  holds a fresh answer of exactly one address, it connects to that address
  with a plain TCP endpoint instead: a ``HostnameEndpoint`` builds a class
  per connect (zope.interface computes its resolution order each time), a
  resolution and a ``LoopingCall`` for the connection attempts: ~400 Python
  calls per connect, about a fifth of an empty poll's (cProfile).

TLS: certificates are always verified against the account's host name.  The
trust roots are the platform's (OpenSSL default paths) plus, when the
account has a ``ca_file``, every certificate in that PEM file.
"""

import os
import ssl

from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IReactorPluggableNameResolver,
)
from twisted.internet.protocol import Factory

from fido_tx import errors, private
from fido_tx.errors import FidoError
from fido_tx.resolve import CachingResolver

#: entries kept per cache before it is emptied
CACHE_MAX = 4096

#: resumed connections before their server's kept TLS session is renewed:
#: reading a session from Python's ssl costs ~0.23 ms of CPU (it copies it
#: through DER, certificate included) and one that resumed is still good,
#: so it is read only after a full handshake and every this many resumptions
#: (RFC 8446 asks clients not to reuse tickets, for privacy: renewing now and
#: then bounds what an observer can correlate)
SESSION_RENEW_AFTER = 20

__all__ = ["CACHE_MAX", "Connector", "TlsContexts", "TlsCreator", "load_ca_file"]


def ca_file_mtime(ca_file):
    """``ca_file``'s modification time (``None`` without one): a cache key
    part, so an edited file is loaded again.  Raises a ``config``
    :class:`FidoError` when it cannot be read."""
    if not ca_file:
        return None
    try:
        return os.stat(ca_file).st_mtime_ns
    except OSError as e:
        raise FidoError(errors.CONFIG, f"cannot read ca_file {ca_file!r}: {e}")


def load_ca_file(path):
    """The certificates of a PEM file (pyOpenSSL X509); ``config`` error if
    it cannot be read."""
    from cryptography import x509
    from OpenSSL import crypto

    try:
        with open(path, "rb") as f:
            pem = f.read()
        certs = x509.load_pem_x509_certificates(pem)
    except (OSError, ValueError) as e:
        raise FidoError(errors.CONFIG, f"cannot read ca_file {path!r}: {e}")
    return [crypto.X509.from_cryptography(c) for c in certs]


class TlsContexts:
    """Shared client TLS options and resumable TLS sessions."""

    def __init__(self, max_entries=CACHE_MAX):
        self.max_entries = max_entries
        self._options = {}
        #: (ca_file, its mtime) -> CertificateOptions whose context every host shares
        self._shared = {}
        #: (ca_file, its mtime) -> the ssl.SSLContext every IMAP server shares
        self._contexts = {}
        #: (ssl context, host, port) -> TLS session of the last logged-in IMAP connection
        self.sessions = {}
        self._resumed = {}  # same keys -> connections that resumed it since

    def options(self, host, ca_file=None):
        """The client TLS options for ``host`` (and extra roots in ``ca_file``).

        Cached per ``(host, ca_file, ca_file's mtime)``; raises a ``config``
        :class:`FidoError` when ``ca_file`` cannot be read.
        """
        mtime = ca_file_mtime(ca_file)
        key = (host, ca_file or None, mtime)
        options = self._options.get(key)
        if options is None:
            from twisted.internet.ssl import optionsForClientTLS

            shared = self.certificate_options(ca_file, mtime)
            options = optionsForClientTLS(host, trustRoot=shared.trustRoot)
            if not private.share_context(options, shared):  # pragma: no cover - upgrade
                private.release_idle_buffers(options)
            if len(self._options) >= self.max_entries:
                self._options.clear()
            self._options[key] = options
        return options

    def certificate_options(self, ca_file=None, mtime=None):
        """The ``CertificateOptions`` (one OpenSSL context, trust roots loaded,
        ``SSL_MODE_RELEASE_BUFFERS``) shared by every host trusting the
        platform's roots plus ``ca_file``'s certificates."""
        key = (ca_file or None, mtime)
        shared = self._shared.get(key)
        if shared is None:
            from OpenSSL import SSL
            from twisted.internet.ssl import CertificateOptions, platformTrust

            trust = (private.PlatformAndExtraRoots(load_ca_file(ca_file)) if ca_file
                     else platformTrust())
            shared = CertificateOptions(trustRoot=trust)
            shared.getContext().set_mode(SSL.MODE_RELEASE_BUFFERS)
            if len(self._shared) >= self.max_entries:
                self._shared.clear()
            self._shared[key] = shared
        return shared

    def ssl_context(self, ca_file=None):
        """The ``ssl.SSLContext`` (:func:`~fido_tx.sources.imap.stdtls.client_context`)
        shared by every IMAP server trusting the platform's roots plus
        ``ca_file``'s certificates; cached per ``(ca_file, its mtime)``.
        Raises a ``config`` :class:`FidoError` when ``ca_file`` cannot be read."""
        from fido_tx.sources.imap.stdtls import client_context

        mtime = ca_file_mtime(ca_file)
        key = (ca_file or None, mtime)
        context = self._contexts.get(key)
        if context is None:
            try:
                context = client_context(ca_file)
            except (OSError, ValueError, ssl.SSLError) as e:
                raise FidoError(errors.CONFIG, f"cannot read ca_file {ca_file!r}: {e}")
            if len(self._contexts) >= self.max_entries:
                self._contexts.clear()
            self._contexts[key] = context
        return context

    def creator(self, host, ca_file, port):
        """A per-connection :class:`TlsCreator` for this IMAP server."""
        return TlsCreator(self, self.ssl_context(ca_file), host, port)

    def remember(self, key, session):
        if len(self.sessions) >= self.max_entries and key not in self.sessions:
            self.sessions.clear()
            self._resumed.clear()
        self.sessions[key] = session
        self._resumed[key] = 0

    def keeps(self, key):
        """A connection resumed ``key``'s kept session: whether it is kept
        as it is (not renewed yet, :data:`SESSION_RENEW_AFTER`)."""
        count = self._resumed.get(key)
        if count is None or count + 1 >= SESSION_RENEW_AFTER:
            return False
        self._resumed[key] = count + 1
        return True


class TlsCreator:
    """Makes one connection's ``ssl.SSLObject`` on the shared context, and
    resumes the server's last TLS session.

    Verification is OpenSSL's (chain and host name, ``check_hostname``);
    the TLS object is kept to keep its session (:meth:`remember_session`)
    once the connection has logged in.  A resumed session skips the
    certificate exchange (~1 ms of client CPU); only a session whose
    connection was verified and logged in is kept, per (context, host,
    port): never offered to another host.  A server that declines it gets a
    full handshake, as before.
    """

    def __init__(self, contexts, context, host, port=None):
        self.contexts = contexts
        self.context = context
        self.host = host
        self.key = (context, host, port)
        self.connections = []

    def client_object(self, incoming, outgoing):
        """The ``ssl.SSLObject`` of a new connection over these BIOs."""
        session = self.contexts.sessions.get(self.key)
        try:
            tls = self.context.wrap_bio(incoming, outgoing, server_hostname=self.host,
                                        session=session)
        except ValueError:  # pragma: no cover - a session ssl refuses: full handshake
            self.contexts.sessions.pop(self.key, None)
            tls = self.context.wrap_bio(incoming, outgoing, server_hostname=self.host)
        self.connections.append(tls)
        return tls

    def resumed(self):
        """Whether the current connection resumed a TLS session (``None``: cannot tell)."""
        if not self.connections:
            return None
        return self.connections[-1].session_reused

    def remember_session(self):
        """Keep the TLS session of the current connection for the next one
        (a connection that resumed the kept one leaves it, up to
        :data:`SESSION_RENEW_AFTER` times)."""
        if not self.connections:
            return
        tls = self.connections[-1]
        if tls.session_reused and self.contexts.keeps(self.key):
            return
        try:
            session = tls.session
        except Exception:  # pragma: no cover - no session to keep
            return
        if session is not None:
            self.contexts.remember(self.key, session)


class _OneProtocol(Factory):
    # One factory per connection: Twisted's "Starting factory" lines would be
    # two log lines per mailbox poll, noise for a sysadmin tailing the log.
    noisy = False

    def __init__(self, make):
        self.make = make

    def buildProtocol(self, addr):
        return self.make()


def classify_connect_failure(exc):
    if isinstance(exc, FidoError):
        return exc
    if isinstance(exc, ierror.DNSLookupError):
        return FidoError(errors.DNS, f"cannot resolve host name: {exc}")
    if isinstance(exc, ierror.TimeoutError):
        return FidoError(errors.TIMEOUT, f"connect timed out: {exc}")
    if isinstance(exc, ierror.ConnectionRefusedError):
        return FidoError(errors.CONNECT, "connection refused")
    if isinstance(exc, ierror.ConnectError):
        return FidoError(errors.CONNECT, f"cannot connect: {exc}")
    return FidoError(errors.CONNECT, f"cannot connect: {type(exc).__name__}: {exc}")


class Connector:
    """Opens connections to IMAP servers for ``reactor``."""

    def __init__(self, reactor, tls=None, max_entries=CACHE_MAX):
        self.reactor = reactor
        self.tls = tls if tls is not None else TlsContexts(max_entries)
        self.max_entries = max_entries
        self._endpoints = {}
        self._direct = {}
        self._cache = None  # the reactor's CachingResolver, once found
        self._pipelining = {}

    # -- what a server is known to take: LOGIN pipelined ------------------------
    #
    # RFC 3501 sec 5.5 lets a client write its next command behind LOGIN, but
    # not every server reads it: Courier's login process hands the
    # connection to imapd and what it had read past LOGIN is lost (the
    # command is never answered).  A server is sent LOGIN and the first
    # command together only once one of its LOGIN answers carried its
    # capabilities (``OK [CAPABILITY ...]``: Dovecot, Cyrus; the server that
    # answers LOGIN is then the one that serves the session).  A server seen
    # to drop a pipelined command is never sent one again.

    def pipelines(self, account):
        """Whether to pipeline at all (SEARCH behind SELECT): not to a
        server seen to drop or mix up a pipelined command."""
        return self._pipelining.get((account.host, account.port)) is not False

    def pipelines_login(self, account):
        """Whether to write the session's first command with LOGIN."""
        return self._pipelining.get((account.host, account.port)) is True

    def learned_login(self, account, pipelines):
        """Remember whether ``account``'s server takes a command pipelined
        with LOGIN (its LOGIN answer carried CAPABILITY)."""
        self._learn(account, True if pipelines else "no-login")

    def dropped(self, account):
        """``account``'s server dropped or mixed up a pipelined command:
        nothing is pipelined to it again."""
        self._learn(account, False)

    def _learn(self, account, state):
        key = (account.host, account.port)
        if self._pipelining.get(key) is False:
            return  # for good
        if key not in self._pipelining and len(self._pipelining) >= self.max_entries:
            self._pipelining.clear()
        self._pipelining[key] = state

    def endpoint(self, host, port, timeout):
        """A shared :class:`HostnameEndpoint` per (host, port, timeout): it
        keeps no state between connects, but building one converts the host
        name with IDNA, a tenth of a session with nothing new."""
        key = (host, port, timeout)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if len(self._endpoints) >= self.max_entries:
                self._endpoints.clear()
            endpoint = self._endpoints[key] = HostnameEndpoint(
                self.reactor, host, port, timeout=timeout)
        return endpoint

    def _find_cache(self):
        """The reactor's caching resolver, once it is installed (the
        composition root may install it after building the connector);
        kept, as a zope adaptation per connect cost ~20 us."""
        pluggable = IReactorPluggableNameResolver(self.reactor, None)
        resolver = pluggable.nameResolver if pluggable is not None else None
        if isinstance(resolver, CachingResolver):
            self._cache = resolver
            return resolver
        return None

    def direct_endpoint(self, host, port):
        """A TCP endpoint to the one address ``host`` is known to have (an
        IP address, or a fresh single answer of the caching resolver), or
        ``None`` when the name must be resolved (or has several addresses:
        :class:`HostnameEndpoint` tries them in turn).  It has no timeout of
        its own: :meth:`connect`'s timer bounds the attempt (one DelayedCall
        per connect instead of two)."""
        if isIPAddress(host):
            address = IPv4Address("TCP", host, port)
        elif isIPv6Address(host):
            address = IPv6Address("TCP", host, port)
        else:
            resolver = self._cache or self._find_cache()
            if resolver is None:
                return None
            addresses = resolver.cached(host, port)
            if addresses is None or len(addresses) != 1:
                return None
            address = addresses[0]
        key = (type(address), address.host, port)
        endpoint = self._direct.get(key)
        if endpoint is None:
            if len(self._direct) >= self.max_entries:
                self._direct.clear()
            kind = TCP6ClientEndpoint if isinstance(address, IPv6Address) else TCP4ClientEndpoint
            endpoint = self._direct[key] = kind(self.reactor, address.host, port, timeout=None)
        return endpoint

    async def connect(self, account, timeout, make, creator=None):
        """Connect to ``account``'s server; the protocol is ``make()``.

        :param creator: the TLS connection creator for implicit TLS.
        :return: the connected protocol.
        :raise FidoError: kinds ``dns``, ``connect``, ``timeout``, ``config``.
        :raise CancelledError: when the caller cancels the wait.
        """
        endpoint = (self.direct_endpoint(account.host, account.port)
                    or self.endpoint(account.host, account.port, timeout))
        if account.security == "tls":
            from fido_tx.sources.imap.stdtls import TLSEndpoint

            endpoint = TLSEndpoint(creator, endpoint)
        elif account.security not in ("starttls", "none"):
            raise FidoError(errors.CONFIG, f"unknown security {account.security!r}")
        factory = _OneProtocol(make)
        timed_out = []
        connecting = endpoint.connect(factory)

        def on_timeout():
            timed_out.append(True)
            connecting.cancel()

        timer = self.reactor.callLater(timeout, on_timeout)
        try:
            return await connecting
        except Exception as e:
            if timed_out:
                raise FidoError(errors.TIMEOUT, f"connect to {account.host}:{account.port} "
                                                f"timed out after {timeout:g} s")
            if isinstance(e, (defer.CancelledError, ierror.ConnectingCancelledError)):
                raise defer.CancelledError()  # the caller stopped: not a connect failure
            raise classify_connect_failure(e)
        finally:
            if timer.active():
                timer.cancel()
            factory.make = None  # Twisted's connector keeps the factory
