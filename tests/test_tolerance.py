"""Servers that bend the rules: tolerant reading, strict writing.

- A response line ended by a bare LF (no CR) is read as a line, on every
  kind of response, and counted (``SessionResult.deviations``, metric
  ``fido_imap_deviations_total{kind="bare_lf"}``); what Fido sends still
  ends in CRLF.
- UIDVALIDITY changing on every session while mail arrives (the mock
  server's ``uidvalidity_churn``): each message is delivered once, the
  ones stored before recognised by their identity (README "What identifies
  a message").
"""

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, task
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from fido_tx.accounts.model import Account
from fido_tx.config import ImapSettings
from fido_tx.observe.metrics import Metrics
from fido_tx.outcome import SessionResult
from fido_tx.testing import MemorySink
from fido_tx.sources.imap import client as imapproto
from fido_tx.sources.imap.client import FidoIMAP4Client
from fido_tx.sources.imap.session import fetch_mailbox
from tests.support import mockimap, tlsca
from tests.support.mockimap import Behaviour, Fault, MockIMAPServer, MockMailbox, sample_message

PASSWORD = "tolerant-secret"
SETTINGS = ImapSettings(connect_timeout=2.0, greeting_timeout=2.0, command_timeout=2.0,
                        logout_timeout=1.0)


def connect():
    clock = task.Clock()
    proto = FidoIMAP4Client(clock, greeting_timeout=10, command_timeout=5)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


# A conversation with every kind of server line: greeting, untagged data,
# a tagged OK, a continuation request, a FETCH with a literal (whose own
# bytes keep their CRLFs) and a tagged NO.
BODY = b"Subject: x\r\n\r\nline one\r\nline two\nbare inside the literal\r\n"
CONVERSATION = [
    (None, b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hello\r\n"),
    ((b"CAPABILITY", None), b"* CAPABILITY IMAP4rev1 MOVE\r\n0001 OK done\r\n"),
    ((b"AUTHENTICATE", b"PLAIN"), b"+ \r\n"),
    (None, b"0002 OK logged in\r\n"),
    ((b"UID", b"FETCH 1 (UID BODY.PEEK[])"),
     b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % len(BODY) + BODY + b")\r\n0003 OK fetched\r\n"),
    ((b"SELECT", b"Nope"), b"0004 NO [NONEXISTENT] no such mailbox\r\n"),
]


def converse(proto, transport, lines):
    """Play the conversation; returns what each command gave and what Fido wrote."""
    outcomes, untagged, continued = [], [], []
    d = None
    for command, reply in lines:
        if command is not None:
            name, args = command
            if name == b"AUTHENTICATE":
                d = proto.command(name, args, continuation=lambda rest: (
                    continued.append(rest), proto.send_secret(b"c2VjcmV0")))
            else:
                d = proto.command(name, args, untagged=untagged.append)
            d.addBoth(outcomes.append)
        proto.dataReceived(reply)
    return outcomes, untagged, continued


class BareLFTests(SynchronousTestCase):
    def play(self, wire_of):
        proto, transport = connect()
        lines = [(c, wire_of(r)) for c, r in CONVERSATION]
        outcomes, untagged, continued = converse(proto, transport, lines)
        greeting = self.successResultOf(proto.greeting)
        texts = [o if isinstance(o, bytes) else (o.value.status, o.value.code) for o in outcomes]
        return dict(greeting=greeting, outcomes=texts, untagged=untagged,
                    continued=continued, written=transport.value(),
                    deviations=dict(proto.deviations), error=proto.error)

    def test_bare_lf_on_every_kind_of_line_reads_like_crlf_and_is_counted(self):
        strict = self.play(lambda r: r)
        tolerant = self.play(mockimap.bare_lf)
        self.assertIsNone(tolerant["error"])
        self.assertEqual(strict["deviations"], {})
        # 1 greeting + 2 + 1 continuation + 1 + 3 (FETCH line, ")" line, OK) + 1
        self.assertEqual(tolerant["deviations"], {"bare_lf": 9})
        for key in ("greeting", "outcomes", "untagged", "continued"):
            self.assertEqual(tolerant[key], strict[key], key)
        self.assertEqual(tolerant["untagged"][-1][1], BODY)  # literal untouched
        self.assertEqual(tolerant["outcomes"][-1], (b"NO", b"NONEXISTENT"))

    def test_what_fido_writes_always_ends_in_crlf(self):
        written = self.play(mockimap.bare_lf)["written"]
        self.assertTrue(written.endswith(b"\r\n"))
        self.assertEqual(written.count(b"\n"), written.count(b"\r\n"))
        self.assertEqual(written.count(b"\r\n"), 5)  # 4 commands + the SASL response

    @settings(max_examples=80, deadline=None)
    @given(endings=st.lists(st.booleans(), min_size=8, max_size=8),
           cuts=st.lists(st.integers(1, 400), max_size=8))
    def test_any_mix_of_line_ends_and_any_chunking(self, endings, cuts):
        """Each server line ends in CRLF or LF at random; the stream is cut anywhere."""
        body = b"a\r\nb\n\r\n{3}\r\n"
        lines = [b"* OK hi", b"* 1 FETCH (UID 9 BODY[] {%d}" % len(body), None,
                 b" FLAGS (\\Seen))", b"* 2 FETCH (FLAGS ())", b"* 3 EXISTS",
                 b"* OK [UIDNEXT 4] x", b"0001 OK done"]
        wire = b""
        bare = 0
        for line, lf in zip(lines, endings):
            if line is None:
                wire += body
                continue
            wire += line + (b"\n" if lf else b"\r\n")
            bare += lf
        proto, _ = connect()
        got = []
        pos = 0
        first = wire.index(b"\n") + 1
        proto.dataReceived(wire[:first])
        d = proto.command(b"UID", b"FETCH 9 (UID BODY.PEEK[])",
                          untagged=lambda s: got.append(s))
        pos = first
        for cut in sorted(set(cuts)):
            if pos < cut < len(wire):
                proto.dataReceived(wire[pos:cut])
                pos = cut
        proto.dataReceived(wire[pos:])
        self.assertEqual(self.successResultOf(d), b"done")
        fetched = [imapproto.parse_fetch(s) for s in got if s[0].endswith(b"FETCH")
                   or b"FETCH" in s[0]]
        self.assertEqual(fetched[0], (1, {b"UID": b"9", b"BODY[]": body, b"FLAGS": [b"\\Seen"]}))
        self.assertEqual(proto.deviations.get("bare_lf", 0), bare)


class DeviationMetricTests(SynchronousTestCase):
    def test_session_deviations_are_counted_by_kind(self):
        metrics = Metrics()
        metrics.observe_session(SessionResult("a", deviations=(("bare_lf", 7),)))
        metrics.observe_session(SessionResult("b", deviations=(("bare_lf", 2),)))
        metrics.observe_session(SessionResult("c"))
        value = metrics.registry.get_sample_value(
            "fido_imap_deviations_total", {"kind": "bare_lf"})
        self.assertEqual(value, 9)


# -- against the mock server ----------------------------------------------------


def account(user, port, **kw):
    kw.setdefault("security", "none")
    kw.setdefault("host", "127.0.0.1")
    return Account(id="acct-" + user, port=port, username=user, password=PASSWORD, **kw)


@pytest.fixture
def server():
    s = MockIMAPServer(reactor, {})
    yield s
    pytest_twisted.blockon(s.stop())


@pytest.mark.parametrize("after_fetch,auth,security", [
    ("seen", "login", "none"), ("seen", "plain", "starttls"), ("seen", "login", "tls"),
    ("delete", "plain", "none"), ("delete", "login", "starttls"),
    ("move:Archive", "login", "none"), ("move:Archive", "plain", "tls"),
])
@pytest_twisted.inlineCallbacks
def test_a_server_ending_every_line_with_a_bare_lf_works(server, after_fetch, auth, security):
    pki = tlsca.files()
    server.tls = (pki.localhost.cert, pki.localhost.key)
    messages = [sample_message(i, "lf", size=3000) for i in range(1, 4)]
    server.accounts["lf"] = MockMailbox(PASSWORD, messages, uidvalidity=7, folders=("Archive",))
    caps = ("IMAP4rev1", "UIDPLUS", "AUTH=PLAIN")  # no MOVE: COPY, STORE, UID EXPUNGE
    server.script("lf", Behaviour(bare_lf=True, capabilities=caps, starttls=True))
    server.script(None, Behaviour(bare_lf=True, capabilities=caps, starttls=True))
    sink = MemorySink()
    port = server.listen(implicit_tls=security == "tls")
    acct = account("lf", port, after_fetch=after_fetch, auth=auth, security=security,
                   host="localhost", ca_file=pki.ca)
    # The mock reads commands up to CRLF only: a command Fido ended with a
    # bare LF would never be answered, and the session would time out.
    result = yield fetch_mailbox(reactor, acct, sink, SETTINGS)
    assert result.ok, (result.message, result.debug)
    assert sorted(m.raw for m in sink.entries) == sorted(messages)
    assert dict(result.deviations)["bare_lf"] > 10
    inbox = server.mailbox("lf").folders["INBOX"].messages
    if after_fetch == "seen":
        assert all("\\Seen" in m.flags for m in inbox)
    else:
        assert inbox == []
    if after_fetch.startswith("move:"):
        assert len(server.mailbox("lf").folders["Archive"].messages) == 3
    assert [r.tls for r in server.connections] == [security != "none"]
    if auth == "plain":
        assert [m for m, _, _ in server.login_attempts] == ["AUTHENTICATE PLAIN"]


@pytest_twisted.inlineCallbacks
def _sessions_while_mail_arrives(server, churn):
    """Three sessions; mail arrives between them; the first session's marking
    is refused (UID STORE answers NO), so its messages are still
    unseen in the next one.  Returns the sink."""
    mailbox = MockMailbox(PASSWORD, [sample_message(1, "churn"), sample_message(2, "churn")],
                          uidvalidity=50)
    server.accounts["churn"] = mailbox
    sink = MemorySink()
    port = server.listen()
    acct = account("churn", port)
    plan = [Behaviour(uidvalidity_churn=churn, faults=(Fault("UID STORE", "no"),)),
            Behaviour(uidvalidity_churn=churn), Behaviour(uidvalidity_churn=churn)]
    for k, behaviour in enumerate(plan):
        server.script("churn", behaviour)
        yield fetch_mailbox(reactor, acct, sink, SETTINGS)
        mailbox.append(sample_message(10 + k, "churn"))
    return sink


@pytest_twisted.inlineCallbacks
def test_the_churning_mock_renumbers_on_every_session(server):
    server.accounts["churn"] = MockMailbox(PASSWORD, [sample_message(1, "churn")],
                                           uidvalidity=50)
    server.script("churn", Behaviour(uidvalidity_churn=True, faults=(Fault("UID STORE", "no"),)))
    sink = MemorySink()
    acct = account("churn", server.listen())
    for _ in range(2):
        yield fetch_mailbox(reactor, acct, sink, SETTINGS)
        server.mailbox("churn").append(sample_message(2, "churn"))
    # what the sessions handed to the sink, delivered or recognised by content
    seen = [(int(m.epoch), int(m.id)) for m in sink.entries + sink.recognised]
    assert seen[0] == (51, 1) and (52, 1) in seen, seen
    # the second session renumbered: both messages again, at UIDs 1 and 2
    assert sorted(u for v, u in seen if v == 52) == [1, 2]


@pytest_twisted.inlineCallbacks
def test_stable_uidvalidity_delivers_each_message_once(server):
    sink = yield _sessions_while_mail_arrives(server, churn=False)
    raws = [m.raw for m in sink.entries]
    assert len(raws) == 4 and len(set(raws)) == 4


@pytest_twisted.inlineCallbacks
def test_uidvalidity_changing_every_session_delivers_each_message_once(server):
    sink = yield _sessions_while_mail_arrives(server, churn=True)
    uidvalidities = {m.epoch for m in sink.entries}
    assert len(uidvalidities) >= 2, "the mock did not churn"
    raws = [m.raw for m in sink.entries]
    assert len(set(raws)) == 4
    assert len(raws) == 4, f"{len(raws) - 4} messages delivered again"
