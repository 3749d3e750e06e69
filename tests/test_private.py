"""One test per private API trick in fido_tx/private.py: each fails loudly,
naming the trick, when an upgrade removes what it relies on."""

from hypothesis import given, settings as hsettings, strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import private


# -- txredisapi: _build_command -----------------------------------------------------


class TxredisapiBuildCommandTests(SynchronousTestCase):
    TRICK = (
        "fido_tx.private.piecewise_redis_protocol overrides txredisapi's private "
        "BaseRedisProtocol._build_command"
    )

    def test_txredisapi_build_command(self):
        import txredisapi

        base = txredisapi.BaseRedisProtocol
        self.assertTrue(
            callable(getattr(base, private.TXREDISAPI_BUILD_COMMAND, None)),
            f"{self.TRICK}: txredisapi no longer has it; find the new place where "
            "execute_command encodes a command",
        )
        # execute_command must still write what _build_command returns: the
        # override writes the pieces itself and returns b""
        proto = private.piecewise_redis_protocol(txredisapi.RedisProtocol)(charset=None)
        sequences = []

        class Recording(StringTransport):
            def writeSequence(self, data):
                sequences.append(list(data))
                super().writeSequence(data)

        transport = Recording()
        proto.makeConnection(transport)
        transport.clear()
        proto.connected = 1
        proto.execute_command(b"SET", b"k", b"v\x00")
        self.assertEqual(
            transport.value(), b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nv\x00\r\n",
            f"{self.TRICK}: execute_command no longer writes the command through it",
        )
        self.assertEqual(len(sequences), 1, f"{self.TRICK}: the override was not called")

    @hsettings(max_examples=100, deadline=None)
    @given(st.lists(st.one_of(st.binary(max_size=40), st.binary(min_size=1000, max_size=1100), st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
                              st.integers(-(2**63), 2**63 - 1)), min_size=1, max_size=8))
    def test_same_bytes_as_txredisapi(self, args):
        import txredisapi

        reference = txredisapi.BaseRedisProtocol(charset=None)._build_command(*args)
        self.assertEqual(private.redis_build_command(*args), reference, self.TRICK)


class TxredisapiReplyHooksTests(SynchronousTestCase):
    TRICK = (
        "fido_tx.private.fast_reply_protocol hands replies to txredisapi's "
        "BaseRedisProtocol.replyReceived / handleTransactionData"
    )

    def test_txredisapi_reply_hooks(self):
        import txredisapi

        base = txredisapi.BaseRedisProtocol
        for name in private.TXREDISAPI_REPLY_HOOKS[:2]:
            self.assertTrue(callable(getattr(base, name, None)),
                            f"{self.TRICK}: txredisapi no longer has {name}")
        # a reply handed to replyReceived still fires the command's Deferred
        proto = private.fast_reply_protocol(txredisapi.RedisProtocol)(
            charset=None, convertNumbers=False)
        proto.makeConnection(StringTransport())
        proto.connected = 1
        d = proto.execute_command(b"SMISMEMBER", b"k", b"1", b"2")
        e = proto.execute_command(b"GET", b"nope")
        proto.dataReceived(b"*2\r\n:1\r\n:0\r\n-ERR no\r\n")
        self.assertEqual(self.successResultOf(d), [1, 0], self.TRICK)
        f = self.failureResultOf(e, txredisapi.ResponseError)
        self.assertEqual(f.getErrorMessage(), "ERR no", self.TRICK)

    def test_txredisapi_reply_queue(self):
        """A plain command's one Deferred waits in the reply queue; a
        cancelled one leaves a stand-in, so the next reply goes to the next
        command; a lost connection fails what waits."""
        import txredisapi

        proto = private.fast_reply_protocol(
            private.piecewise_redis_protocol(txredisapi.RedisProtocol))(
            charset=None, convertNumbers=False)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.connected = 1
        transport.clear()
        first = proto.execute_command(b"GET", b"a")
        second = proto.execute_command(b"GET", b"b")
        self.assertEqual(transport.value(), b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n"
                                            b"*2\r\n$3\r\nGET\r\n$1\r\nb\r\n")
        self.assertEqual(len(proto.replyQueue.waiting), 2, self.TRICK)
        first.cancel()
        self.failureResultOf(first)
        proto.dataReceived(b"$1\r\nA\r\n$1\r\nB\r\n")
        self.assertEqual(self.successResultOf(second), b"B", self.TRICK)
        third = proto.execute_command(b"GET", b"c")
        proto.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(third, txredisapi.ConnectionError)
        with self.assertRaises(txredisapi.ConnectionError):
            proto.execute_command(b"GET", b"d")


# -- Twisted and pyOpenSSL ---------------------------------------------------------


def _trick(name):
    return f"private API trick {name!r} broke ({private.TRICKS[name]}): see fido_tx/private.py"


class PrivateApiTests(SynchronousTestCase):
    def test_trust_root_of_platform_and_extra_roots(self):
        from OpenSSL import SSL
        from twisted.internet.ssl import optionsForClientTLS

        try:
            options = optionsForClientTLS("example.test",
                                          trustRoot=private.PlatformAndExtraRoots([]))
            options._createConnection.__self__.getContext()
        except Exception as e:  # pragma: no cover - only after an upgrade
            self.fail(_trick("IOpenSSLTrustRoot") + f": {e!r}")
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        private.PlatformAndExtraRoots([])._addCACertsToContext(context)

    def test_release_idle_buffers(self):
        from OpenSSL import SSL
        from twisted.internet.ssl import optionsForClientTLS

        options = optionsForClientTLS("example.test")
        self.assertTrue(private.release_idle_buffers(options), _trick("createConnection.__self__"))
        mode = options._createConnection.__self__.getContext().set_mode(0)
        self.assertTrue(mode & SSL.MODE_RELEASE_BUFFERS, _trick("createConnection.__self__"))

    def test_share_context(self):
        from twisted.internet.ssl import CertificateOptions, optionsForClientTLS, platformTrust
        from twisted.protocols.tls import TLSMemoryBIOFactory

        shared = CertificateOptions(trustRoot=platformTrust())
        a, b = optionsForClientTLS("a.example.test"), optionsForClientTLS("b.example.test")
        self.assertTrue(private.share_context(a, shared), _trick("share_context"))
        self.assertTrue(private.share_context(b, shared), _trick("share_context"))
        factory = TLSMemoryBIOFactory(a, True, None)
        ca = a.clientConnectionForTLS(factory.protocol(factory, None))
        cb = b.clientConnectionForTLS(factory.protocol(factory, None))
        # one context, each connection its own server name (SNI)
        self.assertIs(ca.get_context(), shared.getContext(), _trick("share_context"))
        self.assertIs(cb.get_context(), shared.getContext(), _trick("share_context"))
        self.assertEqual(ca.get_servername(), b"a.example.test", _trick("share_context"))
        self.assertEqual(cb.get_servername(), b"b.example.test", _trick("share_context"))
        # release_idle_buffers finds the shared options
        self.assertIs(a._createConnection.__self__, shared)
        self.assertFalse(private.share_context(object(), shared))

    def test_exit_signal(self):
        from twisted.internet import reactor

        self.assertTrue(hasattr(reactor, "_exitSignal"), _trick("_exitSignal"))

        class Reactor:
            _exitSignal = 15

        r = Reactor()
        self.assertTrue(private.clear_exit_signal(r))
        self.assertIsNone(r._exitSignal)

    def test_import_twisted(self):
        # a fresh interpreter: here the reactor is imported already
        import json
        import os
        import subprocess
        import sys

        script = (
            "import json, sys\n"
            "from fido_tx import private\n"
            "hidden = private.import_twisted()\n"
            "from twisted.internet import endpoints, reactor, tcp\n"
            "from twisted.internet.interfaces import ITLSTransport\n"
            "import txredisapi\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('OpenSSL', 'cryptography', 'service_identity'))\n"
            "factory = txredisapi.ssl.ClientContextFactory()\n"
            "print(json.dumps([hidden, loaded, ITLSTransport.implementedBy(tcp.Client),\n"
            "                  type(factory).__module__, 'OpenSSL' in sys.modules,\n"
            "                  'twisted.internet.ssl' in sys.modules]))\n"
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=root), timeout=60)
        self.assertEqual(out.returncode, 0, _trick("import_twisted") + out.stderr[-2000:])
        hidden, loaded, tcp_tls, factory_module, openssl_after, ssl_after = json.loads(
            out.stdout.splitlines()[-1])
        self.assertTrue(hidden, _trick("import_twisted"))
        self.assertEqual(loaded, [], _trick("import_twisted"))
        # Twisted fell back to "no TLS" (IMAP's STARTTLS layers stdtls by hand)
        self.assertFalse(tcp_tls, _trick("import_twisted"))
        # txredisapi's stand-in makes the real context factory, loading pyOpenSSL
        self.assertEqual(factory_module, "twisted.internet.ssl", _trick("import_twisted"))
        self.assertTrue(openssl_after and ssl_after)

    def test_swap_receiver(self):
        import socket

        from twisted.internet import tcp
        from twisted.internet.protocol import Protocol

        class Layer(Protocol):
            def __init__(self, below):
                self.below = below
                self.got = []

            def dataReceived(self, data):
                self.got.append(data)

        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        app = Protocol()
        connection = tcp.Connection(ours, app)
        layer = private.swap_receiver(connection, Layer)
        self.assertIs(layer.below, app)
        theirs.sendall(b"* OK")
        connection.doRead()  # a real TCP connection reads into the new layer
        self.assertEqual(layer.got, [b"* OK"], _trick("swap_receiver"))
        with self.assertRaises(TypeError):  # a transport without a receiver
            private.swap_receiver(StringTransport(), Layer)

    def test_every_trick_has_a_test(self):
        names = {"IOpenSSLTrustRoot", "createConnection.__self__", "_exitSignal",
                 "import_twisted", "share_context", "txredisapi replyReceived",
                 "swap_receiver"}
        self.assertEqual(set(private.TRICKS), names)

    def test_host_resolution_is_public_now(self):
        from twisted.internet.interfaces import IHostResolution
        from zope.interface.verify import verifyObject

        from fido_tx.resolve import HostResolution

        self.assertTrue(verifyObject(IHostResolution, HostResolution("x.test")))
