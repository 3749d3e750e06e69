"""The Sidekiq sink (fido_tx.sinks.sidekiq): the job as Sidekiq's client
writes it, the push and the dedupe record in one script, and a real Sidekiq
(Debian's ruby-sidekiq) running GitLab-named workers that must receive each
message's bytes intact (7-bit, UTF-8, Latin-1 with a NUL), exactly once
across a SIGKILL of the pusher."""

import json
import os
import signal
import subprocess
import sys

import attr
import pytest
import pytest_twisted
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from fido_tx.interfaces import ISink
from fido_tx.redis import keys
from fido_tx.sinks import sidekiq
from fido_tx.sinks.message import Message
from tests.support import redisconn
from tests.support.sidekiq import Sidekiq

ASCII = b"From: a@b.test\r\nSubject: plain\r\n\r\nhello\r\n"
UTF8 = "From: a@b.test\r\nSubject: caf\u00e9 \u2603\r\n\r\ncr\u00e8me\r\n".encode()
LATIN1 = (
    b"From: a@b.test\r\nSubject: caf\xe9\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\ncr\xe8me br\xfbl\xe9e \x00 \x80\xff\r\n"
)


def _reactor():
    from twisted.internet import reactor

    return reactor


@attr.s(frozen=True, auto_attribs=True)
class Ctx:
    reactor: object
    redis: object
    dry_run: bool = False
    log: object = None


def sample_messages(count, account="acme"):
    raws = [ASCII, UTF8, LATIN1]
    return [
        Message(account, "INBOX", "42", str(i), raws[i % 3] + f"#{i}\r\n".encode())
        for i in range(1, count + 1)
    ]


class JobTests(SynchronousTestCase):
    def options(self, **kw):
        return sidekiq.validate(kw, ".")

    def test_job_like_sidekiqs_client(self):
        m = sample_messages(1)[0]
        job = json.loads(sidekiq.job_json(m, self.options(), 1700000000.25))
        self.assertEqual(
            sorted(job), ["args", "class", "created_at", "enqueued_at", "jid", "queue", "retry"]
        )
        self.assertEqual(job["class"], "EmailReceiverWorker")
        self.assertEqual(job["queue"], "default")
        self.assertIs(job["retry"], True)
        self.assertEqual(job["created_at"], 1700000000.25)
        self.assertRegex(job["jid"], r"\A[0-9a-f]{24}\Z")
        self.assertEqual(job["args"], [m.raw.decode()])
        ms = json.loads(sidekiq.job_json(m, self.options(timestamps="milliseconds"), 1.5))
        self.assertEqual(ms["enqueued_at"], 1500)

    def test_binary_modes(self):
        m = Message("a", "INBOX", "1", "1", LATIN1)
        latin = sidekiq.job_json(m, self.options(), 1.0)
        self.assertEqual(json.loads(latin)["args"][0].encode("latin-1"), LATIN1)
        verbatim = sidekiq.job_json(m, self.options(binary="verbatim"), 1.0)
        self.assertIn(b"cr\xe8me br\xfbl\xe9e \\u0000 \x80\xff", verbatim)
        utf8 = Message("a", "INBOX", "1", "1", UTF8)
        for mode in sidekiq.BINARY_MODES:  # UTF-8 goes as it is, whatever the mode
            job = sidekiq.job_json(utf8, self.options(binary=mode), 1.0)
            self.assertIn("caf\u00e9 \u2603".encode(), job)
            self.assertEqual(json.loads(job)["args"][0].encode(), UTF8)

    def test_validate(self):
        for bad, key in (({"queue": ""}, "queue"), ({"worker": "a b"}, "worker"),
                         ({"binary": "utf16"}, "binary"), ({"retry": "yes"}, "retry"),
                         ({"redis_url": "http://x"}, "redis_url"), ({"nope": 1}, "nope")):
            with self.assertRaises(ValueError) as e:
                sidekiq.validate(bad, ".")
            self.assertIn(key, str(e.exception))

    def test_keys_and_interface(self):
        class R:
            def script(self, source):
                return None

        sink = sidekiq.SidekiqSink("j", self.options(namespace="resque:gitlab", queue="email_receiver"),
                                   task.Clock(), R())
        self.assertEqual(sink.queue_key, b"resque:gitlab:queue:email_receiver")
        self.assertEqual(sink.queues_key, b"resque:gitlab:queues")
        verifyObject(ISink, sink)


@pytest.fixture
def conn(redis):
    c = pytest_twisted.blockon(redisconn.shared_connection(_reactor(), redis.port))
    yield c
    pytest_twisted.blockon(redisconn.close(c))


@pytest_twisted.ensureDeferred
async def test_push_is_atomic_with_the_record_and_once(conn, redis):
    o = sidekiq.validate({"namespace": "ns"}, ".")
    sink = sidekiq.build("jobs", o, Ctx(_reactor(), conn))
    msgs = sample_messages(4)
    assert await sink.filter_new("acme", "INBOX", "42", ["1", "2"]) == ["1", "2"]
    d = await sink.deliver(msgs[:2])
    assert d.confirmed == ("1", "2") and d.new == ("1", "2")
    d = await sink.deliver(msgs)
    assert d.confirmed == ("1", "2", "3", "4") and d.new == ("3", "4")
    r = redis.client()
    assert r("LLEN", "ns:queue:default") == 4
    assert r("SMEMBERS", "ns:queues") == [b"default"]
    assert sorted(r("SMEMBERS", keys.dedupe("acme", "INBOX", "42"))) == [b"1", b"2", b"3", b"4"]
    # oldest first at the right end: Sidekiq's BRPOP takes them in order
    jobs = [json.loads(j) for j in r("LRANGE", "ns:queue:default", 0, -1)]
    assert [j["args"][0].rsplit("#", 1)[1].strip() for j in reversed(jobs)] == ["1", "2", "3", "4"]
    assert await sink.filter_new("acme", "INBOX", "42", ["4", "5"]) == ["5"]


@pytest_twisted.ensureDeferred
async def test_real_sidekiq_receives_bytes_intact(conn, redis, tmp_path):
    latin = sidekiq.build("jobs", sidekiq.validate({}, "."), Ctx(_reactor(), conn))
    verbatim = sidekiq.build(
        "desk",
        sidekiq.validate({"worker": "ServiceDeskEmailReceiverWorker", "binary": "verbatim"}, "."),
        Ctx(_reactor(), conn),
    )
    first, second = sample_messages(3), sample_messages(3, account="desk")
    await latin.deliver(first)
    await verbatim.deliver(second)
    await latin.deliver(first)  # again: nothing more is pushed
    worker = Sidekiq(redis.url, str(tmp_path)).start()
    try:
        got = worker.wait_for(6)
        await task.deferLater(_reactor(), 0.5, lambda: None)
        got = worker.received()
    finally:
        worker.stop()
    assert len(got) == 6
    by = {}
    for job in got:
        by.setdefault(job["class"], []).append(job)
    gitlab, desk = by["EmailReceiverWorker"], by["ServiceDeskEmailReceiverWorker"]
    assert sorted(bytes.fromhex(j["hex"]) for j in desk) == sorted(m.raw for m in second)
    for j in desk:  # verbatim: raw.b is the message; tagged UTF-8, valid unless 8-bit Latin-1
        assert j["encoding"] == "UTF-8"
        assert j["valid"] == (b"\xe8" not in bytes.fromhex(j["hex"]))
    for m in first:  # latin1: always a valid string; non-UTF-8 comes back by encode
        try:
            m.raw.decode("utf-8")
            field = "hex"
        except UnicodeDecodeError:
            field = "latin1_hex"
        assert [j for j in gitlab if j[field] and bytes.fromhex(j[field]) == m.raw], m.raw
    assert all(j["valid"] is True for j in gitlab) and len(gitlab) == 3


def test_exactly_once_across_a_sigkill_of_the_pusher(redis, tmp_path):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.support.push_child", str(redis.port), "200"],
        cwd=here, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=here),
    )
    lines = []
    try:
        while len(lines) < 20:
            line = child.stdout.readline()
            if not line:
                raise AssertionError(child.stderr.read().decode())
            lines.append(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    r = redis.client()
    pushed_before = r("LLEN", "queue:default")
    assert 20 <= pushed_before < 200
    # "restart": deliver every message again, as the unmarked mailbox would
    out = subprocess.run(
        [sys.executable, "-c", RESTART, str(redis.port)], cwd=here, capture_output=True,
        env=dict(os.environ, PYTHONPATH=here), timeout=60,
    )
    assert out.returncode == 0, out.stderr.decode()
    assert int(out.stdout) == 200 - pushed_before
    worker = Sidekiq(redis.url, str(tmp_path)).start()
    try:
        got = worker.wait_for(200)
    finally:
        worker.stop()
    assert len(got) == 200
    assert len({j["jid"] for j in got}) == 200
    numbers = sorted(int(bytes.fromhex(j["latin1_hex"] or j["hex"]).rsplit(b"#", 1)[1]) for j in got)
    assert numbers == list(range(1, 201))


RESTART = """
import sys
from twisted.internet import defer, task
from fido_tx.sinks import sidekiq
from tests.support.push_child import Ctx
from tests.support import redisconn
from tests.test_sidekiq import sample_messages

async def main(reactor, port):
    conn = await redisconn.shared_connection(reactor, int(port))
    sink = sidekiq.build("jobs", sidekiq.validate({}, "."), Ctx(reactor, conn))
    msgs = sample_messages(200)
    fresh = set(await sink.filter_new("acme", "INBOX", "42", [m.id for m in msgs]))
    result = await sink.deliver(msgs)  # all of them: the sink must skip the pushed
    assert len(result.confirmed) == 200
    assert set(result.new) == fresh, (sorted(result.new), sorted(fresh))
    print(len(result.new))
    await redisconn.close(conn)

task.react(lambda reactor, port: defer.ensureDeferred(main(reactor, port)), sys.argv[1:])
"""


@pytest_twisted.ensureDeferred
async def test_redis_url_of_its_own_holds_jobs_and_record(conn, redis):
    """``redis_url``: Sidekiq's Redis is not Fido's; the jobs and the dedupe
    record go there together (one atomic step), nothing into Fido's."""
    from tests.support import redis_server

    try:
        import fido_tx.redis.connection  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="redis_url: this Fido cannot open a second"):
            sidekiq.build("jobs", sidekiq.validate({"redis_url": "redis://127.0.0.1:1/0"}, "."),
                          Ctx(_reactor(), conn))
        return
    other = redis_server.RedisServer(redis_server.find_redis_server()).start()
    try:
        sink = sidekiq.build("jobs", sidekiq.validate({"redis_url": other.url}, "."),
                             Ctx(_reactor(), conn))
        sink.startService()
        try:
            d = await sink.deliver(sample_messages(2))
            assert d.new == ("1", "2")
        finally:
            await sink.stopService()
        assert other.client()("LLEN", "queue:default") == 2
        assert other.client()("SCARD", keys.dedupe("acme", "INBOX", "42")) == 2
        assert redis.client()("EXISTS", "queue:default") == 0
    finally:
        other.close()


@pytest_twisted.ensureDeferred
async def test_min_replicas_confirms_nothing_until_replicas_have_it(conn, redis):
    """``[redis] min_replicas``: with no replica answering, the push stays
    unconfirmed (nothing is marked on the server), and so does the dedupe
    check that finds it pushed; without the setting the same push confirms."""
    from fido_tx import errors

    ctx = Ctx(_reactor(), conn)
    sink = sidekiq.SidekiqSink("jobs", sidekiq.validate({}, "."), _reactor(), conn,
                               min_replicas=1, replica_timeout=0.2)
    with pytest.raises(errors.FidoError, match="only 0 of 1 Redis replicas"):
        await sink.deliver(sample_messages(1))
    assert redis.client()("LLEN", "queue:default") == 1  # pushed, not confirmed
    with pytest.raises(errors.FidoError, match="only 0 of 1 Redis replicas"):
        await sink.filter_new("acme", "INBOX", "42", ["1"])
    plain = sidekiq.build("jobs", sidekiq.validate({}, "."), ctx)
    assert await plain.filter_new("acme", "INBOX", "42", ["1"]) == []


@pytest_twisted.ensureDeferred
async def test_a_stopped_sidekiq_pauses_fetching_at_max_backlog_and_a_running_one_resumes_it(
        conn, redis, tmp_path):
    from fido_tx.interfaces import IBacklog
    from fido_tx.schedule.backpressure import Backpressure
    from fido_tx.testing import FakeScheduler

    sink = sidekiq.build("jobs", sidekiq.validate({}, "."), Ctx(_reactor(), conn))
    verifyObject(IBacklog, sink)
    clock, scheduler = task.Clock(), FakeScheduler()
    pressure = Backpressure(clock, sink, scheduler, max_backlog=5, check_interval=1,
                            reason="backlog:jobs")
    msgs = sample_messages(8)
    await sink.deliver(msgs[:4])
    pressure.after_session(None, None)
    assert sink.last_length == 4 and scheduler.reasons == set()
    await sink.deliver(msgs[4:])  # nobody takes the jobs: Sidekiq is stopped
    pressure.after_session(None, None)
    assert sink.last_length == 8 and scheduler.reasons == {"backlog:jobs"}
    assert redis.client()("LLEN", "queue:default") == 8
    # a namespace (mail_room's option) counts its own queue
    namespaced = sidekiq.build("ns", sidekiq.validate({"namespace": "gl"}, "."),
                               Ctx(_reactor(), conn))
    await namespaced.deliver(sample_messages(3, account="other"))
    assert namespaced.last_length == 3 and await namespaced.backlog() == 3
    worker = Sidekiq(redis.url, str(tmp_path)).start()
    try:
        worker.wait_for(8)
        for _ in range(100):  # the next checks read LLEN from Redis
            clock.advance(1)
            await task.deferLater(_reactor(), 0.05, lambda: None)
            if not scheduler.reasons:
                break
        assert scheduler.reasons == set() and sink.last_length == 0
    finally:
        worker.stop()
        pressure.stop()
