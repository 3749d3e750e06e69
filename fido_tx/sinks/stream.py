"""The Redis stream sink (``kind = "stream"``): one ``XADD`` per message.

``[delivery.NAME]`` keys: ``stream`` (default ``fido:messages``).  The
implied ``[delivery.default]`` takes ``[redis] stream``.

Each entry has the contract's fields in the contract's order, then two
additions at the end::

    account mailbox uidvalidity uid message_id size fetched_at raw source route_key

``uidvalidity``/``uid`` are the message key's epoch and id (IMAP: decimal
UIDVALIDITY and UID; Graph: ``""`` and the immutable id); ``source`` is the
source kind (``imap``), ``route_key`` the ``[routing] template`` key (``""`` when
none).  Deduplicated and written atomically per batch by
:mod:`fido_tx.sinks.redisbatch` (same dedupe sets as before: existing records
keep working).
"""

from zope.interface import implementer

from fido_tx.interfaces import IBacklog, ISink
from fido_tx.redis import keys
from fido_tx.sinks.redisbatch import FRAME, RedisBatchSink, batch_script

KIND = "stream"
OPTIONS = {"stream": keys.DEFAULT_STREAM}

#: values per message in the script's ARGV: the frame, 20 field values
_STRIDE = FRAME + 20


def entry_fields(m):
    """The entry's field/value pairs, in order, as bytes."""
    return [
        b"account", m.account.encode("utf-8"),
        b"mailbox", m.mailbox.encode("utf-8"),
        b"uidvalidity", m.epoch.encode("utf-8"),
        b"uid", m.uid.encode("utf-8"),
        b"message_id", m.message_id.encode("utf-8", "surrogateescape"),
        b"size", str(len(m.raw)).encode("ascii"),
        b"fetched_at", m.fetched_at.encode("ascii"),
        b"raw", m.raw,
        b"source", m.source.encode("utf-8"),
        b"route_key", m.route_key.encode("utf-8"),
    ]


@implementer(ISink, IBacklog)
class StreamSink(RedisBatchSink):
    kind = KIND
    STRIDE = _STRIDE
    LENGTH = "XLEN"
    SOURCE = batch_script(
        _STRIDE,
        "redis.call('XADD', target, '*', unpack(ARGV, i + %d, i + %d))" % (FRAME, _STRIDE - 1),
        "XLEN",
    )

    @staticmethod
    def encode(message):
        return entry_fields(message)


def validate(options, base_dir):
    if not options.get("stream"):
        raise ValueError("stream: must not be empty")
    return dict(options)


def build(name, options, ctx):
    return StreamSink(name, ctx.redis, options["stream"], dry_run=ctx.dry_run,
                      min_replicas=ctx.min_replicas, replica_timeout=ctx.replica_timeout)
