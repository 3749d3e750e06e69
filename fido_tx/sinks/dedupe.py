"""The dedupe record every Redis-backed delivery shares: one set per
(account, mailbox, epoch), ``fido:uids:{<account>}:<epoch>:<mailbox>``, whose
members are the ids delivered (IMAP: UIDs in decimal).

The stream sink writes the record in the same step as the entry; the webhook
sink writes it after a 2xx answer and before the id is confirmed; the Sidekiq
sink in the Lua script that pushes the job.  Reading it is the same for all:
:func:`filter_new`.

``redis`` is the shared connection (``execute(*args) -> Deferred``).
"""


def dedupe_key(account, mailbox, epoch):
    """The set of delivered ids of one mailbox epoch, as bytes.

    The account is in braces (a Redis Cluster hash tag: one account's sets
    live on one node)."""
    return f"fido:uids:{{{account}}}:{epoch}:{mailbox}".encode("utf-8")


def filter_new(redis, account, mailbox, epoch, ids):
    """Deferred: the ids of ``ids`` not in the record, in the order given."""
    from twisted.internet import defer

    ids = [str(i) for i in ids]
    if not ids:
        return defer.succeed([])
    d = redis.execute(b"SMISMEMBER", dedupe_key(account, mailbox, epoch), *ids)

    def pick(flags):
        return [i for i, seen in zip(ids, flags) if not int(seen)]

    return d.addCallback(pick)


def record(redis, account, mailbox, epoch, ids):
    """Deferred: add ``ids`` to the record (``SADD``)."""
    return redis.execute(b"SADD", dedupe_key(account, mailbox, epoch), *[str(i) for i in ids])
