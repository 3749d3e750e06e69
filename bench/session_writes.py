"""CPU of a session's Redis writes: the account hash and the history entry, two commands or one script.

    python bench/session_writes.py [--sessions 2000] [--spacing-ms 1] [--rounds 3]

Starts a redis-server and, in ONE process on the daemon's own
``RedisConnection``, records ``--sessions`` session results spaced
``--spacing-ms`` apart (each in its own reactor turn, as sessions end in the
daemon), alternating round by round between

``two``
    ``HSET fido:account:<id>`` then the history script (``EVALSHA``), as
    before issue 15's round-trip work;
``one``
    :meth:`AccountState.record_session` with the history attached: one
    ``EVALSHA`` writing both.

and prints the CPU (user + sys of this process) per session of each.  The
spacing's idle time costs no CPU; the timers that space the sessions are
the same in both.
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
    p.add_argument("--sessions", type=int, default=2000)
    p.add_argument("--spacing-ms", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import defer, reactor, task

    from fido_tx.accounts.model import Account
    from fido_tx.observe.history import SessionLog
    from fido_tx.outcome import SessionResult
    from fido_tx.redis.state import AccountState
    from tests.support import redis_server, redisconn

    server = redis_server.RedisServer(redis_server.find_redis_server()).start()
    accounts = [Account(id=f"a{k}", host="h", password=f"pw{k}") for k in range(500)]
    results = {"two": [0.0, 0], "one": [0.0, 0]}

    @defer.inlineCallbacks
    def run():
        conn = yield redisconn.shared_connection(reactor, server.port)
        log = SessionLog(reactor, conn.execute, keep=50, script=conn.script)
        separate = AccountState(conn)
        together = AccountState(conn, history=log)
        yield conn.execute("PING")

        def record(name, k):
            account = accounts[k % len(accounts)]
            result = SessionResult(account.id)
            if name == "two":
                return defer.gatherResults([separate.record_session(result),
                                            log.record(account, result)])
            return together.record_session(result, account=account)

        @defer.inlineCallbacks
        def one_round(name, n):
            c0 = cpu()
            sent = []
            for k in range(n):
                sent.append(record(name, k))
                yield task.deferLater(reactor, args.spacing_ms / 1000.0, lambda: None)
            yield defer.gatherResults(sent)
            results[name][0] += cpu() - c0
            results[name][1] += n

        for name in ("two", "one"):
            yield one_round(name, 200)  # warm-up: scripts loaded, code paths hot
        for r in results.values():
            r[:] = [0.0, 0]
        for n in range(args.rounds):
            for name in (("two", "one") if n % 2 == 0 else ("one", "two")):
                yield one_round(name, args.sessions)
        print(f"{args.sessions} sessions x {args.rounds} rounds, {args.spacing_ms:g} ms apart")
        for name, (spent, count) in results.items():
            print(f"{name}: {spent * 1000 / count:.3f} ms CPU per session")
        yield redisconn.close(conn)

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
