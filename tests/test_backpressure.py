from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from fido_tx.schedule.backpressure import Backpressure
from fido_tx.testing import FakeBacklog, FakeScheduler


class BackpressureTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.store = FakeBacklog()
        self.scheduler = FakeScheduler()
        self.changes = []
        self.bp = Backpressure(
            self.clock, self.store, self.scheduler, max_backlog=100,
            on_change=lambda paused, n: self.changes.append((paused, n)), check_interval=5,
        )

    def test_stream_at_the_limit_does_not_pause(self):
        self.store.last_length = 100
        self.bp.after_session(None, None)
        self.assertEqual(self.scheduler.reasons, set())

    def test_stream_over_the_limit_pauses_once_and_reports_once(self):
        self.store.last_length = 101
        self.bp.after_session(None, None)
        self.bp.after_session(None, None)
        self.assertEqual(self.scheduler.reasons, {"backlog"})
        self.assertEqual(self.changes, [(True, 101)])

    def test_resumes_when_the_importer_catches_up(self):
        self.store.last_length = 500
        self.bp.after_session(None, None)
        self.store.length = 300
        self.clock.advance(5)
        self.assertEqual(self.scheduler.reasons, {"backlog"})
        self.store.length = 90
        self.clock.advance(5)
        self.assertEqual(self.scheduler.reasons, set())
        self.assertEqual(self.changes, [(True, 500), (False, 90)])
        reads = self.store.reads
        self.clock.advance(60)
        self.assertEqual(self.store.reads, reads, "no reads once resumed")

    def test_failed_reads_keep_the_pause_and_the_check_going(self):
        self.store.last_length = 500
        self.bp.after_session(None, None)
        self.store.fail = True
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual(self.scheduler.reasons, {"backlog"})
        self.store.fail = False
        self.store.length = 0
        self.clock.advance(5)
        self.assertEqual(self.scheduler.reasons, set())

    def test_stop_ends_the_check(self):
        self.store.last_length = 500
        self.bp.after_session(None, None)
        self.bp.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
