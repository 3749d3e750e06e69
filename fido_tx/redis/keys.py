"""Every Redis key name Fido writes, in one place.

``<...>`` are taken verbatim from the account, message or config:

``<stream>`` (``[delivery.NAME] stream``; ``[redis] stream`` for the implied
``[delivery.default]``, default ``fido:messages``)
    The stream sink's entries (:mod:`fido_tx.sinks.stream`).
``<list>`` (``[delivery.NAME] key``, default ``fido:messages:list``)
    The list sink's JSON documents (:mod:`fido_tx.sinks.list`).
``fido:uids:{<account>}:<epoch>:<mailbox>``
    The dedupe record of both sinks: a set of the ids delivered from that
    mailbox and epoch (IMAP: UIDVALIDITY and UIDs in decimal).  A new epoch
    starts a new set; old sets are left for the operator to delete.  The
    braces make the account a Redis Cluster hash tag.
``fido:ident:{<account>}:<mailbox>``
    Hash, what identifies each stored message of that mailbox
    (:mod:`fido_tx.sinks.identity`): ``u:<epoch>:<id>`` -> identity and
    ``i:<identity>`` -> ``<epoch>:<id>``, for the last
    :data:`~fido_tx.sinks.identity.KEEP` messages stored, and ``e`` -> the
    epoch of the last one.
``fido:identq:{<account>}:<mailbox>``
    List, the ``<epoch>:<id>`` of those messages, newest first: the oldest
    beyond ``KEEP`` leave the hash.
``fido:account:<id>``
    Hash, the contract's per-account state (:mod:`fido_tx.redis.state`).
``fido:instance:<instance id>``
    Hash with a TTL: the heartbeat of one Fido process
    (:mod:`fido_tx.redis.heartbeat`).
``fido:sessions:<id>``
    List, the account's last sessions for the status page, newest first,
    bounded and expiring (:mod:`fido_tx.observe.history`).
``fido:imap:position:{<account>}:<mailbox>``
    Hash, one field: ``<uidvalidity>`` -> the highest UID handled
    (delivered and marked, or left flagged) by an IMAP account with
    ``select = "new"`` or ``start_from = "now"`` (:mod:`fido_tx.redis.positions`).
    Written after the marking; a new UIDVALIDITY replaces the field.
``fido:graph:delta:{<account>}:<folder>``
    String, a Graph account's delta link (``select = "new"``), written after
    a round's messages are delivered and marked (:mod:`fido_tx.sources.graph`).
``fido:graph:since:{<account>}:<folder>``
    String, the time an unread-listing Graph account with ``start_from =
    "now"`` started from (ISO 8601 UTC).
"""

ACCOUNT_PREFIX = "fido:account:"
INSTANCE_PREFIX = "fido:instance:"
SESSIONS_PREFIX = "fido:sessions:"
DEFAULT_STREAM = "fido:messages"
DEFAULT_LIST = "fido:messages:list"


def dedupe(account_id, mailbox, epoch):
    """The dedupe set of one (account, mailbox, epoch); ``epoch`` a string
    (an int is accepted: IMAP's UIDVALIDITY in decimal either way)."""
    return f"fido:uids:{{{account_id}}}:{epoch}:{mailbox}".encode("utf-8")


def identities(account_id, mailbox):
    """The identity hash and its order list of one (account, mailbox)."""
    return (f"fido:ident:{{{account_id}}}:{mailbox}".encode("utf-8"),
            f"fido:identq:{{{account_id}}}:{mailbox}".encode("utf-8"))


def account(account_id):
    return f"{ACCOUNT_PREFIX}{account_id}".encode("utf-8")


def instance(instance_id):
    return f"{INSTANCE_PREFIX}{instance_id}".encode("utf-8")


def sessions(account_id):
    return f"{SESSIONS_PREFIX}{account_id}".encode("utf-8")


#: a counter written before ``WAIT`` (``[redis] min_replicas``): a write that
#: is always replicated, so a replica that has it has every earlier write
REPLICATION_PROBE = b"fido:replication:probe"

#: ``[cluster] mode = "lease"``: the live instances (a sorted set) and one
#: lease per account (the account is the Redis Cluster hash tag)
CLUSTER = b"fido:cluster"


def lease(account_id):
    return f"fido:lease:{{{account_id}}}".encode("utf-8")


def imap_position(account_id, mailbox):
    return f"fido:imap:position:{{{account_id}}}:{mailbox}".encode("utf-8")


def graph_delta(account_id, folder):
    return f"fido:graph:delta:{{{account_id}}}:{folder}".encode("utf-8")


def graph_since(account_id, folder):
    return f"fido:graph:since:{{{account_id}}}:{folder}".encode("utf-8")
