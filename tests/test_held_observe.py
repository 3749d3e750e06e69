"""Held connections in what an operator reads: /metrics, the heartbeat and
``fido status``."""

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from fido_tx.cmd import status as statuscmd
from fido_tx.redis import heartbeat


class Held:
    def snapshot(self):
        return {"held": 120, "idling": 118, "reconnects": 7, "fallback": 2}


class MetricsTests(SynchronousTestCase):
    def test_held_gauges(self):
        from prometheus_client import generate_latest

        from fido_tx.observe.metrics import Metrics

        m = Metrics()
        m.bind(held=Held())
        text = generate_latest(m.registry).decode()
        self.assertIn("fido_held_connections 120.0", text)
        self.assertIn("fido_idle_connections 118.0", text)
        self.assertIn("fido_held_fallback_accounts 2.0", text)
        self.assertIn("fido_held_reconnects_total 7.0", text)

    def test_reconnects_by_reason(self):
        from prometheus_client import generate_latest

        from fido_tx.observe.metrics import Metrics

        class HeldWithReasons:
            def snapshot(self):
                return dict(Held().snapshot(), reasons={"lost": 4, "token_renewal": 3,
                                                        "token_expired": 0})

        m = Metrics()
        m.bind(held=HeldWithReasons())
        text = generate_latest(m.registry).decode()
        self.assertIn('fido_held_reconnects_total{reason="lost"} 4.0', text)
        self.assertIn('fido_held_reconnects_total{reason="token_renewal"} 3.0', text)
        self.assertIn('fido_held_reconnects_total{reason="token_expired"} 0.0', text)

    def test_without_held_connections_no_gauges(self):
        from prometheus_client import generate_latest

        from fido_tx.observe.metrics import Metrics

        self.assertNotIn("fido_held", generate_latest(Metrics().registry).decode())


class HeartbeatTests(SynchronousTestCase):
    def test_heartbeat_carries_held_counts(self):
        written = []

        class Writer:
            def heartbeat(self, instance_id, mapping, ttl):
                written.append(mapping)
                return defer.succeed(True)

        class Scheduler:
            accounts = ()
            running_count = 0

        clock = task.Clock()
        hb = heartbeat.Heartbeat(clock, Writer(), Scheduler(), "me", held=Held())
        hb.startService()
        hb.stopService()
        self.assertEqual((written[0]["held"], written[0]["idle"], written[0]["reconnects"]),
                         ("120", "118", "7"))


class StatusCommandTests(SynchronousTestCase):
    def test_fido_status_shows_held_idle_and_reconnects(self):
        doc = statuscmd.shape("redis://x", {}, {"fido:instance:web1:1": {
            "host": "web1", "pid": "1", "version": "0.1", "accounts": "300",
            "sessions": "2", "held": "120", "idle": "118", "reconnects": "7"}})
        [inst] = doc["instances"]
        self.assertEqual((inst["held"], inst["idle"], inst["reconnects"]), (120, 118, 7))
        text = "\n".join(statuscmd.format_text(doc))
        header = next(line for line in text.splitlines() if line.startswith("INSTANCE"))
        self.assertIn("HELD  IDLE  RECONNECTS", header)
        row = next(line for line in text.splitlines() if line.startswith("web1:1"))
        self.assertIn("120", row)
        self.assertIn("118", row)


class LeaseTests(SynchronousTestCase):
    """[cluster] mode = "lease": a held connection must not keep a lease
    that belongs to another instance now."""

    def test_held_connection_is_ended_and_not_restarted_until_the_lease_is_back(self):
        from fido_tx import service

        class Balancer:
            held = {"a"}

            def holds(self, account_id):
                return account_id in self.held

        class Sched:
            def __init__(self):
                self.sessions = {"a": "held"}
                self.stopped = []
                self.soon = []

            def running_ids(self):
                return frozenset(self.sessions)

            def is_held(self, account_id):
                return self.sessions.get(account_id) == "held"

            def stop_session(self, account_id):
                self.stopped.append(account_id)
                del self.sessions[account_id]  # the cancel ends it at once

            def poll_soon(self, ids):
                self.soon.extend(ids)

        b, sched = Balancer(), Sched()
        b.giving_up = set()
        is_busy = service._lease_busy(b, sched)
        self.assertFalse(is_busy("a"))  # ended at once: the lease can go
        self.assertEqual(sched.stopped, ["a"])
        self.assertEqual(b.giving_up, {"a"})
        gained = service._lease_gained(b, sched)
        gained({"a"})  # taken back later
        self.assertEqual(b.giving_up, set())
        self.assertEqual(sched.soon, ["a"])
        sched.sessions["b"] = "running"  # fetching: busy, left alone
        self.assertTrue(is_busy("b"))
        self.assertEqual(sched.stopped, ["a"])
