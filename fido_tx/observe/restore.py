"""The tracker starts from the account hashes: reports survive a restart.

:class:`RestoreGate` stands between the scheduler and the
:class:`~fido_tx.observe.status.StatusTracker`: it is the result observer
(``scheduler.add_result_observer(gate.record)``).  Accounts given to
:meth:`RestoreGate.add` (all of them at start, the added ones on a reload)
are read back from ``fido:account:<id>`` with
:class:`~fido_tx.observe.history.AccountStateReader` and handed to
:meth:`StatusTracker.restore`; a session result for an account still being
read waits for its hash (the tracker then compares it with the state before
the restart, not with "new").  When Redis cannot be read the accounts stay
waiting and the read is retried when the connection comes back
(:meth:`redis_state`, a connection observer); sessions do not run while
Redis is down, so few results wait.  Results waiting for longer than
``give_up_after`` seconds are let through as if the account were new (a
report too many is better than a report lost).
"""

from twisted.internet import defer
from twisted.logger import Logger

log = Logger(namespace="fido_tx.observe.restore")


class RestoreGate:
    def __init__(self, clock, tracker, reader, give_up_after=300.0, connected=True):
        """``connected=False``: read nothing before :meth:`redis_state` says
        Redis is up (the daemon starts before its Redis connection does)."""
        self._connected = connected
        self._clock = clock
        self._tracker = tracker
        self._reader = reader
        self.give_up_after = give_up_after
        #: account id -> results waiting for the account's hash
        self._waiting = {}
        self._reading = None
        self._timer = None

    @property
    def pending(self):
        """Ids of the accounts whose hash has not been read yet."""
        return frozenset(self._waiting)

    def add(self, account_ids):
        """Read these accounts' hashes before their first result counts."""
        for account_id in account_ids:
            if self._tracker.state_of(account_id) is None:
                self._waiting.setdefault(account_id, [])
        if self._waiting and self._timer is None:
            self._timer = self._clock.callLater(self.give_up_after, self._give_up)
        return self.read()

    def forget(self, account_id):
        self._waiting.pop(account_id, None)

    def record(self, account, result):
        """The scheduler's result observer."""
        account_id = result.account_id or getattr(account, "id", str(account))
        waiting = self._waiting.get(account_id)
        if waiting is None:
            self._tracker.record(account, result)
        else:
            waiting.append((account, result))

    def redis_state(self, connected):
        """A connection observer: Redis is back, read what is still waiting."""
        self._connected = connected
        if connected:
            self.read()

    def read(self):
        """Read the waiting accounts (one read at a time); never errbacks."""
        if self._reading is not None or not self._waiting or not self._connected:
            return self._reading or defer.succeed(None)
        ids = list(self._waiting)
        again = []
        self._reading = d = self._reader.read(ids)

        def got(hashes):
            again.append(True)
            restored = 0
            for account_id in ids:
                if account_id not in self._waiting:
                    continue  # removed meanwhile
                if self._tracker.restore(account_id, hashes.get(account_id) or {}):
                    restored += 1
                self._release(account_id)
            log.info(
                "status of {count} account(s) read back from Redis ({restored} known)",
                count=len(ids), restored=restored,
            )

        def failed(failure):
            log.info(
                "account states not read from Redis yet ({error}); retrying when it is back",
                error=failure.getErrorMessage(),
            )

        def done(_):
            self._reading = None
            if again and self._waiting:
                self.read()  # accounts added while this read was running
                return
            if not self._waiting and self._timer is not None:
                if self._timer.active():
                    self._timer.cancel()
                self._timer = None

        d.addCallbacks(got, failed).addBoth(done)
        return d

    def _release(self, account_id):
        for account, result in self._waiting.pop(account_id, ()):
            self._tracker.record(account, result)

    def _give_up(self):
        self._timer = None
        if self._waiting:
            log.warn(
                "{count} account(s) still without their state from Redis after {seconds:g} s: "
                "treating them as new (a state change may be reported again)",
                count=len(self._waiting), seconds=self.give_up_after,
            )
        for account_id in list(self._waiting):
            self._release(account_id)
