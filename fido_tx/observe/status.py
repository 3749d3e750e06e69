"""Per-account state: one log line per session, reports on change, the account hash.

:class:`StatusTracker` is the scheduler's result observer
(``scheduler.add_result_observer(tracker.record)``).  For every
:class:`~fido_tx.outcome.SessionResult` it

* logs ONE line for the sysadmin, with format fields (``account_id``,
  ``outcome``, ``messages``, ``bytes``, ``marked``, ``seconds``, ``kind``,
  ``error``, ``retry_in``) so the JSON log format carries them as fields (never
  a field called ``message``: the JSON format uses that for the whole line);
* writes ``fido:account:<id>`` through ``store.record_session(result)``, and
  ``failing_since`` (an addition to the contract's fields: ISO time of the first
  failure of the current failure streak, "" while ok) through
  ``store.update_account`` when it changes; dry-run results write nothing;
* sends an error report only when the account's state CHANGES:

  - first result ever an error, ok -> error kind, kind -> other kind: a report
    of that kind (first result ok: nothing);
  - error -> ok: kind ``recovered``, the message says what it recovered from;
  - the same error again: nothing (the log line is still written);
  - messages left on the server for being too large (``result.too_large``):
    kind ``too_large``, once per new set of UIDs.

  The report's ``debug`` is the result's debug text plus the server's
  ``host:port`` and when the current state began.

A ``redis`` result is not the account's fault (the sink is down): it changes
the account's logged state but not what was reported about the account, so a
Redis outage does not send one report per account and then one ``recovered``
per account.  The outage is reported ONCE for the whole instance instead
(:meth:`redis_state`, or a ``redis`` result while the store says it is
connected, e.g. an out-of-memory Redis).

Reports about the whole instance use the account ``"*"`` (:data:`GLOBAL`):
Redis unreachable and stream backlog over ``max_backlog`` (kind ``redis``),
each reported once when it starts and once (``recovered``) when it ends; and
the accounts file unusable (kind ``config``, via :meth:`report_config`, which
the accounts source calls once per distinct problem).

In dry-run mode nothing is written to Redis and nothing is reported (the log
lines say what would have been).

The parts: :mod:`~fido_tx.observe.transitions` (the rules, pure functions),
:mod:`~fido_tx.observe.sessionlog` (the log lines),
:mod:`~fido_tx.observe.instance` (the instance-wide problems),
:mod:`~fido_tx.observe.outbox` (sending a report).  The tracker holds the
accounts' states and runs the parts in order for each result.
"""

import attr
from twisted.logger import Logger
from zope.interface import implementer

from fido_tx import errors
from fido_tx.interfaces import IStatusSummary
from fido_tx.observe.instance import GLOBAL, InstanceProblems
from fido_tx.observe.outbox import ReportOutbox
from fido_tx.observe.sessionlog import SessionLog
from fido_tx.observe.transitions import (
    OK,
    AccountStatus,
    changed_fields,
    debug_text,
    next_status,
    report_for,
    secrets_of,
    server_of,
    status_from_hash,
)

__all__ = ["GLOBAL", "OK", "POLLED", "AccountStatus", "StatusTracker", "status_from_hash"]

POLLED = "polled"

_log = Logger(namespace="fido_tx.observe.status")


@implementer(IStatusSummary)
class StatusTracker:
    """Tracks each account's state; logs, writes the account hash, reports changes.

    :param clock: ``IReactorTime``.
    :param store: an :class:`~fido_tx.interfaces.IAccountState` (like
        :class:`fido_tx.redis.state.AccountState`); may be None.
    :param reporter: has ``report(account_id, kind, message, debug,
        occurred_at, secrets=())``; may be None.
    :param metrics: has ``observe_session(result)``; may be None.
    :param scheduler: optional; ``scheduler.account_state(id).next_due``
        gives the "retry in N s" of the log line.  May be set later as
        the ``scheduler`` attribute.
    :param redis_down_after: seconds Redis must stay unreachable before it is
        reported (a restart or failover is not worth a report).
    :param redis: an :class:`~fido_tx.interfaces.IRedisHealth` (the shared
        connection); None counts as connected.
    """

    def __init__(
        self,
        clock,
        store,
        reporter,
        metrics=None,
        log=None,
        dry_run=False,
        scheduler=None,
        redis_down_after=30.0,
        redis=None,
    ):
        self._clock = clock
        self._store = store
        self._metrics = metrics
        self.log = log or _log
        self.dry_run = dry_run
        self.scheduler = scheduler
        self._outbox = ReportOutbox(reporter, self.log)
        self._lines = SessionLog(self.log)
        self._instance = InstanceProblems(clock, self._outbox, self.log, redis,
                                          redis_down_after, dry_run)
        self._accounts = {}
        #: bumped whenever an account's state changes, appears or goes
        self.version = 0
        self._failing = set()
        self._connections = {}

    # -- per account ---------------------------------------------------

    def record(self, account, result):
        """The scheduler's result observer: ``f(account, result)``."""
        account_id = result.account_id or getattr(account, "id", str(account))
        now = self._clock.seconds()
        dry = self.dry_run or result.dry_run
        if self._metrics is not None:
            self._metrics.observe_session(result)

        old = self._accounts.get(account_id)
        new = next_status(old, result, now)
        self._accounts[account_id] = new
        self._lines.session(account_id, result, dry,
                            None if result.ok else self._retry_in(account_id))
        if old is None or old.state != new.state:
            self._state_changed(account_id, new)
            self._lines.change(account_id, old, new, result)
        self._instance.session_result(result, dry)

        server = server_of(account)
        report = report_for(old, new, result, server)
        # every form of the password (~0.1 ms): only for a report to send
        secrets = secrets_of(account) if report is not None or result.too_large else ()
        if report is not None:
            new = attr.evolve(new, reported=OK if report[0] == errors.RECOVERED else report[0])
            self._accounts[account_id] = new
        if not dry and self._store is not None:
            self._store.record_session(result, extra=changed_fields(old, new), account=account)
        if report is not None:
            kind, message, debug = report
            self._outbox.send(account_id, kind, message, debug, now, dry, secrets)
        self._too_large(account_id, new, result, server, now, dry, secrets)

    def _too_large(self, account_id, status, result, server, now, dry, secrets):
        """Report messages left on the server for their size, once per new set."""
        uids = frozenset(result.too_large)
        if uids - status.too_large:
            fresh = sorted(uids - status.too_large)
            self._accounts[account_id] = attr.evolve(status, too_large=status.too_large | uids)
            shown = ", ".join(str(u) for u in fresh[:20]) + (" …" if len(fresh) > 20 else "")
            self._outbox.send(
                account_id,
                errors.TOO_LARGE,
                f"{len(fresh)} message(s) over the size limit left on the server "
                f"(UIDs {shown})",
                debug_text(result.debug, server, None),
                now,
                dry,
                secrets,
            )
        elif not uids and result.ok and status.too_large:
            self._accounts[account_id] = attr.evolve(status, too_large=frozenset())

    def restore(self, account_id, fields):
        """Start an account from its hash ``fido:account:<id>`` (``{str: str}``).

        Called before the account's first result of this run (see
        :class:`fido_tx.observe.restore.RestoreGate`); does nothing when the
        account already has a state here, or the hash is empty.  ``reported``
        (what the web application was last told, written with every state
        change) is taken as is; a hash written before that field existed
        counts its error kind as reported, so a failure is not reported twice.
        """
        if account_id in self._accounts or not fields.get("state"):
            return None
        self._accounts[account_id] = status = status_from_hash(fields, self._clock.seconds())
        self._state_changed(account_id, status)
        return status

    def _state_changed(self, account_id, status):
        self.version += 1
        if status is not None and status.state != OK:
            self._failing.add(account_id)
        else:
            self._failing.discard(account_id)

    def failing_ids(self):
        """The ids of the accounts not ok now (the tracker's own set: do not change it)."""
        return self._failing

    def set_connection(self, account_id, connection):
        """The source says how it reaches the mailbox: "polled", "idle", "held"."""
        if connection == POLLED:
            self._connections.pop(account_id, None)
        else:
            self._connections[account_id] = connection

    def connection_of(self, account_id):
        """"polled" (the default, until a source says otherwise), "idle", "held"."""
        return self._connections.get(account_id, POLLED)

    def accounts(self):
        """``{account_id: AccountStatus}`` (the tracker's own dict: do not change it)."""
        return self._accounts

    def forget(self, account_id):
        """The account was removed from the set: drop what is known about it."""
        if self._accounts.pop(account_id, None) is not None:
            self._state_changed(account_id, None)
        self._connections.pop(account_id, None)

    def state_of(self, account_id):
        """The :class:`AccountStatus` of an account, or None."""
        return self._accounts.get(account_id)

    def summary(self):
        """``{state: number of accounts}`` over the accounts seen so far."""
        counts = {}
        for status in self._accounts.values():
            counts[status.state] = counts.get(status.state, 0) + 1
        return counts

    def _retry_in(self, account_id):
        scheduler = self.scheduler
        if scheduler is None or not hasattr(scheduler, "account_state"):
            return None
        try:
            state = scheduler.account_state(account_id)
        except Exception:
            return None
        if state is None or state.next_due is None:
            return None
        return max(0.0, state.next_due - self._clock.seconds())

    # -- whole instance (see fido_tx.observe.instance) -------------------

    def report_global(self, kind, message, debug="", key=None):
        """Report a problem of the whole instance (account ``"*"``) once per
        ``key`` (default: ``kind``) while it is active; :meth:`clear_global`
        ends it.  True when a report was sent (or would be, in dry-run)."""
        return self._instance.report(kind, message, debug=debug, key=key)

    def clear_global(self, key, message=""):
        """The problem ``key`` is over: report ``recovered`` (once)."""
        return self._instance.clear(key, message)

    @property
    def global_problems(self):
        """``{key: (kind, message, since)}`` of the active instance-wide problems."""
        return dict(self._instance.active)

    def redis_state(self, connected):
        """The store's connection observer: report Redis down after a grace period."""
        self._instance.redis_state(connected)

    def backlog_state(self, paused, length):
        """Backpressure's ``on_change(paused, length)``."""
        self._instance.backlog_state(paused, length)

    def stop(self):
        """The daemon stops: a pending "Redis unreachable" report is not sent."""
        self._instance.stop()

    def report_config(self, message, account=None, kind=errors.CONFIG, debug=""):
        """A configuration problem: ``AccountsSource``'s ``report`` hook.

        Called as ``report(kind="config", message=..., account=None|id)``;
        ``account=None`` is the whole accounts file (account ``"*"``).  The
        caller reports each distinct problem once (and a relapse again), so
        this sends every call; it does not log (the caller logged it).
        """
        now = self._clock.seconds()
        self._outbox.send(account or GLOBAL, kind, message, debug, now, self.dry_run, ())
