"""The memory of an idle daemon: RSS with 0, 1, 1,000 and 10,000 accounts, and what it imported.

    python bench/idle_rss.py [--accounts 0,1,1000,10000] [--tls] [--idle] [--http LISTEN]

For each account count: a fresh Redis, the mock IMAP server
(``tests/support/mockimap.py``, empty mailboxes) in its own process, and the
real daemon (``twistd -n fido`` through ``bench/fido_run.py``) with
``poll_interval`` 3600 s.  Once every account had its first session (no
account: once the daemon's heartbeat is in Redis) and 2 s more, the daemon's
RSS (``VmRSS``), its high-water mark (``VmHWM``) and the number of modules
it imported are read, then it is stopped.  Accounts reconnect per poll
(``idle = false``) unless ``--idle``: then each holds its connection in
IDLE, and the figure is that of held connections, not of an idle daemon.
Results: one JSON line per count on standard output (and ``--json PATH``).
"""

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.compare import _COUNT_SESSIONS  # noqa: E402
from bench.fido_bench import compile_fido, write_config  # noqa: E402
from bench.scale import start_fido, start_mock, stop  # noqa: E402
from tests.support import redis_server  # noqa: E402
from tests.support.dovecot import free_port  # noqa: E402


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def write_accounts(directory, port, count, tls, ca, idle):
    accounts = [{"id": f"s{k:05d}", "host": "localhost" if tls else "127.0.0.1", "port": port,
                 "security": "tls" if tls else "none", "username": f"user{k}",
                 "password": "password", "mailbox": "INBOX", "after_fetch": "seen",
                 "idle": idle, **({"ca_file": ca} if tls else {})}
                for k in range(1, count + 1)]
    path = os.path.join(directory, "accounts.json")
    with open(path, "w") as f:
        json.dump({"accounts": accounts}, f)
    os.chmod(path, 0o600)


def measure(args, count, workdir, redis, tls_files, ca):
    port = free_port()
    mock = start_mock(port, max(count, 1), 0, tls_files)
    r = redis.client()
    r("FLUSHALL")
    write_accounts(workdir, port, count, args.tls, ca, args.idle)
    config = write_config(workdir, redis.url, args.workers, level="warn")
    if args.http:  # [http] listen (the default config has one): off unless given
        with open(config) as f:
            text = f.read().replace('listen = ""', f"listen = {json.dumps(args.http)}")
        with open(config, "w") as f:
            f.write(text)
    modules_file = os.path.join(workdir, "modules.txt")
    if os.path.exists(modules_file):
        os.unlink(modules_file)
    os.environ["FIDO_MODULES_FILE"] = modules_file
    # the daemon imports fido_tx from this checkout, not the installed one
    # (bench/fido_run.py's directory, not ROOT, is first on its path)
    os.environ.setdefault("FIDO_CODE", ROOT)
    start = time.monotonic()
    fido, _ = start_fido(workdir, config)
    try:
        while True:
            done, errors = r("EVAL", _COUNT_SESSIONS, "0")
            ready = done >= count if count else bool(r("KEYS", "fido:instance:*"))
            if ready:
                break
            if fido.poll() is not None or time.monotonic() - start > args.timeout:
                raise RuntimeError(f"not ready: {done}/{count} sessions; see {workdir}")
            time.sleep(0.1)
        ready_s = time.monotonic() - start
        time.sleep(2.0)
        rss = status_kib(fido.pid, "VmRSS")
        hwm = status_kib(fido.pid, "VmHWM")
        modules = len(open(modules_file).read().split()) if os.path.exists(modules_file) else None
    finally:
        stop(fido)
        stop(mock)
    return {"accounts": count, "tls": args.tls, "idle": args.idle, "errors": errors,
            "ready_s": round(ready_s, 2), "rss_mib": round(rss / 1024, 1),
            "peak_rss_mib": round(hwm / 1024, 1), "modules": modules}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--accounts", default="0,1,1000,10000")
    p.add_argument("--workers", type=int, default=100)
    p.add_argument("--tls", action="store_true")
    p.add_argument("--idle", action="store_true", help="hold connections in IDLE")
    p.add_argument("--http", default="", metavar="LISTEN",
                   help='[http] listen, e.g. "tcp:0:interface=127.0.0.1" (default: off)')
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    compile_fido()
    workdir = tempfile.mkdtemp(prefix="fido-idle-rss-")
    redis = redis_server.RedisServer(redis_server.find_redis_server(),
                                     directory=os.path.join(workdir, "redis"))
    os.makedirs(redis.directory, exist_ok=True)
    tls_files = ca = None
    if args.tls:
        from tests.support import tlsca
        pki = tlsca.files()
        tls_files, ca = (pki.localhost.cert, pki.localhost.key), pki.ca
    results = []
    redis.start()
    try:
        for count in (int(c) for c in args.accounts.split(",") if c):
            res = measure(args, count, workdir, redis, tls_files, ca)
            results.append(res)
            print(json.dumps(res), flush=True)
    finally:
        redis.stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
