"""OAuth2 token providers and SASL encodings, on a task.Clock against the fake
token endpoint (in memory through treq's StubTreq)."""

import base64
import json
import os
import stat

import attr

from hypothesis import given, strategies as st
from treq.testing import StubTreq
from twisted.internet import task
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from fido_tx import errors
from fido_tx.accounts.model import Account, OAuth, generate_key
from fido_tx.credentials import oauth, sasl
from fido_tx.httpclient import HttpClient, check_url
from fido_tx.interfaces import ICredentials
from tests.support.oauthserver import FakeTokenEndpoint

TOKEN_URL = "https://login.test/tenant/oauth2/v2.0/token"


def imap_account(n=0, refresh_token="", secret="app-secret-1234", client_id="client-a"):
    return Account(id=f"acct-{n}", host="imap.test", username=f"user{n}@acme.test",
                   auth="xoauth2", oauth=OAuth(provider="microsoft", client_id=client_id,
                                               client_secret=secret,
                                               refresh_token=refresh_token,
                                               token_url=TOKEN_URL))


class Harness:
    def __init__(self, tmp, expires_in=3600, key_file="", **endpoint):
        self.clock = task.Clock()
        self.endpoint = FakeTokenEndpoint(clock=self.clock, expires_in=expires_in, **endpoint)
        self.endpoint.add_client("client-a", "app-secret-1234", refresh_token="rt-original-5678")
        self.tmp = tmp
        self.key_file = key_file
        self.restart()

    def restart(self):
        """New provider objects, as after a restart (same state dir)."""
        self.stub = StubTreq(self.endpoint)
        self.http = HttpClient(self.clock, http=self.stub)
        self.store = oauth.RefreshTokenStore.in_dir(self.tmp, self.key_file)
        self.providers = oauth.Providers(self.clock, self.http, self.store)

    def token(self, account):
        d = oauth.for_account(account, self.providers).secret()
        return self.result(d)

    def result(self, d):
        box = []
        d.addBoth(box.append)
        self.advance(0)
        return box[0] if box else None

    def advance(self, seconds):
        self.clock.advance(seconds)
        self.stub.flush()


class CapturedLog:
    def __init__(self, case):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def text(self):
        from twisted.logger import formatEvent

        return "\n".join(formatEvent(e) for e in self.events)


class TokenProviderTests(SynchronousTestCase):
    def setUp(self):
        self.tmp = self.mktemp()
        os.makedirs(self.tmp)
        self.h = Harness(self.tmp)

    def test_client_credentials_token_is_cached(self):
        account = imap_account()
        first = self.h.token(account)
        self.assertTrue(first.startswith("at-"))
        self.assertEqual(self.h.token(account), first)
        self.assertEqual(len(self.h.endpoint.requests), 1)
        form = self.h.endpoint.requests[0]
        self.assertEqual(form["grant_type"], "client_credentials")
        self.assertEqual(form["scope"], "https://outlook.office365.com/.default")

    def test_hundred_accounts_on_one_grant_make_one_request(self):
        self.h.endpoint.delay = 0.5  # every account asks while the request is out
        creds = [oauth.for_account(imap_account(n), self.h.providers) for n in range(100)]
        results = []
        for c in creds:
            c.secret().addBoth(results.append)
        self.assertEqual(results, [])
        self.clock_advance(0.5)
        self.assertEqual(len(results), 100)
        self.assertEqual(len(set(results)), 1)
        self.assertEqual(len(self.h.endpoint.requests), 1)
        self.assertEqual(len(self.h.providers), 1)
        # all of them refused the token at once: still one new request
        for c in creds:
            c.invalidate()
        again = [self.h.result(c.secret()) for c in creds]
        self.assertEqual(len(set(again)), 1)
        self.assertNotEqual(again[0], results[0])
        self.assertEqual(len(self.h.endpoint.requests), 2)

    def clock_advance(self, seconds):
        self.h.advance(seconds)

    def test_refreshed_before_expiry(self):
        h = Harness(self.tmp, expires_in=100)
        account = imap_account()
        first = h.token(account)
        h.clock.advance(79)  # margin: a fifth of 100 s
        self.assertEqual(h.token(account), first)
        h.clock.advance(2)
        second = h.token(account)
        self.assertNotEqual(second, first)
        self.assertTrue(h.endpoint.valid(second))
        self.assertEqual(len(h.endpoint.requests), 2)

    def test_long_lived_token_refreshed_five_minutes_before_expiry(self):
        account = imap_account()
        first = self.h.token(account)
        self.h.clock.advance(3600 - 301)
        self.assertEqual(self.h.token(account), first)
        self.h.clock.advance(2)
        self.assertNotEqual(self.h.token(account), first)

    def test_invalidate_old_token_keeps_new_one(self):
        account = imap_account()
        one = oauth.for_account(account, self.h.providers)
        two = oauth.for_account(account, self.h.providers)
        old = self.h.result(one.secret())
        self.h.result(two.secret())
        one.invalidate()
        new = self.h.result(one.secret())
        self.assertNotEqual(new, old)
        two.invalidate()  # refuses the old token it had: the new one stays
        self.assertEqual(self.h.result(two.secret()), new)
        self.assertEqual(len(self.h.endpoint.requests), 2)

    def test_distinct_grants_distinct_providers(self):
        self.h.endpoint.add_client("client-b", "b-secret-9999")
        a = self.h.token(imap_account(1))
        b = self.h.token(imap_account(2, client_id="client-b", secret="b-secret-9999"))
        self.assertNotEqual(a, b)
        self.assertEqual(len(self.h.providers), 2)


class RotationTests(SynchronousTestCase):
    def setUp(self):
        self.tmp = self.mktemp()
        os.makedirs(self.tmp)

    def check_rotation_survives_restart(self, key_file):
        h = Harness(self.tmp, expires_in=60, key_file=key_file)
        account = imap_account(refresh_token="rt-original-5678")
        h.token(account)
        self.assertEqual(h.endpoint.presented, ["rt-original-5678"])
        rotated = h.endpoint.requests and [t for t in h.endpoint.refresh_tokens][-1]
        path = h.store.path
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path, "rb") as f:
            data = f.read()
        # the original no longer works (single use): only the rotated one can
        h.restart()
        token = h.token(account)
        self.assertTrue(h.endpoint.valid(token), token)
        self.assertEqual(h.endpoint.presented[-1], rotated)
        return data, rotated

    def test_rotated_refresh_token_used_after_restart(self):
        data, rotated = self.check_rotation_survives_restart("")
        self.assertIn(rotated.encode(), data)

    def test_rotated_refresh_token_file_encrypted_with_key_file(self):
        key_file = os.path.join(self.tmp, "fido.key")
        with open(key_file, "wb") as f:
            f.write(generate_key())
        data, rotated = self.check_rotation_survives_restart(key_file)
        self.assertNotIn(rotated.encode(), data)
        self.assertNotIn(b"rt-", data)
        self.assertTrue(data.startswith(b"gAAAAA"))

    def test_new_refresh_token_in_accounts_file_wins(self):
        h = Harness(self.tmp)
        h.token(imap_account(refresh_token="rt-original-5678"))
        h.endpoint.add_client("client-a", "app-secret-1234", refresh_token="rt-signed-in-again")
        h.restart()
        token = h.token(imap_account(refresh_token="rt-signed-in-again"))
        self.assertTrue(h.endpoint.valid(token))
        self.assertEqual(h.endpoint.presented[-1], "rt-signed-in-again")

    def test_damaged_store_falls_back_to_accounts_file(self):
        h = Harness(self.tmp)
        with open(h.store.path, "w") as f:
            f.write("{not json")
        log = CapturedLog(self)
        token = h.token(imap_account(refresh_token="rt-original-5678"))
        self.assertTrue(h.endpoint.valid(token))
        self.assertIn("cannot use", log.text())


class InvalidGrantTests(SynchronousTestCase):
    def test_invalid_grant_is_one_reauthorize_without_storm(self):
        tmp = self.mktemp()
        os.makedirs(tmp)
        h = Harness(tmp)
        h.endpoint.revoke_all()
        log = CapturedLog(self)
        creds = [oauth.for_account(imap_account(n, refresh_token="rt-original-5678"),
                                   h.providers) for n in range(100)]
        failures = [h.result(c.secret()) for c in creds]
        for f in failures:
            self.assertEqual(f.value.kind, errors.REAUTHORIZE)
        self.assertIn("sign in again", failures[0].value.message)
        self.assertEqual(len(h.endpoint.requests), 1)
        h.clock.advance(3600)  # within the hold: still no request
        for c in creds:
            self.assertEqual(h.result(c.secret()).value.kind, errors.REAUTHORIZE)
        self.assertEqual(len(h.endpoint.requests), 1)
        from twisted.logger import formatEvent

        warnings = [e for e in log.events if "invalid_grant" in formatEvent(e)]
        self.assertEqual(len(warnings), 1)
        h.clock.advance(6 * 3600)
        self.assertEqual(h.result(creds[0].secret()).value.kind, errors.REAUTHORIZE)
        self.assertEqual(len(h.endpoint.requests), 2)

    def test_bad_client_secret_is_auth(self):
        tmp = self.mktemp()
        os.makedirs(tmp)
        h = Harness(tmp)
        failure = h.token(imap_account(secret="wrong-secret-000"))
        self.assertEqual(failure.value.kind, errors.AUTH)
        self.assertIn("client_secret", failure.value.message)
        self.assertNotIn("wrong-secret-000", failure.value.message + failure.value.debug)

    def test_throttled_and_server_errors(self):
        tmp = self.mktemp()
        os.makedirs(tmp)
        h = Harness(tmp)
        h.endpoint.fail_next = [(429, {"error": "temporarily_unavailable"}),
                                (503, {"error": "temporarily_unavailable"})]
        self.assertEqual(h.token(imap_account()).value.kind, errors.THROTTLED)
        h.clock.advance(31)
        self.assertEqual(h.token(imap_account()).value.kind, errors.CONNECT)
        h.clock.advance(31)
        self.assertTrue(h.token(imap_account()).startswith("at-"))


class EndpointTests(SynchronousTestCase):
    def test_endpoints(self):
        self.assertEqual(oauth.token_url(OAuth(provider="microsoft", tenant="contoso.com",
                                               client_id="x")),
                         "https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token")
        self.assertEqual(oauth.token_url(OAuth(provider="google", client_id="x")),
                         "https://oauth2.googleapis.com/token")
        self.assertEqual(oauth.token_url(OAuth(provider="microsoft", client_id="x",
                                               token_url="https://login.microsoftonline.us/t/oauth2/v2.0/token")),
                         "https://login.microsoftonline.us/t/oauth2/v2.0/token")

    def test_https_required_except_loopback(self):
        check_url("http://127.0.0.1:8080/token", "x")
        check_url("http://[::1]:8080/token", "x")
        check_url("http://localhost/token", "x")
        for bad in ("http://login.test/token", "ftp://x/", "token"):
            with self.assertRaises(ValueError) as e:
                oauth.token_url(OAuth(client_id="x", token_url=bad))
            self.assertIn("oauth.token_url", str(e.exception))

    def test_default_scopes(self):
        def scope(**kw):
            source = kw.pop("source", "imap")
            return oauth.default_scope(Account(id="a", source=source, oauth=OAuth(**kw)))

        self.assertEqual(scope(provider="google", refresh_token="r"), "")
        self.assertEqual(scope(provider="microsoft", refresh_token="r"),
                         "https://outlook.office365.com/IMAP.AccessAsUser.All offline_access")
        self.assertEqual(scope(provider="microsoft"), "https://outlook.office365.com/.default")
        self.assertEqual(scope(provider="microsoft", source="graph"),
                         "https://graph.microsoft.com/.default")
        self.assertEqual(scope(provider="microsoft", source="graph", refresh_token="r"),
                         "https://graph.microsoft.com/Mail.ReadWrite offline_access")
        self.assertEqual(scope(provider="microsoft", scope="custom"), "custom")


class CredentialsTests(SynchronousTestCase):
    def test_interface_and_secret_forms(self):
        tmp = self.mktemp()
        os.makedirs(tmp)
        h = Harness(tmp)
        creds = oauth.for_account(imap_account(refresh_token="rt-original-5678"), h.providers)
        verifyObject(ICredentials, creds)
        token = h.result(creds.secret())
        forms = creds.secret_forms()
        for secret in (token, "app-secret-1234", "rt-original-5678",
                       h.endpoint.presented and list(h.endpoint.refresh_tokens)[-1]):
            self.assertIn(secret, forms)
            self.assertIn(base64.b64encode(secret.encode()).decode(), forms)
        self.assertIn(sasl.xoauth2("user0@acme.test", token).decode(), forms)
        self.assertIn(sasl.oauthbearer("user0@acme.test", token, "imap.test", 993).decode(), forms)
        self.assertNotIn("app-secret-1234", repr(creds.provider.grant))


class SaslTests(SynchronousTestCase):
    def test_xoauth2_google_example(self):
        # https://developers.google.com/gmail/imap/xoauth2-protocol
        self.assertEqual(
            sasl.xoauth2("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"),
            b"dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ==")

    def test_oauthbearer_rfc7628_example(self):
        raw = base64.b64decode(sasl.oauthbearer(
            "user@example.com", "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==",
            "server.example.com", 143))
        self.assertEqual(raw, b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
                              b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01")
        self.assertIn(b"a=a=3Db=2Cc,", base64.b64decode(sasl.oauthbearer("a=b,c", "t", "h", 1)))

    def test_control_characters_refused(self):
        with self.assertRaises(ValueError):
            sasl.xoauth2("user\x01auth=x", "t")

    def test_error_challenge_decoded(self):
        status = {"status": "invalid_token", "scope": "example_scope",
                  "openid-configuration": "https://example.com/.well-known/openid-configuration"}
        text = sasl.decode_error_challenge(base64.b64encode(json.dumps(status).encode()))
        self.assertIn("status=invalid_token", text)
        self.assertIn("scope=example_scope", text)
        self.assertIn("token rejected", text)
        self.assertIn("not base64", sasl.decode_error_challenge(b"!!!"))

    @given(st.binary(max_size=300))
    def test_error_challenge_never_raises_and_is_one_line(self, data):
        for challenge in (data, base64.b64encode(data)):
            text = sasl.decode_error_challenge(challenge)
            self.assertIsInstance(text, str)
            self.assertNotIn("\n", text)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class CredentialsContext:
    """The fields of :class:`fido_tx.credentials.CredentialsContext` OAuth uses."""

    reactor: object
    state_dir: str
    key_file: str = ""


class RegistryTests(SynchronousTestCase):
    def test_build_shares_providers_per_process(self):
        clock = task.Clock()
        tmp = self.mktemp()
        ctx = CredentialsContext(clock, tmp)
        one = oauth.build(imap_account(1), ctx)
        two = oauth.build(imap_account(2), ctx)
        verifyObject(ICredentials, one)
        self.assertIs(one.provider, two.provider)
        self.assertIsNot(oauth.build(imap_account(1), CredentialsContext(clock, tmp + "x")).provider,
                         one.provider)
        self.successResultOf(oauth.close_shared())
        self.assertIsNot(oauth.build(imap_account(1), ctx).provider, one.provider)
        self.successResultOf(oauth.close_shared())

    def test_build_without_a_reactor_is_a_config_error_not_a_crash_later(self):
        with self.assertRaises(errors.FidoError) as e:
            oauth.build(imap_account(), CredentialsContext(None, self.mktemp()))
        self.assertEqual(e.exception.kind, errors.CONFIG)
        self.assertIn("reactor", e.exception.message)

    def test_build_refuses_plain_http_token_url_as_config(self):
        account = imap_account()
        account = attr.evolve(account, oauth=attr.evolve(account.oauth,
                                                         token_url="http://login.test/t"))
        with self.assertRaises(errors.FidoError) as e:
            oauth.build(account, CredentialsContext(task.Clock(), self.mktemp()))
        self.assertEqual(e.exception.kind, errors.CONFIG)


class AccountsParserTests(SynchronousTestCase):
    def test_token_url_and_graph_endpoint_must_be_https_off_loopback(self):
        from fido_tx.accounts.model import Problem, parse_account

        base = {"id": "g", "source": "graph", "user": "u@contoso.test",
                "oauth": {"provider": "microsoft", "client_id": "c"}}
        ok = parse_account(dict(base, graph_endpoint="http://127.0.0.1:8080"))
        self.assertEqual(ok.graph_endpoint, "http://127.0.0.1:8080")
        bad = parse_account(dict(base, graph_endpoint="http://graph.microsoft.com"))
        self.assertIsInstance(bad, Problem)
        self.assertEqual(bad.field, "graph_endpoint")
        self.assertIn("https://", bad.message)
        bad = parse_account(dict(base, oauth={"provider": "microsoft", "client_id": "c",
                                              "token_url": "http://login.test/token"}))
        self.assertEqual((bad.field, "https://" in bad.message), ("oauth.token_url", True))
