"""Fido at scale: 10,000 accounts in one process against the mock IMAP server.

    python bench/scale.py round --accounts 10000 --workers 100 [--tls]
    python bench/scale.py idle  --accounts 10000 --hold 10000,1000 [--tls]

The mock server (``tests/support/mockimap.py``) runs in its own process;
a fresh Redis is started; Fido is the real daemon (``twistd -n fido`` through
``bench/fido_run.py``, with the reactor stall probe).

``round``
    every mailbox is empty ("nothing new"): the time for one full round over
    all accounts (start of the daemon to the last account's session recorded
    in Redis), Fido's CPU seconds per session (CPU from the first recorded
    session to the last, divided by the sessions), its peak RSS, the
    longest reactor stall.
``idle``
    Fido does not keep connections open between polls, so "memory per idle
    connection" is measured on sessions held open: the mock server answers
    STATUS and SELECT only after ``--select-delay`` seconds, and Fido runs with
    ``workers`` = each value of ``--hold``, so that many sessions sit logged
    in and waiting on an open (TLS) connection.  Once every one is
    established, RSS is read; per connection = the RSS difference between two
    hold counts divided by the difference in connections (the accounts, the
    imports and the rest are the same in both runs).
"""

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import psutil  # noqa: E402

from bench.compare import _COUNT_SESSIONS, Sampler, fido_command  # noqa: E402
from bench.fido_bench import compile_fido, write_config  # noqa: E402
from tests.support import redis_server  # noqa: E402
from tests.support.dovecot import free_port  # noqa: E402


def serve(argv):
    """The mock server process: ``scale.py serve PORT ACCOUNTS SELECT_DELAY [CERT KEY]``."""
    from twisted.internet import reactor

    from tests.support.mockimap import Behaviour, Fault, MockIMAPServer, MockMailbox

    port, accounts, delay = int(argv[0]), int(argv[1]), float(argv[2])
    tls = (argv[3], argv[4]) if len(argv) > 4 else None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def factory(user):
        m = re.match(r"^user(\d+)$", user)
        if not m or not 1 <= int(m.group(1)) <= accounts:
            return None
        return MockMailbox("password", [], uidvalidity=int(m.group(1)))

    server = MockIMAPServer(reactor, tls=tls, account_factory=factory, keep_records=False)
    # held sessions wait on the first command after LOGIN (STATUS), or SELECT
    faults = (Fault("STATUS", "delay", delay=delay),
              Fault("SELECT", "delay", delay=delay)) if delay else ()
    server.script(None, Behaviour(faults=faults))
    server.listen(port, "127.0.0.1", implicit_tls=tls is not None, backlog=8192)
    print("listening", flush=True)
    reactor.run()


def write_files(directory, redis_url, port, accounts, workers, tls, ca, command_timeout):
    acc = [{"id": f"s{k:05d}", "host": "localhost" if tls else "127.0.0.1", "port": port,
            "security": "tls" if tls else "none", "username": f"user{k}",
            "password": "password", "mailbox": "INBOX", "after_fetch": "seen",
            **({"ca_file": ca} if tls else {})}
           for k in range(1, accounts + 1)]
    path = os.path.join(directory, "accounts.json")
    with open(path, "w") as f:
        json.dump({"accounts": acc}, f)
    os.chmod(path, 0o600)
    # warn: no log line per session, thousands of them a second
    return write_config(directory, redis_url, workers, level="warn", extra=f"""[imap]
command_timeout = {command_timeout}
connect_timeout = 120
greeting_timeout = 120""")


def _raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_mock(port, accounts, delay, tls_files):
    args = [sys.executable, os.path.abspath(__file__), "serve", str(port), str(accounts),
            str(delay)] + (list(tls_files) if tls_files else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, cwd=ROOT, preexec_fn=_raise_nofile)
    line = proc.stdout.readline()
    if b"listening" not in line:
        raise RuntimeError("mock server did not start")
    return proc


def start_fido(workdir, config):
    stall = os.path.join(workdir, "stall.json")
    env = dict(os.environ, FIDO_STALL_FILE=stall)
    out = open(os.path.join(workdir, "daemon.out"), "ab")
    proc = subprocess.Popen(fido_command(workdir, config), cwd=workdir, stdout=out,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=_raise_nofile)
    return proc, stall


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def established(pid, port):
    try:
        return sum(1 for c in psutil.Process(pid).net_connections(kind="tcp")
                   if c.raddr and c.raddr.port == port and c.status == "ESTABLISHED")
    except psutil.Error:
        return 0


def cpu_of(pid):
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def run_round(args, workdir, redis, tls_files, ca):
    port = free_port()
    mock = start_mock(port, args.accounts, 0, tls_files)
    r = redis.client()
    r("FLUSHALL")
    config = write_files(workdir, redis.url, port, args.accounts, args.workers, args.tls, ca, 60)
    mock_cpu0 = cpu_of(mock.pid)
    start = time.monotonic()
    fido, stall_file = start_fido(workdir, config)
    sampler = Sampler(fido.pid, interval=0.1)
    sampler.start()
    first_t = first_cpu = None
    try:
        while True:
            done, errors = r("EVAL", _COUNT_SESSIONS, "0")
            if done and first_t is None:
                first_t, first_cpu = time.monotonic(), cpu_of(fido.pid)
            if done >= args.accounts:
                break
            if fido.poll() is not None or time.monotonic() - start > args.timeout:
                raise RuntimeError(f"round did not finish: {done}/{args.accounts}; see {workdir}")
            time.sleep(0.1)
        end = time.monotonic()
        cpu = cpu_of(fido.pid)
        peak = sampler.stop()
        mock_cpu = cpu_of(mock.pid) - mock_cpu0
    finally:
        stop(fido)
        stop(mock)
    with open(stall_file) as f:
        stall = json.load(f)
    sessions = args.accounts
    return {
        "mode": "round", "tls": args.tls, "accounts": sessions, "workers": args.workers,
        "round_s": round(end - start, 2), "first_session_after_s": round(first_t - start, 2),
        "sessions_per_s": round(sessions / (end - first_t), 1),
        "cpu_s": round(cpu, 2), "cpu_ms_per_session": round(1000 * (cpu - first_cpu) / sessions, 3),
        "errors": errors, "peak_rss_mib": round(peak / 2**20, 1),
        "mock_cpu_s": round(mock_cpu, 2), "stall_max_ms": stall.get("max_ms"), "gc_max_ms": stall.get("gc_max_ms"),
        "stalls_over_100ms": stall.get("over_100ms"),
        **{k: stall[k] for k in ("gc_tracked", "gc_types") if k in stall},
    }


def run_hold(args, workdir, redis, tls_files, ca, hold):
    port = free_port()
    mock = start_mock(port, args.accounts, args.select_delay, tls_files)
    r = redis.client()
    r("FLUSHALL")
    config = write_files(workdir, redis.url, port, args.accounts, hold, args.tls, ca,
                         args.select_delay + 60)
    start = time.monotonic()
    fido, stall_file = start_fido(workdir, config)
    sampler = Sampler(fido.pid, interval=0.2)
    sampler.start()
    try:
        n = 0
        while time.monotonic() - start < args.timeout:
            time.sleep(1.0)
            n = established(fido.pid, port)
            if n >= hold:
                break
        ramp = time.monotonic() - start
        time.sleep(2.0)  # let the last handshakes settle
        n = established(fido.pid, port)
        rss = psutil.Process(fido.pid).memory_info().rss
        cpu = cpu_of(fido.pid)
        peak = sampler.stop()
    finally:
        stop(fido)
        stop(mock)
    with open(stall_file) as f:
        stall = json.load(f)
    return {"mode": "idle", "tls": args.tls, "accounts": args.accounts, "held": n,
            "wanted": hold, "ramp_s": round(ramp, 1), "rss_mib": round(rss / 2**20, 1),
            "peak_rss_mib": round(peak / 2**20, 1), "cpu_s": round(cpu, 2),
            "stall_max_ms": stall.get("max_ms"), "gc_max_ms": stall.get("gc_max_ms"), "stalls_over_100ms": stall.get("over_100ms"),
            **{k: stall[k] for k in ("gc_tracked", "gc_types") if k in stall}}


def table(path):
    """The README's scale table, from the JSON lines of ``--json PATH`` runs
    (the last result of each kind and transport wins)."""
    last = {}
    with open(path) as f:
        for line in f:
            res = json.loads(line)
            key = (res["mode"], res["tls"], res.get("held") or res.get("accounts"))
            last[key] = res

    def pick(mode, tls, held=None):
        found = [r for (m, t, n), r in last.items() if m == mode and t == tls
                 and (held is None or n == held)]
        return found[-1] if found else {}

    def cell(res, key, fmt, unit=""):
        v = res.get(key)
        return "-" if v is None else format(v, fmt) + unit

    held_counts = sorted({n for (m, _, n) in last if m == "idle"}, reverse=True)
    big = held_counts[0] if held_counts else None
    rows = []
    rp, rt = pick("round", False), pick("round", True)
    n = rp.get("accounts") or rt.get("accounts")
    rows.append((f"full round, {n} empty", cell(rp, "round_s", ".1f", " s"),
                 cell(rt, "round_s", ".1f", " s"),
                 f"{rp.get('workers', rt.get('workers'))} workers; "
                 f"{cell(rp, 'sessions_per_s', '.0f')} / {cell(rt, 'sessions_per_s', '.0f')} "
                 "sessions/s"))
    rows.append(("CPU per empty session", cell(rp, "cpu_ms_per_session", ".2f", " ms"),
                 cell(rt, "cpu_ms_per_session", ".2f", " ms"), "after start-up"))
    rows.append(("peak RSS in the round", cell(rp, "peak_rss_mib", ".0f", " MiB"),
                 cell(rt, "peak_rss_mib", ".0f", " MiB"), ""))
    rows.append(("longest stall, round", cell(rp, "stall_max_ms", ".0f", " ms"),
                 cell(rt, "stall_max_ms", ".0f", " ms"),
                 f"of which GC {cell(rp, 'gc_max_ms', '.0f')} / {cell(rt, 'gc_max_ms', '.0f')} ms"))
    pp, pt = pick("idle-per-connection", False), pick("idle-per-connection", True)
    between = pp.get("between") or pt.get("between") or ["?", "?"]
    rows.append(("memory per held session", cell(pp, "kib_per_connection", ".1f", " KiB"),
                 cell(pt, "kib_per_connection", ".1f", " KiB"),
                 f"(RSS at {between[0]} - at {between[1]}) / {between[0] - between[1]}"
                 if all(isinstance(b, int) for b in between) else ""))
    if big is not None:
        ip, it = pick("idle", False, big), pick("idle", True, big)
        rows.append((f"RSS, {big} held", cell(ip, "rss_mib", ".0f", " MiB"),
                     cell(it, "rss_mib", ".0f", " MiB"), ""))
        rows.append((f"longest stall, {big} held", cell(ip, "stall_max_ms", ".0f", " ms"),
                     cell(it, "stall_max_ms", ".0f", " ms"),
                     f"the garbage collector: {cell(ip, 'gc_max_ms', '.0f')} / "
                     f"{cell(it, 'gc_max_ms', '.0f')} ms"))
    head = ("measure", "plain", "TLS", "notes")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(4)]
    rule = "  ".join("=" * w for w in widths)
    out = [rule, "  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(), rule]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    out.append(rule)
    print("\n".join(out))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        return serve(argv[1:])
    if argv and argv[0] == "table":
        return table(argv[1])
    compile_fido()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("round", "idle"))
    p.add_argument("--accounts", type=int, default=10000)
    p.add_argument("--workers", type=int, default=100, help="round: fido.workers")
    p.add_argument("--hold", default="10000,1000",
                   help="idle: sessions held open, two or more counts")
    p.add_argument("--select-delay", type=float, default=300.0)
    p.add_argument("--tls", action="store_true", help="implicit TLS (test CA)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", help="append the results (one JSON line each) to this file")
    args = p.parse_args(argv)
    _raise_nofile()
    tls_files = ca = None
    if args.tls:
        from tests.support import tlsca

        pki = tlsca.files()
        tls_files, ca = (pki.localhost.cert, pki.localhost.key), pki.ca
    workdir = tempfile.mkdtemp(prefix="fido-scale-")
    redis = redis_server.RedisServer(redis_server.find_redis_server(),
                                     directory=os.path.join(workdir, "redis"))
    os.makedirs(redis.directory, exist_ok=True)
    redis.start()
    results = []
    try:
        if args.mode == "round":
            results.append(run_round(args, workdir, redis, tls_files, ca))
        else:
            for hold in [int(h) for h in args.hold.split(",")]:
                results.append(run_hold(args, workdir, redis, tls_files, ca, hold))
            a, b = results[0], results[-1]
            if a["held"] != b["held"]:
                per = (a["rss_mib"] - b["rss_mib"]) * 1024 / (a["held"] - b["held"])
                results.append({"mode": "idle-per-connection", "tls": args.tls,
                                "kib_per_connection": round(per, 1),
                                "between": [a["held"], b["held"]]})
    finally:
        redis.stop()
    for res in results:
        print(json.dumps(res), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(res) + "\n")
    print(f"workdir {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
