"""From nothing to a logged-in IMAP connection: connect, greeting, STARTTLS,
capabilities, authenticate.

:class:`Login` does the steps; what it produces, an :class:`ImapConnection`,
is independent of any mailbox, so a caller may poll it
(:mod:`fido_tx.sources.imap.poll`), keep it, and poll it again (IMAP IDLE on
held connections builds on this).

The secret comes from the account's credentials
(:class:`~fido_tx.interfaces.ICredentials`), asked once per login; a refused
secret is reported to them (:meth:`invalidate`) so a token is refreshed.
"""

from fido_tx import errors
from fido_tx.errors import FidoError
from fido_tx.scrub import scrub
from fido_tx.sources.imap.client import FidoIMAP4Client, ImapCommandError
from fido_tx.sources.imap.parse import (
    _show,
    astring_parts,
    greeting_capabilities,
    parse_capabilities,
    plain_response,
    response_code,
    shared,
)

__all__ = ["ImapConnection", "Login", "auth_error"]

_SASL_AFTER_ERROR = {b"XOAUTH2": b"", b"OAUTHBEARER": b"AQ=="}


def auth_error(exc, forms=()):
    """Classify a failed LOGIN/AUTHENTICATE answer (the server's text is
    scrubbed of ``forms`` before it is cut for display)."""
    text = exc.text
    code = response_code(text)
    lowered = text.lower()
    shown = _show(scrub(text.decode("utf-8", "replace"), forms))
    if exc.status == b"BAD":
        return FidoError(errors.PROTOCOL, f"server rejected the login command: {shown}")
    if code in (b"UNAVAILABLE", b"LIMIT", b"INUSE", b"SERVERBUG") or (
        b"too many connections" in lowered or b"try again later" in lowered
    ):
        return FidoError(errors.CONNECT, f"server cannot log in now: {shown}")
    return FidoError(errors.AUTH, f"login failed: {shown}")


class ImapConnection:
    """One connected (and, after :class:`Login`, logged-in) IMAP connection.

    :ivar proto: the :class:`FidoIMAP4Client`.
    :ivar caps: the server's capabilities (upper-case bytes).
    :ivar creator: the :class:`~fido_tx.sources.imap.connect.TlsCreator`
        when the connection uses TLS, else ``None``.
    """

    def __init__(self, account, proto, creator):
        self.account = account
        self.proto = proto
        self.creator = creator
        self.caps = frozenset()

    @property
    def secure(self):
        return self.account.security == "tls" or bool(self.proto.startedTLS)

    @property
    def closed(self):
        return self.proto is None or self.proto.closed

    def command(self, name, args=None, **kw):
        return self.proto.command(name, args, **kw)

    async def capability(self):
        caps = set()

        def untagged(segments):
            text = segments[0]
            if text[:11].upper() == b"CAPABILITY " or text.upper() == b"CAPABILITY":
                caps.update(parse_capabilities(text[11:]))

        await self.proto.command(b"CAPABILITY", untagged=untagged)
        return shared(frozenset(caps))

    async def logout(self, timeout):
        """Write LOGOUT and close the connection behind it, without waiting
        for the answer: once every mark is confirmed nothing the server can
        say matters, and waiting costs a round trip per session.  The
        connection is aborted if it is not closed within ``timeout`` (a
        server that reads nothing: LOGOUT's deadline)."""
        proto = self.proto
        if proto is None or proto.closed:
            return
        if proto.state is None or proto.error is not None:
            self.abort()
            return
        proto.logging_out = True
        # the command's deadline is the bound: a server that neither reads
        # nor answers within ``timeout`` has the connection aborted
        d = proto.command(b"LOGOUT", timeout=timeout)
        d.addErrback(lambda f: None)  # the answer, or the close, is not read
        close_after_writes(proto.transport)

    def abort(self):
        proto = self.proto
        if proto is not None and not proto.closed:
            proto.transport.abortConnection()

    def forget(self):
        """Drop the objects that refer to each other (protocol, transport,
        TLS connection, Deferreds) so they are freed at once, not by the
        garbage collector."""
        proto, self.proto = self.proto, None
        if proto is not None:
            proto.forget()
        if self.creator is not None:
            self.creator.connections = []
        self.creator = None


def close_after_writes(transport):
    """Close ``transport`` once what was written to it is sent, without
    waiting for the peer: over TLS the close_notify is written and the TCP
    connection under it closed at once (Twisted's TLS ``loseConnection``
    would wait for the server's close_notify: one more round trip; Fido's
    own :class:`~fido_tx.sources.imap.stdtls.TLSClientProtocol` never waits)."""
    transport.loseConnection()
    lower = getattr(transport, "transport", None)  # TLSMemoryBIOProtocol wraps TCP
    if lower is not None and lower is not transport and hasattr(lower, "loseConnection"):
        lower.loseConnection()


class Login:
    """Connect and log in ``account``: :meth:`run` -> :class:`ImapConnection`.

    :ivar connection: the connection as soon as there is one (also when a
        later step fails: the session reads its trace and closes it).
    :param pipeline: ``f(command)``, called right after a LOGIN that needs
        no continuation (no literal) is written, to write the session's
        first command behind it in the same packet (RFC 3501 sec 5.5);
        :attr:`pipelined` says whether it was called.  LOGIN only: after
        an AUTHENTICATE the server may ask for more (``+``) and would read
        the next command as a SASL response.  A refused LOGIN leaves the
        pipelined command to be refused as well (not authenticated): the
        caller must not read into its refusal anything but that.
    """

    def __init__(self, reactor, connector, account, settings, credentials, step,
                 pipeline=None):
        self.pipeline = pipeline
        self.pipelined = False
        #: whether the server's answer to the login carried its capabilities
        self.answer_capabilities = False
        #: whether the login was a LOGIN command (the only one pipelined)
        self.mechanism_was_login = False
        self.reactor = reactor
        self.connector = connector
        self.account = account
        self.settings = settings
        self.credentials = credentials
        self.step = step
        self.connection = None

    async def run(self):
        await self.connect()
        await self.greeting_and_tls()
        conn = self.connection
        if not conn.proto.preauth:
            await self.authenticate()
        if conn.creator is not None and conn.secure:
            if self.step.enabled and conn.creator.resumed():
                self.step("TLS session resumed")
            # verified and logged in (a TLS 1.3 ticket arrives after the
            # handshake): the next session to this server resumes it
            conn.creator.remember_session()
        return conn

    async def connect(self):
        account, settings = self.account, self.settings
        creator = None
        if account.security in ("tls", "starttls"):
            creator = self.connector.tls.creator(account.host, account.ca_file, account.port)
        forms = self.credentials.secret_forms

        def make():
            proto = FidoIMAP4Client(
                self.reactor,
                greeting_timeout=settings.greeting_timeout,
                command_timeout=settings.command_timeout,
                min_literal_rate=settings.min_literal_rate,
            )
            proto.scrub_forms = forms
            # a body is never larger than its RFC822.SIZE (<= max_message_size)
            proto.max_literal = settings.max_message_size + 1024 * 1024
            proto.max_search_uids = settings.max_search_uids
            proto.tls_host = account.host
            return proto

        self.step("connecting to {where}", where=f"{account.host}:{account.port}")
        proto = await self.connector.connect(account, settings.connect_timeout, make, creator)
        self.connection = ImapConnection(account, proto, creator)

    async def greeting_and_tls(self):
        conn = self.connection
        proto = conn.proto
        caps = await proto.greeting
        self.step("greeted")
        if self.account.security == "starttls":
            if proto.preauth:
                raise FidoError(errors.TLS, "server pre-authenticated the plain-text "
                                            "connection, so STARTTLS is impossible")
            if caps is None:
                caps = await conn.capability()
            if b"STARTTLS" not in caps:
                raise FidoError(errors.TLS, "server does not offer STARTTLS "
                                            "(security is starttls: refusing plain text)")
            try:
                await proto.command(b"STARTTLS")
            except ImapCommandError as e:
                raise FidoError(errors.TLS, f"STARTTLS refused: {e.status.decode()} "
                                            f"{_show(e.text)}")
            proto.start_tls(conn.creator)
            self.step("started TLS")
            caps = None  # capabilities before TLS are not to be trusted
        if caps is None:
            caps = await conn.capability()
        conn.caps = caps

    def _mechanism(self):
        conn, auth = self.connection, self.account.auth
        if auth in ("xoauth2", "oauthbearer"):
            return auth
        if auth != "plain" and b"LOGINDISABLED" in conn.caps:
            if b"AUTH=PLAIN" in conn.caps and conn.secure:
                return "plain"
            raise FidoError(errors.AUTH, "server refuses LOGIN (LOGINDISABLED) "
                                         "and offers no AUTH=PLAIN over TLS")
        return auth

    async def authenticate(self):
        conn = self.connection
        mechanism = self._mechanism()
        if mechanism in ("xoauth2", "oauthbearer"):
            # the token's SASL exchange: the error challenge decoded, one
            # retry with a fresh token (fido_tx.sources.imap.bearer)
            from fido_tx.sources.imap import bearer

            text = await bearer.authenticate(conn.proto, conn.caps, self.account,
                                                 self.credentials)
            return await self._logged_in(text)
        user = self.account.username.encode("utf-8")
        secret = (await self.credentials.secret()).encode("utf-8")
        try:
            if mechanism == "plain":
                text = await self._sasl(b"PLAIN", plain_response(user, secret))
            else:
                text = await self._login(user, secret)
        except ImapCommandError as e:
            error = auth_error(e, self.credentials.secret_forms())
            if error.kind == errors.AUTH:
                self.credentials.invalidate()
            raise error
        finally:
            del secret
        await self._logged_in(text)

    async def _logged_in(self, text):
        conn = self.connection
        self.step("logged in")
        new_caps = greeting_capabilities(text)
        self.answer_capabilities = new_caps is not None
        if new_caps is None:
            new_caps = await conn.capability()
        conn.caps = new_caps

    async def _login(self, user, password):
        proto = self.connection.proto
        self.mechanism_was_login = True
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
                proto.fail(FidoError(errors.PROTOCOL,
                                     "unexpected continuation request during LOGIN"))
                return
            proto.send_secret(pending.pop(0))

        d = proto.command(b"LOGIN", first, continuation=continuation)
        if not pending and self.pipeline is not None and not d.called:
            self.pipelined = True
            self.pipeline(proto.command)
        return await d

    async def _sasl(self, mechanism, response):
        """``AUTHENTICATE <mechanism>`` with ``response`` (base64), as an
        initial response when the server has SASL-IR."""
        proto = self.connection.proto
        # a second challenge: PLAIN has nothing more to say (cancel); the
        # OAuth mechanisms get an error report and answer with a dummy
        # response (XOAUTH2: empty; OAUTHBEARER: %x01, RFC 7628), then NO
        after_error = _SASL_AFTER_ERROR.get(mechanism, b"*")
        sent = []

        def continuation(rest):
            if sent:
                proto.send_secret(after_error)
                return
            sent.append(True)
            proto.send_secret(response)

        if b"SASL-IR" in self.connection.caps:
            sent.append(True)
            return await proto.command(b"AUTHENTICATE", mechanism + b" " + response,
                                       continuation=continuation)

        return await proto.command(b"AUTHENTICATE", mechanism, continuation=continuation)
