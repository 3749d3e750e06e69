"""The one scrubber: no password, token or secret leaves Fido in any form.

:func:`scrub` runs on the FULL text, before any truncation or escaping (a
secret cut in half at a display limit, or escaped as ``\\xa0``, would no
longer match): callers build the whole text, scrub it, and only then cut it
for display.  Two layers:

- the literal *forms* of every secret, which the credentials give
  (:meth:`fido_tx.interfaces.ICredentials.secret_forms`, built with
  :func:`secret_forms`): raw, IMAP-quoted, Python ``repr`` escapes (of the
  text and of its UTF-8 bytes, so U+00A0 inside a password is caught both as
  itself and as ``\\xa0``), the printable escape of protocol traces, JSON,
  URL encoding, and the SASL PLAIN base64 of ``\\0user\\0password`` (a server
  may echo the response it could not parse);
- patterns for secrets Fido does not know (``LOGIN user pass`` lines,
  ``password=...`` pairs, ``Authorization:`` headers, URL user info) — what a
  remote server or a library may write into an error.

Used by the session result (message, debug), the log, the account hash
(``last_error``) and the reporter.
"""

import base64
import json
import re
from urllib.parse import quote, quote_plus

REDACTED = "<redacted>"

#: Literal forms shorter than this are not replaced (they would mangle text).
MIN_FORM_LENGTH = 3

__all__ = ["REDACTED", "scrub", "scrub_bytes", "secret_forms"]


def _printable_escape(text):
    # what fido_tx.sources.imap.parse._show makes of a non-printable character
    return "".join(c if c.isprintable() else "\\x%02x" % ord(c) for c in text)


def secret_forms(secret, user=None):
    """Every form ``secret`` may be sent, echoed or logged in, longest first.

    :param user: the login name, for the SASL PLAIN encodings
        (``\\0user\\0secret`` and ``user\\0user\\0secret``).
    """
    if not secret:
        return ()
    forms = {
        secret,
        secret.replace("\\", "\\\\").replace('"', '\\"'),  # IMAP quoted string
        repr(secret)[1:-1],
        repr(secret.encode("utf-8"))[2:-1],
        _printable_escape(secret),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        quote(secret, safe=""),
        quote_plus(secret),
    }
    raw = secret.encode("utf-8")
    if user is not None:
        u = user.encode("utf-8")
        for plain in (b"\0" + u + b"\0" + raw, u + b"\0" + u + b"\0" + raw):
            forms.add(base64.b64encode(plain).decode("ascii"))
    return tuple(sorted((f for f in forms if len(f) >= MIN_FORM_LENGTH),
                        key=len, reverse=True))


# "a001 LOGIN user secret", "AUTHENTICATE PLAIN AGZvbwBiYXI=": keep the verb,
# redact the rest of the line; but keep prose such as "LOGIN rejected: ...".
_IMAP_AUTH = re.compile(
    r"""(?ix)\b(LOGIN|AUTHENTICATE)\b[ \t]+
    (?!(?:rejected|failed|failure|refused|disabled|denied|not|is|was|ok|no|bad|
          timed|took|succeeded|error)\b|:)
    [^\r\n]*"""
)
# password=..., "password": "...", passwd: ..., token=..., secret=...
_KEY_VALUE = re.compile(
    r"""(?ix)
    ((?:password|passwd|pwd|passphrase|secret|token|api[_-]?key)[\w-]*["']?)
    (\s*[:=]\s*)
    ("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s,;&}\]]+)
    """
)
_KEYWORD = re.compile(r"password|passwd|pwd|passphrase|secret|token|api[_-]?key")
# scheme://user:password@host
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@]*):[^\s/@]*@")
# Authorization: Bearer xyz / Basic xyz
_AUTH_HEADER = re.compile(r"(?i)\b(authorization\s*[:=]\s*)(\w+\s+)?[^\s,;]+")


def scrub(text, forms=()):
    """``text`` with every form in ``forms`` and every credential-looking
    pattern replaced by ``<redacted>``.  Run it on the whole text, before
    cutting or escaping it."""
    if not text:
        return text or ""
    for form in sorted(forms, key=len, reverse=True):
        if form and len(form) >= MIN_FORM_LENGTH and form in text:
            text = text.replace(form, REDACTED)
    # Cheap tests first: most text has none of these, and a burst of reports
    # (a DNS outage fails every account at once) is scrubbed on the reactor.
    lower = text.lower()
    if "login" in lower or "authenticate" in lower:
        text = _IMAP_AUTH.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    if "authorization" in lower:
        text = _AUTH_HEADER.sub(lambda m: f"{m.group(1)}{m.group(2) or ''}{REDACTED}", text)
    if _KEYWORD.search(lower):
        text = _redact_pairs(text, lower)
    if "@" in text and "://" in text:
        text = _URL_USERINFO.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)
    return text


def scrub_bytes(data, forms=()):
    """``data`` (protocol bytes) with the literal ``forms`` replaced; for the
    protocol trace, which keeps bytes until it is read."""
    for form in forms:
        encoded = form.encode("utf-8")
        if len(encoded) >= MIN_FORM_LENGTH and encoded in data:
            data = data.replace(encoded, REDACTED.encode("ascii"))
    return data


def _redact_pairs(text, lower):
    """``password=...``-like pairs: find the key words fast, then match there."""
    if len(lower) != len(text):  # lower() changed offsets (rare non-ASCII)
        return _KEY_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    out = []
    last = 0
    for found in _KEYWORD.finditer(lower):
        if found.start() < last:
            continue
        pair = _KEY_VALUE.match(text, found.start())
        if pair is None:
            continue
        out.append(text[last:pair.start(3)])
        out.append(REDACTED)
        last = pair.end()
    out.append(text[last:])
    return "".join(out)
