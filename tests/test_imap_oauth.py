"""IMAP AUTHENTICATE XOAUTH2 / OAUTHBEARER against the mock IMAP server, with
tokens from the fake token endpoint; everything in memory (iosim, task.Clock)."""

import os

from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import errors
from fido_tx.accounts.model import Account, OAuth
from fido_tx.credentials import oauth
from fido_tx.httpclient import HttpClient
from fido_tx.sources.imap import bearer
from fido_tx.sources.imap.client import FidoIMAP4Client
from tests.support.mockimap import MockIMAPServer, MockMailbox
from tests.support.oauthserver import FakeTokenEndpoint

USER = "someone@gmail.test"


class Harness:
    def __init__(self, tmp, auth="xoauth2", caps=(b"IMAP4rev1", b"AUTH=XOAUTH2",
                                                   b"AUTH=OAUTHBEARER", b"SASL-IR")):
        self.clock = task.Clock()
        self.tokens = FakeTokenEndpoint(clock=self.clock)
        self.tokens.add_client("gmail-app", "gmail-secret-77", refresh_token="1//rt-gmail-0001")
        self.stub = StubTreq(self.tokens)
        self.providers = oauth.Providers(self.clock, HttpClient(self.clock, http=self.stub),
                                         oauth.RefreshTokenStore.in_dir(tmp))
        self.account = Account(
            id="gmail-1", host="imap.gmail.test", port=993, username=USER, auth=auth,
            oauth=OAuth(provider="google", client_id="gmail-app", client_secret="gmail-secret-77",
                        refresh_token="1//rt-gmail-0001", token_url="https://oauth.test/token"))
        self.credentials = oauth.for_account(self.account, self.providers)
        self.server = MockIMAPServer(self.clock, {USER: MockMailbox("unused-password")})
        self.server.bearer_check = lambda user, token: self.tokens.valid(token)
        self.caps = frozenset(caps)

    def login(self):
        client = FidoIMAP4Client(self.clock)
        server = self.server.build_protocol()
        _c, _s, pump = iosim.connectedServerAndClient(lambda: server, lambda: client,
                                                      greet=False)
        box = []
        d = defer.ensureDeferred(
            bearer.authenticate(client, self.caps, self.account, self.credentials))
        d.addBoth(box.append)
        for _ in range(50):
            pump.flush()
            self.stub.flush()
            self.clock.advance(0)
            if box:
                break
        self.trace = "\n".join(client.debug_lines())
        return box[0]


class OAuthLoginTests(SynchronousTestCase):
    def harness(self, **kw):
        tmp = self.mktemp()
        os.makedirs(tmp)
        return Harness(tmp, **kw)

    def test_xoauth2_with_sasl_ir(self):
        h = self.harness()
        result = h.login()
        self.assertIsInstance(result, bytes, result)
        method, user, token = h.server.bearer_attempts[-1]
        self.assertEqual((method, user), ("XOAUTH2", USER))
        self.assertTrue(h.tokens.valid(token))
        self.assertNotIn(token, h.trace)
        self.assertIn("AUTHENTICATE XOAUTH2 <redacted>", h.trace)

    def test_oauthbearer_without_sasl_ir(self):
        h = self.harness(auth="oauthbearer", caps=(b"IMAP4rev1", b"AUTH=OAUTHBEARER"))
        result = h.login()
        self.assertIsInstance(result, bytes, result)
        self.assertEqual(h.server.bearer_attempts[-1][:2], ("OAUTHBEARER", USER))

    def test_refused_token_is_replaced_once(self):
        h = self.harness()
        h.login()
        h.tokens.access_tokens.clear()  # the server no longer accepts the cached token
        result = h.login()
        self.assertIsInstance(result, bytes, result)
        self.assertEqual(len(h.tokens.requests), 2)
        self.assertEqual(len(h.server.bearer_attempts), 3)

    def test_refused_twice_is_auth_with_decoded_status(self):
        h = self.harness()
        h.server.bearer_check = lambda user, token: False
        failure = h.login()
        self.assertEqual(failure.value.kind, errors.AUTH)
        self.assertIn("status=401", failure.value.message)
        self.assertIn("refused twice", failure.value.message)
        self.assertEqual(len(h.tokens.requests), 2)
        for _, _, token in h.server.bearer_attempts:
            self.assertNotIn(token, failure.value.message + failure.value.debug + h.trace)

    def test_oauthbearer_refused_twice_sends_the_rfc7628_dummy_response(self):
        h = self.harness(auth="oauthbearer")
        h.server.bearer_check = lambda user, token: False
        failure = h.login()
        self.assertEqual(failure.value.kind, errors.AUTH)  # a BAD would be protocol
        self.assertIn("status=401", failure.value.message)

    def test_revoked_grant_is_reauthorize_without_imap_attempt(self):
        h = self.harness()
        h.tokens.revoke_all()
        failure = h.login()
        self.assertEqual(failure.value.kind, errors.REAUTHORIZE)
        self.assertEqual(h.server.bearer_attempts, [])

    def test_mechanism_not_offered(self):
        h = self.harness(caps=(b"IMAP4rev1", b"AUTH=PLAIN"))
        failure = h.login()
        self.assertEqual(failure.value.kind, errors.AUTH)
        self.assertIn("AUTH=PLAIN", failure.value.message)
