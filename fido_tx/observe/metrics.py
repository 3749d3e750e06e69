"""Prometheus metrics on Fido's own ``CollectorRegistry`` (never the global one).

Counted as sessions end (:meth:`Metrics.observe_session`):

``fido_sessions_total{outcome}``            sessions by outcome: ``ok`` or the error kind
``fido_messages_fetched_total``             messages newly stored
``fido_bytes_fetched_total``                bytes of those messages
``fido_session_duration_seconds``           histogram of session wall time
``fido_imap_deviations_total{kind}``        protocol deviations read anyway (``bare_lf``: response lines ended by LF alone)

Read at scrape time from the objects given to :meth:`Metrics.bind`:

``fido_accounts{state}``                    accounts by state (``ok``, error kinds), from the status tracker
``fido_queue_lag_seconds``                  how long the most overdue account has waited (scheduler ``lag()``)
``fido_sessions_running``                   sessions in progress
``fido_sessions_paused``                    1 while the scheduler is paused (any reason)
``fido_redis_connected``                    1 when the shared Redis connection is up
``fido_reporter_queue_length``              reports not yet delivered
``fido_reporter_dropped_total``             reports dropped because the queue was full
``fido_backlog_messages``                   length of the default delivery's queue (last known)

The bound objects are read through their declared interfaces
(:mod:`fido_tx.interfaces`): ``ISchedulerView``, ``IRedisHealth``,
``IReporterView``, ``IStatusSummary``, ``IBacklog``.  A callback that fails or
whose object is not bound yet leaves its metric out of that scrape; a scrape
never fails.
"""

import time

from twisted.logger import Logger

from fido_tx import errors
from fido_tx.observe.health import running_sessions

log = Logger()

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

#: states always exported (0 when no account is in them), so series do not vanish
STATES = ("ok",) + tuple(sorted(errors.FAILURE_KINDS))


class Metrics:
    """Fido's metrics.  ``registry`` is what ``/metrics`` exposes.

    The session counters are plain numbers, turned into Prometheus families
    when ``/metrics`` is scraped (:class:`_SessionCollector`): prometheus_client
    is imported with the first scrape (or a given ``registry``), not at
    start-up (~24 ms of a start's CPU, issue 15), and a session's count is
    a few additions instead of prometheus_client's locked children.  The
    exposition is the one ``Counter`` and ``Histogram`` gave, ``_created``
    series included.
    """

    def __init__(self, registry=None, clock=time.time):
        self._clock = clock
        now = clock()
        #: outcome -> [count, created]; the same for the deviation kinds
        self.sessions = {outcome: [0, now] for outcome in STATES}
        self.deviations = {"bare_lf": [0, now]}
        self.messages = [0, now]
        self.bytes = [0, now]
        #: cumulative count per bucket bound (``+Inf`` last), sum, created
        self.duration = [[0] * (len(DURATION_BUCKETS) + 1), 0.0, now]
        self.scheduler = None
        self.redis = None
        self.reporter = None
        self.status = None
        self.backlog = None
        self.held = None
        self._registry = None
        if registry is not None:
            self._register(registry)

    @property
    def registry(self):
        """Fido's own ``CollectorRegistry``, made (and prometheus_client
        imported) the first time it is asked for."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            self._register(CollectorRegistry())
        return self._registry

    def _register(self, registry):
        registry.register(_SessionCollector(self))
        registry.register(_BoundCollector(self))
        self._registry = registry

    def bind(self, scheduler=None, redis=None, reporter=None, status=None, backlog=None,
             held=None):
        """Give the objects the scrape-time gauges read.  Any may be omitted.

        :param scheduler: ``ISchedulerView``; :param redis: ``IRedisHealth``;
        :param reporter: ``IReporterView``; :param status: ``IStatusSummary``;
        :param backlog: ``IBacklog`` (the default delivery, when it has a queue).
        """
        if scheduler is not None:
            self.scheduler = scheduler
        if redis is not None:
            self.redis = redis
        if reporter is not None:
            self.reporter = reporter
        if status is not None:
            self.status = status
        if backlog is not None:
            self.backlog = backlog
        if held is not None:  # held IMAP connections (sources/imap/holding.py)
            self.held = held

    def observe_session(self, result):
        """Count one :class:`~fido_tx.outcome.SessionResult`."""
        _add(self.sessions, "ok" if result.ok else result.kind, 1, self._clock)
        if result.fetched:
            self.messages[0] += result.fetched
        if result.bytes:
            self.bytes[0] += result.bytes
        seconds = max(0.0, result.seconds)
        counts = self.duration[0]
        for i, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                counts[i] += 1
        counts[-1] += 1
        self.duration[1] += seconds
        for kind, count in getattr(result, "deviations", ()):
            _add(self.deviations, kind, count, self._clock)

    def backlog_length(self):
        return None if self.backlog is None else self.backlog.last_length


def _add(series, label, amount, clock):
    entry = series.get(label)
    if entry is None:
        entry = series[label] = [0, clock()]
    entry[0] += amount


class _SessionCollector:
    """The session counters and the duration histogram, as families."""

    def __init__(self, metrics):
        self._m = metrics

    def describe(self):
        return []  # nothing collected at registration

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        m = self._m
        yield _labelled(CounterMetricFamily(
            "fido_sessions", "Mailbox sessions by outcome (ok or error kind).",
            labels=["outcome"]), m.sessions)
        for name, doc, (value, created) in (
            ("fido_messages_fetched", "Messages fetched and stored.", m.messages),
            ("fido_bytes_fetched", "Bytes of the messages fetched and stored.", m.bytes),
        ):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value, created=created)
            yield family
        counts, total, created = m.duration
        family = HistogramMetricFamily("fido_session_duration_seconds",
                                       "Wall time of mailbox sessions.")
        bounds = [repr(float(b)) for b in DURATION_BUCKETS] + ["+Inf"]  # as Histogram's
        family.add_metric([], list(zip(bounds, counts)), total)
        family.add_sample("fido_session_duration_seconds_created", {}, created)
        yield family
        yield _labelled(CounterMetricFamily(
            "fido_imap_deviations",
            "IMAP protocol deviations read anyway, by kind (bare_lf: a line ended by LF alone).",
            labels=["kind"]), m.deviations)


def _labelled(family, series):
    for label, (value, created) in series.items():
        family.add_metric([label], value, created=created)
    return family


class _BoundCollector:
    """Gauges computed at scrape time from the bound objects."""

    def __init__(self, metrics):
        self._m = metrics

    def describe(self):
        # Makes the registry not call collect() at registration time.
        return []

    def collect(self):
        m = self._m
        yield from self._one(self._accounts, m.status)
        yield from self._one(
            lambda s: _gauge("fido_queue_lag_seconds",
                             "Seconds the most overdue account has waited past its due time.",
                             s.lag()),
            m.scheduler,
        )
        yield from self._one(
            lambda s: _gauge("fido_sessions_running", "Mailbox sessions in progress.",
                             running_sessions(s)),
            m.scheduler,
        )
        yield from self._one(
            lambda s: _gauge("fido_sessions_paused",
                             "1 while fetching is paused (Redis down, backlog).",
                             int(bool(s.paused_reasons))),
            m.scheduler,
        )
        yield from self._one(
            lambda s: _gauge("fido_redis_connected", "1 when the Redis connection is up.",
                             int(bool(s.connected))),
            m.redis,
        )
        yield from self._one(
            lambda r: _gauge("fido_reporter_queue_length", "Error reports not yet delivered.",
                             r.queue_length),
            m.reporter,
        )
        yield from self._one(self._dropped, m.reporter)
        if m.held is not None:
            yield from _held_families(m.held.snapshot())
        yield from self._one(
            lambda _: _gauge("fido_backlog_messages", "Entries in the Redis stream (last known).",
                             m.backlog_length()),
            m,
        )

    @staticmethod
    def _accounts(status):
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("fido_accounts", "Accounts by state.", labels=["state"])
        counts = dict.fromkeys(STATES, 0)
        counts.update(status.summary())
        for state, n in sorted(counts.items()):
            family.add_metric([state], n)
        return family

    @staticmethod
    def _dropped(reporter):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "fido_reporter_dropped", "Error reports dropped because the queue was full."
        )
        family.add_metric([], reporter.dropped)
        return family

    @staticmethod
    def _one(make, obj):
        if obj is None:
            return
        try:
            family = make(obj)
        except Exception:
            log.failure("metrics callback failed")
            return
        if family is not None:
            yield family


def _held_families(held):
    """Held IMAP connections: ``held`` is a HeldConnections snapshot."""
    from prometheus_client.core import CounterMetricFamily

    yield _gauge("fido_held_connections", "IMAP connections held between polls.",
                 held["held"])
    yield _gauge("fido_idle_connections", "Held IMAP connections waiting in IDLE.",
                 held["idling"])
    yield _gauge("fido_held_fallback_accounts",
                 "Accounts polling with fresh connections (a connection limit was hit).",
                 held["fallback"])
    reasons = held.get("reasons")
    if reasons is None:
        family = CounterMetricFamily("fido_held_reconnects",
                                     "Held connections replaced (lost, dropped, restarted).")
        family.add_metric([], held["reconnects"])
    else:
        family = CounterMetricFamily(
            "fido_held_reconnects", "Held connections replaced, by reason: lost (dropped, "
            "restarted, BYE), token_renewal (a fresh OAuth2 token before the held one "
            "expired), token_expired (the server said it expired).", labels=["reason"])
        for reason, n in sorted(reasons.items()):
            family.add_metric([reason], n)
    yield family


def _gauge(name, documentation, value):
    from prometheus_client.core import GaugeMetricFamily

    if value is None:
        return None
    return GaugeMetricFamily(name, documentation, value=float(value))
