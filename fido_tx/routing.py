"""Sub-address routing: which ``route_key`` a message was addressed with.

``[routing] template`` is GitLab's ``incoming_email.address`` format:
``incoming+%{key}@gitlab.example.com``.  :func:`route_key` looks through the
message's envelope and address headers in a fixed order (:data:`HEADERS`)
and returns the ``%{key}`` part of the first address that fits the
template, as GitLab's ``Gitlab::Email::IncomingEmail.key_from_address`` does
with ``(.+)`` in place of ``%{key}``.  The comparison ignores case (mail
systems change the case of domains and local parts); the key comes back
exactly as it was written.

Address lists, display names, comments, angle brackets and folded header
lines are all understood; a header that cannot be parsed is skipped, never
an error: routing must not lose a message.
"""

import email.utils
import re

import attr
from zope.interface import implementer

from fido_tx.interfaces import ISink

PLACEHOLDER = "%{key}"

#: header names in the order they are tried (envelope first, then To, Cc)
HEADERS = (
    "Delivered-To",
    "Envelope-To",
    "X-Envelope-To",
    "X-Original-To",
    "To",
    "Cc",
)

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def check_template(template):
    """Raise ``ValueError`` (one line) unless ``template`` is usable:
    ``""`` (routing off) or an address with exactly one ``%{key}``."""
    if template == "":
        return
    if template.count(PLACEHOLDER) != 1:
        raise ValueError(
            f'must contain "{PLACEHOLDER}" exactly once'
            f' (like "incoming+{PLACEHOLDER}@gitlab.example.com"), got {template!r}'
        )
    if "@" not in template.replace(PLACEHOLDER, "") or any(c.isspace() for c in template):
        raise ValueError(
            f"must be an e-mail address without spaces (like"
            f' "incoming+{PLACEHOLDER}@gitlab.example.com"), got {template!r}'
        )


def compile_template(template):
    """The regular expression for ``template`` (``None`` when it is ``""``)."""
    if not template:
        return None
    check_template(template)
    prefix, suffix = template.split(PLACEHOLDER)
    return re.compile(
        r"\A" + re.escape(prefix) + r"(.+)" + re.escape(suffix) + r"\Z",
        re.IGNORECASE | re.DOTALL,
    )


def header_block(raw):
    """The header part of a raw message (bytes up to the first empty line)."""
    m = _HEADER_END.search(raw)
    return raw if m is None else raw[: m.start()]


def parse_headers(raw):
    """The headers of ``raw`` as an :class:`email.message.Message`."""
    # imported here: email.policy and its header registry (0.5 MiB) only
    # for a daemon with a [routing] template
    from email.parser import BytesHeaderParser
    from email.policy import compat32

    return BytesHeaderParser(policy=compat32).parsebytes(header_block(raw))


def addresses(message, name):
    """The addresses in every ``name`` header of ``message`` (from
    :func:`parse_headers`), in order."""
    found = []
    for value in message.get_all(name, []):
        text = _FOLD.sub("", _as_text(value))
        try:
            pairs = email.utils.getaddresses([text])
        except Exception:  # a malformed header is skipped, not fatal
            continue
        found.extend(addr.strip() for _display, addr in pairs if addr.strip())
    return found


def _as_text(value):
    if isinstance(value, str):
        # compat32 hands non-ASCII bytes over as surrogate escapes
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    from email.header import decode_header, make_header

    try:  # an email.header.Header (encoded words in an address header)
        return str(make_header(decode_header(str(value))))
    except Exception:
        return str(value)


def route_key(raw, template, _compiled=None):
    """The route key of the raw message ``raw`` (bytes; headers are enough)
    under ``template``, or ``""`` when no address matches or no template is
    set."""
    pattern = _compiled or compile_template(template)
    if pattern is None:
        return ""
    message = parse_headers(raw)
    for name in HEADERS:
        for address in addresses(message, name):
            m = pattern.match(address.strip("<>"))
            if m:
                return m.group(1)
    return ""


class Router:
    """``route_key`` with the template compiled once (one per daemon)."""

    def __init__(self, template):
        self.template = template
        self._pattern = compile_template(template)

    def __call__(self, raw):
        if self._pattern is None:
            return ""
        return route_key(raw, self.template, self._pattern)


@implementer(ISink)
class RoutedSink:
    """An :class:`~fido_tx.interfaces.ISink` that gives each message its
    ``route_key`` (by ``router``) before handing the batch to ``sink``: the
    composition root puts it between every source and its delivery, so no
    source needs to know about routing.  A message that has a route key
    already keeps it."""

    def __init__(self, sink, router):
        self.sink = sink
        self.router = router
        self.kind = sink.kind

    def filter_new(self, account_id, mailbox, epoch, ids):
        return self.sink.filter_new(account_id, mailbox, epoch, ids)

    def identities(self, account_id, mailbox, epoch, ids):
        return self.sink.identities(account_id, mailbox, epoch, ids)

    def may_recognise(self, account_id, mailbox, epoch):
        return self.sink.may_recognise(account_id, mailbox, epoch)

    def recognise(self, account_id, mailbox, epoch, identities):
        return self.sink.recognise(account_id, mailbox, epoch, identities)

    def deliver(self, messages):
        return self.sink.deliver([
            m if m.route_key else attr.evolve(m, route_key=self.router(m.raw))
            for m in messages
        ])


def routed(sink, router):
    """``sink`` with route keys set by ``router`` (a :class:`Router`), or
    ``sink`` itself when the router has no template."""
    return RoutedSink(sink, router) if router.template else sink
