"""The one-pass RESP reply reader (fido_tx.redis.replies and
private.fast_reply_protocol) gives the values txredisapi's own reader gives,
however the bytes are split into reads."""

from hypothesis import given, settings as hsettings, strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import private
from fido_tx.redis import replies

_line_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=20)

_leaf = st.one_of(
    st.binary(max_size=30).map(lambda b: ("bulk", b)),
    st.binary(min_size=1500, max_size=2500).map(lambda b: ("bulk", b)),
    st.just(("bulk", None)),
    st.integers(-(2**63), 2**63 - 1).map(lambda n: ("int", n)),
    _line_text.filter(lambda t: t != "QUEUED").map(lambda t: ("status", t)),
    _line_text.map(lambda t: ("error", "ERR " + t)),
)
_reply = st.recursive(
    _leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=6).map(lambda xs: ("array", xs)),
                            st.just(("array", None))),
    max_leaves=20,
)


def encode(reply):
    kind, value = reply
    if kind == "bulk":
        return b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value)
    if kind == "int":
        return b":%d\r\n" % value
    if kind == "status":
        return b"+" + value.encode() + b"\r\n"
    if kind == "error":
        return b"-" + value.encode() + b"\r\n"
    if value is None:
        return b"*-1\r\n"
    return b"*%d\r\n" % len(value) + b"".join(encode(v) for v in value)


def comparable(value):
    """ResponseError instances compare by class and text."""
    if isinstance(value, list):
        return [comparable(v) for v in value]
    if isinstance(value, Exception):
        return (type(value).__name__, str(value))
    return value


def recording(base):
    class Recording(base):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.got = []

        def replyReceived(self, reply):
            self.got.append(comparable(reply))

    return Recording


def feed(proto_class, chunks):
    clock = Clock()
    proto = proto_class(charset=None, convertNumbers=False)
    proto.callLater = clock.callLater
    proto.makeConnection(StringTransport())
    for chunk in chunks:
        proto.dataReceived(chunk)
        while clock.getDelayedCalls():  # txredisapi hands the rest back with callLater(0)
            clock.advance(0)
    return proto.got


def split(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for p in points:
        pieces.append(data[start:p])
        start = p
    pieces.append(data[start:])
    return [p for p in pieces if p]


class ReplyReaderTests(SynchronousTestCase):
    @hsettings(max_examples=100, deadline=None)
    @given(st.lists(_reply, min_size=1, max_size=5), st.lists(st.integers(0, 10**6), max_size=6))
    def test_same_values_as_txredisapi_however_split(self, reps, cuts):
        import txredisapi

        data = b"".join(encode(r) for r in reps)
        chunks = split(data, cuts)
        reference = feed(recording(txredisapi.RedisProtocol), [data])
        fast = feed(private.fast_reply_protocol(recording(txredisapi.RedisProtocol)), chunks)
        self.assertEqual(fast, reference)
        self.assertEqual(len(fast), len(reps))

    def test_a_delivery_reply_is_read_in_one_call_with_no_timer(self):
        import txredisapi

        clock = Clock()
        proto = private.fast_reply_protocol(recording(txredisapi.RedisProtocol))(
            charset=None, convertNumbers=False)
        proto.callLater = clock.callLater
        proto.makeConnection(StringTransport())
        proto.dataReceived(b"*4\r\n:12\r\n$2\r\n17\r\n$2\r\n18\r\n$2\r\n19\r\n:1\r\n")
        self.assertEqual(proto.got, [[12, b"17", b"18", b"19"], 1])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_big_bulk_string_waits_for_all_its_bytes(self):
        body = b"x" * 100_000
        data = b"$%d\r\n%s\r\n" % (len(body), body)
        got, used, need = replies.parse(data[:10])
        self.assertEqual((got, used), ([], 0))
        self.assertEqual(need, len(data))
        self.assertEqual(replies.parse(data), ([body], len(data), 0))

    def test_garbage_is_refused_and_the_connection_dropped(self):
        import txredisapi

        with self.assertRaises(replies.BadReply):
            replies.parse(b"?what\r\n")
        with self.assertRaises(replies.BadReply):
            replies.parse(b":12x\r\n")
        proto = private.fast_reply_protocol(txredisapi.RedisProtocol)(charset=None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"?what\r\n")
        self.assertTrue(transport.disconnecting)
