"""One mailbox session: connect, TLS, log in, select, search, fetch, store, mark.

:func:`fetch_mailbox` is the whole public API.  It never fails: every outcome
is a :class:`~fido_tx.outcome.SessionResult` (with an error kind from
:mod:`fido_tx.errors` when something went wrong), except when the caller
cancels the returned Deferred: then the connection is aborted, nothing more is
marked and the Deferred errbacks with ``CancelledError``.

The order of a session guarantees "never lose a message": a UID is marked
(seen, deleted, moved) only after the sink has confirmed it.  UIDs the sink
already holds (a crash between store and mark) are marked without being
fetched again.

TLS: certificates are always verified against the account's host name.  The
trust roots are the platform's (OpenSSL default paths) plus, when the account
has a ``ca_file``, every certificate in that PEM file: a server certificate
issued by either is accepted.  The TLS options object (an OpenSSL context) is
shared per ``(host, ca_file)`` because building one is expensive.

Timeouts: ``connect_timeout`` covers name resolution and the TCP connect;
``greeting_timeout`` the TLS handshake (implicit TLS) and the greeting;
``command_timeout`` is the longest silence while a command runs (any line or
literal data from the server restarts it); while a message literal arrives it
must also keep up ``min_literal_rate`` bytes/s (checked every 5 s);
``logout_timeout`` bounds LOGOUT, after which the connection is aborted anyway.

Search: ``UID SEARCH UNSEEN UNKEYWORD <too_large_keyword>`` when the mailbox
can hold that keyword (``\\*`` or the keyword in PERMANENTFLAGS, or the
keyword already in FLAGS), else ``UID SEARCH UNSEEN``.
"""

import os
import re
import ssl

from OpenSSL import crypto
from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from zope.interface import implementer

from fido_tx import errors
from fido_tx.errors import FidoError
from fido_tx.sources.imap.client import (
    FidoIMAP4Client,
    ImapCommandError,
    SelectInfo,
    _show,
    astring_parts,
    greeting_capabilities,
    mailbox_name,
    parse_capabilities,
    parse_fetch,
    parse_search,
    parse_status,
    plain_response,
    response_code,
    uid_set,
)
from fido_tx.outcome import SessionResult
from fido_tx.sinks.base import Message

_log = Logger()

#: UIDs per ``UID FETCH (RFC822.SIZE)`` and per marking command
SIZE_CHUNK = 1000

__all__ = ["fetch_mailbox", "extract_message_id", "tls_options"]


def fetch_mailbox(reactor, account, sink, settings, dry_run=False, log=None, budget=None,
                  pacer=None, debug=True):
    """Run one session on ``account``'s mailbox.

    :param reactor: IReactorTCP, IReactorTime and
        IReactorPluggableNameResolver.
    :param account: a :class:`fido_tx.accounts.model.Account`.
    :param sink: an :class:`fido_tx.sinks.base.IMessageSink`.
    :param settings: :class:`fido_tx.config.ImapSettings`.
    :param dry_run: EXAMINE instead of SELECT, fetch no bodies, store and
        mark nothing; the result's ``fetched``/``bytes`` say what would have
        been fetched.
    :param log: a :class:`twisted.logger.Logger` (one debug line per step).
    :param budget: a :class:`fido_tx.schedule.budget.ByteBudget` shared by all
        sessions: each batch's bytes (by ``RFC822.SIZE``) are acquired before
        its ``UID FETCH`` and released once the sink has answered.
    :param pacer: a :class:`fido_tx.schedule.pacer.StartPacer` shared by all sessions:
        the connection is started when it lets this session through.
    :param debug: ``False`` when nothing reads debug events (``[log] level``
        above debug): the per-step debug lines are then not even emitted,
        which was ~10% of the CPU of a session with nothing new.
    :return: Deferred firing with a :class:`SessionResult`.
    """
    return _Session(reactor, account, sink, settings, dry_run, log or _log, budget,
                    pacer, debug).start()


# --- TLS ------------------------------------------------------------------------


@implementer(IOpenSSLTrustRoot)
class _PlatformAndFile:
    """Trust the platform's roots and the certificates of one PEM file."""

    def __init__(self, certificates):
        self.certificates = certificates

    def _addCACertsToContext(self, context):
        context.set_default_verify_paths()
        store = context.get_cert_store()
        for cert in self.certificates:
            try:
                store.add_cert(cert)
            except crypto.Error:  # the same root twice
                pass


def _load_ca_file(path):
    from cryptography import x509

    try:
        with open(path, "rb") as f:
            pem = f.read()
        certs = x509.load_pem_x509_certificates(pem)
    except (OSError, ValueError) as e:
        raise FidoError(errors.CONFIG, f"cannot read ca_file {path!r}: {e}")
    return [crypto.X509.from_cryptography(c) for c in certs]


_tls_cache = {}
_TLS_CACHE_MAX = 4096


def tls_options(host, ca_file=None):
    """The shared client TLS options for ``host`` (and extra roots in ``ca_file``).

    Cached per ``(host, ca_file, ca_file's mtime)``; raises a ``config``
    :class:`FidoError` when ``ca_file`` cannot be read.
    """
    mtime = None
    if ca_file:
        try:
            mtime = os.stat(ca_file).st_mtime_ns
        except OSError as e:
            raise FidoError(errors.CONFIG, f"cannot read ca_file {ca_file!r}: {e}")
    key = (host, ca_file or None, mtime)
    options = _tls_cache.get(key)
    if options is None:
        trust = _PlatformAndFile(_load_ca_file(ca_file)) if ca_file else None
        options = optionsForClientTLS(host, trustRoot=trust)
        _release_idle_buffers(options)
        if len(_tls_cache) >= _TLS_CACHE_MAX:
            _tls_cache.clear()
        _tls_cache[key] = options
    return options


def _release_idle_buffers(options):
    """Let OpenSSL free a connection's read/write buffers (~34 KiB) while it
    is idle (``SSL_MODE_RELEASE_BUFFERS``): thousands of sessions mostly wait
    for a server.  Best effort: the context sits behind Twisted internals."""
    try:
        from OpenSSL import SSL

        options._createConnection.__self__.getContext().set_mode(SSL.MODE_RELEASE_BUFFERS)
    except Exception:  # pragma: no cover - another Twisted layout: keep the default
        pass


_endpoints = {}


def _endpoint(reactor, host, port, timeout):
    """A shared :class:`HostnameEndpoint` per (reactor, host, port, timeout).

    An endpoint keeps no state between connects, but building one converts
    the host name with IDNA, ~0.1 ms of CPU: a tenth of a session with
    nothing new.  Bounded like the TLS options.
    """
    key = (reactor, host, port, timeout)
    endpoint = _endpoints.get(key)
    if endpoint is None:
        if len(_endpoints) >= _TLS_CACHE_MAX:
            _endpoints.clear()
        endpoint = _endpoints[key] = HostnameEndpoint(reactor, host, port, timeout=timeout)
    return endpoint


#: (shared TLS options, port) -> the TLS session of the last connection that
#: got as far as a login: offered to the next connection to the same server
_tls_sessions = {}


@implementer(IOpenSSLClientConnectionCreator)
class _RecordingCreator:
    """Per-session wrapper of the shared options: remembers the connection,
    and resumes the server's last TLS session.

    Verification stays entirely Twisted's (chain and host name); the
    connection is kept to explain a failed verification afterwards and to
    keep its TLS session (:meth:`remember_session`) once it has logged in.

    Resumption: a full handshake costs the client ~1 ms of CPU (key
    exchange, certificate chain and host name checks), the server more;
    every poll of every mailbox on the same server repeats it.  A resumed
    session skips the certificate exchange.  Only a session whose
    connection was verified and logged in is kept, per (host + trust roots,
    port): the options object is already per host and ``ca_file``.  A server
    that declines the ticket gets a full handshake, as before.
    """

    def __init__(self, options, record, port=None):
        self.options = options
        self.record = record
        self.key = (options, port)

    def clientConnectionForTLS(self, tlsProtocol):
        conn = self.options.clientConnectionForTLS(tlsProtocol)
        session = _tls_sessions.get(self.key)
        if session is not None:
            try:
                conn.set_session(session)
            except Exception:  # pragma: no cover - OpenSSL refused it: full handshake
                _tls_sessions.pop(self.key, None)
        self.record.append(conn)
        return conn

    def remember_session(self):
        """Keep the TLS session of the current connection for the next one."""
        if not self.record:
            return
        try:
            session = self.record[-1].get_session()
        except Exception:  # pragma: no cover - no session to keep
            return
        if session is None:
            return
        if len(_tls_sessions) >= _TLS_CACHE_MAX and self.key not in _tls_sessions:
            _tls_sessions.clear()
        _tls_sessions[self.key] = session


def _resumed(connection):
    """Whether ``connection`` resumed a TLS session (``None``: cannot tell)."""
    try:
        from OpenSSL._util import lib

        return bool(lib.SSL_session_reused(connection._ssl))
    except Exception:  # pragma: no cover - pyOpenSSL without the binding
        return None


class _OneProtocol(Factory):
    # One factory per session: Twisted's "Starting factory" lines would be
    # two log lines per mailbox poll, noise for a sysadmin tailing the log.
    noisy = False

    def __init__(self, make):
        self.make = make

    def buildProtocol(self, addr):
        return self.make()


# --- helpers ------------------------------------------------------------------

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FOLD = re.compile(rb"\r?\n[ \t]+")
_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:(.*)$", re.I | re.M)
_HEADER_SCAN = 256 * 1024


def extract_message_id(raw):
    """The Message-ID header of ``raw`` (unfolded, stripped) or ``""``.

    Only the header block (up to the first empty line, at most 256 KiB) is
    read.  Never fails on broken headers.
    """
    try:
        m = _HEADER_END.search(raw, 0, _HEADER_SCAN)
        header = raw[: m.start()] if m else raw[:_HEADER_SCAN]
        header = _FOLD.sub(b" ", header)
        found = _MESSAGE_ID.search(header)
        if not found:
            return ""
        return found.group(1).strip().decode("utf-8", "surrogateescape")
    except Exception:  # pragma: no cover - defensive: never fail a fetch here
        return ""


def _auth_error(exc):
    """Classify a failed LOGIN/AUTHENTICATE answer."""
    text = exc.text
    code = response_code(text)
    lowered = text.lower()
    shown = _show(text)
    if exc.status == b"BAD":
        return FidoError(errors.PROTOCOL, f"server rejected the login command: {shown}")
    if code in (b"UNAVAILABLE", b"LIMIT", b"INUSE", b"SERVERBUG") or (
        b"too many connections" in lowered or b"try again later" in lowered
    ):
        return FidoError(errors.CONNECT, f"server cannot log in now: {shown}")
    return FidoError(errors.AUTH, f"login failed: {shown}")


def _command_error(exc, kind_for_no=errors.MAILBOX, doing=""):
    if isinstance(exc, ImapCommandError):
        kind = kind_for_no if exc.status == b"NO" else errors.PROTOCOL
        return FidoError(kind, f"{doing or exc.command} failed: {exc.status.decode()} {_show(exc.text)}")
    return exc


def _classify_connect_failure(exc):
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


# --- the session ----------------------------------------------------------------


class _Stop(Exception):
    """Internal: the session was cancelled; unwind without doing anything."""


class _Session:
    def __init__(self, reactor, account, sink, settings, dry_run, log, budget=None,
                 pacer=None, debug=True):
        self.reactor = reactor
        self.debug = debug
        self.budget = budget
        self.pacer = pacer
        self.waiting_budget = None
        self.grant = None
        self.account = account
        self.sink = sink
        self.settings = settings
        self.dry_run = dry_run
        self.log = log
        self.proto = None
        self.factory = None
        self.connecting = None
        self.cancelled = False
        self.expired = False
        self.tls_connections = []
        self.caps = frozenset()
        self.fetched = 0
        self.bytes = 0
        self.marked = 0
        self.too_large = []
        self.started = None
        self.mailbox = account.mailbox
        self._failed_response = b""
        self._failed_bye = None

    # -- lifecycle -------------------------------------------------------------

    def start(self):
        self.started = self.reactor.seconds()
        outer = defer.Deferred(self._cancel)
        limit = getattr(self.settings, "session_timeout", 0)
        deadline = self.reactor.callLater(limit, self._expire) if limit else None
        inner = defer.ensureDeferred(self._run())

        def deliver(result):
            if deadline is not None and deadline.active():
                deadline.cancel()
            self._forget()
            if not outer.called:
                outer.callback(result)

        def crashed(f):  # a bug: still give the scheduler its account back
            self.log.failure("session {account_id} crashed", f, account_id=self.account.id)
            return SessionResult(
                account_id=self.account.id, kind=errors.PROTOCOL,
                message=f"internal error: {f.getErrorMessage()}",
                fetched=self.fetched, bytes=self.bytes, marked=self.marked,
                dry_run=self.dry_run,
            )

        inner.addErrback(crashed)
        inner.addCallback(deliver)
        return outer

    def _forget(self):
        """Drop the connection's objects once the session is over.  They
        refer to each other (protocol, transport, TLS connection, Deferreds);
        cut here, they are freed at once instead of waiting, as garbage in
        cycles, for the collector."""
        proto, self.proto = self.proto, None
        if proto is not None:
            proto.forget()
        self.creator = None
        self.tls_connections = []
        self.connecting = None
        factory, self.factory = self.factory, None
        if factory is not None:  # Twisted's connector keeps the factory
            factory.make = None

    def _cancel(self, outer):
        self._abort("session cancelled")

    def _expire(self):
        self.expired = True
        self._abort(
            f"session took longer than session_timeout ({self.settings.session_timeout:g} s)"
        )

    def _abort(self, why):
        self.cancelled = True
        if self.waiting_budget is not None:
            self.waiting_budget.cancel()
        if self.connecting is not None and not self.connecting.called:
            self.connecting.cancel()
        if self.proto is not None:
            self.proto.fail(FidoError(errors.TIMEOUT, why))

    def _stopped_why(self):
        if self.expired:
            return (f"session took longer than session_timeout "
                    f"({self.settings.session_timeout:g} s)")
        return "session cancelled"

    def _check(self):
        if self.cancelled:
            raise _Stop()

    def _where(self):
        return f"{self.account.host}:{self.account.port}"

    def _result(self, error=None):
        seconds = max(0.0, self.reactor.seconds() - self.started)
        fields = dict(
            account_id=self.account.id,
            fetched=self.fetched,
            bytes=self.bytes,
            marked=self.marked,
            too_large=tuple(self.too_large),
            seconds=seconds,
            dry_run=self.dry_run,
            deviations=tuple(sorted(self.proto.deviations.items())) if self.proto else (),
        )
        if error is None:
            return SessionResult(**fields)
        return SessionResult(kind=error.kind, message=self._scrub(error.message),
                             debug=self._scrub(self._debug(error)), **fields)

    def _scrub(self, text):
        """Remove the password (as sent and as a server might echo it)."""
        secret = self.account.password
        if not secret:
            return text
        forms = {secret, secret.replace("\\", "\\\\").replace('"', '\\"'),
                 repr(secret.encode("utf-8"))[2:-1]}
        for form in sorted(forms, key=len, reverse=True):
            if len(form) >= 3:
                text = text.replace(form, "<redacted>")
        return text

    def _debug(self, error):
        lines = [f"server: {self._where()} ({self.account.security})"]
        if error.debug:
            lines.append(error.debug)
        if self.proto is not None:
            if self._failed_response:
                lines.append(f"server response: {_show(self._failed_response)}")
            if self._failed_bye is not None:
                lines.append(f"server said BYE: {_show(self._failed_bye)}")
            trace = self.proto.debug_lines()
            if trace:
                lines.append("recent protocol lines:")
                lines.extend("  " + t for t in trace)
        return "\n".join(lines)

    async def _run(self):
        error = None
        try:
            await self._session()
        except _Stop:
            error = FidoError(errors.TIMEOUT, self._stopped_why())
        except FidoError as e:
            error = e
        except ImapCommandError as e:
            error = FidoError(errors.PROTOCOL, str(e))
        except defer.CancelledError:
            error = FidoError(errors.TIMEOUT, self._stopped_why())
        except Exception as e:
            self.log.failure("session {account_id}: unexpected error", account_id=self.account.id)
            error = FidoError(errors.PROTOCOL, f"unexpected error: {type(e).__name__}: {e}")
        if error is not None and self.proto is not None:
            # what the server said when it went wrong (before any LOGOUT)
            self._failed_response = self.proto.last_response
            self._failed_bye = self.proto.bye
        await self._close(error)
        return self._result(error)

    async def _close(self, error):
        proto = self.proto
        if proto is None or proto.closed:
            return
        polite = error is None or error.kind in (errors.AUTH, errors.MAILBOX, errors.REDIS)
        if polite and proto.state is not None and proto.error is None and not self.cancelled:
            proto.logging_out = True
            try:
                await proto.command(b"LOGOUT", timeout=self.settings.logout_timeout)
            except Exception:
                pass
        if not proto.closed:
            proto.transport.abortConnection()

    # -- steps -----------------------------------------------------------------

    def _debug_step(self, text, **kw):
        if not self.debug:
            return
        self.log.debug("session {account_id}: " + text, account_id=self.account.id, **kw)

    async def _session(self):
        if self.pacer is not None:
            self.waiting_budget = self.pacer.wait()  # cancelled like a budget wait
            try:
                await self.waiting_budget
            except defer.CancelledError:
                raise _Stop()
            finally:
                self.waiting_budget = None
            self._check()
        await self._connect()
        self._check()
        await self._greeting_and_tls()
        self._check()
        if not self.proto.preauth:
            await self._authenticate()
            self._check()
        if self.creator is not None and self._secure:
            if self.debug and _resumed(self.tls_connections[-1]):
                self._debug_step("TLS session resumed")
            # verified and logged in (a TLS 1.3 ticket arrives after the
            # handshake): the next session to this server resumes it
            self.creator.remember_session()
        if await self._unseen_count() == 0:
            self._debug_step("no unseen messages (STATUS)")
            return
        info = await self._select()
        self._check()
        uids = await self._search(info)
        self._check()
        if not uids:
            self._debug_step("no unseen messages")
            return
        new = await self._sink_call(
            self.sink.filter_new, self.account.id, self.mailbox, info.uidvalidity, uids
        )
        self._check()
        new_set = set(new)
        already = [u for u in uids if u not in new_set]
        new = [u for u in uids if u in new_set]
        if already:
            self._debug_step("{n} messages already stored, marking them", n=len(already))
            if not self.dry_run:
                await self._mark(already)
                self.marked += len(already)
                self._check()
        if not new:
            return
        sizes = await self._sizes(new)
        self._check()
        kw = self.settings.too_large_keyword
        fetchable = []
        for uid in new:
            size = sizes.get(uid)
            if size is None:  # expunged meanwhile
                continue
            if size > self.settings.max_message_size:
                self.too_large.append(uid)
            else:
                fetchable.append(uid)
        if self.too_large:
            self._debug_step("{n} messages over max_message_size left on the server",
                             n=len(self.too_large))
            if not self.dry_run and info.keywords_allowed(kw):
                await self._store_flags(self.too_large, kw.encode("ascii", "replace"))
                self._check()
        if self.dry_run:
            total = sum(sizes[u] for u in fetchable)
            self.fetched = len(fetchable)
            self.bytes = total
            self.log.info(
                "dry run {account_id}: would fetch {count} messages ({nbytes} bytes), "
                "would mark {mark}",
                account_id=self.account.id, count=len(fetchable), nbytes=total,
                mark=self.account.after_fetch,
            )
            return
        for batch in self._batches(fetchable, sizes):
            self.grant = await self._acquire(sum(sizes[u] for u in batch))
            try:
                await self._fetch_batch(batch, info.uidvalidity)
            finally:
                self._release()
            self._check()

    def _release(self):
        grant, self.grant = self.grant, None
        if grant is not None:
            grant.release()

    async def _acquire(self, nbytes):
        """Wait for ``nbytes`` of the shared budget (``None`` without one)."""
        if self.budget is None:
            return None
        self.waiting_budget = self.budget.acquire(nbytes)
        try:
            return await self.waiting_budget
        except defer.CancelledError:
            raise _Stop()
        finally:
            self.waiting_budget = None

    async def _connect(self):
        account, settings = self.account, self.settings
        creator = None
        if account.security in ("tls", "starttls"):
            creator = _RecordingCreator(tls_options(account.host, account.ca_file),
                                        self.tls_connections, account.port)
        self.creator = creator

        def make():
            proto = FidoIMAP4Client(
                self.reactor,
                greeting_timeout=settings.greeting_timeout,
                command_timeout=settings.command_timeout,
                min_literal_rate=settings.min_literal_rate,
            )
            proto.tls_explain = self._explain_untrusted
            # a body is never larger than its RFC822.SIZE (<= max_message_size)
            proto.max_literal = settings.max_message_size + 1024 * 1024
            proto.tls_host = account.host
            return proto

        endpoint = _endpoint(self.reactor, account.host, account.port, settings.connect_timeout)
        if account.security == "tls":
            endpoint = wrapClientTLS(creator, endpoint)
        elif account.security not in ("starttls", "none"):
            raise FidoError(errors.CONFIG, f"unknown security {account.security!r}")
        self._debug_step("connecting to {where}", where=self._where())
        timed_out = []

        def on_timeout():
            timed_out.append(True)
            self.connecting.cancel()

        self.factory = _OneProtocol(make)
        self.connecting = endpoint.connect(self.factory)
        timer = self.reactor.callLater(settings.connect_timeout, on_timeout)
        try:
            self.proto = await self.connecting
        except Exception as e:
            if self.cancelled:
                raise _Stop()
            if timed_out:
                raise FidoError(
                    errors.TIMEOUT,
                    f"connect to {self._where()} timed out after {settings.connect_timeout:g} s",
                )
            raise _classify_connect_failure(e)
        finally:
            if timer.active():
                timer.cancel()
            self.connecting = None

    def _explain_untrusted(self):
        """Why the server's certificate chain is not trusted, or ``None``."""
        if not self.tls_connections:
            return None
        chain = self.tls_connections[-1].get_peer_cert_chain()
        if not chain:
            return None
        store = crypto.X509Store()
        paths = ssl.get_default_verify_paths()
        if paths.cafile or paths.capath:
            try:
                store.load_locations(paths.cafile, paths.capath)
            except crypto.Error:
                pass
        if self.account.ca_file:
            for cert in _load_ca_file(self.account.ca_file):
                store.add_cert(cert)
        try:
            crypto.X509StoreContext(store, chain[0], chain[1:]).verify_certificate()
        except crypto.X509StoreContextError as e:
            return str(e)
        return None

    async def _capability(self):
        caps = set()

        def untagged(segments):
            text = segments[0]
            if text[:11].upper() == b"CAPABILITY " or text.upper() == b"CAPABILITY":
                caps.update(parse_capabilities(text[11:]))

        await self.proto.command(b"CAPABILITY", untagged=untagged)
        return frozenset(caps)

    async def _greeting_and_tls(self):
        proto = self.proto
        caps = await proto.greeting
        self._debug_step("greeted")
        if self.account.security == "starttls":
            if proto.preauth:
                raise FidoError(errors.TLS, "server pre-authenticated the plain-text "
                                            "connection, so STARTTLS is impossible")
            if caps is None:
                caps = await self._capability()
            if b"STARTTLS" not in caps:
                raise FidoError(errors.TLS, "server does not offer STARTTLS "
                                            "(security is starttls: refusing plain text)")
            try:
                await proto.command(b"STARTTLS")
            except ImapCommandError as e:
                raise FidoError(errors.TLS, f"STARTTLS refused: {e.status.decode()} "
                                            f"{_show(e.text)}")
            proto.start_tls(self.creator)
            self._debug_step("started TLS")
            caps = None  # capabilities before TLS are not to be trusted
        if caps is None:
            caps = await self._capability()
        self.caps = caps

    @property
    def _secure(self):
        return self.account.security == "tls" or self.proto.startedTLS

    async def _authenticate(self):
        account = self.account
        user = account.username.encode("utf-8")
        password = account.password.encode("utf-8")
        use_plain = account.auth == "plain"
        if not use_plain and b"LOGINDISABLED" in self.caps:
            if b"AUTH=PLAIN" in self.caps and self._secure:
                use_plain = True
            else:
                raise FidoError(errors.AUTH, "server refuses LOGIN (LOGINDISABLED) "
                                             "and offers no AUTH=PLAIN over TLS")
        try:
            if use_plain:
                text = await self._authenticate_plain(user, password)
            else:
                text = await self._login(user, password)
        except ImapCommandError as e:
            raise _auth_error(e)
        finally:
            del password
        self._debug_step("logged in")
        new_caps = greeting_capabilities(text)
        if new_caps is None:
            new_caps = await self._capability()
        self.caps = new_caps

    async def _login(self, user, password):
        uh, ul = astring_parts(user)
        ph, pl = astring_parts(password)
        lines = []
        cur = uh
        if ul is not None:
            lines.append(cur)
            cur = ul
        cur += b" " + ph
        if pl is not None:
            lines.append(cur)
            cur = pl
        lines.append(cur)
        first, pending = lines[0], lines[1:]

        def continuation(rest):
            if not pending:
                self.proto.fail(FidoError(errors.PROTOCOL,
                                          "unexpected continuation request during LOGIN"))
                return
            self.proto.send_secret(pending.pop(0))

        return await self.proto.command(b"LOGIN", first, continuation=continuation)

    async def _authenticate_plain(self, user, password):
        response = plain_response(user, password)
        if b"SASL-IR" in self.caps:
            return await self.proto.command(b"AUTHENTICATE", b"PLAIN " + response)
        sent = []

        def continuation(rest):
            if sent:
                self.proto.send_secret(b"*")  # cancel: the server wants more
                return
            sent.append(True)
            self.proto.send_secret(response)

        return await self.proto.command(b"AUTHENTICATE", b"PLAIN", continuation=continuation)

    async def _unseen_count(self):
        """``STATUS <mailbox> (UNSEEN)``: how many messages lack ``\\Seen``,
        or ``None`` when the server does not say (SELECT then decides).

        Most polls find nothing new.  STATUS answers that from the server's
        index without opening the mailbox: one command instead of SELECT and
        UID SEARCH, less work for the server.  RFC 3501 defines UNSEEN as the
        messages without ``\\Seen``, what UID SEARCH UNSEEN looks for, so
        a zero means that search would find nothing.  Anything else, an
        error answer included, goes the SELECT way.
        """
        counts = []

        def untagged(segments):
            unseen = parse_status(segments).get(b"UNSEEN")
            if unseen is not None:
                counts.append(unseen)

        try:
            await self.proto.command(b"STATUS", mailbox_name(self.mailbox) + b" (UNSEEN)",
                                     untagged=untagged)
        except ImapCommandError:
            return None
        return counts[-1] if counts else None

    async def _select(self):
        info = SelectInfo()

        def untagged(segments):
            if len(segments) == 1:
                info.feed(segments[0])

        verb = b"EXAMINE" if self.dry_run else b"SELECT"
        try:
            text = await self.proto.command(verb, mailbox_name(self.mailbox), untagged=untagged)
        except ImapCommandError as e:
            if e.status == b"NO":
                raise FidoError(errors.MAILBOX, f"cannot open mailbox {self.mailbox!r}: "
                                                f"{_show(e.text)}")
            raise FidoError(errors.PROTOCOL, f"{verb.decode()} failed: {e.status.decode()} "
                                             f"{_show(e.text)}")
        if response_code(text) == b"READ-ONLY" and not self.dry_run:
            raise FidoError(errors.MAILBOX, f"mailbox {self.mailbox!r} is read-only")
        if info.uidvalidity is None:
            raise FidoError(errors.PROTOCOL, f"server sent no UIDVALIDITY for {self.mailbox!r}")
        self._debug_step("selected {mailbox}: {exists} messages, uidvalidity {uidvalidity}",
                         mailbox=self.mailbox, exists=info.exists, uidvalidity=info.uidvalidity)
        return info

    async def _search(self, info):
        kw = self.settings.too_large_keyword
        query = b"SEARCH UNSEEN"
        if kw and info.keyword_known(kw):
            query += b" UNKEYWORD " + kw.encode("ascii", "replace")
        found = set()

        def untagged(segments):
            text = segments[0]
            if len(segments) == 1 and (text[:7].upper() == b"SEARCH " or text.upper() == b"SEARCH"):
                found.update(parse_search(text))

        try:
            await self.proto.command(b"UID", query, untagged=untagged)
        except ImapCommandError as e:
            raise _command_error(e, errors.PROTOCOL, "UID SEARCH")
        uids = sorted(found)
        self._debug_step("{n} unseen messages", n=len(uids))
        return uids

    async def _sink_call(self, f, *args):
        try:
            return await defer.maybeDeferred(f, *args)
        except FidoError as e:
            if e.kind == errors.REDIS:
                raise
            raise FidoError(errors.REDIS, e.message, e.debug)
        except Exception as e:
            raise FidoError(errors.REDIS, f"sink failed: {type(e).__name__}: {e}")

    async def _fetch_items(self, uids, items, collect):
        """``UID FETCH`` in chunks; ``collect(uid, items)`` per response."""
        for i in range(0, len(uids), SIZE_CHUNK):
            chunk = uids[i:i + SIZE_CHUNK]

            def untagged(segments):
                head = segments[0]
                sp = head.find(b" ")
                if sp <= 0 or head[sp + 1:sp + 7].upper() != b"FETCH ":
                    return
                seq, values = parse_fetch(segments)
                uid = values.get(b"UID")
                if uid is None or not uid.isdigit():
                    return  # an unsolicited FETCH (flag change) of another message
                collect(int(uid), values)

            try:
                await self.proto.command(b"UID", b"FETCH " + uid_set(chunk) + b" " + items,
                                         untagged=untagged)
            except ImapCommandError as e:
                raise _command_error(e, errors.PROTOCOL, "UID FETCH")
            self._check()

    async def _sizes(self, uids):
        sizes = {}
        wanted = set(uids)

        def collect(uid, values):
            size = values.get(b"RFC822.SIZE")
            if uid in wanted and size is not None and size.isdigit():
                sizes[uid] = int(size)

        await self._fetch_items(uids, b"(UID RFC822.SIZE)", collect)
        return sizes

    def _batches(self, uids, sizes):
        limit_n = max(1, self.settings.batch_messages)
        limit_b = self.settings.batch_bytes
        batch, nbytes = [], 0
        for uid in uids:
            size = sizes[uid]
            if batch and (len(batch) >= limit_n or nbytes + size > limit_b):
                yield batch
                batch, nbytes = [], 0
            batch.append(uid)
            nbytes += size
        if batch:
            yield batch

    async def _fetch_batch(self, batch, uidvalidity):
        bodies = {}
        wanted = set(batch)

        def collect(uid, values):
            body = values.get(b"BODY[]")
            if uid in wanted and isinstance(body, bytes):
                bodies[uid] = body

        await self._fetch_items(batch, b"(UID BODY.PEEK[])", collect)
        messages = [
            Message(self.account.id, self.mailbox, uidvalidity, uid, bodies[uid],
                    message_id=extract_message_id(bodies[uid]))
            for uid in batch if uid in bodies
        ]
        bodies.clear()
        if not messages:
            return
        self._debug_step("storing {n} messages", n=len(messages))
        confirmed = await self._sink_call(self.sink.store, messages)
        self._check()
        sizes = {m.uid: m.size for m in messages}
        del messages
        self._release()  # the bodies are stored and dropped: the budget is free
        confirmed = [u for u in confirmed if u in sizes]
        self.fetched += len(confirmed)
        self.bytes += sum(sizes[u] for u in confirmed)
        if confirmed:
            await self._mark(confirmed)
            self.marked += len(confirmed)

    # -- marking -----------------------------------------------------------------

    async def _store_flags(self, uids, flag):
        for i in range(0, len(uids), SIZE_CHUNK):
            chunk = uids[i:i + SIZE_CHUNK]
            try:
                await self.proto.command(
                    b"UID", b"STORE " + uid_set(chunk) + b" +FLAGS.SILENT (" + flag + b")")
            except ImapCommandError as e:
                raise _command_error(e, errors.MAILBOX, "UID STORE")

    async def _expunge(self, uids):
        try:
            if b"UIDPLUS" in self.caps:
                await self.proto.command(b"UID", b"EXPUNGE " + uid_set(uids))
            else:
                await self.proto.command(b"EXPUNGE")
        except ImapCommandError as e:
            raise _command_error(e, errors.MAILBOX, "EXPUNGE")

    async def _mark(self, uids):
        for i in range(0, len(uids), SIZE_CHUNK):
            await self._mark_chunk(uids[i:i + SIZE_CHUNK])
            self._check()

    async def _mark_chunk(self, uids):
        action = self.account.after_fetch
        target = self.account.move_target
        if action == "seen":
            await self._store_flags(uids, b"\\Seen")
        elif action == "delete":
            await self._store_flags(uids, b"\\Deleted")
            await self._expunge(uids)
        elif target is not None:
            folder = mailbox_name(target)
            try:
                if b"MOVE" in self.caps:
                    await self.proto.command(b"UID", b"MOVE " + uid_set(uids) + b" " + folder)
                    return
                await self.proto.command(b"UID", b"COPY " + uid_set(uids) + b" " + folder)
            except ImapCommandError as e:
                raise _command_error(e, errors.MAILBOX, f"moving messages to {target!r}")
            await self._store_flags(uids, b"\\Deleted")
            await self._expunge(uids)
        else:
            raise FidoError(errors.CONFIG, f"unknown after_fetch {action!r}")
        self._debug_step("marked {n} messages ({action})", n=len(uids), action=action)
