"""Error reports to the web application: a bounded queue and a few HTTP workers.

:class:`Reporter` is a twisted ``Service``.  :meth:`Reporter.report` only
appends to an in-memory queue and returns at once, so the web application
being slow or down never slows or stops fetching.  Up to ``concurrency``
deliveries run at a time; each POSTs the contract JSON::

    {"account", "kind", "message", "debug", "occurred_at"}

to ``settings.url`` with ``Authorization: Bearer <token>``, through treq on
the reporter's own persistent :class:`HTTPConnectionPool` (closed on stop).

Delivery rules:

* The whole request (connect, headers, body) has one deadline,
  ``settings.timeout``: the Deferred is cancelled with ``clock.callLater``
  (treq's own ``timeout`` covers the response headers only).
* Connection errors, timeouts, HTTP 5xx and 429 are retried with exponential
  backoff (``retry_initial`` doubling up to ``retry_max``, +/- 10 % jitter);
  a ``Retry-After`` (seconds) is honoured as a minimum, up to ``retry_max``.  A report is
  retried until it is delivered or the reporter stops: the web application
  being down for an hour loses nothing but what overflows the queue.
* Any other 4xx, and a 3xx (redirects are not followed: a POST to a moved
  endpoint is a configuration error), is logged and the report dropped
  (``rejected`` counts them): sending it again would fail again.
* The queue holds at most ``settings.queue_size`` waiting reports; past the
  bound the OLDEST waiting report is dropped and counted in ``dropped``.
* ``settings.url == ""`` disables reporting: :meth:`report` is a no-op.

One POST and the meaning of its answer are
:class:`~fido_tx.observe.reportpost.ReportPoster`'s; this module is the
queue, the workers and the retries.

Reports never carry a password or token: :func:`scrub` redacts everything
after ``LOGIN``/``AUTHENTICATE``, ``password=``-like pairs, URL user info,
``Authorization`` headers, the reporter's own token, and any literal secret
the caller passes in ``secrets``.
"""

import json
import random as _random
from collections import deque

import attr

from fido_tx.timefmt import iso_utc  # noqa: F401  (re-exported for callers)
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from fido_tx.interfaces import IReporterView
from fido_tx.observe.reportpost import Rejected, ReportPoster, Retry, make_http_client
from fido_tx.observe.reportpost import escape, read_head  # noqa: F401 - re-exported
from fido_tx.schedule import backoff

from fido_tx.scrub import REDACTED  # noqa: F401 - re-exported
from fido_tx.scrub import scrub as _scrub

#: Deliveries running at the same time.
DEFAULT_CONCURRENCY = 4

#: Literal secrets shorter than this are not searched for (they would mangle text).
MIN_SECRET_LENGTH = 4


def scrub(text, secrets=()):
    """``text`` with credentials redacted (:func:`fido_tx.scrub.scrub`, the
    one scrubber).  Defensive: callers redact too."""
    return _scrub(text, [s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH])


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Report:
    """One report, already scrubbed; ``body()`` is the contract JSON."""

    account: str
    kind: str
    message: str
    debug: str
    occurred_at: str

    def body(self):
        return json.dumps(
            {
                "account": self.account,
                "kind": self.kind,
                "message": self.message,
                "debug": self.debug,
                "occurred_at": self.occurred_at,
            },
            ensure_ascii=False,
        ).encode("utf-8")


@implementer(IReporterView)
class Reporter(service.Service):
    """Sends error reports to the web application without ever blocking the caller.

    :param reactor: provides ``IReactorTime`` (and ``IReactorTCP`` when no
        ``http_client`` is given).
    :param settings: :class:`fido_tx.config.ReporterSettings`.
    :param http_client: an object with treq's ``post`` (e.g.
        ``treq.testing.StubTreq``); ``None`` builds a ``treq.client.HTTPClient``
        on the reporter's own connection pool.

    Counters: ``sent`` (delivered), ``dropped`` (pushed out of a full queue),
    ``rejected`` (4xx), ``retries`` (failed attempts that will be retried).
    ``queue_length`` is reports not yet delivered (waiting + in flight).
    """

    name = "reporter"
    log = Logger()

    def __init__(
        self,
        reactor,
        settings,
        http_client=None,
        concurrency=DEFAULT_CONCURRENCY,
        retry_initial=1.0,
        retry_max=300.0,
        random=None,
    ):
        self._reactor = reactor
        self._settings = settings
        self._http = http_client
        self._pool = None
        self._concurrency = max(1, concurrency)
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._random = random or _random.Random()
        self._queue = deque()
        self._in_flight = 0
        self._timers = set()  # retry waits and the dispatch call
        self._poster = None  # made at the first delivery, on the client then
        self._dispatch_call = None
        self._idle_waiters = []
        self.sent = 0
        self.dropped = 0
        self.rejected = 0
        self.retries = 0

    # -- public -------------------------------------------------------------

    @property
    def enabled(self):
        return bool(self._settings.url)

    @property
    def queue_length(self):
        """Reports not yet delivered: waiting in the queue plus in flight."""
        return len(self._queue) + self._in_flight

    @property
    def in_flight(self):
        return self._in_flight

    def report(self, account_id, kind, message, debug="", occurred_at=None, secrets=()):
        """Queue a report and return at once (``None``).

        ``occurred_at`` is an ISO 8601 string or POSIX seconds (default: now).
        ``secrets`` are literal strings (an account's password) to redact
        from ``message`` and ``debug`` in addition to the usual patterns.
        """
        if not self.enabled:
            return None
        if occurred_at is None:
            occurred_at = iso_utc(self._reactor.seconds())
        elif isinstance(occurred_at, (int, float)):
            occurred_at = iso_utc(occurred_at)
        secrets = tuple(secrets) + (self._settings.token,)
        item = Report(
            account=account_id,
            kind=kind,
            message=scrub(message, secrets),
            debug=scrub(debug, secrets),
            occurred_at=occurred_at,
        )
        bound = max(1, self._settings.queue_size)
        while len(self._queue) >= bound:
            old = self._queue.popleft()
            self.dropped += 1
            if not _worth_logging(self.dropped):
                continue
            self.log.warn(
                "reporter queue full ({queue_size}): dropped the oldest report "
                "({account_id}, {kind}); {dropped} dropped so far",
                queue_size=bound,
                account_id=old.account,
                kind=old.kind,
                dropped=self.dropped,
            )
        self._queue.append(item)
        self._schedule_dispatch()
        return None

    def when_idle(self):
        """A Deferred that fires when nothing is queued or in flight (for tests)."""
        if not self._queue and not self._in_flight:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    # -- service ------------------------------------------------------------

    def startService(self):
        super().startService()
        if self._http is None and self.enabled:
            self._http, self._pool = make_http_client(
                self._reactor, self._concurrency, self._settings.timeout)
        self._schedule_dispatch()

    def stopService(self):
        super().stopService()
        lost = len(self._queue) + self._in_flight
        for call in list(self._timers):
            if call.active():
                call.cancel()
        self._timers.clear()
        self._dispatch_call = None
        if self._poster is not None:
            self._poster.cancel_all()
        self._in_flight = 0  # reports waiting for a retry are abandoned with the queue
        if lost:
            self.log.warn(
                "reporter stopping with {count} undelivered reports", count=lost
            )
        if self._pool is not None:
            pool, self._pool = self._pool, None
            self._http = None
            self._poster = None
            return pool.closeCachedConnections()
        return None

    # -- delivery -----------------------------------------------------------

    def _schedule_dispatch(self):
        # Dispatch from the reactor, never inside report(): the caller (the
        # scheduler's result observer) is never slowed by connection set-up.
        if not self.running or self._dispatch_call is not None:
            return
        if not self._queue or self._in_flight >= self._concurrency:
            return
        call = self._reactor.callLater(0, self._dispatch)
        self._dispatch_call = call
        self._timers.add(call)

    def _dispatch(self):
        self._timers.discard(self._dispatch_call)
        self._dispatch_call = None
        while self.running and self._queue and self._in_flight < self._concurrency:
            item = self._queue.popleft()
            self._in_flight += 1
            self._deliver(item, attempt=1)

    def _deliver(self, item, attempt):
        if not self.running:
            self._finished()
            return
        if self._poster is None:
            self._poster = ReportPoster(self._reactor, self._settings, self._http)
        d = self._poster.post(item)
        d.addCallbacks(
            lambda _: self._delivered(item),
            lambda f: self._failed(item, attempt, f),
        )
        d.addErrback(
            lambda f: self.log.failure("reporter internal error", f)
        )

    def _delivered(self, item):
        self.sent += 1
        self.log.debug(
            "report delivered: {account_id} {kind}", account_id=item.account, kind=item.kind
        )
        self._finished()

    def _failed(self, item, attempt, failure):
        if failure.check(Rejected):
            self.rejected += 1
            self.log.warn(
                "web application rejected the report for {account_id} ({kind}): "
                "{reason}; dropped",
                account_id=item.account,
                kind=item.kind,
                reason=scrub(str(failure.value), (self._settings.token,)),
            )
            self._finished()
            return
        if not failure.check(Retry) or not self.running:
            self._finished()  # cancelled by stopService
            return
        self.retries += 1
        delay = self._backoff(attempt)
        if failure.value.delay is not None:
            # the server's Retry-After is a minimum; never wait past retry_max
            delay = min(max(failure.value.delay, delay), self._retry_max)
        log = self.log.info if attempt == 1 else self.log.debug
        log(
            "report for {account_id} ({kind}) not delivered: {reason}; "
            "retry {attempt} in {delay:.1f} s",
            account_id=item.account,
            kind=item.kind,
            reason=failure.value.reason,
            attempt=attempt,
            delay=delay,
        )
        call = None

        def again():
            self._timers.discard(call)
            self._deliver(item, attempt + 1)

        call = self._reactor.callLater(delay, again)
        self._timers.add(call)

    def _backoff(self, attempt):
        return backoff.exponential(attempt, self._retry_initial, self._retry_max, 0.1, self._random)

    def _finished(self):
        self._in_flight = max(0, self._in_flight - 1)
        if not self.running:
            return
        if self._queue:
            self._schedule_dispatch()
        elif not self._in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)


def _worth_logging(count):
    """Log the 1st, 10th, 100th, ... drop: an overflow must not flood the log."""
    while count >= 10 and count % 10 == 0:
        count //= 10
    return count == 1


