"""A Fido stand-in that POSTs messages through the webhook sink, for the
SIGKILL test in tests/test_webhook.py.

    python -m tests.support.webhook_child REDIS_PORT URL SECRET_FILE COUNT MODE

MODE ``stall``: the dedupe write after the 2xx answers never completes (the
process prints ``stalled`` and waits to be killed: a crash between the POST
and the record).  MODE ``run``: a normal delivery; prints the new ids.
"""

import sys

import attr
from twisted.internet import defer, task

from fido_tx.sinks import webhook
from fido_tx.sinks.message import Message
from tests.support import redisconn


@attr.s(auto_attribs=True)
class Ctx:
    reactor: object
    redis: object
    dry_run: bool = False
    log: object = None


class StallsOnRecord:
    """The shared connection, but the record after the 2xx answers never
    completes: the process is killed there."""

    def __init__(self, conn):
        self._conn = conn

    def execute(self, *args):
        return self._conn.execute(*args)

    def script(self, source):
        if source != webhook.RECORD_LUA:
            return self._conn.script(source)
        return self

    def run(self, keys, args, what="script", then=None):
        print("stalled", flush=True)
        return defer.Deferred()  # never fires: killed here


def sample(count):
    return [
        Message("acme", "INBOX", "7", str(i), f"Subject: {i}\r\n\r\nbody {i}\r\n".encode())
        for i in range(1, count + 1)
    ]


async def main(reactor, port, url, secret, count, mode):
    conn = await redisconn.shared_connection(reactor, int(port))
    redis = StallsOnRecord(conn) if mode == "stall" else conn
    options = webhook.validate({"url": url, "auth": "gitlab-jwt", "secret_file": secret}, ".")
    sink = webhook.build("gitlab", options, Ctx(reactor, redis))
    result = await sink.deliver(sample(int(count)))
    print("new", " ".join(result.new), flush=True)
    await sink.stopService()


if __name__ == "__main__":
    task.react(lambda reactor, *a: defer.ensureDeferred(main(reactor, *a)), sys.argv[1:])
