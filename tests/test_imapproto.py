"""The IMAP4Client subclass and IMAP syntax helpers (fido_tx.sources.imap.client).

Synchronous: StringTransport and a Clock drive the protocol, so timeouts,
literal rates and redaction are checked exactly.
"""

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.internet import error as ierror
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.python import failure
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import errors
from fido_tx.sources.imap import client as imapproto
from fido_tx.sources.imap import login as imaplogin
from fido_tx.sources.imap import parse as imapparse
from fido_tx.sources.imap import select as imapselect
from fido_tx.sources.imap import identity as identity_mod
from fido_tx.sources.imap import session as imap
from fido_tx.sources.imap.login import ImapConnection, Login
from fido_tx.sources.imap.poll import MailboxPoll
from fido_tx.credentials.password import PasswordCredentials
from fido_tx.accounts.model import Account
from fido_tx.config import ImapSettings
from fido_tx.errors import FidoError
from fido_tx.sources.imap.client import FidoIMAP4Client
from fido_tx.testing import MemorySink
from fido_tx.sources.imap.reader import LinearLineReader



def connect(greeting=b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hello\r\n", rate=1000):
    clock = task.Clock()
    proto = FidoIMAP4Client(clock, greeting_timeout=10, command_timeout=5,
                            min_literal_rate=rate)
    transport = StringTransport()
    proto.makeConnection(transport)
    if greeting:
        proto.dataReceived(greeting)
    return proto, transport, clock


def _no_steps(text, **kw):
    pass


_no_steps.enabled = False


def _login(account):
    creds = PasswordCredentials(account.username, account.password)
    return Login(task.Clock(), None, account, ImapSettings(), creds, _no_steps)


def lose(proto):
    """What the reactor does after abortConnection."""
    proto.connectionLost(failure.Failure(ierror.ConnectionAborted()))


class GreetingTests(SynchronousTestCase):
    def test_greeting_capabilities(self):
        proto, _, _ = connect()
        caps = self.successResultOf(proto.greeting)
        self.assertEqual(caps, frozenset([b"IMAP4REV1", b"STARTTLS"]))
        self.assertFalse(proto.preauth)

    def test_greeting_timeout_aborts(self):
        proto, transport, clock = connect(greeting=None)
        clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        lose(proto)
        err = self.failureResultOf(proto.greeting, FidoError).value
        self.assertEqual(err.kind, errors.TIMEOUT)
        self.assertIn("greeting", err.message)

    def test_bye_greeting_is_connect_error(self):
        proto, transport, _ = connect(greeting=b"* BYE Too many connections\r\n")
        self.assertTrue(transport.disconnecting)
        lose(proto)
        err = self.failureResultOf(proto.greeting, FidoError).value
        self.assertEqual(err.kind, errors.CONNECT)
        self.assertIn("Too many connections", err.message)

    def test_garbage_greeting_is_protocol_error(self):
        proto, transport, _ = connect(greeting=b"SSH-2.0-OpenSSH_9.2\r\n")
        lose(proto)
        err = self.failureResultOf(proto.greeting, FidoError).value
        self.assertEqual(err.kind, errors.PROTOCOL)

    def test_close_before_greeting_is_connect_error(self):
        proto, _, _ = connect(greeting=None)
        proto.connectionLost(failure.Failure(ierror.ConnectionDone()))
        err = self.failureResultOf(proto.greeting, FidoError).value
        self.assertEqual(err.kind, errors.CONNECT)


class SharedValueTests(SynchronousTestCase):
    """Equal capability sets and FLAGS tuples are one object, whatever
    connection read them (10,000 held connections to one server kept 10,000
    copies, ~1.7 KiB each)."""

    def test_a_greeting_seen_before_is_not_parsed_again(self):
        text = b"[CAPABILITY IMAP4rev1 IDLE X-SEEN-ONCE] Dovecot ready."
        first = imapparse.greeting_capabilities(text)
        self.assertIs(imapparse._greeting_caps[text], first)
        self.assertIs(imapparse.greeting_capabilities(bytes(bytearray(text))), first)
        self.assertEqual(imapparse.greeting_capabilities(bytearray(text)), first)
        self.assertIsNone(imapparse.greeting_capabilities(b"Dovecot ready."))
        other = imapparse.greeting_capabilities(b"[CAPABILITY IMAP4rev1] ready")
        self.assertEqual(other, frozenset([b"IMAP4REV1"]))

    def test_the_greeting_table_is_bounded(self):
        for n in range(imapparse.SHARED_MAX + 5):
            imapparse.greeting_capabilities(b"[CAPABILITY IMAP4rev1 X-%d] hi" % n)
        self.assertLessEqual(len(imapparse._greeting_caps), imapparse.SHARED_MAX)

    def test_equal_capabilities_and_flags_are_one_object(self):
        text = b"[CAPABILITY IMAP4rev1 IDLE UIDPLUS] ready"
        a = imapparse.greeting_capabilities(text)
        b = imapparse.greeting_capabilities(bytes(bytearray(text)))
        self.assertIs(a, b)
        self.assertEqual(a, frozenset([b"IMAP4REV1", b"IDLE", b"UIDPLUS"]))
        self.assertIs(imapparse.parse_capabilities(b"IMAP4rev1 IDLE UIDPLUS"), a)
        f1 = imapparse.parse_flag_list(b"FLAGS (\\Seen $Fido)")
        f2 = imapparse.parse_flag_list(b"FLAGS (\\Seen $Fido)")
        self.assertIs(f1, f2)
        self.assertEqual(f1, ("\\Seen", "$Fido"))

    def test_the_table_is_bounded(self):
        for k in range(imapparse.SHARED_MAX + 10):
            imapparse.parse_capabilities(b"X%d" % k)
        self.assertLessEqual(len(imapparse._shared), imapparse.SHARED_MAX)
        # values still compare equal after the table was emptied
        self.assertEqual(imapparse.parse_capabilities(b"IMAP4rev1"), frozenset([b"IMAP4REV1"]))


class CommandTests(SynchronousTestCase):
    def test_command_ok_and_untagged_routing(self):
        proto, transport, _ = connect()
        seen = []
        d = proto.command(b"CAPABILITY", untagged=seen.append)
        self.assertEqual(transport.value(), b"0001 CAPABILITY\r\n")
        proto.dataReceived(b"* CAPABILITY IMAP4rev1 MOVE\r\n0001 OK done\r\n")
        self.assertEqual(self.successResultOf(d), b"done")
        self.assertEqual(seen, [[b"CAPABILITY IMAP4rev1 MOVE"]])

    def test_tagged_no_and_bad(self):
        proto, _, _ = connect()
        d = proto.command(b"SELECT", b"Nope")
        proto.dataReceived(b"0001 NO [NONEXISTENT] Unknown mailbox\r\n")
        err = self.failureResultOf(d, imapproto.ImapCommandError).value
        self.assertEqual((err.status, err.code), (b"NO", b"NONEXISTENT"))
        d = proto.command(b"FOO")
        proto.dataReceived(b"0002 BAD what\r\n")
        self.assertEqual(self.failureResultOf(d).value.status, b"BAD")

    def test_command_timeout_fires_and_aborts(self):
        proto, transport, clock = connect()
        d = proto.command(b"UID", b"SEARCH UNSEEN")
        clock.advance(4)
        proto.dataReceived(b"* OK still working\r\n")  # progress resets the timer
        clock.advance(4)
        self.assertFalse(transport.disconnecting)
        clock.advance(1.1)
        self.assertTrue(transport.disconnecting)
        lose(proto)
        err = self.failureResultOf(d, FidoError).value
        self.assertEqual(err.kind, errors.TIMEOUT)
        self.assertIn("UID SEARCH", err.message)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_timeout_after_the_response(self):
        proto, transport, clock = connect()
        d = proto.command(b"NOOP")
        proto.dataReceived(b"0001 OK\r\n")
        self.successResultOf(d)
        clock.advance(proto.command_timeout * 3)
        self.assertFalse(transport.disconnecting)
        self.assertIsNone(proto.error)
        self.assertEqual(clock.getDelayedCalls(), [])  # the idle timer did not re-arm

    def test_a_shorter_timeout_fires_on_time_while_a_longer_one_is_pending(self):
        proto, transport, clock = connect()
        first = proto.command(b"NOOP")  # 5 s
        proto.dataReceived(b"0001 OK\r\n")
        self.successResultOf(first)
        clock.advance(1)
        d = proto.command(b"LOGOUT", timeout=0.5)
        clock.advance(0.4)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        lose(proto)
        self.assertEqual(self.failureResultOf(d, FidoError).value.kind, errors.TIMEOUT)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_each_command_gets_its_whole_timeout(self):
        proto, transport, clock = connect()
        for tag in (b"0001", b"0002", b"0003"):
            d = proto.command(b"NOOP")
            clock.advance(4.9)  # just inside command_timeout, every time
            proto.dataReceived(tag + b" OK\r\n")
            self.successResultOf(d)
        self.assertFalse(transport.disconnecting)
        d = proto.command(b"NOOP")
        clock.advance(5.1)
        self.assertTrue(transport.disconnecting)

    def test_command_after_connection_lost_fails_at_once(self):
        proto, _, _ = connect()
        d = proto.command(b"NOOP")
        proto.connectionLost(failure.Failure(ierror.ConnectionDone()))
        err = self.failureResultOf(d, FidoError).value
        self.assertEqual(err.kind, errors.PROTOCOL)
        self.assertIn("unexpectedly", err.message)
        d2 = proto.command(b"NOOP")
        self.assertEqual(self.failureResultOf(d2, FidoError).value.kind, errors.PROTOCOL)

    def test_bye_then_close_is_protocol_error_with_text(self):
        proto, _, _ = connect()
        d = proto.command(b"UID", b"FETCH 1 (UID)")
        proto.dataReceived(b"* BYE Server shutting down\r\n")
        proto.connectionLost(failure.Failure(ierror.ConnectionDone()))
        err = self.failureResultOf(d, FidoError).value
        self.assertEqual(err.kind, errors.PROTOCOL)
        self.assertIn("Server shutting down", err.message)

    def test_unknown_tag_is_protocol_error(self):
        proto, transport, _ = connect()
        d = proto.command(b"NOOP")
        proto.dataReceived(b"9999 OK what\r\n")
        self.assertTrue(transport.disconnecting)
        lose(proto)
        self.assertEqual(self.failureResultOf(d, FidoError).value.kind, errors.PROTOCOL)

    def test_long_search_reply(self):
        proto, _, _ = connect()
        found = []
        d = proto.command(b"UID", b"SEARCH UNSEEN",
                          untagged=lambda s: found.extend(imapproto.parse_search(s[0])))
        uids = list(range(100000, 105000))
        line = b"* SEARCH " + b" ".join(b"%d" % u for u in uids) + b"\r\n"
        self.assertGreater(len(line), 16384)
        for i in range(0, len(line), 1000):  # arrives in pieces
            proto.dataReceived(line[i:i + 1000])
        proto.dataReceived(b"0001 OK SEARCH done\r\n")
        self.successResultOf(d)
        self.assertEqual(found, uids)

    def test_line_too_long_is_protocol_error(self):
        proto, transport, _ = connect()
        proto.MAX_LENGTH = 100
        d = proto.command(b"NOOP")
        proto.dataReceived(b"* " + b"x" * 200)
        self.assertTrue(transport.disconnecting)
        lose(proto)
        self.assertEqual(self.failureResultOf(d, FidoError).value.kind, errors.PROTOCOL)


class PipelineTests(SynchronousTestCase):
    """A UID STORE and the next UID FETCH written together (command(pipelined=True))."""

    def start(self):
        proto, transport, clock = connect()
        transport.clear()
        store = proto.command(b"UID", b"STORE 1:2 +FLAGS.SILENT (\\Seen)")
        got = []
        fetch = proto.command(b"UID", b"FETCH 3 (UID BODY.PEEK[])", pipelined=True,
                              untagged=lambda s: got.append(imapproto.parse_fetch(s)),
                              literal_each=10, literal_total=10)
        return proto, transport, clock, store, fetch, got

    def test_the_second_command_is_written_before_the_first_is_answered(self):
        proto, transport, _, store, fetch, got = self.start()
        self.assertEqual(transport.value(), b"0001 UID STORE 1:2 +FLAGS.SILENT (\\Seen)\r\n"
                                            b"0002 UID FETCH 3 (UID BODY.PEEK[])\r\n")
        proto.dataReceived(b"0001 OK stored\r\n* 1 FETCH (UID 3 BODY[] {2}\r\nhi)\r\n"
                           b"0002 OK fetched\r\n")
        self.assertEqual(self.successResultOf(store), b"stored")
        self.assertEqual(self.successResultOf(fetch), b"fetched")
        self.assertEqual(got, [(1, {b"UID": b"3", b"BODY[]": b"hi"})])
        self.assertIsNone(proto.waiting)

    def test_answers_in_the_other_order_and_untagged_before_the_first_answer(self):
        proto, _, _, store, fetch, got = self.start()
        proto.dataReceived(b"* 1 FETCH (UID 3 BODY[] {2}\r\nhi)\r\n0002 OK fetched\r\n")
        self.assertEqual(got, [(1, {b"UID": b"3", b"BODY[]": b"hi"})])
        self.assertEqual(self.successResultOf(fetch), b"fetched")
        self.assertNoResult(store)
        proto.dataReceived(b"0001 NO [CANNOT] read-only\r\n")
        self.assertEqual(self.failureResultOf(store, imapproto.ImapCommandError).value.status,
                         b"NO")
        self.assertIsNone(proto.waiting)
        self.assertFalse(proto.transport.disconnecting)

    def test_the_second_commands_bounds_apply_to_its_literals(self):
        proto, transport, _, store, fetch, _ = self.start()
        proto.dataReceived(b"0001 OK stored\r\n* 1 FETCH (UID 3 BODY[] {11}\r\n")
        self.assertTrue(transport.disconnecting)
        lose(proto)
        self.assertEqual(self.failureResultOf(fetch, FidoError).value.kind, errors.PROTOCOL)

    def test_a_lost_connection_fails_both(self):
        proto, _, _, store, fetch, _ = self.start()
        lose(proto)
        self.failureResultOf(store, FidoError)
        self.failureResultOf(fetch, FidoError)

    def test_the_deadline_runs_on_for_the_second(self):
        proto, transport, clock, store, fetch, _ = self.start()
        clock.advance(4)
        proto.dataReceived(b"0001 OK stored\r\n")
        clock.advance(4.5)  # 8.5 s in all, 4.5 s since the first answer
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)
        lose(proto)
        self.assertEqual(self.failureResultOf(fetch, FidoError).value.kind, errors.TIMEOUT)

    def test_only_one_command_may_be_answered_out_of_order(self):
        proto, _, _, _, _, _ = self.start()
        with self.assertRaises(RuntimeError):
            proto.command(b"NOOP", pipelined=True)
        proto.command(b"NOOP")  # queued in order: allowed


class LiteralTests(SynchronousTestCase):
    def fetch(self, proto):
        got = []
        d = proto.command(b"UID", b"FETCH 1 (UID BODY.PEEK[])",
                          untagged=lambda s: got.append(imapproto.parse_fetch(s)))
        return d, got

    def test_literal_bytes_exact(self):
        proto, _, _ = connect()
        d, got = self.fetch(proto)
        body = b"a\r\nb\x00c\xff\r\n)\r\n{3}\r\n"
        proto.dataReceived(b"* 3 FETCH (UID 7 BODY[] {%d}\r\n" % len(body) + body
                           + b" FLAGS (\\Seen))\r\n0001 OK done\r\n")
        self.successResultOf(d)
        self.assertEqual(got, [(3, {b"UID": b"7", b"BODY[]": body, b"FLAGS": [b"\\Seen"]})])
        self.assertIn("S: <literal %d bytes>" % len(body), proto.trace)

    def test_slow_literal_aborts(self):
        proto, transport, clock = connect(rate=1000)
        d, _ = self.fetch(proto)
        proto.dataReceived(b"* 1 FETCH (UID 1 BODY[] {100000}\r\n")
        for _ in range(5):  # 500 bytes/s: below 1000
            proto.dataReceived(b"x" * 500)
            clock.advance(1)
        self.assertTrue(transport.disconnecting)
        lose(proto)
        err = self.failureResultOf(d, FidoError).value
        self.assertEqual(err.kind, errors.TIMEOUT)
        self.assertIn("bytes/s", err.message)

    def test_steady_literal_passes(self):
        proto, transport, clock = connect(rate=1000)
        d, got = self.fetch(proto)
        proto.dataReceived(b"* 1 FETCH (UID 1 BODY[] {20000}\r\n")
        for _ in range(10):  # 2000 bytes/s for 10 s: longer than command_timeout
            proto.dataReceived(b"y" * 2000)
            clock.advance(1)
        proto.dataReceived(b")\r\n0001 OK\r\n")
        self.assertFalse(transport.disconnecting)
        self.successResultOf(d)
        self.assertEqual(got[0][1][b"BODY[]"], b"y" * 20000)
        clock.advance(proto.command_timeout * 2)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(clock.getDelayedCalls(), [])

    @settings(max_examples=60, deadline=None)
    @given(body=st.binary(max_size=300), cuts=st.lists(st.integers(1, 400), max_size=8))
    def test_any_bytes_any_chunking(self, body, cuts):
        proto, _, _ = connect()
        d, got = self.fetch(proto)
        wire = (b"* 1 FETCH (UID 42 BODY[] {%d}\r\n" % len(body) + body
                + b")\r\n* 2 FETCH (FLAGS (\\Seen))\r\n0001 OK done\r\n")
        pos = 0
        for cut in sorted(set(cuts)):
            if cut < len(wire):
                proto.dataReceived(wire[pos:cut])
                pos = cut
        proto.dataReceived(wire[pos:])
        self.successResultOf(d)
        self.assertEqual(got[0], (1, {b"UID": b"42", b"BODY[]": body}))


class TraceTests(SynchronousTestCase):
    def test_login_arguments_redacted(self):
        proto, transport, _ = connect()
        proto.command(b"LOGIN", b'"user" "s3cret-pass"')
        self.assertIn(b"s3cret-pass", transport.value())
        self.assertIn("C: 0001 LOGIN <redacted>", proto.trace)
        self.assertNotIn("s3cret", "\n".join(proto.trace))

    def test_login_literal_continuation_redacted(self):
        proto, transport, _ = connect()

        def cont(rest):
            proto.send_secret(b"p\xe4ss")

        proto.command(b"LOGIN", b'"user" {5}', continuation=cont)
        proto.dataReceived(b"+ go ahead\r\n")
        self.assertTrue(transport.value().endswith(b"p\xe4ss\r\n"))
        self.assertEqual(proto.trace[-1], "C: <redacted>")

    def test_authenticate_initial_response_redacted(self):
        proto, _, _ = connect()
        proto.command(b"AUTHENTICATE", b"PLAIN AHVzZXIAcGFzcw==")
        self.assertIn("C: 0001 AUTHENTICATE PLAIN <redacted>", proto.trace)
        self.assertNotIn("AHVzZXIAcGFzcw", "\n".join(proto.trace))

    def test_trace_is_bounded(self):
        proto, _, _ = connect()
        for i in range(50):
            d = proto.command(b"NOOP")
            proto.dataReceived(b"%04X OK\r\n" % (i + 1))
            self.successResultOf(d)
        self.assertEqual(len(proto.trace), FidoIMAP4Client.TRACE_LINES)


class StartTLSTests(SynchronousTestCase):
    def test_plaintext_after_starttls_ok_is_refused(self):
        proto, transport, _ = connect()
        results = []

        def upgrade(text):
            proto.start_tls(object())

        d = proto.command(b"STARTTLS")
        d.addCallback(upgrade)
        d.addErrback(results.append)
        proto.dataReceived(b"0001 OK go\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n")
        self.assertEqual(results[0].value.kind, errors.TLS)


class SyntaxTests(SynchronousTestCase):
    def test_uid_set(self):
        self.assertEqual(imapproto.uid_set([7, 1, 2, 3, 5, 8, 3]), b"1:3,5,7:8")
        self.assertEqual(imapproto.uid_set([4]), b"4")

    @settings(max_examples=100, deadline=None)
    @given(st.sets(st.integers(1, 10000), min_size=1, max_size=50))
    def test_uid_set_round_trip(self, uids):
        parsed = imap4.parseIdList(imapproto.uid_set(uids))
        self.assertEqual(set(parsed), uids)

    def test_astring_parts(self):
        self.assertEqual(imapproto.astring_parts(b"user@x"), (b'"user@x"', None))
        self.assertEqual(imapproto.astring_parts(b'a"b'), (b"{3}", b'a"b'))
        self.assertEqual(imapproto.astring_parts(b"\xc3\xa4"), (b"{2}", b"\xc3\xa4"))

    def test_mailbox_name_modified_utf7(self):
        self.assertEqual(imapproto.mailbox_name("Done/Ärchiv"), b'"Done/&AMQ-rchiv"')
        self.assertEqual(imapproto.mailbox_name("INBOX"), b'"INBOX"')

    @settings(max_examples=500, deadline=None)
    @given(name=st.text(st.characters(blacklist_characters="\t\n\r"), max_size=30))
    def test_modified_utf7_is_what_twisteds_codec_writes(self, name):
        # Fido encodes mailbox names itself (registering Twisted's codec
        # imports twisted.mail.imap4); the codec is the reference, except
        # for TAB, CR and LF, which it leaves unencoded (Python's UTF-7 does)
        self.assertEqual(imapparse.modified_utf7(name), name.encode("imap4-utf-7"))

    def test_modified_utf7_encodes_control_characters(self):
        self.assertEqual(imapparse.modified_utf7("a\nb&"), b"a&AAo-b&-")
        self.assertEqual(imapparse.modified_utf7("\U0001f600"), b"&2D3eAA-")

    def test_parse_fetch_forms(self):
        seq, items = imapproto.parse_fetch(
            [b'12 FETCH (UID 9 RFC822.SIZE 44 BODY[]<0> "quoted \\" x" '
             b'BODY[HEADER.FIELDS (A B)] NIL FLAGS ())'])
        self.assertEqual(seq, 12)
        self.assertEqual(items, {b"UID": b"9", b"RFC822.SIZE": b"44",
                                 b"BODY[]": b'quoted " x',
                                 b"BODY[HEADER.FIELDS (A B)]": None, b"FLAGS": []})
        with self.assertRaises(ValueError):
            imapproto.parse_fetch([b"1 FETCH (UID 1"])

    def test_parse_fetch_fast_path_takes_the_common_shapes(self):
        for segments in ([b"3 FETCH (UID 9 RFC822.SIZE 44)"],
                         [b"3 fetch (uid 9 BODY[] {2}", b"hi", b")"],
                         [b"3 FETCH (UID 9 RFC822.SIZE 2 BODY[HEADER.FIELDS (MESSAGE-ID)] {2}",
                          b"hi", b")"]):
            self.assertIsNotNone(imapparse._fast_fetch(segments), segments)
        for segments in ([b"3 FETCH (UID 9 FLAGS (\\Seen))"],
                         [b"3 FETCH (UID 9 BODY[]<0> {2}", b"hi", b")"],
                         [b"3 FETCH (UID 9 BODY[] {2}", b"hi", b" FLAGS ())"]):
            self.assertIsNone(imapparse._fast_fetch(segments), segments)

    @settings(max_examples=400, deadline=None)
    # a key with a hyphen is no common shape: the tokenizer answers it
    @example(seq=0, parts=[(b"X-GM-MSGID", b"7")], literal=False, tail=b")", verb=b"FETCH")
    @given(seq=st.integers(0, 10 ** 6),
           parts=st.lists(st.tuples(
               st.sampled_from([b"UID", b"uid", b"RFC822.SIZE", b"MODSEQ", b"BODY[]", b"NIL",
                                b"BODY[HEADER.FIELDS (MESSAGE-ID)]", b"BODY[]<0>", b"(",
                                b"", b"X-GM-MSGID"]),
               st.sampled_from([b"7", b"12345", b"NIL", b'"q"', b"()", b"(7)", b"{3}",
                                b"~{3}", b"", b" ", b"0"])), max_size=5),
           literal=st.booleans(), tail=st.sampled_from([b")", b" )", b"))", b" UID 5)", b""]),
           verb=st.sampled_from([b"FETCH", b"Fetch", b"FETCHX"]))
    def test_parse_fetch_fast_path_answers_as_the_tokenizer(self, seq, parts, literal,
                                                           tail, verb):
        text = b"%d %s (" % (seq, verb) + b" ".join(b" ".join(p) for p in parts)
        if literal:
            text += (b" " if parts else b"") + b"BODY[]"
        segments = [text + b" {3}", b"a)b", tail] if literal else [text + tail]
        fast = imapparse._fast_fetch(segments)
        if fast is not None:
            self.assertEqual(fast, imapparse._parse_fetch(segments))
        elif all(k[:1].isalpha() and k.replace(b".", b"").isalnum() and v.isdigit()
                 # a body section answered by a number is no common shape
                 and not k.upper().startswith(b"BODY") for k, v in parts) \
                and verb != b"FETCHX" and tail == b")" and (parts or literal):
            self.fail(f"the common shape {segments!r} took the slow path")

    def test_parse_status_forms(self):
        self.assertEqual(imapproto.parse_status([b"STATUS INBOX (UNSEEN 0)"]),
                         {b"UNSEEN": 0})
        self.assertEqual(imapproto.parse_status([b'status "a (UNSEEN 3)" (MESSAGES 5 unseen 2)']),
                         {b"MESSAGES": 5, b"UNSEEN": 2})
        self.assertEqual(imapproto.parse_status([b"STATUS {5}", b"IN(BO", b" (UNSEEN 7)"]),
                         {b"UNSEEN": 7})
        self.assertEqual(imapproto.parse_status([b"STATUS INBOX ()"]), {})
        self.assertEqual(imapproto.parse_status([b"5 EXISTS"]), {})
        self.assertEqual(imapproto.parse_status([b"STATUS INBOX (UNSEEN x)"]), {})

    @settings(max_examples=200, deadline=None)
    @given(name=st.text(min_size=1, max_size=20), counts=st.dictionaries(
        st.sampled_from([b"MESSAGES", b"UNSEEN", b"UIDNEXT", b"UIDVALIDITY", b"RECENT"]),
        st.integers(0, 2**32 - 1), max_size=5))
    def test_parse_status_reads_the_counts_whatever_the_mailbox_is_called(self, name, counts):
        encoded = imapparse.modified_utf7(name)
        if imapproto._needs_literal(encoded):
            segments = [b"STATUS {%d}" % len(encoded), encoded]
            tail = b" "
        else:
            segments = []
            tail = b"STATUS " + imapproto.quote(encoded) + b" "
        tail += b"(" + b" ".join(b"%s %d" % kv for kv in counts.items()) + b")"
        segments.append(tail)
        self.assertEqual(imapproto.parse_status(segments), counts)

    def test_select_info(self):
        info = imapproto.SelectInfo()
        for line in [b"FLAGS (\\Seen \\Deleted)", b"OK [PERMANENTFLAGS (\\Seen \\*)] ok",
                     b"OK [UIDVALIDITY 3857529045] UIDs valid", b"17 EXISTS",
                     b"OK [HIGHESTMODSEQ 5] x"]:
            info.feed(line)
        self.assertEqual((info.uidvalidity, info.exists), (3857529045, 17))
        self.assertTrue(info.keywords_allowed("$FidoTooLarge"))
        info.permanent_flags = ("\\Seen",)
        self.assertFalse(info.keywords_allowed("$FidoTooLarge"))

    def test_response_code(self):
        self.assertEqual(imapproto.response_code(b"[AUTHENTICATIONFAILED] no"),
                         b"AUTHENTICATIONFAILED")
        self.assertEqual(imapproto.response_code(b"no code"), b"")


class MessageIdTests(SynchronousTestCase):
    def test_forms(self):
        f = imapparse.extract_message_id
        self.assertEqual(f(b"Message-ID: <a@b>\r\n\r\nbody"), "<a@b>")
        self.assertEqual(f(b"X: y\r\nmessage-id:\r\n  <folded@b>\r\n\r\n"), "<folded@b>")
        self.assertEqual(f(b"X: y\n\nMessage-ID: <in-body@b>\n"), "")
        self.assertEqual(f(b"Message-Id:<lf@b>\nX: y\n\n"), "<lf@b>")
        self.assertEqual(f(b""), "")
        self.assertEqual(f(b"\xff\xfe: \x00\r\nMessage-ID: <\xe9@b>\r\n"), "<\udce9@b>")

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=500))
    def test_never_fails(self, raw):
        self.assertIsInstance(imapparse.extract_message_id(raw), str)


class AuthClassificationTests(SynchronousTestCase):
    def kind(self, status, text):
        return imaplogin.auth_error(imapproto.ImapCommandError("LOGIN", status, text)).kind

    def test_kinds(self):
        self.assertEqual(self.kind(b"NO", b"[AUTHENTICATIONFAILED] Invalid credentials"),
                         errors.AUTH)
        self.assertEqual(self.kind(b"NO", b"[UNAVAILABLE] try later"), errors.CONNECT)
        self.assertEqual(self.kind(b"NO", b"[LIMIT] too many"), errors.CONNECT)
        self.assertEqual(self.kind(b"NO", b"Too many connections from your IP"),
                         errors.CONNECT)
        self.assertEqual(self.kind(b"NO", b"LOGIN failed"), errors.AUTH)
        self.assertEqual(self.kind(b"BAD", b"syntax"), errors.PROTOCOL)


class MarkingCommandTests(SynchronousTestCase):
    """The MOVE / UIDPLUS paths (Twisted's server has neither)."""

    def session(self, caps, after_fetch):
        account = Account(id="a", host="h", username="u", password="p",
                          after_fetch=after_fetch)
        proto, transport, _ = connect()
        conn = ImapConnection(account, proto, None)
        conn.caps = frozenset(caps)
        session = MailboxPoll(conn, account, MemorySink(), ImapSettings(), _no_steps)
        return session, proto, transport

    def test_uid_move(self):
        session, proto, transport = self.session([b"MOVE"], "move:Done/Ärchiv")
        d = defer.ensureDeferred(session.mark([1, 2, 3, 9]))
        self.assertEqual(transport.value(), b'0001 UID MOVE 1:3,9 "Done/&AMQ-rchiv"\r\n')
        proto.dataReceived(b"* OK [COPYUID 1 1:3,9 5:8] moved\r\n* 1 EXPUNGE\r\n0001 OK done\r\n")
        self.successResultOf(d)

    def test_move_failure_is_mailbox_error(self):
        session, proto, transport = self.session([b"MOVE"], "move:Gone")
        d = defer.ensureDeferred(session.mark([1]))
        proto.dataReceived(b"0001 NO [TRYCREATE] no such mailbox\r\n")
        err = self.failureResultOf(d, FidoError).value
        self.assertEqual(err.kind, errors.MAILBOX)
        self.assertIn("TRYCREATE", err.message)

    def test_delete_with_uidplus_expunges_only_those_uids(self):
        session, proto, transport = self.session([b"UIDPLUS"], "delete")
        d = defer.ensureDeferred(session.mark([4, 5]))
        self.assertEqual(transport.value(), b"0001 UID STORE 4:5 +FLAGS.SILENT (\\Deleted)\r\n")
        transport.clear()
        proto.dataReceived(b"0001 OK\r\n")
        self.assertEqual(transport.value(), b"0002 UID EXPUNGE 4:5\r\n")
        proto.dataReceived(b"0002 OK\r\n")
        self.successResultOf(d)

    def test_move_with_uidplus_but_no_move(self):
        session, proto, transport = self.session([b"UIDPLUS"], "move:Done")
        d = defer.ensureDeferred(session.mark([4]))
        for expected in [b'0001 UID COPY 4 "Done"\r\n',
                         b"0002 UID STORE 4 +FLAGS.SILENT (\\Deleted)\r\n",
                         b"0003 UID EXPUNGE 4\r\n"]:
            self.assertEqual(transport.value(), expected)
            transport.clear()
            proto.dataReceived(expected[:4] + b" OK\r\n")
        self.successResultOf(d)


class PipelinedMarkingTests(SynchronousTestCase):
    """A batch's UID STORE is written with the next batch's UID FETCH, and
    only after the sink confirmed it."""

    def start(self, after_fetch="seen"):
        account = Account(id="a", host="h", username="u", password="p",
                          after_fetch=after_fetch)
        proto, transport, _ = connect()
        conn = ImapConnection(account, proto, None)
        conn.caps = frozenset()
        sink = MemorySink()
        poll = MailboxPoll(conn, account, sink, ImapSettings(batch_messages=2), _no_steps)
        info = imapparse.SelectInfo()
        info.uidvalidity = 7
        transport.clear()
        d = defer.ensureDeferred(poll.fetch_new(info, [1, 2, 3]))
        self.assertEqual(transport.value(), b"0001 UID FETCH 1:3 (UID RFC822.SIZE)\r\n")
        transport.clear()
        proto.dataReceived(b"".join(b"* %d FETCH (UID %d RFC822.SIZE 2)\r\n" % (u, u)
                                    for u in (1, 2, 3)) + b"0001 OK\r\n")
        self.assertEqual(transport.value(), b"0002 UID FETCH 1:2 (UID BODY.PEEK[])\r\n")
        transport.clear()
        proto.dataReceived(b"* 1 FETCH (UID 1 BODY[] {2}\r\nm1)\r\n"
                           b"* 2 FETCH (UID 2 BODY[] {2}\r\nm2)\r\n0002 OK\r\n")
        self.assertEqual([m.id for m in sink.entries], ["1", "2"])
        return d, poll, proto, transport, sink

    def test_the_store_rides_with_the_next_fetch_and_the_last_comes_alone(self):
        d, poll, proto, transport, sink = self.start()
        self.assertEqual(transport.value(), b"0003 UID STORE 1:2 +FLAGS.SILENT (\\Seen)\r\n"
                                            b"0004 UID FETCH 3 (UID BODY.PEEK[])\r\n")
        transport.clear()
        proto.dataReceived(b"0003 OK\r\n* 3 FETCH (UID 3 BODY[] {2}\r\nm3)\r\n0004 OK\r\n")
        self.assertEqual([m.id for m in sink.entries], ["1", "2", "3"])
        self.assertEqual(transport.value(), b"0005 UID STORE 3 +FLAGS.SILENT (\\Seen)\r\n")
        self.assertNoResult(d)  # the last batch is marked before the poll ends
        proto.dataReceived(b"0005 OK\r\n")
        self.successResultOf(d)
        self.assertEqual((poll.fetched, poll.marked), (3, 3))

    def test_a_refused_store_ends_the_poll_after_the_fetch_without_delivering_it(self):
        d, poll, proto, transport, sink = self.start()
        proto.dataReceived(b"0003 NO [CANNOT] no\r\n* 3 FETCH (UID 3 BODY[] {2}\r\nm3)\r\n")
        self.assertNoResult(d)  # the FETCH is still running
        proto.dataReceived(b"0004 OK\r\n")
        err = self.failureResultOf(d, FidoError).value
        self.assertEqual(err.kind, errors.MAILBOX)
        self.assertIn("UID STORE", err.message)
        self.assertEqual([m.id for m in sink.entries], ["1", "2"])
        self.assertEqual(poll.marked, 0)
        self.assertIsNone(proto.waiting)

    def test_delete_marks_before_the_next_fetch(self):
        d, poll, proto, transport, sink = self.start(after_fetch="delete")
        self.assertEqual(transport.value(), b"0003 UID STORE 1:2 +FLAGS.SILENT (\\Deleted)\r\n")


class SavedSearchTests(SynchronousTestCase):
    """With SEARCHRES, the SEARCH and the sizes FETCH go in one write."""

    def start(self, caps=(b"SEARCHRES",), epochs=None):
        account = Account(id="a", host="h", username="u", password="p")
        proto, transport, _ = connect()
        conn = ImapConnection(account, proto, None)
        conn.caps = frozenset(caps)
        sink = MemorySink()
        poll = MailboxPoll(conn, account, sink, ImapSettings(), _no_steps, epochs=epochs)
        info = imapparse.SelectInfo()
        info.uidvalidity = 7
        transport.clear()
        return poll, proto, transport, info, sink

    def test_search_and_sizes_in_one_write_then_the_bodies(self):
        poll, proto, transport, info, sink = self.start()
        d = defer.ensureDeferred(poll.search(info, {b"UNSEEN": 2}))
        self.assertEqual(transport.value(), b"0001 UID SEARCH RETURN (SAVE) UNSEEN\r\n"
                                            b"0002 UID FETCH $ (UID RFC822.SIZE)\r\n")
        proto.dataReceived(b"0001 OK saved\r\n* 1 FETCH (UID 5 RFC822.SIZE 2)\r\n"
                           b"* 2 FETCH (UID 6 RFC822.SIZE 2)\r\n"
                           b"* 3 FETCH (UID 9 FLAGS (\\Seen))\r\n0002 OK\r\n")
        self.assertEqual(self.successResultOf(d), [5, 6])
        transport.clear()
        d = defer.ensureDeferred(poll.fetch_new(info, [5, 6]))
        # no sizes FETCH of its own
        self.assertEqual(transport.value(), b"0003 UID FETCH 5:6 (UID BODY.PEEK[])\r\n")
        transport.clear()
        proto.dataReceived(b"* 1 FETCH (UID 5 BODY[] {2}\r\nm5)\r\n"
                           b"* 2 FETCH (UID 6 BODY[] {2}\r\nm6)\r\n0003 OK\r\n")
        proto.dataReceived(b"0004 OK\r\n")
        self.successResultOf(d)
        self.assertEqual([m.raw for m in sink.entries], [b"m5", b"m6"])
        self.assertEqual(poll.marked, 2)

    def test_a_first_poll_in_an_epoch_asks_the_message_ids_with_it(self):
        poll, proto, transport, info, sink = self.start(epochs=identity_mod.Epochs())
        d = defer.ensureDeferred(poll.search(info, {b"UNSEEN": 1}))
        self.assertIn(b"0002 UID FETCH $ " + identity_mod.ITEMS + b"\r\n", transport.value())
        proto.dataReceived(b"0001 OK\r\n* 1 FETCH (UID 5 RFC822.SIZE 2 "
                           b"BODY[HEADER.FIELDS (MESSAGE-ID)] {21}\r\n"
                           b"Message-ID: <a@b>\r\n\r\n)\r\n0002 OK\r\n")
        self.assertEqual(self.successResultOf(d), [5])
        self.assertEqual(poll.prefetched, {5: (2, "<a@b>")})

    def test_a_refused_search_waits_for_the_fetch_and_is_the_error(self):
        poll, proto, transport, info, _ = self.start()
        d = defer.ensureDeferred(poll.search(info, {b"UNSEEN": 2}))
        proto.dataReceived(b"0001 BAD [CLIENTBUG] no\r\n")
        self.assertNoResult(d)
        proto.dataReceived(b"0002 NO nothing saved\r\n")
        err = self.failureResultOf(d, FidoError).value
        self.assertIn("UID SEARCH failed: BAD", err.message)
        self.assertIsNone(proto.waiting)

    def test_plain_search_without_searchres_a_status_or_with_many_unseen(self):
        for caps, status in (((), {b"UNSEEN": 2}), ((b"SEARCHRES",), None),
                             ((b"SEARCHRES",), {b"UNSEEN": 1001})):
            poll, proto, transport, info, _ = self.start(caps)
            defer.ensureDeferred(poll.search(info, status))
            self.assertEqual(transport.value(), b"0001 UID SEARCH UNSEEN\r\n")


class AuthChoiceTests(SynchronousTestCase):
    """Which login command a session sends (and when it sends none)."""

    def session(self, caps, security="tls", auth="login", password="pw"):
        account = Account(id="a", host="h", username="u", password=password,
                          security=security, auth=auth)
        session = _login(account)
        proto, transport, _ = connect()
        session.connection = ImapConnection(account, proto, None)
        session.connection.caps = frozenset(caps)
        return session, proto, transport

    def test_logindisabled_uses_plain_over_tls(self):
        session, proto, transport = self.session([b"LOGINDISABLED", b"AUTH=PLAIN"])
        d = defer.ensureDeferred(session.authenticate())
        self.assertEqual(transport.value(), b"0001 AUTHENTICATE PLAIN\r\n")
        transport.clear()
        proto.dataReceived(b"+ \r\n")
        self.assertEqual(transport.value(), b"AHUAcHc=\r\n")  # base64 "\0u\0pw"
        proto.dataReceived(b"0001 OK [CAPABILITY IMAP4rev1 MOVE] in\r\n")
        self.successResultOf(d)
        self.assertEqual(session.connection.caps, frozenset([b"IMAP4REV1", b"MOVE"]))
        self.assertNotIn("AHUAcHc", "\n".join(proto.trace))

    def test_logindisabled_without_tls_sends_nothing(self):
        session, proto, transport = self.session([b"LOGINDISABLED", b"AUTH=PLAIN"],
                                                 security="none")
        d = defer.ensureDeferred(session.authenticate())
        self.assertEqual(self.failureResultOf(d, FidoError).value.kind, errors.AUTH)
        self.assertEqual(transport.value(), b"")

    def test_login_with_literal_password(self):
        session, proto, transport = self.session([], password='a"b')
        d = defer.ensureDeferred(session.authenticate())
        self.assertEqual(transport.value(), b'0001 LOGIN "u" {3}\r\n')
        transport.clear()
        proto.dataReceived(b"+ Ready\r\n")
        self.assertEqual(transport.value(), b'a"b\r\n')
        proto.dataReceived(b"0001 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        err = self.failureResultOf(d, FidoError).value
        self.assertEqual(err.kind, errors.AUTH)

    def test_sasl_ir(self):
        session, proto, transport = self.session([b"SASL-IR", b"AUTH=PLAIN"], auth="plain")
        defer.ensureDeferred(session.authenticate())
        self.assertEqual(transport.value(), b"0001 AUTHENTICATE PLAIN AHUAcHc=\r\n")
        self.assertIn("C: 0001 AUTHENTICATE PLAIN <redacted>", proto.trace)

    def test_starttls_with_preauth_is_refused(self):
        account = Account(id="a", host="h", username="u", password="pw",
                          security="starttls")
        session = _login(account)
        proto, transport, _ = connect(greeting=b"* PREAUTH [CAPABILITY IMAP4rev1] hi\r\n")
        session.connection = ImapConnection(account, proto, None)
        d = defer.ensureDeferred(session.greeting_and_tls())
        self.assertEqual(self.failureResultOf(d, FidoError).value.kind, errors.TLS)
        self.assertEqual(transport.value(), b"")


class OrphanTests(SynchronousTestCase):
    def test_bad_tagged_status_fails_the_command(self):
        proto, transport, _ = connect()
        d = proto.command(b"NOOP")
        proto.dataReceived(b"0001 MAYBE later\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.failureResultOf(d, FidoError).value.kind, errors.PROTOCOL)
        lose(proto)

    def test_oversized_literal_is_refused_before_reading_it(self):
        proto, transport, _ = connect()
        proto.max_literal = 1000
        d = proto.command(b"UID", b"FETCH 1 (UID BODY.PEEK[])", untagged=lambda s: None)
        proto.dataReceived(b"* 1 FETCH (UID 1 BODY[] {1001}\r\n")
        self.assertTrue(transport.disconnecting)
        lose(proto)
        err = self.failureResultOf(d, FidoError).value
        self.assertEqual(err.kind, errors.PROTOCOL)
        self.assertIn("1001", err.message)


class ConnectPhaseTests(SynchronousTestCase):
    """fetch_mailbox on a MemoryReactorClock: nothing ever connects."""

    def start(self, **kw):
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        account = Account(id="a", host="127.0.0.1", port=143, username="u", password="p",
                          security="none")
        d = imap.fetch_mailbox(reactor, account, MemorySink(),
                               ImapSettings(connect_timeout=7), **kw)
        return reactor, d

    def test_connect_timeout(self):
        reactor, d = self.start()
        self.assertNoResult(d)
        reactor.advance(7.1)
        result = self.successResultOf(d)
        self.assertEqual(result.kind, errors.TIMEOUT)
        self.assertIn("connect", result.message)
        self.assertTrue(7.0 <= result.seconds <= 7.2, result.seconds)

    def test_cancel_while_connecting(self):
        reactor, d = self.start()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        reactor.advance(100)
        self.assertEqual([c for c in reactor.getDelayedCalls() if c.active()], [])

    def test_unknown_security_is_config_error(self):
        from twisted.internet.testing import MemoryReactorClock

        account = Account(id="a", host="h", username="u", password="p", security="ssl")
        d = imap.fetch_mailbox(MemoryReactorClock(), account, MemorySink(), ImapSettings())
        self.assertEqual(self.successResultOf(d).kind, errors.CONFIG)


class OAuthMechanismTests(SynchronousTestCase):
    """XOAUTH2 through the credentials interface (the token comes from them)."""

    def test_xoauth2_error_challenge_is_answered_and_the_token_invalidated(self):
        import base64

        from zope.interface import implementer

        from fido_tx.interfaces import ICredentials

        @implementer(ICredentials)
        class Token:
            invalidated = 0

            def secret(self):
                return defer.succeed("tok-123")

            def invalidate(self):
                self.invalidated += 1

            def secret_forms(self):
                return ("tok-123",)

            def lifetime(self):
                return None

        account = Account(id="a", host="h", username="u@x.test", password="unused",
                          security="tls", auth="xoauth2")
        creds = Token()
        login = Login(task.Clock(), None, account, ImapSettings(), creds, _no_steps)
        proto, transport, _ = connect()
        login.connection = ImapConnection(account, proto, None)
        login.connection.caps = frozenset([b"AUTH=XOAUTH2"])
        d = defer.ensureDeferred(login.authenticate())
        self.assertEqual(transport.value(), b"0001 AUTHENTICATE XOAUTH2\r\n")
        transport.clear()
        proto.dataReceived(b"+ \r\n")
        self.assertEqual(base64.b64decode(transport.value().strip()),
                         b"user=u@x.test\x01auth=Bearer tok-123\x01\x01")
        transport.clear()
        proto.dataReceived(b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n")
        self.assertEqual(transport.value(), b"\r\n")  # the empty answer, not a cancel
        transport.clear()
        proto.dataReceived(b"0001 NO [AUTHENTICATIONFAILED] Invalid credentials\r\n")
        # refused: the token is invalidated and the login tried once more
        self.assertEqual(creds.invalidated, 1)
        self.assertEqual(transport.value(), b"0002 AUTHENTICATE XOAUTH2\r\n")
        transport.clear()
        proto.dataReceived(b"+ \r\n")
        proto.dataReceived(b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n")
        proto.dataReceived(b"0002 NO [AUTHENTICATIONFAILED] Invalid credentials\r\n")
        failure = self.failureResultOf(d, FidoError)
        self.assertEqual(failure.value.kind, errors.AUTH)
        self.assertIn("status=401", failure.value.message)
        self.assertEqual(creds.invalidated, 2)
        self.assertNotIn("tok-123", "\n".join(proto.trace))
# -- bounds: what a hostile server meets (README "Bounds") ------------------------


def held_bytes(proto):
    """Bytes of server data the protocol holds right now (partial response)."""
    held = sum(len(s) for s in proto._segments or ())
    held += sum(len(c) for c in proto._literal or ())
    return held + sum(len(p) for p in proto._pending)


class BoundsTests(SynchronousTestCase):
    def cut_off(self, proto, transport, d):
        self.assertTrue(transport.disconnecting)
        lose(proto)
        err = self.failureResultOf(d, FidoError).value
        self.assertEqual(err.kind, errors.PROTOCOL)
        return err

    def test_a_chain_of_literals_in_one_response_is_refused_when_announced(self):
        proto, transport, _ = connect()
        proto.max_literal = 10_000
        d = proto.command(b"UID", b"FETCH 1 (UID BODY.PEEK[])", untagged=lambda s: None)
        proto.dataReceived(b"* 1 FETCH (UID 1 BODY[] {6000}\r\n" + b"x" * 6000)
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b" X-A {6000}\r\n")  # 12,000 in one response: over
        err = self.cut_off(proto, transport, d)
        self.assertIn("one response", err.message)
        self.assertIn("10000", err.message)

    def test_literals_of_one_command_are_bounded_across_responses(self):
        proto, transport, _ = connect()
        d = proto.command(b"UID", b"FETCH 1:* (UID BODY.PEEK[])", untagged=lambda s: None,
                          literal_total=25_000)
        for n in range(1, 3):
            proto.dataReceived(b"* %d FETCH (UID %d BODY[] {10000}\r\n" % (n, n)
                               + b"y" * 10000 + b")\r\n")
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b"* 3 FETCH (UID 3 BODY[] {10000}\r\n")
        err = self.cut_off(proto, transport, d)
        self.assertIn("30000 bytes of literal data", err.message)
        self.assertIn("UID FETCH", err.message)

    def test_status_answer_with_a_literal_chain_gets_the_small_default(self):
        proto, transport, _ = connect()
        d = proto.command(b"STATUS", b'"INBOX" (UNSEEN)', untagged=lambda s: None)
        chunk = b"z" * 100_000
        for _ in range(10):
            proto.dataReceived(b"* STATUS {100000}\r\n" + chunk + b" (UNSEEN 1)\r\n")
        self.assertFalse(transport.disconnecting)  # 1,000,000 bytes: just under 1 MiB
        proto.dataReceived(b"* STATUS {100000}\r\n")
        self.cut_off(proto, transport, d)
        self.assertLessEqual(held_bytes(proto), proto.max_command_literal)

    def test_too_many_literals_in_one_response(self):
        proto, transport, _ = connect()
        d = proto.command(b"UID", b"FETCH 1 (UID)", untagged=lambda s: None)
        proto.dataReceived(b"* 1 FETCH (UID 1" + b" X {0}\r\n" * 64)
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b" X {0}\r\n")
        err = self.cut_off(proto, transport, d)
        self.assertIn("chained more than 64 literals", err.message)

    def test_lying_rfc822_size_is_cut_off_before_the_body_is_held(self):
        proto, transport, _ = connect()
        limits = FidoIMAP4Client.body_limits({7: 100, 8: 100}, 50 * 1024 * 1024)
        d = proto.command(b"UID", b"FETCH 7:8 (UID BODY.PEEK[])", untagged=lambda s: None,
                          **limits)
        proto.dataReceived(b"* 1 FETCH (UID 7 BODY[] {20000000}\r\n")
        err = self.cut_off(proto, transport, d)
        self.assertIn("UID 7", err.message)
        self.assertIn("RFC822.SIZE", err.message)
        self.assertEqual(held_bytes(proto), 0)

    def test_lying_size_with_the_uid_after_the_body_meets_the_batch_bound(self):
        proto, transport, _ = connect()
        limits = FidoIMAP4Client.body_limits({7: 100}, 50 * 1024 * 1024)
        d = proto.command(b"UID", b"FETCH 7 (UID BODY.PEEK[])", untagged=lambda s: None,
                          **limits)
        proto.dataReceived(b"* 1 FETCH (BODY[] {20000000}\r\n")
        err = self.cut_off(proto, transport, d)
        self.assertIn("over the limit of %d bytes" % limits["literal_each"], err.message)

    def test_body_limits(self):
        limits = FidoIMAP4Client.body_limits({1: 1000, 2: 80_000}, 100_000)
        slack = FidoIMAP4Client.BODY_SLACK_BYTES
        self.assertEqual(limits["literal_caps"], {1: 1000 + slack + 125, 2: 100_000})
        self.assertEqual(limits["literal_each"], 100_000)
        self.assertEqual(limits["literal_total"], 1000 + slack + 125 + 100_000)

    def test_a_truthful_batch_passes(self):
        proto, transport, _ = connect()
        bodies = {5: b"a" * 3000, 6: b"b" * 5000}
        got = []
        d = proto.command(b"UID", b"FETCH 5:6 (UID BODY.PEEK[])",
                          untagged=lambda s: got.append(imapproto.parse_fetch(s)),
                          **FidoIMAP4Client.body_limits(
                              {u: len(b) for u, b in bodies.items()}, 10**6))
        for n, (uid, body) in enumerate(bodies.items(), 1):
            proto.dataReceived(b"* %d FETCH (UID %d BODY[] {%d}\r\n" % (n, uid, len(body))
                               + body + b")\r\n")
        proto.dataReceived(b"0001 OK done\r\n")
        self.successResultOf(d)
        self.assertEqual([v[b"BODY[]"] for _, v in got], list(bodies.values()))

    def test_endless_untagged_ok_lines_are_cut_off(self):
        proto, transport, clock = connect()
        proto.max_untagged = 1000
        d = proto.command(b"NOOP")
        proto.dataReceived(b"* OK still here\r\n" * 1000)
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b"* OK still here\r\n")
        err = self.cut_off(proto, transport, d)
        self.assertIn("more than 1000 untagged responses to NOOP", err.message)

    def test_bytes_of_responses_per_command_are_bounded(self):
        proto, transport, _ = connect()
        proto.max_untagged_bytes = 100_000
        d = proto.command(b"NOOP")
        proto.dataReceived((b"* OK " + b"w" * 9993 + b"\r\n") * 10)  # 100,000 bytes
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b"* OK\r\n")
        err = self.cut_off(proto, transport, d)
        self.assertIn("100000 bytes of responses", err.message)

    def test_the_counters_start_again_with_each_command(self):
        proto, transport, _ = connect()
        proto.max_untagged = 3
        for tag in (b"0001", b"0002", b"0003"):
            d = proto.command(b"NOOP")
            proto.dataReceived(b"* OK x\r\n" * 3 + tag + b" OK\r\n")
            self.successResultOf(d)
        self.assertFalse(transport.disconnecting)

    def test_search_uids_are_cut_to_the_bound_before_parsing(self):
        proto, transport, _ = connect()
        proto.max_search_uids = 1000
        found = []
        d = proto.command(b"UID", b"SEARCH UNSEEN",
                          untagged=lambda s: found.extend(imapproto.parse_search(s[0])))
        line = b"* SEARCH " + b" ".join(b"%d" % u for u in range(1, 3001)) + b"\r\n"
        proto.dataReceived(line)
        proto.dataReceived(line)  # a second line: nothing more is taken
        proto.dataReceived(b"0001 OK done\r\n")
        self.successResultOf(d)
        self.assertEqual(found, list(range(1, 1001)))
        self.assertEqual(proto.search_ignored, 5000)
        self.assertFalse(transport.disconnecting)

    def test_search_lines_under_the_bound_add_up(self):
        proto, _, _ = connect()
        proto.max_search_uids = 5
        found = []
        d = proto.command(b"UID", b"SEARCH UNSEEN",
                          untagged=lambda s: found.extend(imapproto.parse_search(s[0])))
        proto.dataReceived(b"* SEARCH 1 2 3\r\n* SEARCH 4 5 6 7\r\n* SEARCH\r\n0001 OK\r\n")
        self.successResultOf(d)
        self.assertEqual(found, [1, 2, 3, 4, 5])
        self.assertEqual(proto.search_ignored, 2)


_SMALL = dict(max_literal=5000, max_command_literal=12000, max_untagged=40,
              max_untagged_bytes=50_000, max_response_literals=4, max_response_text=2000,
              max_search_uids=30)

_lines = st.one_of(
    st.just(b"* OK hello\r\n"),
    st.builds(lambda n: b"* SEARCH " + b" ".join(b"%d" % i for i in range(n)) + b"\r\n",
              st.integers(0, 60)),
    # a FETCH with a chain of literals, sizes true or lying
    st.builds(
        lambda uid, sizes, lie: b"* 1 FETCH (UID %d" % uid + b"".join(
            b" BODY[] {%d}\r\n" % (s + lie) + b"q" * s for s in sizes) + b")\r\n",
        st.integers(1, 5), st.lists(st.integers(0, 4000), max_size=6), st.integers(0, 3000)),
    st.builds(lambda s: b"* STATUS {%d}\r\n" % len(s) + s + b" (UNSEEN 1)\r\n",
              st.binary(max_size=300)),
    st.binary(max_size=200),
)


class HostileResponseProperties(SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(script=st.lists(_lines, max_size=60), cuts=st.lists(st.integers(1, 500), max_size=20),
           caps=st.booleans())
    def test_never_holds_more_than_the_bounds_and_never_crashes(self, script, cuts, caps):
        proto, transport, _ = connect()
        for name, value in _SMALL.items():
            setattr(proto, name, value)
        proto.MAX_LENGTH = 4096
        kw = FidoIMAP4Client.body_limits({u: 1000 for u in range(1, 6)}, 5000) if caps else {}
        seen = []
        d = proto.command(b"UID", b"FETCH 1:5 (UID BODY.PEEK[])", untagged=seen.append, **kw)
        wire = b"".join(script) + b"0001 OK done\r\n"
        bound = _SMALL["max_literal"] + _SMALL["max_response_text"] + proto.MAX_LENGTH + 1000
        pos = 0
        for cut in sorted(set(cuts)) + [len(wire)]:
            if pos < cut <= len(wire):
                proto.dataReceived(wire[pos:cut])  # never raises
                pos = cut
                self.assertLessEqual(held_bytes(proto), bound)
        literal_total = sum(len(s[i]) for s in seen for i in range(1, len(s), 2))
        self.assertLessEqual(literal_total, kw.get("literal_total", _SMALL["max_command_literal"]))
        self.assertLessEqual(len(seen), _SMALL["max_untagged"])
        searched = sum(len(imapproto.parse_search(s[0])) for s in seen
                       if len(s) == 1 and s[0].startswith(b"SEARCH"))
        self.assertLessEqual(searched, _SMALL["max_search_uids"])
        if transport.disconnecting:
            lose(proto)
        results = []
        d.addBoth(results.append)
        if results and isinstance(results[0], failure.Failure):  # else: still waiting, or OK
            self.assertIsInstance(results[0].value, (FidoError, imapproto.ImapCommandError))


class _Lines(LinearLineReader):
    """The reader alone: lines only, collected."""

    MAX_LENGTH = 1000
    error = None
    line_mode = 1

    def __init__(self):
        self._reader_init()
        self.lines = []
        self.too_long = []

    def lineReceived(self, line):
        self.lines.append(line)

    def lineLengthExceeded(self, line):
        self.too_long.append(line)
        self.error = "too long"


class LinearReaderProperties(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(lines=st.lists(st.binary(max_size=40).filter(lambda b: b"\n" not in b
                                                        and not b.endswith(b"\r")),
                          max_size=20),
           cuts=st.lists(st.integers(0, 900), max_size=30),
           bare=st.lists(st.booleans(), max_size=20))
    def test_any_chunking_gives_the_lines_split_at_crlf(self, lines, cuts, bare):
        """Lines end in CRLF, or (tolerated, counted) a bare LF."""
        reader = _Lines()
        ends = [b"\n" if k < len(bare) and bare[k] else b"\r\n" for k in range(len(lines))]
        wire = b"".join(line + end for line, end in zip(lines, ends))
        pos = 0
        for cut in sorted(set(cuts)) + [len(wire)]:
            if pos < cut <= len(wire):
                reader._receive(wire[pos:cut])
                pos = cut
        self.assertEqual(reader.lines, lines)
        self.assertEqual(reader.bare_lf_lines, ends.count(b"\n"))
        self.assertEqual(reader.clearLineBuffer(), b"")

    def test_a_line_over_max_length_in_pieces(self):
        reader = _Lines()
        for _ in range(11):
            reader._receive(b"x" * 100)
        self.assertEqual(reader.lines, [])
        self.assertEqual(len(reader.too_long), 1)
        self.assertEqual(reader.pending_bytes, 0)


class PipeliningTests(SynchronousTestCase):
    """Commands written behind a running one (RFC 3501 sec 5.5): each runs,
    with its own handler, bounds and deadline, from the answer before it."""

    def test_queued_command_is_written_at_once_and_gets_its_own_untagged(self):
        proto, transport, _ = connect()
        first, second = [], []
        a = proto.command(b"NOOP", untagged=first.append)
        b = proto.command(b"STATUS", b"INBOX (UNSEEN)", untagged=second.append)
        self.assertEqual(transport.value(), b"0001 NOOP\r\n0002 STATUS INBOX (UNSEEN)\r\n")
        self.assertEqual(proto.queued, 1)
        proto.dataReceived(b"* 3 EXISTS\r\n0001 OK noop\r\n"
                           b"* STATUS INBOX (UNSEEN 0)\r\n0002 OK status\r\n")
        self.assertEqual(self.successResultOf(a), b"noop")
        self.assertEqual(self.successResultOf(b), b"status")
        self.assertEqual(first, [[b"3 EXISTS"]])
        self.assertEqual(second, [[b"STATUS INBOX (UNSEEN 0)"]])
        self.assertEqual((proto.waiting, proto.queued), (None, 0))

    def test_queued_command_deadline_starts_with_its_turn(self):
        proto, transport, clock = connect()
        a = proto.command(b"LOGIN", b"u p", timeout=5)
        b = proto.command(b"STATUS", b"INBOX (UNSEEN)", timeout=5)
        clock.advance(4)
        proto.dataReceived(b"0001 OK in\r\n")
        self.successResultOf(a)
        clock.advance(4.9)  # 8.9 s after it was written, 4.9 s after its turn
        self.assertFalse(transport.disconnecting)
        clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        lose(proto)
        err = self.failureResultOf(b, FidoError).value
        self.assertEqual(err.kind, errors.TIMEOUT)
        self.assertIn("STATUS", err.message)

    def test_a_lost_connection_fails_the_queued_commands_too(self):
        proto, _, _ = connect()
        a = proto.command(b"NOOP")
        b = proto.command(b"NOOP")
        c = proto.command(b"NOOP")
        lose(proto)
        for d in (a, b, c):
            self.assertEqual(self.failureResultOf(d, FidoError).value.kind, errors.PROTOCOL)

    def test_a_command_that_may_need_a_continuation_is_never_queued(self):
        proto, transport, _ = connect()
        proto.command(b"NOOP")
        with self.assertRaises(RuntimeError):
            proto.command(b"AUTHENTICATE", b"PLAIN", continuation=lambda rest: None)
        self.assertEqual(transport.value(), b"0001 NOOP\r\n")

    def test_a_continuation_request_for_a_queued_command_is_a_protocol_error(self):
        proto, transport, _ = connect()
        proto.command(b"NOOP")
        b = proto.command(b"STATUS", b"INBOX (UNSEEN)")
        proto.dataReceived(b"0001 OK\r\n+ go on\r\n")
        self.assertTrue(transport.disconnecting)
        lose(proto)
        self.assertEqual(self.failureResultOf(b, FidoError).value.kind, errors.PROTOCOL)


class LoginPipelineTests(SynchronousTestCase):
    """The session's STATUS goes out with LOGIN: one round trip for both."""

    def session(self, password="pw"):
        account = Account(id="a", host="h", username="u", password=password, security="tls")
        sent = []
        creds = PasswordCredentials(account.username, account.password)
        login = Login(task.Clock(), None, account, ImapSettings(), creds, _no_steps,
                      pipeline=lambda command: sent.append(imapselect.send_status(
                          command, "INBOX", b"(UNSEEN)")))
        proto, transport, _ = connect()
        login.connection = ImapConnection(account, proto, None)
        login.connection.caps = frozenset([b"IMAP4REV1"])
        return login, proto, transport, sent

    def test_status_is_written_with_login_and_answered_after_it(self):
        login, proto, transport, sent = self.session()
        d = defer.ensureDeferred(login.authenticate())
        self.assertEqual(transport.value(),
                         b'0001 LOGIN "u" "pw"\r\n0002 STATUS "INBOX" (UNSEEN)\r\n')
        self.assertTrue(login.pipelined)
        proto.dataReceived(b"0001 OK [CAPABILITY IMAP4rev1 IDLE] in\r\n"
                           b"* STATUS INBOX (UNSEEN 0)\r\n0002 OK done\r\n")
        self.successResultOf(d)
        self.assertEqual(login.connection.caps, frozenset([b"IMAP4REV1", b"IDLE"]))
        self.assertEqual(self.successResultOf(sent[0]), {b"UNSEEN": 0})

    def test_a_refused_login_reports_the_login_and_the_status_refusal_is_harmless(self):
        login, proto, transport, sent = self.session()
        d = defer.ensureDeferred(login.authenticate())
        proto.dataReceived(b"0001 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
                           b"0002 BAD Not authenticated\r\n")
        err = self.failureResultOf(d, FidoError).value
        self.assertEqual(err.kind, errors.AUTH)
        self.assertIn("Authentication failed", err.message)
        self.assertIsNone(self.successResultOf(sent[0]))  # no answer: nothing read into it
        self.assertFalse(transport.disconnecting)

    def test_login_without_capabilities_in_its_answer_asks_them_behind_status(self):
        login, proto, transport, sent = self.session()
        d = defer.ensureDeferred(login.authenticate())
        proto.dataReceived(b"0001 OK in\r\n")
        self.assertEqual(transport.value().splitlines()[-1], b"0003 CAPABILITY")
        proto.dataReceived(b"* STATUS INBOX (UNSEEN 2)\r\n0002 OK done\r\n"
                           b"* CAPABILITY IMAP4rev1 MOVE\r\n0003 OK caps\r\n")
        self.successResultOf(d)
        self.assertEqual(login.connection.caps, frozenset([b"IMAP4REV1", b"MOVE"]))
        self.assertEqual(self.successResultOf(sent[0]), {b"UNSEEN": 2})

    def test_a_login_with_a_literal_pipelines_nothing(self):
        login, proto, transport, sent = self.session(password='a"b')
        defer.ensureDeferred(login.authenticate())
        self.assertEqual(transport.value(), b'0001 LOGIN "u" {3}\r\n')
        self.assertEqual((sent, login.pipelined), ([], False))


class LogoutTests(SynchronousTestCase):
    def test_logout_is_written_and_the_connection_closed_without_waiting(self):
        account = Account(id="a", host="h", username="u", password="pw")
        proto, transport, clock = connect()
        conn = ImapConnection(account, proto, None)
        d = defer.ensureDeferred(conn.logout(2.0))
        self.successResultOf(d)  # done at once: the answer is not waited for
        self.assertEqual(transport.value(), b"0001 LOGOUT\r\n")
        self.assertTrue(transport.disconnecting)
        lose(proto)
        self.assertEqual(clock.getDelayedCalls(), [])  # the close timer went with it

    def test_a_close_that_does_not_happen_is_aborted_after_logout_timeout(self):
        account = Account(id="a", host="h", username="u", password="pw")
        proto, transport, clock = connect()
        aborted = []
        transport.abortConnection = lambda: aborted.append(True)
        conn = ImapConnection(account, proto, None)
        self.successResultOf(defer.ensureDeferred(conn.logout(2.0)))
        clock.advance(1.9)
        self.assertEqual(aborted, [])
        clock.advance(0.2)
        self.assertEqual(aborted, [True])


class DroppedPipelineTests(SynchronousTestCase):
    """A server that loses what was written behind LOGIN (Courier's login
    process does): seen, reported, never pipelined to again."""

    def test_an_answer_to_a_later_command_says_the_earlier_was_dropped(self):
        proto, transport, _ = connect()
        a = proto.command(b"STATUS", b"INBOX (UNSEEN)")
        b = proto.command(b"CAPABILITY")
        proto.dataReceived(b"* CAPABILITY IMAP4rev1\r\n0002 OK done\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertTrue(proto.pipeline_dropped)
        lose(proto)
        err = self.failureResultOf(a, FidoError).value
        self.assertEqual(err.kind, errors.PROTOCOL)
        self.assertIn("dropped or mixed up pipelined commands", err.message)
        self.failureResultOf(b, FidoError)

    def test_the_connector_pipelines_only_to_servers_whose_login_answer_has_capabilities(self):
        from fido_tx.sources.imap.connect import Connector

        connector = Connector(task.Clock())
        dovecot = Account(id="a", host="d", username="u", password="pw")
        courier = Account(id="b", host="c", username="u", password="pw")
        self.assertFalse(connector.pipelines_login(dovecot))  # unknown: not yet
        self.assertTrue(connector.pipelines(dovecot))  # SEARCH behind SELECT: yes
        connector.learned_login(dovecot, True)
        connector.learned_login(courier, False)
        self.assertTrue(connector.pipelines_login(dovecot))
        self.assertFalse(connector.pipelines_login(courier))
        self.assertTrue(connector.pipelines(courier))  # only LOGIN is not pipelined to it
        connector.dropped(dovecot)  # it dropped one
        connector.learned_login(dovecot, True)
        self.assertFalse(connector.pipelines_login(dovecot))  # for good
        self.assertFalse(connector.pipelines(dovecot))  # nothing pipelined any more


class SelectSearchPipelineTests(SynchronousTestCase):
    """UID SEARCH is written right behind SELECT (an account without a
    position): one round trip for both."""

    def poll(self, **account_fields):
        account = Account(id="a", host="h", username="u", password="p", **account_fields)
        proto, transport, _ = connect()
        conn = ImapConnection(account, proto, None)
        poll = MailboxPoll(conn, account, MemorySink(), ImapSettings(), _no_steps)
        d = defer.ensureDeferred(poll.run())
        self.assertEqual(transport.value(), b'0001 STATUS "INBOX" (UNSEEN)\r\n')
        transport.clear()
        proto.dataReceived(b"* STATUS INBOX (UNSEEN 0)\r\n0001 OK done\r\n"
                           if account_fields.get("select") == "none" else
                           b"* STATUS INBOX (UNSEEN 2)\r\n0001 OK done\r\n")
        return poll, proto, transport, d

    SELECTED = (b"* FLAGS (\\Seen \\Deleted)\r\n* OK [PERMANENTFLAGS (\\Seen \\Deleted \\*)] ok\r\n"
                b"* 2 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n0002 OK [READ-WRITE] selected\r\n")

    def test_search_goes_with_select(self):
        poll, proto, transport, d = self.poll()
        self.assertEqual(transport.value(),
                         b'0002 SELECT "INBOX"\r\n0003 UID SEARCH UNSEEN UNKEYWORD $FidoTooLarge'
                         b' UNKEYWORD $FidoRejected\r\n')
        transport.clear()
        proto.dataReceived(self.SELECTED + b"* SEARCH\r\n0003 OK found\r\n")
        self.successResultOf(d)  # nothing unseen after all: done
        self.assertEqual(transport.value(), b"")

    def test_a_mailbox_without_keywords_is_searched_again_without_them(self):
        poll, proto, transport, d = self.poll()
        transport.clear()
        proto.dataReceived(b"* FLAGS (\\Seen)\r\n* OK [PERMANENTFLAGS (\\Seen)] ok\r\n"
                           b"* OK [UIDVALIDITY 7] ok\r\n0002 OK selected\r\n"
                           b"* SEARCH 5\r\n0003 OK found\r\n")
        self.assertEqual(transport.value(), b"0004 UID SEARCH UNSEEN\r\n")
        proto.dataReceived(b"* SEARCH\r\n0004 OK found\r\n")
        self.successResultOf(d)

    def test_a_refused_select_leaves_the_search_behind_it_unread(self):
        poll, proto, transport, d = self.poll()
        proto.dataReceived(b"0002 NO [NONEXISTENT] no such mailbox\r\n"
                           b"0003 BAD No mailbox selected\r\n")
        err = self.failureResultOf(d, FidoError).value
        self.assertEqual(err.kind, errors.MAILBOX)
        self.assertFalse(transport.disconnecting)
        lose(proto)  # the late answer or the close: no unhandled error

    def test_an_account_with_a_position_searches_after_select(self):
        account = Account(id="a", host="h", username="u", password="p", select="new")
        proto, transport, _ = connect()
        conn = ImapConnection(account, proto, None)
        poll = MailboxPoll(conn, account, MemorySink(), ImapSettings(), _no_steps,
                           dry_run=True)
        defer.ensureDeferred(poll.run())
        transport.clear()
        proto.dataReceived(b"* STATUS INBOX (UNSEEN 2)\r\n0001 OK done\r\n")
        self.assertEqual(transport.value(), b'0002 EXAMINE "INBOX"\r\n')


class QuotingPredicateTests(SynchronousTestCase):
    """The quoting predicates (one regex search each) say what the
    per-byte rules they replaced said, for every byte string."""

    @given(st.binary(max_size=64))
    @settings(max_examples=400, deadline=None)
    def test_same_answers_as_the_per_byte_rules(self, value):
        self.assertEqual(imapparse._needs_literal(value),
                         any(c in (0, 10, 13) or c > 127 for c in value))
        self.assertEqual(imapparse._quotable(value),
                         not any(c < 32 or c > 126 or c in (34, 92) for c in value))

    def test_every_single_byte(self):
        for c in range(256):
            value = bytes([c])
            self.assertEqual(imapparse._quotable(value), 32 <= c <= 126 and c not in (34, 92), c)
            self.assertEqual(imapparse._needs_literal(value), c in (0, 10, 13) or c > 127, c)
