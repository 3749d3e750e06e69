"""The source seam: the registry, the in-memory source run by the real
scheduler (no change to either needed), and the interfaces checked with
verifyObject against the real objects."""

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from fido_tx import errors, sources
from fido_tx.accounts.model import Account
from fido_tx.config import BackoffSettings, ImapSettings
from fido_tx.errors import FidoError
from fido_tx.interfaces import ISink, ISource
from fido_tx.schedule.scheduler import Scheduler
from fido_tx.sinks.message import Delivery
from fido_tx.sources.memory import MemoryMailboxes, MemorySession
from fido_tx.testing import MemorySink

NO_JITTER = BackoffSettings(jitter=0.0)


def memory_account(account_id, **kw):
    return Account(id=account_id, source="memory", **kw)


def context(sink=None, **kw):
    return sources.SourceContext(reactor=task.Clock(), sink=sink or MemorySink(),
                                 settings=ImapSettings(batch_messages=2),
                                 memory=MemoryMailboxes(), **kw)


class RegistryTests(SynchronousTestCase):
    def test_every_registered_source_builds_an_isource(self):
        ctx = context()
        imap = Account(id="i", host="h", username="u", password="p")
        for account in (imap, memory_account("m")):
            self.assertIn(account.source, sources.SOURCES)
            session = sources.make_session(account, ctx)
            self.assertTrue(verifyObject(ISource, session))
        self.assertIsInstance(sources.make_session(memory_account("m"), ctx), MemorySession)

    def test_fakes_provide_their_interfaces(self):
        self.assertTrue(verifyObject(ISink, MemorySink()))


class MemorySourceTests(SynchronousTestCase):
    def poll(self, account, ctx):
        return self.successResultOf(sources.make_session(account, ctx).poll())

    def test_delivers_unseen_in_batches_and_marks_them(self):
        ctx = context()
        box = ctx.memory["m"]
        for n in range(5):
            box.add(b"Subject: %d\r\n\r\nx" % n)
        box.add(b"old", flags={"\\Seen"})
        result = self.poll(memory_account("m"), ctx)
        self.assertTrue(result.ok)
        self.assertEqual((result.fetched, result.marked), (5, 5))
        self.assertEqual([c[1] for c in ctx.sink.calls if c[0] == "deliver"],
                         [("1", "2"), ("3", "4"), ("5",)])
        self.assertEqual({m.source for m in ctx.sink.entries}, {"memory"})
        self.assertTrue(all("\\Seen" in m.flags for m in box.messages))
        self.assertEqual(self.poll(memory_account("m"), ctx).fetched, 0)

    def test_already_delivered_is_marked_without_delivering(self):
        ctx = context()
        box = ctx.memory["m"]
        box.add(b"a")
        ctx.sink._keys.add(("m", "INBOX", "1", "1"))
        result = self.poll(memory_account("m", after_fetch="delete"), ctx)
        self.assertEqual((result.fetched, result.marked), (0, 1))
        self.assertEqual(box.messages, [])

    def test_rejected_are_flagged_and_reported(self):
        ctx = context()
        box = ctx.memory["m"]
        box.add(b"a")
        box.add(b"b")
        ctx.sink.reject = {"2"}
        result = self.poll(memory_account("m"), ctx)
        self.assertEqual(result.kind, errors.REJECTED)
        self.assertEqual(result.fetched, 1)
        self.assertIn("$FidoRejected", box.by_id("2").flags)
        self.assertTrue(self.poll(memory_account("m"), ctx).ok)  # not delivered again

    def test_sink_error_after_some_confirmed_marks_those(self):
        class HalfSink(MemorySink):
            def deliver(self, messages):
                d = super().deliver(messages[:1])
                return d.addCallback(lambda r: Delivery(
                    r.confirmed, r.new, (), FidoError(errors.DELIVERY, "webhook down")))

        ctx = context(sink=HalfSink())
        box = ctx.memory["m"]
        box.add(b"a")
        box.add(b"b")
        result = self.poll(memory_account("m"), ctx)
        self.assertEqual((result.kind, result.message), (errors.DELIVERY, "webhook down"))
        self.assertEqual(result.marked, 1)
        self.assertEqual([m.id for m in box.unseen("INBOX")], ["2"])


class ThroughTheSchedulerTests(SynchronousTestCase):
    def test_the_real_scheduler_runs_memory_sessions_from_the_registry(self):
        clock = task.Clock()
        ctx = context()
        ctx.memory["a"].add(b"one")
        ctx.memory["b"].skip = 1
        results = []

        def run(account, handle=None):
            return sources.make_session(account, ctx, handle).poll()

        sched = Scheduler(clock, run, workers=1, poll_interval=30, backoff=NO_JITTER,
                          handles=True)
        sched.add_result_observer(lambda a, r: results.append((a.id, r)))
        sched.startService()
        sched.set_accounts([memory_account("a"), memory_account("b")])
        self.assertEqual([(i, r.fetched) for i, r in results], [("a", 1)])  # b skipped
        ctx.memory["b"].add(b"two")
        clock.advance(30)
        self.assertEqual([(i, r.fetched) for i, r in results],
                         [("a", 1), ("a", 0), ("b", 1)])
        self.assertEqual(len(ctx.sink.entries), 2)
        self.successResultOf(defer.maybeDeferred(sched.stopService))
