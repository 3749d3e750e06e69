"""Load TLS at start-up when the configuration will use it: no reactor stall at the first TLS connection.

A daemon without TLS never imports pyOpenSSL (:func:`fido_tx.private.
import_twisted`, ~12 MiB).  One with TLS used to import it, with
service_identity and Twisted's TLS modules, in the reactor turn of its first
TLS connection, and build that server's OpenSSL context (loading the CA
bundle) there too: 113 ms of imports plus ~25-60 ms of context, the longest
stall of a TLS run.  :class:`TlsPreload` does both before the reactor runs
(twistd calls ``makeService`` and ``startService`` before ``reactor.run``):

- :meth:`TlsPreload.settings`: ``rediss://`` Redis or Sentinel, an https
  webhook or report URL, a ``rediss://`` delivery Redis: the modules;
- :meth:`TlsPreload.accounts`: IMAP accounts with implicit TLS or STARTTLS
  (the shared ``ssl.SSLContext`` of each ``ca_file``:
  :class:`~fido_tx.sources.imap.connect.TlsContexts`; IMAP's TLS is Python's
  ssl module, :mod:`fido_tx.sources.imap.stdtls`, and loads no pyOpenSSL),
  OAuth2 and Graph accounts (their HTTPS: the modules).

The composition root calls :meth:`~TlsPreload.accounts` with each accounts
load's added accounts: the first load happens in ``makeService``; a reload
that brings the first TLS account does the same in its own reactor turn,
which is that much longer, once.
"""

import sys

from twisted.logger import Logger

__all__ = ["TLS_MODULES", "TlsPreload", "account_uses_https", "account_uses_imap_tls",
           "account_uses_tls", "settings_use_tls"]

log = Logger()

#: what the first TLS connection imports (pyOpenSSL, its host name check,
#: Twisted's TLS layer), in import order
TLS_MODULES = (
    "OpenSSL.SSL",
    "OpenSSL.crypto",
    "cryptography.x509",
    "service_identity",
    "service_identity.pyopenssl",
    "twisted.internet._sslverify",
    "twisted.internet.ssl",
    "twisted.protocols.tls",
)

_TLS_URL_PREFIXES = ("https://", "rediss://", "rediss+sentinel://")


def _tls_url(value):
    return isinstance(value, str) and value.strip().lower().startswith(_TLS_URL_PREFIXES)


def settings_use_tls(settings):
    """Whether ``settings`` (:class:`fido_tx.config.Settings`) connect
    anywhere over TLS whatever the accounts: Redis, a delivery's URL, the
    reporter."""
    if _tls_url(settings.redis.url) or _tls_url(settings.reporter.url):
        return True
    return any(_tls_url(value) for table in settings.delivery_tables().values()
               for value in dict(table.options).values())


def account_uses_tls(account):
    """Whether a session of ``account`` would open a TLS connection."""
    return account_uses_https(account) or account_uses_imap_tls(account)


def account_uses_https(account):
    """Whether ``account`` talks HTTPS (Graph, an OAuth2 token endpoint):
    treq's TLS, on pyOpenSSL."""
    return account.source == "graph" or account.oauth is not None


def account_uses_imap_tls(account):
    """Whether ``account``'s IMAP connections use TLS (Python's ssl module,
    :mod:`fido_tx.sources.imap.stdtls`: no pyOpenSSL)."""
    return account.source == "imap" and account.security in ("tls", "starttls")


def load_modules():
    """Import :data:`TLS_MODULES`; returns how many were not loaded yet."""
    import importlib

    missing = [name for name in TLS_MODULES if name not in sys.modules]
    for name in missing:
        importlib.import_module(name)
    return len(missing)


class TlsPreload:
    """What the first TLS connections would build, built now.

    :param contexts: the IMAP source's shared
        :class:`~fido_tx.sources.imap.connect.TlsContexts`.
    :param sessions: whether the accounts' sessions are Fido's sources
        (``False``: a given session factory, tests; nothing per account).
    """

    def __init__(self, contexts=None, sessions=True):
        self.contexts = contexts
        self.sessions = sessions
        #: whether the TLS modules are loaded (by this or anything else)
        self.loaded = False
        self._warmed = set()

    def modules(self, why):
        """Load the TLS modules, once; ``why`` names what needs them (logged)."""
        if self.loaded:
            return
        self.loaded = True
        if load_modules():
            log.debug("TLS loaded at start-up ({why})", why=why)

    def settings(self, settings):
        """Preload for what ``settings`` connect to over TLS."""
        if settings_use_tls(settings):
            self.modules("the Redis, delivery or reporter URL")

    def accounts(self, accounts):
        """Preload for ``accounts`` (those added by a load): the pyOpenSSL
        modules if any talks HTTPS (OAuth2, Graph), and the ``ssl.SSLContext``
        of each IMAP ``ca_file`` not seen yet (IMAP's TLS needs no pyOpenSSL).
        A ``ca_file`` that cannot be read is left to the account's session,
        which reports it."""
        if not self.sessions:
            return
        for account in accounts:
            if account_uses_https(account):
                self.modules(f"account {account.id}")
            if self.contexts is None or not account_uses_imap_tls(account):
                continue
            key = account.ca_file or None
            if key in self._warmed:
                continue
            self._warmed.add(key)
            try:
                self.contexts.ssl_context(account.ca_file)
            except Exception:  # the session says what is wrong (ca_file)
                self._warmed.discard(key)
