"""The instance heartbeat: ``fido:instance:<id>``, a hash with a TTL.

Every ``HEARTBEAT_INTERVAL`` seconds :class:`Heartbeat` writes who this
process is (host, pid, version, accounts, sessions running) and gives the key
``HEARTBEAT_TTL`` seconds to live: a process that dies disappears from
``fido status`` within that time.  Best effort: Redis down skips a beat.
"""

import os
import socket

from twisted.application import service
from twisted.internet import defer, task
from zope.interface import implementer

import fido_tx
from fido_tx.interfaces import IHeartbeatWriter
from fido_tx.redis import keys
from fido_tx.redis.state import best_effort, hash_args

HEARTBEAT_INTERVAL = 15.0
HEARTBEAT_TTL = 45


def instance_id():
    """``<hostname>:<pid>``: names this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


@implementer(IHeartbeatWriter)
class HeartbeatWriter:
    """Writes one instance hash on a shared RedisConnection."""

    def __init__(self, connection):
        self._connection = connection

    def heartbeat(self, instance_id, mapping, ttl):
        """``HSET fido:instance:<id> …`` then ``EXPIRE`` it after ``ttl`` s,
        on one connection; fires True when written, False when not."""
        key = keys.instance(instance_id)
        args = hash_args(mapping)

        def send(proto):
            sent = []
            if args:
                sent.append(proto.execute_command(b"HSET", key, *args))
            sent.append(proto.execute_command(b"EXPIRE", key, int(ttl)))
            return defer.gatherResults(sent, consumeErrors=True)

        d = self._connection.run("heartbeat", send)
        return best_effort(self._connection, f"heartbeat of {instance_id}", d)


class Heartbeat(service.Service):
    """Writes the heartbeat every ``interval`` seconds while running.

    :param scheduler: an :class:`~fido_tx.interfaces.ISchedulerView`.
    :param writer: an :class:`~fido_tx.interfaces.IHeartbeatWriter`.
    """

    def __init__(self, clock, writer, scheduler, instance_id,
                 interval=HEARTBEAT_INTERVAL, ttl=HEARTBEAT_TTL, accounts=None, held=None):
        """``accounts``: ``f() -> int``, the accounts this instance fetches
        (default: every account scheduled; with leases, those held)."""
        self._accounts = accounts or (lambda: len(self._scheduler.accounts))
        self._writer = writer
        self._scheduler = scheduler
        #: held IMAP connections (``snapshot()``), shown by ``fido status``
        self._held = held
        self.instance_id = instance_id
        self._ttl = ttl
        self._interval = interval
        self._loop = task.LoopingCall(self._beat)
        self._loop.clock = clock

    def _beat(self):
        mapping = {
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "version": fido_tx.__version__,
            "accounts": str(self._accounts()),
            "sessions": str(self._scheduler.running_count),
        }
        if self._held is not None:
            held = self._held.snapshot()
            mapping.update(held=str(held["held"]), idle=str(held["idling"]),
                           reconnects=str(held["reconnects"]))
        d = self._writer.heartbeat(self.instance_id, mapping, self._ttl)
        d.addErrback(lambda f: None)  # never: best effort; the loop must not die

    def startService(self):
        super().startService()
        self._loop.start(self._interval, now=True)

    def stopService(self):
        if self._loop.running:
            self._loop.stop()
        return super().stopService()
