"""What one session result does to an account: its next state, the report it earns, its hash fields.

Pure functions over the frozen :class:`AccountStatus` (no clock, no I/O), so
the rules of :mod:`fido_tx.observe.status` can be read and tested alone:
a report only when what the web application was told changes, a ``redis``
result never the account's fault, ``recovered`` saying from what.
"""

import attr

from fido_tx import errors
from fido_tx.timefmt import iso_utc, parse_iso

__all__ = [
    "OK", "AccountStatus", "changed_fields", "debug_text", "next_status", "report_for",
    "secrets_of", "server_of", "status_from_hash",
]

OK = "ok"


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


def next_status(old, result, now):
    """The account's :class:`AccountStatus` after ``result`` (``old``: before, or None).

    Built with one constructor call, not ``attr.evolve`` (two per session
    were ~10 % of the result observer's time: evolve reads the class's
    fields on every call)."""
    state = OK if result.ok else result.kind
    if old is None:
        old = AccountStatus(state=state, since=now)
    fetched_total = old.fetched_total + result.fetched
    if result.ok:
        return AccountStatus(
            OK, old.since if old.state == OK else now, None, 0, old.reported,
            old.last_message, old.too_large, iso_utc(now), old.last_error_at, fetched_total)
    if result.kind == errors.REDIS:
        # not the account's fault: keep its streak as it was
        return AccountStatus(
            state, old.since if old.state == state else now, old.failing_since, old.failures,
            old.reported, old.last_message, old.too_large, old.last_success_at,
            old.last_error_at, fetched_total)
    return AccountStatus(
        state,
        old.since if old.state == state and old.failures else now,
        old.failing_since if old.failing_since is not None else now,
        old.failures + 1,
        old.reported,
        result.message,
        old.too_large,
        old.last_success_at,
        iso_utc(now),
        fetched_total,
    )


def report_for(old, new, result, server):
    """``(kind, message, debug)`` to send about an account after ``result``, or
    None: a report only when what the web application was told changes."""
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
            debug_text(
                result.debug,
                server,
                None,
                extra=f"failing since: {since} ({failed} failed session(s))",
            ),
        )
    if was == result.kind:
        return None
    return (result.kind, result.message, debug_text(result.debug, server, new.since))


def changed_fields(old, new):
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


def server_of(account):
    host = getattr(account, "host", None)
    port = getattr(account, "port", None)
    if not host:
        return ""
    return f"{host}:{port}" if port else host


def secrets_of(account):
    """Every form of the account's password (raw, escaped, SASL PLAIN...)."""
    from fido_tx.scrub import secret_forms

    password = getattr(account, "password", None)
    return secret_forms(password, getattr(account, "username", None)) if password else ()


def debug_text(debug, server, since, extra=""):
    """The debug text of a report: the session's, the server, since when."""
    lines = [debug.rstrip()] if debug else []
    if server:
        lines.append(f"server: {server}")
    if since is not None:
        lines.append(f"since: {iso_utc(since)}")
    if extra:
        lines.append(extra)
    return "\n".join(lines)
