"""``fido status``: each account's state and the live instances, read from Redis.

Reads the hashes ``fido:account:<id>`` (``SCAN``) and ``fido:instance:<id>``
(the heartbeats, which expire when an instance dies) and prints a summary, the
failing accounts (error kind, message, since when) and the instances alive;
``--json`` prints the same as one JSON document::

    {"redis": "redis://host:6379/0",
     "summary": {"total": 3, "ok": 2, "failing": 1, "unknown": 0, "by_kind": {"auth": 1}},
     "accounts": [{"id": ..., "state": ..., "kind": ..., "message": ...,
                   "failing_since": ..., "last_success_at": ..., "last_attempt_at": ...,
                   "last_error_at": ..., "fetched_total": ...}, ...],
     "instances": [{"id": ..., "host": ..., "pid": ..., "version": ...,
                    "accounts": ..., "sessions": ..., "expires_in": ...}, ...]}

A CLI may block: this uses a tiny synchronous RESP client over a socket (TCP,
TLS for ``rediss://``, or a Unix socket), with a timeout on every read, and no
Redis library.  Exit status: 0, or 1 with one line on stderr when the config
or Redis cannot be used.  The Redis password is never printed.
"""

import json
import socket
from datetime import datetime, timezone

from fido_tx.redis.resp import RedisReplyError, RespConnection, text as _s

from fido_tx.redis.keys import ACCOUNT_PREFIX, INSTANCE_PREFIX
from fido_tx.timefmt import ago

MESSAGE_WIDTH = 72
WATCH_INTERVAL = 2.0
#: cursor home + clear screen (what watch(1) and top do)
CLEAR = "\x1b[H\x1b[2J"


class StatusError(Exception):
    """A one-line failure of ``fido status``."""


# -- reading and shaping ----------------------------------------------------------


def read_status(url, timeout=5.0):
    """The status document (see the module docstring) from Redis at ``url``."""
    with RespConnection(url, timeout) as conn:
        accounts = conn.hashes(conn.scan(ACCOUNT_PREFIX + "*"))
        instance_keys = list(conn.scan(INSTANCE_PREFIX + "*"))
        instances = conn.hashes(instance_keys)
        ttls = conn.pipeline([("TTL", k) for k in instance_keys])
        ttl_by_key = {
            _s(k): t for k, t in zip(instance_keys, ttls) if isinstance(t, int)
        }
    return shape(url.redacted(), accounts, instances, ttl_by_key)


def _account_row(account_id, h):
    state = h.get("state", "") or "unknown"
    failing = state not in ("ok", "unknown")
    kind = (h.get("last_error_kind") or state) if failing else None
    return {
        "id": account_id,
        "state": state,
        "kind": kind,
        "message": h.get("last_error", "") if failing else "",
        "failing_since": h.get("failing_since") or (h.get("last_error_at") if failing else None) or None,
        "last_success_at": h.get("last_success_at") or None,
        "last_attempt_at": h.get("last_attempt_at") or None,
        "last_error_at": h.get("last_error_at") or None,
        "fetched_total": _int_or(h.get("fetched_total"), 0),
    }


def _int_or(value, default):
    try:
        return int(value)
    except (TypeError, ValueError):
        return default if value in (None, "") else value


#: heartbeat fields of held IMAP connections (fido_tx.redis.heartbeat)
_HELD_FIELDS = ("held", "idle", "reconnects")


def shape(redis_url, accounts, instances, ttls=None):
    ttls = ttls or {}
    rows = [
        _account_row(key[len(ACCOUNT_PREFIX):], h) for key, h in sorted(accounts.items())
    ]
    by_kind = {}
    for row in rows:
        if row["kind"]:
            by_kind[row["kind"]] = by_kind.get(row["kind"], 0) + 1
    ok = sum(1 for r in rows if r["state"] == "ok")
    unknown = sum(1 for r in rows if r["state"] == "unknown")
    inst = []
    for key, h in sorted(instances.items()):
        inst.append(
            {
                "id": key[len(INSTANCE_PREFIX):],
                "host": h.get("host", ""),
                "pid": _int_or(h.get("pid"), None),
                "version": h.get("version", ""),
                "accounts": _int_or(h.get("accounts"), None),
                "sessions": _int_or(h.get("sessions"), None),
                # held IMAP connections, those in IDLE, and how many were replaced
                **{k: _int_or(h.get(k), None) for k in _HELD_FIELDS},
                "expires_in": ttls.get(key),
                **{k: v for k, v in h.items()
                   if k not in ("host", "pid", "version", "accounts", "sessions")
                   + _HELD_FIELDS},
            }
        )
    return {
        "redis": redis_url,
        "summary": {
            "total": len(rows),
            "ok": ok,
            "failing": len(rows) - ok - unknown,
            "unknown": unknown,
            "by_kind": dict(sorted(by_kind.items())),
        },
        "accounts": rows,
        "instances": inst,
    }


# -- text output --------------------------------------------------------------------


def _age(iso, now):
    if not iso:
        return ""
    try:
        when = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return ""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return ago((now - when).total_seconds())


def _when(iso, now):
    """``2026-11-21 08:00 (32h ago)`` (UTC) for the table; JSON keeps the ISO text."""
    if not iso:
        return "never"
    age = _age(iso, now)
    short = iso
    if len(iso) >= 16 and iso[10:11] == "T":
        short = iso[:10] + " " + iso[11:16]
    return f"{short} ({age})" if age else short


def _table(headers, rows):
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    lines = []
    for row in [headers] + rows:
        cells = [c.ljust(w) for c, w in zip(row, widths)]
        lines.append("  ".join(cells).rstrip())
    return lines


def _one_line(text, width=MESSAGE_WIDTH):
    text = " ".join(str(text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_text(doc, now=None):
    """The status document as lines for a terminal."""
    now = now or datetime.now(timezone.utc)
    s = doc["summary"]
    kinds = ", ".join(f"{k} {n}" for k, n in s["by_kind"].items())
    head = f"Accounts: {s['total']} ({s['ok']} ok, {s['failing']} failing"
    head += f": {kinds}" if kinds else ""
    head += f", {s['unknown']} not run yet)" if s["unknown"] else ")"
    lines = [f"Redis: {doc['redis']}", head]
    failing = [a for a in doc["accounts"] if a["kind"]]
    if failing:
        lines += ["", "Failing accounts:"]
        lines += _table(
            ["ACCOUNT", "KIND", "FAILING SINCE (UTC)", "LAST SUCCESS", "LAST ATTEMPT", "MESSAGE"],
            [
                [
                    a["id"],
                    a["kind"],
                    _when(a["failing_since"], now),
                    _when(a["last_success_at"], now),
                    _when(a["last_attempt_at"], now),
                    _one_line(a["message"]),
                ]
                for a in failing
            ],
        )
    lines += ["", f"Instances alive: {len(doc['instances'])}"]
    if doc["instances"]:
        lines += _table(
            ["INSTANCE", "HOST", "PID", "VERSION", "ACCOUNTS", "SESSIONS", "HELD", "IDLE",
             "RECONNECTS", "EXPIRES IN"],
            [
                [
                    i["id"],
                    str(i["host"]),
                    "" if i["pid"] is None else str(i["pid"]),
                    str(i["version"]),
                    "" if i["accounts"] is None else str(i["accounts"]),
                    "" if i["sessions"] is None else str(i["sessions"]),
                    *("" if i.get(k) is None else str(i[k]) for k in _HELD_FIELDS),
                    "" if i["expires_in"] is None else f"{i['expires_in']} s",
                ]
                for i in doc["instances"]
            ],
        )
    else:
        lines.append("(no Fido instance has sent a heartbeat recently)")
    return lines


# -- the command ---------------------------------------------------------------------


def add_arguments(parser):
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document instead of a table"
    )
    parser.add_argument(
        "--watch",
        metavar="SECONDS",
        nargs="?",
        type=float,
        const=WATCH_INTERVAL,
        default=None,
        help=f"redraw the summary every SECONDS (default {WATCH_INTERVAL:g}) until Ctrl-C",
    )
    parser.add_argument(
        "--redis-url",
        metavar="URL",
        default=None,
        help="read this Redis instead of [redis] url of fido.toml",
    )


def _redis_url(args, settings):
    from fido_tx.redis import url as redisurl

    text = getattr(args, "redis_url", None)
    timeout = 5.0
    if not text:
        if settings is None:
            from fido_tx import config

            settings, _path, _created = config.load_settings(
                getattr(args, "config", None),
                **{
                    k: v
                    for k, v in (
                        ("environ", getattr(args, "environ", None)),
                        ("roots", getattr(args, "roots", None)),
                    )
                    if v is not None
                },
            )
        text = settings.redis.url
        timeout = max(settings.redis.connect_timeout, settings.redis.command_timeout)
    try:
        return redisurl.parse(text), timeout
    except redisurl.RedisURLError as e:
        raise StatusError(str(e)) from None


def main(args, settings=None):
    """Run ``fido status``; returns the exit status.

    ``args``: ``json``, ``redis_url``, ``config`` (path or None), and the
    ``stdout``/``stderr``/``environ``/``roots`` conveniences of :mod:`fido_tx.cmd.cli`
    (optional).  ``settings`` skips loading the config (tests).
    """
    import sys

    out = getattr(args, "stdout", None) or sys.stdout
    err = getattr(args, "stderr", None) or sys.stderr
    watch = getattr(args, "watch", None)
    try:
        if watch is not None and (watch <= 0 or getattr(args, "json", False)):
            raise StatusError("--watch takes a number of seconds > 0, and not --json")
        url, timeout = _redis_url(args, settings)
        if watch is not None:
            return _watch(args, url, timeout, watch, out)
        doc = _read(url, timeout)
    except StatusError as e:
        err.write(f"fido: error: {e}\n")
        return 1
    except Exception as e:
        from fido_tx import config

        if isinstance(e, config.ConfigError):
            err.write(f"fido: error: {e}\n")
            return 1
        raise
    if getattr(args, "json", False):
        out.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    else:
        out.write("\n".join(format_text(doc)) + "\n")
    return 0


def _read(url, timeout):
    try:
        return read_status(url, timeout)
    except (OSError, ConnectionError, RedisReplyError) as e:
        raise StatusError(f"cannot read Redis at {url.redacted()}: {_reason(e)}") from None


def _watch(args, url, timeout, interval, out):
    """Clear the screen and redraw every ``interval`` s; Ctrl-C exits 0.

    Redis unreachable shows as one line on the screen and the watch goes on
    (it is often what one is watching).  ``args.sleep`` and ``args.now``
    replace :func:`time.sleep` and the clock (tests).
    """
    import time

    sleep = getattr(args, "sleep", None) or time.sleep
    now = getattr(args, "now", None) or (lambda: datetime.now(timezone.utc))
    try:
        while True:
            moment = now()
            head = f"Every {interval:g} s: fido status    {moment:%Y-%m-%d %H:%M:%S} UTC"
            try:
                lines = format_text(_read(url, timeout), moment)
            except StatusError as e:
                lines = [f"fido: error: {e}"]
            out.write(CLEAR + head + "\n\n" + "\n".join(lines) + "\n")
            out.flush()
            sleep(interval)
    except KeyboardInterrupt:
        out.write("\n")
        return 0


def _reason(e):
    if isinstance(e, socket.timeout):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split()) or type(e).__name__
