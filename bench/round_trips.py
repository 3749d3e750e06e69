"""Round trips and CPU of an empty reconnecting poll, per way of talking to the server.

    python bench/round_trips.py [--accounts 300] [--workers 16] [--security none|tls]
                                [--rounds 3]

Starts a Dovecot with ``--accounts`` users (empty INBOX), then, in ONE
process and alternating round by round, runs one empty session per account
(``ImapSession``, ``--workers`` at a time, one shared ``Connector`` as in the
daemon) in each variant:

``serial``
    LOGIN, then STATUS after its answer; LOGOUT and wait for its answer
    (before issue 15's round-trip work);
``pipelined``
    STATUS written with LOGIN; LOGOUT written and the connection closed
    without waiting (now).

It prints per variant the CPU (user + sys of this process) per session,
the IMAP reads per session (``dataReceived`` calls: each one a wake-up of
the process for data from the server) and the command lines written in
separate turns.  The sink is a ``MemorySink``: no Redis here.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu():
    t = os.times()
    return t.user + t.system


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--accounts", type=int, default=300)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--security", choices=("none", "tls"), default="none")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import defer, reactor, task

    from fido_tx.accounts.model import Account
    from fido_tx.config import ImapSettings
    from fido_tx.sources.imap import client, login
    from fido_tx.sources.imap.connect import Connector
    from fido_tx.sources.imap.session import ImapSession
    from fido_tx.testing import MemorySink
    from tests.support import dovecot as ds

    from fido_tx import resolve

    resolve.install(reactor)  # as the daemon does: no resolver thread per connect
    server = ds.Dovecot(tls=args.security == "tls", sessions=args.workers * 4 + 20)
    users = {f"rt{k:04d}": f"pw{k}" for k in range(args.accounts)}
    server.add_users(users)
    server.start()
    port = server.ssl_port if args.security == "tls" else server.port
    accounts = [Account(id=u, host="localhost" if args.security == "tls" else "127.0.0.1",
                        port=port, username=u, password=pw, security=args.security,
                        ca_file=server.ca_file if args.security == "tls" else None)
                for u, pw in users.items()]
    settings = ImapSettings()
    counts = {"reads": 0, "writes": 0}
    real_receive = client.FidoIMAP4Client.dataReceived
    real_send = client.FidoIMAP4Client.sendLine

    def counting_receive(self, data):
        counts["reads"] += 1
        return real_receive(self, data)

    def counting_send(self, line):
        counts["writes"] += 1
        return real_send(self, line)

    client.FidoIMAP4Client.dataReceived = counting_receive
    client.FidoIMAP4Client.sendLine = counting_send
    new_logout = login.ImapConnection.logout

    async def waiting_logout(self, timeout):  # the LOGOUT before this work
        proto = self.proto
        if proto is None or proto.closed:
            return
        if proto.state is not None and proto.error is None:
            proto.logging_out = True
            try:
                await proto.command(b"LOGOUT", timeout=timeout)
            except Exception:
                pass
        self.abort()

    connectors = {"serial": Connector(reactor), "pipelined": Connector(reactor)}
    connectors["serial"].pipelines_login = lambda account: False
    results = {name: {"cpu": 0.0, "sessions": 0, "reads": 0, "writes": 0, "failed": 0}
               for name in connectors}

    @defer.inlineCallbacks
    def one_round(name):
        login.ImapConnection.logout = waiting_logout if name == "serial" else new_logout
        connector = connectors[name]
        queue = list(accounts)

        @defer.inlineCallbacks
        def worker():
            while queue:
                account = queue.pop()
                result = yield ImapSession(reactor, account, MemorySink(), settings,
                                           connector=connector, debug=False).poll()
                if not result.ok:
                    results[name]["failed"] += 1
                    print(name, result.kind, result.message, file=sys.stderr)

        counts.update(reads=0, writes=0)
        c0 = cpu()
        yield defer.gatherResults([worker() for _ in range(args.workers)])
        # let the last closes happen inside the measured time
        yield task.deferLater(reactor, 0.2, lambda: None)
        r = results[name]
        r["cpu"] += cpu() - c0
        r["sessions"] += len(accounts)
        r["reads"] += counts["reads"]
        r["writes"] += counts["writes"]

    @defer.inlineCallbacks
    def run():
        # a first round of each: TLS session caches, the connector's
        # knowledge of the server, imports (not measured)
        for name in connectors:
            yield one_round(name)
        for r in results.values():
            r.update(cpu=0.0, sessions=0, reads=0, writes=0)
        for n in range(args.rounds):
            for name in (("serial", "pipelined") if n % 2 == 0 else ("pipelined", "serial")):
                yield one_round(name)
        print(f"{args.accounts} accounts, {args.workers} workers, security {args.security}, "
              f"{args.rounds} rounds (alternating), Dovecot {server.version}")
        for name, r in results.items():
            n = r["sessions"]
            print(f"{name:10s} CPU {r['cpu'] * 1000 / n:6.3f} ms/session  "
                  f"reads {r['reads'] / n:5.2f}/session  lines written "
                  f"{r['writes'] / n:5.2f}/session  failed {r['failed']}")

    def done(result):
        if result is not None and hasattr(result, "printTraceback"):
            result.printTraceback()
        reactor.stop()

    reactor.callWhenRunning(lambda: run().addBoth(done))
    try:
        reactor.run()
    finally:
        server.close()


if __name__ == "__main__":
    main()
