"""A scriptable mock IMAP4rev1 server for resilience tests and benchmarks.

A real TCP server (a Twisted protocol), written by hand rather than on
``IMAP4Server`` so that every byte it sends can be scripted.  Normal operation
covers what a fetcher needs: CAPABILITY, STARTTLS, LOGIN, AUTHENTICATE PLAIN,
SELECT/EXAMINE, UID SEARCH, UID FETCH (with literals), UID STORE, EXPUNGE,
UID EXPUNGE, UID COPY, UID MOVE, CREATE, LIST, STATUS, NOOP, CLOSE, LOGOUT.

Use from a pytest-twisted test::

    server = MockIMAPServer(reactor, {"u1": MockMailbox("pw", [raw1, raw2])})
    port = server.listen()                       # 127.0.0.1, a free port
    server.script("u1", Behaviour(faults=(Fault("SELECT", "no"),)))
    ...                                          # run the client
    server.mailbox("u1").flags(1)                # -> {"\\Seen"}
    server.commands("u1", "UID STORE")           # -> [Command, ...]
    yield server.stop()

Behaviours that happen before LOGIN (refusing, never greeting, greeting late)
cannot know the user yet: they come from the account a port is bound to
(``server.listen(account="u1")``), else from the default script
(``server.script(None, Behaviour(...))``).  After LOGIN, the user's script
applies.

In memory (``twisted.test.iosim`` and a fake clock), build the server side
of one connection with ``server.build_protocol("u1")`` and connect it to the
client protocol yourself (see tests/test_resilience.py).

Or in its own process, for benchmarks::

    python -m tests.support.mockimap --port 1143 --accounts 10000 --messages 5 \
        [--tls cert.pem key.pem] [--implicit-tls]

Users are ``user1`` .. ``userN``, password ``password``, created on first use;
no command records are kept there, so memory stays flat (about 70 MB with
10,000 idle connections).
"""

import argparse
import base64
import itertools
import re
import sys
from collections import deque

import attr
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPullProducer
from zope.interface import implementer

#: Fault actions (see :class:`Fault`).
ACTIONS = frozenset(
    ["no", "bad", "bye", "silent", "drop", "garbage", "truncate", "trickle", "replace",
     "inject", "delay"]
)

DEFAULT_CAPABILITIES = ("IMAP4rev1", "MOVE", "UIDPLUS", "AUTH=PLAIN")
SYSTEM_FLAGS = (b"\\Answered", b"\\Flagged", b"\\Deleted", b"\\Seen", b"\\Draft")
GARBAGE = b"\x01garbage\xff )(( {bad\r\n"
TAG = b"$TAG"  # replaced by the command's tag in ``replace``/``inject`` text


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Fault:
    """What to do instead of (or around) the normal answer to one command.

    :ivar command: the command name as the client sends it, upper case
        (``"LOGIN"``, ``"SELECT"``, ``"UID FETCH"``, ``"LOGOUT"``), or ``"*"``
        for any command.
    :ivar action:
        - ``no`` / ``bad``: tagged ``NO``/``BAD`` with ``text``;
        - ``bye``: an untagged ``BYE`` with ``text``, then close;
        - ``silent``: never answer (the connection stays open);
        - ``drop``: send the first ``after_bytes`` of the real answer, then
          close (``after_bytes`` inside a FETCH literal drops mid-literal);
        - ``garbage``: send ``text`` (default :data:`GARBAGE`) instead;
        - ``truncate``: send the first untagged line of the real answer cut
          to ``after_bytes`` (default: half), then the tagged ``OK``;
        - ``trickle``: send the real answer at ``rate`` bytes/s;
        - ``replace``: send ``text`` instead (``$TAG`` becomes the tag);
        - ``inject``: send ``text`` first, then the real answer;
        - ``delay``: send the real answer after ``delay`` seconds.
    :ivar nth: 0 = every time; k = only the k-th such command of a connection.
    """

    command: str
    action: str = attr.ib(validator=attr.validators.in_(ACTIONS))
    text: bytes = b""
    after_bytes: int | None = None
    rate: float = 0.0
    delay: float = 0.0
    nth: int = 0

    def matches(self, name, count):
        return (self.command == "*" or self.command == name) and self.nth in (0, count)


#: Hostile modes (``Behaviour.hostile``):
#:
#: - ``literal_chain``: a UID FETCH of bodies is answered with one FETCH
#:   response chaining literals of ``hostile_size`` bytes for ever;
#: - ``lying_size``: RFC822.SIZE says ``claimed_size`` (default 100), BODY[]
#:   literals are ``hostile_size`` bytes;
#: - ``status_chain``: STATUS answers a mailbox name literal chain for ever;
#: - ``search_flood``: UID SEARCH answers SEARCH lines of ``hostile_size``
#:   UIDs for ever;
#: - ``untagged_flood``: SELECT/EXAMINE answers ``* OK`` lines for ever;
#: - ``no_body``, ``body_nil``, ``other_uid``, ``double_body``: a FETCH of
#:   BODY[] answers without BODY[], with BODY[] NIL, for another UID, or twice
#:   for one UID with different bodies (completed normally);
#: - ``slow_body``: RFC822.SIZE says ``claimed_size`` (default
#:   ``hostile_size``), and a FETCH of BODY[] answers the first message asked
#:   with a literal of ``hostile_size`` bytes trickled at ``hostile_rate``
#:   bytes/s (a slow liar: it would hold the in-flight budget).
HOSTILE = ("literal_chain", "lying_size", "status_chain", "search_flood", "untagged_flood",
           "no_body", "body_nil", "other_uid", "double_body", "slow_body")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Behaviour:
    """How the server behaves for one account (or before login, for a port).

    :ivar connect: ``greet`` (normal), ``close`` (close at once, no greeting),
        ``reset`` (abort at once with a TCP RST), ``silent`` (accept and never
        greet: a connection queue).
    :ivar greeting_delay: seconds before the greeting.
    :ivar capabilities: advertised; ``STARTTLS`` and ``LOGINDISABLED`` are
        added by ``starttls``/``login_disabled`` while the link is plain.
    :ivar starttls: offer and accept STARTTLS (the server needs ``tls``).
    :ivar login_disabled: refuse LOGIN/AUTHENTICATE before TLS.
    :ivar faults: :class:`Fault` values, first match wins.
    :ivar max_connections: LOGIN answers ``NO [LIMIT]`` when this many
        sessions of the user are already logged in.
    :ivar uidvalidity: per-session UIDVALIDITY of INBOX: session k (k-th
        successful login, 1-based) sees ``uidvalidity[min(k, len) - 1]``;
        empty keeps the mailbox's own.
    :ivar search_uids: when set, every SEARCH answers these UIDs.
    :ivar bare_lf: end every line the server sends (greeting, untagged,
        tagged, continuation, the line announcing a literal) with a bare LF
        instead of CRLF; literal bytes are sent unchanged (see :func:`bare_lf`).
    :ivar uidvalidity_churn: every new session (successful LOGIN) that
        selects INBOX finds a new UIDVALIDITY and the messages renumbered
        1..n in mailbox order, as on a server that rebuilds its index on
        every open.
    :ivar hostile: one of :data:`HOSTILE` (after login; see there):
        a server that breaks the protocol to harm its client.
    :ivar hostile_size: bytes of each literal a hostile mode sends (the lie
        of ``lying_size``, the links of a chain); SEARCH: UIDs per line.
    :ivar claimed_size: ``lying_size``/``literal_chain``/``slow_body``: the
        RFC822.SIZE claimed for every message (``None``: the true size).
    :ivar hostile_rate: ``slow_body``: bytes per second of the body literal.
    """

    connect: str = attr.ib(default="greet", validator=attr.validators.in_(
        ["greet", "close", "reset", "silent"]))
    greeting_delay: float = 0.0
    capabilities: tuple = DEFAULT_CAPABILITIES
    starttls: bool = False
    login_disabled: bool = False
    faults: tuple = ()
    max_connections: int | None = None
    uidvalidity: tuple = ()
    search_uids: tuple | None = None
    bare_lf: bool = False
    uidvalidity_churn: bool = False
    hostile: str = attr.ib(default="", validator=attr.validators.in_(("",) + HOSTILE))
    hostile_size: int = 1024 * 1024
    claimed_size: int | None = None
    hostile_rate: float = 4096.0


#: Convenience: the answer of a server that limits connections per user.
TOO_MANY_CONNECTIONS = Fault(
    "LOGIN", "no", b"[LIMIT] Too many simultaneous connections for this user")


@attr.s(slots=True)
class MockMessage:
    """One stored message; ``flags`` is a mutable set of ``str``."""

    uid = attr.ib()
    raw = attr.ib(repr=False)
    flags = attr.ib(factory=set)
    internaldate = attr.ib(default="02-Nov-2026 10:00:00 +0000")


@attr.s(slots=True)
class Folder:
    uidvalidity = attr.ib()
    messages = attr.ib(factory=list)
    uidnext = attr.ib(default=1)
    #: the login count at which uidvalidity_churn last renumbered the folder
    churned = attr.ib(default=0)

    def renumber(self):
        """A new UIDVALIDITY and UIDs 1..n in order (uidvalidity_churn)."""
        self.uidvalidity += 1
        for uid, m in enumerate(self.messages, 1):
            m.uid = uid
        self.uidnext = len(self.messages) + 1

    def append(self, raw, flags=()):
        msg = MockMessage(self.uidnext, bytes(raw), set(flags))
        self.uidnext += 1
        self.messages.append(msg)
        return msg.uid


class MockMailbox:
    """One user's mail: a password and folders (``INBOX`` first).

    Mutable state that tests inspect: :meth:`flags`, :meth:`uids`,
    ``expunged`` (list of (folder, uid, raw)).
    """

    def __init__(self, password, messages=(), uidvalidity=1, folders=()):
        self.password = password
        self.folders = {"INBOX": Folder(uidvalidity)}
        for name in folders:
            self.folders[name] = Folder(uidvalidity + 1000)
        self.expunged = []
        self.logins = 0
        for m in messages:
            if isinstance(m, tuple):
                self.append(m[0], m[1])
            else:
                self.append(m)

    @property
    def uidvalidity(self):
        return self.folders["INBOX"].uidvalidity

    def append(self, raw, flags=(), folder="INBOX"):
        """Add a message; returns its UID."""
        return self.folders[folder].append(raw, flags)

    def message(self, uid, folder="INBOX"):
        for m in self.folders[folder].messages:
            if m.uid == uid:
                return m
        raise KeyError(uid)

    def flags(self, uid, folder="INBOX"):
        return set(self.message(uid, folder).flags)

    def reuse_uid(self, uid, raw, folder="INBOX"):
        """A server restored from backup: ``uid`` now holds ``raw``, a
        different message, unseen (RFC 3501 forbids it; servers do it)."""
        m = self.message(uid, folder)
        m.raw = bytes(raw)
        m.flags.clear()

    def uids(self, folder="INBOX"):
        return [m.uid for m in self.folders[folder].messages]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Command:
    """One command as received.  ``args`` are parsed (strings unquoted,
    lists nested); for LOGIN they include the password, so tests can check
    exactly what was sent."""

    connection: int
    tag: bytes
    name: str
    args: tuple
    raw: bytes = attr.ib(repr=False)


@attr.s(slots=True)
class ConnectionRecord:
    """One accepted connection: who it was, what it sent, whether it is open."""

    id = attr.ib()
    account = attr.ib(default=None)  # the port's account, then the LOGIN user
    user = attr.ib(default=None)     # the user that logged in successfully
    commands = attr.ib(factory=list)
    open = attr.ib(default=True)
    tls = attr.ib(default=False)
    bytes_sent = attr.ib(default=0)


class ParseError(Exception):
    pass


class _Literal(bytes):
    pass


def parse_args(parts):
    """Tokens of a command from text parts and literals: bytes or nested lists."""
    stack = [[]]
    for part in parts:
        if isinstance(part, _Literal):
            stack[-1].append(bytes(part))
            continue
        i, n = 0, len(part)
        while i < n:
            c = part[i:i + 1]
            if c == b" ":
                i += 1
            elif c == b"(":
                stack.append([])
                i += 1
            elif c == b")":
                if len(stack) == 1:
                    raise ParseError("unbalanced )")
                inner = stack.pop()
                stack[-1].append(inner)
                i += 1
            elif c == b'"':
                out, i = bytearray(), i + 1
                while True:
                    if i >= n:
                        raise ParseError("unterminated string")
                    ch = part[i:i + 1]
                    if ch == b"\\" and i + 1 < n:
                        out += part[i + 1:i + 2]
                        i += 2
                    elif ch == b'"':
                        i += 1
                        break
                    else:
                        out += ch
                        i += 1
                stack[-1].append(bytes(out))
            else:
                j, depth = i, 0
                while j < n:
                    ch = part[j:j + 1]
                    if ch == b"[":
                        depth += 1
                    elif ch == b"]":
                        depth -= 1
                    elif depth <= 0 and ch in b" ()":
                        break
                    j += 1
                stack[-1].append(part[i:j])
                i = j
    if len(stack) != 1:
        raise ParseError("unbalanced (")
    return stack[0]


def parse_set(text, largest):
    """A sequence set (``1:3,7,9:*``) as a membership predicate."""
    ranges = []
    for piece in text.split(b","):
        bounds = []
        for b in piece.split(b":"):
            if b == b"*":
                bounds.append(largest)
            elif b.isdigit():
                bounds.append(int(b))
            else:
                raise ParseError(f"bad set {text!r}")
        if len(bounds) == 1:
            bounds.append(bounds[0])
        if len(bounds) != 2:
            raise ParseError(f"bad set {text!r}")
        ranges.append((min(bounds), max(bounds)))
    return lambda x: any(lo <= x <= hi for lo, hi in ranges)


def _quote(value):
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _flag_list(flags):
    return b"(" + b" ".join(sorted(f.encode() for f in flags)) + b")"


def _headers(raw):
    end = raw.find(b"\r\n\r\n")
    if end == -1:
        end = raw.find(b"\n\n")
        return raw if end == -1 else raw[:end + 2]
    return raw[:end + 4]


def _header_fields(raw, names, negate=False):
    wanted = {n.upper() for n in names}
    out, keep = [], False
    for line in _headers(raw).splitlines(keepends=True):
        if line.strip() == b"":
            continue
        if line[:1] not in b" \t":
            keep = (line.split(b":", 1)[0].strip().upper() in wanted) != negate
        if keep:
            out.append(line)
    return b"".join(out) + b"\r\n"



# -- IDLE (RFC 2177): kept in its own classes, mixed into the protocol and
# -- the server below, so that other edits of this file merge cleanly.

IDLE_CAPABILITIES = DEFAULT_CAPABILITIES + ("IDLE",)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class IdleBehaviour:
    """How the server treats an IDLE of one user (see :meth:`MockIMAPServer.script_idle`).

    :ivar drop_after: seconds after ``+`` when the server ends an idling
        connection (``None``: never), as servers with an inactivity limit do.
    :ivar drop_with: ``"close"`` (just close), ``"bye"`` (``* BYE`` first,
        like Dovecot's "Disconnected for inactivity") or ``"silent"`` (stop
        answering anything, the connection left open: a dead peer).
    :ivar bye_text: the text of that BYE.
    :ivar silent: answer ``+`` and then nothing at all (not even DONE).
    """

    drop_after: float | None = None
    drop_with: str = attr.ib(default="close",
                             validator=attr.validators.in_(["close", "bye", "silent"]))
    bye_text: bytes = b"Disconnected for inactivity."
    silent: bool = False


_IDLE_NORMAL = IdleBehaviour()


class IdleProtocolSupport:
    """The protocol side of IDLE: ``+``, EXISTS pushed while idling, DONE."""

    _idle_tag = None
    #: new mail came while this connection had the folder selected but was
    #: not idling: announced when its next IDLE starts (as servers do)
    _exists_pending = False

    @property
    def idling(self):
        return self._idle_tag is not None

    def do_IDLE(self, tag, args):
        if "IDLE" not in self.behaviour.capabilities:
            return tag + b" BAD Unknown command\r\n"
        b = self.server.idle_behaviour_for(self.record.user)
        self._idle_tag = tag
        self._continuation = self._idle_line
        if b.silent:
            self._after = self._go_silent
        elif b.drop_after is not None:
            self._later(b.drop_after, self._idle_drop, b)
        reply = b"+ idling\r\n"
        if self._exists_pending and self._folder is not None:
            reply += b"* %d EXISTS\r\n" % len(self._folder[1].messages)
        self._exists_pending = False
        return reply

    def _idle_line(self, line):
        tag, self._idle_tag = self._idle_tag, None
        if tag is None:
            return
        if line.strip().upper() != b"DONE":
            self._send(tag + b" BAD Expected DONE\r\n")
            return
        self._send(tag + b" OK Idle completed\r\n")

    def _go_silent(self):
        self._out.clear()
        self.state = "logout"  # reads nothing more, answers nothing

    def _idle_drop(self, b):
        if not self.idling or not self.record.open:
            return
        if b.drop_with == "silent":
            self._go_silent()
        elif b.drop_with == "bye":
            self._send(b"* BYE " + b.bye_text + b"\r\n")
            self._then(self._close)
        else:
            self._close()

    def notify_exists(self, folder_name):
        """New mail in ``folder_name``: tell this connection if it idles
        there, or when its next IDLE starts."""
        if self._folder is None or self._folder[0] != folder_name \
                or self.state != "selected":
            return
        if self.idling:
            self._send(b"* %d EXISTS\r\n" % len(self._folder[1].messages))
        else:
            self._exists_pending = True


# -- OAuth2 tokens that expire under a logged-in session (Microsoft 365),
# -- in their own classes for the same reason.

#: what Microsoft 365 sends on the first command after the token expired
ACCESS_TOKEN_EXPIRED = b"Session invalidated - AccessTokenExpired"


class BearerExpiryProtocol:
    """The protocol side: a session logged in with a token ends when the
    token expires (see :class:`BearerExpiryServer`)."""

    _bearer_token = None

    def _bearer_logged_in(self, token):
        self._bearer_token = token
        expires = self.server.bearer_expires_at(token)
        if expires is not None and self.server.bearer_expired != "ignore":
            self._later(max(0.0, expires - self.server.reactor.seconds()),
                        self._expired_while_idle)

    def _expired_while_idle(self):
        if self.idling and self.record.open and self.server.bearer_expired == "bye":
            self.server.expired_sessions.append(self.record.user)
            self._send(b"* BYE " + ACCESS_TOKEN_EXPIRED + b"\r\n")
            self._then(self._close)

    def _token_expired(self, tag):
        """Answer a command after the token expired; False: not expired."""
        if self._bearer_token is None or self.server.bearer_expired == "ignore":
            return False
        expires = self.server.bearer_expires_at(self._bearer_token)
        if expires is None or self.server.reactor.seconds() < expires:
            return False
        self.server.expired_sessions.append(self.record.user)
        if self.server.bearer_expired == "bye":
            self._send(b"* BYE " + ACCESS_TOKEN_EXPIRED + b"\r\n")
            self._then(self._close)
        else:
            self._send(tag + b" NO " + ACCESS_TOKEN_EXPIRED + b"\r\n")
        return True


class BearerExpiryServer:
    """The server side: ``bearer_expires_at(token)`` -> clock seconds the
    token expires (or ``None``); ``bearer_expired`` says what a session
    logged in with it gets after that: ``"bye"`` (Microsoft 365: ``* BYE
    Session invalidated - AccessTokenExpired`` on the next command, or at
    once while idling, then close), ``"no"`` (a tagged ``NO`` naming it) or
    ``"ignore"`` (Gmail: the session goes on).  ``expired_sessions``: the
    user of each session so ended."""

    bearer_expired = "bye"

    def bearer_expires_at(self, token):
        expiry = self.__dict__.get("bearer_expiry")
        return expiry(token) if expiry is not None else None

    @property
    def expired_sessions(self):
        return self.__dict__.setdefault("_expired_sessions", [])


class IdleServerSupport(BearerExpiryServer):
    """The server side of IDLE: per-user IDLE scripts and :meth:`deliver`."""

    def script_idle(self, user, behaviour):
        """Set how ``user``'s IDLE behaves (``None``: the default for all)."""
        self.__dict__.setdefault("_idle_scripts", {})[user] = behaviour

    def idle_behaviour_for(self, user):
        scripts = self.__dict__.get("_idle_scripts", {})
        return scripts.get(user) or scripts.get(None) or _IDLE_NORMAL

    def deliver(self, user, raw, flags=(), folder="INBOX"):
        """Append a message (as LMTP would) and push ``EXISTS`` to every
        connection of ``user`` idling in ``folder``; returns its UID."""
        uid = self.mailbox(user).append(raw, flags, folder)
        for p in list(self._protocols.values()):
            if p.record.user == user:
                p.notify_exists(folder)
        return uid

    def idling(self, user=None):
        """Connections idling now (optionally of one user)."""
        return sum(1 for p in self._protocols.values()
                   if p.idling and (user is None or p.record.user == user))


class _Control(protocol.Protocol):
    """``DELIVER <user>`` lines: append a sample message (and push EXISTS);
    answers ``OK <uid>``.  For benchmarks running the server in its own
    process (``--control-port``)."""

    def __init__(self, server):
        self.server = server
        self.buffer = b""
        self.count = 0

    def dataReceived(self, data):
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            words = line.strip().split()
            if len(words) == 2 and words[0].upper() == b"DELIVER":
                user = words[1].decode("utf-8", "replace")
                if self.server.mailbox(user) is None:
                    self.transport.write(b"NO unknown user\n")
                    continue
                self.count += 1
                uid = self.server.deliver(user, sample_message(10**6 + self.count, user))
                self.transport.write(b"OK %d\n" % uid)
            else:
                self.transport.write(b"BAD\n")


def listen_control(reactor, server, port, interface="127.0.0.1"):
    """Listen for :class:`_Control` lines; returns the listening port."""
    factory = protocol.Factory.forProtocol(lambda: _Control(server))
    factory.noisy = False
    return reactor.listenTCP(port, factory, interface=interface)


class MockIMAPProtocol(IdleProtocolSupport, BearerExpiryProtocol, protocol.Protocol):
    """One server-side connection.  States: ``greeting`` -> ``unauth`` ->
    ``auth`` -> ``selected`` -> ``logout``."""

    def __init__(self, server, record, port_tls):
        self.server = server
        self.record = record
        self.state = "greeting"
        self.tls_active = port_tls
        self._buffer = b""
        self._streaming = False  # answering a command with _stream()
        self._delaying = False  # a "delay" fault holds the answers (in order)
        self._parts = []
        self._literal = 0
        self._continuation = None  # callable(line) for AUTHENTICATE
        self._out = deque()  # (bytes, rate) or callables
        self._pumping = False
        self._counts = {}
        self._folder = None  # (name, Folder, readonly)
        self._delayed = []
        self._after = None

    # -- connection ------------------------------------------------------
    @property
    def behaviour(self):
        return self.server.behaviour_for(self.record.account)

    def connectionMade(self):
        b = self.behaviour
        if b.connect == "close":
            self.transport.loseConnection()
        elif b.connect == "reset":
            _abort_with_rst(self.transport)
        elif b.connect == "greet":
            if b.greeting_delay:
                self._later(b.greeting_delay, self._greet)
            else:
                self._greet()

    def connectionLost(self, reason):
        self.state = "logout"
        for call in self._delayed:
            if call.active():
                call.cancel()
        self._out.clear()
        self.server._closed(self.record)

    def _later(self, seconds, f, *args):
        self._delayed = [c for c in self._delayed if c.active()]
        self._delayed.append(self.server.reactor.callLater(seconds, f, *args))

    def _greet(self):
        if self.state != "greeting":
            return
        self.state = "unauth"
        self._send(b"* OK [CAPABILITY " + self._capabilities() + b"] Mock IMAP4rev1 ready\r\n")

    def _capabilities(self):
        b = self.behaviour
        caps = list(b.capabilities)
        if not self.tls_active:
            if b.starttls and self.server.tls is not None:
                caps.append("STARTTLS")
            if b.login_disabled:
                caps.append("LOGINDISABLED")
        return " ".join(caps).encode()

    # -- output: a queue of (data, rate) and callables, paced --------------
    def _send(self, data, rate=0.0):
        if data and self.behaviour.bare_lf:
            data = bare_lf(data)
        if data:
            self._out.append((data, rate))
        self._pump()

    def _then(self, f):
        self._out.append(f)
        self._pump()

    def _pump(self):
        if self._pumping or not self.record.open:
            return
        while self._out:
            item = self._out[0]
            if callable(item):
                self._out.popleft()
                item()
                continue
            data, rate = item
            if not rate:
                self._out.popleft()
                self._write(data)
                continue
            tick = 0.05
            chunk = max(1, int(rate * tick))
            self._out[0] = (data[chunk:], rate)
            if not self._out[0][0]:
                self._out.popleft()
            self._write(data[:chunk])
            self._pumping = True
            self._later(chunk / rate, self._resume)
            return

    def _resume(self):
        self._pumping = False
        self._pump()

    def _write(self, data):
        if self.record.open:
            self.record.bytes_sent += len(data)
            self.server.bytes_sent += len(data)
            self.transport.write(data)

    def _stream(self, chunks):
        """Send the chunks of an endless (or long) iterator as fast as the
        client reads, holding one chunk at a time (a pull producer).  Like
        a real server, the commands pipelined behind are read only after
        it (never, for an endless one)."""
        proto = self
        self._streaming = True

        @implementer(IPullProducer)
        class Producer:
            def resumeProducing(self):
                if not proto.record.open:
                    return
                try:
                    chunk = next(chunks)
                except StopIteration:
                    proto.transport.unregisterProducer()
                    proto._streaming = False
                    proto.dataReceived(b"")  # what was pipelined behind it
                    return
                proto._write(chunk)

            def stopProducing(self):
                pass

        self.transport.registerProducer(Producer(), False)

    def _close(self, abort=False):
        self._out.clear()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    # -- input -------------------------------------------------------------
    def dataReceived(self, data):
        self._buffer += data
        while self._buffer and self.record.open and self.state != "logout" and \
                not self._streaming and not self._delaying:
            if self._literal:
                if len(self._buffer) < self._literal:
                    return
                self._parts.append(_Literal(self._buffer[:self._literal]))
                self._buffer = self._buffer[self._literal:]
                self._literal = 0
                continue
            end = self._buffer.find(b"\r\n")
            if end == -1:
                if len(self._buffer) > 65536:
                    self._close()
                return
            line, self._buffer = self._buffer[:end], self._buffer[end + 2:]
            if self._continuation is not None:
                handler, self._continuation = self._continuation, None
                handler(line)
                continue
            m = re.search(rb"\{(\d+)(\+?)\}$", line)
            if m:
                self._parts.append(line[:m.start()])
                self._literal = int(m.group(1))
                if not m.group(2):
                    self._send(b"+ Ready for literal data\r\n")
                if self._literal == 0:
                    self._parts.append(_Literal(b""))
                continue
            parts, self._parts = self._parts + [line], []
            self._command(parts)

    def _command(self, parts):
        raw = b"".join(p if not isinstance(p, _Literal) else b"{%d}\r\n%s" % (len(p), p)
                       for p in parts)
        try:
            tokens = parse_args(parts)
            if len(tokens) < 2 or not all(isinstance(t, bytes) for t in tokens[:2]):
                raise ParseError("no tag or command")
        except ParseError as e:
            tag = raw.split(b" ", 1)[0] or b"*"
            self._send(tag + b" BAD " + str(e).encode() + b"\r\n")
            return
        tag, name, args = tokens[0], tokens[1].decode("ascii", "replace").upper(), tokens[2:]
        if name == "UID" and args and isinstance(args[0], bytes):
            name = "UID " + args[0].decode("ascii", "replace").upper()
            args = args[1:]
        if self.server.keep_records:
            self.record.commands.append(Command(self.record.id, tag, name, tuple(args), raw))
        count = self._counts[name] = self._counts.get(name, 0) + 1
        if name != "LOGOUT" and self._token_expired(tag):
            return
        fault = next((f for f in self.behaviour.faults if f.matches(name, count)), None)
        if name == "LOGIN" and fault is None and len(args) == 2:
            # the user's own script applies from LOGIN on
            user = args[0].decode("utf-8", "replace")
            fault = next((f for f in self.server.behaviour_for(user).faults
                          if f.matches(name, count)), None)
        if fault is not None and fault.action in ("no", "bad", "bye", "silent", "garbage",
                                                  "replace"):
            return self._fault_instead(tag, fault)
        if self.behaviour.hostile and self.state in ("auth", "selected") and \
                self._hostile(tag, name, args):
            return
        self._after = None
        try:
            reply = self._dispatch(tag, name, args)
        except ParseError as e:
            reply = tag + b" BAD " + str(e).encode() + b"\r\n"
        after, self._after = self._after, None
        if fault is None:
            self._send(reply)
            if after is not None:
                self._then(after)
        else:
            self._fault_around(tag, fault, reply, after)

    def _delayed_answer(self, tag, reply, after):
        self._delaying = False
        self._fault_around(tag, Fault("*", "inject"), reply, after)
        self.dataReceived(b"")  # the commands written meanwhile

    def _fault_instead(self, tag, fault):
        a = fault.action
        if a in ("no", "bad"):
            text = fault.text or b"Scripted failure"
            self._send(tag + b" " + a.upper().encode() + b" " + text + b"\r\n")
        elif a == "bye":
            self._send(b"* BYE " + (fault.text or b"Server shutting down") + b"\r\n")
            self._then(self._close)
        elif a == "garbage":
            self._send(fault.text or GARBAGE)
        elif a == "replace":
            self._send(fault.text.replace(TAG, tag))

    def _fault_around(self, tag, fault, reply, after):
        a = fault.action
        if a == "drop":
            self._send(reply[:fault.after_bytes or 0])
            self._then(self._close)  # flushes what was sent, then FIN
        elif a == "truncate":
            first, sep, _ = reply.partition(b"\r\n")
            if first.startswith(b"*"):
                cut = fault.after_bytes if fault.after_bytes is not None else len(first) // 2
                self._send(first[:cut] + b"\r\n" + tag + b" OK done\r\n")
            else:
                self._send(first[:fault.after_bytes or 1] + b"\r\n")
            return
        elif a == "trickle":
            self._send(reply, rate=fault.rate or 1.0)
        elif a == "inject":
            self._send(fault.text.replace(TAG, tag))
            self._send(reply)
        elif a == "delay":
            # like a server busy with the command: what was written behind
            # it (pipelined) is answered after it, in order
            self._delaying = True
            self._later(fault.delay, self._delayed_answer, tag, reply, after)
            return
        if after is not None:
            self._then(after)

    # -- hostile modes (Behaviour.hostile) ----------------------------------
    def _wants_body(self, name, args):
        if name != "UID FETCH" or len(args) != 2:
            return False
        items = args[1] if isinstance(args[1], list) else [args[1]]
        return any(isinstance(i, bytes) and i.upper().startswith(b"BODY") for i in items)

    def _hostile(self, tag, name, args):
        """Answer ``name`` the hostile way; False: answer it normally."""
        b = self.behaviour
        mode, size = b.hostile, b.hostile_size
        if name.startswith("UID ") and self.state != "selected":
            return False
        if mode == "literal_chain" and self._wants_body(name, args):
            uid = self._messages()[0].uid if self._messages() else 1
            link = b"x" * size
            self._stream(itertools.chain(
                [b"* 1 FETCH (UID %d BODY[] {%d}\r\n" % (uid, size)],
                itertools.cycle([link, b" X-MORE {%d}\r\n" % size])))
            return True
        if mode == "status_chain" and name == "STATUS":
            link = b"s" * size
            self._stream(itertools.chain(
                [b"* STATUS {%d}\r\n" % size],
                itertools.cycle([link, b" {%d}\r\n" % size])))
            return True
        if mode == "search_flood" and name == "UID SEARCH":
            line = b"* SEARCH" + b"".join(b" %d" % u for u in range(1, size + 1)) + b"\r\n"
            self._stream(itertools.repeat(line))
            return True
        if mode == "untagged_flood" and name in ("SELECT", "EXAMINE"):
            self._stream(itertools.repeat(b"* OK still thinking\r\n" * 1000))
            return True
        if mode == "slow_body" and self._wants_body(name, args):
            want = parse_set(args[0], self._largest_uid())
            seq, m = next(((i, m) for i, m in enumerate(self._messages(), 1) if want(m.uid)),
                          (1, None))
            if m is None:
                return False
            self._write(b"* %d FETCH (UID %d BODY[] {%d}\r\n" % (seq, m.uid, size))
            self._drip(size, b.hostile_rate, b")\r\n" + tag + b" OK FETCH completed\r\n")
            return True
        if mode in ("no_body", "body_nil", "other_uid", "double_body", "lying_size") and \
                self._wants_body(name, args):
            want = parse_set(args[0], self._largest_uid())
            out = []
            for seq, m in enumerate(self._messages(), 1):
                if want(m.uid):
                    out.append(self._hostile_fetch(mode, seq, m, size))
            self._send(b"".join(out) + tag + b" OK FETCH completed\r\n")
            return True
        return False

    def _drip(self, size, rate, then, tick=0.05):
        """Send ``size`` bytes at ``rate`` bytes/s (never held whole), then ``then``."""
        if not self.record.open:
            return
        chunk = min(size, max(1, int(rate * tick)))
        self._write(b"y" * chunk)
        if size > chunk:
            self._later(chunk / rate, self._drip, size - chunk, rate, then, tick)
        else:
            self._write(then)

    def _hostile_fetch(self, mode, seq, m, size):
        if mode == "no_body":
            return b"* %d FETCH (UID %d FLAGS ())\r\n" % (seq, m.uid)
        if mode == "body_nil":
            return b"* %d FETCH (UID %d BODY[] NIL)\r\n" % (seq, m.uid)
        if mode == "other_uid":
            return b"* %d FETCH (UID %d BODY[] {%d}\r\n%s)\r\n" % (
                seq, m.uid + 1000, len(m.raw), m.raw)
        if mode == "double_body":
            other = m.raw.replace(b"Subject:", b"Subject: (second)")
            return b"".join(b"* %d FETCH (UID %d BODY[] {%d}\r\n%s)\r\n" % (
                seq, m.uid, len(raw), raw) for raw in (m.raw, other))
        # lying_size: the body is ``size`` bytes, whatever RFC822.SIZE said
        body = m.raw + b"y" * max(0, size - len(m.raw))
        return b"* %d FETCH (UID %d BODY[] {%d}\r\n%s)\r\n" % (seq, m.uid, len(body), body)

    # -- commands ----------------------------------------------------------
    def _dispatch(self, tag, name, args):
        """Run a command; returns the bytes to send (callables queued too)."""
        handler = getattr(self, "do_" + name.replace(" ", "_"), None)
        if handler is None:
            return tag + b" BAD Unknown command\r\n"
        allowed = {
            "CAPABILITY": None, "NOOP": None, "LOGOUT": None, "ID": None,
            "STARTTLS": {"unauth"}, "LOGIN": {"unauth"}, "AUTHENTICATE": {"unauth"},
        }.get(name, {"auth", "selected"})
        if name.startswith("UID ") or name in ("EXPUNGE", "CLOSE", "UNSELECT", "CHECK"):
            allowed = {"selected"}
        if allowed is not None and self.state not in allowed:
            return tag + b" BAD Command not allowed in state " + self.state.encode() + b"\r\n"
        return handler(tag, args)

    def do_CAPABILITY(self, tag, args):
        return b"* CAPABILITY " + self._capabilities() + b"\r\n" + tag + b" OK CAPABILITY completed\r\n"

    def do_NOOP(self, tag, args):
        return tag + b" OK NOOP completed\r\n"

    do_CHECK = do_NOOP

    def do_ID(self, tag, args):
        return b'* ID ("name" "mockimap")\r\n' + tag + b" OK ID completed\r\n"

    def do_ENABLE(self, tag, args):
        return b"* ENABLED\r\n" + tag + b" OK ENABLE completed\r\n"

    def do_LOGOUT(self, tag, args):
        self.state = "logout"
        self._after = self._close
        return b"* BYE Mock IMAP4rev1 logging out\r\n" + tag + b" OK LOGOUT completed\r\n"

    def do_STARTTLS(self, tag, args):
        if self.tls_active or self.server.tls is None or not self.behaviour.starttls:
            return tag + b" BAD STARTTLS not available\r\n"
        self._after = self._start_tls
        return tag + b" OK Begin TLS negotiation now\r\n"

    def _start_tls(self):
        self.transport.startTLS(self.server.tls_options())
        self.tls_active = self.record.tls = True

    def _check_login_allowed(self, tag):
        if self.behaviour.login_disabled and not self.tls_active:
            return tag + b" NO [PRIVACYREQUIRED] Login disabled before TLS\r\n"
        return None

    def _login(self, tag, user, password, method):
        user_s = user.decode("utf-8", "replace")
        password_s = password.decode("utf-8", "replace")
        if self.server.keep_records:
            self.server.login_attempts.append((method, user_s, password_s))
        self.record.account = user_s
        mailbox = self.server.mailbox(user_s)
        if mailbox is None or mailbox.password != password_s:
            return tag + b" NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
        limit = self.server.behaviour_for(user_s).max_connections
        if limit is not None and self.server.logged_in(user_s) >= limit:
            return tag + b" NO [LIMIT] Too many simultaneous connections for this user\r\n"
        mailbox.logins += 1
        self.record.user = user_s
        self.state = "auth"
        return tag + b" OK [CAPABILITY " + self._capabilities() + b"] Logged in\r\n"

    def do_LOGIN(self, tag, args):
        refused = self._check_login_allowed(tag)
        if refused:
            return refused
        if len(args) != 2 or not all(isinstance(a, bytes) for a in args):
            return tag + b" BAD LOGIN needs user and password\r\n"
        return self._login(tag, args[0], args[1], "LOGIN")

    def do_AUTHENTICATE(self, tag, args):
        refused = self._check_login_allowed(tag)
        if refused:
            return refused
        if args and args[0].upper() in (b"XOAUTH2", b"OAUTHBEARER") and self.server.bearer_check:
            return self._bearer(tag, args[0].upper().decode(), args[1:])
        if not args or args[0].upper() != b"PLAIN":
            return tag + b" NO Unsupported mechanism\r\n"

        def answer(response):
            if response == b"*":
                return tag + b" BAD Authentication cancelled\r\n"
            try:
                _, user, password = base64.b64decode(response, validate=True).split(b"\0")
            except (ValueError, TypeError):
                return tag + b" BAD Invalid PLAIN response\r\n"
            return self._login(tag, user, password, "AUTHENTICATE PLAIN")

        if len(args) > 1:
            return answer(args[1])
        self._continuation = lambda line: self._send(answer(line.strip()))
        return b"+ \r\n"

    def _bearer(self, tag, mechanism, args):
        """XOAUTH2 / OAUTHBEARER (RFC 7628): on a bad token the error challenge,
        then, after the client's empty answer, a tagged NO."""
        status = base64.b64encode(b'{"status":"401","schemes":"bearer",'
                                  b'"scope":"https://mail.google.com/"}')

        # RFC 7628 3.2.3: OAUTHBEARER's dummy response is one ^A; Google's
        # XOAUTH2 wants an empty line
        dummy = b"AQ==" if mechanism == "OAUTHBEARER" else b""

        def after_challenge(line):
            if line.strip() != dummy:
                self._send(tag + b" BAD Expected the dummy response to the error challenge\r\n")
            else:
                self._send(tag + b" NO [AUTHENTICATIONFAILED] Authentication failed\r\n")

        def answer(response):
            try:
                fields = base64.b64decode(response, validate=True).decode("utf-8").split("\x01")
            except (ValueError, TypeError):
                return tag + b" BAD Invalid " + mechanism.encode() + b" response\r\n"
            user = fields[0][len("user="):] if mechanism == "XOAUTH2" else \
                fields[0].split(",")[1][2:].replace("=2C", ",").replace("=3D", "=")
            auth = [f for f in fields if f.startswith("auth=Bearer ")]
            token = auth[0][len("auth=Bearer "):] if auth else ""
            if self.server.keep_records:
                self.server.bearer_attempts.append((mechanism, user, token))
            mailbox = self.server.mailbox(user)
            if mailbox is None or not self.server.bearer_check(user, token):
                self._continuation = after_challenge
                return b"+ " + status + b"\r\n"
            answer = self._login(tag, user.encode(), mailbox.password.encode(), mechanism)
            if self.state == "auth":
                self._bearer_logged_in(token)
            return answer

        if args:
            return answer(args[0])
        self._continuation = lambda line: self._send(answer(line.strip()))
        return b"+ \r\n"

    def _select(self, tag, args, readonly):
        if len(args) != 1 or not isinstance(args[0], bytes):
            return tag + b" BAD SELECT needs a mailbox name\r\n"
        mailbox = self.server.mailbox(self.record.user)
        name = args[0].decode("utf-8", "replace")
        if name.upper() == "INBOX":
            name = "INBOX"
        folder = mailbox.folders.get(name)
        if folder is None:
            self.state, self._folder = "auth", None
            return tag + b" NO [NONEXISTENT] Mailbox doesn't exist: " + args[0] + b"\r\n"
        if name == "INBOX" and self.behaviour.uidvalidity_churn \
                and folder.churned != mailbox.logins:
            folder.churned = mailbox.logins
            folder.renumber()
        if name == "INBOX" and self.behaviour.uidvalidity:
            seq = self.behaviour.uidvalidity
            folder.uidvalidity = seq[min(mailbox.logins, len(seq)) - 1]
        self.state, self._folder = "selected", (name, folder, readonly)
        unseen = [i for i, m in enumerate(folder.messages, 1) if "\\Seen" not in m.flags]
        out = [
            b"* FLAGS (" + b" ".join(SYSTEM_FLAGS) + b")",
            b"* %d EXISTS" % len(folder.messages),
            b"* 0 RECENT",
        ]
        if unseen:
            out.append(b"* OK [UNSEEN %d] First unseen" % unseen[0])
        out += [
            b"* OK [UIDVALIDITY %d] UIDs valid" % folder.uidvalidity,
            b"* OK [UIDNEXT %d] Predicted next UID" % folder.uidnext,
            b"* OK [PERMANENTFLAGS (" + b" ".join(SYSTEM_FLAGS) + b" \\*)] Flags permitted",
            tag + (b" OK [READ-ONLY] EXAMINE" if readonly else b" OK [READ-WRITE] SELECT")
            + b" completed",
        ]
        return b"\r\n".join(out) + b"\r\n"

    def do_SELECT(self, tag, args):
        return self._select(tag, args, readonly=False)

    def do_EXAMINE(self, tag, args):
        return self._select(tag, args, readonly=True)

    def do_CLOSE(self, tag, args):
        if not self._folder[2]:
            self._expunge(lambda m: True)
        self.state, self._folder = "auth", None
        return tag + b" OK CLOSE completed\r\n"

    def do_UNSELECT(self, tag, args):
        self.state, self._folder = "auth", None
        return tag + b" OK UNSELECT completed\r\n"

    def do_CREATE(self, tag, args):
        mailbox = self.server.mailbox(self.record.user)
        name = args[0].decode("utf-8", "replace") if args and isinstance(args[0], bytes) else ""
        if not name or name in mailbox.folders:
            return tag + b" NO [ALREADYEXISTS] Mailbox exists\r\n"
        mailbox.folders[name] = Folder(mailbox.uidvalidity + 1000 + len(mailbox.folders))
        return tag + b" OK CREATE completed\r\n"

    def do_LIST(self, tag, args):
        mailbox = self.server.mailbox(self.record.user)
        lines = [b'* LIST () "/" ' + _quote(n.encode()) for n in mailbox.folders]
        return b"\r\n".join(lines + [tag + b" OK LIST completed"]) + b"\r\n"

    def do_STATUS(self, tag, args):
        mailbox = self.server.mailbox(self.record.user)
        name = args[0].decode("utf-8", "replace") if args else ""
        folder = mailbox.folders.get("INBOX" if name.upper() == "INBOX" else name)
        if folder is None:
            return tag + b" NO [NONEXISTENT] No such mailbox\r\n"
        unseen = sum(1 for m in folder.messages if "\\Seen" not in m.flags)
        return (b"* STATUS " + _quote(name.encode()) +
                b" (MESSAGES %d UIDNEXT %d UIDVALIDITY %d UNSEEN %d)\r\n"
                % (len(folder.messages), folder.uidnext, folder.uidvalidity, unseen)
                + tag + b" OK STATUS completed\r\n")

    # selected state
    def _messages(self):
        return self._folder[1].messages

    def _largest_uid(self):
        msgs = self._messages()
        return msgs[-1].uid if msgs else 0

    def do_UID_SEARCH(self, tag, args):
        override = self.behaviour.search_uids
        if override is not None:
            uids = list(override)
        else:
            args = list(args)
            if args and args[0].upper() == b"CHARSET":
                args = args[2:]
            msgs = self._messages()
            keys = _SearchKeys(args, len(msgs), self._largest_uid())
            match = keys.parse_all()
            uids = [m.uid for i, m in enumerate(msgs, 1) if match(i, m)]
        line = b"* SEARCH" + b"".join(b" %d" % u for u in uids)
        return line + b"\r\n" + tag + b" OK SEARCH completed\r\n"

    def do_UID_FETCH(self, tag, args):
        if len(args) != 2:
            raise ParseError("UID FETCH needs a set and items")
        want = parse_set(args[0], self._largest_uid())
        items = args[1] if isinstance(args[1], list) else [args[1]]
        items = [i.upper() if isinstance(i, bytes) else i for i in items]
        macros = {b"FAST": [b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"],
                  b"ALL": [b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"]}
        expanded = []
        for i in items:
            expanded += macros.get(i, [i])
        out = []
        for seq, m in enumerate(self._messages(), 1):
            if want(m.uid):
                out.append(self._fetch_one(seq, m, expanded))
        return b"".join(out) + tag + b" OK FETCH completed\r\n"

    def _fetch_one(self, seq, m, items):
        parts = [b"UID %d" % m.uid]
        set_seen = False
        for item in items:
            if not isinstance(item, bytes):
                raise ParseError("bad fetch item")
            if item == b"UID":
                continue
            if item == b"FLAGS":
                continue  # added last, after \Seen may have changed
            elif item == b"RFC822.SIZE":
                claimed = self.behaviour.claimed_size
                if claimed is None and self.behaviour.hostile == "lying_size":
                    claimed = 100
                elif claimed is None and self.behaviour.hostile == "slow_body":
                    claimed = self.behaviour.hostile_size
                parts.append(b"RFC822.SIZE %d" % (len(m.raw) if claimed is None else claimed))
            elif item == b"INTERNALDATE":
                parts.append(b'INTERNALDATE "' + m.internaldate.encode() + b'"')
            elif item in (b"RFC822", b"RFC822.HEADER", b"RFC822.TEXT"):
                data = {b"RFC822": m.raw, b"RFC822.HEADER": _headers(m.raw),
                        b"RFC822.TEXT": m.raw[len(_headers(m.raw)):]}[item]
                set_seen = set_seen or item != b"RFC822.HEADER"
                parts.append(item + b" {%d}\r\n" % len(data) + data)
            elif item.startswith(b"BODY[") or item.startswith(b"BODY.PEEK["):
                peek = item.startswith(b"BODY.PEEK[")
                section = item[item.index(b"[") + 1:item.rindex(b"]")]
                data = self._section(m.raw, section)
                set_seen = set_seen or not peek
                parts.append(b"BODY[" + section + b"] {%d}\r\n" % len(data) + data)
            else:
                raise ParseError("unsupported fetch item " + item.decode("ascii", "replace"))
        if set_seen and not self._folder[2]:
            m.flags.add("\\Seen")
        if b"FLAGS" in items or set_seen:
            parts.insert(1, b"FLAGS " + _flag_list(m.flags))
        return b"* %d FETCH (" % seq + b" ".join(parts) + b")\r\n"

    def _section(self, raw, section):
        s = section.upper()
        if s == b"":
            return raw
        if s == b"HEADER":
            return _headers(raw)
        if s == b"TEXT":
            return raw[len(_headers(raw)):]
        m = re.match(rb"HEADER\.FIELDS(\.NOT)? \((.*)\)$", s)
        if m:
            return _header_fields(raw, m.group(2).split(), negate=bool(m.group(1)))
        raise ParseError("unsupported section " + section.decode("ascii", "replace"))

    def do_UID_STORE(self, tag, args):
        if self._folder[2]:
            return tag + b" NO [READ-ONLY] Mailbox is read-only\r\n"
        if len(args) != 3:
            raise ParseError("UID STORE needs a set, an item and flags")
        want = parse_set(args[0], self._largest_uid())
        op = args[1].upper()
        flags = args[2] if isinstance(args[2], list) else [args[2]]
        flags = {f.decode("utf-8", "replace") for f in flags}
        # system flags are case-insensitive
        flags = {next((s.decode() for s in SYSTEM_FLAGS if s.decode().lower() == f.lower()), f)
                 for f in flags}
        silent = op.endswith(b".SILENT")
        op = op.replace(b".SILENT", b"")
        if op not in (b"+FLAGS", b"-FLAGS", b"FLAGS"):
            raise ParseError("bad STORE item")
        out = []
        for seq, m in enumerate(self._messages(), 1):
            if want(m.uid):
                if op == b"+FLAGS":
                    m.flags |= flags
                elif op == b"-FLAGS":
                    m.flags -= flags
                else:
                    m.flags = set(flags)
                if not silent:
                    out.append(b"* %d FETCH (UID %d FLAGS " % (seq, m.uid)
                               + _flag_list(m.flags) + b")\r\n")
        return b"".join(out) + tag + b" OK STORE completed\r\n"

    def _expunge(self, which):
        name, folder, _ = self._folder
        out = []
        for seq in range(len(folder.messages), 0, -1):
            m = folder.messages[seq - 1]
            if "\\Deleted" in m.flags and which(m):
                del folder.messages[seq - 1]
                self.server.mailbox(self.record.user).expunged.append((name, m.uid, m.raw))
                out.append(b"* %d EXPUNGE\r\n" % seq)
        return b"".join(out)

    def do_EXPUNGE(self, tag, args):
        if self._folder[2]:
            return tag + b" NO [READ-ONLY] Mailbox is read-only\r\n"
        return self._expunge(lambda m: True) + tag + b" OK EXPUNGE completed\r\n"

    def do_UID_EXPUNGE(self, tag, args):
        if self._folder[2]:
            return tag + b" NO [READ-ONLY] Mailbox is read-only\r\n"
        if len(args) != 1:
            raise ParseError("UID EXPUNGE needs a set")
        want = parse_set(args[0], self._largest_uid())
        return self._expunge(lambda m: want(m.uid)) + tag + b" OK UID EXPUNGE completed\r\n"

    def _copy(self, tag, args, move):
        if len(args) != 2:
            raise ParseError("needs a set and a mailbox")
        if move and self._folder[2]:
            return None, tag + b" NO [READ-ONLY] Mailbox is read-only\r\n"
        want = parse_set(args[0], self._largest_uid())
        mailbox = self.server.mailbox(self.record.user)
        target = mailbox.folders.get(args[1].decode("utf-8", "replace"))
        if target is None:
            return None, tag + b" NO [TRYCREATE] No such mailbox\r\n"
        src, dst = [], []
        for m in self._messages():
            if want(m.uid):
                src.append(m.uid)
                dst.append(target.append(m.raw, m.flags - {"\\Deleted"}))
        code = b""
        if src:
            code = b"[COPYUID %d %s %s] " % (
                target.uidvalidity, b",".join(b"%d" % u for u in src),
                b",".join(b"%d" % u for u in dst))
        return set(src), code

    def do_UID_COPY(self, tag, args):
        moved, code = self._copy(tag, args, move=False)
        if moved is None:
            return code
        return tag + b" OK " + code + b"COPY completed\r\n"

    def do_UID_MOVE(self, tag, args):
        if "MOVE" not in self.behaviour.capabilities:
            return tag + b" BAD Unknown command\r\n"
        moved, code = self._copy(tag, args, move=True)
        if moved is None:
            return code
        for m in self._messages():
            if m.uid in moved:
                m.flags.add("\\Deleted")
        expunged = self._expunge(lambda m: m.uid in moved)
        head = b"* OK " + code + b"Moved\r\n" if code else b""
        return head + expunged + tag + b" OK MOVE completed\r\n"


class _SearchKeys:
    """A tiny evaluator of SEARCH keys over (sequence number, message)."""

    FLAG_KEYS = {b"SEEN": "\\Seen", b"DELETED": "\\Deleted", b"FLAGGED": "\\Flagged",
                 b"ANSWERED": "\\Answered", b"DRAFT": "\\Draft"}

    def __init__(self, tokens, count, largest_uid):
        self.tokens = list(tokens)
        self.count = count
        self.largest_uid = largest_uid

    def parse_all(self):
        preds = []
        while self.tokens:
            preds.append(self.parse_one())
        return lambda i, m: all(p(i, m) for p in preds)

    def _next(self):
        if not self.tokens:
            raise ParseError("missing search argument")
        return self.tokens.pop(0)

    def parse_one(self):
        tok = self._next()
        if isinstance(tok, list):
            inner = _SearchKeys(tok, self.count, self.largest_uid).parse_all()
            return inner
        key = tok.upper()
        if key == b"ALL":
            return lambda i, m: True
        if key in self.FLAG_KEYS:
            flag = self.FLAG_KEYS[key]
            return lambda i, m: flag in m.flags
        if key.startswith(b"UN") and key[2:] in self.FLAG_KEYS:
            flag = self.FLAG_KEYS[key[2:]]
            return lambda i, m: flag not in m.flags
        if key in (b"KEYWORD", b"UNKEYWORD"):
            word = self._next().decode("utf-8", "replace").lower()
            has = lambda m: word in {f.lower() for f in m.flags}  # noqa: E731
            return (lambda i, m: has(m)) if key == b"KEYWORD" else (lambda i, m: not has(m))
        if key == b"NOT":
            inner = self.parse_one()
            return lambda i, m: not inner(i, m)
        if key == b"OR":
            a, b = self.parse_one(), self.parse_one()
            return lambda i, m: a(i, m) or b(i, m)
        if key == b"UID":
            want = parse_set(self._next(), self.largest_uid)
            return lambda i, m: want(m.uid)
        if key in (b"LARGER", b"SMALLER"):
            n = int(self._next())
            return (lambda i, m: len(m.raw) > n) if key == b"LARGER" else (
                lambda i, m: len(m.raw) < n)
        if key in (b"NEW", b"RECENT", b"OLD"):
            return lambda i, m: key != b"RECENT" or False
        if re.match(rb"^[0-9*:,]+$", key):
            want = parse_set(key, self.count)
            return lambda i, m: want(i)
        raise ParseError("unsupported search key " + key.decode("ascii", "replace"))


_LITERAL_END = re.compile(rb"\{(\d+)\}\Z")


def bare_lf(data):
    """``data`` (whole server responses) with every line's CRLF made a bare
    LF; the bytes of literals (``{n}`` at a line's end, then n bytes) are
    left as they are."""
    out = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        if end < 0:
            out.append(data[pos:])
            break
        line = data[pos:end]
        out.append(line + b"\n")
        pos = end + 2
        m = _LITERAL_END.search(line)
        if m:
            size = int(m.group(1))
            out.append(data[pos:pos + size])
            pos += size
    return b"".join(out)


def _abort_with_rst(transport):
    import socket
    import struct

    try:
        transport.getHandle().setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except Exception:  # not a real socket (tests with fake transports)
        pass
    transport.abortConnection()


def _server_tls_class():
    from OpenSSL import SSL
    from twisted.internet import ssl

    class ServerTLS(ssl.DefaultOpenSSLContextFactory):
        """Twisted's server context factory, loading a certificate chain file."""

        def cacheContext(self):
            if self._context is None:
                ctx = self._contextFactory(self.sslmethod)
                ctx.set_options(SSL.OP_NO_SSLv2)
                ctx.use_certificate_chain_file(self.certificateFileName)
                ctx.use_privatekey_file(self.privateKeyFileName)
                self._context = ctx

    return ServerTLS


def _ServerTLS(key_path, cert_path):
    return _server_tls_class()(key_path, cert_path)


class _PortFactory(protocol.Factory):
    def __init__(self, server, account, tls):
        self.server = server
        self.account = account
        self.tls = tls

    def buildProtocol(self, addr):
        return self.server.build_protocol(self.account, self.tls)


class MockIMAPServer(IdleServerSupport):
    """The mock server: accounts, scripts, listening ports, records.

    :param reactor: provides ``IReactorTCP``, ``IReactorTime`` (and
        ``IReactorSSL`` for implicit TLS).
    :param accounts: ``{username: MockMailbox}``.
    :param tls: ``(cert_path, key_path)`` PEM files, for STARTTLS and
        implicit-TLS ports.
    :param account_factory: ``f(username) -> MockMailbox | None`` to create
        accounts on first use (benchmarks).
    :param keep_records: ``False`` for long benchmarks: no command records,
        closed connections forgotten (memory stays flat).
    """

    def __init__(self, reactor, accounts=None, tls=None, account_factory=None,
                 keep_records=True):
        self.reactor = reactor
        self.accounts = dict(accounts or {})
        self.account_factory = account_factory
        self.tls = tls
        self._tls_options = None
        self._scripts = {}
        self.ports = []
        #: False (benchmarks): record no commands and forget closed connections
        self.keep_records = keep_records
        self.connections = []  # every ConnectionRecord, in order
        self.login_attempts = []  # (method, user, password)
        #: ``f(user, token) -> bool``: accept AUTHENTICATE XOAUTH2/OAUTHBEARER
        #: (None: refuse them); an invalid token gets RFC 7628's error challenge
        self.bearer_check = None
        self.bearer_attempts = []  # (mechanism, user, token)
        self._protocols = {}  # open connections: id -> MockIMAPProtocol
        self._last_id = 0
        self._waiters = []
        #: bytes written to all connections (hostile modes included)
        self.bytes_sent = 0

    # -- scripting -------------------------------------------------------
    def script(self, account, behaviour):
        """Set ``account``'s behaviour (``None``: the default for all)."""
        self._scripts[account] = behaviour

    def behaviour_for(self, account):
        return self._scripts.get(account) or self._scripts.get(None) or _NORMAL

    def mailbox(self, account):
        if account is None:
            return None
        box = self.accounts.get(account)
        if box is None and self.account_factory is not None:
            box = self.account_factory(account)
            if box is not None:
                self.accounts[account] = box
        return box

    def tls_options(self):
        """The server's TLS context factory (from the ``tls`` PEM files)."""
        if self._tls_options is None:
            self._tls_options = _ServerTLS(self.tls[1], self.tls[0])
        return self._tls_options

    # -- listening -------------------------------------------------------
    def listen(self, port=0, interface="127.0.0.1", account=None, implicit_tls=False,
               backlog=128):
        """Listen on a TCP port (0: a free one); returns the port number.

        ``account`` binds the port to one user, so that connect-time
        behaviours of that user's script apply to its connections.
        ``implicit_tls`` wraps the port in TLS (IMAPS).
        """
        factory = _PortFactory(self, account, implicit_tls)
        if implicit_tls:
            listening = self.reactor.listenSSL(port, factory, self.tls_options(),
                                               backlog=backlog, interface=interface)
        else:
            listening = self.reactor.listenTCP(port, factory, backlog=backlog,
                                               interface=interface)
        self.ports.append(listening)
        return listening.getHost().port

    def stop(self):
        """Stop listening and abort every open connection; a Deferred."""
        ds = [defer.maybeDeferred(p.stopListening) for p in self.ports]
        self.ports = []
        for proto in list(self._protocols.values()):
            proto.transport.abortConnection()
        ds.append(self.all_closed())
        return defer.gatherResults(ds, consumeErrors=True)

    def build_protocol(self, account=None, tls=False):
        """A server-side protocol for one new connection, for tests that
        connect it themselves (``twisted.test.iosim``, ``StringTransport``)."""
        record = self._opened(account, tls)
        p = MockIMAPProtocol(self, record, tls)
        self._protocols[record.id] = p
        return p

    # -- records ---------------------------------------------------------
    def _opened(self, account, tls):
        self._last_id += 1
        record = ConnectionRecord(id=self._last_id, account=account, tls=tls)
        if self.keep_records:
            self.connections.append(record)
        return record

    def _closed(self, record):
        record.open = False
        self._protocols.pop(record.id, None)
        if not self._protocols:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def commands(self, account=None, name=None):
        """Commands received (optionally of one account, one command name)."""
        return [c for r in self.connections
                if account is None or r.account == account
                for c in r.commands if name is None or c.name == name]

    def connection_count(self, account=None):
        """Connections accepted (optionally: bound to or logged in as ``account``)."""
        return sum(1 for r in self.connections if account is None or r.account == account)

    def open_connections(self, account=None):
        return [p.record for p in self._protocols.values()
                if account is None or p.record.account == account]

    def logged_in(self, user):
        return sum(1 for p in self._protocols.values() if p.record.user == user)

    def all_closed(self):
        """A Deferred that fires when no connection is open."""
        if not self.open_connections():
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        return d


_NORMAL = Behaviour()


class RawClient(protocol.Protocol):
    """A byte-level IMAP client for tests: send lines, wait for patterns."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.buffer = b""
        self.received = b""
        self._waiters = []
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.buffer += data
        self.received += data
        self._check()

    def connectionLost(self, reason):
        waiters, self._waiters = self._waiters, []
        for _, d in waiters:
            d.errback(ConnectionError(f"closed; buffer={self.buffer!r}"))
        self.lost.callback(None)

    def _check(self):
        for item in list(self._waiters):
            pattern, d = item
            m = re.search(pattern, self.buffer, re.S)
            if m:
                self._waiters.remove(item)
                out, self.buffer = self.buffer[:m.end()], self.buffer[m.end():]
                d.callback(out)

    def until(self, pattern, timeout=5.0):
        d = defer.Deferred()
        self._waiters.append((pattern, d))
        self._check()
        return d.addTimeout(timeout, self.reactor)

    def command(self, tag, text, timeout=5.0):
        self.transport.write(tag + b" " + text + b"\r\n")
        return self.until(rb"(?:^|\r\n)" + re.escape(tag) + rb" (?:OK|NO|BAD)[^\r\n]*\r\n",
                          timeout)


def connect_raw(reactor, port, host="127.0.0.1"):
    """A connected :class:`RawClient` (a Deferred)."""
    from twisted.internet import endpoints

    return endpoints.connectProtocol(
        endpoints.TCP4ClientEndpoint(reactor, host, port), RawClient(reactor))


def sample_message(n, account="user", size=0):
    """A small RFC 5322 message with a unique Message-ID (``size``: pad the body)."""
    body = b"Hello %d.\r\n" % n
    if size > len(body):
        body += (b"x" * 76 + b"\r\n") * ((size - len(body)) // 78 + 1)
    return (b"From: sender@example.test\r\nTo: %s@example.test\r\n"
            b"Subject: message %d\r\nMessage-ID: <%d.%s@mock.test>\r\n"
            b"Date: Mon, 02 Nov 2026 10:00:00 +0000\r\n\r\n" % (
                account.encode(), n, n, account.encode()) + body)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.mockimap",
        description="A mock IMAP server for benchmarks: users user1..userN, password 'password'.")
    parser.add_argument("--port", type=int, default=1143)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--messages", type=int, default=10)
    parser.add_argument("--size", type=int, default=0, help="approximate bytes per message")
    parser.add_argument("--password", default="password")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), default=None,
                        help="PEM files; enables STARTTLS")
    parser.add_argument("--implicit-tls", action="store_true",
                        help="the port speaks TLS from the start (IMAPS)")
    parser.add_argument("--greeting-delay", type=float, default=0.0)
    parser.add_argument("--backlog", type=int, default=4096,
                        help="listen backlog (capped by net.core.somaxconn)")
    parser.add_argument("--idle", action="store_true", help="offer IDLE")
    parser.add_argument("--control-port", type=int, default=None,
                        help="accept 'DELIVER <user>' lines here (new mail, EXISTS pushed)")
    opts = parser.parse_args(argv)

    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    from twisted.internet import reactor

    def factory(user):
        m = re.match(r"^user(\d+)$", user)
        if not m or not 1 <= int(m.group(1)) <= opts.accounts:
            return None
        return MockMailbox(opts.password,
                           [sample_message(i, user, opts.size) for i in range(1, opts.messages + 1)],
                           uidvalidity=int(m.group(1)))

    server = MockIMAPServer(reactor, tls=opts.tls, account_factory=factory, keep_records=False)
    server.script(None, Behaviour(starttls=opts.tls is not None,
                                  greeting_delay=opts.greeting_delay,
                                  capabilities=IDLE_CAPABILITIES if opts.idle
                                  else DEFAULT_CAPABILITIES))
    port = server.listen(opts.port, opts.interface, implicit_tls=opts.implicit_tls,
                         backlog=opts.backlog)
    print(f"mockimap listening on {opts.interface}:{port}", flush=True)
    if opts.control_port is not None:
        control = listen_control(reactor, server, opts.control_port, opts.interface)
        print(f"mockimap control on {opts.interface}:{control.getHost().port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
