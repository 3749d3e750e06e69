"""The seams of Fido, declared: what each part promises the others.

Every part that another part depends on provides one of these interfaces, and
so does its fake in :mod:`fido_tx.testing` (the txacme habit: fakes shipped
next to the interfaces, checked with ``zope.interface.verify.verifyObject``
against the real objects and the fakes alike).  No module guesses at another
with ``getattr``.

Data flows one way: accounts -> scheduler -> source session -> sink ->
marking on the server; outcomes flow to the status side.
"""

from zope.interface import Attribute, Interface


class ISink(Interface):
    """Where fetched messages go (``[delivery.NAME]`` of one ``kind``).

    Exactly once per message key: a sink deduplicates by
    :class:`fido_tx.sinks.message.MessageKey`.  A sink's failures are
    :class:`~fido_tx.errors.FidoError` of the sink's own kind (``redis`` for
    the Redis sinks, ``delivery`` for a webhook): the session never names the
    sink it talks to.
    """

    kind = Attribute("the delivery kind: 'stream', 'list', 'sidekiq', 'webhook'")

    def filter_new(account_id, mailbox, epoch, ids):
        """Which of ``ids`` (strings) of one mailbox and epoch (IMAP:
        UIDVALIDITY as a decimal string) are not delivered yet.

        :return: Deferred firing with the list of those ids, in the order
            given; errbacks with a :class:`~fido_tx.errors.FidoError` when the
            sink cannot answer (then nothing is fetched).
        """

    def identities(account_id, mailbox, epoch, ids):
        """The ``identity`` recorded with each of ``ids`` when it was
        delivered (:mod:`fido_tx.sinks.identity`), ``""`` where none is
        (delivered before identities were kept, forgotten, or never).

        :return: Deferred firing with a list of strings, in the order given;
            errbacks with a :class:`~fido_tx.errors.FidoError` when the sink
            cannot answer.
        """

    def recognise(account_id, mailbox, epoch, identities):
        """Of ``identities`` (``{id: identity}``, ids not delivered yet),
        the ids whose identity was delivered before from the same account
        and mailbox under another key: those are recorded as delivered under
        their new key (they may be marked on the server) and not delivered.

        :return: Deferred firing with the list of those ids; errbacks with a
            :class:`~fido_tx.errors.FidoError` when the sink cannot answer.
        """

    def may_recognise(account_id, mailbox, epoch):
        """Whether a :meth:`recognise` for this mailbox, asked right after
        the :meth:`filter_new` that found its new ids, could find anything
        (synchronous).  ``False`` only when that ``filter_new`` learnt that
        nothing is recorded for the mailbox (no identity kept: a new
        mailbox, a fresh Redis), or that ``epoch`` was checked already
        (the epoch of the last identity recorded: the first poll after a
        restart): the IMAP session then asks the server for sizes only,
        not Message-IDs.  ``True`` when unsure.
        """

    def deliver(messages):
        """Deliver a batch of :class:`~fido_tx.sinks.message.Message` of one
        account, each exactly once.

        A message with an ``identity`` already delivered from the same
        account and mailbox under another key (the mailbox's UIDVALIDITY
        changed) is recorded under its new key and confirmed, but not
        delivered again; the identity is recorded with the key in the same
        atomic step as the dedupe record.

        :return: Deferred firing with a
            :class:`~fido_tx.sinks.message.Delivery`: the ids now durably
            delivered (new or before: both may be marked on the server), the
            ids refused for good (to be flagged and left), and the error that
            kept the others back.  Errbacks with a ``FidoError`` when nothing
            can be confirmed; then nothing may be marked.
        """


class ISource(Interface):
    """Reads one account's mailbox: one poll, as a session.

    Built per account by a factory registered in :mod:`fido_tx.sources`.
    """

    def poll():
        """Run one session: fetch what is new, deliver it, mark it.

        :return: Deferred firing with a
            :class:`~fido_tx.outcome.SessionResult`, never failing; cancelling
            it aborts the session without marking anything more.
        """


class ICredentials(Interface):
    """What an account proves itself with: a password or an OAuth2 token.

    The session asks for what to send; the scrubber asks what to hide.
    """

    def secret():
        """Deferred firing with the secret to send now (password or token)."""

    def invalidate():
        """The server refused the last secret: fetch a fresh one next time
        (a no-op for a password)."""

    def secret_forms():
        """Every form the secret may be sent or echoed in (raw, escaped,
        SASL encodings), as strings, for :func:`fido_tx.scrub.scrub`."""

    def lifetime():
        """How long the last secret lasts: ``None`` (a password does not
        expire), or ``(renew_at, expires_at)`` in the reactor's seconds: from
        ``renew_at`` on, :meth:`secret` gives a fresh one; at ``expires_at``
        servers stop taking it (a held connection logs in again before)."""


class IAccountState(Interface):
    """The per-account hash ``fido:account:<id>`` (the contract's fields)."""

    def update_account(account_id, fields):
        """Set hash fields (best effort: never errbacks)."""

    def record_session(result, started_at_iso=None, extra=None, account=None):
        """Write what one session did (best effort: never errbacks); with
        ``account``, its session history entry too, in the same write."""


class ISchedulerView(Interface):
    """What the status side (health, metrics, status, heartbeat) may read of
    the scheduler, and the two calls backpressure and the Redis observer make.

    Attributes, not methods, where the scheduler has properties
    (``running_count`` is a count; ``running`` is ``Service.running``, a flag).
    """

    running_count = Attribute("sessions that occupy a worker slot now (an int)")
    accounts = Attribute("the current set: {id: Account}")
    paused_reasons = Attribute("frozenset of the reasons fetching is paused ('redis', 'backlog')")
    paused = Attribute("True while fetching is paused for any reason")
    last_completion_at = Attribute("clock seconds of the last completed session, or None")

    def lag():
        """Seconds the most overdue waiting account has waited past its due time."""

    def account_state(account_id):
        """The :class:`~fido_tx.schedule.scheduler.AccountState` of one
        account, None when not in the set."""

    def pause(reason):
        """Start no new session until every reason is resumed."""

    def resume(reason):
        """Drop one pause reason."""


class IReporterView(Interface):
    """What metrics read of the error reporter."""

    queue_length = Attribute("reports not yet delivered")
    dropped = Attribute("reports dropped because the queue was full")


class IStatusSummary(Interface):
    """What metrics and health read of the status tracker."""

    def summary():
        """``{state: number of accounts}`` (``ok`` and error kinds)."""


# -- Redis (fido_tx.redis) ----------------------------------------------------


class IRedisHealth(Interface):
    """What the status side may read of the shared Redis connection
    (:class:`fido_tx.redis.connection.RedisConnection`)."""

    connected = Attribute("True while a connection is up and ready (AUTH/SELECT/scripts done)")
    last_error = Attribute("why the connection is down or last failed (one line, no secret), or None")

    def add_connection_observer(observer):
        """Call ``observer(connected: bool)`` on every connect and disconnect."""


class IBacklog(Interface):
    """A sink whose queue an importer drains (the stream, the list): what
    backpressure and ``fido_backlog_messages`` read."""

    last_length = Attribute("the queue's length after the last delivery or backlog(), or None")

    def backlog():
        """Deferred firing with the queue's length now (``XLEN``/``LLEN``)."""


class IMailboxPositions(Interface):
    """Where an IMAP mailbox stands for ``select = "new"`` and ``start_from
    = "now"``: the highest UID handled per (account, mailbox), with the
    UIDVALIDITY it belongs to (:mod:`fido_tx.redis.positions`)."""

    def get(account_id, mailbox):
        """Deferred firing with ``(epoch, uid)`` (a str and an int) or ``None``
        when nothing is recorded; errbacks a ``redis`` FidoError."""

    def advance(account_id, mailbox, epoch, uid):
        """Record ``uid`` for ``epoch``: a higher UID of the same epoch, or
        any UID of another epoch (which replaces the old record).  Never
        lowers a recorded UID of the same epoch.  Deferred; errbacks a
        ``redis`` FidoError."""


class IHeartbeatWriter(Interface):
    """Writes ``fido:instance:<id>`` (:mod:`fido_tx.redis.heartbeat`)."""

    def heartbeat(instance_id, mapping, ttl):
        """``HSET`` the mapping and ``EXPIRE`` the key; best effort: fires
        True when written, False when not, never errbacks."""
