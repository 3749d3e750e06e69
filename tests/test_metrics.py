"""Metrics: own registry, session counters, scrape-time gauges, /metrics over real HTTP."""

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import errors
from fido_tx.observe.metrics import Metrics
from fido_tx.outcome import SessionResult
from fido_tx.observe.health import Health
from fido_tx.observe.web import listen, make_site
from fido_tx.testing import FakeBacklog, FakeRedis, FakeReporter, FakeScheduler, FakeStatus


def _scheduler():
    scheduler = FakeScheduler(running_count=4, lag=12.5)
    scheduler.pause("backlog")
    return scheduler


def _backlog():
    backlog = FakeBacklog()
    backlog.last_length = 4242
    return backlog


def samples(text):
    """{(sample name, frozenset(labels)): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def bound():
    m = Metrics()
    m.bind(scheduler=_scheduler(), redis=FakeRedis(), reporter=FakeReporter(queue_length=3, dropped=7),
           status=FakeStatus({"ok": 10, "auth": 2}), backlog=_backlog())
    return m


def scrape(m):
    from prometheus_client import generate_latest

    return samples(generate_latest(m.registry).decode())


class MetricsTests(SynchronousTestCase):
    def test_sessions_counted_by_outcome_with_messages_bytes_and_duration(self):
        m = Metrics()
        m.observe_session(SessionResult("a", fetched=3, bytes=3000, seconds=0.4))
        m.observe_session(SessionResult("a", fetched=1, bytes=10, seconds=2.0))
        m.observe_session(SessionResult("b", kind=errors.AUTH, message="no", seconds=0.05))
        got = scrape(m)
        self.assertEqual(got[("fido_sessions_total", frozenset({("outcome", "ok")}))], 2)
        self.assertEqual(got[("fido_sessions_total", frozenset({("outcome", "auth")}))], 1)
        self.assertEqual(got[("fido_sessions_total", frozenset({("outcome", "tls")}))], 0)
        self.assertEqual(got[("fido_messages_fetched_total", frozenset())], 4)
        self.assertEqual(got[("fido_bytes_fetched_total", frozenset())], 3010)
        self.assertEqual(got[("fido_session_duration_seconds_count", frozenset())], 3)
        self.assertEqual(got[("fido_session_duration_seconds_bucket", frozenset({("le", "0.5")}))], 2)

    def test_registries_are_independent(self):
        a, b = Metrics(), Metrics()
        a.observe_session(SessionResult("x"))
        self.assertEqual(scrape(b)[("fido_sessions_total", frozenset({("outcome", "ok")}))], 0)

    def test_gauges_are_read_at_scrape_time(self):
        m = bound()
        got = scrape(m)
        self.assertEqual(got[("fido_accounts", frozenset({("state", "ok")}))], 10)
        self.assertEqual(got[("fido_accounts", frozenset({("state", "auth")}))], 2)
        self.assertEqual(got[("fido_accounts", frozenset({("state", "dns")}))], 0)
        self.assertEqual(got[("fido_queue_lag_seconds", frozenset())], 12.5)
        self.assertEqual(got[("fido_sessions_running", frozenset())], 4)
        self.assertEqual(got[("fido_sessions_paused", frozenset())], 1)
        self.assertEqual(got[("fido_redis_connected", frozenset())], 1)
        self.assertEqual(got[("fido_reporter_queue_length", frozenset())], 3)
        self.assertEqual(got[("fido_reporter_dropped_total", frozenset())], 7)
        self.assertEqual(got[("fido_backlog_messages", frozenset())], 4242)
        m.redis.connected = False
        m.reporter.dropped = 8
        got = scrape(m)
        self.assertEqual(got[("fido_redis_connected", frozenset())], 0)
        self.assertEqual(got[("fido_reporter_dropped_total", frozenset())], 8)

    def test_unbound_and_failing_callbacks_leave_metrics_out_but_scrape_works(self):
        m = Metrics()
        self.assertNotIn(("fido_redis_connected", frozenset()), scrape(m))

        class Broken(FakeScheduler):
            def lag(self):
                raise RuntimeError("boom")

        m.bind(scheduler=Broken(running_count=4))
        got = scrape(m)
        self.assertNotIn(("fido_queue_lag_seconds", frozenset()), got)
        self.assertEqual(got[("fido_sessions_running", frozenset())], 4)
        self.flushLoggedErrors(RuntimeError)


@pytest_twisted.inlineCallbacks
def test_metrics_scraped_over_real_http_parse():
    from twisted.internet import reactor

    m = bound()
    m.observe_session(SessionResult("a", fetched=2, bytes=20, seconds=1.0))
    health = Health(task.Clock(), m.scheduler, m.redis)
    port = yield listen(reactor, "tcp:0:interface=127.0.0.1", make_site(m, health))
    try:
        response = yield treq.get(
            f"http://127.0.0.1:{port.getHost().port}/metrics", reactor=reactor, persistent=False
        )
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
        text = (yield response.content()).decode()
        got = samples(text)
        assert got[("fido_sessions_total", frozenset({("outcome", "ok")}))] == 1
        assert got[("fido_messages_fetched_total", frozenset())] == 2
        assert got[("fido_accounts", frozenset({("state", "ok")}))] == 10
        assert got[("fido_backlog_messages", frozenset())] == 4242
        names = {f.name for f in text_string_to_metric_families(text)}
        assert {"fido_sessions", "fido_session_duration_seconds", "fido_accounts",
                "fido_reporter_dropped", "fido_queue_lag_seconds"} <= names
        assert "python_gc" not in text  # our own registry, not the global one
    finally:
        yield port.stopListening()
