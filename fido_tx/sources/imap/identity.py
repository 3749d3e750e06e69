"""What identifies an IMAP message by its content, and the check that a UID
found already stored still holds the message stored under it.

A message's identity (``Message.identity``, recorded by the sinks with its
key: :mod:`fido_tx.sinks.identity`) is a short text, ``m`` or ``b`` then 16
hex digits of a SHA-256:

* ``m``: of its size (the server's ``RFC822.SIZE``) and its Message-ID;
  what one ``UID FETCH (RFC822.SIZE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])``
  tells again later, without the body;
* ``b``: of its size and its bytes, for a message without a Message-ID
  (telling it again needs the body).

Recognition across a UIDVALIDITY change is the sinks' (an identity recorded
before is confirmed, not delivered again).  Reuse is checked here, before
marking UIDs that the sink says are stored: RFC 3501 forbids a server to
give a UID to another message within one UIDVALIDITY, but servers restored
from a backup do.  :func:`check_stored` asks the sink what was stored (one
Redis round trip), and only when something was recorded, the server what
the UIDs hold now (one ``UID FETCH``; bodies only for messages without a
Message-ID).  A UID that holds another message is fetched and delivered
as new, under the id ``<uid>~<identity>`` (deterministic: a crash before
its marking finds it stored next time), and the session is reported as kind
``protocol``; it is never marked blind.  A session whose UIDs are all new
pays nothing for any of this.
"""

import hashlib

import attr

from fido_tx.sources.imap.bounds import body_limits
from fido_tx.sources.imap.parse import _show, extract_message_id

__all__ = ["of", "check_stored", "sizes", "Epochs", "Reuse", "alias"]

#: the items that tell a message's identity again without its body
ITEMS = b"(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])"


def of(size, message_id, raw=b""):
    """The identity of a message of ``size`` bytes (the server's
    RFC822.SIZE) with ``message_id`` (``""`` if none; then of ``raw``)."""
    if message_id:
        text = f"{size} {message_id}".encode("utf-8", "surrogateescape")
        return "m" + hashlib.sha256(text).hexdigest()[:16]
    digest = hashlib.sha256(b"%d " % size)
    digest.update(raw)  # no copy of the body
    return "b" + digest.hexdigest()[:16]


class Epochs:
    """The UIDVALIDITY a poll last completed with, per (account, mailbox),
    in this process (one per daemon, shared by every session through the
    :class:`~fido_tx.sources.SourceContext`): one entry per mailbox polled;
    and whether that poll found mail (:meth:`found_mail`: the next session
    then asks no STATUS, :mod:`fido_tx.sources.imap.session`)."""

    def __init__(self):
        self._last = {}
        self._busy = set()

    def known(self, account_id, mailbox, epoch):
        return self._last.get((account_id, mailbox)) == epoch

    def seen(self, account_id, mailbox, epoch, found=False):
        """A poll went through ``epoch``; ``found``: its search found UIDs."""
        key = (account_id, mailbox)
        self._last[key] = epoch
        if found:
            self._busy.add(key)
        else:
            self._busy.discard(key)

    def found_mail(self, account_id, mailbox):
        """Whether the last poll completed in this process found mail there."""
        return (account_id, mailbox) in self._busy


def alias(uid, identity):
    """The id a message found at a reused ``uid`` is delivered under."""
    return f"{uid}~{identity}"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Reuse:
    """What :func:`check_stored` found: ``same`` UIDs hold what was stored
    (mark them), ``fetch`` maps reused UIDs to the id to deliver them under,
    ``reports`` says what was reused, one text per UID."""

    same: tuple = ()
    fetch: dict = attr.ib(factory=dict)
    reports: tuple = ()

    def error_text(self, mailbox):
        shown = "; ".join(self.reports[:5])
        more = "" if len(self.reports) <= 5 else f"; and {len(self.reports) - 5} more"
        return (f"the server reused UIDs in mailbox {mailbox!r} for different messages "
                f"(it breaks RFC 3501, as after a restore from backup): {shown}{more}; "
                f"stored them as new, nothing was marked in their place")


def _header_field(values):
    for key, value in values.items():
        if key.startswith(b"BODY[HEADER.FIELDS") and isinstance(value, bytes):
            return value
    return b""


def message_id_of(values):
    """The Message-ID of a FETCH answer with :data:`ITEMS`, ``None`` when it
    did not ask for it (sizes only)."""
    for key, value in values.items():
        if key.startswith(b"BODY[HEADER.FIELDS"):
            return extract_message_id(value if isinstance(value, bytes) else b"")
    return None


def wants_ids(poll, epoch):
    """Whether :func:`sizes` asks the server for Message-IDs in ``epoch``."""
    return not (poll.dry_run or poll.epochs is None
                or poll.epochs.known(poll.account.id, poll.mailbox, epoch))


def items_for(poll, epoch):
    """The FETCH items :func:`sizes` needs in ``epoch``."""
    return ITEMS if wants_ids(poll, epoch) else b"(UID RFC822.SIZE)"


async def _now(poll, uids):
    """``{uid: (size, message_id)}`` of what the server holds at ``uids``."""
    now = {}
    wanted = set(uids)

    def collect(uid, values):
        size = values.get(b"RFC822.SIZE")
        if uid in wanted and isinstance(size, bytes) and size.isdigit():
            now[uid] = (int(size), extract_message_id(_header_field(values)))

    await poll.fetch_items(uids, ITEMS, collect)
    return now


async def sizes(poll, epoch, uids, sink_call):
    """``(sizes, uids to fetch)``: the RFC822.SIZE of ``uids`` (new to the
    sink), and those of them to fetch: the ones the sink recognises by
    identity (stored before under another UIDVALIDITY, now recorded under
    this one) are marked here, their bodies never fetched.

    In an epoch this process polled before, the sizes alone (the hot path);
    also when the sink's ``filter_new`` just found no identity recorded for
    the mailbox (``may_recognise`` False: a new mailbox, a fresh Redis;
    nothing to recognise, so no Message-IDs asked of the server); else the
    identities come in the same ``UID FETCH`` and the sink is asked once.  Without ``poll.epochs`` (a session alone, as
    :func:`~fido_tx.sources.imap.session.fetch_mailbox` runs it), and in a
    dry run, the sizes alone: the sink then recognises what it stored
    before when it is delivered again (the body fetched for nothing)."""
    pre = poll.prefetched  # fetched with the SEARCH (the same items)
    if not (wants_ids(poll, epoch)
            and poll.sink.may_recognise(poll.account.id, poll.mailbox, epoch)):
        if pre is not None:
            return {u: pre[u][0] for u in uids if u in pre}, uids
        return await poll.sizes(uids), uids
    if pre is not None:
        now = {u: (pre[u][0], pre[u][1] or "") for u in uids if u in pre}
    else:
        now = await _now(poll, uids)
    identities = {poll.aliases.get(u) or str(u): of(size, mid)
                  for u, (size, mid) in now.items() if mid}
    found = await sink_call(poll.sink.recognise, poll.account.id, poll.mailbox, epoch,
                            identities) if identities else []
    found = set(found)
    known = [u for u in uids if (poll.aliases.get(u) or str(u)) in found]
    if known:
        poll.step("{n} messages stored before under another UIDVALIDITY, marking them",
                  n=len(known))
        await poll.mark(known)
        poll.marked += len(known)
    known = set(known)
    return {u: size for u, (size, _) in now.items()}, [u for u in uids if u not in known]


async def _digests(poll, sizes):
    """``{uid: identity}`` of messages without a Message-ID, by their bodies."""
    out = {}

    def collect(uid, values):
        body = values.get(b"BODY[]")
        if uid in sizes and isinstance(body, bytes):
            out[uid] = of(sizes[uid], "", body)

    limits = body_limits(sizes, poll.settings.max_message_size + 1024 * 1024)
    await poll.fetch_items(sorted(sizes), b"(UID BODY.PEEK[])", collect, **limits)
    return out


async def check_stored(poll, epoch, uids, sink_call):
    """Which of ``uids`` (stored already, says the sink) still hold what was
    stored; see the module docstring.  ``poll`` is the
    :class:`~fido_tx.sources.imap.poll.MailboxPoll`; ``sink_call`` its way
    of calling the sink."""
    account, mailbox = poll.account.id, poll.mailbox
    recorded = await sink_call(poll.sink.identities, account, mailbox, epoch,
                               [str(u) for u in uids])
    recorded = {u: r for u, r in zip(uids, recorded) if r}
    if not recorded:  # stored before identities were kept: the same
        return Reuse(same=tuple(uids))
    now = await _now(poll, sorted(recorded))
    current = {u: of(size, mid) for u, (size, mid) in now.items() if mid}
    by_body = {u: now[u][0] for u in now if not now[u][1]}
    if by_body:
        current.update(await _digests(poll, by_body))
    reused = {}
    for u in sorted(recorded):
        if u not in now:
            continue  # expunged meanwhile: marking it does nothing
        found = current.get(u)
        if found is not None and found != recorded[u]:
            reused[u] = found
    if not reused:
        return Reuse(same=tuple(uids))
    aliases = {u: alias(u, found) for u, found in reused.items()}
    fresh = set(await sink_call(poll.sink.filter_new, account, mailbox, epoch,
                                list(aliases.values())))
    reports = tuple(
        f"UID {u} now holds another message ({now[u][0]} bytes, "
        + (f"Message-ID {_show(now[u][1], 120)}" if now[u][1] else "no Message-ID") + ")"
        for u in sorted(reused) if aliases[u] in fresh)
    return Reuse(same=tuple(u for u in uids if u not in reused or aliases[u] not in fresh),
                 fetch={u: a for u, a in aliases.items() if a in fresh}, reports=reports)
