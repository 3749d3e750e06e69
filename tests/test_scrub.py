"""The one scrubber (fido_tx.scrub) and the credentials that feed it."""

import base64
import json
from urllib.parse import quote

from hypothesis import given, settings, strategies as st
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from fido_tx import errors
from fido_tx.accounts.model import Account
from fido_tx.credentials import for_account
from fido_tx.credentials.password import PasswordCredentials
from fido_tx.errors import FidoError
from fido_tx.interfaces import ICredentials
from fido_tx.scrub import scrub, secret_forms
from fido_tx.sources.imap.client import FidoIMAP4Client, ImapCommandError
from fido_tx.sources.imap.login import auth_error
from fido_tx.sources.imap.parse import _show

NBSP = "pa\u00a0ss\"w\\ord"  # a no-break space, a quote and a backslash
USER = "fido@example.test"


class FormsTests(SynchronousTestCase):
    def forms(self):
        return PasswordCredentials(USER, NBSP).secret_forms()

    def assertHidden(self, text):
        out = scrub(text, self.forms())
        self.assertIn("<redacted>", out)
        for form in ("pa\u00a0ss", "pa\\xa0ss", "pa\\u00a0ss", "pa%C2%A0ss"):
            self.assertNotIn(form, out)

    def test_raw(self):
        self.assertHidden(f"LOGIN failed for {NBSP} today")

    def test_imap_quoted(self):
        quoted = NBSP.replace("\\", "\\\\").replace('"', '\\"')
        self.assertHidden(f'NO [ALERT] "{quoted}" is wrong')

    def test_python_repr_of_text_and_bytes(self):
        self.assertHidden(f"value {NBSP!r}")
        self.assertHidden(f"value {NBSP.encode('utf-8')!r}")

    def test_printable_escape_of_a_trace(self):
        self.assertHidden(_show(NBSP.encode("utf-8")))

    def test_json_and_url_encoded(self):
        self.assertHidden(json.dumps({"p": NBSP}))
        self.assertHidden("https://x.test/?p=" + quote(NBSP, safe=""))

    def test_sasl_plain_echoed_by_a_server(self):
        plain = base64.b64encode(b"\0" + USER.encode() + b"\0" + NBSP.encode()).decode()
        out = scrub(f"BAD invalid SASL response {plain}", self.forms())
        self.assertNotIn(plain, out)
        self.assertIn("<redacted>", out)

    def test_patterns_without_known_secrets(self):
        self.assertEqual(scrub("a1 LOGIN bob hunter2"), "a1 LOGIN <redacted>")
        self.assertEqual(scrub("password=hunter2, x"), "password=<redacted>, x")
        self.assertEqual(scrub("redis://:pw@host/0"), "redis://:<redacted>@host/0")
        self.assertEqual(scrub("LOGIN failed: bad"), "LOGIN failed: bad")

    def test_short_secret_forms_are_not_replaced(self):
        self.assertEqual(secret_forms("ab"), ())
        self.assertEqual(scrub("a b c", secret_forms("ab")), "a b c")

    @settings(max_examples=200, deadline=None)
    @given(st.text(min_size=3, max_size=30), st.text(max_size=400), st.text(max_size=400))
    def test_never_in_the_result_raw(self, secret, before, after):
        out = scrub(before + secret + after, secret_forms(secret, USER))
        if secret not in before and secret not in after and "<redacted>" not in secret:
            self.assertNotIn(secret, out.replace("<redacted>", "\0"))


class CredentialsTests(SynchronousTestCase):
    def test_password_credentials(self):
        creds = for_account(Account(id="a", host="h", username="u", password="pw!"))
        self.assertTrue(verifyObject(ICredentials, creds))
        self.assertEqual(self.successResultOf(creds.secret()), "pw!")
        creds.invalidate()
        self.assertNotIn("pw!", repr(creds))

    def test_oauth_without_support_is_a_config_error(self):
        from fido_tx import credentials

        account = Account(id="a", host="h", username="u", password="x", auth="xoauth2")
        try:
            import fido_tx.credentials.oauth  # noqa: F401
        except ModuleNotFoundError:
            with self.assertRaises(FidoError) as e:
                credentials.for_account(account)
            self.assertEqual(e.exception.kind, errors.CONFIG)
            self.assertIn("auth xoauth2 needs OAuth support", e.exception.message)


class ServerEchoTests(SynchronousTestCase):
    """What a server says is scrubbed whole, before it is cut or escaped."""

    forms = PasswordCredentials(USER, NBSP).secret_forms()

    def test_auth_error_with_the_secret_beyond_300_characters(self):
        text = ("x" * 295 + " " + NBSP + " more").encode("utf-8")
        error = auth_error(ImapCommandError("LOGIN", b"NO", text), self.forms)
        self.assertNotIn("pa\u00a0", error.message)
        self.assertNotIn("pa\\xa0", error.message)
        self.assertNotIn("pa\\x", error.message)  # not even a cut piece of it

    def test_trace_lines_are_scrubbed_before_they_are_cut(self):
        from twisted.internet.testing import StringTransport

        proto = FidoIMAP4Client(task.Clock())
        proto.scrub_forms = lambda: self.forms
        proto.makeConnection(StringTransport())
        line = ("* OK " + "y" * (proto.TRACE_WIDTH - 8) + NBSP + "z" * 50).encode("utf-8")
        proto.dataReceived(line + b"\r\n")
        trace = "\n".join(proto.trace)
        self.assertNotIn("pa\\xa0", trace)
        self.assertNotIn("pa\u00a0", trace)
        self.assertNotIn("pa\\x", trace)

    def test_a_server_echoing_the_sasl_plain_response_in_a_session_result(self):
        from twisted.internet import defer
        from twisted.internet.testing import StringTransport

        from fido_tx.config import ImapSettings
        from fido_tx.sources.imap.login import ImapConnection, Login

        account = Account(id="a", host="h", username=USER, password=NBSP, auth="plain",
                          security="tls")
        creds = PasswordCredentials(USER, NBSP)
        proto = FidoIMAP4Client(task.Clock())
        proto.scrub_forms = creds.secret_forms
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"* OK hi\r\n")

        def step(text, **kw):
            pass

        step.enabled = False
        login = Login(task.Clock(), None, account, ImapSettings(), creds, step)
        login.connection = ImapConnection(account, proto, None)
        login.connection.caps = frozenset([b"AUTH=PLAIN", b"SASL-IR"])
        d = defer.ensureDeferred(login.authenticate())
        sent = transport.value().split(b" ")[-1].strip()
        proto.dataReceived(b"0001 NO [AUTHENTICATIONFAILED] bad response " + sent + b"\r\n")
        error = self.failureResultOf(d, FidoError).value
        self.assertEqual(error.kind, errors.AUTH)
        self.assertNotIn(sent.decode(), error.message)
        self.assertIn("<redacted>", error.message)
        self.assertNotIn(sent.decode(), "\n".join(proto.trace))
