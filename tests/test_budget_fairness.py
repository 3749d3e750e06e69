"""A slow liar cannot hog the in-flight byte budget (fido_tx.schedule.budget).

Real sessions on loopback against the mock server (tests/support/mockimap.py,
``Behaviour(hostile="slow_body")``): two servers claim 50 MiB bodies
(RFC822.SIZE) and trickle them, one below ``min_literal_rate``, one above
it.  Before, a batch reserved its claimed size up front: a 50 MiB claim ran
"alone" with the whole budget, and every healthy account waited until the
liar's session ended.  Now the budget is charged by the bytes that arrive:
the healthy account, fetched while both liars hold their grants, keeps its
rate (messages/s with the liars over messages/s alone), the budget stays
within its limit, and each liar is cut with a clear line.
"""

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from fido_tx import errors
from fido_tx.accounts.model import Account
from fido_tx.config import ImapSettings
from fido_tx.schedule.budget import ByteBudget
from fido_tx.sources.imap.session import fetch_mailbox
from fido_tx.testing import MemorySink
from tests.support.mockimap import Behaviour, MockIMAPServer, MockMailbox, sample_message

PASSWORD = "fairness-test-pw"
MIB = 1024 * 1024
LIMIT = 8 * MIB  # [imap] max_inflight_bytes's default
HEALTHY = 400  # long enough (~0.2 s alone) that a rate is not one scheduling hiccup
SESSION = 8.0
SETTINGS = ImapSettings(connect_timeout=5.0, greeting_timeout=5.0, command_timeout=5.0,
                        logout_timeout=1.0, session_timeout=SESSION, min_literal_rate=4096)
LIARS = {
    # claims 50 MiB and sends 2 KiB/s: below min_literal_rate, cut after 5 s
    "crawl": Behaviour(hostile="slow_body", hostile_size=50 * MIB, hostile_rate=2048),
    # claims 50 MiB and sends 16 KiB/s: legal, cut by session_timeout
    "trickle": Behaviour(hostile="slow_body", hostile_size=50 * MIB, hostile_rate=16384),
}


def account(user, port):
    return Account(id="acct-" + user, host="127.0.0.1", port=port, username=user,
                   password=PASSWORD, security="none")


def boxes():
    # two like healthy accounts: one fetched alone, one with the liars
    out = {user: MockMailbox(PASSWORD, [sample_message(i, "good", 20_000)
                                        for i in range(1, HEALTHY + 1)])
           for user in ("alone", "good")}
    for user in LIARS:
        out[user] = MockMailbox(PASSWORD, [sample_message(i, user, 2000) for i in range(1, 4)])
    return out


@defer.inlineCallbacks
def healthy_fetch(user, port, budget):
    """A healthy account's session; returns (result, sink, messages/s)."""
    sink = MemorySink()
    started = reactor.seconds()
    result = yield fetch_mailbox(reactor, account(user, port), sink, SETTINGS, budget=budget)
    return result, sink, HEALTHY / max(1e-6, reactor.seconds() - started)


@pytest_twisted.inlineCallbacks
def test_a_slow_liar_claiming_50_mib_does_not_slow_a_healthy_account():
    server = MockIMAPServer(reactor, boxes())
    for user, behaviour in LIARS.items():
        server.script(user, behaviour)
    port = server.listen()
    try:
        # alone: the healthy account's own rate
        alone, sink, rate_alone = yield healthy_fetch("alone", port, ByteBudget(LIMIT))
        assert alone.ok and alone.fetched == HEALTHY, alone
        budget = ByteBudget(LIMIT)
        liars = {user: fetch_mailbox(reactor, account(user, port), MemorySink(), SETTINGS,
                                     budget=budget)
                 for user in LIARS}
        for _ in range(100):  # until both liars hold a grant and trickle
            if budget.holders >= len(LIARS):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        assert budget.holders >= len(LIARS)
        yield task.deferLater(reactor, 1.0, lambda: None)
        with_liars, sink, rate_with = yield healthy_fetch("good", port, budget)
        results = {}
        for user, d in liars.items():
            results[user] = yield d
    finally:
        yield server.stop()
    print(f"\nhealthy account: {rate_alone:.0f} messages/s alone, {rate_with:.0f} with two "
          f"slow liars claiming 50 MiB (ratio {rate_with / rate_alone:.2f}); budget peak "
          f"{budget.peak} bytes ({budget.peak_within} within the limit), "
          f"{budget.pauses} pauses")
    assert with_liars.ok and with_liars.fetched == HEALTHY, with_liars
    assert sorted(int(m.id) for m in sink.entries) == list(range(1, HEALTHY + 1))
    assert rate_with >= 0.5 * rate_alone, (rate_alone, rate_with)
    crawl, trickle = results["crawl"], results["trickle"]
    assert crawl.kind == errors.TIMEOUT, crawl
    assert "below the minimum of 4096 bytes/s" in crawl.message, crawl.message
    assert trickle.kind == errors.TIMEOUT, trickle
    assert "session_timeout" in trickle.message, trickle.message
    assert crawl.fetched == trickle.fetched == 0
    # memory: within the limit; beyond it at most what the elder received
    assert budget.peak_within <= LIMIT
    assert budget.peak <= LIMIT + 16384 * SESSION + 2 * 128 * 1024
    # no grant leaked, nothing waits
    assert (budget.in_use, budget.overdrawn, budget.waiting, budget.holders) == (0, 0, 0, 0)



@pytest.mark.parametrize("security", ["none", "starttls", "tls"])
@pytest_twisted.inlineCallbacks
def test_sessions_over_a_small_budget_pause_resume_and_all_deliver(security):
    """Three accounts whose messages (384 KiB) are larger than a session's
    share (256 KiB of a 1 MiB budget), fetched at once over real loopback
    connections (plain, STARTTLS, implicit TLS: pausing goes through the TLS
    transport): connections are paused and resumed, the reservations stay
    within the limit, the oldest batch overdraws to get its large messages
    through, every message arrives intact, and nothing is left reserved."""
    from tests.support import tlsca

    users = ("a", "b", "c")
    server = MockIMAPServer(reactor, {
        u: MockMailbox(PASSWORD, [sample_message(i, u, 384 * 1024) for i in range(1, 7)])
        for u in users})
    pki = tlsca.files()
    server.tls = (pki.localhost.cert, pki.localhost.key)
    for u in (None,) + users:  # None: before LOGIN (STARTTLS is offered then)
        server.script(u, Behaviour(starttls=security == "starttls"))
    port = server.listen(implicit_tls=security == "tls")

    def account(user, port):
        return Account(id="acct-" + user, host="127.0.0.1", port=port, username=user,
                       password=PASSWORD, security=security, ca_file=pki.ca)
    budget = ByteBudget(MIB)
    sink = MemorySink()
    settings = ImapSettings(connect_timeout=5.0, greeting_timeout=5.0, command_timeout=5.0,
                            logout_timeout=1.0, session_timeout=60.0, batch_messages=3)
    try:
        results = yield defer.gatherResults([
            fetch_mailbox(reactor, account(u, port), sink, settings, budget=budget)
            for u in users])
    finally:
        yield server.stop()
    print(f"\n{security}: {budget.pauses} pauses, peak {budget.peak} ({budget.peak_within} "
          f"within), {budget.forced} bytes beyond a reservation, "
          f"seconds {[round(r.seconds, 2) for r in results]}")
    assert all(r.ok and r.fetched == 6 for r in results), results
    for u in users:
        got = {int(m.id): m.raw for m in sink.entries if m.account == "acct-" + u}
        assert got == {i: server.mailbox(u).message(i).raw for i in range(1, 7)}
    assert budget.pauses > 0
    assert budget.peak_within <= MIB
    assert budget.peak <= MIB + 3 * 384 * 1024 + 2 * 128 * 1024
    assert (budget.in_use, budget.overdrawn, budget.waiting, budget.holders) == (0, 0, 0, 0)
