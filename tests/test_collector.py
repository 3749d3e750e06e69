"""The garbage collector as the daemon leaves it after start-up (tap.py)."""

import gc

from twisted.trial.unittest import SynchronousTestCase

from fido_tx import tap


class SettleCollectorTests(SynchronousTestCase):
    def setUp(self):
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        self.addCleanup(gc.unfreeze)

    def test_start_up_objects_are_frozen_and_young_collections_spaced_out(self):
        tap.settle_collector()
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertEqual(gc.get_threshold(), tap.GC_THRESHOLD)
        # the young generation, not the older ones, is what was widened
        self.assertGreater(tap.GC_THRESHOLD[0], 700)
        self.assertEqual(tap.GC_THRESHOLD[1:], (10, 10))

    def test_start_up_collects_the_young_generations_only(self):
        # a full collection there found nothing and cost ~50 ms of start-up
        full_before = gc.get_stats()[2]["collections"]
        middle_before = gc.get_stats()[1]["collections"]
        tap.settle_collector()
        self.assertEqual(gc.get_stats()[2]["collections"], full_before)
        self.assertEqual(gc.get_stats()[1]["collections"], middle_before + 1)

    def test_a_daemon_with_tls_collects_young_objects_more_often(self):
        # closed TLS connections hold OpenSSL memory until collected
        tap.settle_collector(tls=True)
        self.assertEqual(gc.get_threshold(), tap.GC_THRESHOLD_TLS)
        self.assertGreater(tap.GC_THRESHOLD_TLS[0], 700)
        self.assertLess(tap.GC_THRESHOLD_TLS[0], tap.GC_THRESHOLD[0])
