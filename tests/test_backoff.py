"""Tests for fido_tx.schedule.backoff: the per-account retry delays."""

import random

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fido_tx.schedule import backoff
from fido_tx import errors
from fido_tx.config import BackoffSettings

NO_JITTER = BackoffSettings(
    initial=30.0, maximum=1800.0, auth_initial=600.0, auth_maximum=21600.0, jitter=0.0
)


def failed(times, kind=errors.TIMEOUT):
    state = backoff.HEALTHY
    for _ in range(times):
        state = backoff.record(state, kind)
    return state


class RecordTests(SynchronousTestCase):
    def test_failures_count_up(self):
        self.assertEqual(failed(3), backoff.BackoffState(3, errors.TIMEOUT))

    def test_success_resets(self):
        self.assertEqual(backoff.record(failed(5), None), backoff.HEALTHY)

    def test_redis_failure_neither_counts_nor_resets(self):
        self.assertEqual(backoff.record(backoff.HEALTHY, errors.REDIS), backoff.HEALTHY)
        self.assertEqual(backoff.record(failed(2), errors.REDIS), failed(2))

    def test_every_other_failure_kind_counts(self):
        for kind in sorted(errors.FAILURE_KINDS - {errors.REDIS}):
            self.assertTrue(backoff.counts_as_failure(kind), kind)
            self.assertEqual(backoff.record(backoff.HEALTHY, kind).failures, 1)
        self.assertFalse(backoff.counts_as_failure(None))
        self.assertFalse(backoff.counts_as_failure(errors.REDIS))

    def test_last_kind_picks_the_schedule(self):
        state = backoff.record(failed(2), errors.AUTH)
        self.assertEqual(state, backoff.BackoffState(3, errors.AUTH))
        self.assertEqual(backoff.schedule(NO_JITTER, state), (600.0, 21600.0))


class DelayTests(SynchronousTestCase):
    def test_healthy_has_no_delay(self):
        self.assertEqual(backoff.base_delay(NO_JITTER, backoff.HEALTHY), 0.0)
        self.assertEqual(backoff.delay(NO_JITTER, backoff.HEALTHY, random.Random(1)), 0.0)

    def test_exponential(self):
        delays = [backoff.base_delay(NO_JITTER, failed(n)) for n in range(1, 6)]
        self.assertEqual(delays, [30.0, 60.0, 120.0, 240.0, 480.0])

    def test_capped_at_maximum(self):
        self.assertEqual(backoff.base_delay(NO_JITTER, failed(7)), 1800.0)
        self.assertEqual(backoff.base_delay(NO_JITTER, failed(10_000)), 1800.0)

    def test_auth_failures_back_off_harder(self):
        auth = [backoff.base_delay(NO_JITTER, failed(n, errors.AUTH)) for n in (1, 2, 6, 50)]
        self.assertEqual(auth, [600.0, 1200.0, 19200.0, 21600.0])
        self.assertGreater(
            backoff.base_delay(NO_JITTER, failed(1, errors.AUTH)),
            backoff.base_delay(NO_JITTER, failed(1)),
        )

    def test_jitter_spreads_within_fraction(self):
        config = BackoffSettings(initial=100.0, maximum=10_000.0, jitter=0.2)
        rng = random.Random(7)
        values = [backoff.delay(config, failed(1), rng) for _ in range(500)]
        self.assertTrue(all(80.0 <= v <= 120.0 for v in values))
        # really spread, on both sides of the base
        self.assertLess(min(values), 85.0)
        self.assertGreater(max(values), 115.0)

    def test_jitter_never_exceeds_maximum(self):
        config = BackoffSettings(initial=100.0, maximum=1000.0, jitter=0.5)
        rng = random.Random(3)
        values = [backoff.delay(config, failed(20), rng) for _ in range(200)]
        self.assertTrue(all(500.0 <= v <= 1000.0 for v in values))
        self.assertLess(min(values), 1000.0)

    def test_seeded_random_is_deterministic(self):
        config = BackoffSettings(jitter=0.3)
        a = [backoff.delay(config, failed(2), random.Random(5)) for _ in range(3)]
        self.assertEqual(len(set(a)), 1)

    @settings(max_examples=200, deadline=None)
    @given(
        failures=st.integers(min_value=1, max_value=200),
        kind=st.sampled_from(sorted(errors.FAILURE_KINDS - {errors.REDIS})),
        jitter=st.floats(min_value=0.0, max_value=1.0),
        seed=st.integers(min_value=0, max_value=2**32),
    )
    def test_delay_bounds(self, failures, kind, jitter, seed):
        config = BackoffSettings(jitter=jitter)
        state = failed(failures, kind)
        base = backoff.base_delay(config, state)
        _, maximum = backoff.schedule(config, state)
        value = backoff.delay(config, state, random.Random(seed))
        self.assertLessEqual(value, maximum)
        self.assertGreaterEqual(value, base * (1 - jitter) - 1e-9)
        self.assertLessEqual(value, base * (1 + jitter) + 1e-9)


class ExponentialTests(SynchronousTestCase):
    """The one formula: accounts, Redis reconnects and report retries."""

    def test_doubles_from_initial_and_caps_without_jitter(self):
        rng = random.Random(1)
        got = [backoff.exponential(n, 0.25, 10.0, 0.0, rng) for n in range(0, 9)]
        self.assertEqual(got, [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0])

    def test_jitter_stays_within_its_fraction_and_under_the_cap(self):
        rng = random.Random(9)
        for n in range(1, 200):
            value = backoff.exponential(n, 1.0, 300.0, 0.1, rng)
            base = min(2.0 ** (n - 1), 300.0)
            self.assertTrue(base * 0.9 <= value <= min(base * 1.1, 300.0), (n, value))

    def test_the_redis_reconnect_and_the_report_retry_use_it(self):
        from fido_tx.observe.report import Reporter
        from fido_tx.redis.connection import reconnect_policy

        policy = reconnect_policy(initial=0.25, maximum=10.0, jitter=0.0)
        self.assertEqual([policy(n) for n in (1, 2, 7, 100)], [0.25, 0.5, 10.0, 10.0])

        class NoJitter:
            def uniform(self, a, b):
                return (a + b) / 2

        from twisted.internet import task
        from fido_tx.config import ReporterSettings

        r = Reporter(task.Clock(), ReporterSettings(), retry_initial=1.0, retry_max=300.0,
                     random=NoJitter())
        self.assertEqual([r._backoff(n) for n in (1, 4, 20)], [1.0, 8.0, 300.0])
