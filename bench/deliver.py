"""Delivery benchmark: the same messages through the ``webhook``, ``sidekiq``
and ``stream`` sinks, messages/s and the client's CPU per message.

    python bench/deliver.py [--messages 1000] [--runs 5] [--size 4096]

All three on one shared RedisConnection, as in the daemon.  Starts a fresh
local Redis and a GitLab-like endpoint (its own process, so
its CPU is not counted; it checks every JWT with PyJWT, as GitLab would).
Each run delivers ``--messages`` new messages (about ``--size`` bytes) in
batches of 25 with 8 batches in flight (8 sessions), and measures wall time
and this process's CPU time, user and sys apart (Fido's side only: Redis and
the endpoint run elsewhere).  Prints one line per kind: median of the runs.
"""

import argparse
import base64
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from twisted.internet import defer, task  # noqa: E402

from tests.support import redis_server  # noqa: E402

BATCH, IN_FLIGHT = 25, 8

ENDPOINT = """
import sys
from twisted.internet import reactor
from tests.support.gitlab_endpoint import GitLabEndpoint
ep = GitLabEndpoint(reactor, open(sys.argv[1]).read()).start()
print(ep.port, flush=True)
reactor.run()
"""


def messages(run, count, size, new_message):
    filler = (b"x" * 76 + b"\r\n") * max(1, size // 78)
    return [
        new_message(f"bench-{run}", i, b"From: a@b.test\r\nSubject: %d\r\n\r\n" % i + filler)
        for i in range(1, count + 1)
    ]


async def timed(reactor, deliver, batch_list):
    """Deliver the batches with IN_FLIGHT at once: (seconds, cpu seconds)."""
    limit = defer.DeferredSemaphore(IN_FLIGHT)
    wall, before = time.perf_counter(), os.times()
    results = await defer.gatherResults([limit.run(deliver, b) for b in batch_list])
    after = os.times()
    wall = time.perf_counter() - wall
    return wall, (after.user - before.user, after.system - before.system), results


def batches(items):
    return [items[i : i + BATCH] for i in range(0, len(items), BATCH)]


async def bench(reactor, opts):
    from fido_tx.sinks import SinkContext, sidekiq, stream, webhook
    from tests.support import redisconn

    work = tempfile.mkdtemp(prefix="fido-deliver-bench-")
    secret = os.path.join(work, "secret")
    with open(secret, "w") as f:
        f.write(base64.b64encode(os.urandom(32)).decode())
    server = redis_server.RedisServer(redis_server.find_redis_server()).start()
    endpoint = subprocess.Popen(
        [sys.executable, "-c", ENDPOINT, secret], cwd=ROOT, stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    conn = hook = None
    try:
        port = int(endpoint.stdout.readline())
        url = f"http://127.0.0.1:{port}/api/v4/internal/mail_room/incoming_email"
        conn = await redisconn.shared_connection(reactor, server.port)
        ctx = SinkContext(reactor, conn)
        streamed = stream.build("default", stream.validate({"stream": "fido:messages"}, work), ctx)
        hook = webhook.build("gitlab", webhook.validate(
            {"url": url, "auth": "gitlab-jwt", "secret_file": secret, "concurrency": 8}, work),
            ctx)
        jobs = sidekiq.build("jobs", sidekiq.validate({}, work), ctx)
        await measure(reactor, opts, streamed, jobs, hook)
    finally:
        if hook is not None:
            await hook.stopService()
        if conn is not None:
            await redisconn.close(conn)
        endpoint.terminate()
        endpoint.wait()
        server.close()
        shutil.rmtree(work, ignore_errors=True)


async def measure(reactor, opts, streamed, jobs, hook):
    from fido_tx.sinks.message import Message

    def new_message(account, i, raw):
        return Message(account, "INBOX", "1", str(i), raw)

    kinds = {
        "stream": (streamed.deliver, new_message),
        "sidekiq": (jobs.deliver, new_message),
        "webhook": (hook.deliver, new_message),
    }
    rows = {k: [] for k in kinds}
    for run in range(opts.runs):
        for kind, (deliver, make) in kinds.items():
            msgs = messages(f"{kind}-{run}", opts.messages, opts.size, make)
            wall, cpu, results = await timed(reactor, deliver, batches(msgs))
            done = sum(len(r.new) for r in results)
            errors = [r.error for r in results if r.error]
            assert not errors, errors[0]
            assert done == opts.messages, (kind, done)
            n = opts.messages
            rows[kind].append((n / wall, cpu[0] * 1e6 / n, cpu[1] * 1e6 / n))
    report(opts, rows)


def report(opts, rows):
    print(f"{opts.messages} messages of ~{opts.size} bytes x {opts.runs} runs,"
          f" batches of {BATCH}, {IN_FLIGHT} in flight (median):")
    for kind, values in rows.items():
        rate, user, system = (statistics.median(v[i] for v in values) for i in range(3))
        print(f"  {kind:8s} {rate:8.0f} messages/s   client CPU/message: {user:5.0f} us user"
              f" + {system:5.0f} us sys")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=4096)
    opts = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(bench(reactor, opts)))


if __name__ == "__main__":
    main()
