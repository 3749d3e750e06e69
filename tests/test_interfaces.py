"""Every declared interface checked with verifyObject against the real
object and its fake in fido_tx.testing (the txacme habit)."""

from twisted.internet import task
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from fido_tx import interfaces, sinks, testing
from fido_tx.config import RedisSettings, ReporterSettings
from fido_tx.observe.report import Reporter
from fido_tx.observe.status import StatusTracker
from fido_tx.redis.connection import RedisConnection
from fido_tx.redis.heartbeat import HeartbeatWriter
from fido_tx.redis.positions import MailboxPositions
from fido_tx.redis.state import AccountState
from fido_tx.schedule.scheduler import Scheduler
from fido_tx.config import BackoffSettings


def _connection():
    return RedisConnection(MemoryReactorClock(), RedisSettings())


class RealObjectsTests(SynchronousTestCase):
    def test_redis_parts(self):
        c = _connection()
        verifyObject(interfaces.IRedisHealth, c)
        verifyObject(interfaces.IAccountState, AccountState(c))
        verifyObject(interfaces.IHeartbeatWriter, HeartbeatWriter(c))
        verifyObject(interfaces.IMailboxPositions, MailboxPositions(c))

    def test_sinks(self):
        ctx = sinks.SinkContext(MemoryReactorClock(), _connection())
        for kind in ("stream", "list", "sidekiq"):
            module = sinks.module(kind)
            sink = module.build("x", module.validate(dict(module.OPTIONS), "/"), ctx)
            verifyObject(interfaces.ISink, sink)
            verifyObject(interfaces.IBacklog, sink)
            self.assertEqual(sink.kind, kind)

    def test_scheduler(self):
        scheduler = Scheduler(task.Clock(), lambda a: None, workers=1, poll_interval=60,
                              backoff=BackoffSettings())
        verifyObject(interfaces.ISchedulerView, scheduler)
        self.assertEqual(scheduler.running_count, 0)

    def test_status_side(self):
        clock = task.Clock()
        verifyObject(interfaces.IReporterView, Reporter(clock, ReporterSettings()))
        verifyObject(interfaces.IStatusSummary, StatusTracker(clock, None, None))


class FakesTests(SynchronousTestCase):
    def test_every_fake_provides_its_interface(self):
        verifyObject(interfaces.ISink, testing.MemorySink())
        redis = testing.FakeRedis()
        verifyObject(interfaces.IRedisHealth, redis)
        verifyObject(interfaces.IAccountState, redis)
        verifyObject(interfaces.IHeartbeatWriter, redis)
        verifyObject(interfaces.IBacklog, testing.FakeBacklog())
        verifyObject(interfaces.IMailboxPositions, testing.MemoryPositions())
        verifyObject(interfaces.ISchedulerView, testing.FakeScheduler())
        verifyObject(interfaces.IReporterView, testing.FakeReporter())
        verifyObject(interfaces.IStatusSummary, testing.FakeStatus())

    def test_fake_redis_tells_its_observers(self):
        redis = testing.FakeRedis()
        seen = []
        redis.add_connection_observer(seen.append)
        redis.set_connected(False)
        self.assertEqual((seen, redis.connected, redis.last_error), ([False], False, "connection refused"))
        self.assertIs(self.successResultOf(redis.update_account("a", {})), False)
        redis.set_connected(True)
        self.assertEqual((seen, redis.last_error), ([False, True], None))
