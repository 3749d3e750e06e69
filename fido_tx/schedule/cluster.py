"""Which instance fetches which account: leases balanced by rendezvous hashing.

With ``[cluster] mode = "lease"`` every instance loads the whole accounts
file.  Each balance tick (every ``lease_ttl / 3`` seconds) an instance:

1. announces itself and reads the instances alive (:mod:`fido_tx.redis.lease`);
2. computes the *owner* of every account by rendezvous (highest random
   weight) hashing over the live instances: deterministic, so every
   instance agrees without talking; about ``1/n`` of the accounts each; and
   when an instance joins or leaves only the accounts it gains or loses
   move, so there is no thrashing;
3. releases the leases it holds on accounts it no longer owns (only once no
   session runs for them: never two sessions for one account), renews the
   others (a lease found taken is *lost*: ``on_lost`` ends its session or
   held connection), and takes the free leases of the accounts it owns.

An account whose owner died is taken over once that owner's membership and
its lease have expired: within ``lease_ttl`` plus one tick.  If Redis cannot
be reached for longer than ``lease_ttl``, every lease is given up locally
(they may have expired and been taken): fetching was paused anyway.  Were a
lease to expire during a Redis outage while a session still ran, the dedupe
record still makes a second delivery of the same message impossible.
"""

import hashlib

from twisted.application import service
from twisted.logger import Logger

_log = Logger()


def _weight(instance_id, account_id):
    digest = hashlib.blake2b(f"{instance_id}\0{account_id}".encode("utf-8"),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(account_id, members):
    """The live instance that should hold ``account_id`` (``None``: none alive)."""
    if not members:
        return None
    return max(members, key=lambda m: (_weight(m, account_id), m))


class LeaseBalancer(service.Service):
    """Keeps this instance's leases: its share of the accounts, no more.

    :param leases: a :class:`fido_tx.redis.lease.RedisLeases` (or
        :class:`fido_tx.testing.MemoryLeases`).
    :param is_busy: ``f(account_id) -> bool``: a session runs for it now.
    :param on_lost: ``f(account_id)``: a lease was lost; stop its session.
    :param on_change: ``f(gained)`` after a tick that took new leases (the
        scheduler polls those soon).
    """

    def __init__(self, clock, leases, ttl, is_busy=lambda a: False, on_lost=lambda a: None,
                 on_change=lambda gained: None):
        self.clock = clock
        self.leases = leases
        self.ttl = ttl
        self.interval = ttl / 3.0
        self.is_busy = is_busy
        self.on_lost = on_lost
        self.on_change = on_change
        self.accounts = frozenset()
        self.held = set()
        self.members = ()
        self._last_ok = None
        self._timer = None
        self._ticking = None

    @property
    def instance_id(self):
        return self.leases.instance_id

    def holds(self, account_id):
        return account_id in self.held

    def set_accounts(self, account_ids):
        self.accounts = frozenset(account_ids)

    # -- the tick ------------------------------------------------------------------

    async def tick(self):
        before = set(self.held)
        try:
            await self._balance()
        except Exception as e:  # Redis unreachable: keep the leases we had, for a while
            self._redis_failed(e)
        else:
            self._last_ok = self.clock.seconds()
        gained = self.held - before
        if gained:
            self.on_change(gained)

    async def _balance(self):
        members = await self.leases.members()
        if self.instance_id not in members:
            members = sorted(set(members) | {self.instance_id})
        if tuple(members) != self.members:
            _log.info("cluster: {n} instances alive ({members})", n=len(members),
                      members=", ".join(members))
            self.members = tuple(members)
        mine = {a for a in self.accounts if owner(a, members) == self.instance_id}
        give_up = {a for a in self.held if a not in mine and not self.is_busy(a)}
        if give_up:
            await self.leases.release(give_up)
            self.held -= give_up
        keep = set(self.held)
        still = await self.leases.renew(keep)
        for lost in sorted(keep - still):
            _log.warn("cluster: lease of {account_id} lost to another instance; "
                      "its session is stopped", account_id=lost)
            self.held.discard(lost)
            self.on_lost(lost)
        want = mine - self.held
        if want:
            self.held |= await self.leases.acquire(want)

    def _redis_failed(self, error):
        now = self.clock.seconds()
        if self._last_ok is None or now - self._last_ok < self.ttl or not self.held:
            return
        _log.warn("cluster: Redis unreachable for {s:.0f} s, longer than lease_ttl: giving "
                  "up {n} leases (another instance may have taken them)",
                  s=now - self._last_ok, n=len(self.held))
        lost, self.held = sorted(self.held), set()
        for account_id in lost:
            self.on_lost(account_id)

    # -- service -------------------------------------------------------------------

    def kick(self):
        """Tick now (Redis just came up) unless a tick is under way."""
        if self.running and self._ticking is None:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._run()

    def _run(self):
        self._timer = None
        from twisted.internet import defer

        self._ticking = defer.ensureDeferred(self.tick())

        def again(_):
            self._ticking = None
            if self.running:
                self._timer = self.clock.callLater(self.interval, self._run)

        self._ticking.addBoth(again)

    def startService(self):
        super().startService()
        self._run()

    def stopService(self):
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        held, self.held = sorted(self.held), set()

        def failed(f):
            _log.warn("cluster: could not release {n} leases at stop ({why}); they expire "
                      "in lease_ttl", n=len(held), why=f.getErrorMessage())

        d = self.leases.release(held, leave=True)
        d.addErrback(failed)
        return d
