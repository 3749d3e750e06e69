"""The one UTC time format of Fido: ISO 8601 with a ``Z``, to the millisecond.

Used for every time Fido writes (stream entries, account hashes, reports,
log lines), so that a person or a program compares them as strings.
"""

from datetime import datetime, timezone


def iso_utc(seconds=None):
    """POSIX seconds (default: now) as ISO 8601 UTC with a ``Z``, to the millisecond."""
    when = (
        datetime.now(timezone.utc)
        if seconds is None
        else datetime.fromtimestamp(seconds, timezone.utc)
    )
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now_iso():
    """The current time in the one format."""
    return iso_utc()


def parse_iso(text):
    """The POSIX seconds of a time in the one format (or any ISO 8601 with a
    zone); ``None`` when ``text`` is not one."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


def ago(seconds):
    """``42s ago``, ``5m ago``, ``3h ago``, ``2d ago``; ``""`` for the future."""
    seconds = int(seconds)
    if seconds < 0:
        return ""
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    if seconds < 172800:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"
