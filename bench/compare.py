"""Fido against a process-based fetcher and a raw asyncio one, side by side, in one run.

    python bench/compare.py [--runs 3] [--workers 1,4,8,16] [--fido-workers 64]
                            [--scenarios 100x20,1000x5] [--fetchers fido,procs,raw]
                            [--security tls|none] [--publish]

Starts one local Dovecot (tuned for 2,000 sessions) and one Redis, then, for
each repetition, each load ``NxM`` and each fetcher and worker count:
resets every mailbox to the same mail (fixed seed; mix 80% ~4 KiB, 18% ~40
KiB, 2% ~1 MiB base64 attachment), flushes Redis, runs the fetcher until
every account had its session, and measures.  After each full run on the
last load, the same fetcher polls again with nothing new (``empty poll``).

Fetchers: ``fido`` is the real daemon (``twistd -n fido``, through
``bench/fido_run.py`` for the reactor stall probe); ``procs`` is
``bench/baseline.py`` (W worker processes, imaplib + redis-py); ``raw`` is
``bench/rawasync.py`` (one process, W asyncio connections, a minimal IMAP
client and RESP writer, Fido's stream entries and dedupe sets).

Measured per run: wall seconds (start of the process to the end of the last
session, start-up included for both), messages/s, client CPU seconds (user +
sys of every process of the fetcher), peak RSS summed over the fetcher's
processes (sampled every 20 ms; for Fido also its kernel high-water mark
VmHWM, and the larger is kept), server CPU seconds (Dovecot's processes +
Redis), and for Fido the longest reactor stall (wall, and the CPU the daemon
used between two probes: a loaded machine inflates the first).  Steady state: CPU after
start-up, per message or session; Fido's start-up ends when its heartbeat
is in Redis, the other fetchers' start-up is the CPU of a run of theirs
with no accounts at all (measured once per worker count).  Medians over the runs go to
``bench/results/<stamp>/results.json``, ``table.rst`` and ``memory.png``;
``--publish`` copies the chart to ``docs/bench-memory.png``.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import psutil  # noqa: E402

from bench.fido_bench import (  # noqa: E402
    STREAM, compile_fido, proc_cpu_seconds, session_cpu_seconds, stop_daemon, write_accounts,
    write_config)
from tests.support import dovecot as dc  # noqa: E402
from tests.support import redis_server  # noqa: E402

BASELINE_LIST = "baseline:messages"
_COUNT_SESSIONS = (
    "local n, e = 0, 0 "
    "for _, k in ipairs(redis.call('KEYS', 'fido:account:*')) do "
    "  local s = redis.call('HGET', k, 'state') "
    "  if s then n = n + 1 end "
    "  if s == 'error' then e = e + 1 end "
    "end return {n, e}")


#: seconds between two counts of the finished sessions (see _run_fido): each
#: walks every account hash (~4 ms of Redis CPU at 1,000 accounts); every
#: 0.2 s that was 118 counts, most of the Redis CPU charged to Fido on an
#: empty poll of 1,000 accounts (``--commandstats``).  The wall time does
#: not depend on it (the last session's end is read from the hashes)
COUNT_EVERY = 1.0

#: the latest end of a session the account hashes record (ISO 8601, UTC)
_LAST_SESSION_END = (
    "local m = '' "
    "for _, k in ipairs(redis.call('KEYS', 'fido:account:*')) do "
    "  for _, f in ipairs({'last_success_at', 'last_error_at'}) do "
    "    local v = redis.call('HGET', k, f) "
    "    if v and v > m then m = v end "
    "  end "
    "end return m")


def commandstats(r):
    """``{command: (calls, usec)}`` from Redis's ``INFO commandstats`` (the
    commands a script runs are counted under their own names too)."""
    out = {}
    text = r("INFO", "commandstats")
    text = text.decode() if isinstance(text, bytes) else text
    for line in text.splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line[len("cmdstat_"):].partition(":")
            fields = dict(f.split("=", 1) for f in rest.split(",") if "=" in f)
            out[name] = (int(fields.get("calls", 0)), int(fields.get("usec", 0)))
    return out


def commandstats_delta(before, after):
    """What ran between two :func:`commandstats` (calls, usec), busiest first."""
    delta = {}
    for name, (calls, usec) in after.items():
        c0, u0 = before.get(name, (0, 0))
        if calls - c0:
            delta[name] = (calls - c0, usec - u0)
    return dict(sorted(delta.items(), key=lambda kv: -kv[1][1]))


def _session_wall(r, start, start_wall):
    """Seconds from the daemon's start to its last session's end."""
    import datetime

    end = r("EVAL", _LAST_SESSION_END, "0")
    if isinstance(end, bytes):
        end = end.decode()
    try:
        ended = datetime.datetime.fromisoformat(end).timestamp()
    except (TypeError, ValueError):
        return time.monotonic() - start
    return min(ended - start_wall, time.monotonic() - start)


class Sampler(threading.Thread):
    """Peak of the summed RSS of a process and all its descendants."""

    def __init__(self, pid, interval=0.02):
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                return
            self._stop_event.wait(self.interval)

    def stop(self):
        self._stop_event.set()
        self.join()
        return self.peak


def vm_hwm(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def fido_command(workdir, config):
    return [sys.executable, os.path.join(HERE, "fido_run.py"), "-n", "--pidfile=",
            f"--logfile={workdir}/twistd.log", "fido", "--config", config]


def server_cpu(ctx):
    return sum(server_cpu_split(ctx))


def server_cpu_split(ctx):
    """CPU seconds so far of (Dovecot's processes, Redis)."""
    return session_cpu_seconds(ctx.dovecot.pid), proc_cpu_seconds(ctx.redis.process.pid)


def _accounts_for_old(path):
    """The accounts file as an older checkout reads it: without the fields
    ``FIDO_BENCH_ACCOUNT`` added (it refuses fields it does not know); the
    file is written back as it was by the returned callable."""
    extra = json.loads(os.environ.get("FIDO_BENCH_ACCOUNT") or "{}")
    if not extra or os.environ.get("FIDO_BENCH_OLD_KNOWS_FIELDS"):
        # FIDO_BENCH_OLD_KNOWS_FIELDS=1: the old checkout knows them (say
        # idle, from 836b1f5 on): both fetchers get the same accounts
        return lambda: None
    with open(path, encoding="utf-8") as f:
        original = f.read()
    doc = json.loads(original)
    for account in doc["accounts"]:
        for key in extra:
            account.pop(key, None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)

    def restore():
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)

    return restore


def run_fido(ctx, workers, accounts, expected, code=None, strip=True):
    restore = _accounts_for_old(ctx.accounts_path) if code and strip else (lambda: None)
    try:
        return _run_fido(ctx, workers, accounts, expected, code)
    finally:
        restore()


def _run_fido(ctx, workers, accounts, expected, code=None):
    r = ctx.redis.client()
    config = write_config(ctx.workdir, ctx.redis.url, workers, ctx.extra_toml)
    stall_file = os.path.join(ctx.workdir, "stall.json")
    if os.path.exists(stall_file):
        os.unlink(stall_file)
    env = dict(os.environ, FIDO_STALL_FILE=stall_file)
    # this checkout's Fido (not whatever the virtualenv's editable install
    # points at), or another checkout's for "old" and "base"
    env["FIDO_CODE"] = code or ROOT
    out = open(os.path.join(ctx.workdir, "daemon.out"), "ab")
    s0 = server_cpu_split(ctx)
    c0 = commandstats(r)
    start = time.monotonic()
    start_wall = time.time()
    daemon = subprocess.Popen(fido_command(ctx.workdir, config), cwd=ctx.workdir, stdout=out,
                              stderr=subprocess.STDOUT, start_new_session=True, env=env)
    sampler = Sampler(daemon.pid)
    sampler.start()
    startup_cpu = startup_s = None
    try:
        deadline = start + ctx.timeout
        next_count = 0.0
        while True:
            if startup_cpu is None and r("EXISTS", *_instance_keys(r)):
                # the heartbeat is written once Redis is connected, when the
                # first sessions start: what came before is start-up
                startup_s = time.monotonic() - start
                t = psutil.Process(daemon.pid).cpu_times()
                startup_cpu = t.user + t.system
            # counting sessions walks every account hash in Redis (~3 ms of
            # Redis CPU at 1,000 accounts): every 20 ms that took ~2 s of
            # Redis CPU per 1000x5 run, on the cores Fido and Dovecot share,
            # and was counted as server CPU.  So: the stream's length (O(1))
            # says when the mail is in, sessions are counted only then and
            # every COUNT_EVERY s, and the wall time is the last session's end
            # as the account hashes record it (_LAST_SESSION_END)
            now = time.monotonic()
            if now >= next_count and (not expected or r("XLEN", STREAM) >= expected):
                next_count = now + COUNT_EVERY
                done, errors = r("EVAL", _COUNT_SESSIONS, "0")
                if done >= accounts:
                    break
            if daemon.poll() is not None:
                raise RuntimeError(f"fido exited with {daemon.returncode}; see {ctx.workdir}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timeout: {done}/{accounts} sessions; see {ctx.workdir}")
            time.sleep(0.02)
        wall = _session_wall(r, start, start_wall)
        p = psutil.Process(daemon.pid)
        t = p.cpu_times()
        cpu = t.user + t.system
        peak = max(sampler.stop(), vm_hwm(daemon.pid))
        s1 = server_cpu_split(ctx)
        server = sum(s1) - sum(s0)
        # the bench's own probes (KEYS, EVAL, XLEN, INFO) are counted too
        redis_commands = commandstats_delta(c0, commandstats(r))
        stored = r("XLEN", STREAM)
    finally:
        stop_daemon(daemon)
        out.close()
    stall = {}
    if os.path.exists(stall_file):
        with open(stall_file) as f:
            stall = json.load(f)
    return dict(wall_s=wall, cpu_s=cpu, cpu_sys_s=t.system, peak_rss_mib=peak / 2**20,
                server_cpu_s=server, dovecot_cpu_s=s1[0] - s0[0], redis_cpu_s=s1[1] - s0[1],
                redis_commands=redis_commands,
                startup_s=startup_s, startup_cpu_s=startup_cpu,
                stored=stored, errors=errors, stall_max_ms=stall.get("max_ms"), gc_max_ms=stall.get("gc_max_ms"),
                gc_total_ms=stall.get("gc_total_ms"), gc_runs=stall.get("gc_runs"),
                stalls_over_100ms=stall.get("over_100ms"),
                stall_cpu_max_ms=stall.get("cpu_max_ms"), late_stacks=stall.get("late_stacks"))


def _run_peer(ctx, script, args, count):
    """Run one of the peers (``baseline.py``, ``rawasync.py``) to its end:
    its rusage, peak RSS, the server's CPU and what it stored (``count``)."""
    r = ctx.redis.client()
    s0 = server_cpu_split(ctx)
    c0 = commandstats(r)
    start = time.monotonic()
    out = open(os.path.join(ctx.workdir, script.replace(".py", ".out")), "ab")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, script), "--accounts", ctx.accounts_path,
         "--redis-url", ctx.redis.url] + args,
        stdout=out, stderr=subprocess.STDOUT)
    sampler = Sampler(proc.pid)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.close()
    peak = sampler.stop()
    s1 = server_cpu_split(ctx)
    server = sum(s1) - sum(s0)
    redis_commands = commandstats_delta(c0, commandstats(r))
    stored = r(*count)
    return dict(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime, cpu_sys_s=usage.ru_stime,
                peak_rss_mib=peak / 2**20,
                server_cpu_s=server, dovecot_cpu_s=s1[0] - s0[0], redis_cpu_s=s1[1] - s0[1],
                redis_commands=redis_commands,
                stored=stored, errors=1 if proc.returncode else 0,
                stall_max_ms=None, gc_max_ms=None, gc_total_ms=None, stalls_over_100ms=None,
                stall_cpu_max_ms=None)


def run_procs(ctx, workers, accounts, expected):
    return _run_peer(ctx, "baseline.py", ["--workers", str(workers), "--list", BASELINE_LIST],
                     ("LLEN", BASELINE_LIST))


def run_raw(ctx, workers, accounts, expected):
    return _run_peer(ctx, "rawasync.py", ["--connections", str(workers), "--stream", STREAM],
                     ("XLEN", STREAM))


def startup_cpu(ctx, fetcher, workers):
    """CPU seconds of a run of ``fetcher`` with no accounts: its start-up
    (imports, a pool of W processes, a Redis connection), kept per worker count."""
    key = (fetcher, workers)
    if key not in ctx.startup:
        real = ctx.accounts_path
        ctx.accounts_path = os.path.join(ctx.workdir, "no-accounts.json")
        with open(ctx.accounts_path, "w") as f:
            json.dump({"accounts": []}, f)
        try:
            ctx.startup[key] = RUNNERS[fetcher](ctx, workers, 0, 0)["cpu_s"]
        finally:
            ctx.accounts_path = real
    return ctx.startup[key]


def _instance_keys(r):
    return r("KEYS", "fido:instance:*") or ["fido:instance:none"]


RUNNERS = {"fido": run_fido, "procs": run_procs, "raw": run_raw,
           "old": lambda ctx, *a: run_fido(ctx, *a, code=ctx.old_code),
           # a recent checkout (a branch point): it knows every account field
           "base": lambda ctx, *a: run_fido(ctx, *a, code=ctx.base_code, strip=False)}
DAEMONS = ("fido", "old", "base")


class Context:
    pass


def median_row(rows):
    keys = ("wall_s", "cpu_s", "cpu_sys_s", "peak_rss_mib", "server_cpu_s", "dovecot_cpu_s",
            "redis_cpu_s", "stall_max_ms", "stall_cpu_max_ms", "gc_max_ms", "gc_total_ms",
            "stalls_over_100ms", "msg_per_s", "cpu_ms_per_unit", "startup_s", "startup_cpu_s",
            "cpu_ms_per_unit_after_start")
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = statistics.median(vals) if vals else None
    out["runs"] = len(rows)
    out["all_exact"] = all(r["exact"] for r in rows)
    out["errors"] = max(r["errors"] for r in rows)
    out["peak_rss_mib_max"] = max(r["peak_rss_mib"] for r in rows)
    out["stall_max_ms_max"] = max((r["stall_max_ms"] for r in rows
                                   if r.get("stall_max_ms") is not None), default=None)
    return out


def machine():
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), platform.processor())
    except OSError:
        model = platform.processor()
    return (f"{os.cpu_count()} cores ({model}), {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def write_table(path, medians, loads):
    lines = []
    head = ("load", "fetcher", "W", "wall s", "msg/s", "client CPU s", "CPU ms/unit",
            "start-up s (CPU s)", "ms/unit after start", "peak RSS MiB", "server CPU s",
            "max stall ms (CPU)")
    rows = []
    for key in sorted(medians, key=lambda k: (loads.index(k[0]), k[1], k[2])):
        load, fetcher, w = key
        m = medians[key]
        rows.append((load, fetcher, str(w), fmt(m["wall_s"], ".2f"),
                     fmt(m["msg_per_s"], ".0f") if m["msg_per_s"] else "-",
                     fmt(m["cpu_s"], ".2f"), fmt(m["cpu_ms_per_unit"], ".3f"),
                     ("-" if m["startup_cpu_s"] is None else f"- ({m['startup_cpu_s']:.2f})")
                     if m["startup_s"] is None else
                     f"{m['startup_s']:.2f} ({m['startup_cpu_s']:.2f})",
                     fmt(m["cpu_ms_per_unit_after_start"], ".3f"),
                     fmt(m["peak_rss_mib"], ".1f"), fmt(m["server_cpu_s"], ".2f"),
                     fmt(m["stall_max_ms"], ".0f")
                     + ("" if m.get("stall_cpu_max_ms") is None
                        else f" ({m['stall_cpu_max_ms']:.0f})")
                     + ("" if m["all_exact"] else " INEXACT")))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    rule = "  ".join("=" * w for w in widths)
    lines.append(rule)
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    lines.append(rule)
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    lines.append(rule)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def chart(path, medians, load, workers):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for fetcher, label, style in (("fido", "Fido (one process)", "o-"),
                                  ("procs", "process-based (imaplib, W processes)", "s--"),
                                  ("raw", "raw asyncio (one process, W connections)", "^:")):
        ws = [w for w in sorted({k[2] for k in medians if k[0] == load and k[1] == fetcher})]
        if not ws:
            continue
        ax1.plot(ws, [medians[(load, fetcher, w)]["peak_rss_mib"] for w in ws], style,
                 label=label)
        ax2.plot(ws, [medians[(load, fetcher, w)]["msg_per_s"] for w in ws], style, label=label)
    ticks = sorted({k[2] for k in medians if k[0] == load})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("workers")
        ax.grid(True, alpha=0.3)
    ax1.set_ylabel("peak RSS, all processes (MiB)")
    ax1.set_title(f"Memory, {load} messages")
    ax1.set_ylim(bottom=0)
    ax2.set_ylabel("messages/s")
    ax2.set_title(f"Throughput, {load} messages")
    ax2.set_ylim(bottom=0)
    ax1.legend(fontsize=8)
    fig.suptitle(f"Fido vs a process-based and a raw asyncio fetcher (local Dovecot + Redis, "
                 f"median of runs; {datetime.date.today()})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", default="1,4,8,16")
    p.add_argument("--fido-workers", default="64", help="extra worker counts for Fido only")
    p.add_argument("--raw-workers", default="64",
                   help="extra connection counts for the raw asyncio fetcher only")
    p.add_argument("--scenarios", default="100x20,1000x5")
    p.add_argument("--fetchers", default="fido,procs,raw")
    p.add_argument("--old-code", metavar="DIR",
                   help="a checkout of an older Fido: fetcher 'old' runs it (FIDO_CODE)")
    p.add_argument("--base-code", metavar="DIR",
                   help="a recent checkout of Fido (say the branch point): fetcher 'base' "
                        "runs it, with the accounts file as is")
    p.add_argument("--security", choices=("tls", "none"), default="tls",
                   help="the accounts' security (implicit TLS or plain)")
    p.add_argument("--no-empty", action="store_true", help="skip the empty second poll")
    p.add_argument("--commandstats", action="store_true",
                   help="print each run's Redis commands (INFO commandstats: calls, usec)")
    p.add_argument("--extra-toml", default="", help="appended to Fido's fido.toml")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", default=None, help="results directory "
                                              "(default bench/results/compare-<stamp>)")
    p.add_argument("--publish", action="store_true",
                   help="copy the chart to docs/bench-memory.png")
    p.add_argument("--replot", metavar="RESULTS_JSON",
                   help="only draw the chart again from a results.json")
    args = p.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        medians = {}
        for key, value in saved["medians"].items():
            load, fetcher, w = key.split(" / ")
            medians[(load, fetcher, int(w))] = value
        png = os.path.join(os.path.dirname(os.path.abspath(args.replot)), "memory.png")
        chart(png, medians, saved["args"]["scenarios"].split(",")[0], None)
        print(png)
        if args.publish:
            shutil.copyfile(png, os.path.join(ROOT, "docs", "bench-memory.png"))
        return 0

    workers = [int(w) for w in args.workers.split(",") if w]
    fido_extra = [int(w) for w in args.fido_workers.split(",") if w]
    raw_extra = [int(w) for w in args.raw_workers.split(",") if w]
    loads = [s for s in args.scenarios.split(",") if s]
    fetchers = [f for f in args.fetchers.split(",") if f]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or os.path.join(HERE, "results", f"compare-{stamp}")
    os.makedirs(out_dir, exist_ok=True)

    ctx = Context()
    ctx.timeout = args.timeout
    ctx.extra_toml = args.extra_toml
    ctx.startup = {}
    ctx.old_code = args.old_code
    ctx.base_code = args.base_code
    ctx.workdir = tempfile.mkdtemp(prefix="fido-compare-")
    os.chmod(ctx.workdir, 0o755)
    ctx.dovecot = dc.Dovecot(os.path.join(ctx.workdir, "dovecot"), sessions=2000)
    ctx.redis = redis_server.RedisServer(redis_server.find_redis_server(),
                                         directory=os.path.join(ctx.workdir, "redis"))
    os.makedirs(ctx.redis.directory, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(SystemExit(143)))
    rows = {}
    compile_fido()
    import compileall
    for code in (args.old_code, args.base_code):
        if code:
            compileall.compile_dir(os.path.join(code, "fido_tx"), quiet=1)
    print(f"compare: {machine()}, security {args.security}", flush=True)
    try:
        ctx.dovecot.start()
        ctx.redis.start()
        r = ctx.redis.client()
        for run in range(1, args.runs + 1):
            for load in loads:
                n, m = (int(x) for x in load.split("x"))
                plan = [(f, w) for f in fetchers for w in workers]
                plan += [(f, w) for f in DAEMONS for w in fido_extra if f in fetchers]
                plan += [("raw", w) for w in raw_extra if "raw" in fetchers]
                for fetcher, w in plan:
                    r("FLUSHALL")
                    users = ctx.dovecot.provision(n, m)
                    ctx.accounts_path = write_accounts(ctx.workdir, ctx.dovecot, users,
                                                       args.security, "seen")
                    passes = [(load, n * m)]
                    if load == loads[-1] and not args.no_empty:
                        passes.append((f"{n}x0 (empty poll)", 0))
                    for label, expected in passes:
                        r("FLUSHALL")
                        if fetcher not in DAEMONS:
                            res_startup = startup_cpu(ctx, fetcher, w)
                            r("FLUSHALL")
                        res = RUNNERS[fetcher](ctx, w, n, expected)
                        if fetcher not in DAEMONS:
                            res["startup_cpu_s"] = res_startup
                        res["exact"] = res["stored"] == expected and not res["errors"]
                        res["msg_per_s"] = expected / res["wall_s"] if expected else None
                        res["cpu_ms_per_unit"] = 1000 * res["cpu_s"] / (expected or n)
                        if res.get("startup_cpu_s") is not None:
                            res["cpu_ms_per_unit_after_start"] = (
                                1000 * (res["cpu_s"] - res["startup_cpu_s"]) / (expected or n))
                        rows.setdefault((label, fetcher, w), []).append(res)
                        print(f"run {run} {label:>22} {fetcher:5} W={w:<3} "
                              f"wall {res['wall_s']:6.2f} s  "
                              f"{(res['msg_per_s'] or 0):6.0f} msg/s  "
                              f"cpu {res['cpu_s']:5.2f} s ({res['cpu_ms_per_unit']:.3f} ms/"
                              f"{'msg' if expected else 'session'}, sys {res['cpu_sys_s']:.2f} s)  "
                              f"rss {res['peak_rss_mib']:6.1f} MiB  "
                              f"server {res['server_cpu_s']:5.2f} s "
                              f"(Dovecot {res['dovecot_cpu_s']:.2f}, Redis {res['redis_cpu_s']:.2f})  "
                              f"startup {res.get('startup_s')} s  "
                              f"stall {res['stall_max_ms']} ms "
                              f"(CPU {res.get('stall_cpu_max_ms')})  "
                              f"gc {res.get('gc_total_ms')} ms {res.get('gc_runs')}  "
                              f"{'ok' if res['exact'] else 'INEXACT stored=%s errors=%s' % (res['stored'], res['errors'])}",
                              flush=True)
                        if args.commandstats:
                            print("      redis: " + ", ".join(
                                f"{name} {calls} x {usec / max(calls, 1):.1f} us"
                                for name, (calls, usec) in res["redis_commands"].items()),
                                flush=True)
    finally:
        ctx.redis.stop()
        ctx.dovecot.stop()
        shutil.rmtree(ctx.workdir, ignore_errors=True)
    medians = {k: median_row(v) for k, v in rows.items()}
    all_loads = []
    for k in rows:
        if k[0] not in all_loads:
            all_loads.append(k[0])
    table = write_table(os.path.join(out_dir, "table.rst"), medians, all_loads)
    print(table)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"date": stamp, "machine": machine(), "args": vars(args),
                   "runs": {" / ".join(map(str, k)): v for k, v in rows.items()},
                   "medians": {" / ".join(map(str, k)): v for k, v in medians.items()}},
                  f, indent=1)
    png = os.path.join(out_dir, "memory.png")
    chart(png, medians, loads[0], workers)
    print(f"results in {out_dir}")
    if args.publish:
        dest = os.path.join(ROOT, "docs", "bench-memory.png")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(png, dest)
        print(f"chart copied to {dest}")
    return 0 if all(m["all_exact"] for m in medians.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
