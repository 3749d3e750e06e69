"""Sub-address routing (fido_tx.routing): examples for each header, then
Hypothesis properties (found through any header, display names, folding,
case; never an exception on arbitrary bytes)."""

import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import config, routing

T = "incoming+%{key}@gitlab.example.com"


def msg(*headers, body=b"hello\r\n"):
    return b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


class ExamplesTests(SynchronousTestCase):
    def test_each_header(self):
        for name in routing.HEADERS:
            raw = msg(
                b"From: someone@example.org",
                name.encode() + b": incoming+group-project-12-abc-issue-@gitlab.example.com",
            )
            self.assertEqual(routing.route_key(raw, T), "group-project-12-abc-issue-", name)

    def test_order_envelope_before_to(self):
        raw = msg(
            b"To: incoming+fromto@gitlab.example.com",
            b"Cc: incoming+fromcc@gitlab.example.com",
            b"X-Original-To: incoming+original@gitlab.example.com",
            b"Delivered-To: incoming+delivered@gitlab.example.com",
        )
        self.assertEqual(routing.route_key(raw, T), "delivered")

    def test_first_matching_address_of_a_list_with_display_names(self):
        raw = msg(
            b'To: "Support, Acme" <support@acme.test>,\r\n'
            b'  "GitLab (issues)" <Incoming+Key-1@GitLab.Example.COM>, other@x.test'
        )
        self.assertEqual(routing.route_key(raw, T), "Key-1")

    def test_non_matching_headers_fall_through(self):
        raw = msg(
            b"Delivered-To: support@gitlab.example.com",
            b"To: incoming@gitlab.example.com",
            b"Cc: incoming+k@gitlab.example.com",
        )
        self.assertEqual(routing.route_key(raw, T), "k")

    def test_no_match_and_no_template(self):
        raw = msg(b"To: a@b.test")
        self.assertEqual(routing.route_key(raw, T), "")
        self.assertEqual(routing.route_key(msg(b"To: incoming+k@gitlab.example.com"), ""), "")
        self.assertEqual(routing.Router("")(raw), "")

    def test_headers_in_body_are_not_read(self):
        raw = msg(b"To: a@b.test", body=b"To: incoming+body@gitlab.example.com\r\n")
        self.assertEqual(routing.route_key(raw, T), "")

    def test_bare_lf_and_eight_bit(self):
        raw = b"Subject: caf\xe9\nTo: =?utf-8?q?J=C3=B6rg?= <incoming+x1@gitlab.example.com>\n\nbody"
        self.assertEqual(routing.Router(T)(raw), "x1")

    def test_template_checks(self):
        for bad in ("incoming@x.test", "a+%{key}+%{key}@x.test", "%{key}", "a %{key}@x"):
            with self.assertRaises(ValueError):
                routing.check_template(bad)
        routing.check_template("")
        routing.check_template(T)

    def test_config_key(self):
        with tempfile.TemporaryDirectory() as d:
            s = config.parse_settings({"routing": {"template": T}}, d + "/fido.toml")
            self.assertEqual(s.routing.template, T)
            self.assertEqual(config.parse_settings({}, d + "/f.toml").routing.template, "")
            with self.assertRaises(config.ConfigError) as e:
                config.parse_settings({"routing": {"template": "x@y"}}, d + "/f.toml")
            self.assertIn("[routing] template", str(e.exception))


keys = st.text(
    alphabet=st.characters(whitelist_categories=("Ll", "Lu", "Nd"), max_codepoint=127)
    | st.sampled_from("-_."),
    min_size=1,
    max_size=40,
).filter(lambda k: not k.startswith(".") and not k.endswith(".") and ".." not in k)
names = st.text(
    alphabet=st.characters(whitelist_categories=("Ll", "Lu"), max_codepoint=127) | st.just(" "),
    max_size=20,
)
others = st.lists(st.sampled_from(["a@b.test", "incoming@gitlab.example.com", "x+y@z.test"]), max_size=3)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        key=keys,
        header=st.sampled_from(routing.HEADERS),
        display=names,
        before=others,
        after=others,
        fold=st.booleans(),
        upper=st.booleans(),
    )
    def test_found_in_any_header_and_shape(self, key, header, display, before, after, fold, upper):
        address = f"incoming+{key}@gitlab.example.com"
        if upper:
            address = address.replace("incoming", "INCOMING").replace("gitlab", "GitLab")
        entry = f'"{display}" <{address}>' if display.strip() else address
        sep = ",\r\n\t" if fold else ", "
        value = sep.join(before + [entry] + after)
        raw = msg(b"From: f@x.test", header.encode() + b": " + value.encode(), b"Subject: s")
        self.assertEqual(routing.route_key(raw, T), key)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=400))
    def test_arbitrary_bytes_never_raise(self, raw):
        result = routing.route_key(raw, T)
        self.assertIsInstance(result, str)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.sampled_from(routing.HEADERS), min_size=1, max_size=6, unique=True))
    def test_priority_follows_headers_order(self, present):
        lines = [f"{h}: incoming+{h.lower()}@gitlab.example.com".encode() for h in present]
        first = min(present, key=routing.HEADERS.index)
        self.assertEqual(routing.route_key(msg(*reversed(lines)), T), first.lower())


class RoutedSinkTests(SynchronousTestCase):
    def test_sets_route_keys_and_passes_the_rest_through(self):
        from zope.interface.verify import verifyObject

        from fido_tx.interfaces import ISink
        from fido_tx.sinks.message import Message
        from fido_tx.testing import MemorySink

        inner = MemorySink()
        sink = routing.routed(inner, routing.Router(T))
        self.assertTrue(verifyObject(ISink, sink))
        self.assertEqual(sink.kind, inner.kind)
        msgs = [Message("a", "INBOX", "1", "1", msg(b"To: incoming+k1@gitlab.example.com")),
                Message("a", "INBOX", "1", "2", msg(b"To: other@x.test")),
                Message("a", "INBOX", "1", "3", msg(b"To: x@y.test"), route_key="kept")]
        self.successResultOf(sink.deliver(msgs))
        self.assertEqual([m.route_key for m in inner.entries], ["k1", "", "kept"])
        self.assertEqual([m.raw for m in inner.entries], [m.raw for m in msgs])
        self.assertEqual(self.successResultOf(sink.filter_new("a", "INBOX", "1", ["1", "4"])), ["4"])
        self.assertIs(routing.routed(inner, routing.Router("")), inner)

    def test_the_daemons_sessions_deliver_route_keys(self):
        """The composition root's session factory: a memory-source account's
        message reaches its delivery with the route key of [routing] template."""
        from twisted.internet import task

        from fido_tx import service
        from fido_tx.accounts.model import Account
        from fido_tx.sources.memory import MemoryMailboxes
        from fido_tx.testing import MemorySink

        settings = config.parse_settings({"routing": {"template": T}}, "/nonexistent/fido.toml")
        sink, memory, clock = MemorySink(), MemoryMailboxes(), task.Clock()
        factory = service._session_factory(clock, settings, {"default": sink}, False,
                                           memory=memory)
        memory["m"].add(msg(b"Delivered-To: incoming+group-1-issue-@gitlab.example.com"))
        d = factory(Account(id="m", source="memory"))
        clock.advance(1)
        self.assertTrue(self.successResultOf(d).ok)
        self.assertEqual([m.route_key for m in sink.entries], ["group-1-issue-"])
