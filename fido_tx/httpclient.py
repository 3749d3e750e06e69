"""HTTP requests with one deadline and a bounded body, through treq.

Used by the OAuth2 token providers and the Microsoft Graph source.  treq's
own ``timeout`` covers the response headers only and its buffered responses
read bodies of any size, so :class:`HttpClient` sends every request
unbuffered through its own persistent :class:`HTTPConnectionPool` (pooled
per host), reads the body with a size bound (aborting the connection past
it), and cancels the whole request (connect, headers, body) at one deadline.
Every failure is a :class:`~fido_tx.errors.FidoError`: ``dns``, ``connect``,
``tls``, ``timeout`` or ``too_large``.

:func:`parse_retry_after` reads a ``Retry-After`` header for every HTTP
client of Fido (Graph, the webhook delivery).
"""

import email.utils
import ipaddress
import json
from datetime import timezone
from urllib.parse import urlsplit

import attr
from twisted.internet import defer, error as net_error
from twisted.internet.protocol import Protocol

from fido_tx import errors


def parse_retry_after(value, now, cap):
    """Seconds from ``now`` (POSIX time) that a ``Retry-After`` value (str)
    asks for: delta-seconds or an HTTP date (RFC 9110 10.2.3), at least 0
    and at most ``cap``; ``None`` when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - now
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), cap)

#: bytes of a JSON answer (token endpoint, Graph listings) read at most
MAX_JSON = 4 * 1024 * 1024


def is_loopback(host):
    """True for ``localhost`` and loopback addresses."""
    host = (host or "").strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url, what):
    """Raise ``ValueError`` (one line naming ``what``) unless ``url`` is an
    ``https://`` URL, or ``http://`` on a loopback address."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(f"{what}: not a URL") from None
    if not parts.hostname:
        raise ValueError(f"{what}: not an absolute URL: {url[:100]!r}")
    if parts.scheme == "https":
        return url
    if parts.scheme == "http" and is_loopback(parts.hostname):
        return url
    raise ValueError(f"{what}: must be an https:// URL (http:// only on loopback),"
                     f" got {url[:100]!r}")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class HttpResponse:
    """A complete answer: status code, headers (``twisted.web`` Headers), body."""

    code: int
    headers: object = attr.ib(repr=False)
    body: bytes = attr.ib(repr=False)

    def header(self, name):
        """The last value of header ``name`` as text, or ``None``."""
        values = self.headers.getRawHeaders(name)
        if not values:
            return None
        value = values[-1]
        return value.decode("latin-1") if isinstance(value, bytes) else value

    def json(self, what="the server"):
        """The body parsed as a JSON object; ``protocol`` error when it is not one."""
        try:
            value = json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise errors.FidoError(
                errors.PROTOCOL, f"{what} answered HTTP {self.code} with a body that is not JSON",
                debug=repr(self.body[:200])) from None
        if not isinstance(value, dict):
            raise errors.FidoError(errors.PROTOCOL, f"{what} answered JSON that is not an object")
        return value


class _TooLarge(Exception):
    pass


class _BoundedBody(Protocol):
    """Collects a body up to ``limit`` bytes; past it, stops the transfer."""

    def __init__(self, limit):
        self.limit = limit
        self.chunks = []
        self.size = 0
        self.finished = defer.Deferred(self._cancel)

    def _cancel(self, _d):
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data):
        if self.finished.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self._cancel(None)
            self.finished.errback(_TooLarge(self.size))
            return
        self.chunks.append(data)

    def connectionLost(self, reason):
        if self.finished.called:
            return
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.chunks))
        else:
            self.finished.errback(reason)


def read_body(response, limit):
    """Deferred firing with the body of ``response`` (bytes, at most ``limit``)."""
    from twisted.web.client import UNKNOWN_LENGTH

    if response.length != UNKNOWN_LENGTH and response.length > limit:
        response.deliverBody(Protocol())  # discard; the pool drops the connection
        return defer.fail(_TooLarge(response.length))
    if response.length == 0:
        return defer.succeed(b"")
    protocol = _BoundedBody(limit)
    response.deliverBody(protocol)
    return protocol.finished


def describe(failure, host):
    """A :class:`FidoError` for a failed request to ``host``."""
    if failure.check(errors.FidoError):
        return failure.value
    if failure.check(net_error.DNSLookupError):
        return errors.FidoError(errors.DNS, f"cannot resolve {host}")
    if failure.check(net_error.TimeoutError):
        return errors.FidoError(errors.TIMEOUT, f"connecting to {host} timed out")
    if failure.check(net_error.ConnectError):
        return errors.FidoError(errors.CONNECT, f"cannot connect to {host}: {failure.getErrorMessage()[:200]}")
    reasons = getattr(failure.value, "reasons", None) or []
    for reason in reasons:
        if "SSL" in type(reason.value).__module__ or "ssl" in type(reason.value).__name__.lower():
            return errors.FidoError(errors.TLS, f"TLS with {host} failed: {reason.getErrorMessage()[:200]}")
    return errors.FidoError(errors.CONNECT, f"request to {host} failed: {failure.type.__name__}",
                            debug=failure.getErrorMessage()[:300])


class HttpClient:
    """Requests under a deadline, pooled per host; ``close()`` on stop.

    :param reactor: IReactorTime + IReactorTCP (+ SSL).
    :param timeout: seconds one request may take in all (connect, send,
        headers, body).
    :param per_host: persistent connections kept per host.
    :param http: an object with treq's ``request`` (``treq.testing.StubTreq``
        in tests); ``None`` builds one on an own pool.
    """

    def __init__(self, reactor, timeout=30.0, per_host=4, http=None):
        self._reactor = reactor
        self.timeout = timeout
        self._per_host = per_host
        self._pool = None
        self._http = http
        self._pending = set()

    def _client(self):
        # built on the first request: a daemon without OAuth2 or Graph
        # accounts never loads treq
        if self._http is None:
            from treq.client import HTTPClient
            from twisted.web import client as web_client

            self._pool = web_client.HTTPConnectionPool(self._reactor, persistent=True)
            self._pool.maxPersistentPerHost = self._per_host
            self._pool.cachedConnectionTimeout = 120
            self._pool.retryAutomatically = False  # callers decide what is safe to repeat
            from fido_tx.httpstls import HttpsEndpoints

            # TLS on a reactor imported without pyOpenSSL, one shared context
            agent = web_client.Agent.usingEndpointFactory(
                self._reactor, HttpsEndpoints(self._reactor, self.timeout), pool=self._pool)
            self._http = HTTPClient(agent)
        return self._http

    def request(self, method, url, headers=None, data=None, max_body=MAX_JSON, timeout=None):
        """Deferred firing with an :class:`HttpResponse`; errbacks with a
        :class:`FidoError` (``too_large`` when the body exceeds ``max_body``)."""
        host = urlsplit(url).hostname or "?"
        if isinstance(method, bytes):
            method = method.decode("ascii")
        timeout = self.timeout if timeout is None else timeout
        try:
            d = self._client().request(method, url, headers=headers, data=data, unbuffered=True,
                                   allow_redirects=False, reactor=self._reactor)
        except Exception as e:
            return defer.fail(errors.FidoError(errors.CONFIG, f"cannot send to {host}: {e}"))

        def body(response):
            got = read_body(response, max_body)
            got.addCallback(lambda raw: HttpResponse(response.code, response.headers, raw))
            return got

        d.addCallback(body)
        timed_out = []

        def on_timeout():
            timed_out.append(True)
            d.cancel()

        deadline = self._reactor.callLater(timeout, on_timeout)
        self._pending.add(d)

        def done(result):
            self._pending.discard(d)
            if deadline.active():
                deadline.cancel()
            return result

        def classify(failure):
            if failure.check(_TooLarge):
                raise errors.FidoError(errors.TOO_LARGE,
                                       f"answer from {host} larger than {max_body} bytes")
            if timed_out:
                raise errors.FidoError(errors.TIMEOUT,
                                       f"no complete answer from {host} within {timeout:g} s")
            if failure.check(defer.CancelledError):
                return failure
            raise describe(failure, host)

        d.addBoth(done)
        d.addErrback(classify)
        return d

    def close(self):
        """Cancel what is in flight and close the pooled connections."""
        for d in list(self._pending):
            d.cancel()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            return pool.closeCachedConnections()
        return defer.succeed(None)
