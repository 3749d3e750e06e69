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
"""

import attr
from twisted.logger import Logger
from zope.interface import implementer

from fido_tx import errors
from fido_tx.interfaces import IStatusSummary
from fido_tx.observe.report import iso_utc
from fido_tx.timefmt import parse_iso

#: the ``account`` of reports about the whole Fido instance
GLOBAL = "*"

OK = "ok"
POLLED = "polled"

_log = Logger(namespace="fido_tx.observe.status")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class AccountStatus:
    """What the tracker knows about one account."""

    #: "ok" or an error kind (including "redis")
    state: str
    #: clock seconds when ``state`` began
    since: float
    #: clock seconds of the first failure of the current failure streak (None while ok)
    failing_since: float | None = None
    #: failed sessions in the current streak
    failures: int = 0
    #: what the web application was last told: "ok" or an error kind
    reported: str = OK
    #: message of the last failure (for the "recovered" report)
    last_message: str = ""
    #: UIDs already reported as too large
    too_large: frozenset = frozenset()
    #: ISO UTC time of the last successful session ("" = none known)
    last_success_at: str = ""
    #: ISO UTC time of the last failed session ("" = none known)
    last_error_at: str = ""
    #: messages fetched over the account's life (from its hash, then counted)
    fetched_total: int = 0


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
        self._redis = redis
        self._store = store
        self._reporter = reporter
        self._metrics = metrics
        self.log = log or _log
        self.dry_run = dry_run
        self.scheduler = scheduler
        self.redis_down_after = redis_down_after
        self._accounts = {}
        #: bumped whenever an account's state changes, appears or goes
        self.version = 0
        self._failing = set()
        self._connections = {}
        #: key -> (kind, message, since) of global problems reported
        self._global = {}
        self._redis_timer = None

    # -- per account ---------------------------------------------------

    def record(self, account, result):
        """The scheduler's result observer: ``f(account, result)``."""
        account_id = result.account_id or getattr(account, "id", str(account))
        now = self._clock.seconds()
        dry = self.dry_run or result.dry_run
        if self._metrics is not None:
            self._metrics.observe_session(result)

        old = self._accounts.get(account_id)
        new = self._next_status(old, result, now)
        self._accounts[account_id] = new
        self._log_session(account_id, result, dry)

        if old is None or old.state != new.state:
            self._state_changed(account_id, new)
            self._log_change(account_id, old, new, result)

        server = _server(account)
        secrets = _secrets(account)
        if result.kind == errors.REDIS:
            if self._redis_connected():  # a Redis problem the connection state does not show
                self.report_global(errors.REDIS, result.message, debug=result.debug)
        elif result.ok and not dry:
            self._clear_redis_if_raised_by_results()

        report = self._report_for(account_id, old, new, result, server)
        if report is not None:
            new = attr.evolve(new, reported=OK if report[0] == errors.RECOVERED else report[0])
            self._accounts[account_id] = new
        if not dry and self._store is not None:
            self._store.record_session(result, extra=_changed_fields(old, new))
        if report is not None:
            kind, message, debug = report
            self._send(account_id, kind, message, debug, now, dry, secrets)

        uids = frozenset(result.too_large)
        if uids - new.too_large:
            fresh = sorted(uids - new.too_large)
            self._accounts[account_id] = attr.evolve(new, too_large=new.too_large | uids)
            shown = ", ".join(str(u) for u in fresh[:20]) + (" …" if len(fresh) > 20 else "")
            self._send(
                account_id,
                errors.TOO_LARGE,
                f"{len(fresh)} message(s) over the size limit left on the server "
                f"(UIDs {shown})",
                _debug(result.debug, server, None),
                now,
                dry,
                secrets,
            )
        elif not uids and result.ok and new.too_large:
            self._accounts[account_id] = attr.evolve(new, too_large=frozenset())

    def _next_status(self, old, result, now):
        state = OK if result.ok else result.kind
        if old is None:
            old = AccountStatus(state=state, since=now)
        old = attr.evolve(old, fetched_total=old.fetched_total + result.fetched)
        if result.ok:
            return attr.evolve(
                old,
                state=OK,
                since=old.since if old.state == OK else now,
                failing_since=None,
                failures=0,
                last_success_at=iso_utc(now),
            )
        if result.kind == errors.REDIS:
            # not the account's fault: keep its streak as it was
            return attr.evolve(old, state=state, since=old.since if old.state == state else now)
        return attr.evolve(
            old,
            last_error_at=iso_utc(now),
            state=state,
            since=old.since if old.state == state and old.failures else now,
            failing_since=old.failing_since if old.failing_since is not None else now,
            failures=old.failures + 1,
            last_message=result.message,
        )

    def _report_for(self, account_id, old, new, result, server):
        """``(kind, message, debug)`` to send, or None."""
        if result.kind == errors.REDIS:
            return None
        was = old.reported if old is not None else OK
        if result.ok:
            if was == OK:
                return None
            failed = old.failures if old is not None else 0
            since = iso_utc(old.failing_since) if old and old.failing_since else "?"
            return (
                errors.RECOVERED,
                f"recovered from {was}: {old.last_message}" if old.last_message
                else f"recovered from {was}",
                _debug(
                    result.debug,
                    server,
                    None,
                    extra=f"failing since: {since} ({failed} failed session(s))",
                ),
            )
        if was == result.kind:
            return None
        return (result.kind, result.message, _debug(result.debug, server, new.since))

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

    # -- whole instance ------------------------------------------------

    def report_global(self, kind, message, debug="", key=None):
        """Report a problem of the whole instance (account ``"*"``) once.

        ``key`` (default: ``kind``) names the problem; reporting the same key
        again while it is active does nothing.  :meth:`clear_global` ends it.
        Returns True when a report was sent (or would be, in dry-run).
        """
        key = key or kind
        if key in self._global:
            return False
        now = self._clock.seconds()
        self._global[key] = (kind, message, now)
        self.log.warn(
            "{account_id}: {kind} problem: {error}",
            account_id=GLOBAL, kind=kind, error=message, outcome=kind,
        )
        self._send(GLOBAL, kind, message, _debug(debug, "", now), now, self.dry_run, ())
        return True

    def clear_global(self, key, message=""):
        """The problem ``key`` is over: report ``recovered`` (once)."""
        problem = self._global.pop(key, None)
        if problem is None:
            return False
        kind, old_message, since = problem
        now = self._clock.seconds()
        text = message or f"recovered from {kind}: {old_message}"
        self.log.info(
            "{account_id}: {text}", account_id=GLOBAL, text=text, kind=errors.RECOVERED,
            outcome=errors.RECOVERED,
        )
        self._send(
            GLOBAL, errors.RECOVERED, text,
            f"problem began: {iso_utc(since)} ({now - since:.0f} s)", now, self.dry_run, (),
        )
        return True

    @property
    def global_problems(self):
        """``{key: (kind, message, since)}`` of the active instance-wide problems."""
        return dict(self._global)

    def redis_state(self, connected):
        """The store's connection observer: report Redis down after a grace period."""
        if connected:
            if self._redis_timer is not None and self._redis_timer.active():
                self._redis_timer.cancel()
            self._redis_timer = None
            self.clear_global("redis", "Redis is reachable again")
            return
        if "redis" in self._global or self._redis_timer is not None:
            return

        def down():
            self._redis_timer = None
            self.report_global(
                errors.REDIS,
                f"Redis has been unreachable for {self.redis_down_after:g} s; fetching is paused",
                debug=str(self._redis.last_error or "") if self._redis is not None else "",
            )

        if self.redis_down_after <= 0:
            down()
        else:
            self._redis_timer = self._clock.callLater(self.redis_down_after, down)

    def stop(self):
        """The daemon stops: a pending "Redis unreachable" report is not sent."""
        if self._redis_timer is not None and self._redis_timer.active():
            self._redis_timer.cancel()
        self._redis_timer = None

    def _clear_redis_if_raised_by_results(self):
        if "redis" in self._global and self._redis_timer is None and self._redis_connected():
            self.clear_global("redis", "Redis accepts writes again")

    def _redis_connected(self):
        return self._redis is None or self._redis.connected

    def backlog_state(self, paused, length):
        """Backpressure's ``on_change(paused, length)``."""
        if paused:
            self.report_global(
                errors.REDIS,
                f"the Redis stream holds {length} entries, over max_backlog: fetching "
                "is paused until the importer catches up",
                key="backlog",
            )
        else:
            self.clear_global(
                "backlog", f"the Redis stream is down to {length} entries: fetching resumed"
            )

    def report_config(self, message, account=None, kind=errors.CONFIG, debug=""):
        """A configuration problem: ``AccountsSource``'s ``report`` hook.

        Called as ``report(kind="config", message=..., account=None|id)``;
        ``account=None`` is the whole accounts file (account ``"*"``).  The
        caller reports each distinct problem once (and a relapse again), so
        this sends every call; it does not log (the caller logged it).
        """
        account_id = account or GLOBAL
        now = self._clock.seconds()
        self._send(account_id, kind, message, debug, now, self.dry_run, ())

    # -- output ----------------------------------------------------------

    def _send(self, account_id, kind, message, debug, now, dry, secrets):
        if dry:
            self.log.info(
                "{account_id}: dry run, not reported: {kind}: {error}",
                account_id=account_id, kind=kind, error=message,
            )
            return
        if self._reporter is None:
            return
        try:
            self._reporter.report(
                account_id, kind, message, debug, occurred_at=iso_utc(now), secrets=secrets
            )
        except Exception:
            self.log.failure("reporter failed for {account_id}", account_id=account_id)

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

    def _log_session(self, account_id, result, dry):
        suffix = " (dry run)" if dry else ""
        fields = dict(
            account_id=account_id,
            session_id=result.session_id,
            outcome=OK if result.ok else result.kind,
            kind=result.kind,
            messages=result.fetched,
            bytes=result.bytes,
            marked=result.marked,
            seconds=round(result.seconds, 3),
            too_large=len(result.too_large),
            dry_run=dry,
        )
        extra = ", {too_large} too large left on the server" if result.too_large else ""
        # the session's id (s=3f9a2c) on its summary line: grep gives its whole story
        head = "{account_id} s={session_id}" if result.session_id else "{account_id}"
        if result.ok:
            self.log.info(
                head + " ok: {messages} messages, {bytes} bytes, marked {marked}, "
                "{seconds:.2f} s" + extra + suffix,
                **fields,
            )
            return
        retry_in = self._retry_in(account_id)
        fields["error"] = result.message
        fields["retry_in"] = None if retry_in is None else round(retry_in)
        tail = "; retry in {retry_in} s" if retry_in is not None else ""
        if result.fetched:
            tail = ", after {messages} messages, {bytes} bytes, marked {marked}" + tail
        self.log.info(
            head + " failed ({kind}): {error}" + tail + extra + suffix,
            **fields,
        )

    def _log_change(self, account_id, old, new, result):
        old_state = old.state if old is not None else "new"
        fields = dict(account_id=account_id, old_state=old_state, state=new.state, kind=result.kind)
        if result.ok:
            if old is None:
                return  # a new account that works: the session line says it all
            self.log.info(
                "{account_id} state {old_state} -> ok: working again after {failures} failed "
                "session(s) since {failing_since}",
                failures=old.failures,
                failing_since=iso_utc(old.failing_since) if old.failing_since else "?",
                **fields,
            )
        else:
            # a redis result is the sink's problem, reported once per instance
            level = self.log.info if result.kind == errors.REDIS else self.log.warn
            level(
                "{account_id} state {old_state} -> {state}: {error}",
                error=result.message,
                **fields,
            )


def _changed_fields(old, new):
    """The extra hash fields a session changed: ``failing_since``, ``reported``."""
    fields = {}
    if old is None or new.failing_since != old.failing_since:
        fields["failing_since"] = iso_utc(new.failing_since) if new.failing_since else ""
    if old is None or new.reported != old.reported:
        fields["reported"] = new.reported
    return fields or None


def status_from_hash(fields, now):
    """An :class:`AccountStatus` from the account hash's ``{str: str}``."""
    kind = fields.get("last_error_kind") or "error"
    failing = fields.get("state") != OK
    state = kind if failing else OK
    failing_since = parse_iso(fields.get("failing_since", "")) if failing else None
    if failing and failing_since is None:
        failing_since = parse_iso(fields.get("last_error_at", ""))
    reported = fields.get("reported") or (kind if failing and kind != errors.REDIS else OK)
    try:
        fetched = int(fields.get("fetched_total") or 0)
    except ValueError:
        fetched = 0
    return AccountStatus(
        state=state,
        since=failing_since if failing and failing_since is not None else now,
        failing_since=failing_since if failing and kind != errors.REDIS else None,
        failures=1 if failing and kind != errors.REDIS else 0,
        reported=reported,
        last_message=fields.get("last_error", ""),
        last_success_at=fields.get("last_success_at", ""),
        last_error_at=fields.get("last_error_at", ""),
        fetched_total=fetched,
    )


def _server(account):
    host = getattr(account, "host", None)
    port = getattr(account, "port", None)
    if not host:
        return ""
    return f"{host}:{port}" if port else host


def _secrets(account):
    """Every form of the account's password (raw, escaped, SASL PLAIN...)."""
    from fido_tx.scrub import secret_forms

    password = getattr(account, "password", None)
    return secret_forms(password, getattr(account, "username", None)) if password else ()


def _debug(debug, server, since, extra=""):
    lines = [debug.rstrip()] if debug else []
    if server:
        lines.append(f"server: {server}")
    if since is not None:
        lines.append(f"since: {iso_utc(since)}")
    if extra:
        lines.append(extra)
    return "\n".join(lines)
