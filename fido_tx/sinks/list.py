"""The Redis list sink (``kind = "list"``): ``LPUSH`` one JSON document per
message, for importers that ``BRPOP`` a queue.

``[delivery.NAME]`` keys: ``key`` (default ``fido:messages:list``).

The document holds the stream entry's fields (:mod:`fido_tx.sinks.stream`),
every value a string as in the stream, with ``raw`` base64-encoded::

    {"account": ..., "mailbox": ..., "uidvalidity": ..., "uid": ...,
     "message_id": ..., "size": ..., "fetched_at": ..., "raw": "<base64>",
     "source": ..., "route_key": ...}

Deduplicated like the stream, with the same dedupe sets, in one Lua step per
batch (:mod:`fido_tx.sinks.redisbatch`).
"""

import base64
import json

from zope.interface import implementer

from fido_tx.interfaces import IBacklog, ISink
from fido_tx.redis import keys
from fido_tx.sinks.redisbatch import FRAME, RedisBatchSink, batch_script

KIND = "list"
OPTIONS = {"key": keys.DEFAULT_LIST}


def document(m):
    """The JSON document of one message, as bytes."""
    return json.dumps(
        {
            "account": m.account,
            "mailbox": m.mailbox,
            "uidvalidity": m.epoch,
            "uid": m.uid,
            "message_id": m.message_id,
            "size": str(len(m.raw)),
            "fetched_at": m.fetched_at,
            "raw": base64.b64encode(m.raw).decode("ascii"),
            "source": m.source,
            "route_key": m.route_key,
        },
        separators=(",", ":"),
    ).encode("ascii")


@implementer(ISink, IBacklog)
class ListSink(RedisBatchSink):
    kind = KIND
    STRIDE = FRAME + 1
    LENGTH = "LLEN"
    SOURCE = batch_script(FRAME + 1, "redis.call('LPUSH', target, ARGV[i + %d])" % FRAME, "LLEN")

    @staticmethod
    def encode(message):
        return [document(message)]


def validate(options, base_dir):
    if not options.get("key"):
        raise ValueError("key: must not be empty")
    return dict(options)


def build(name, options, ctx):
    return ListSink(name, ctx.redis, options["key"], dry_run=ctx.dry_run,
                    min_replicas=ctx.min_replicas, replica_timeout=ctx.replica_timeout)
