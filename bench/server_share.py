"""What an IMAP command sequence costs Dovecot: its CPU per session, one
variant after another on freshly provisioned mailboxes, in one run.

Each variant is a list of steps; a step's commands are written together
(pipelined) and their tagged answers awaited.  Every variant runs ``--sessions``
sessions (one per account, one after another, on mailboxes of ``--messages``
new messages just provisioned, as the benchmark's first poll finds them), and
the rounds interleave the variants so that a change of the machine's load
touches all of them.  Dovecot's CPU is that of every process in its session
(``bench/fido_bench.session_cpu_seconds``), read before and after.

    .venv/bin/python bench/server_share.py --sessions 300 --rounds 3

The differences between variants are what each command costs the server
(bench/README.rst, "The servers' share").
"""

import argparse
import os
import signal
import socket
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.fido_bench import session_cpu_seconds  # noqa: E402
from tests.support import dovecot as dc  # noqa: E402

KW = b" UNKEYWORD $FidoTooLarge UNKEYWORD $FidoRejected"
LOGIN = b"LOGIN"
STATUS = b"STATUS INBOX (UNSEEN)"
SELECT = b"SELECT INBOX"
SEARCH = b"UID SEARCH UNSEEN"
SEARCH_KW = SEARCH + KW
SAVE = b"UID SEARCH RETURN (SAVE) UNSEEN" + KW
SIZES_SAVED = b"UID FETCH $ (UID RFC822.SIZE)"
SIZES = b"UID FETCH 1:{m} (UID RFC822.SIZE)"
BODIES = b"UID FETCH 1:{m} (UID BODY.PEEK[])"
STORE = b"UID STORE 1:{m} +FLAGS.SILENT (\\Seen)"
WAIT_LOGOUT = b"LOGOUT"
CLOSE_LOGOUT = b"LOGOUT!"  # written, not waited for: the connection closed

#: name -> steps (lists of commands written together)
VARIANTS = {
    "login, logout": [[LOGIN], [CLOSE_LOGOUT]],
    "login+status": [[LOGIN, STATUS], [CLOSE_LOGOUT]],
    "login, select": [[LOGIN], [SELECT], [CLOSE_LOGOUT]],
    "login, select+search": [[LOGIN], [SELECT, SEARCH_KW], [CLOSE_LOGOUT]],
    "login+select+search": [[LOGIN, SELECT, SEARCH_KW], [CLOSE_LOGOUT]],
    "raw (waited logout)": [[LOGIN], [SELECT], [SEARCH], [BODIES], [STORE], [WAIT_LOGOUT]],
    "raw": [[LOGIN], [SELECT], [SEARCH], [BODIES], [STORE], [CLOSE_LOGOUT]],
    "raw + sizes": [[LOGIN], [SELECT], [SEARCH], [SIZES], [BODIES], [STORE], [CLOSE_LOGOUT]],
    "fido (main)": [[LOGIN, STATUS], [SELECT, SEARCH_KW], [SIZES], [BODIES], [STORE],
                    [CLOSE_LOGOUT]],
    "fido, no status": [[LOGIN, SELECT, SEARCH_KW], [SIZES], [BODIES], [STORE],
                        [CLOSE_LOGOUT]],
    "fido, no status, waited logout": [[LOGIN, SELECT, SEARCH_KW], [SIZES], [BODIES], [STORE],
                                       [WAIT_LOGOUT]],
    "fido, no status, searchres": [[LOGIN, SELECT], [SAVE, SIZES_SAVED], [BODIES], [STORE],
                                   [CLOSE_LOGOUT]],
}


class Session:
    def __init__(self, port, user, password, m):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.n = 0
        self.login = b'LOGIN "%s" "%s"' % (user.encode(), password.encode())
        self.m = m
        self._line()  # greeting

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("server closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        if line.endswith(b"}"):  # a literal: skip it and the rest of the line
            n = int(line[line.rindex(b"{") + 1:-1])
            while len(self.buf) < n:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise EOFError("server closed")
                self.buf += chunk
            self.buf = self.buf[n:]
            return line + b" " + self._line()
        return line

    def step(self, commands):
        tags, out = [], []
        close = False
        for c in commands:
            if c == CLOSE_LOGOUT:
                c, close = WAIT_LOGOUT, True
            elif c == LOGIN:
                c = self.login
            self.n += 1
            tag = b"a%d" % self.n
            tags.append(tag)
            out.append(tag + b" " + c.replace(b"{m}", b"%d" % self.m) + b"\r\n")
        self.sock.sendall(b"".join(out))
        if close:
            self.sock.close()
            return
        for tag in tags:
            while True:
                line = self._line()
                if line.startswith(tag + b" "):
                    if not line.startswith(tag + b" OK"):
                        raise RuntimeError(f"{line!r}")
                    break
        if commands[-1] == WAIT_LOGOUT:
            self.sock.close()


def run_variant(server, users, steps, m):
    server.provision(len(users), m)
    before = session_cpu_seconds(server.pid)
    for user, password in users.items():
        s = Session(server.port, user, password, m)
        for step in steps:
            s.step(step)
    # let the last processes exit and be counted in the master's cutime
    after = _settled(server.pid)
    return after - before


def _settled(pid, tries=50):
    import time

    last = None
    for _ in range(tries):
        now = session_cpu_seconds(pid)
        if now == last:
            return now
        last = now
        time.sleep(0.1)
    return last


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=300)
    p.add_argument("--messages", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default="", help="variant names separated by semicolons")
    args = p.parse_args(argv)
    binary = dc.find_dovecot()
    if binary is None:
        sys.exit("server_share: dovecot is not installed")
    # SIGTERM stops Dovecot too (the finally: below)
    signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(SystemExit(143)))
    names = [n for n in VARIANTS if not args.only or n in args.only.split(";")]
    with tempfile.TemporaryDirectory(prefix="fido-share-") as tmp:
        server = dc.Dovecot(os.path.join(tmp, "dovecot"), binary=binary, tls=False)
        server.start()
        try:
            users = server.provision(args.sessions, args.messages)
            run_variant(server, users, VARIANTS["raw"], args.messages)  # warm
            got = {n: [] for n in names}
            for r in range(args.rounds):
                for n in names:
                    got[n].append(run_variant(server, users, VARIANTS[n], args.messages))
                print(f"round {r + 1} done", file=sys.stderr)
        finally:
            server.stop()
    print(f"Dovecot CPU per session, ms (median of {args.rounds}; {args.sessions} sessions, "
          f"{args.messages} new messages each; all rounds)")
    for n in names:
        ms = [1000 * s / args.sessions for s in got[n]]
        print(f"  {n:30s} {statistics.median(ms):6.3f}   "
              + " ".join(f"{x:.3f}" for x in ms))


if __name__ == "__main__":
    main()
