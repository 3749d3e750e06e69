"""What identifies a stored message (README "What identifies a message"):
the identity of an IMAP message, a UID reused by the server, a UIDVALIDITY
that changes, and what each costs on the wire.

The sessions run against the mock IMAP server on loopback with the
in-memory sink (which keeps identities as the Redis sinks do); the Redis
sinks' own Lua is in tests/test_identity_redis.py.
"""

import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import errors
from fido_tx.accounts.model import Account
from fido_tx.config import ImapSettings
from fido_tx.sinks.message import Message
from fido_tx.sources.imap import identity
from fido_tx.sources.imap.session import fetch_mailbox
from fido_tx.testing import MemorySink
from tests.support.mockimap import Behaviour, Fault, MockIMAPServer, MockMailbox, sample_message

PASSWORD = "identity-test-pw"
SETTINGS = ImapSettings(connect_timeout=5.0, greeting_timeout=5.0, command_timeout=5.0,
                        logout_timeout=1.0, session_timeout=30.0)


def account(user, port, after_fetch="seen"):
    return Account(id="acct-" + user, host="127.0.0.1", port=port, username=user,
                   password=PASSWORD, security="none", after_fetch=after_fetch)


def no_message_id(n, text=b"x"):
    return b"From: a@example.test\r\nSubject: %d\r\n\r\n%s %d\r\n" % (n, text, n)


def fetches(server, user, what):
    """The UID FETCH commands of ``user`` whose items contain ``what``."""
    return [c for c in server.commands(user, "UID FETCH") if what in c.raw]


def in_memory_session(clock, server, user, acct, sink):
    """One session over iosim on a fake clock (as tests/test_resilience.py);
    ``clock.served`` counts the connections of the sessions before."""
    outcome = []
    fetch_mailbox(clock, acct, sink, SETTINGS).addBoth(outcome.append)
    pumps = []
    before = getattr(clock, "served", 0)
    for _ in range(2000):
        while len(clock.tcpClients) > before + len(pumps):
            host, port, factory, _, _ = clock.tcpClients[before + len(pumps)]
            client = factory.buildProtocol(IPv4Address("TCP", host, port))
            served = server.build_protocol(user)
            pumps.append(iosim.connect(served, iosim.makeFakeServer(served), client,
                                       iosim.makeFakeClient(client), greet=False, clock=clock))
        for pump in pumps:
            pump.flush()
        if outcome:
            break
        clock.advance(0.05)
    for pump in pumps:
        pump.flush()
    clock.served = len(clock.tcpClients)
    assert len(outcome) == 1, "the session never ended"
    return outcome[0]


# -- the identity itself -----------------------------------------------------------


class IdentityTests(SynchronousTestCase):
    def test_size_and_message_id_name_a_message(self):
        a = identity.of(2000, "<1@x>")
        self.assertEqual(a, identity.of(2000, "<1@x>", b"any body"))
        self.assertRegex(a, r"^m[0-9a-f]{16}$")
        self.assertNotEqual(a, identity.of(2001, "<1@x>"))
        self.assertNotEqual(a, identity.of(2000, "<2@x>"))

    def test_without_a_message_id_the_bytes_name_it(self):
        a = identity.of(10, "", b"0123456789")
        self.assertRegex(a, r"^b[0-9a-f]{16}$")
        self.assertEqual(a, identity.of(10, "", b"0123456789"))
        self.assertNotEqual(a, identity.of(10, "", b"0123456788"))

    def test_a_reused_uid_is_delivered_under_an_id_naming_the_uid(self):
        self.assertEqual(identity.alias(7, "m0123456789abcdef"), "7~m0123456789abcdef")

    def test_epochs_know_the_last_uidvalidity_of_each_mailbox(self):
        epochs = identity.Epochs()
        self.assertFalse(epochs.known("a", "INBOX", "5"))
        epochs.seen("a", "INBOX", "5")
        self.assertTrue(epochs.known("a", "INBOX", "5"))
        self.assertFalse(epochs.known("a", "INBOX", "6"))
        self.assertFalse(epochs.known("a", "Other", "5"))
        self.assertFalse(epochs.known("b", "INBOX", "5"))

    def test_the_report_names_the_uids_and_says_nothing_was_marked_in_their_place(self):
        reuse = identity.Reuse(reports=tuple(f"UID {n} now holds another message"
                                             for n in range(1, 8)))
        text = reuse.error_text("INBOX")
        self.assertIn("'INBOX'", text)
        self.assertIn("UID 5 now holds", text)
        self.assertNotIn("UID 6 now", text)
        self.assertIn("and 2 more", text)
        self.assertIn("stored them as new", text)


class MemorySinkTests(SynchronousTestCase):
    """The fake keeps identities as the Redis sinks do (their Lua is tested
    against a real Redis in tests/test_identity_redis.py)."""

    def deliver(self, sink, *messages):
        return self.successResultOf(sink.deliver(list(messages)))

    def test_an_identity_stored_before_is_confirmed_not_delivered_again(self):
        sink = MemorySink()
        self.deliver(sink, Message("a", "INBOX", "1", "5", b"x", identity="m1"))
        d = self.deliver(sink, Message("a", "INBOX", "2", "1", b"x", identity="m1"))
        self.assertEqual((d.confirmed, d.new), (("1",), ()))
        self.assertEqual(len(sink.entries), 1)
        self.assertEqual(self.successResultOf(sink.filter_new("a", "INBOX", "2", ["1"])), [])
        self.assertEqual(self.successResultOf(sink.identities("a", "INBOX", "2", ["1", "9"])),
                         ["m1", ""])

    def test_another_mailbox_or_no_identity_is_delivered(self):
        sink = MemorySink()
        self.deliver(sink, Message("a", "INBOX", "1", "5", b"x", identity="m1"))
        self.deliver(sink, Message("a", "Other", "1", "5", b"x", identity="m1"))
        self.deliver(sink, Message("a", "INBOX", "1", "6", b"x"))
        self.deliver(sink, Message("a", "INBOX", "2", "6", b"x"))
        self.assertEqual(len(sink.entries), 4)

    def test_recognise_records_the_known_identities_only(self):
        sink = MemorySink()
        self.deliver(sink, Message("a", "INBOX", "1", "5", b"x", identity="m1"))
        found = self.successResultOf(sink.recognise("a", "INBOX", "2", {"1": "m1", "2": "m2"}))
        self.assertEqual(found, ["1"])
        self.assertEqual(self.successResultOf(sink.filter_new("a", "INBOX", "2", ["1", "2"])),
                         ["2"])


# -- UID reuse -------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_a_reused_uid_with_delete_is_stored_then_expunged_and_reported_once():
    box = MockMailbox(PASSWORD, [sample_message(i, "del") for i in (1, 2)], uidvalidity=7)
    server = MockIMAPServer(reactor, {"del": box})
    acct = account("del", server.listen(), after_fetch="delete")
    sink = MemorySink()
    other = sample_message(99, "del", size=500)
    try:
        # the first session stores both, but its expunge fails: still there
        server.script("del", Behaviour(faults=(Fault("UID EXPUNGE", "no"),)))
        first = yield fetch_mailbox(reactor, acct, sink, SETTINGS)
        assert first.kind == errors.MAILBOX and len(sink.entries) == 2
        server.script("del", Behaviour())
        box.reuse_uid(1, other)  # restored: UID 1 now holds another message
        second = yield fetch_mailbox(reactor, acct, sink, SETTINGS)
        third = yield fetch_mailbox(reactor, acct, sink, SETTINGS)
    finally:
        yield server.stop()
    assert second.kind == errors.PROTOCOL, second
    assert "UID 1 now holds another message" in second.message
    assert "Message-ID <99.del@mock.test>" in second.message
    assert [m.raw for m in sink.entries].count(other) == 1
    reused = [m for m in sink.entries if m.raw == other][0]
    assert (reused.epoch, reused.id) == ("7", identity.alias(1, reused.identity))
    # what was expunged had been stored first: the reused message among them
    assert sorted(raw for _, _, raw in box.expunged) == sorted(m.raw for m in sink.entries[1:])
    assert box.uids() == []
    assert third.ok and third.fetched == 0


@pytest_twisted.inlineCallbacks
def test_a_uid_stored_but_not_marked_holds_the_same_message_and_is_marked_only():
    box = MockMailbox(PASSWORD, [sample_message(i, "same") for i in (1, 2)], uidvalidity=7)
    server = MockIMAPServer(reactor, {"same": box})
    acct = account("same", server.listen())
    sink = MemorySink()
    try:
        server.script("same", Behaviour(faults=(Fault("UID STORE", "no"),)))
        yield fetch_mailbox(reactor, acct, sink, SETTINGS)
        server.script("same", Behaviour())
        second = yield fetch_mailbox(reactor, acct, sink, SETTINGS)
    finally:
        yield server.stop()
    assert second.ok and second.marked == 2 and second.fetched == 0, second
    assert len(sink.entries) == 2
    # one FETCH of sizes and Message-IDs, no body fetched again
    assert len(fetches(server, "same", b"HEADER.FIELDS")) == 1
    assert len(fetches(server, "same", b"BODY.PEEK[]")) == 1  # the first session's


@pytest_twisted.inlineCallbacks
def test_a_reused_uid_without_message_id_is_told_by_its_bytes():
    box = MockMailbox(PASSWORD, [no_message_id(1), no_message_id(2)], uidvalidity=7)
    server = MockIMAPServer(reactor, {"noid": box})
    acct = account("noid", server.listen())
    sink = MemorySink()
    try:
        server.script("noid", Behaviour(faults=(Fault("UID STORE", "no"),)))
        yield fetch_mailbox(reactor, acct, sink, SETTINGS)
        server.script("noid", Behaviour())
        box.reuse_uid(2, no_message_id(2, b"y"))  # same size, other bytes
        second = yield fetch_mailbox(reactor, acct, sink, SETTINGS)
    finally:
        yield server.stop()
    assert second.kind == errors.PROTOCOL and "UID 2 now holds" in second.message, second
    assert "no Message-ID" in second.message
    assert [m.raw for m in sink.entries] == [no_message_id(1), no_message_id(2),
                                             no_message_id(2, b"y")]
    assert box.uids() == [1, 2] and all("\\Seen" in m.flags for m in box.folders["INBOX"].messages)


@pytest_twisted.inlineCallbacks
def test_uids_stored_before_identities_existed_are_marked_without_a_fetch():
    """An upgrade: the dedupe record has the UIDs, no identity: the same
    message, marked as before, no identity FETCH."""
    box = MockMailbox(PASSWORD, [sample_message(i, "old") for i in (1, 2)], uidvalidity=7)
    server = MockIMAPServer(reactor, {"old": box})
    acct = account("old", server.listen())
    sink = MemorySink()
    yield sink.deliver([Message(acct.id, "INBOX", "7", str(u), b"stored before")
                        for u in (1, 2)])
    try:
        result = yield fetch_mailbox(reactor, acct, sink, SETTINGS)
    finally:
        yield server.stop()
    assert result.ok and result.marked == 2 and result.fetched == 0
    assert server.commands("old", "UID FETCH") == []
    assert len(sink.entries) == 2


# -- UIDVALIDITY churn -------------------------------------------------------------------


@defer.inlineCallbacks
def churn(epochs, sessions=3):
    """Sessions on a mailbox whose UIDVALIDITY changes every session, mail
    arriving between them and the first session's marking refused."""
    box = MockMailbox(PASSWORD, [sample_message(i, "churn") for i in (1, 2)], uidvalidity=50)
    server = MockIMAPServer(reactor, {"churn": box})
    acct = account("churn", server.listen())
    sink = MemorySink()
    results = []
    try:
        for k in range(sessions):
            faults = (Fault("UID STORE", "no"),) if k == 0 else ()
            server.script("churn", Behaviour(uidvalidity_churn=True, faults=faults))
            results.append((yield fetch_mailbox(reactor, acct, sink, SETTINGS, epochs=epochs)))
            box.append(sample_message(10 + k, "churn"))
    finally:
        yield server.stop()
    return server, sink, results


@pytest_twisted.inlineCallbacks
def test_with_the_daemons_epochs_messages_stored_before_are_marked_without_their_bodies():
    server, sink, results = yield churn(identity.Epochs())
    assert len(sink.entries) == 4 and len({m.raw for m in sink.entries}) == 4
    assert sink.recognised == []  # recognised before any body came
    bodies = fetches(server, "churn", b"BODY.PEEK[]")
    assert [c.args[0] for c in bodies] == [b"1:2", b"3", b"4"], bodies
    assert results[1].ok and results[1].marked == 3 and results[1].fetched == 1, results[1]


@pytest_twisted.inlineCallbacks
def test_without_epochs_the_sink_recognises_them_when_their_bodies_come_again():
    server, sink, results = yield churn(None)
    assert len(sink.entries) == 4 and len({m.raw for m in sink.entries}) == 4
    assert len(sink.recognised) == 2
    assert fetches(server, "churn", b"HEADER.FIELDS") == []


@pytest_twisted.inlineCallbacks
def test_a_poll_in_a_known_uidvalidity_costs_no_more_commands():
    """The hot path: new messages only, in the epoch polled last: the same
    commands as without identities (SELECT, SEARCH, one FETCH of sizes, one
    of bodies, one STORE; no STATUS after a poll that found mail); the first
    poll after a start, with identities recorded for the mailbox, asks for
    the Message-ID header in that same sizes FETCH."""
    names = yield _polls_of_new_mail(seeded="8")
    work = [(n, h) for n, h in names[1] if n not in ("CAPABILITY", "LOGIN", "AUTHENTICATE",
                                                      "LOGOUT")]
    assert work == [("SELECT", False), ("UID SEARCH", False),
                    ("UID FETCH", False), ("UID FETCH", False), ("UID STORE", False)], work
    assert [n for n, _ in names[0] if n != "STATUS"] == [n for n, _ in names[1]]
    assert ("UID FETCH", True) in names[0]


@pytest_twisted.inlineCallbacks
def test_a_first_poll_with_nothing_recorded_asks_no_message_ids():
    """The first poll after a start of a mailbox whose sink keeps no
    identity (a new mailbox, a fresh Redis) has nothing to recognise: its
    sizes FETCH asks no Message-ID header, and the sink is not asked to
    recognise anything."""
    names, sink = yield _polls_of_new_mail(seeded=None, with_sink=True)
    # the second asks no STATUS: the first found mail
    assert [n for n, _ in names[0] if n != "STATUS"] == [n for n, _ in names[1]]
    assert not any(h for _, h in names[0] + names[1]), names
    assert not [c for c in sink.calls if c[0] == "recognise"], sink.calls


@pytest_twisted.inlineCallbacks
def test_a_first_poll_in_the_epoch_recorded_last_asks_no_message_ids():
    """After a restart (a new Epochs), a mailbox whose sink recorded its
    last identity in the UIDVALIDITY the server still has was checked in
    that epoch already: no Message-ID header, no recognise."""
    names, sink = yield _polls_of_new_mail(seeded="9", with_sink=True)
    assert not any(h for _, h in names[0] + names[1]), names
    assert not [c for c in sink.calls if c[0] == "recognise"], sink.calls


@defer.inlineCallbacks
def _polls_of_new_mail(seeded, with_sink=False):
    """Two polls of one new message each, in one process (one Epochs); the
    commands of each: ``[(name, asked a Message-ID header)]``.  ``seeded``:
    the epoch (the mailbox's is 9) of an identity the sink holds from the
    mailbox already (delivered before this process started), or None."""
    box = MockMailbox(PASSWORD, [sample_message(1, "hot")], uidvalidity=9)
    server = MockIMAPServer(reactor, {"hot": box})
    acct = account("hot", server.listen())
    sink, epochs = MemorySink(), identity.Epochs()
    if seeded:
        yield sink.deliver([Message(acct.id, acct.mailbox, seeded, "100", b"Subject: old\r\n\r\n",
                                    identity=identity.of(19, "<old@example>"))])
    names = []
    try:
        for n in (2, 3):
            before = len(server.commands("hot"))
            result = yield fetch_mailbox(reactor, acct, sink, SETTINGS, epochs=epochs)
            assert result.ok and result.fetched == 1, result
            yield server.all_closed()  # LOGOUT is not waited for by the session
            names.append([(c.name, b"HEADER.FIELDS" in c.raw)
                          for c in server.commands("hot")[before:]])
            box.append(sample_message(n, "hot"))
    finally:
        yield server.stop()
    return (names, sink) if with_sink else names


# -- Hypothesis over server responses: UID reuse ------------------------------------------


@st.composite
def reuse_plans(draw):
    """Messages, which of them are found unmarked again (as if marking them
    had failed), and which of those UIDs the server gives to other messages
    (with or without Message-ID, of the same size or not)."""
    n = draw(st.integers(1, 5))
    with_id = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    unmarked = draw(st.sets(st.integers(1, n), min_size=1))
    reused = draw(st.sets(st.sampled_from(sorted(unmarked))))
    same_size = draw(st.booleans())
    return n, with_id, sorted(unmarked), sorted(reused), same_size


def _raw(n, with_id, tag=b"x"):
    return sample_message(n, "hyp") if with_id else no_message_id(n, tag)


@settings(max_examples=40, deadline=None)
@given(plan=reuse_plans(), after_fetch=st.sampled_from(["seen", "delete"]))
def test_hypothesis_a_reused_uid_is_stored_once_and_nothing_is_marked_blind(plan, after_fetch):
    """In memory: whatever UIDs are found unmarked and reused, every message
    the server held is stored exactly once, nothing is expunged unstored,
    the session says ``protocol`` exactly when a UID was reused, and the
    next session has nothing left to do."""
    n, with_id, unmarked, reused, same_size = plan
    raws = [_raw(i, with_id[i - 1]) for i in range(1, n + 1)]
    box = MockMailbox(PASSWORD, list(raws), uidvalidity=3)
    replaced = {}
    for u in reused:
        replaced[u] = (_raw(100 + u, with_id[u - 1], b"y") if same_size and not with_id[u - 1]
                       else sample_message(200 + u, "hyp", size=300))
    clock = MemoryReactorClock()
    server = MockIMAPServer(clock, {"hyp": box})
    sink = MemorySink()
    first = in_memory_session(clock, server, "hyp", account("hyp", 143), sink)
    assert first.ok, first
    for u in unmarked:  # as if marking them had failed
        box.message(u).flags.clear()
    for u, other in replaced.items():
        box.reuse_uid(u, other)
    acct = account("hyp", 143, after_fetch=after_fetch)
    result = in_memory_session(clock, server, "hyp", acct, sink)
    again = in_memory_session(clock, server, "hyp", acct, sink)
    stored = [m.raw for m in sink.entries]
    assert sorted(stored) == sorted(raws + list(replaced.values())), plan
    assert (result.kind == errors.PROTOCOL) == bool(replaced), result
    assert {raw for _, _, raw in box.expunged} <= set(stored)
    if after_fetch == "delete":
        assert box.uids() == [u for u in range(1, n + 1) if u not in unmarked]
    assert again.ok and again.fetched == 0, again
