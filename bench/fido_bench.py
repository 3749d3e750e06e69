"""Fido's throughput benchmark: N accounts x M messages, local Dovecot and Redis.

Provisions the mailboxes in a local Dovecot (tuned for 2,000 sessions) and a
fresh local Redis, writes ``fido.toml`` and ``accounts.json`` into a
temporary directory, starts the daemon (by default ``twistd -n fido --config
fido.toml``) and waits until the stream holds N*M entries.  Prints
messages/s, wall seconds, the daemon's CPU seconds (user+sys) and its peak
RSS.  Each run starts from the same mail (same seed) and an empty Redis.

    python bench/fido_bench.py --accounts 100 --messages 20

Message mix: 80% ~4 KiB, 18% ~40 KiB, 2% ~1 MiB (a base64 attachment).
Runs as root or as a normal user; needs dovecot and redis-server installed.
"""

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.support import dovecot as dc  # noqa: E402
from tests.support import redis_server  # noqa: E402

STREAM = "fido:messages"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stop_daemon(daemon):
    """SIGTERM the daemon (a graceful stop), SIGKILL its group after 30 s."""
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()


def compile_fido():
    """Byte-compile Fido's own modules, as ``pip install`` does.

    An editable install (``pip install -e``) has no ``.pyc`` files until the
    first import writes them, and with ``PYTHONDONTWRITEBYTECODE`` set (as on
    the bench machine) never: every start then compiled fido_tx from source,
    ~75 ms of CPU counted as start-up that an installed daemon does not pay.
    """
    import compileall

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for sub in ("fido_tx", os.path.join("twisted", "plugins")):
        compileall.compile_dir(os.path.join(root, sub), quiet=1)


def default_command():
    """``twistd -n fido --config {config}`` from this Python's environment."""
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    if not os.access(twistd, os.X_OK):
        twistd = shutil.which("twistd") or "twistd"
    return (f"{shlex.quote(twistd)} -n --pidfile= --logfile={{dir}}/twistd.log "
            "fido --config {config}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accounts", type=int, default=100, help="mailboxes (default 100)")
    p.add_argument("--messages", type=int, default=20, help="messages per mailbox (default 20)")
    p.add_argument("--runs", type=int, default=1, help="repeat, same mail each time (default 1)")
    p.add_argument("--workers", type=int, default=100, help="fido.workers (default 100)")
    p.add_argument("--security", choices=("tls", "starttls", "none"), default="tls")
    p.add_argument("--after-fetch", default="seen", help="seen, delete or move:FOLDER")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="give up a run after this many seconds (default 600)")
    p.add_argument("--command", default=None,
                   help="daemon command line; {config} and {dir} are replaced "
                        "(default: twistd -n fido --config {config})")
    p.add_argument("--extra-toml", default="",
                   help="text appended to fido.toml (e.g. an [imap] section)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (logs, config) and print it")
    return p.parse_args(argv)


def write_config(directory, redis_url, workers, extra="", level="info"):
    path = os.path.join(directory, "fido.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"""\
# Written by bench/fido_bench.py
[fido]
accounts_file = "accounts.json"
key_file = ""
workers = {workers}
poll_interval = 3600
state_dir = "state"

[redis]
url = "{redis_url}"
stream = "{STREAM}"
max_backlog = 10000000

[reporter]
url = ""

[http]
listen = ""

[log]
level = "{level}"
file = "fido.log"
""")
        if extra:
            f.write("\n" + extra + "\n")
    os.makedirs(os.path.join(directory, "state"), exist_ok=True)
    return path


def write_accounts(directory, server, users, security, after_fetch):
    port = server.ssl_port if security == "tls" else server.port
    accounts = [
        {
            "id": f"bench-{k:04d}",
            "host": "localhost",
            "port": port,
            "security": security,
            "username": user,
            "password": password,
            "mailbox": "INBOX",
            "after_fetch": after_fetch,
            "ca_file": server.ca_file,
        }
        for k, (user, password) in enumerate(users.items())
    ]
    # FIDO_BENCH_ACCOUNT='{"idle": false}': more account fields, e.g. to
    # measure the reconnecting poll of a Fido that holds connections by
    # default against an older one that does not know the field
    extra = json.loads(os.environ.get("FIDO_BENCH_ACCOUNT") or "{}")
    for account in accounts:
        account.update(extra)
    path = os.path.join(directory, "accounts.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"accounts": accounts}, f, indent=1)
    os.chmod(path, 0o600)
    return path


def proc_cpu_seconds(pid):
    """user+sys CPU seconds of ``pid`` (and its waited-for children)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / CLOCK_TICKS


def session_cpu_seconds(sid):
    """CPU seconds of every live process in session ``sid`` (Dovecot's master
    and its children; exited children are counted in the master's cutime)."""
    total = 0.0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6: session id
            total += sum(int(x) for x in fields[11:15]) / CLOCK_TICKS
    return total


def proc_peak_rss_kib(pid):
    with open(f"/proc/{pid}/status", "r") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def run_once(args, server, redis, workdir, config_path, expected):
    """Reset Redis and the mailboxes, run the daemon until the stream holds
    ``expected`` entries, and measure."""
    r = redis.client()
    r("FLUSHALL")
    t = time.monotonic()
    users = server.provision(args.accounts, args.messages)
    provision_s = time.monotonic() - t
    write_accounts(workdir, server, users, args.security, args.after_fetch)

    command = (args.command or default_command()).format(config=shlex.quote(config_path),
                                                          dir=shlex.quote(workdir))
    out = open(os.path.join(workdir, "daemon.out"), "ab")
    dovecot_cpu0 = session_cpu_seconds(server.pid)
    redis_cpu0 = proc_cpu_seconds(redis.process.pid)
    start = time.monotonic()
    daemon = subprocess.Popen(shlex.split(command), cwd=workdir, stdout=out,
                              stderr=subprocess.STDOUT, start_new_session=True)
    first = None
    count = 0
    try:
        deadline = start + args.timeout
        while True:
            count = r("XLEN", STREAM)
            now = time.monotonic()
            if count and first is None:
                first = now
            if count >= expected:
                break
            if daemon.poll() is not None:
                raise RuntimeError(f"daemon exited with {daemon.returncode} after "
                                   f"{count}/{expected} messages; see {workdir}")
            if now > deadline:
                raise RuntimeError(f"timeout: {count}/{expected} messages after "
                                   f"{args.timeout:.0f} s; see {workdir}")
            time.sleep(0.02)
        end = time.monotonic()
        cpu = proc_cpu_seconds(daemon.pid)
        peak_kib = proc_peak_rss_kib(daemon.pid)
        dovecot_cpu = session_cpu_seconds(server.pid) - dovecot_cpu0
        redis_cpu = proc_cpu_seconds(redis.process.pid) - redis_cpu0
        # Exactly once: give stragglers a moment, then the stream must hold
        # one entry per message and no more.
        time.sleep(0.5)
        final = r("XLEN", STREAM)
    finally:
        stop_daemon(daemon)
        out.close()
    wall = end - start
    stream_bytes = r("MEMORY", "USAGE", STREAM, "SAMPLES", "0") or 0
    return {
        "messages": expected,
        "stream_entries": final,
        "duplicates_or_extra": final - expected,
        "wall_s": round(wall, 3),
        "startup_s": round(first - start, 3) if first is not None else None,
        "fetch_s": round(end - first, 3) if first is not None else None,
        "messages_per_s": round(expected / wall, 1),
        "cpu_s": round(cpu, 2),
        "cpu_per_message_ms": round(1000 * cpu / expected, 3),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "dovecot_cpu_s": round(dovecot_cpu, 2),
        "redis_cpu_s": round(redis_cpu, 2),
        "provision_s": round(provision_s, 2),
        "stream_mib": round(stream_bytes / 2**20, 1),
    }


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    args = parse_args(argv)
    dovecot_bin = dc.find_dovecot()
    redis_bin = redis_server.find_redis_server()
    if not dovecot_bin or not redis_bin:
        sys.exit("fido_bench: needs dovecot and redis-server installed")
    # SIGTERM (and SIGINT from a non-interactive shell) must still stop
    # the servers: turn them into SystemExit so the finally: blocks run.
    saved = {sig: signal.signal(sig, _exit_on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    compile_fido()
    workdir = tempfile.mkdtemp(prefix="fido-bench-")
    os.chmod(workdir, 0o755)
    expected = args.accounts * args.messages
    server = dc.Dovecot(os.path.join(workdir, "dovecot"), binary=dovecot_bin,
                        sessions=max(2000, args.workers))
    redis = redis_server.RedisServer(redis_bin, directory=os.path.join(workdir, "redis"))
    os.makedirs(redis.directory, exist_ok=True)
    results = []
    try:
        server.start()
        redis.start()
        config_path = write_config(workdir, redis.url, args.workers, args.extra_toml)
        mix = ", ".join(f"{share:.0%} {size // 1024} KiB{' attachment' if att else ''}"
                        for share, size, att in dc.DEFAULT_MIX)
        print(f"fido bench: {args.accounts} accounts x {args.messages} messages "
              f"({mix}), {args.workers} workers, security {args.security}, "
              f"after_fetch {args.after_fetch}", flush=True)
        for run in range(1, args.runs + 1):
            result = run_once(args, server, redis, workdir, config_path, expected)
            results.append(result)
            print(f"run {run}: {result['messages_per_s']:.1f} messages/s, "
                  f"wall {result['wall_s']:.2f} s (first message after "
                  f"{result['startup_s']} s, then {result['fetch_s']} s), "
                  f"CPU {result['cpu_s']:.2f} s ({result['cpu_per_message_ms']} ms/message), "
                  f"peak RSS {result['peak_rss_mib']} MiB, "
                  f"[Dovecot CPU {result['dovecot_cpu_s']:.2f} s, "
                  f"Redis CPU {result['redis_cpu_s']:.2f} s], "
                  f"stream {result['stream_entries']} entries"
                  + ("" if result["duplicates_or_extra"] == 0
                     else f" ({result['duplicates_or_extra']:+d} UNEXPECTED)"),
                  flush=True)
        if len(results) > 1:
            print("median: %.1f messages/s, wall %.2f s, CPU %.2f s, peak RSS %.1f MiB" % (
                statistics.median(r["messages_per_s"] for r in results),
                statistics.median(r["wall_s"] for r in results),
                statistics.median(r["cpu_s"] for r in results),
                statistics.median(r["peak_rss_mib"] for r in results)))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"args": {k: v for k, v in vars(args).items() if k != "json"},
                           "runs": results}, f, indent=2)
    finally:
        redis.stop()
        server.stop()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if any(r["duplicates_or_extra"] for r in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
