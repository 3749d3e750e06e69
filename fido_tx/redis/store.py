"""Legacy: ``RedisStore``, the old one-object Redis sink, as thin wrappers.

Redis now lives in small parts on one shared connection:
:mod:`fido_tx.redis.connection` (the connection), :mod:`fido_tx.sinks.stream`
(the stream sink), :mod:`fido_tx.redis.state` (the account hash) and
:mod:`fido_tx.redis.heartbeat`.  This class keeps the old names (``store``,
``filter_new`` with integer UIDs, ``record_session``, ``heartbeat``,
``backlog``, ``last_stream_length``) working on those parts, so that code not
yet moved to :class:`~fido_tx.interfaces.ISink` keeps running.  Delete it once
nothing imports it.
"""

from twisted.application.service import Service
from zope.interface import implementer

from fido_tx.interfaces import IAccountState, IRedisHealth
from fido_tx.redis import connection as connection_mod
from fido_tx.redis.heartbeat import HeartbeatWriter, instance_id as default_instance_id
from fido_tx.redis.keys import account as account_key, dedupe as uids_key  # noqa: F401
from fido_tx.redis.state import AccountState
from fido_tx.sinks.base import IMessageSink
from fido_tx.sinks.redisbatch import ConfirmedUIDs  # noqa: F401  (old name)
from fido_tx.sinks.stream import StreamSink


@implementer(IMessageSink, IAccountState, IRedisHealth)
class RedisStore(Service):
    """The old facade: a connection, the stream sink, account state, heartbeat."""

    name = "redis"

    def __init__(self, reactor, settings, instance_id=None, retry_policy=None):
        self.connection = connection_mod.RedisConnection(reactor, settings, retry_policy)
        self.url = self.connection.url
        self.instance_id = instance_id or default_instance_id()
        self.sink = StreamSink("default", self.connection, settings.stream)
        self.state = AccountState(self.connection)
        self._heartbeat = HeartbeatWriter(self.connection)
        self.filter_new = self.sink.filter_new
        self.store = self.sink.store
        self.backlog = self.sink.backlog
        self.update_account = self.state.update_account
        self.record_session = self.state.record_session
        self.add_connection_observer = self.connection.add_connection_observer

    @property
    def connected(self):
        return self.connection.connected

    @property
    def last_error(self):
        return self.connection.last_error

    _last_error = last_error

    @property
    def last_stream_length(self):
        return self.sink.last_length

    def startService(self):
        Service.startService(self)
        self.connection.startService()

    def stopService(self):
        Service.stopService(self)
        return self.connection.stopService()

    def heartbeat(self, instance_id, mapping=None, ttl=None):
        """``heartbeat(instance_id, mapping, ttl)`` or ``heartbeat(mapping, ttl)``."""
        if not isinstance(instance_id, str):
            instance_id, mapping, ttl = self.instance_id, instance_id, mapping
        return self._heartbeat.heartbeat(instance_id, mapping, ttl)
