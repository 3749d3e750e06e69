"""What a wake-up costs: N held plain connections to a local Dovecot, one
``UID SEARCH UNSEEN`` each every INTERVAL seconds, with no Fido code.

    .venv/bin/python bench/wakeups.py MODE [N [INTERVAL]]

MODE ``tw-spread``: a bare Twisted ``LineOnlyReceiver`` per connection, the
polls spread over the interval (each its own timer, its own wake-up);
``tw-batch``: the same polls issued together in one reactor turn per
interval; ``aio``: bare asyncio streams, spread.  Prints the process's CPU
(user+sys) per poll.  On this VM (2026-11-29, 300 connections, 5 s):
tw-spread 0.744 ms, tw-batch 0.108 ms, aio 0.856 ms: a wake-up of the
process costs far more than the work of one poll (bench/README.rst).
"""

import asyncio
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def cpu():
    t = os.times()
    return t.user + t.system


def main():
    mode = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0
    from tests.support import dovecot as ds

    server = ds.Dovecot(tls=False, sessions=n + 10)
    users = {f"u{k:04d}@fido.test": f"pw{k}" for k in range(n)}
    server.add_users(users)
    server.start()
    try:
        if mode.startswith("tw"):
            run_twisted(mode, server.port, users, interval)
        else:
            asyncio.run(run_asyncio(server.port, users, interval))
    finally:
        server.close()


def run_twisted(mode, port, users, interval, rounds=3):
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import defer, endpoints, reactor, task

    from bench.held_poll import bare_search_class

    Poller = bare_search_class()  # log in, SELECT, then one UID SEARCH per search()

    @defer.inlineCallbacks
    def run():
        ps = yield defer.gatherResults([
            endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                      Poller(u, p)) for u, p in users.items()])
        yield defer.gatherResults([p.ready for p in ps])
        c0 = cpu()
        if mode == "tw-spread":
            loops = []
            for k, p in enumerate(ps):
                loop = task.LoopingCall(p.search)
                loops.append(loop)
                reactor.callLater(interval * k / len(ps), loop.start, interval, True)
            yield task.deferLater(reactor, rounds * interval, lambda: None)
            for loop in loops:
                if loop.running:
                    loop.stop()
        else:
            loop = task.LoopingCall(lambda: [p.search() for p in ps])
            loop.start(interval, True)
            yield task.deferLater(reactor, rounds * interval, lambda: None)
            loop.stop()
        yield task.deferLater(reactor, 0.5, lambda: None)
        got = sum(p.searches for p in ps)
        print(mode, len(ps), "polls", got, "ms/poll %.3f" % ((cpu() - c0) * 1000 / got))

    reactor.callWhenRunning(lambda: run().addBoth(lambda r: (r and print(r), reactor.stop())))
    reactor.run()


async def run_asyncio(port, users, interval, rounds=3):
    async def connect(user, password):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await r.readline()
        w.write(b'a LOGIN "%s" "%s"\r\n' % (user.encode(), password.encode()))
        while not (await r.readline()).startswith(b"a "):
            pass
        w.write(b"b SELECT INBOX\r\n")
        while not (await r.readline()).startswith(b"b "):
            pass
        return r, w

    async def poller(r, w, delay, stats):
        await asyncio.sleep(delay)
        n, end = 0, time.monotonic() + rounds * interval
        while time.monotonic() < end:
            n += 1
            w.write(b"s%d UID SEARCH UNSEEN\r\n" % n)
            while not (await r.readline()).startswith(b"s"):
                pass
            stats[0] += 1
            await asyncio.sleep(interval)

    conns = await asyncio.gather(*[connect(u, p) for u, p in users.items()])
    c0, stats = cpu(), [0]
    await asyncio.gather(*[poller(r, w, interval * k / len(conns), stats)
                           for k, (r, w) in enumerate(conns)])
    print("aio", len(conns), "polls", stats[0], "ms/poll %.3f" % ((cpu() - c0) * 1000 / stats[0]))


if __name__ == "__main__":
    main()
