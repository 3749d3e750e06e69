"""Held connections end to end against the mock IMAP server on loopback:
HeldAccount (held.py) + HeldImap (holding.py) + the real session parts,
delivering into a MemorySink.

Each misbehaviour (dropping idle connections, BYE, going silent mid-IDLE,
"too many connections", no IDLE at all) is scripted for one account while a
healthy account on the same server keeps getting its mail within a second.
"""

import random

import attr
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from fido_tx.accounts.model import Account
from fido_tx.config import BackoffSettings, ImapSettings
from fido_tx.sources import SourceContext
from fido_tx.sources.imap import held
from fido_tx.sources.imap.holding import HeldImap, OpeningBound
from fido_tx.sources.imap.session import fetch_mailbox
from fido_tx.testing import MemorySink
from tests.support.mockimap import (
    IDLE_CAPABILITIES, TOO_MANY_CONNECTIONS, Behaviour, IdleBehaviour, MockIMAPServer,
    MockMailbox, sample_message)

PASSWORD = "pw"
IMAP = ImapSettings(connect_timeout=2.0, greeting_timeout=2.0, command_timeout=1.0,
                    logout_timeout=0.5)


def account(user, port, idle=True):
    return Account(id="acct-" + user, host="127.0.0.1", port=port, username=user,
                   password=PASSWORD, security="none", idle=idle)


class Fleet:
    """Held accounts on one mock server, with their results."""

    def __init__(self, server, port, sink, **settings):
        self.server = server
        self.port = port
        self.sink = sink
        self.pool = held.HeldPool(max_per_host=settings.pop("max_per_host", 1000))
        defaults = dict(idle_refresh=600.0, poll_interval=3600.0, command_timeout=1.0,
                        logout_timeout=0.5, min_hold=0.5,
                        reconnect=BackoffSettings(initial=0.1, maximum=0.5, jitter=0.0))
        defaults.update(settings)
        self.settings = held.HeldSettings(**defaults)
        self.ctx = SourceContext(reactor=reactor, sink=sink, settings=IMAP)
        self.machines = {}
        self.results = []

    def hold(self, user, idle=True):
        acct = account(user, self.port, idle)
        source = HeldImap(acct, self.ctx)
        settings = self.settings if idle else held.HeldSettings(
            **{**_fields(self.settings), "idle": False})
        m = held.HeldAccount(
            acct.id, acct.host, source.open, source.poll, self.results.append, reactor,
            settings, self.pool, random.Random(0),
            poll_fresh=lambda: fetch_mailbox(reactor, acct, self.sink, IMAP))
        self.machines[user] = m.start()
        return m

    def stop(self):
        return defer.gatherResults([m.stop(timeout=2) for m in self.machines.values()])

    def delivered(self, user):
        return sorted(int(m.id) for m in self.sink.entries if m.account == "acct-" + user)

    def errors(self, user):
        return [r for r in self.results if r.account_id == "acct-" + user and not r.ok]


def _fields(settings):
    return attr.asdict(settings, recurse=False)


@pytest_twisted.inlineCallbacks
def until(check, timeout=5.0, step=0.02):
    """Wait for ``check()`` to be true (the test's own deadline)."""
    deadline = reactor.seconds() + timeout
    while not check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        yield task.deferLater(reactor, step, lambda: None)


@pytest.fixture
def server():
    s = MockIMAPServer(reactor, {u: MockMailbox(PASSWORD, [sample_message(1, u)])
                                 for u in ("good", "bad", "plain")})
    s.script(None, Behaviour(capabilities=IDLE_CAPABILITIES))
    yield s
    pytest_twisted.blockon(s.stop())


@pytest_twisted.inlineCallbacks
def deliver_and_time(fleet, user, n):
    """Deliver message ``n`` to ``user``; seconds until the sink has it."""
    started = reactor.seconds()
    fleet.server.deliver(user, sample_message(n, user))
    yield until(lambda: n in fleet.delivered(user), timeout=3)
    return reactor.seconds() - started


@pytest_twisted.inlineCallbacks
def test_idle_wakes_a_fetch_on_the_held_connection(server):
    port = server.listen()
    fleet = Fleet(server, port, MemorySink())
    m = fleet.hold("good")
    yield until(lambda: m.state == held.IDLING)
    assert fleet.delivered("good") == [1]  # the catch-up poll
    for n in (2, 3, 4):
        seconds = yield deliver_and_time(fleet, "good", n)
        assert seconds < 1.0
        yield until(lambda: m.state == held.IDLING)
    assert server.mailbox("good").flags(4) == {"\\Seen"}
    assert server.mailbox("good").logins == 1  # one login for all of it
    assert server.commands("good", "STATUS") == []  # no STATUS on a held connection
    yield until(lambda: fleet.pool.snapshot()["idling"] == 1)  # after the server's "+"
    yield fleet.stop()
    assert [c.name for c in server.commands("good")][-2:] == ["IDLE", "LOGOUT"]
    assert fleet.pool.snapshot() == {"held": 0, "idling": 0, "reconnects": 0, "fallback": 0}
    yield server.all_closed()


@pytest_twisted.inlineCallbacks
def test_server_without_idle_is_polled_on_its_held_connection(server):
    server.script("plain", Behaviour())  # no IDLE capability
    port = server.listen()
    fleet = Fleet(server, port, MemorySink(), poll_interval=0.3)
    m = fleet.hold("plain")
    yield until(lambda: m.state == held.WAITING)
    server.deliver("plain", sample_message(2, "plain"))
    yield until(lambda: fleet.delivered("plain") == [1, 2], timeout=2)
    yield task.deferLater(reactor, 0.7, lambda: None)
    assert server.mailbox("plain").logins == 1
    assert len(server.commands("plain", "UID SEARCH")) >= 3
    assert server.commands("plain", "IDLE") == []
    yield fleet.stop()


@pytest_twisted.inlineCallbacks
def test_account_with_idle_false_polls_its_held_connection(server):
    port = server.listen()
    fleet = Fleet(server, port, MemorySink(), poll_interval=0.3)
    m = fleet.hold("good", idle=False)
    yield until(lambda: m.state == held.WAITING)
    yield task.deferLater(reactor, 0.7, lambda: None)
    assert server.commands("good", "IDLE") == []
    assert server.mailbox("good").logins == 1
    yield fleet.stop()


@pytest.mark.parametrize("behaviour", [
    IdleBehaviour(drop_after=0.3),                    # drops idle connections
    IdleBehaviour(drop_after=0.3, drop_with="bye"),   # says BYE, then drops
    IdleBehaviour(drop_after=0.3, drop_with="silent"),  # goes silent mid-IDLE
], ids=["drop", "bye", "silent"])
@pytest_twisted.inlineCallbacks
def test_misbehaving_idle_is_replaced_and_healthy_accounts_unaffected(server, behaviour):
    server.script_idle("bad", behaviour)
    port = server.listen()
    # a short refresh: a silent connection is found by DONE's deadline
    fleet = Fleet(server, port, MemorySink(), idle_refresh=1.0)
    good, bad = fleet.hold("good"), fleet.hold("bad")
    yield until(lambda: good.state == held.IDLING and bad.reconnects >= 1, timeout=5)
    n = 2
    for _ in range(3):
        seconds = yield deliver_and_time(fleet, "good", n)
        assert seconds < 1.0
        # mail for the bad account still arrives, on a replacement connection
        server.deliver("bad", sample_message(n, "bad"))
        yield until(lambda: n in fleet.delivered("bad"), timeout=4)
        n += 1
    assert fleet.errors("good") == []
    assert fleet.errors("bad") == []  # routine: no report
    assert good.reconnects == 0
    assert fleet.delivered("bad") == list(range(1, n))  # nothing lost or twice
    yield fleet.stop()


@pytest_twisted.inlineCallbacks
def test_too_many_connections_falls_back_to_fresh_connections(server):
    server.script("bad", Behaviour(capabilities=IDLE_CAPABILITIES,
                                   faults=(TOO_MANY_CONNECTIONS,)))
    port = server.listen()
    fleet = Fleet(server, port, MemorySink(), poll_interval=0.3, fallback_retry=60)
    good, bad = fleet.hold("good"), fleet.hold("bad")
    yield until(lambda: bad.state == held.FALLBACK and good.state == held.IDLING)
    assert fleet.pool.fallback == 1
    # the user's other connections go away: a fresh connection now gets in,
    # but the account does not hold one until fallback_retry is over
    server.script("bad", Behaviour(capabilities=IDLE_CAPABILITIES))
    server.deliver("bad", sample_message(2, "bad"))
    yield until(lambda: fleet.delivered("bad") == [1, 2], timeout=3)
    seconds = yield deliver_and_time(fleet, "good", 2)
    assert seconds < 1.0
    assert fleet.errors("good") == []
    assert all(r.kind in (None, "connect") for r in fleet.results)
    assert bad.state == held.FALLBACK
    assert server.commands("bad", "IDLE") == []
    yield fleet.stop()


@pytest_twisted.inlineCallbacks
def test_max_connections_per_host(server):
    port = server.listen()
    fleet = Fleet(server, port, MemorySink(), max_per_host=1, poll_interval=0.3)
    a, b = fleet.hold("good"), fleet.hold("bad")
    yield until(lambda: {a.state, b.state} == {held.IDLING, held.FALLBACK})
    assert len(server.open_connections()) <= 2  # one held (+ a passing fresh poll)
    yield fleet.stop()


@pytest_twisted.inlineCallbacks
def test_wrong_password_is_reported_at_once(server):
    port = server.listen()
    fleet = Fleet(server, port, MemorySink())
    acct = Account(id="acct-good", host="127.0.0.1", port=port, username="good",
                   password="wrong", security="none")
    source = HeldImap(acct, fleet.ctx)
    m = held.HeldAccount(acct.id, acct.host, source.open, source.poll, fleet.results.append,
                         reactor, fleet.settings, fleet.pool, random.Random(0)).start()
    yield until(lambda: fleet.results)
    assert [r.kind for r in fleet.results] == ["auth"]
    assert "wrong" not in fleet.results[0].message + fleet.results[0].debug
    yield m.stop()


@pytest_twisted.inlineCallbacks
def test_a_poll_over_session_timeout_ends_with_timeout(server):
    from tests.support.mockimap import Fault

    server.script("bad", Behaviour(capabilities=IDLE_CAPABILITIES,
                                   faults=(Fault("UID SEARCH", "silent"),)))
    port = server.listen()
    ctx = SourceContext(reactor=reactor, sink=MemorySink(),
                        settings=attr.evolve(IMAP, command_timeout=5.0, session_timeout=0.3))
    source = HeldImap(account("bad", port), ctx)
    conn = yield source.open()
    result = yield source.poll(conn)
    assert result.kind == "timeout"
    assert "session_timeout" in result.message
    yield until(lambda: conn.client.closed)


def test_gc_freezer_freezes_every_n_settled_connections():
    from fido_tx.sources.imap.holding import GcFreezer

    frozen = []
    f = GcFreezer(every=3, freeze=frozen.append)
    calls = 0
    for _ in range(7):
        f()
        calls += 1
        if calls in (1, 4, 7):
            assert len(frozen) == (1, 4, 7).index(calls) + 1
    # the young generations before the first freeze (start-up is not walked
    # again), a full collection later: it walks only what is not frozen yet
    assert frozen == [1, 2, 2]


def test_gc_freezer_frees_cyclic_garbage_before_freezing_it():
    import gc
    import weakref

    from fido_tx.sources.imap.holding import GcFreezer

    class Node:
        pass

    f = GcFreezer(every=1)
    try:
        f()  # the first freeze: start-up
        node = Node()
        node.cycle = node
        gc.collect()  # the cycle is still referenced: it reaches the oldest generation
        gone = weakref.ref(node)
        del node
        f()
        assert gone() is None
    finally:
        gc.unfreeze()


@pytest_twisted.inlineCallbacks
def test_at_most_opening_connections_open_at_once(server):
    # 10,000 accounts connecting at once answered in bursts of hundreds per
    # reactor turn; the shared semaphore bounds how many open at a time
    port = server.listen()
    ctx = SourceContext(reactor=reactor, sink=MemorySink(), settings=IMAP)
    opening = OpeningBound(1)
    sem = opening.all
    first = HeldImap(account("good", port), ctx, opening=opening).open()
    second = HeldImap(account("bad", port), ctx, opening=opening).open()
    assert sem.tokens == 0 and len(sem.waiting) == 1
    conn1 = yield first
    assert not second.called or sem.tokens == 0  # it waited for the first
    conn2 = yield second
    assert sem.tokens == 1
    assert server.mailbox("good").logins == 1 and server.mailbox("bad").logins == 1
    # one waiting when cancelled takes nothing and leaves the queue
    blocker = yield sem.acquire()
    waiting = HeldImap(account("plain", port), ctx, opening=opening).open()
    waiting.cancel()
    yield waiting.addErrback(lambda f: f.trap(defer.CancelledError))
    assert sem.waiting == []
    blocker.release()
    assert sem.tokens == 1
    assert server.mailbox("plain").logins == 0
    for c in (conn1, conn2):
        c.client.transport.abortConnection()


@pytest_twisted.inlineCallbacks
def test_tls_connections_have_their_own_smaller_opening_bound(server):
    # finishing a TLS handshake costs far more CPU than a plain connect: at
    # most tls_limit of them open at once, plain ones pass beside them
    port = server.listen()
    ctx = SourceContext(reactor=reactor, sink=MemorySink(), settings=IMAP)
    opening = OpeningBound(4, tls_limit=1)
    blocker = yield opening.tls.acquire()  # one TLS connection opening
    tls = HeldImap(attr.evolve(account("bad", port), security="tls"), ctx,
                   opening=opening).open()
    assert not tls.called and len(opening.tls.waiting) == 1
    plain = yield HeldImap(account("good", port), ctx, opening=opening).open()
    assert opening.all.tokens == 3  # the plain one done; the TLS one holds a place
    tls.cancel()
    yield tls.addErrback(lambda f: f.trap(defer.CancelledError))
    assert opening.all.tokens == 4 and opening.tls.waiting == []
    blocker.release()
    plain.client.transport.abortConnection()


class _Handle:
    """The scheduler's side of a held session, for one test."""

    def __init__(self):
        self.reports = []
        self.released = 0

    def report(self, result):
        self.reports.append(result)

    def release_slot(self):
        self.released += 1

    def take_slot(self):
        return defer.succeed(None)


@pytest_twisted.inlineCallbacks
def test_held_sessions_share_the_opening_bound_and_count_their_starts(server):
    # the daemon's held sessions open through HeldConnections.opening and
    # call its freezer as they start (thousands waiting to open were walked
    # by every full collection until frozen)
    from fido_tx.config import Settings
    from fido_tx.sources.imap.holding import HeldConnections, HeldSession

    port = server.listen()
    held_conns = HeldConnections(Settings())
    calls = []
    held_conns.freezer = lambda: calls.append(True)
    held_conns.pool.on_idle = None
    ctx = SourceContext(reactor=reactor, sink=MemorySink(), settings=IMAP, held=held_conns)
    session = HeldSession(account("good", port), ctx, _Handle(), held_conns, fresh=None)
    done = session.poll()
    assert calls == [True]
    assert held_conns.opening.all.tokens == held_conns.opening.all.limit - 1  # opening now
    yield until(lambda: session.machine.state == held.IDLING)
    assert held_conns.opening.all.tokens == held_conns.opening.all.limit
    held_conns.stopService()
    result = yield done
    assert result.skipped
