"""One test per private API trick in fido_tx.private: each fails loudly,
naming the trick, when an upgrade of Twisted or pyOpenSSL removes it."""

from twisted.trial.unittest import SynchronousTestCase

from fido_tx import private


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

    def test_session_reused(self):
        from OpenSSL import SSL

        connection = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
        self.assertIs(private.session_reused(connection), False, _trick("SSL_session_reused"))

    def test_exit_signal(self):
        from twisted.internet import reactor

        self.assertTrue(hasattr(reactor, "_exitSignal"), _trick("_exitSignal"))

        class Reactor:
            _exitSignal = 15

        r = Reactor()
        self.assertTrue(private.clear_exit_signal(r))
        self.assertIsNone(r._exitSignal)

    def test_every_trick_has_a_test(self):
        names = {"IOpenSSLTrustRoot", "createConnection.__self__", "SSL_session_reused",
                 "_exitSignal"}
        self.assertEqual(set(private.TRICKS), names)

    def test_host_resolution_is_public_now(self):
        from twisted.internet.interfaces import IHostResolution
        from zope.interface.verify import verifyObject

        from fido_tx.resolve import HostResolution

        self.assertTrue(verifyObject(IHostResolution, HostResolution("x.test")))
