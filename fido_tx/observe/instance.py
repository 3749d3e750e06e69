"""Problems of the whole Fido instance (account ``"*"``): Redis down, backlog over max_backlog, the accounts file.

Each problem has a key and is reported once when it starts and once
(``recovered``) when it ends.  Redis unreachable is reported only after
``redis_down_after`` seconds (a restart or failover is not worth a report);
a ``redis`` session result while the connection says it is up (an
out-of-memory Redis) raises the same problem, and the next good session
clears it.
"""

from fido_tx import errors
from fido_tx.observe.transitions import debug_text
from fido_tx.timefmt import iso_utc

__all__ = ["GLOBAL", "InstanceProblems"]

#: the ``account`` of reports about the whole Fido instance
GLOBAL = "*"


class InstanceProblems:
    """The instance-wide problems active now, and their reports.

    :param outbox: a :class:`~fido_tx.observe.outbox.ReportOutbox`.
    :param redis: an :class:`~fido_tx.interfaces.IRedisHealth`; None counts
        as connected.
    """

    def __init__(self, clock, outbox, log, redis=None, redis_down_after=30.0, dry_run=False):
        self._clock = clock
        self._outbox = outbox
        self.log = log
        self._redis = redis
        self.redis_down_after = redis_down_after
        self.dry_run = dry_run
        #: key -> (kind, message, since) of the problems reported
        self.active = {}
        self._redis_timer = None

    def report(self, kind, message, debug="", key=None):
        """Report a problem (account ``"*"``) once per ``key`` (default:
        ``kind``) while it lasts.  True when a report was sent (or would be,
        in dry run)."""
        key = key or kind
        if key in self.active:
            return False
        now = self._clock.seconds()
        self.active[key] = (kind, message, now)
        self.log.warn(
            "{account_id}: {kind} problem: {error}",
            account_id=GLOBAL, kind=kind, error=message, outcome=kind,
        )
        self._outbox.send(GLOBAL, kind, message, debug_text(debug, "", now), now,
                          self.dry_run, ())
        return True

    def clear(self, key, message=""):
        """The problem ``key`` is over: report ``recovered`` (once)."""
        problem = self.active.pop(key, None)
        if problem is None:
            return False
        kind, old_message, since = problem
        now = self._clock.seconds()
        text = message or f"recovered from {kind}: {old_message}"
        self.log.info(
            "{account_id}: {text}", account_id=GLOBAL, text=text, kind=errors.RECOVERED,
            outcome=errors.RECOVERED,
        )
        self._outbox.send(
            GLOBAL, errors.RECOVERED, text,
            f"problem began: {iso_utc(since)} ({now - since:.0f} s)", now, self.dry_run, (),
        )
        return True

    # -- Redis

    def redis_state(self, connected):
        """The connection observer: report Redis down after a grace period."""
        if connected:
            self.stop()
            self.clear("redis", "Redis is reachable again")
            return
        if "redis" in self.active or self._redis_timer is not None:
            return
        if self.redis_down_after <= 0:
            self._redis_down()
        else:
            self._redis_timer = self._clock.callLater(self.redis_down_after, self._redis_down)

    def _redis_down(self):
        self._redis_timer = None
        self.report(
            errors.REDIS,
            f"Redis has been unreachable for {self.redis_down_after:g} s; fetching is paused",
            debug=str(self._redis.last_error or "") if self._redis is not None else "",
        )

    def stop(self):
        """A pending "Redis unreachable" report is not sent."""
        if self._redis_timer is not None and self._redis_timer.active():
            self._redis_timer.cancel()
        self._redis_timer = None

    def redis_connected(self):
        return self._redis is None or self._redis.connected

    def session_result(self, result, dry):
        """A ``redis`` result the connection state does not show raises the
        problem; a good session while the connection is up clears it."""
        if result.kind == errors.REDIS:
            if self.redis_connected():
                self.report(errors.REDIS, result.message, debug=result.debug)
        elif result.ok and not dry:
            if "redis" in self.active and self._redis_timer is None and self.redis_connected():
                self.clear("redis", "Redis accepts writes again")

    # -- backlog

    def backlog_state(self, paused, length):
        """Backpressure's ``on_change(paused, length)``."""
        if paused:
            self.report(
                errors.REDIS,
                f"the Redis stream holds {length} entries, over max_backlog: fetching "
                "is paused until the importer catches up",
                key="backlog",
            )
        else:
            self.clear(
                "backlog", f"the Redis stream is down to {length} entries: fetching resumed"
            )
