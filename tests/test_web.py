"""/healthz from fakes (unit and over real HTTP), the site's routes, listen()."""

import json

import pytest_twisted
import treq
from treq.testing import StubTreq
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from fido_tx.observe.metrics import Metrics
from fido_tx.observe.health import Health
from fido_tx.observe.web import listen, make_site
from fido_tx.testing import FakeRedis, FakeScheduler


def make(stall_after=300.0):
    clock = task.Clock()
    clock.advance(1000)
    # running: Service.running would be a flag; the count is running_count
    scheduler = FakeScheduler(running_count=3, accounts={"a": 1, "b": 2})
    store = FakeRedis()
    return Health(clock, scheduler, store, stall_after=stall_after), clock, scheduler, store


class HealthTests(SynchronousTestCase):
    def test_healthy_when_redis_is_up_and_nothing_is_overdue(self):
        health, clock, scheduler, store = make()
        healthy, body = health.check()
        self.assertTrue(healthy)
        self.assertEqual(
            {k: body[k] for k in ("status", "accounts", "running", "redis")},
            {"status": "ok", "accounts": 2, "running": 3, "redis": "connected"},
        )

    def test_redis_down_fails(self):
        health, clock, scheduler, store = make()
        store.connected = False
        healthy, body = health.check()
        self.assertFalse(healthy)
        self.assertEqual((body["status"], body["redis"]), ("fail", "disconnected"))
        self.assertIn("Redis", body["reason"])

    def test_overdue_accounts_and_no_recent_completion_is_a_stall(self):
        health, clock, scheduler, store = make(stall_after=300)
        scheduler.last_completion_at = clock.seconds()
        scheduler.lag_seconds = 400
        clock.advance(200)
        self.assertTrue(health.check()[0])  # completions are still happening
        clock.advance(101)
        healthy, body = health.check()
        self.assertFalse(healthy)
        self.assertIn("stalled", body["reason"])
        scheduler.last_completion_at = clock.seconds()
        self.assertTrue(health.check()[0])

    def test_never_completed_but_nothing_overdue_is_healthy(self):
        health, clock, scheduler, store = make(stall_after=300)
        clock.advance(10000)
        scheduler.lag_seconds = 299
        self.assertTrue(health.check()[0])
        scheduler.lag_seconds = 301
        self.assertFalse(health.check()[0])

    def test_paused_for_backlog_is_not_a_stall(self):
        health, clock, scheduler, store = make(stall_after=300)
        scheduler.lag_seconds = 5000
        scheduler.pause("backlog")
        healthy, body = health.check()
        self.assertTrue(healthy)
        self.assertEqual(body["paused"], ["backlog"])

    def test_paused_for_another_deliverys_backlog_is_not_a_stall_either(self):
        health, clock, scheduler, store = make(stall_after=300)
        scheduler.lag_seconds = 5000
        scheduler.pause("backlog:queue")
        self.assertTrue(health.check()[0])
        scheduler.pause("redis")
        self.assertTrue(health.check()[0])  # still a backlog pause among them

    def test_running_is_the_count_even_when_zero(self):
        health, clock, scheduler, store = make()
        scheduler.running_count = 0
        self.assertEqual(health.check()[1]["running"], 0)


class SiteTests(SynchronousTestCase):
    def get(self, site_parts, path):
        metrics, health = site_parts
        stub = StubTreq(make_site(metrics, health).resource)
        response = self.successResultOf(stub.get("http://fido.test" + path))
        return response.code, self.successResultOf(response.content()), response

    def test_healthz_answers_200_then_503(self):
        health, clock, scheduler, store = make()
        code, body, _ = self.get((Metrics(), health), "/healthz")
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body)["status"], "ok")
        store.connected = False
        code, body, response = self.get((Metrics(), health), "/healthz")
        self.assertEqual(code, 503)
        self.assertEqual(json.loads(body)["status"], "fail")
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])

    def test_broken_health_check_is_503_not_500(self):
        health, clock, scheduler, store = make()
        scheduler.lag = None  # not callable
        code, body, _ = self.get((Metrics(), health), "/healthz")
        self.assertEqual(code, 503)

    def test_unknown_path_is_404(self):
        health, *_ = make()
        code, _, _ = self.get((Metrics(), health), "/nope")
        self.assertEqual(code, 404)


class ListenTests(SynchronousTestCase):
    def test_empty_description_is_off(self):
        self.assertIsNone(self.successResultOf(listen(None, "", None)))


@pytest_twisted.inlineCallbacks
def test_healthz_over_real_http():
    from twisted.internet import reactor

    health, clock, scheduler, store = make()
    port = yield listen(reactor, "tcp:0:interface=127.0.0.1", make_site(Metrics(), health))
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/healthz"
        response = yield treq.get(url, reactor=reactor, persistent=False)
        assert response.code == 200
        body = yield response.json()
        assert body["status"] == "ok" and body["running"] == 3
        store.connected = False
        response = yield treq.get(url, reactor=reactor, persistent=False)
        assert response.code == 503
        body = yield response.json()
        assert body == {**body, "status": "fail", "redis": "disconnected"}
    finally:
        yield port.stopListening()


def test_with_the_http_endpoint_off_the_web_stack_is_never_loaded(tmp_path):
    """twisted.web, prometheus_client and treq cost ~6 MiB and ~50 ms of
    start-up; a daemon without /metrics and without a reporter needs none
    (nor its HTTP client, without OAuth2 or Graph accounts, nor twisted.mail)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys
        from twisted.internet.testing import MemoryReactorClock
        from fido_tx import config
        from fido_tx import service
        settings = config.Settings(
            fido=config.FidoSettings(accounts_file={str(tmp_path / "accounts.json")!r},
                                     key_file="", state_dir={str(tmp_path)!r}),
            redis=config.RedisSettings(url="redis://127.0.0.1:1/0"),
            http=config.HttpSettings(listen=""),
        )
        top = service.make_service(settings, MemoryReactorClock(), observer=False)
        assert top.parts["health"].check() is not None
        print(sorted(m for m in ("twisted.web.server", "prometheus_client", "treq",
                                 "twisted.web.client", "twisted.web.http", "twisted.mail.imap4")
                     if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


class SiteOnFirstConnectionTests(SynchronousTestCase):
    """The listener's factory builds the site for the first connection only."""

    def test_the_site_is_built_once_for_the_first_connection_and_stopped_with_the_port(self):
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        from fido_tx.observe.listen import SiteOnFirstConnection

        health, clock, scheduler, store = make()
        built = []

        def make_it():
            built.append(make_site(Metrics(), health))
            return built[-1]

        factory = SiteOnFirstConnection(make_it)
        factory.doStart()
        self.assertEqual(built, [])  # listening builds nothing
        addr = IPv4Address("TCP", "127.0.0.1", 40000)
        channel = factory.buildProtocol(addr)
        factory.buildProtocol(addr)
        self.assertEqual(len(built), 1)
        self.assertIs(channel.site, built[0])
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())
        self.assertIn(b'"status": "ok"', transport.value())
        factory.doStop()
        self.assertIsNone(factory.site)
