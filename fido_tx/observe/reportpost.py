"""One POST of one report under one deadline, and what the answer means: delivered, retry, or rejected.

The request carries the contract JSON with ``Authorization: Bearer
<token>``; the whole request (connect, headers, body) has one deadline,
``settings.timeout`` (treq's own ``timeout`` covers the response headers
only).  2xx is delivered; connection errors, timeouts, 5xx and 429 are
:class:`Retry` (with the ``Retry-After`` seconds, if any); anything else is
:class:`Rejected`.  A response body is read only to its first kilobytes.
"""

from twisted.internet import defer, protocol

import fido_tx

__all__ = ["Rejected", "Retry", "ReportPoster", "escape", "make_http_client", "read_head"]


class Retry(Exception):
    """A delivery failed in a way worth retrying; ``delay`` from Retry-After."""

    def __init__(self, reason, delay=None):
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class Rejected(Exception):
    """The web application refused the report (4xx other than 429)."""


def _parse_retry_after(values):
    """Seconds from a ``Retry-After`` header (delta-seconds only), or ``None``."""
    if not values:
        return None
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # an HTTP date: use our own backoff
    return seconds if seconds >= 0 else None


class ReportPoster:
    """POSTs reports to ``settings.url`` with ``http`` (treq's ``post``);
    :meth:`cancel_all` cancels what runs (a stop)."""

    def __init__(self, reactor, settings, http):
        self._reactor = reactor
        self._settings = settings
        self._http = http
        self._requests = set()  # running request Deferreds

    def cancel_all(self):
        for d in list(self._requests):
            d.cancel()

    def post(self, item):
        """One POST of ``item`` under one overall deadline; fires None, or
        fails with :class:`Retry` or :class:`Rejected`."""
        headers = {
            b"Content-Type": [b"application/json"],
            b"Authorization": [b"Bearer " + self._settings.token.encode("utf-8")],
            b"User-Agent": [f"fido/{fido_tx.__version__}".encode("ascii")],
        }
        try:
            d = self._http.post(
                self._settings.url,
                data=item.body(),
                headers=headers,
                allow_redirects=False,
                reactor=self._reactor,
            )
        except Exception as e:  # a bad URL: retrying will not help
            return defer.fail(Rejected(f"cannot send: {e}"))
        d.addCallback(self._read_response)
        timed_out = []

        def on_timeout():
            timed_out.append(True)
            d.cancel()

        deadline = self._reactor.callLater(self._settings.timeout, on_timeout)
        self._requests.add(d)

        def done(result):
            self._requests.discard(d)
            if deadline.active():
                deadline.cancel()
            return result

        d.addBoth(done)

        def classify(failure):
            if failure.check(Retry, Rejected):
                return failure
            if timed_out:
                raise Retry(f"no complete response within {self._settings.timeout:g} s")
            if failure.check(defer.CancelledError):
                return failure  # stopping
            raise Retry(_describe(failure))

        d.addErrback(classify)
        return d

    def _read_response(self, response):
        code = response.code
        # read the body (frees the connection for reuse), but keep only its
        # start and stop reading a long one: an endpoint cannot fill memory
        d = read_head(response)

        def check(body):
            if 200 <= code < 300:
                return None
            snippet = escape(body.decode("utf-8", "replace").strip())[:BODY_SHOWN]
            if code == 429 or code >= 500:
                delay = _parse_retry_after(response.headers.getRawHeaders(b"Retry-After"))
                raise Retry(f"HTTP {code}", delay)
            raise Rejected(f"HTTP {code} {snippet}".strip())

        return d.addCallback(check)

#: bytes of a response body kept (for the log line of a rejected report)
BODY_KEPT = 4096
#: bytes of a response body read at most; past them the connection is closed
#: instead of being read to its end for reuse
BODY_READ = 64 * 1024
#: characters of the (escaped) body shown in the log
BODY_SHOWN = 500


class _Head(protocol.Protocol):
    """Keeps the first ``keep`` bytes of a response body, discards the rest,
    and stops the transfer after ``limit`` bytes."""

    def __init__(self, done, keep, limit):
        self.done = done
        self.keep = keep
        self.limit = limit
        self.head = bytearray()
        self.seen = 0
        self.stopped = False

    def dataReceived(self, data):
        room = self.keep - len(self.head)
        if room > 0:
            self.head += data[:room]
        self.seen += len(data)
        if self.seen > self.limit and not self.stopped:
            self.stopped = True
            self.transport.stopProducing()

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.callback(bytes(self.head))


def read_head(response, keep=BODY_KEPT, limit=BODY_READ):
    """A Deferred firing with the first ``keep`` bytes of ``response``'s body,
    having read at most about ``limit`` bytes of it (never all of a huge one)."""
    head = None

    def cancel(_d):
        if head is not None and head.transport is not None and not head.stopped:
            head.stopped = True
            head.transport.stopProducing()

    done = defer.Deferred(cancel)
    head = _Head(done, keep, limit)
    response.deliverBody(head)
    return done


def escape(text):
    """``text`` safe for one log line: control characters (newlines, ESC,
    bidi overrides and the like) as ``\\xNN``/``\\uNNNN`` escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
                   for c in text)


def _describe(failure):
    """A short reason for a failed request, never a traceback."""
    value = failure.value
    reasons = getattr(value, "reasons", None)  # ResponseFailed, RequestTransmissionFailed
    if reasons:
        return "; ".join(_describe(r) for r in reasons)
    text = str(value) or type(value).__name__
    return f"{type(value).__name__}: {text}" if text != type(value).__name__ else text


def make_http_client(reactor, concurrency, timeout):
    """A treq ``HTTPClient`` on its own persistent pool (returned too, to be
    closed on stop): ``concurrency`` connections kept, no automatic retry
    (the reporter retries, with backoff)."""
    from twisted.web.client import Agent, HTTPConnectionPool

    from treq.client import HTTPClient

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = concurrency
    pool.cachedConnectionTimeout = 60
    pool.retryAutomatically = False  # our own retries, with backoff
    from fido_tx.httpstls import HttpsEndpoints

    # TLS on a reactor imported without pyOpenSSL, one shared context
    agent = Agent.usingEndpointFactory(reactor, HttpsEndpoints(reactor, timeout), pool=pool)
    return HTTPClient(agent), pool
