"""The empty poll of many accounts: held connections against a login per poll.

    .venv/bin/python bench/held_poll.py --accounts 1000 [--rounds 3]

Starts a local Dovecot (tests/support/dovecot.py) with N empty mailboxes and,
in this process:

1. *reconnecting*: one ordinary session per account (connect, log in,
   STATUS, LOGOUT: today's poll of an account with ``idle = false``),
   ``--concurrency`` at a time, ``--rounds`` times;
2. *held*: every account holds its connection
   (:class:`fido_tx.sources.imap.held.HeldAccount` with ``idle = false``) and
   is polled on it (``UID SEARCH``) every ``--interval`` seconds, for
   ``--rounds`` intervals after all are held.
3. *held_ticks*: as *held*, with the checks due on shared poll ticks
   (:class:`fido_tx.schedule.ticker.PollTicker`, ``--tick`` seconds, as the
   daemon's ``[imap] poll_tick``); skipped when the code has no ticker;
   *held_quiet*: as *held_ticks*, with the daemon's quiet checks (a NOOP
   alone while the last search is younger than ``full_search``, 600 s:
   :mod:`fido_tx.sources.imap.heldfetch`); skipped when the code has none;
4. *idle*: the same connections waiting in IDLE for ``--rounds`` intervals;
5. *bare_twisted*: the floor: the same ``UID SEARCH`` as often from a bare
   Twisted ``LineOnlyReceiver`` (log in, SELECT, then one line out and two
   in per poll), each account on its own timer: what Twisted and the kernel
   cost before any Fido code;
6. *bare_twisted_batched*: the same, every account's search sent in one
   reactor turn per interval: the floor of batched checks.

Per poll it prints this process's CPU (user+sys) and Dovecot's (every process
of its session: master, imap-login, one imap per connection), in ms.
Targets (issue 12): a held empty poll costs the client <= 0.3 ms and Dovecot
<= 1 ms.
"""

import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: FIDO_CODE=DIR runs another checkout's fido_tx (before/after in one session)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.environ.get("FIDO_CODE", ROOT))


def cpu_self():
    t = os.times()
    return t.user + t.system


def sys_self():
    return os.times().system


def cpu_session(sid):
    """User+sys seconds of every live process in session ``sid``."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields[3] is the session id (after state, ppid, pgrp)
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def bare_search_class():
    from twisted.internet import defer
    from twisted.protocols.basic import LineOnlyReceiver

    class BareSearch(LineOnlyReceiver):
        """The least a held poll can be in Twisted: log in, SELECT, then
        ``UID SEARCH UNSEEN`` and read its two lines, nothing else."""

        def __init__(self, user, password):
            self.user, self.password = user, password
            self.ready = defer.Deferred()
            self.searches = 0
            self.n = 0

        def connectionMade(self):
            self.sendLine(b'a LOGIN "%s" "%s"' % (self.user.encode(), self.password.encode()))

        def lineReceived(self, line):
            if line.startswith(b"a OK"):
                self.sendLine(b"b SELECT INBOX")
            elif line.startswith(b"b OK"):
                self.ready.callback(None)
            elif line.startswith(b"s"):
                self.searches += 1

        def search(self):
            self.n += 1
            self.sendLine(b"s%d UID SEARCH UNSEEN" % self.n)

    return BareSearch


def start_profile():
    """cProfile of the held polls when ``FIDO_PROFILE=PATH`` is set."""
    if not os.environ.get("FIDO_PROFILE"):
        return None
    import cProfile

    profile = cProfile.Profile()
    profile.enable()
    return profile


def stop_profile(profile):
    if profile is not None:
        profile.disable()
        profile.dump_stats(os.environ["FIDO_PROFILE"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--tick", type=float, default=1.0,
                        help="the held_ticks row's poll tick, seconds")
    parser.add_argument("--json", help="append the figures to this JSON-lines file")
    opts = parser.parse_args(argv)

    import attr
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import defer, endpoints, reactor, task

    from fido_tx.accounts.model import Account
    from fido_tx.config import ImapSettings
    from fido_tx.schedule.pacer import StartPacer
    from fido_tx.sources import SourceContext
    from fido_tx.sources.imap import held
    from fido_tx.sources.imap.connect import Connector
    from fido_tx.sources.imap.holding import GcFreezer, HeldImap
    from fido_tx.sources.imap.session import fetch_mailbox
    from fido_tx.testing import MemorySink
    try:
        from fido_tx.schedule.ticker import PollTicker
    except ImportError:  # FIDO_CODE before the ticks
        PollTicker = None
    from tests.support import dovecot as dovecot_support

    BareSearch = bare_search_class()

    server = dovecot_support.Dovecot(tls=False, sessions=opts.accounts + 100,
                                     extra_config="mailbox_idle_check_interval = 1 secs\n")
    users = {f"poll{k:04d}@fido.test": f"pw{k}" for k in range(opts.accounts)}
    server.add_users(users)
    server.start()
    sid = server.pid
    accounts = [Account(id=f"poll{k:04d}", host="127.0.0.1", port=server.port, username=u,
                        password=p, security="none")
                for k, (u, p) in enumerate(users.items())]
    figures = {"accounts": opts.accounts}
    settings = ImapSettings()
    connector = Connector(reactor)
    sink = MemorySink()

    def measure(name, polls, c0, d0, seconds, s0):
        c, d = cpu_self() - c0, cpu_session(sid) - d0
        figures[name] = {"polls": polls, "seconds": round(seconds, 1),
                         "client_ms_per_poll": round(c * 1000 / max(1, polls), 3),
                         "client_sys_ms_per_poll": round((sys_self() - s0) * 1000
                                                         / max(1, polls), 3),
                         "dovecot_ms_per_poll": round(d * 1000 / max(1, polls), 3)}
        print(name, figures[name], file=sys.stderr, flush=True)

    @defer.inlineCallbacks
    def run():
        # 1. reconnecting polls
        sem = defer.DeferredSemaphore(opts.concurrency)
        for a in accounts[:10]:  # warm up: imports, TLS-free endpoint caches
            yield fetch_mailbox(reactor, a, sink, settings, connector=connector, debug=False)
        c0, d0, t0, s0 = cpu_self(), cpu_session(sid), time.monotonic(), sys_self()
        results = []
        for _ in range(opts.rounds):
            results += (yield defer.gatherResults([
                sem.run(fetch_mailbox, reactor, a, sink, settings, connector=connector,
                        debug=False) for a in accounts]))
        assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
        measure("reconnecting", len(results), c0, d0, time.monotonic() - t0, s0)

        # 2. held connections, polled on the connection (each its own timer),
        # 3. the same on shared poll ticks
        ctx = SourceContext(reactor=reactor, sink=sink, settings=settings, debug=False,
                            pacer=StartPacer(reactor), connector=connector)
        polls = []
        rng = random.Random(0)
        hs = held.HeldSettings(idle=False, poll_interval=opts.interval)
        rows = [("held", None, hs)]
        if PollTicker is not None:
            rows.append(("held_ticks", PollTicker(reactor, opts.tick), hs))
            if "full_search" in attr.fields_dict(held.HeldSettings):
                rows.append(("held_quiet", PollTicker(reactor, opts.tick),
                             attr.evolve(hs, full_search=600.0)))
        for name, ticker, hs in rows:
            pool = held.HeldPool(max_per_host=opts.accounts + 1, on_idle=GcFreezer(),
                                 **({"ticker": ticker} if ticker is not None else {}))
            machines = []
            for a in accounts:
                src = HeldImap(a, ctx)
                machines.append(held.HeldAccount(a.id, a.host, src.open, src.poll,
                                                 polls.append, reactor, hs, pool, rng).start())
            t0 = time.monotonic()
            while sum(1 for m in machines if m.state == held.WAITING) < len(machines):
                yield task.deferLater(reactor, 0.2, lambda: None)
                if time.monotonic() - t0 > 300:
                    raise RuntimeError("not all accounts held after 300 s")
            figures["seconds_to_hold_all"] = round(time.monotonic() - t0, 1)
            yield task.deferLater(reactor, opts.interval, lambda: None)  # settle on ticks
            n0, c0, d0, t0 = len(polls), cpu_self(), cpu_session(sid), time.monotonic()
            s0 = sys_self()
            profile = start_profile()
            yield task.deferLater(reactor, opts.rounds * opts.interval, lambda: None)
            stop_profile(profile)
            assert all(r.ok for r in polls[n0:])
            measure(name, len(polls) - n0, c0, d0, time.monotonic() - t0, s0)
            yield defer.gatherResults([m.stop(timeout=20) for m in machines])

        # 4. the same, waiting in IDLE (a check every poll_interval still)
        hs = held.HeldSettings(idle=True, poll_interval=3600, idle_refresh=600)
        machines = []
        pool = held.HeldPool(max_per_host=opts.accounts + 1, on_idle=GcFreezer())
        for a in accounts:
            src = HeldImap(a, ctx)
            machines.append(held.HeldAccount(a.id, a.host, src.open, src.poll, polls.append,
                                             reactor, hs, pool, rng).start())
        while pool.idling < len(machines):
            yield task.deferLater(reactor, 0.2, lambda: None)
        c0, d0, t0 = cpu_self(), cpu_session(sid), time.monotonic()
        yield task.deferLater(reactor, opts.rounds * opts.interval, lambda: None)
        c, d = cpu_self() - c0, cpu_session(sid) - d0
        minutes = (time.monotonic() - t0) / 60
        figures["idle"] = {"client_ms_per_account_minute":
                           round(c * 1000 / opts.accounts / minutes, 4),
                           "dovecot_ms_per_account_minute":
                           round(d * 1000 / opts.accounts / minutes, 4)}
        yield defer.gatherResults([m.stop(timeout=20) for m in machines])

        # 5. the floor: the same UID SEARCH, as often, from a bare Twisted
        # protocol (no Fido code: one line out, two lines in, a timer)
        protos = yield defer.gatherResults([
            endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(
                reactor, "127.0.0.1", server.port), BareSearch(a.username, a.password))
            for a in accounts])
        yield defer.gatherResults([p.ready for p in protos])
        c0, d0, t0, s0 = cpu_self(), cpu_session(sid), time.monotonic(), sys_self()
        loops = []
        for k, p in enumerate(protos):
            loop = task.LoopingCall(p.search)
            loop.clock = reactor
            loops.append(loop)
            reactor.callLater(opts.interval * k / len(protos), loop.start, opts.interval, True)
        yield task.deferLater(reactor, opts.rounds * opts.interval, lambda: None)
        for loop in loops:
            if loop.running:
                loop.stop()
        measure("bare_twisted", sum(p.searches for p in protos), c0, d0,
                time.monotonic() - t0, s0)

        # 6. the floor of batched checks: every search in one reactor turn
        yield task.deferLater(reactor, 1.0, lambda: None)
        n0 = sum(p.searches for p in protos)
        c0, d0, t0, s0 = cpu_self(), cpu_session(sid), time.monotonic(), sys_self()

        def search_all():
            for p in protos:
                p.search()

        loop = task.LoopingCall(search_all)
        loop.clock = reactor
        loop.start(opts.interval, True)
        yield task.deferLater(reactor, opts.rounds * opts.interval, lambda: None)
        loop.stop()
        yield task.deferLater(reactor, 1.0, lambda: None)  # the last answers
        measure("bare_twisted_batched", sum(p.searches for p in protos) - n0, c0, d0,
                time.monotonic() - t0, s0)
        for p in protos:
            p.transport.loseConnection()

    def finish(result):
        if hasattr(result, "printTraceback"):
            result.printTraceback()
        reactor.stop()

    reactor.callWhenRunning(lambda: run().addBoth(finish))
    try:
        reactor.run()
    finally:
        server.close()
    print(json.dumps(figures, indent=2))
    if opts.json:
        with open(opts.json, "a") as f:
            f.write(json.dumps(figures) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
