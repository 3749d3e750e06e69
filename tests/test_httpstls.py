"""HTTPS for the HTTP clients (fido_tx/httpstls.py): TLS on a reactor
imported without pyOpenSSL, and one OpenSSL context for every connection."""

import json
import os
import subprocess
import sys
import textwrap

from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI, IAgentEndpointFactory
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface.verify import verifyObject

from fido_tx.httpstls import HttpsEndpoints, HttpsPolicy
from fido_tx.lazytls import TLSEndpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class HttpsPolicyTests(SynchronousTestCase):
    def test_one_creator_per_host_all_on_one_context(self):
        policy = HttpsPolicy()
        verifyObject(IPolicyForHTTPS, policy)
        a = policy.creatorForNetloc(b"graph.example.test", 443)
        self.assertIs(policy.creatorForNetloc(b"graph.example.test", 443), a)
        b = policy.creatorForNetloc(b"login.example.test", 443)
        self.assertIsNot(a, b)
        self.assertIs(a._createConnection.__self__, b._createConnection.__self__)


class HttpsEndpointsTests(SynchronousTestCase):
    def test_endpoints_are_made_once_per_scheme_host_and_port(self):
        endpoints = HttpsEndpoints(Clock(), 5.0)
        verifyObject(IAgentEndpointFactory, endpoints)
        plain = endpoints.endpointForURI(URI.fromBytes(b"http://example.test/a"))
        self.assertIsInstance(plain, HostnameEndpoint)
        self.assertIs(endpoints.endpointForURI(URI.fromBytes(b"http://example.test/b")), plain)
        tls = endpoints.endpointForURI(URI.fromBytes(b"https://example.test/a"))
        self.assertIsInstance(tls, TLSEndpoint)
        self.assertIs(tls.creator, endpoints.policy.creatorForNetloc(b"example.test", 443))
        self.assertIsNot(endpoints.endpointForURI(URI.fromBytes(b"https://example.test:8443/")),
                         tls)

    def test_other_schemes_are_refused(self):
        with self.assertRaises(SchemeNotSupported):
            HttpsEndpoints(Clock()).endpointForURI(URI.fromBytes(b"ftp://example.test/"))


_REQUEST = textwrap.dedent("""
    import json
    from fido_tx import private
    private.import_twisted()  # as twistd's makeService does
    from twisted.internet import reactor
    from fido_tx.httpclient import HttpClient

    out = []
    def go():
        d = HttpClient(reactor, timeout=5).request("GET", "https://127.0.0.1:1/token")
        d.addBoth(lambda r: out.append(getattr(r.value, "kind", repr(r.value))))
        d.addBoth(lambda _: reactor.stop())
    reactor.callWhenRunning(go)
    reactor.run()
    print(json.dumps(out))
""")


class DaemonHttpsTests(SynchronousTestCase):
    def test_an_https_request_in_a_daemon_without_pyopenssl_at_start_connects(self):
        # Agent's own endpoints refused with "OpenSSL not available" (kind
        # config) there: every OAuth2 token request and Graph call failed
        out = subprocess.run([sys.executable, "-c", _REQUEST], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr[-2000:])
        self.assertEqual(json.loads(out.stdout.strip().splitlines()[-1]), ["connect"])
