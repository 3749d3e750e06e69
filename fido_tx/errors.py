"""Error kinds and the one exception type that carries them.

The kinds are part of the external contract (error reports, the
``last_error_kind`` field of ``fido:account:<id>``).  Every failure that ends
a mailbox session is turned into a :class:`FidoError` with one of these kinds,
a message an operator can act on, and debug text for a support engineer.
"""

CONFIG = "config"
DNS = "dns"
CONNECT = "connect"
TIMEOUT = "timeout"
TLS = "tls"
AUTH = "auth"
MAILBOX = "mailbox"
PROTOCOL = "protocol"
TOO_LARGE = "too_large"
REDIS = "redis"
RECOVERED = "recovered"
DELIVERY = "delivery"
REJECTED = "rejected"
REAUTHORIZE = "reauthorize"
THROTTLED = "throttled"

#: Kinds that describe a failure (``recovered`` is the report sent after one).
FAILURE_KINDS = frozenset(
    [CONFIG, DNS, CONNECT, TIMEOUT, TLS, AUTH, MAILBOX, PROTOCOL, TOO_LARGE, REDIS,
     DELIVERY, REJECTED, REAUTHORIZE, THROTTLED]
)


class OneLineError(Exception):
    """An error whose ``str()`` is one line, fit for ``fido: error: ...``,
    twistd's exit message and a log line (newlines are folded to spaces)."""

    def __init__(self, message):
        message = " ".join(str(message).splitlines())
        super().__init__(message)
        self.message = message

    def __str__(self):
        return self.message


class FidoError(Exception):
    """A classified failure.

    :ivar kind: one of the kinds above.
    :ivar message: one line for the log and the web application's user.
    :ivar debug: longer text (server response, recent protocol lines with
        credentials redacted, host and port) for a support engineer.
    :ivar retry_after: seconds the other side asked to be left alone
        (``throttled``: an HTTP ``Retry-After``), or ``None``.
    """

    def __init__(self, kind, message, debug="", retry_after=None):
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        super().__init__(kind, message)
        self.kind = kind
        self.message = message
        self.debug = debug
        self.retry_after = retry_after

    def __str__(self):
        return f"{self.kind}: {self.message}"
