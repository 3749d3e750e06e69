"""Lease overhead at 1,000 accounts: what ``[cluster] mode = "lease"`` costs.

Starts a local Redis, then runs the real balancer (``LeaseBalancer`` on
``RedisLeases`` over the shared ``RedisConnection``) for one instance holding
all 1,000 accounts, and for three instances sharing them, and prints per
balance tick: Redis commands (``INFO commandstats``), client CPU of the tick,
and the Redis server's CPU.  A session itself costs no Redis command for its
lease (the check is in memory): the whole cost is the tick, every
``lease_ttl / 3`` seconds.

    .venv/bin/python bench/lease.py [--accounts 1000] [--ticks 50]
"""

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from twisted.internet import defer, task  # noqa: E402

from fido_tx.config import RedisSettings  # noqa: E402
from fido_tx.redis.connection import RedisConnection  # noqa: E402
from fido_tx.redis.lease import RedisLeases  # noqa: E402
from fido_tx.schedule.cluster import LeaseBalancer  # noqa: E402
from tests.support import redis_server  # noqa: E402


def _cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _stats(client):
    calls, usec = 0, 0
    for line in client("INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_"):
            fields = dict(kv.split("=") for kv in line.split(":", 1)[1].split(","))
            calls += int(fields["calls"])
            usec += int(fields["usec"])
    return calls, usec


async def run(reactor, server, n_accounts, n_instances, ticks):
    accounts = [f"acct-{i:05d}" for i in range(n_accounts)]
    conns, balancers = [], []
    for i in range(n_instances):
        c = RedisConnection(reactor, RedisSettings(url=server.url))
        c.startService()
        conns.append(c)
        b = LeaseBalancer(reactor, RedisLeases(c, f"bench-{i}", 60), 60)
        b.set_accounts(accounts)
        balancers.append(b)
    while not all(c.connected for c in conns):
        await task.deferLater(reactor, 0.05, lambda: None)
    for _ in range(3):  # settle: every instance sees the others, leases taken
        for b in balancers:
            await b.tick()
    client = server.client()
    calls0, usec0 = _stats(client)
    cpu0 = _cpu()
    for _ in range(ticks):
        for b in balancers:
            await b.tick()
    cpu = _cpu() - cpu0
    calls, usec = _stats(client)
    held = sorted(len(b.held) for b in balancers)
    for c in conns:
        await c.stopService()
    n_ticks = ticks * n_instances
    print(f"{n_accounts} accounts, {n_instances} instance(s) holding {held}: per tick "
          f"{(calls - calls0) / n_ticks:.1f} Redis commands (script calls included), "
          f"client CPU {cpu / n_ticks * 1000:.2f} ms, Redis CPU {(usec - usec0) / n_ticks / 1000:.2f} ms; "
          f"per account and minute at lease_ttl 60 (3 ticks a minute): "
          f"{cpu / n_ticks * 3 / (n_accounts / n_instances) * 1e6:.1f} us client CPU")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--accounts", type=int, default=1000)
    p.add_argument("--ticks", type=int, default=50)
    args = p.parse_args()
    from twisted.internet import reactor

    server = redis_server.RedisServer(redis_server.find_redis_server()).start()

    async def both():
        try:
            for n in (1, 3):
                await run(reactor, server, args.accounts, n, args.ticks)
        finally:
            server.close()

    d = defer.ensureDeferred(both())
    d.addErrback(lambda f: f.printTraceback())
    d.addBoth(lambda _: reactor.stop())
    reactor.run()


if __name__ == "__main__":
    main()
