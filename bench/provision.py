"""Run a local Dovecot with N accounts x M messages until Ctrl-C.

For trying Fido by hand against real mail, or profiling it in your own way::

    python bench/provision.py --accounts 10 --messages 5 --dir /tmp/fido-try

writes ``/tmp/fido-try/accounts.json`` (plain JSON, ``ca_file`` set to the
test CA) and ``fido.toml`` (when ``--redis-url`` is given), prints the
ports, and keeps Dovecot running.  Sending SIGUSR1 resets every mailbox to
the same mail again.
"""

import argparse
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.fido_bench import write_accounts, write_config  # noqa: E402
from tests.support import dovecot as dc  # noqa: E402


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--accounts", type=int, default=10)
    p.add_argument("--messages", type=int, default=5)
    p.add_argument("--dir", required=True, help="directory for Dovecot, accounts.json, fido.toml")
    p.add_argument("--security", choices=("tls", "starttls", "none"), default="tls")
    p.add_argument("--after-fetch", default="seen")
    p.add_argument("--redis-url", default="", help="also write fido.toml using this Redis")
    p.add_argument("--workers", type=int, default=100)
    args = p.parse_args(argv)

    binary = dc.find_dovecot()
    if binary is None:
        sys.exit("provision: dovecot is not installed")
    directory = os.path.abspath(args.dir)
    os.makedirs(directory, exist_ok=True)
    # SIGTERM (and SIGINT from a non-interactive shell) must still stop
    # the servers: turn them into SystemExit so the finally: blocks run.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    server = dc.Dovecot(os.path.join(directory, "dovecot"), binary=binary)
    server.start()
    try:
        users = server.provision(args.accounts, args.messages)
        accounts = write_accounts(directory, server, users, args.security, args.after_fetch)
        print(f"dovecot: imap 127.0.0.1:{server.port} (STARTTLS), imaps 127.0.0.1:{server.ssl_port}, "
              f"log {server.log_path}")
        print(f"accounts: {accounts} ({len(users)} accounts x {args.messages} messages)")
        if args.redis_url:
            print(f"config: {write_config(directory, args.redis_url, args.workers)}")
        print("Ctrl-C stops; kill -USR1 %d resets the mailboxes" % os.getpid(), flush=True)

        def reset(signum, frame):
            server.provision(args.accounts, args.messages)
            print("mailboxes reset", flush=True)

        signal.signal(signal.SIGUSR1, reset)
        while True:
            signal.pause()
    except SystemExit:  # Ctrl-C or SIGTERM: a normal way to stop
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
