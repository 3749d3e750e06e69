"""``kind = "sidekiq"``: one Sidekiq job per message, pushed exactly as
Sidekiq's own client pushes it (``SADD queues <queue>``, ``LPUSH
queue:<queue> <job>``), for applications whose workers take the raw message
as their one argument: GitLab's ``EmailReceiverWorker`` and
``ServiceDeskEmailReceiverWorker``, as mail_room's sidekiq delivery feeds
them.

The job, the dedupe record (``fido:uids:{<account>}:<epoch>:<mailbox>``,
shared with the other deliveries) and the message's identity
(:mod:`fido_tx.sinks.identity`) are written by one Lua script, so they are
one atomic step: a message is pushed exactly once whatever crashes.  With
``namespace`` the Sidekiq keys get the prefix ``<namespace>:`` (mail_room's
``namespace``, Redis::Namespace); the dedupe record never does.

Job JSON: ``class``, ``args`` (``[raw message]``), ``queue``, ``jid`` (24
hex digits), ``retry``, ``created_at`` and ``enqueued_at`` (seconds as a
float for Sidekiq 6 and 7; ``timestamps = "milliseconds"`` writes the
integer milliseconds of Sidekiq 8).

Backpressure: the sink is an :class:`~fido_tx.interfaces.IBacklog`, its
queue's length (``LLEN [<namespace>:]queue:<queue>``) the jobs Sidekiq has
not taken yet; each push returns it, so a stopped Sidekiq pauses fetching
at ``[redis] max_backlog`` (:mod:`fido_tx.schedule.backpressure`) instead
of filling Redis.

The raw message travels as a JSON string.  A message that is valid UTF-8
(all 7-bit mail, and 8-bit UTF-8 mail) goes as it is: the worker's argument
holds exactly its bytes.  JSON cannot carry other bytes in a string, so for
a message that is not UTF-8, ``binary`` decides:

* ``"latin1"`` (default): each byte becomes the character of the same number
  (ISO-8859-1).  The worker gets a valid UTF-8 string, which the Mail gem
  parses (GitLab processes the message as it does mail_room's converted
  one), and ``raw.encode("ISO-8859-1")`` gives the original bytes back.
* ``"verbatim"``: the bytes go into the JSON document unchanged.  Ruby's JSON
  parser keeps them, so the argument is the message byte for byte, but as a
  string tagged UTF-8 that is not valid: the worker must call ``raw.b`` (or
  ``force_encoding(Encoding::BINARY)``) before parsing it; the Mail gem
  raises ``ArgumentError`` on it otherwise.
"""

import json
import os

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from fido_tx import errors
from fido_tx.interfaces import IBacklog, ISink
from fido_tx.redis import keys
from fido_tx.sinks import identity, redisbatch
from fido_tx.sinks.message import Delivery
from fido_tx.sinks.options import one_of, typed

KIND = "sidekiq"

OPTIONS = {
    "queue": "default",
    "worker": "EmailReceiverWorker",
    "namespace": "",
    "retry": True,
    "redis_url": "",
    "binary": "latin1",
    "timestamps": "seconds",
}

BINARY_MODES = ("latin1", "verbatim")
TIMESTAMP_MODES = ("seconds", "milliseconds")

#: KEYS: the Sidekiq queues set, the queue list, the dedupe set, the account
#: hash, the identity hash and list (:mod:`fido_tx.sinks.identity`); ARGV:
#: the queue name, the epoch, then (id, identity, job) triples.  Returns the
#: queue's length (for backpressure), then the ids pushed.  Check, push,
#: record (as the Redis sinks): an error inside can at worst leave a job
#: without its record, never a record without its job.  A message whose
#: identity is known is recorded, not pushed.
PUSH_LUA = identity.LUA + """
local reply = {0}
for i = 3, #ARGV, 3 do
  if redis.call('SISMEMBER', KEYS[3], ARGV[i]) == 0 then
    if not fido_known(KEYS[5], ARGV[i + 1]) then
      redis.call('LPUSH', KEYS[2], ARGV[i + 2])
      reply[#reply + 1] = ARGV[i]
    end
    redis.call('SADD', KEYS[3], ARGV[i])
    fido_remember(KEYS[5], KEYS[6], ARGV[2] .. ':' .. ARGV[i], ARGV[i + 1])
  end
end
if #reply > 1 then
  redis.call('SADD', KEYS[1], ARGV[1])
  redis.call('HINCRBY', KEYS[4], 'fetched_total', #reply - 1)
end
reply[1] = redis.call('LLEN', KEYS[2])
return reply
"""

_log = Logger()


def validate(options, base_dir):
    o = typed(options, OPTIONS)
    for key in ("queue", "worker"):
        if not o[key] or any(c.isspace() for c in o[key]):
            raise ValueError(f"{key}: must be a non-empty name without spaces, got {o[key]!r}")
    one_of("binary", o["binary"], BINARY_MODES)
    one_of("timestamps", o["timestamps"], TIMESTAMP_MODES)
    if o["redis_url"]:
        from fido_tx.redis import url as redisurl

        try:
            redisurl.parse(o["redis_url"])
        except redisurl.RedisURLError as e:
            raise ValueError(f"redis_url: {' '.join(str(e).split())}") from None
    return o


def build(name, options, ctx):
    own = None
    if options["redis_url"]:
        own = _own_connection(options["redis_url"], ctx)
    return SidekiqSink(name, options, ctx.reactor, own or ctx.redis, dry_run=ctx.dry_run,
                       log=getattr(ctx, "log", None) or _log, owns_connection=own is not None,
                       min_replicas=getattr(ctx, "min_replicas", 0),
                       replica_timeout=getattr(ctx, "replica_timeout", 5.0))


def _own_connection(url, ctx):
    """A connection of this delivery's own (``redis_url``): Sidekiq's Redis
    is not Fido's.  The dedupe record then lives there too, beside the jobs,
    so that the two stay one atomic step.  The sink starts and stops it."""
    try:
        from fido_tx.redis.connection import RedisConnection  # the shared class
    except ImportError:
        raise ValueError(
            "redis_url: this Fido cannot open a second Redis connection yet;"
            " leave redis_url empty to use [redis] url"
        ) from None
    from fido_tx.config import RedisSettings

    return RedisConnection(ctx.reactor, RedisSettings(url=url))


def message_text(raw, binary="latin1"):
    """The JSON-ready text of ``raw`` and whether it was valid UTF-8."""
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        if binary == "latin1":
            return raw.decode("latin-1"), False
        return raw.decode("utf-8", "surrogateescape"), False


def job_json(message, options, now, jid=None):
    """The job document for ``message`` (bytes, as Sidekiq's client writes
    it), pushed at wall-clock time ``now`` (seconds)."""
    text, _valid = message_text(message.raw, options["binary"])
    stamp = int(now * 1000) if options["timestamps"] == "milliseconds" else now
    job = {
        "class": options["worker"],
        "args": [text],
        "retry": options["retry"],
        "queue": options["queue"],
        "jid": jid or os.urandom(12).hex(),
        "created_at": stamp,
        "enqueued_at": stamp,
    }
    document = json.dumps(job, ensure_ascii=False, separators=(",", ":"))
    return document.encode("utf-8", "surrogateescape")


@implementer(ISink, IBacklog)
class SidekiqSink(Service):
    """One ``[delivery.NAME]`` of kind sidekiq (a Service: with a
    ``redis_url`` of its own, it starts and stops that connection).

    :ivar last_length: the queue's length after the last push or
        :meth:`backlog`, or None.
    """

    kind = KIND

    def __init__(self, name, options, reactor, redis, dry_run=False, log=None,
                 owns_connection=False, min_replicas=0, replica_timeout=5.0):
        self.delivery = name
        self._owns = owns_connection
        self.min_replicas = min_replicas
        self.replica_timeout = replica_timeout
        self._options = options
        self._reactor = reactor
        self._redis = redis
        self._dry_run = dry_run
        self._log = log or _log
        prefix = f"{options['namespace']}:" if options["namespace"] else ""
        self.queues_key = f"{prefix}queues".encode("utf-8")
        self.queue_key = f"{prefix}queue:{options['queue']}".encode("utf-8")
        self._script = redis.script(PUSH_LUA) if redis is not None else None
        self._recognise = redis.script(identity.RECOGNISE_LUA) if redis is not None else None
        self._unrecorded = identity.Unrecorded()
        self.last_length = None

    def startService(self):
        super().startService()
        if self._owns:
            self._redis.startService()

    def stopService(self):
        super().stopService()
        if self._owns:
            return self._redis.stopService()

    def filter_new(self, account_id, mailbox, epoch, ids):
        return redisbatch.filter_new(self._redis, account_id, mailbox, epoch, ids,
                                     self.min_replicas, self.replica_timeout, self._unrecorded)

    def identities(self, account_id, mailbox, epoch, ids):
        return identity.stored(self._redis, account_id, mailbox, epoch, ids)

    def may_recognise(self, account_id, mailbox, epoch):
        """False when the last ``filter_new`` found no identity recorded,
        or ``epoch`` recorded as checked already."""
        return not self._unrecorded.checked(account_id, mailbox, epoch)

    def recognise(self, account_id, mailbox, epoch, identities):
        then = None
        if self.min_replicas:
            def then(proto, reply):
                if not reply:
                    return defer.succeed(reply)
                return redisbatch.wait_for_replicas(
                    proto, self.min_replicas, self.replica_timeout).addCallback(lambda _: reply)
        return identity.recognise(self._recognise, account_id, mailbox, epoch, identities,
                                  then=then, unrecorded=self._unrecorded)

    def backlog(self):
        """The queue's length now (the jobs Sidekiq has not taken)."""

        def got(n):
            self.last_length = int(n)
            return self.last_length

        return self._redis.execute(b"LLEN", self.queue_key).addCallback(got)

    def deliver(self, messages):
        messages = list(messages)
        if not messages or self._dry_run:
            return defer.succeed(Delivery())
        return defer.ensureDeferred(self._deliver(messages))

    async def _deliver(self, messages):
        groups = {}
        for m in messages:
            groups.setdefault((m.account, m.mailbox, m.epoch), []).append(m)
        confirmed, new, error = [], [], None
        now = self._reactor.seconds()
        for (account, mailbox, epoch), group in groups.items():
            args = [self._options["queue"].encode("utf-8"), epoch.encode("utf-8")]
            for m in group:
                args += [m.id.encode("utf-8"), m.identity.encode("utf-8"),
                         job_json(m, self._options, now)]
            script_keys = [self.queues_key, self.queue_key,
                           keys.dedupe(account, mailbox, epoch), keys.account(account),
                           *keys.identities(account, mailbox)]
            then = None
            if self.min_replicas:
                def then(proto, reply):
                    return redisbatch.wait_for_replicas(
                        proto, self.min_replicas, self.replica_timeout).addCallback(
                            lambda _: reply)
            try:
                pushed = await self._script.run(script_keys, args,
                                                what=f"push of {len(group)} Sidekiq jobs",
                                                then=then)
            except errors.FidoError as e:
                error = error or e
                continue
            self.last_length = int(pushed[0])
            pushed = {p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in pushed[1:]}
            confirmed.extend(m.id for m in group)
            new.extend(m.id for m in group if m.id in pushed)
        if error is not None and not confirmed:
            raise error
        return Delivery(tuple(confirmed), tuple(new), (), error)
