"""The per-account hash ``fido:account:<id>`` (the contract's fields).

``state`` (``ok``/``error``; other modules may set more), ``last_attempt_at``,
``last_success_at``, ``last_error``, ``last_error_kind``, ``last_error_at``
(an addition: when ``last_error`` happened); ``fetched_total`` is counted by
the sinks' scripts, so it counts exactly the messages delivered.  Every write
is best effort: a Redis outage is logged (once, by the connection) and never
fails a session.

With a session history (:class:`~fido_tx.observe.history.SessionLog`,
:attr:`AccountState.history`), a session's hash fields and its history
entry go in ONE script call (``HSET``, ``LPUSH``, ``LTRIM``, ``EXPIRE``):
one Redis command, one answer, one deadline per session instead of two.

Write-behind (``delay`` > 0, as the daemon runs it): a session's write is
held up to ``delay`` seconds and sent with every other write of that window
in ONE reactor turn, so the commands go out in one ``send`` and their
answers come back together: one wake-up of the process for a window's
sessions instead of one per session (~0.6 ms of CPU each on this VM,
``bench/wakeups.py``), for a hash that is at most ``delay`` late.  Each
session is still its own command (``HSET`` or the script): nothing is
merged across accounts.  The connection sends what is held before it
closes (:meth:`~fido_tx.redis.connection.RedisConnection.add_stop_hook`).
"""

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from fido_tx.interfaces import IAccountState
from fido_tx.redis import keys
from fido_tx.scrub import scrub
from fido_tx.timefmt import utc_now_iso

log = Logger(namespace="fido_tx.redis.state")

#: seconds a session's write waits for the others of its window (the daemon's)
WRITE_BEHIND = 0.05


def hash_args(mapping):
    """``[field, value, ...]`` for ``HSET``: values as bytes."""
    args = []
    for name, value in dict(mapping or {}).items():
        args.append(name)
        args.append(value if isinstance(value, bytes) else str(value).encode("utf-8"))
    return args


def best_effort(connection, what, d):
    """Fire True when ``d`` succeeds, False (logged: warn while connected,
    debug while the outage is already logged) when it fails."""

    def failed(failure):
        level = log.warn if connection.connected else log.debug
        level("{what} not written: {error}", what=what, error=failure.getErrorMessage())
        return False

    return d.addCallbacks(lambda _: True, failed)


@implementer(IAccountState)
class AccountState:
    """Writes ``fido:account:<id>`` on a shared
    :class:`~fido_tx.redis.connection.RedisConnection`."""

    def __init__(self, connection, history=None, clock=None, delay=0.0):
        self._connection = connection
        #: the :class:`~fido_tx.observe.history.SessionLog` whose entries
        #: are written with the session's fields (or None)
        self.history = history
        self._session_script = connection.script(_SESSION)
        self._clock = clock
        self._delay = delay if clock is not None else 0.0
        self._held = []
        self._timer = None
        if self._delay:
            connection.add_stop_hook(self.flush)

    def _send(self, write):
        """``write() -> Deferred`` now, or with the window's other writes."""
        if not self._delay:
            return write()
        d = defer.Deferred()
        self._held.append((write, d))
        if self._timer is None:
            self._timer = self._clock.callLater(self._delay, self.flush)
        return d

    def flush(self):
        """Send every held write now, in this reactor turn."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        held, self._held = self._held, []
        for write, d in held:
            write().chainDeferred(d)

    def update_account(self, account_id, fields):
        """``HSET`` the fields; fires True when written, False when not."""
        if not fields:
            return defer.succeed(True)
        args = hash_args(fields)
        return self._send(lambda: best_effort(
            self._connection, f"state of account {account_id}",
            self._connection.execute(b"HSET", keys.account(account_id), *args)))

    def record_session(self, result, started_at_iso=None, extra=None, account=None):
        """Keep the hash current after a session; a dry run writes nothing.

        ``last_attempt_at`` is when the session started (``started_at_iso``,
        else now); a success sets ``state=ok`` and ``last_success_at``, a
        failure ``state=error``, ``last_error``, ``last_error_kind`` and
        ``last_error_at`` (the last error is kept after a success, for
        history).  ``extra`` goes into the same ``HSET`` (one round trip),
        and so does the session's history entry when there is a
        :attr:`history` and the ``account`` is given.
        """
        if result.dry_run:
            return defer.succeed(True)
        now = utc_now_iso()
        fields = {"last_attempt_at": started_at_iso or now}
        if result.ok:
            fields["state"] = "ok"
            fields["last_success_at"] = now
        else:
            fields["state"] = "error"
            # the session scrubbed it with the account's secrets; the
            # patterns once more for whatever a library wrote into it
            fields["last_error"] = scrub(result.message)
            fields["last_error_kind"] = result.kind
            fields["last_error_at"] = now
        if extra:
            fields.update(extra)
        entry = None
        if self.history is not None and account is not None:
            entry = self.history.entry_args(account, result)
        if entry is None:
            return self.update_account(result.account_id, fields)
        key, args = entry
        script_keys = (keys.account(result.account_id), key)
        args = (*args, *hash_args(fields))
        return self._send(lambda: best_effort(
            self._connection, f"state of account {result.account_id}",
            self._session_script.run(script_keys, args, what="session state")))


def push_kept_lua(key):
    """Lua pushing a session entry (ARGV[1]) onto the list ``key`` (say
    ``"KEYS[2]"``), keeping its first ARGV[2] + 1 entries and expiring it
    ARGV[3] s after: LTRIM only once the list is longer than kept (LPUSH
    says its length).  Shared by this module's session script and
    :mod:`fido_tx.observe.history`'s."""
    return (f"if redis.call('LPUSH', {key}, ARGV[1]) > tonumber(ARGV[2]) + 1 then\n"
            f"  redis.call('LTRIM', {key}, 0, tonumber(ARGV[2]))\n"
            f"end\n"
            f"redis.call('EXPIRE', {key}, tonumber(ARGV[3]))\n")


#: KEYS[1] the account hash, KEYS[2] its session list; ARGV: the history
#: entry, the last index kept, the list's ttl, then the hash's field/value pairs
_SESSION = ("redis.call('HSET', KEYS[1], unpack(ARGV, 4))\n"
            + push_kept_lua("KEYS[2]") + "return 1\n")
