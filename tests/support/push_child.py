"""A Fido stand-in that pushes messages to Sidekiq one by one until it is
killed (tests/test_sidekiq.py SIGKILLs it mid-way).

    python -m tests.support.push_child REDIS_PORT COUNT
"""

import sys

import attr
from twisted.internet import defer, task

from fido_tx.sinks import sidekiq
from tests.support import redisconn
from tests.test_sidekiq import sample_messages


@attr.s(auto_attribs=True)
class Ctx:
    reactor: object
    redis: object
    dry_run: bool = False
    log: object = None


async def main(reactor, port, count):
    conn = await redisconn.shared_connection(reactor, int(port))
    sink = sidekiq.build("jobs", sidekiq.validate({}, "."), Ctx(reactor, conn))
    for m in sample_messages(int(count)):
        result = await sink.deliver([m])
        print("pushed", m.id, len(result.new), flush=True)
    await task.deferLater(reactor, 60, lambda: None)  # wait to be killed


if __name__ == "__main__":
    task.react(lambda reactor, *a: defer.ensureDeferred(main(reactor, *a)), sys.argv[1:])
