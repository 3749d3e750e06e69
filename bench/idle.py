"""Thousands of held IDLE connections against the mock IMAP server.

    .venv/bin/python bench/idle.py --connections 10000 [--tls] [--idle-seconds 60]

The mock server (tests/support/mockimap.py, ``--idle``) runs in its own
process; this process holds one connection per account with
:class:`fido_tx.sources.imap.held.HeldAccount` and
:class:`fido_tx.sources.imap.holding.HeldImap`, exactly as the daemon does,
delivering into the Redis stream sink on a local redis-server (or a memory
sink with ``--sink memory``).  It prints:

- RSS per held connection: the growth of this process's RSS from before the
  first connection to all of them idling, over the number of connections
  (after ``gc.freeze()``: the objects of the set-up are not scanned again);
- CPU per idle minute: this process's and the server's user+sys CPU while
  every connection idles, per minute;
- the longest reactor stall: the latest a 10 ms ``LoopingCall`` ran, while
  connecting and while idling (collector included);
- wake-to-Redis latency: a message appended to one account through the
  mock's control port until the sink confirmed it (p50, p99, max).

Targets (issue 12): RSS under 16 KiB (plain) and 64 KiB (TLS) per
connection, stalls under 100 ms.
"""

import argparse
import gc
import json
import os
import random
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: FIDO_CODE=DIR runs another checkout's fido_tx (before/after in one session)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.environ.get("FIDO_CODE", ROOT))


def rss_kib(pid="self"):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))


def cpu_seconds(pid=None):
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


def raise_nofile():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def start_mock(n, tls_files, port, control_port):
    cmd = [sys.executable, "-m", "tests.support.mockimap", "--port", str(port),
           "--accounts", str(n), "--messages", "0", "--idle",
           "--control-port", str(control_port), "--backlog", "4096"]
    if tls_files:
        cmd += ["--tls", tls_files[0], tls_files[1], "--implicit-tls"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    for _ in range(2):
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("mock IMAP server did not start")
    return proc


class GcPauses:
    """The longest collection, by generation (``gc.callbacks``): wall time,
    and the CPU time of this thread (what a machine shared with other work
    does not inflate)."""

    def __init__(self):
        self.worst = {0: 0.0, 1: 0.0, 2: 0.0}
        self.worst_cpu = {0: 0.0, 1: 0.0, 2: 0.0}
        self._started = None
        gc.callbacks.append(self._callback)

    def _callback(self, phase, info):
        if phase == "start":
            self._started = (time.perf_counter(), time.thread_time())
        elif self._started is not None:
            g = info["generation"]
            self.worst[g] = max(self.worst[g], time.perf_counter() - self._started[0])
            self.worst_cpu[g] = max(self.worst_cpu[g], time.thread_time() - self._started[1])

    def reset(self):
        worst = {f"gen{g}": round(v * 1000, 1) for g, v in self.worst.items()}
        worst.update({f"gen{g}_cpu": round(v * 1000, 1) for g, v in self.worst_cpu.items()})
        self.worst = {0: 0.0, 1: 0.0, 2: 0.0}
        self.worst_cpu = {0: 0.0, 1: 0.0, 2: 0.0}
        return worst


class Census:
    """``FIDO_CENSUS=1``: what one held connection is made of: the objects
    the collector tracks, by type, and tracemalloc's bytes by line, per
    connection (printed to stderr)."""

    def __init__(self):
        import collections
        import tracemalloc

        self.tracemalloc = tracemalloc
        gc.collect()
        self.types0 = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        tracemalloc.start(1)
        self.snap0 = tracemalloc.take_snapshot()

    def report(self, n):
        import collections

        snap = self.tracemalloc.take_snapshot()
        self.tracemalloc.stop()
        gc.unfreeze()
        gc.collect()
        objects = gc.get_objects()
        types = collections.Counter(type(o).__qualname__ for o in objects)
        types.subtract(self.types0)
        classes = collections.Counter(o.__qualname__ for o in objects if isinstance(o, type))
        print("classes made per connection:", [(k, round(v / n, 2))
                                               for k, v in classes.most_common(3)],
              file=sys.stderr)
        del objects
        print("tracked objects per connection:", round(sum(types.values()) / n, 1),
              file=sys.stderr)
        for name, count in types.most_common(30):
            print(f"  {count / n:7.2f} {name}", file=sys.stderr)
        stats = snap.compare_to(self.snap0, "lineno")
        print("tracemalloc per connection:",
              round(sum(s.size_diff for s in stats) / n / 1024, 2), "KiB", file=sys.stderr)
        for s in stats[:30]:
            frame = s.traceback[0]
            print(f"  {s.size_diff / n:8.0f} B {s.count_diff / n:6.2f} blocks "
                  f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}",
                  file=sys.stderr)


class Stalls:
    """The longest gap of a 10 ms LoopingCall beyond its interval (wall
    time), and the most CPU time this thread spent between two of its ticks
    (``worst_cpu``): on a machine shared with other work a wall-clock gap
    includes the time the process waited for a core; the CPU time between
    ticks is the reactor's own longest stretch of work."""

    def __init__(self, reactor, interval=0.01):
        from twisted.internet import task

        self.reactor = reactor
        self.interval = interval
        self.worst = 0.0
        self.worst_cpu = 0.0
        self.last = None
        self.last_cpu = None
        self.loop = task.LoopingCall(self.tick)
        self.loop.clock = reactor
        self.loop.start(interval)

    def tick(self):
        now, cpu = time.monotonic(), time.thread_time()
        if self.last is not None:
            self.worst = max(self.worst, now - self.last - self.interval)
            self.worst_cpu = max(self.worst_cpu, cpu - self.last_cpu)
        self.last, self.last_cpu = now, cpu

    def reset(self):
        worst, self.worst, self.last = self.worst, 0.0, None
        self.worst_cpu_last, self.worst_cpu = self.worst_cpu, 0.0
        return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--tls", action="store_true", help="implicit TLS to the mock")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--wakes", type=int, default=50)
    parser.add_argument("--sink", choices=["redis", "memory"], default="redis")
    parser.add_argument("--json", help="append the figures to this JSON-lines file")
    parser.add_argument("--starts-per-turn", type=int, default=None,
                        help="held accounts started per reactor turn (default: the "
                             "scheduler's STARTS_PER_TURN; 0: all in one turn, as the "
                             "scheduler did before it had that bound)")
    parser.add_argument("--opening", type=int, default=None,
                        help="held connections opening at once (default: the daemon's "
                             "OPENING_MAX; 0: no limit, as before it existed)")
    parser.add_argument("--no-freeze", action="store_true",
                        help="no gc.freeze() while connecting (the collector walks them all)")
    opts = parser.parse_args(argv)
    raise_nofile()

    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import defer, endpoints, reactor, task

    from fido_tx.accounts.model import Account
    from fido_tx.config import ImapSettings, RedisSettings
    from fido_tx.demo.redisserver import free_port
    from fido_tx.schedule.pacer import StartPacer
    from fido_tx.sources import SourceContext
    from fido_tx.sources.imap import held
    from fido_tx.sources.imap.connect import Connector
    from fido_tx.sources.imap.holding import GcFreezer, HeldImap
    from tests.support import mockimap, tlsca

    port, control_port = free_port(), free_port()
    tls_files = None
    ca_file = None
    if opts.tls:
        pki = tlsca.files()
        tls_files = (pki.localhost.cert, pki.localhost.key)
        ca_file = pki.ca
    mock = start_mock(opts.connections + 1, tls_files, port, control_port)
    redis_server = connection = None
    figures = {"connections": opts.connections, "tls": opts.tls,
               "gc_freeze": not opts.no_freeze}

    @defer.inlineCallbacks
    def run():
        nonlocal redis_server, connection
        if opts.sink == "redis":
            from fido_tx.demo.redisserver import RedisServer, find_redis_server
            from fido_tx.redis.connection import RedisConnection
            from fido_tx.sinks import SinkContext, module

            redis_server = RedisServer(find_redis_server()).start()
            connection = RedisConnection(reactor, RedisSettings(url=redis_server.url))
            connection.startService()
            stream = module("stream")
            sink = stream.build("default", {"stream": "fido:messages"},
                                SinkContext(reactor=reactor, redis=connection))
        else:
            from fido_tx.testing import MemorySink

            sink = MemorySink()
        confirmed = {}
        inner_deliver = sink.deliver

        def deliver(messages):
            def note(delivery):
                now = time.monotonic()
                for m in messages:
                    confirmed.setdefault(m.account, []).append(now)
                return delivery
            return inner_deliver(messages).addCallback(note)

        sink.deliver = deliver
        settings = ImapSettings(connect_timeout=30, greeting_timeout=30, command_timeout=60)
        # as the daemon does: one Connector (endpoints, TLS options and
        # sessions) and one Random for every account
        ctx = SourceContext(reactor=reactor, sink=sink, settings=settings, debug=False,
                            pacer=StartPacer(reactor, per_turn=50),
                            connector=Connector(reactor))
        shared_random = random.Random(0)
        hs = held.HeldSettings(idle_refresh=600, poll_interval=3600, command_timeout=60)
        # as the daemon's HeldConnections: gc.freeze() as connections settle
        freezer = None if opts.no_freeze else GcFreezer()
        pool = held.HeldPool(max_per_host=opts.connections + 2, on_idle=freezer)
        # the daemon's HeldSession also calls it for each account started
        freeze_on_start = freezer is not None and getattr(GcFreezer, "counts_starts", False)
        figures["freeze_on_start"] = freeze_on_start

        # as the daemon's HeldConnections: a bound on the connections opening
        # at once (an older checkout run through FIDO_CODE has none)
        from fido_tx.sources.imap import holding

        opening = opts.opening if opts.opening is not None else getattr(
            holding, "OPENING_MAX", 0)
        figures["opening"] = opening
        bound = getattr(holding, "OpeningBound", None)  # with its TLS bound (later code)
        figures["opening_tls"] = getattr(holding, "OPENING_TLS_MAX", None) if bound else None
        open_kw = ({"opening": bound(opening) if bound else defer.DeferredSemaphore(opening)}
                   if opening else {})

        def hold(k):
            acct = Account(id=f"bench-{k}", host="localhost" if opts.tls else "127.0.0.1",
                           port=port, username=f"user{k}", password="password",
                           security="tls" if opts.tls else "none", ca_file=ca_file)
            source = HeldImap(acct, ctx, **open_kw)
            machine = held.HeldAccount(acct.id, acct.host, source.open, source.poll,
                                       lambda r: None, reactor, hs, pool,
                                       shared_random).start()
            if freeze_on_start:
                freezer()
            return machine

        # one connection first: every module a connection needs is imported
        machines = [hold(opts.connections + 1)]
        while pool.idling < 1:
            yield task.deferLater(reactor, 0.05, lambda: None)
        stalls = Stalls(reactor)
        pauses = GcPauses()
        gc.collect()
        pauses.reset()
        census = Census() if os.environ.get("FIDO_CENSUS") else None
        rss0 = rss_kib()
        t0 = time.monotonic()
        # as the daemon's scheduler starts them: STARTS_PER_TURN per turn
        from fido_tx.schedule import scheduler

        per_turn = opts.starts_per_turn
        if per_turn is None:
            per_turn = getattr(scheduler, "STARTS_PER_TURN", 0)
        figures["starts_per_turn"] = per_turn
        step = per_turn or opts.connections
        for first in range(1, opts.connections + 1, step):
            machines += [hold(k) for k in range(first, min(first + step, opts.connections + 1))]
            yield task.deferLater(reactor, 0, lambda: None)
        figures["seconds_to_start_machines"] = round(time.monotonic() - t0, 2)
        last = time.monotonic()
        while pool.idling < opts.connections + 1:
            yield task.deferLater(reactor, 0.1, lambda: None)
            if time.monotonic() - last > 10:
                last = time.monotonic()
                print(f"{pool.idling} idling after {last - t0:.0f} s", file=sys.stderr,
                      flush=True)
            if time.monotonic() - t0 > 600:
                raise RuntimeError(f"only {pool.idling} idling after 600 s")
        figures["seconds_to_all_idling"] = round(time.monotonic() - t0, 2)
        figures["stall_connecting_ms"] = round(stalls.reset() * 1000, 1)
        figures["stall_connecting_cpu_ms"] = round(stalls.worst_cpu_last * 1000, 1)
        figures["gc_longest_connecting_ms"] = pauses.reset()
        gc.collect()
        gc.freeze()
        yield task.deferLater(reactor, 1.0, lambda: None)
        rss1 = rss_kib()
        figures["rss_per_connection_kib"] = round((rss1 - rss0) / opts.connections, 2)
        if census is not None:
            census.report(opts.connections)
        figures["rss_total_mib"] = round(rss1 / 1024, 1)
        figures["mock_rss_mib"] = round(rss_kib(mock.pid) / 1024, 1)

        stalls.loop.stop()  # its 100 wake-ups a second would be the CPU measured
        cpu0, mcpu0, t1 = cpu_seconds(), cpu_seconds(mock.pid), time.monotonic()
        yield task.deferLater(reactor, opts.idle_seconds, lambda: None)
        minutes = (time.monotonic() - t1) / 60.0
        figures["cpu_s_per_idle_minute"] = round((cpu_seconds() - cpu0) / minutes, 3)
        figures["mock_cpu_s_per_idle_minute"] = round(
            (cpu_seconds(mock.pid) - mcpu0) / minutes, 3)
        stalls.reset()
        stalls.loop.start(stalls.interval)
        yield task.deferLater(reactor, min(10.0, opts.idle_seconds), lambda: None)
        figures["stall_idle_ms"] = round(stalls.reset() * 1000, 1)
        figures["stall_idle_cpu_ms"] = round(stalls.worst_cpu_last * 1000, 1)
        figures["gc_longest_after_freeze_ms"] = pauses.reset()

        control = yield endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", control_port),
            mockimap.RawClient(reactor))
        rng = random.Random(0)
        latencies = []
        for _ in range(opts.wakes):
            k = rng.randint(1, opts.connections)
            before = len(confirmed.get(f"bench-{k}", []))
            sent = time.monotonic()
            control.transport.write(b"DELIVER user%d\n" % k)
            yield control.until(rb"OK \d+\n")
            while len(confirmed.get(f"bench-{k}", [])) <= before:
                yield task.deferLater(reactor, 0.002, lambda: None)
            latencies.append(confirmed[f"bench-{k}"][before] - sent)
            yield task.deferLater(reactor, 0.05, lambda: None)
        figures["wake_to_sink_ms"] = {
            "sink": opts.sink,
            "p50": round(percentile(latencies, 50) * 1000, 1),
            "p99": round(percentile(latencies, 99) * 1000, 1),
            "max": round(max(latencies) * 1000, 1)}
        figures["stall_waking_ms"] = round(stalls.reset() * 1000, 1)
        control.transport.loseConnection()

        t2 = time.monotonic()
        yield defer.gatherResults([m.stop(timeout=20) for m in machines])
        figures["seconds_to_stop"] = round(time.monotonic() - t2, 2)
        figures["reconnects"] = pool.reconnects
        stalls.loop.stop()

    def finish(result):
        if isinstance(result, Exception) or hasattr(result, "printTraceback"):
            result.printTraceback()
        reactor.stop()

    reactor.callWhenRunning(lambda: run().addBoth(finish))
    try:
        reactor.run()
    finally:
        mock.terminate()
        mock.wait()
        if connection is not None:
            connection.stopService()
        if redis_server is not None:
            redis_server.close()
    print(json.dumps(figures, indent=2))
    if opts.json:
        with open(opts.json, "a") as f:
            f.write(json.dumps(figures) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
