"""What the status page shows, computed from memory (no Redis per request).

:class:`StatusView` joins the scheduler's account set (source, delivery), the
:class:`~fido_tx.observe.status.StatusTracker`'s states (restored from Redis at
start, then kept current by every session), the per-minute throughput, the
default delivery's last known queue length and the heartbeats read by
:class:`~fido_tx.observe.history.InstanceWatch`.  Only the account page reads
Redis (its recent sessions: one ``LRANGE``).

Order: failing accounts first (longest failing at the top), then accounts
not run yet, then working ones, each by id.  The order is cached and
recomputed only when the tracker's ``version`` (bumped on every change of
state) or the account set changed, so most requests only slice.
"""

import attr

from fido_tx.observe.status import OK

NEW = "new"
FAILING = "failing"
PER_PAGE = 100


@attr.s(frozen=True, slots=True, auto_attribs=True)
class AccountRow:
    id: str
    state: str
    source: str = ""
    delivery: str = ""
    connection: str = "polled"
    last_success_at: str = ""
    failing_since: float | None = None
    last_error: str = ""
    last_error_at: str = ""
    fetched_total: int = 0
    failures: int = 0

    @property
    def failing(self):
        return self.state not in (OK, NEW)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Page:
    rows: tuple
    #: accounts matching the filter
    matching: int
    page: int
    pages: int
    #: {state: count} over all accounts ("new" = not run yet)
    counts: dict


class StatusView:
    def __init__(self, clock, tracker, scheduler=None, redis=None, backlog=None,
                 throughput=None, instances=None, sessions=None):
        self._clock = clock
        self.tracker = tracker
        self.scheduler = scheduler
        #: ``IRedisHealth`` (``connected``) and ``IBacklog`` (``last_length``)
        self.redis = redis
        self.backlog_source = backlog
        self.throughput = throughput
        self.instances = instances
        self.sessions = sessions
        self._order = None
        self._order_key = None
        self._ids = self._sorted = None

    # -- accounts ----------------------------------------------------------

    def _accounts(self):
        found = getattr(self.scheduler, "accounts", None)
        return found if isinstance(found, dict) else {}

    def row(self, account_id, account=None, status=None):
        """The :class:`AccountRow` of one account (None when unknown)."""
        if account is None:
            account = self._accounts().get(account_id)
        if status is None:
            status = self.tracker.state_of(account_id)
        if account is None and status is None:
            return None
        if status is None:
            return AccountRow(
                id=account_id, state=NEW, source=getattr(account, "source", ""),
                delivery=getattr(account, "delivery", ""),
                connection=self.tracker.connection_of(account_id),
            )
        return AccountRow(
            id=account_id,
            state=status.state,
            source=getattr(account, "source", "") if account is not None else "",
            delivery=getattr(account, "delivery", "") if account is not None else "",
            connection=self.tracker.connection_of(account_id),
            last_success_at=status.last_success_at,
            failing_since=status.failing_since,
            last_error=status.last_message,
            last_error_at=status.last_error_at,
            fetched_total=status.fetched_total,
            failures=status.failures,
        )

    def _sorted_ids(self, accounts):
        """``(ids in page order, {state: count}, {filter: ids})``, cached
        while neither a state nor the account set changed.

        The ids are sorted once per change of the account set; a change of
        state only splits them again, with set operations and one
        comprehension (the tracker keeps the set of failing ids), and sorts
        the failing ones by when they began failing.
        """
        states = self.tracker.accounts()
        key = (getattr(self.tracker, "version", None), frozenset(accounts))
        if self._order is not None and key == self._order_key and key[0] is not None:
            return self._order
        ids = key[1] | states.keys()
        if ids != self._ids:  # the set changed: sort it again
            self._ids, self._sorted = ids, sorted(ids)
        now = self._clock.seconds()
        failing_set = self.tracker.failing_ids() & ids
        new_set = ids - states.keys()
        failing = sorted(
            failing_set,
            key=lambda i: (states[i].failing_since or now, i),
        )
        new = [i for i in self._sorted if i in new_set] if new_set else []
        skip = failing_set | new_set
        ok = [i for i in self._sorted if i not in skip] if skip else list(self._sorted)
        by_state = {FAILING: failing, NEW: new, OK: ok}
        counts = {OK: len(ok), NEW: len(new)}
        for account_id in failing:
            state = states[account_id].state
            counts[state] = counts.get(state, 0) + 1
            by_state.setdefault(state, []).append(account_id)
        self._order = (failing + new + ok, counts, by_state)
        self._order_key = key
        return self._order

    def page(self, state="", query="", page=1, per_page=PER_PAGE):
        """One :class:`Page` of accounts, filtered by ``state`` ("", "failing",
        "ok", "new" or an error kind) and ``query`` (part of the id)."""
        accounts = self._accounts()  # the scheduler's is a copy: take it once
        order, counts, by_state = self._sorted_ids(accounts)
        picked = by_state.get(state, []) if state else order
        if query:
            query = query.lower()
            picked = [account_id for account_id in picked if query in account_id.lower()]
        pages = max(1, -(-len(picked) // per_page))
        page = min(max(1, page), pages)
        rows = []
        for account_id in picked[(page - 1) * per_page: page * per_page]:
            row = self.row(account_id, accounts.get(account_id))
            if row is not None:
                rows.append(row)
        return Page(rows=tuple(rows), matching=len(picked), page=page, pages=pages,
                    counts={k: v for k, v in counts.items() if v or k in (OK, NEW)})

    # -- the instance --------------------------------------------------------

    def backlog(self):
        return getattr(self.backlog_source, "last_length", None)

    def redis_connected(self):
        return bool(getattr(self.redis, "connected", False))

    def per_minute(self):
        return self.throughput.series() if self.throughput is not None else []

    def alive(self):
        return list(getattr(self.instances, "instances", ()) or ())

    def global_problems(self):
        return self.tracker.global_problems

    def now(self):
        return self._clock.seconds()
