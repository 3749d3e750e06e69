"""The Redis side of IMAP sessions alone: Fido's and Redis's CPU per session.

    python bench/redis_session.py [--sessions 2000] [--messages 5] [--workers 16]
                                  [--rounds 3] [--spacing-ms 0] [--profile PATH]

Starts a redis-server and, in ONE process on the daemon's own
``RedisConnection``, runs ``--sessions`` sessions, ``--workers`` at a time,
each doing what a poll of a 1000x5 run asks of Redis: the sink's
``filter_new`` of ``--messages`` new UIDs, one ``deliver`` of them (~4 KiB
each, the stream sink), and ``AccountState.record_session`` of its result
(``--messages 0``: an empty poll, only the account state).  Each message
carries an identity, as the IMAP source's do (the sink records it).  Every round
uses new accounts, so every message is new.  Prints, per round and as the
median, the client's CPU (user + sys of this process) and Redis's
(``/proc/<pid>/stat``) per session, and the Redis commands per session
(``INFO commandstats``).  The account state is written as the daemon writes
it (behind, where the checkout does), and not waited for.  ``--profile PATH`` writes a cProfile of the last
round.  ``--spacing-ms T``: each worker waits T ms before each session
(staggered), so that sessions end in reactor turns of their own as in the
daemon; the idle time costs no CPU.  ``FIDO_CODE=DIR`` runs the Fido code of another checkout.
"""

import argparse
import os
import statistics
import sys

#: ``FIDO_CODE=DIR`` measures another checkout (say the branch point)
sys.path.insert(0, os.environ.get("FIDO_CODE")
                or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RAW = (b"From: a@example.test\r\nTo: b@example.test\r\nSubject: bench\r\n"
       b"Message-ID: <%d@bench>\r\n\r\n" + b"x" * 4000 + b"\r\n")


def cpu():
    t = os.times()
    return t.user + t.system


def proc_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def commands(client):
    total = 0
    for line in client("INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_") and "calls=" in line:
            total += int(line.split("calls=")[1].split(",")[0])
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=2000)
    p.add_argument("--messages", type=int, default=5)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--spacing-ms", type=float, default=0.0,
                   help="each worker waits this long between its sessions (the IMAP "
                        "side's time), so sessions end in reactor turns of their own")
    p.add_argument("--profile")
    args = p.parse_args(argv)

    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import defer, reactor, task

    from fido_tx.outcome import SessionResult
    from fido_tx.redis.state import AccountState
    from fido_tx.sinks import SinkContext, stream
    from fido_tx.sinks.message import Message
    from fido_tx.timefmt import utc_now_iso
    from tests.support import redis_server, redisconn

    server = redis_server.RedisServer(redis_server.find_redis_server()).start()
    client = server.client()
    rows = []
    written = []

    async def session(sink, state, account):
        ids = [str(u) for u in range(1, args.messages + 1)]
        new = await sink.filter_new(account, "INBOX", "7", ids) if ids else []
        if new:
            now = utc_now_iso()
            # with an identity, as the IMAP source gives every message
            delivery = await sink.deliver([
                Message(account, "INBOX", "7", i, RAW % int(i), fetched_at=now,
                        identity="m%016x" % hash((account, i))) for i in new])
            assert len(delivery.new) == len(new), delivery
        # the daemon does not wait for it either (observe/status.py)
        written.append(state.record_session(SessionResult(account, fetched=len(new))))

    async def worker(sink, state, names):
        for k, account in enumerate(names):
            if args.spacing_ms:
                # staggered: the workers' sessions end at different times
                await task.deferLater(reactor, args.spacing_ms * (1 + (k == 0) * offset(names))
                                      / 1000.0, lambda: None)
            await session(sink, state, account)

    def offset(names):
        return (hash(names[0]) % 1000) / 1000.0

    async def one_round(sink, state, r):
        names = [f"r{r}a{k}" for k in range(args.sessions)]
        parts = [names[w::args.workers] for w in range(args.workers)]
        n0, c0, s0 = commands(client), cpu(), proc_cpu(server.process.pid)
        await defer.gatherResults([defer.ensureDeferred(worker(sink, state, part))
                                   for part in parts])
        await defer.gatherResults(written)
        written.clear()
        c1, s1 = cpu(), proc_cpu(server.process.pid)
        n1 = commands(client) - 1  # this INFO
        rows.append(((c1 - c0) * 1000 / args.sessions, (s1 - s0) * 1000 / args.sessions,
                     (n1 - n0) / args.sessions))

    async def run():
        conn = await redisconn.shared_connection(reactor, server.port)
        sink = stream.build("default", stream.validate({"stream": "fido:messages"}, "."),
                            SinkContext(reactor, conn))
        # as the daemon makes it (service.py): written behind where the
        # checkout has that
        from fido_tx.redis import state as state_mod

        delay = getattr(state_mod, "WRITE_BEHIND", 0)
        state = AccountState(conn, clock=reactor, delay=delay) if delay else AccountState(conn)
        await conn.execute(b"PING")
        await one_round(sink, state, "warm")
        rows.clear()
        prof = None
        for r in range(args.rounds):
            if args.profile and r == args.rounds - 1:
                import cProfile

                prof = cProfile.Profile()
                prof.enable()
            await one_round(sink, state, r)
            if prof is not None:
                prof.disable()
                prof.dump_stats(args.profile)
            client("FLUSHALL")
        await redisconn.close(conn)

    def done(result):
        if result is not None and hasattr(result, "printTraceback"):
            result.printTraceback()
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()).addBoth(done))
    try:
        reactor.run()
    finally:
        server.close()
    print(f"{args.sessions} sessions x {args.messages} messages, {args.workers} at a time, "
          f"{args.rounds} rounds (ms per session: Fido CPU, Redis CPU; commands)")
    for k, (c, s, n) in enumerate(rows):
        print(f"  round {k}: {c:.3f} ms  {s:.3f} ms  {n:.2f}")
    if rows:
        med = [statistics.median(r[i] for r in rows) for i in range(3)]
        print(f"median: Fido {med[0]:.3f} ms  Redis {med[1]:.3f} ms  {med[2]:.2f} commands")


if __name__ == "__main__":
    main()
