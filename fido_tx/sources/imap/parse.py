"""IMAP syntax: the pure parsers of server responses and the helpers that
write IMAP syntax (UID sets, quoting, mailbox names, SASL PLAIN).

No I/O and no state: every function here takes bytes and returns values,
so each is tested on its own (Hypothesis for the parsers).  The protocol
class (:mod:`fido_tx.sources.imap.client`) and the session steps
(:mod:`fido_tx.sources.imap.login`, :mod:`fido_tx.sources.imap.poll`) use
them.
"""

import base64
import binascii
import re

from fido_tx import errors
from fido_tx.errors import FidoError

_LITERAL_AT_END = re.compile(rb"\{(\d+)\}\Z")
_RESP_CODE = re.compile(rb"\[([^\]]*)\]")


def _show(data, limit=300):
    """Bytes from the server as a printable one-line str, truncated."""
    if isinstance(data, str):
        text = data
    else:
        text = data[:limit].decode("utf-8", "replace")
    text = "".join(c if c.isprintable() else "\\x%02x" % ord(c) for c in text[:limit])
    if len(data) > limit:
        text += "..."
    return text


def response_code(text):
    """The ``[CODE ...]`` word at the start of a response text, upper-case."""
    m = _RESP_CODE.match(text.lstrip())
    if not m:
        return b""
    return m.group(1).split(b" ", 1)[0].upper()


#: values kept by :func:`shared` before the table is emptied
SHARED_MAX = 1024
_shared = {}


def shared(value):
    """One copy of an immutable ``value`` (a capability set, a FLAGS tuple)
    for every connection that got an equal one.

    Thousands of held connections to one server each kept their own
    capability sets and flag tuples (~1.7 KiB per connection, each atom a
    bytes object of its own); equal values now share one copy.  Bounded:
    emptied when it holds ``SHARED_MAX`` values.
    """
    kept = _shared.get(value)
    if kept is not None:
        return kept
    if len(_shared) >= SHARED_MAX:
        _shared.clear()
    _shared[value] = value
    return value


def parse_capabilities(text):
    """``b"IMAP4rev1 STARTTLS AUTH=PLAIN"`` -> a frozenset of upper-case atoms."""
    return shared(frozenset(t.upper() for t in text.split()))


#: greeting or LOGIN answer text -> its capabilities (see greeting_capabilities)
_greeting_caps = {}


def greeting_capabilities(text):
    """The capabilities in a greeting's ``[CAPABILITY ...]`` code, or ``None``.

    A server sends the same greeting and the same LOGIN answer to every
    session: the answer is kept per text (bounded like :func:`shared`), so
    an empty poll no longer splits and upper-cases ~15 atoms twice (30,890
    calls of the set's generator per 1,000 sessions in a profile)."""
    if type(text) is not bytes:  # a bytearray or a view: not hashable, not kept
        return _greeting_capabilities(text)
    try:
        return _greeting_caps[text]
    except KeyError:
        pass
    caps = _greeting_capabilities(text)
    if len(_greeting_caps) >= SHARED_MAX:
        _greeting_caps.clear()
    _greeting_caps[text] = caps
    return caps


def _greeting_capabilities(text):
    m = _RESP_CODE.match(text.lstrip())
    if not m:
        return None
    words = m.group(1).split()
    if not words or words[0].upper() != b"CAPABILITY":
        return None
    return shared(frozenset(w.upper() for w in words[1:]))


def uid_set(uids):
    """Sorted, compact IMAP UID set: ``[1, 2, 3, 5, 7, 8]`` -> ``b"1:3,5,7:8"``."""
    out = []
    start = prev = None
    for uid in sorted(set(uids)):
        if start is None:
            start = prev = uid
        elif uid == prev + 1:
            prev = uid
        else:
            out.append(_range(start, prev))
            start = prev = uid
    if start is not None:
        out.append(_range(start, prev))
    return b",".join(out)


def _range(a, b):
    return b"%d" % a if a == b else b"%d:%d" % (a, b)


#: a byte that cannot go in a quoted string at all (NUL, CR, LF, 8-bit)
_LITERAL_ONLY = re.compile(rb"[\x00\n\r\x80-\xff]")
#: a byte that is not plain enough to quote without escapes
_NOT_QUOTABLE = re.compile(rb'[\x00-\x1f\x7f-\xff"\\]')


def _needs_literal(value):
    # one regex search, not a generator per byte (a profile of 1,000 empty
    # polls: 30,890 generator calls for the user names and passwords)
    return _LITERAL_ONLY.search(value) is not None


def _quotable(value):
    """Plain enough to quote without escapes (servers differ on ``\\`` escapes)."""
    return _NOT_QUOTABLE.search(value) is None


def quote(value):
    """An IMAP quoted string of ``value`` (bytes without CR, LF, NUL, 8-bit)."""
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def astring_parts(value):
    """How to send ``value`` as an astring: ``(head, literal_or_None)``.

    ``head`` goes on the current line; when ``literal`` is not ``None`` the
    server must answer ``+`` before it is sent.
    """
    if not _quotable(value):
        return b"{%d}" % len(value), value
    return quote(value), None


def modified_utf7(name):
    """``name`` in IMAP's modified UTF-7 (RFC 3501 5.1.3), as bytes.

    Printable ASCII stands for itself (``&`` as ``&-``); every other run is
    ``&``, its UTF-16BE in base64 with ``,`` for ``/`` and no padding, ``-``.
    (Twisted's ``imap4-utf-7`` codec does the same, but registering it
    means importing ``twisted.mail.imap4`` and its 16 modules.)
    """
    out = []
    run = []
    for c in name:
        if "\x20" <= c <= "\x7e":
            if run:
                out.append(_utf7_run(run))
                run = []
            out.append("&-" if c == "&" else c)
        else:
            run.append(c)
    if run:
        out.append(_utf7_run(run))
    return "".join(out).encode("ascii")


def _utf7_run(chars):
    data = "".join(chars).encode("utf-16-be", "surrogatepass")
    return "&" + binascii.b2a_base64(data, newline=False).decode("ascii").rstrip("=").replace("/", ",") + "-"


def mailbox_name(name):
    """A mailbox name as sent on the wire: modified UTF-7, quoted."""
    encoded = modified_utf7(name)
    if _needs_literal(encoded):  # CR/LF in a folder name: not sendable quoted
        raise FidoError(errors.MAILBOX, f"invalid mailbox name {name!r}")
    return quote(encoded)


# --- untagged response parsing ---------------------------------------------


class _Tokens:
    """Tokenize IMAP response data given as text segments and literals."""

    def __init__(self, segments):
        self.items = []
        for i, seg in enumerate(segments):
            if i % 2:
                self.items.append(("lit", seg))
            else:
                if i < len(segments) - 1:
                    seg = _LITERAL_AT_END.sub(b"", seg)
                self._tokenize(seg)
        self.pos = 0

    def _tokenize(self, s):
        i, n = 0, len(s)
        add = self.items.append
        while i < n:
            c = s[i]
            if c == 32:  # space
                i += 1
            elif c == 40:  # (
                add(("(", None))
                i += 1
            elif c == 41:  # )
                add((")", None))
                i += 1
            elif c == 34:  # "
                j = i + 1
                buf = bytearray()
                while j < n and s[j] != 34:
                    if s[j] == 92 and j + 1 < n:
                        j += 1
                    buf.append(s[j])
                    j += 1
                if j >= n:
                    raise ValueError("unterminated quoted string")
                add(("str", bytes(buf)))
                i = j + 1
            else:
                j = i
                depth = 0
                while j < n:
                    c = s[j]
                    if c == 91:  # [
                        depth += 1
                    elif c == 93:  # ]
                        depth -= 1
                    elif depth <= 0 and c in (32, 40, 41):
                        break
                    j += 1
                add(("atom", s[i:j]))
                i = j

    def next(self):
        if self.pos >= len(self.items):
            raise ValueError("response ends early")
        item = self.items[self.pos]
        self.pos += 1
        return item

    def value(self):
        kind, val = self.next()
        if kind == "(":
            out = []
            while True:
                if self.pos >= len(self.items):
                    raise ValueError("unbalanced parentheses")
                if self.items[self.pos][0] == ")":
                    self.pos += 1
                    return out
                out.append(self.value())
        if kind == ")":
            raise ValueError("unexpected ')'")
        if kind == "atom" and val.upper() == b"NIL":
            return None
        return val


#: the FETCH answers Fido asks for, read without the tokenizer: item-number
#: pairs (``UID 5 RFC822.SIZE 120``), then at most one literal item last
#: (``BODY[] {120}``, ``BODY[HEADER.FIELDS (MESSAGE-ID)] {52}``)
_FAST_PAIRS = re.compile(rb"(\d+) (?i:FETCH) \(((?:[A-Za-z0-9.]+ \d+)(?: [A-Za-z0-9.]+ \d+)*)\)\Z")
_FAST_LITERAL = re.compile(
    rb"(\d+) (?i:FETCH) \(((?:[A-Za-z0-9.]+ \d+ )*)"
    rb"([A-Za-z0-9.]+(?:\[[A-Za-z0-9 .()-]*\])?) \{\d+\}\Z")


def _fast_fetch(segments):
    """:func:`parse_fetch` of the common shapes (see ``_FAST_PAIRS``), or
    ``None`` for anything else: the same answer with one regular expression
    instead of a token list per response."""
    if len(segments) == 1:
        m = _FAST_PAIRS.match(segments[0])
        if m is None:
            return None
        words = m.group(2).split(b" ")
        return int(m.group(1)), {k.upper(): v for k, v in zip(words[0::2], words[1::2])}
    if len(segments) != 3 or segments[2] != b")":
        return None
    m = _FAST_LITERAL.match(segments[0])
    if m is None:
        return None
    words = m.group(2).split(b" ")
    items = {k.upper(): v for k, v in zip(words[0:-1:2], words[1::2])}
    items[m.group(3).upper()] = segments[1]
    return int(m.group(1)), items


def parse_fetch(segments):
    """Parse ``n FETCH (...)`` given as segments (text, literal, text, ...).

    :return: ``(sequence_number, {ITEM: value})``; item names are upper-case
        bytes with any ``<origin>`` removed (``b"BODY[]"``, ``b"UID"``); values
        are bytes, ``None`` (NIL) or lists.
    :raise ValueError: on a malformed response.
    """
    fast = _fast_fetch(segments)
    if fast is not None:
        return fast
    return _parse_fetch(segments)


def _parse_fetch(segments):
    """:func:`parse_fetch` of any response: tokens, then values."""
    toks = _Tokens(segments)
    kind, seq = toks.next()
    if kind != "atom" or not seq.isdigit():
        raise ValueError("FETCH without a sequence number")
    kind, word = toks.next()
    if kind != "atom" or word.upper() != b"FETCH":
        raise ValueError("not a FETCH response")
    if toks.next()[0] != "(":
        raise ValueError("FETCH without '('")
    items = {}
    while True:
        kind, key = toks.next()
        if kind == ")":
            break
        if kind != "atom":
            raise ValueError("bad FETCH item name")
        key = key.upper()
        if key.endswith(b">") and b"<" in key:
            key = key[: key.rindex(b"<")]
        items[key] = toks.value()
    return int(seq), items


def parse_search(text):
    """``b"SEARCH 1 2 3"`` -> ``[1, 2, 3]`` (ignores a ``(MODSEQ n)`` suffix)."""
    words = text.split()
    out = []
    for w in words[1:]:
        if w.startswith(b"("):
            break
        out.append(int(w))
    return out


_STATUS_LIST = re.compile(rb"\(([^()]*)\)\s*$")  # the attribute list ends the response


def parse_status(segments):
    """An untagged STATUS response (``segments`` without ``* ``) -> its
    attributes, e.g. ``{b"UNSEEN": 0}``; ``{}`` for any other response.

    The mailbox name may be quoted (with parentheses inside) or a literal,
    so only the parenthesized list that ends the response is read.
    """
    if segments[0][:7].upper() != b"STATUS ":
        return {}
    m = _STATUS_LIST.search(segments[-1])
    if m is None:
        return {}
    items = m.group(1).split()
    return {name.upper(): int(value) for name, value in zip(items[0::2], items[1::2])
            if value.isdigit()}


def parse_flag_list(text):
    """``b"(\\\\Seen $Foo \\\\*)"`` inside a response -> tuple of str flags."""
    start, end = text.find(b"("), text.rfind(b")")
    if start == -1 or end < start:
        return ()
    return shared(tuple(f.decode("ascii", "replace") for f in text[start + 1 : end].split()))


class SelectInfo:
    """What SELECT/EXAMINE told us."""

    def __init__(self):
        self.uidvalidity = None
        #: ``[UIDNEXT n]`` (``None`` when the server sent none: RFC 3501
        #: requires it, some servers omit it)
        self.uidnext = None
        self.exists = None
        self.flags = ()
        self.permanent_flags = None

    def keywords_allowed(self, keyword):
        """Whether ``keyword`` can be stored permanently in this mailbox."""
        perm = self.permanent_flags
        if perm is None:  # RFC 3501: absent means all FLAGS are permanent
            return keyword.lower() in (f.lower() for f in self.flags)
        return "\\*" in perm or keyword.lower() in (f.lower() for f in perm)

    def keyword_known(self, keyword):
        """Whether a SEARCH on ``keyword`` is meaningful (storable or defined)."""
        return self.keywords_allowed(keyword) or keyword.lower() in (
            f.lower() for f in self.flags
        )

    def feed(self, text):
        """One untagged response of SELECT (without ``* ``)."""
        upper = text.upper()
        if upper.startswith(b"OK ["):
            code = text[4 : text.find(b"]")] if b"]" in text else text[4:]
            word = code.split(b" ", 1)[0].upper()
            if word == b"UIDVALIDITY":
                try:
                    self.uidvalidity = int(code.split()[1])
                except (IndexError, ValueError):
                    raise ValueError("bad UIDVALIDITY")
            elif word == b"UIDNEXT":
                value = code.split()[1:2]
                if value and value[0].isdigit():
                    self.uidnext = int(value[0])
            elif word == b"PERMANENTFLAGS":
                self.permanent_flags = parse_flag_list(text)
        elif upper.startswith(b"FLAGS "):
            self.flags = parse_flag_list(text)
        else:
            parts = text.split(None, 2)
            if len(parts) >= 2 and parts[1].upper() == b"EXISTS" and parts[0].isdigit():
                self.exists = int(parts[0])


def plain_response(username, password):
    """The base64 SASL PLAIN initial response (authzid empty)."""
    return base64.b64encode(b"\0" + username + b"\0" + password)


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


def sasl_xoauth2(username, token):
    """The base64 SASL XOAUTH2 initial response (Google, Microsoft)."""
    return base64.b64encode(b"user=" + username + b"\x01auth=Bearer " + token + b"\x01\x01")


def sasl_oauthbearer(username, host, port, token):
    """The base64 SASL OAUTHBEARER initial response (RFC 7628)."""
    gs2 = b"n,a=" + username.replace(b"=", b"=3D").replace(b",", b"=2C") + b","
    return base64.b64encode(gs2 + b"\x01host=" + host.encode("idna") + b"\x01port=%d" % port
                            + b"\x01auth=Bearer " + token + b"\x01\x01")


def fetch_handler(collect):
    """An ``untagged`` callback calling ``collect(uid, items)`` per FETCH
    response that names its UID."""
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

    return untagged
