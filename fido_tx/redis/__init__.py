"""Redis in one place: the shared connection and the small classes on it (state, heartbeat, leases), URLs, Sentinel."""


def text(value):
    """A Redis reply value as str (bytes decoded as UTF-8)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
