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

#: the entry's field names, in the contract's order
FIELDS = ("account", "mailbox", "uidvalidity", "uid", "message_id", "size", "fetched_at",
          "raw", "source", "route_key")

#: values per message in the script's ARGV: the frame, then the 10 values
#: (the names are in the script: half the arguments to encode and send)
_STRIDE = FRAME + len(FIELDS)


def entry_values(m):
    """The entry's values, in the order of :data:`FIELDS`."""
    return [
        m.account.encode("utf-8"),
        m.mailbox.encode("utf-8"),
        m.epoch.encode("utf-8"),
        m.uid.encode("utf-8"),
        m.message_id.encode("utf-8", "surrogateescape"),
        b"%d" % len(m.raw),
        m.fetched_at.encode("ascii"),
        m.raw,
        m.source.encode("utf-8"),
        m.route_key.encode("utf-8"),
    ]


def entry_fields(m):
    """The entry's field/value pairs, in order, as bytes."""
    out = []
    for name, value in zip(FIELDS, entry_values(m)):
        out += [name.encode("ascii"), value]
    return out


def _xadd():
    """The script's write of one message: ``XADD`` with the names inline."""
    pairs = ", ".join(f"'{name}', ARGV[i + {FRAME + k}]" for k, name in enumerate(FIELDS))
    return f"redis.call('XADD', target, '*', {pairs})"


@implementer(ISink, IBacklog)
class StreamSink(RedisBatchSink):
    kind = KIND
    STRIDE = _STRIDE
    LENGTH = "XLEN"
    SOURCE = batch_script(_STRIDE, _xadd(), "XLEN")

    @staticmethod
    def encode(message):
        return entry_values(message)


def validate(options, base_dir):
    if not options.get("stream"):
        raise ValueError("stream: must not be empty")
    return dict(options)


def build(name, options, ctx):
    return StreamSink(name, ctx.redis, options["stream"], dry_run=ctx.dry_run,
                      min_replicas=ctx.min_replicas, replica_timeout=ctx.replica_timeout)
