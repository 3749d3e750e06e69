"""What Fido remembers in Redis for the operator, behind one tiny object.

Everything here talks to Redis only through ``execute(*args) -> Deferred``
(one command; bytes/str/int arguments; errbacks on failure), the shape of
``RedisConnection.execute``.  The composition root hands it in.

:class:`AccountStateReader`
    Reads the account hashes ``fido:account:<id>`` back at start and when
    accounts are added, so :class:`~fido_tx.observe.status.StatusTracker`
    reports real changes only across restarts.  ``HGETALL`` per account,
    sent ``batch`` at a time on the one connection (pipelined), batch after
    batch: bounded memory and bounded in-flight commands, never a ``SCAN``.

:class:`SessionLog`
    The last ``keep`` sessions of each account in ``fido:sessions:<id>``
    (``LPUSH``, ``LTRIM``, and ``EXPIRE`` after ``ttl`` seconds so the history
    of a removed account goes away by itself), newest first, one compact JSON
    object per session (about 110 bytes: 50 sessions of 10,000 accounts take
    some 55 MB of Redis; ``[http] recent_sessions`` sets ``keep``, 0 = none)::

        {"t": "2026-11-29T14:01:02Z", "kind": "ok", "fetched": 3, "bytes": 5120,
         "marked": 3, "seconds": 0.41, "error": ""}

    written by a scheduler result observer; the error text is the session's
    message (scrubbed by the session) with the account's own secrets blanked
    once more.  Best-effort: a write that fails is logged at debug level.

:class:`InstanceWatch`
    The heartbeats ``fido:instance:*`` of the live instances, re-read every
    ``interval`` seconds (``SCAN MATCH`` then ``HGETALL``), so the status page
    shows them without touching Redis per request.
"""

import json

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from fido_tx.observe.report import iso_utc
from fido_tx.redis import keys
from fido_tx.redis.state import push_kept_lua

log = Logger(namespace="fido_tx.observe.history")

KEEP_SESSIONS = 50
#: a removed account's history expires a month after its last session
SESSIONS_TTL = 30 * 86400
READ_BATCH = 500


def _text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def pairs_to_dict(reply):
    """An ``HGETALL`` reply (flat list, or a dict) as ``{str: str}``."""
    if isinstance(reply, dict):
        return {_text(k): _text(v) for k, v in reply.items()}
    reply = list(reply or ())
    return {_text(k): _text(v) for k, v in zip(reply[::2], reply[1::2])}


class AccountStateReader:
    """``read(ids) -> Deferred[{id: {field: value}}]`` from the account hashes.

    An account without a hash maps to ``{}``; a key Redis refuses (wrong
    type) too, with a warning.  A failure of the connection errbacks the
    whole read (the caller retries once Redis is back).
    """

    def __init__(self, execute, batch=READ_BATCH):
        self._execute = execute
        self.batch = batch

    @defer.inlineCallbacks
    def read(self, account_ids):
        ids = list(account_ids)
        out = {}
        for start in range(0, len(ids), self.batch):
            chunk = ids[start:start + self.batch]
            sent = [
                self._execute("HGETALL", keys.account(account_id)).addCallbacks(
                    lambda reply: (True, reply), lambda f: (False, f)
                )
                for account_id in chunk
            ]
            replies = yield defer.gatherResults(sent)
            for account_id, (ok, reply) in zip(chunk, replies):
                if ok:
                    out[account_id] = pairs_to_dict(reply)
                elif _is_connection_failure(reply):
                    reply.raiseException()
                else:
                    log.warn(
                        "{account_id}: cannot read its state from Redis ({error}); "
                        "starting it as new",
                        account_id=account_id, error=reply.getErrorMessage(),
                    )
                    out[account_id] = {}
        return out


def _is_connection_failure(failure):
    """A refused command (wrong type…) is per key; anything else is the connection."""
    text = failure.getErrorMessage()
    return not ("refused" in text or "WRONGTYPE" in text)


def session_entry(result, now_iso, secrets=()):
    """The compact JSON text of one session in ``fido:sessions:<id>``."""
    error = result.message or ""
    for secret in secrets:
        if secret:
            error = error.replace(secret, "***")
    entry = {
        "t": now_iso,
        "kind": "ok" if result.ok else result.kind,
        "fetched": result.fetched,
        "bytes": result.bytes,
        "marked": result.marked,
        "seconds": round(result.seconds, 3),
        "error": "" if result.ok else error,
    }
    return _ENCODE(entry)


#: one encoder for every entry: ``json.dumps`` with options builds a new
#: ``JSONEncoder`` per call (a fifth of an empty poll's history work)
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _secrets(account):
    found = [getattr(account, "password", "")]
    oauth = getattr(account, "oauth", None)
    if oauth is not None:
        found += [getattr(oauth, "client_secret", ""), getattr(oauth, "refresh_token", "")]
    return tuple(s for s in found if s)


#: KEYS[1] the account's session list; ARGV: entry, last index kept, ttl
_RECORD = push_kept_lua("KEYS[1]") + "return 1\n"


class SessionLog:
    """The recent sessions of each account, bounded, in Redis."""

    def __init__(self, clock, execute, keep=KEEP_SESSIONS, ttl=SESSIONS_TTL, script=None):
        self._clock = clock
        self._execute = execute
        self.keep = keep
        self.ttl = ttl
        # with a connection's ``script`` the entry goes by EVALSHA (loaded on
        # every new connection), not the script's text at every session
        self._script = script(_RECORD) if script is not None else None

    def entry_args(self, account, result):
        """``(key, (entry, last index kept, ttl))`` of ``result``'s entry, or
        ``None`` when it is not kept (a dry run, ``keep = 0``).  The account
        state writes it with the session's hash fields in one script
        (:class:`fido_tx.redis.state.AccountState`)."""
        if result.dry_run or self.keep <= 0:
            return None
        account_id = result.account_id or getattr(account, "id", str(account))
        # the secrets are looked up only for an error text to scrub
        secrets = _secrets(account) if result.message and not result.ok else ()
        entry = session_entry(result, iso_utc(self._clock.seconds()), secrets)
        return keys.sessions(account_id), (entry, self.keep - 1, int(self.ttl))

    def record(self, account, result):
        """The scheduler's result observer, when no account state writes
        the entries; dry-run sessions are not kept."""
        found = self.entry_args(account, result)
        if found is None:
            return defer.succeed(False)
        account_id = result.account_id or getattr(account, "id", str(account))
        key, args = found
        # one round trip: three commands a session were most of an empty
        # poll's Redis work
        if self._script is not None:
            d = self._script.run((key,), args, what="session history")
        else:
            d = self._execute("EVAL", _RECORD, 1, key, *args)

        def failed(failure):
            log.debug("{account_id}: session history not written: {error}",
                      account_id=account_id, error=failure.value)
            return False

        return d.addCallbacks(lambda _: True, failed)

    def recent(self, account_id, count=KEEP_SESSIONS):
        """``Deferred[list of dicts]``, newest first (bad entries skipped)."""
        d = self._execute("LRANGE", keys.sessions(account_id), 0, max(0, count - 1))

        def parse(reply):
            out = []
            for raw in reply or ():
                try:
                    entry = json.loads(_text(raw))
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    out.append(entry)
            return out

        return d.addCallback(parse)


class InstanceWatch(Service):
    """Keeps :attr:`instances` (list of dicts, sorted by id) fresh."""

    def __init__(self, clock, execute, interval=15.0, scan_count=1000):
        self._clock = clock
        self._execute = execute
        self.interval = interval
        self.scan_count = scan_count
        self.instances = []
        self.read_at = None
        self._loop = task.LoopingCall(self.refresh)
        self._loop.clock = clock

    def startService(self):
        super().startService()
        self._loop.start(self.interval, now=True)

    def stopService(self):
        if self._loop.running:
            self._loop.stop()
        return super().stopService()

    @defer.inlineCallbacks
    def _read(self):
        found_keys, cursor = [], "0"
        while True:
            reply = yield self._execute(
                "SCAN", cursor, "MATCH", keys.INSTANCE_PREFIX + "*", "COUNT", self.scan_count
            )
            cursor = _text(reply[0])
            found_keys.extend(_text(k) for k in reply[1])
            if cursor == "0":
                break
        hashes = yield defer.gatherResults([self._execute("HGETALL", k) for k in found_keys])
        found = []
        for key, reply in zip(found_keys, hashes):
            fields = pairs_to_dict(reply)
            if fields:
                fields["id"] = key[len(keys.INSTANCE_PREFIX):]
                found.append(fields)
        return sorted(found, key=lambda f: f["id"])

    def refresh(self):
        """Re-read the heartbeats; never errbacks (keeps the last list)."""

        def got(found):
            self.instances = found
            self.read_at = self._clock.seconds()

        def failed(failure):
            log.debug("instances not read: {error}", error=failure.value)

        return self._read().addCallbacks(got, failed)
