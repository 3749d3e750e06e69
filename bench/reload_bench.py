"""How long a reload of a large accounts file blocks the reactor while
sessions run (issue: live accounts).

Runs the real daemon service in this process against the mock IMAP server
(each session held open ~1 s by a slow SELECT, so ``--workers`` sessions are
always running) and a real Redis, then rewrites the accounts file
(``--accounts`` entries, one changed, one added) ``--reloads`` times.  A
LoopingCall every 5 ms records how late it runs: the largest lateness around
each reload is the reactor stall.  Prints the stalls and the reload log's own
timing.

    .venv/bin/python bench/reload_bench.py --accounts 10000 --workers 100
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, reactor, task  # noqa: E402

from fido_tx import service  # noqa: E402
from tests import daemon  # noqa: E402
from tests.support.mockimap import Behaviour, Fault, MockIMAPServer, MockMailbox  # noqa: E402
from tests.support.redis_server import RedisServer, find_redis_server  # noqa: E402


def accounts(port, n, version):
    out = [{"id": f"acct{k:05d}", "host": "127.0.0.1", "port": port, "security": "none",
            "username": f"acct{k:05d}", "password": "pw"} for k in range(n)]
    out[0]["mailbox"] = f"INBOX.v{version}"  # one changed account per reload
    out.append({"id": f"new{version}", "host": "127.0.0.1", "port": port, "security": "none",
                "username": "acct00001", "password": "pw"})
    return out


class StallProbe:
    def __init__(self, interval=0.005):
        self.interval = interval
        self.last = None
        self.samples = []  # (time, lateness)
        self.loop = task.LoopingCall(self._tick)

    def _tick(self):
        now = time.perf_counter()
        if self.last is not None:
            self.samples.append((now, now - self.last - self.interval))
        self.last = now

    def worst_between(self, start, end):
        late = [lat for t, lat in self.samples if start <= t <= end]
        return max(late) if late else 0.0


@defer.inlineCallbacks
def run(args):
    redis = RedisServer(find_redis_server()).start()
    imap = MockIMAPServer(reactor, account_factory=lambda name: MockMailbox("pw", []),
                          keep_records=False)
    imap.script(None, Behaviour(faults=(Fault("SELECT", "delay", delay=1.0),)))
    port = imap.listen(backlog=4096)
    directory = tempfile.mkdtemp(prefix="fido-reload-bench-")
    path = os.path.join(directory, "accounts.json")
    with open(path, "w") as f:
        json.dump({"accounts": accounts(port, args.accounts, 0)}, f)
    settings = daemon.settings_for(directory, redis.url, workers=args.workers,
                                   poll_interval=3600.0, command_timeout=30)
    top = service.make_service(settings, reactor, observer=False)
    sched = top.parts["scheduler"]
    source = top.parts["source"]
    top.startService()
    probe = StallProbe()
    probe.loop.start(probe.interval)
    yield task.deferLater(reactor, 3, lambda: None)
    stalls, quiet, reactor_ms, total_ms, running = [], [], [], [], []
    for version in range(1, args.reloads + 1):
        before = time.perf_counter()
        yield task.deferLater(reactor, 0.5, lambda: None)
        quiet.append(probe.worst_between(before, time.perf_counter()) * 1000)
        data = json.dumps({"accounts": accounts(port, args.accounts, version)})
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(data)
        running.append(sched.running_count)
        start = time.perf_counter()
        os.replace(tmp, path)
        deadline = time.monotonic() + 30
        while not any(a.id == f"new{version}" for a in source.accounts):
            if time.monotonic() > deadline:
                raise RuntimeError("reload not applied in 30 s")
            yield task.deferLater(reactor, 0.01, lambda: None)
        yield task.deferLater(reactor, 0.3, lambda: None)
        end = time.perf_counter()
        stalls.append(probe.worst_between(start, end) * 1000)
        timing = dict(source.last_timing)
        reactor_ms.append(timing.get("reactor", 0) * 1000)
        total_ms.append(timing.get("blocking", timing.get("load", 0)) * 1000)
    baseline = probe.worst_between(0, float("inf")) * 1000
    probe.loop.stop()
    yield top.stopService()
    yield imap.stop()
    redis.close()
    print(f"accounts file: {args.accounts} accounts, {os.path.getsize(path) / 1e6:.1f} MB")
    print(f"sessions running during the reloads: {min(running)}..{max(running)}")
    print(f"reloads: {args.reloads}")
    print(f"reactor stall around a reload, ms: median {statistics.median(stalls):.1f}, "
          f"max {max(stalls):.1f}")
    print(f"reactor stall in an equal window without a reload, ms: median "
          f"{statistics.median(quiet):.1f}, max {max(quiet):.1f}")
    print(f"reactor time inside the reload (apply + log), ms: median "
          f"{statistics.median(reactor_ms):.1f}, max {max(reactor_ms):.1f}")
    print(f"blocking part in the worker thread (read, decrypt, validate, diff), ms: "
          f"median {statistics.median(total_ms):.1f}")
    print(f"worst lateness of the 5 ms probe over the whole run, ms: {baseline:.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--reloads", type=int, default=5)
    args = parser.parse_args()

    task.react(lambda r: run(args))


if __name__ == "__main__":
    main()
