"""Which UIDs one IMAP poll takes: the account's ``select`` and ``start_from``.

``select = "unseen"``, ``start_from = "all"`` (the defaults): ``UID SEARCH
UNSEEN``, as always; nothing is kept in Redis and STATUS (UNSEEN) = 0 ends
the poll before SELECT.

Otherwise the poll keeps a *position* per (account, mailbox): the
UIDVALIDITY and the highest UID handled (:mod:`fido_tx.redis.positions`).

- ``select = "new"``: every UID above the position, whatever its flags (a
  mailbox people also read by hand): ``UID SEARCH UID <last+1>:<top>``.
- ``select = "unseen"`` with a position: the unseen ones above it:
  ``UID SEARCH UID <last+1>:<top> UNSEEN``.
- ``start_from = "now"``: the first session (no position for this
  UIDVALIDITY) records UIDNEXT - 1 (from STATUS, else SELECT) and takes
  nothing; later sessions take only what is above it.
- ``start_from = "all"``: no position yet means position 0.

``<top>`` is ``last + max_search_uids``, never ``*``: ``n:*`` always matches
the highest UID even below ``n``, and a bounded range can never hold more
UIDs than ``max_search_uids``, so the answer is never cut (a cut answer is
not known to be the lowest UIDs, and the position must skip none).  UIDs at
or below the position are dropped from any answer all the same.

The position moves only after a poll that raised nothing, i.e. after every
UID it found was delivered and marked (or left flagged: too large,
rejected): to the highest UID found, or further to ``min(top, UIDNEXT -
1)`` (every UID up to there was searched).  A crash before that write leaves
the position lower: the next poll finds the same UIDs, the sink's dedupe
record says they are delivered, and they are only marked again.  Nothing is
skipped, nothing delivered twice.  A dry run never writes it.

A new UIDVALIDITY (a restored or rebuilt mailbox): with ``start_from =
"now"`` the position starts again at the new UIDNEXT - 1 (taking "everything
above nothing" would flood the application with the whole mailbox), and one
warning says so: mail that arrived between the last poll and the change is
not taken.  With ``start_from = "all"`` the new UIDVALIDITY starts at 0, as
a first session does.
"""

from twisted.logger import Logger

from fido_tx import errors
from fido_tx.errors import FidoError
from fido_tx.sources.imap.client import ImapCommandError
from fido_tx.sources.imap.parse import mailbox_name, parse_search, parse_status

#: the highest UID IMAP allows (a 32-bit unsigned number)
MAX_UID = 4294967295

_log = Logger()


def search_handler(found):
    """An ``untagged`` callback adding each SEARCH response's UIDs to ``found``."""

    def untagged(segments):
        text = segments[0]
        if len(segments) == 1 and (text[:7].upper() == b"SEARCH " or text.upper() == b"SEARCH"):
            found.update(parse_search(text))

    return untagged


def status_items(account):
    """What a poll's STATUS asks: UNSEEN, and where the mailbox ends when
    the account keeps a position."""
    if account.select == "new" or account.start_from == "now":
        return b"(UIDNEXT UIDVALIDITY UNSEEN)"
    return b"(UNSEEN)"


def send_status(command, mailbox, items):
    """Write ``STATUS <mailbox> <items>`` through ``command``: a Deferred
    firing with the last answer's ``{attribute: value}``, or ``None`` when
    the server answered none or refused the command (NO/BAD)."""
    answers = []

    def untagged(segments):
        found = parse_status(segments)
        if found:
            answers.append(found)

    def refused(failure):
        failure.trap(ImapCommandError)
        return None

    d = command(b"STATUS", mailbox_name(mailbox) + b" " + items, untagged=untagged)
    return d.addCallbacks(lambda _: answers[-1] if answers else None, refused)


class Selection:
    """One poll's choice of UIDs (see the module docstring).

    :param command: the poll's ``command(name, args, untagged=...)``.
    :param positions: an :class:`~fido_tx.interfaces.IMailboxPositions`, or
        ``None`` (then only a dry run may use ``select = "new"`` or
        ``start_from = "now"``; it reads as "nothing recorded").
    :param limit: ``[imap] max_search_uids``.
    """

    def __init__(self, account, mailbox, command, positions=None, dry_run=False,
                 limit=100_000, step=None, log=None):
        self.account = account
        self.mailbox = mailbox
        self.command = command
        self.positions = positions
        self.dry_run = dry_run
        self.limit = max(1, int(limit))
        self.step = step or (lambda text, **kw: None)
        self.log = log or _log
        self.new = account.select == "new"
        self.from_now = account.start_from == "now"
        #: whether a position is kept (anything but the defaults)
        self.tracked = self.new or self.from_now
        #: ``(epoch, uid)`` as read from the store
        self.record = None
        #: the UIDVALIDITY this poll works in (once known), as a string
        self.epoch = None
        #: UIDs at or below this are never taken
        self.last = 0
        self.uidnext = None
        #: the top of the UID range searched
        self.top = None

    @property
    def what(self):
        """What the search finds, for log lines: ``unseen`` or ``new``."""
        return "new" if self.new else "unseen"

    # -- before SELECT -----------------------------------------------------------

    async def load(self):
        """Read the position (tracked accounts only)."""
        if not self.tracked:
            return
        if self.positions is None:
            if not self.dry_run:
                raise FidoError(errors.CONFIG, 'select = "new" and start_from = "now" need the'
                                               " position store (Redis); none is configured")
            return
        self.record = await self.positions.get(self.account.id, self.mailbox)

    def status_items(self):
        """What STATUS asks of the mailbox."""
        return status_items(self.account)

    async def status(self, sent=None):
        """``STATUS`` of the mailbox (not selected): its attributes, or
        ``None`` when the server does not answer them (SELECT decides).
        ``sent``: the answer of a STATUS already written (pipelined with
        LOGIN, :func:`send_status`)."""
        if sent is None:
            sent = send_status(self.command, self.mailbox, self.status_items())
        return await sent

    async def settled_by_status(self, status):
        """Whether a STATUS answer ends the poll: nothing unseen (RFC 3501:
        UNSEEN counts what ``SEARCH UNSEEN`` finds), nothing above the
        position, or the first session of ``start_from = "now"``, which
        records UIDNEXT - 1 without opening the mailbox."""
        if not status:
            return False
        unseen = status.get(b"UNSEEN")
        if not self.tracked:
            return unseen == 0
        uidvalidity, uidnext = status.get(b"UIDVALIDITY"), status.get(b"UIDNEXT")
        if uidvalidity is None or uidnext is None:
            return False
        if not await self.begin(uidvalidity, uidnext):
            return True
        if uidnext - 1 <= self.last:
            return True
        return not self.new and unseen == 0

    # -- after SELECT --------------------------------------------------------------

    async def begin(self, uidvalidity, uidnext):
        """Settle the position for ``uidvalidity``; False when this poll
        only recorded where the mailbox stands (``start_from = "now"``)."""
        epoch = str(uidvalidity)
        if not self.tracked or self.epoch == epoch:
            return True
        self.epoch, self.uidnext = epoch, uidnext
        record = self.record
        if record is not None and record[0] == epoch:
            self.last = record[1]
            return True
        self.last = 0
        if record is not None:
            self.changed(record, epoch)
        if not self.from_now:
            return True
        start = max(0, (uidnext or 1) - 1)
        if self.dry_run:
            self.step("dry run: start_from = now would start after UID {uid}", uid=start)
        else:
            await self.positions.advance(self.account.id, self.mailbox, epoch, start)
            self.log.info("{account_id} {mailbox}: start_from = \"now\": starting after UID "
                          "{uid} (uidvalidity {epoch}); earlier mail is left as it is",
                          account_id=self.account.id, mailbox=self.mailbox, uid=start,
                          epoch=epoch)
        self.record, self.last = (epoch, start), start
        return False

    def changed(self, record, epoch):
        if self.from_now:
            self.log.warn(
                "{account_id} {mailbox}: UIDVALIDITY changed from {old} to {new} (the mailbox "
                "was rebuilt or restored): start_from = \"now\" starts again from its current "
                "end; mail that arrived since the last poll is not taken (check the mailbox "
                "by hand if some is missing)", account_id=self.account.id,
                mailbox=self.mailbox, old=record[0], new=epoch)
        else:
            self.log.info("{account_id} {mailbox}: UIDVALIDITY changed from {old} to {new}: "
                          "taking the mailbox from its first UID", account_id=self.account.id,
                          mailbox=self.mailbox, old=record[0], new=epoch)

    async def uidnext_of(self, info):
        """SELECT's UIDNEXT, else the highest UID + 1 (``UID SEARCH UID *``)."""
        if not self.tracked or info.uidnext is not None:
            return info.uidnext
        found = set()
        try:
            await self.command(b"UID", b"SEARCH UID *", untagged=search_handler(found))
        except ImapCommandError:
            return None
        return max(found, default=0) + 1

    def query(self, keywords=b""):
        """The ``SEARCH`` criteria (``keywords``: the ``UNKEYWORD`` part)."""
        if not self.tracked:
            return b"SEARCH UNSEEN" + keywords
        self.top = min(self.last + self.limit, MAX_UID)
        query = b"SEARCH UID %d:%d" % (self.last + 1, max(self.top, self.last + 1))
        return query + (b"" if self.new else b" UNSEEN") + keywords

    def keep(self, uids):
        """The UIDs of a SEARCH answer this poll takes, ascending."""
        return sorted(u for u in uids if u > self.last)

    async def finish(self, found):
        """After a poll that handled every UID in ``found``: move the position."""
        if not self.tracked or self.dry_run or self.epoch is None:
            return
        top = max(found, default=0)
        if self.uidnext is not None and self.top is not None:
            top = max(top, min(self.top, self.uidnext - 1))
        if top > self.last:
            await self.positions.advance(self.account.id, self.mailbox, self.epoch, top)
            self.last = top
