"""Whether Fido is making progress: the ``/healthz`` check, without the web.

Kept apart from :mod:`fido_tx.observe.web` so the check (and ``fido status``) does
not import twisted.web and prometheus_client in a daemon whose HTTP endpoint
is off: ~5 MiB and ~50 ms of start-up.

``check()`` is ``(True, {"status": "ok", "accounts": N, "running": R,
"redis": "connected", "lag": S, "paused": [...]})`` while Fido is making
progress and Redis is reachable, ``(False, {"status": "fail", "reason":
"...", ...})`` otherwise.  Making progress means: a session completed within
the last ``stall_after`` seconds, or no account has been overdue for that long
(nothing to do is healthy), or fetching is paused on purpose (the stream
backlog is over ``max_backlog``: the importer is behind, not Fido).
"""


def running_sessions(scheduler):
    """Sessions in progress: the scheduler's ``running_count`` (an
    :class:`~fido_tx.interfaces.ISchedulerView`; never ``Service.running``,
    which is a flag)."""
    return int(scheduler.running_count)


DEFAULT_STALL_AFTER = 300.0
#: seconds the stores may keep failing (every store an error, Redis
#: connected: a stream key of the wrong type, an out-of-memory Redis) before
#: the check fails
DEFAULT_STORE_FAIL_AFTER = 120.0

#: pause reasons that are not a failure of this instance (a delivery's
#: backlog: "backlog" for the default, "backlog:<name>" for the others)
BENIGN_PAUSES = frozenset(["backlog"])


def _benign(reason):
    return reason in BENIGN_PAUSES or reason.startswith("backlog:")


class Health:
    """Computes the health check from the scheduler and the store.

    :param scheduler: an :class:`~fido_tx.interfaces.ISchedulerView`.
    :param store: an :class:`~fido_tx.interfaces.IRedisHealth` (the shared
        Redis connection).
    :param stall_after: seconds without a completed session while accounts
        are overdue before the check fails.
    """

    def __init__(self, clock, scheduler, store, stall_after=DEFAULT_STALL_AFTER, status=None,
                 store_fail_after=DEFAULT_STORE_FAIL_AFTER):
        self._clock = clock
        self.scheduler = scheduler
        self.store = store
        self.stall_after = stall_after
        self.status = status
        self.store_fail_after = store_fail_after
        self._store_failing_since = None
        self._store_failure = ""

    def observe(self, account, result):
        """The scheduler's result observer: a ``redis`` result starts (or
        continues) a failing streak; a session that stored messages ends it."""
        if getattr(result, "dry_run", False):
            return
        if result.kind == "redis":
            if self._store_failing_since is None:
                self._store_failing_since = self._clock.seconds()
            self._store_failure = result.message
        elif result.ok and result.fetched > 0:
            self._store_failing_since = None

    def check(self):
        """``(healthy: bool, body: dict)``."""
        s = self.scheduler
        now = self._clock.seconds()
        connected = bool(self.store.connected)
        paused = sorted(s.paused_reasons)
        lag = float(s.lag())
        last = s.last_completion_at
        body = {
            "status": "ok",
            "accounts": len(s.accounts),
            "running": running_sessions(s),
            "redis": "connected" if connected else "disconnected",
            "lag": round(lag, 3),
            "paused": paused,
            "last_completion_age": None if last is None else round(now - last, 3),
        }
        reason = None
        failing = self._store_failing_since
        if not connected:
            reason = "Redis is not connected"
        elif failing is not None and now - failing > self.store_fail_after:
            reason = (f"every store has failed for {now - failing:.0f} s (Redis is connected "
                      f"but refuses the writes): {self._store_failure}")
        elif lag > self.stall_after and not any(_benign(r) for r in paused):
            recent = last is not None and now - last <= self.stall_after
            if not recent:
                since = "never" if last is None else f"{now - last:.0f} s ago"
                reason = (
                    f"stalled: an account has been overdue for {lag:.0f} s and the last "
                    f"session completed {since}"
                )
                if paused:
                    reason += f" (paused: {', '.join(paused)})"
        if reason is not None:
            body["status"] = "fail"
            body["reason"] = reason
        return reason is None, body
