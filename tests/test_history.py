"""The state read back at start, the recent sessions, the heartbeats, the
per-minute ring: against an in-memory execute()."""

import json

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from fido_tx.accounts.model import Account
from fido_tx.observe.history import (
    AccountStateReader, InstanceWatch, SessionLog, pairs_to_dict,
)
from fido_tx.observe.rate import PerMinute
from fido_tx.outcome import SessionResult
from tests.support.fake_redis import FakeRedisExecute

PASSWORD = "hunter2-secret"


class AccountStateReaderTests(SynchronousTestCase):
    def test_reads_every_hash_in_bounded_batches(self):
        redis = FakeRedisExecute()
        for i in range(7):
            redis.data[f"fido:account:a{i}".encode()] = {b"state": b"ok", b"n": str(i).encode()}
        in_flight = []
        real = redis.__call__

        def counting(*args):
            in_flight.append(args)
            return real(*args)

        reader = AccountStateReader(counting, batch=3)
        got = self.successResultOf(reader.read([f"a{i}" for i in range(7)] + ["missing"]))
        self.assertEqual(got["a4"], {"state": "ok", "n": "4"})
        self.assertEqual(got["missing"], {})
        self.assertEqual(len(in_flight), 8)
        self.assertEqual(redis.count("SCAN"), 0)  # never a scan

    def test_a_key_of_the_wrong_type_is_new_and_the_rest_is_read(self):
        redis = FakeRedisExecute()
        redis.data[b"fido:account:bad"] = [b"a list"]
        redis.data[b"fido:account:good"] = {b"state": b"ok"}
        got = self.successResultOf(AccountStateReader(redis).read(["bad", "good"]))
        self.assertEqual(got, {"bad": {}, "good": {"state": "ok"}})

    def test_redis_down_fails_the_read(self):
        redis = FakeRedisExecute()
        redis.down = True
        self.failureResultOf(AccountStateReader(redis).read(["a"]))

    def test_pairs_to_dict_takes_lists_and_dicts(self):
        self.assertEqual(pairs_to_dict([b"a", b"1", b"b", b"2"]), {"a": "1", "b": "2"})
        self.assertEqual(pairs_to_dict({b"a": b"1"}), {"a": "1"})
        self.assertEqual(pairs_to_dict(None), {})


class SessionLogTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.redis = FakeRedisExecute()
        self.log = SessionLog(self.clock, self.redis, keep=5)
        self.account = Account(id="acme", host="h", password=PASSWORD)

    def test_keeps_the_last_n_newest_first_as_compact_json(self):
        for i in range(8):
            self.clock.advance(60)
            self.successResultOf(self.log.record(
                self.account, SessionResult("acme", fetched=i, bytes=100 * i, seconds=0.5)))
        raw = self.redis.data[b"fido:sessions:acme"]
        self.assertEqual(len(raw), 5)
        self.assertNotIn(b" ", raw[0])  # compact
        recent = self.successResultOf(self.log.recent("acme"))
        self.assertEqual([r["fetched"] for r in recent], [7, 6, 5, 4, 3])
        self.assertEqual(recent[0]["kind"], "ok")
        self.assertTrue(recent[0]["t"].endswith("Z"))
        self.assertEqual(self.redis.ttls[b"fido:sessions:acme"], 30 * 86400)

    def test_keep_zero_writes_nothing(self):
        log = SessionLog(self.clock, self.redis, keep=0)
        self.assertFalse(self.successResultOf(log.record(self.account, SessionResult("acme"))))
        self.assertEqual(self.redis.commands, [])

    def test_an_error_keeps_the_servers_words_and_never_the_password(self):
        result = SessionResult("acme", kind="auth",
                               message=f"LOGIN failed: [AUTHENTICATIONFAILED] for {PASSWORD}")
        self.successResultOf(self.log.record(self.account, result))
        entry = self.successResultOf(self.log.recent("acme"))[0]
        self.assertEqual(entry["kind"], "auth")
        self.assertIn("AUTHENTICATIONFAILED", entry["error"])
        self.assertNotIn(PASSWORD, json.dumps(self.redis.data[b"fido:sessions:acme"][0].decode()))

    def test_dry_run_sessions_are_not_kept_and_redis_down_never_errbacks(self):
        self.assertFalse(self.successResultOf(
            self.log.record(self.account, SessionResult("acme", dry_run=True))))
        self.assertEqual(self.redis.commands, [])
        self.redis.down = True
        self.assertFalse(self.successResultOf(
            self.log.record(self.account, SessionResult("acme"))))

    def test_bad_entries_are_skipped(self):
        self.redis.data[b"fido:sessions:acme"] = [b"{not json", b"[1]", b'{"kind":"ok"}']
        self.assertEqual(self.successResultOf(self.log.recent("acme")), [{"kind": "ok"}])


class InstanceWatchTests(SynchronousTestCase):
    def test_reads_heartbeats_on_start_and_every_interval(self):
        clock = task.Clock()
        redis = FakeRedisExecute()
        redis.data[b"fido:instance:h1:10"] = {b"host": b"h1", b"accounts": b"3"}
        redis.data[b"fido:instance:h2:20"] = {b"host": b"h2", b"accounts": b"4"}
        redis.data[b"fido:account:x"] = {b"state": b"ok"}
        watch = InstanceWatch(clock, redis, interval=15)
        watch.startService()
        self.assertEqual([i["id"] for i in watch.instances], ["h1:10", "h2:20"])
        del redis.data[b"fido:instance:h2:20"]
        redis.down = True
        clock.advance(15)
        self.assertEqual(len(watch.instances), 2)  # kept while Redis is down
        redis.down = False
        clock.advance(15)
        self.assertEqual([i["id"] for i in watch.instances], ["h1:10"])
        watch.stopService()


class PerMinuteTests(SynchronousTestCase):
    def test_a_ring_of_sixty_minutes(self):
        clock = task.Clock()
        clock.advance(6000 * 60)
        ring = PerMinute(clock, minutes=60)
        ring.record(None, SessionResult("a", fetched=5))
        ring.record(None, SessionResult("a", fetched=2))
        ring.record(None, SessionResult("a", fetched=9, dry_run=True))
        clock.advance(60)
        ring.record(None, SessionResult("a", fetched=1))
        series = ring.series()
        self.assertEqual(len(series), 60)
        self.assertEqual([n for _, n in series[-2:]], [7, 1])
        clock.advance(59 * 60)
        self.assertEqual([n for _, n in ring.series()][0], 1)
        clock.advance(60)
        self.assertEqual(sum(n for _, n in ring.series()), 0)  # an hour later: gone
