"""Every private API of a dependency that Fido uses, in one place.

Each trick here reaches behind a library's public surface because no public
API does the job (each says why).  ``tests/test_private.py`` has one test per
trick that fails loudly, naming the trick, when an upgrade removes it: read
that failure before anything else after upgrading Twisted, pyOpenSSL or
txredisapi.

Replaced by public APIs (so not here): ``twisted.internet._resolver.
HostResolution`` (:mod:`fido_tx.resolve` implements the public
``IHostResolution`` itself); pyOpenSSL's ``SSL_session_reused``, Twisted's
TLS small-write aggregator and ``TLSMemoryBIOProtocol(_connectWrapped=False)``
for STARTTLS (IMAP's TLS is Python's ssl module since issue 15:
:mod:`fido_tx.sources.imap.stdtls`, with public ``session_reused``; its
STARTTLS still needs :func:`swap_receiver`).
"""

from zope.interface import implementer

__all__ = [
    "TRICKS",
    "PlatformAndExtraRoots",
    "clear_exit_signal",
    "fast_reply_protocol",
    "import_twisted",
    "piecewise_redis_protocol",
    "redis_build_command",
    "redis_command_pieces",
    "release_idle_buffers",
    "share_context",
    "swap_receiver",
]

#: trick name -> what breaks without it (named by the tests' failures)
TRICKS = {
    "IOpenSSLTrustRoot": "twisted.internet._sslverify.IOpenSSLTrustRoot: trusting the "
                         "platform's roots AND an account's ca_file at once",
    "createConnection.__self__": "options._createConnection.__self__ (Twisted's "
                                 "ClientTLSOptions context): SSL_MODE_RELEASE_BUFFERS",
    "share_context": "ClientTLSOptions._createConnection: one OpenSSL context (and one "
                     "copy of the CA bundle, ~0.9 MiB) per set of trust roots, not per host",
    "_exitSignal": "reactor._exitSignal (twistd): a SIGTERM'd daemon that stopped "
                   "cleanly exits 0",
    "import_twisted": "sys.modules['OpenSSL'] = None while the reactor, endpoints and "
                      "txredisapi are imported: no pyOpenSSL/cryptography (~12 MiB) "
                      "in a daemon without TLS",
    "txredisapi replyReceived": "txredisapi BaseRedisProtocol.replyReceived and "
                                "handleTransactionData: Redis replies parsed in one pass "
                                "(fast_reply_protocol)",
    "swap_receiver": "tcp Connection.protocol (what the TCP connection delivers bytes "
                     "to): STARTTLS puts the TLS layer there",
}


# --- Twisted: a trust root of the platform's roots plus a PEM file --------------
#
# Public Twisted offers ``platformTrust()`` (the platform's roots only) and
# ``trustRootFromCertificates()`` (the given certificates only); an account
# with a ``ca_file`` (a private CA) on a server whose other accounts use a
# public CA needs both, and the only way to give ``optionsForClientTLS`` a
# trust root of one's own is the private ``IOpenSSLTrustRoot`` interface
# (one method, ``_addCACertsToContext``).

# The class is built on first use: importing ``_sslverify`` loads pyOpenSSL,
# cryptography and service_identity (~12 MiB), which a daemon without TLS
# never needs (see :func:`import_twisted`).


def __getattr__(name):
    if name == "PlatformAndExtraRoots":
        cls = _platform_and_extra_roots()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _platform_and_extra_roots():
    try:
        from twisted.internet._sslverify import IOpenSSLTrustRoot
    except ImportError as e:  # pragma: no cover - only after an upgrade
        raise ImportError(f"private API trick 'IOpenSSLTrustRoot' broke "
                          f"({TRICKS['IOpenSSLTrustRoot']}): {e}") from e

    @implementer(IOpenSSLTrustRoot)
    class PlatformAndExtraRoots:
        """Trust the platform's roots and ``certificates`` (pyOpenSSL X509)."""

        def __init__(self, certificates):
            self.certificates = certificates

        def _addCACertsToContext(self, context):
            from OpenSSL import crypto

            context.set_default_verify_paths()
            store = context.get_cert_store()
            for cert in self.certificates:
                try:
                    store.add_cert(cert)
                except crypto.Error:  # the same root twice
                    pass

    PlatformAndExtraRoots.__module__ = __name__
    return PlatformAndExtraRoots


# --- Twisted: the OpenSSL context behind ClientTLSOptions -------------------------


def release_idle_buffers(options):
    """Let OpenSSL free a connection's read/write buffers (~34 KiB) while it
    is idle (``SSL_MODE_RELEASE_BUFFERS``): thousands of sessions mostly wait
    for a server.  ``optionsForClientTLS`` does not expose its context; the
    bound method ``_createConnection`` belongs to the ``CertificateOptions``
    that owns it.  Best effort: returns whether the mode was set."""
    from OpenSSL import SSL

    try:
        context = options._createConnection.__self__.getContext()
    except AttributeError:  # another Twisted layout: keep the default
        return False
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    return True


# --- Twisted: one OpenSSL context for every host with the same trust roots -------
#
# ``optionsForClientTLS(host)`` builds its own ``CertificateOptions`` and so its
# own OpenSSL context on the first connection, and a context with the
# platform's roots loads the whole CA bundle (``set_default_verify_paths``):
# measured here 0.86 MiB and 45-100 ms per host (20 hosts: 17.2 MiB).  Nothing
# in that context is about the host: ``ClientTLSOptions`` sets the server name
# (SNI) and the host name check on each *connection*
# (``clientConnectionForTLS``).  So every host with the same trust roots can
# take its connections from one shared ``CertificateOptions``: its public
# ``clientConnectionForTLS`` replaces the private ``_createConnection`` of the
# host's ``ClientTLSOptions``, the attribute :func:`release_idle_buffers` reads.
# Checked by tests/test_private.py (``test_share_context``) and, for the host
# name check staying per host, tests/test_imap.py
# (``test_shared_context_still_checks_each_host``).


def share_context(options, certificate_options):
    """Make ``options`` (``optionsForClientTLS``'s creator) take its
    connections from ``certificate_options`` (a ``CertificateOptions``, whose
    context is shared), keeping its own host name check and SNI.  Best
    effort: returns whether it was done (else ``options`` keeps its own)."""
    if not callable(getattr(options, "_createConnection", None)):
        return False
    options._createConnection = certificate_options.clientConnectionForTLS
    return True


# --- Twisted: the signal twistd re-raises on exit ---------------------------------


def clear_exit_signal(reactor):
    """Make twistd exit 0 after a clean stop on SIGTERM.

    twistd ends by re-raising the signal recorded in ``reactor._exitSignal``
    (so the process would exit -15); there is no public way to say "the stop
    was clean".  Returns whether the reactor had the attribute."""
    if not hasattr(reactor, "_exitSignal"):
        return False
    reactor._exitSignal = None
    return True


# -- txredisapi: write a command's pieces without joining them ------------------
#
# ``BaseRedisProtocol.execute_command`` writes what the private
# ``_build_command(*args)`` returns.  Its own encoder cost 40% of a store's
# CPU time (450 arguments per batch), and a batch's command carries every
# message body: joining it made one more copy of up to max_inflight_bytes.
# No public hook exists, so Fido overrides ``_build_command``: it hands the
# RESP pieces to ``transport.writeSequence`` and returns b"" (txredisapi then
# writes nothing: ``write(b"")`` is a no-op).  Pipelining (unused by Fido)
# keeps the joined bytes.  Checked by tests/test_private.py
# (``test_txredisapi_build_command``).

TXREDISAPI_BUILD_COMMAND = "_build_command"


def _encode_redis_arg(arg):
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode("utf-8")
    if isinstance(arg, int):
        return b"%d" % arg
    raise TypeError(f"cannot send {type(arg).__name__} to Redis")


#: an argument at least this long is its own piece (not copied); shorter
#: ones are joined with the RESP around them
BIG_REDIS_ARG = 1024


#: ``$<n>\r\n`` for every small length, built once
_REDIS_LENGTHS = [b"$%d\r\n" % n for n in range(BIG_REDIS_ARG)]


def redis_command_pieces(args):
    """RESP for one command, as a list of pieces: each argument of
    :data:`BIG_REDIS_ARG` bytes or more (a message body) as it is, not
    copied, everything between them joined.

    A piece per argument and per CRLF was ~90 pieces per message (22
    arguments each) and ``writeSequence`` checks and queues every one:
    ~0.3 ms per batch in the 100x20 profile.  Now a message is two pieces.
    One pass over the arguments: ``str`` and ``int`` encoded inline (no call
    per argument), the length headers looked up, one join per run of small
    arguments.
    """
    out = []
    small = [b"*%d\r\n" % len(args)]
    append = small.append
    lengths = _REDIS_LENGTHS
    for arg in args:
        cls = arg.__class__
        if cls is str:
            arg = arg.encode("utf-8")
        elif cls is int:
            arg = b"%d" % arg
        elif cls is not bytes:
            arg = _encode_redis_arg(arg)
        n = len(arg)
        if n >= BIG_REDIS_ARG:
            append(b"$%d\r\n" % n)
            out.append(b"".join(small))
            out.append(arg)
            small = [b"\r\n"]
            append = small.append
        else:
            append(lengths[n])
            append(arg)
            append(b"\r\n")
    out.append(b"".join(small))
    return out


def redis_build_command(*args, **kwargs):
    """RESP for one command: the bytes txredisapi's ``_build_command`` makes."""
    return b"".join(redis_command_pieces(args))


def piecewise_redis_protocol(base):
    """A subclass of the txredisapi protocol class ``base`` whose commands
    go to the transport as pieces (see above)."""
    if not callable(getattr(base, TXREDISAPI_BUILD_COMMAND, None)):
        raise ImportError(
            f"private API gone: txredisapi {base.__name__}.{TXREDISAPI_BUILD_COMMAND} "
            "(fido_tx.private.piecewise_redis_protocol); see tests/test_private.py"
        )

    class PiecewiseRedisProtocol(base):
        def _build_command(self, *args, **kwargs):
            if self.pipelining or self.transport is None:
                return redis_build_command(*args)
            self.transport.writeSequence(redis_command_pieces(args))
            return b""

    return PiecewiseRedisProtocol


# -- txredisapi: read replies in one pass ---------------------------------------
#
# txredisapi's ``BaseRedisProtocol`` reads replies as a line receiver: a
# ``str`` per line, and after every bulk string ``pauseProducing()`` plus a
# ``callLater(0, self.dataReceived, rest, True)`` -- a reactor turn and two
# ``epoll_ctl`` per bulk string of a reply.  Fido overrides ``dataReceived``
# with :func:`fido_tx.redis.replies.parse` and hands each complete reply to
# txredisapi's own ``replyReceived`` (after ``handleTransactionData`` for
# arrays, as txredisapi does), so the command Deferreds, the reply queue and
# ``connectionLost`` stay txredisapi's.
#
# Its ``execute_command`` makes two Deferreds and three callbacks per command
# (a result, the reply queue's ``get()``, ``handle_reply``, ``fire_result``).
# For a plain command (no pipelining, MULTI, reply timeout or keyword
# options: Fido uses none) the override writes the pieces and puts ONE
# Deferred straight into the reply queue's ``waiting`` list (Twisted's
# ``DeferredQueue``; a cancelled one leaves a stand-in there, as txredisapi's
# ``ReplyQueue`` does, so that the next reply goes to the next command).
# Checked by tests/test_private.py (``test_txredisapi_reply_hooks``) and
# tests/test_redis_replies.py (the same values as txredisapi's reader).

TXREDISAPI_REPLY_HOOKS = ("replyReceived", "handleTransactionData", "replyQueue")


def _raise_reply_error(reply):
    """txredisapi's ``handle_reply``: an error reply fails the command."""
    if isinstance(reply, Exception):
        raise reply
    return reply


def fast_reply_protocol(base):
    """A subclass of the txredisapi protocol class ``base`` that parses
    replies with :func:`fido_tx.redis.replies.parse` (see above)."""
    import txredisapi
    from twisted.internet import defer

    from fido_tx.redis import replies

    _require_reply_hooks(base)
    error = txredisapi.ResponseError

    class FastReplyProtocol(base):
        _fido_buffer = b""

        def execute_command(self, *args, **kwargs):
            if kwargs or self.pipelining or self.inMulti or self.replyTimeout:
                return super().execute_command(*args, **kwargs)
            if self.connected == 0:
                raise txredisapi.ConnectionError("Not connected")
            self.transport.writeSequence(redis_command_pieces(args))
            waiting = self.replyQueue.waiting

            def cancel(d):
                waiting[waiting.index(d)] = defer.Deferred()

            d = defer.Deferred(cancel)
            waiting.append(d)
            return d.addCallback(_raise_reply_error)

        #: bytes the buffered incomplete reply needs before parsing again
        _fido_need = 0
        _fido_chunks = None

        def dataReceived(self, data, unpause=False):
            if self._fido_chunks is not None:
                self._fido_chunks.append(data)
                self._fido_have += len(data)
                if self._fido_have < self._fido_need:
                    return
                data, self._fido_chunks = b"".join(self._fido_chunks), None
            elif self._fido_buffer:
                data = self._fido_buffer + data
            try:
                found, used, need = replies.parse(data, error)
            except replies.BadReply as e:
                self._fido_buffer = b""
                self.transport.loseConnection()
                return
            self._fido_buffer = data[used:] if used < len(data) else b""
            if need > len(self._fido_buffer):
                # a big bulk string on its way: wait for all of it
                self._fido_chunks = [self._fido_buffer]
                self._fido_have = len(self._fido_buffer)
                self._fido_need = need
                self._fido_buffer = b""
            _hand_over(self, found)

    return FastReplyProtocol


def _require_reply_hooks(base):
    """ImportError when txredisapi's ``base`` lacks the reply hooks
    :func:`fast_reply_protocol` calls."""
    missing = [name for name in TXREDISAPI_REPLY_HOOKS[:2]
               if not callable(getattr(base, name, None))]
    if missing:
        raise ImportError(
            f"private API gone: txredisapi {base.__name__}.{', '.join(missing)} "
            "(fido_tx.private.fast_reply_protocol); see tests/test_private.py"
        )


def _hand_over(protocol, found):
    """Give each parsed reply to txredisapi as its own reader would."""
    for reply in found:
        if reply.__class__ is list:
            reply = protocol.handleTransactionData(reply)
        elif reply == "QUEUED":
            protocol.transactions += 1
        protocol.replyReceived(reply)


# --- Twisted and txredisapi: imported without pyOpenSSL ---------------------------
#
# Twisted's TCP transport (``twisted.internet.tcp`` through ``_newtls``), its
# reactor (``posixbase``: ``connectSSL``), its endpoints (``wrapClientTLS``)
# and txredisapi (``twisted.internet.ssl``, ``twisted.protocols.tls``) import pyOpenSSL,
# cryptography and service_identity when they are imported: 12 MiB of an idle
# daemon's 52, whether or not anything uses TLS.  Each of the three Twisted
# modules falls back to "no TLS" when ``import OpenSSL`` fails; txredisapi
# only names ``ssl.ClientContextFactory`` (in signatures, and to build one for
# its own connect helpers, which Fido does not use) and ``TLSMemoryBIOFactory``
# (for its TLS endpoint, unused too).  So the daemon imports them while
# ``sys.modules['OpenSSL']`` is ``None`` and txredisapi sees stand-ins for
# those two modules, whose names make the real object when called; then the
# stand-ins are removed and pyOpenSSL loads
# normally the first time a pyOpenSSL connection is made.  Fido's own TLS
# does not need the reactor's: IMAP's is Python's ssl module
# (:mod:`fido_tx.sources.imap.stdtls`, STARTTLS included), and
# :mod:`fido_tx.lazytls` wraps an endpoint with ``TLSMemoryBIOFactory``
# (public) for HTTPS and rediss.  Checked by tests/test_private.py
# (``test_import_twisted``) and tests/test_lazy_imports.py.


def _stand_in(module, name):
    """A class standing in for ``module.name``: calling it makes the real one."""
    import importlib

    def __new__(cls, *args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    return type(name, (), {"__new__": __new__, "__module__": __name__,
                           "__doc__": f"{module}.{name}, imported when first called"})


#: what txredisapi takes from Twisted's TLS modules at import
_TXREDISAPI_TLS_NAMES = {"twisted.internet.ssl": "ClientContextFactory",
                         "twisted.protocols.tls": "TLSMemoryBIOFactory"}


def import_twisted(tls=False):
    """Import the default reactor, ``twisted.internet.endpoints`` and
    txredisapi, without pyOpenSSL unless ``tls`` (a ``ssl:`` HTTP listener:
    the reactor's ``listenSSL``) or pyOpenSSL is already loaded.

    Nothing is done when the reactor is already imported (tests, the CLI).
    Returns whether pyOpenSSL was kept out."""
    import sys
    import types

    if "twisted.internet.reactor" in sys.modules or tls or "OpenSSL" in sys.modules:
        from twisted.internet import endpoints, reactor  # noqa: F401
        return False
    sys.modules["OpenSSL"] = None  # every ``import OpenSSL`` fails: Twisted's fallback
    stubs = {}
    try:
        from twisted.internet import endpoints, reactor  # noqa: F401
        import twisted.protocols

        for module, name in _TXREDISAPI_TLS_NAMES.items():
            stub = stubs[module] = types.ModuleType(module, "stand-in while txredisapi "
                                                            "is imported")
            setattr(stub, name, _stand_in(module, name))
            sys.modules[module] = stub
            package, _, leaf = module.rpartition(".")
            setattr(sys.modules[package], leaf, stub)
        import txredisapi  # noqa: F401
    finally:
        del sys.modules["OpenSSL"]
        for module, stub in stubs.items():
            if sys.modules.get(module) is stub:
                del sys.modules[module]
            package, _, leaf = module.rpartition(".")
            if getattr(sys.modules[package], leaf, None) is stub:
                delattr(sys.modules[package], leaf)
    return True


# --- Twisted: a layer put under a connected protocol (STARTTLS) -------------------
#
# A TCP connection delivers what it reads to its ``protocol`` attribute (the
# application protocol, or an endpoint's wrapper forwarding to it); no public
# API replaces it once connected.  STARTTLS puts the TLS layer there, as
# ``twisted.internet._newtls.startTLS`` does.  Checked by tests/test_private.py
# (``test_swap_receiver``: a real ``tcp.Connection`` reads into the new layer).


def swap_receiver(transport, make):
    """Put ``make(receiver)`` where ``transport`` (a TCP connection) delivers
    the bytes it reads, ``receiver`` being what it delivered to until now;
    returns the new layer.  ``TypeError`` for a transport without one."""
    receiver = getattr(transport, "protocol", None)
    if receiver is None:
        raise TypeError(f"{type(transport).__name__} has no protocol attribute: "
                        f"cannot start TLS on it")
    layer = make(receiver)
    transport.protocol = layer
    return layer
