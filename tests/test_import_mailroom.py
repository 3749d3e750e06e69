"""``fido import-mailroom`` on GitLab's own rendered mail_room configs
(webhook, sidekiq, Microsoft Graph), mail_room's README format, and broken
files: what it writes must load as Fido's config, accounts and deliveries."""

import base64
import io
import json
import os
import shutil
import stat
import tempfile
import tomllib

from twisted.trial.unittest import SynchronousTestCase

from fido_tx import config, mailroom
from fido_tx.accounts import model
from fido_tx.cmd import cli
from fido_tx.sinks import sidekiq, webhook

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mailroom")
PASSWORDS = ("incoming-Pa55", "desk-Pa55", "graph-S3cret", "t0ken-XYZ", "b4sic-pw")


def box(**options):
    """One ``:mailboxes:`` entry in block YAML with mail_room's colon keys."""
    lines = [":mailboxes:", "  -"]
    for key, value in options.items():
        if isinstance(value, dict):
            lines.append(f"    :{key}:")
            lines += [f"      :{k}: {v}" for k, v in value.items()]
        else:
            lines.append(f"    :{key}: {value}")
    return "\n".join(lines) + "\n"


class ImportTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.secret = os.path.join(self.dir, ".gitlab_mailroom_secret")
        with open(self.secret, "w") as f:
            f.write(base64.b64encode(os.urandom(32)).decode() + "\n")

    def fixture(self, name):
        with open(os.path.join(DATA, name)) as f:
            text = f.read().replace("SECRET_PATH", self.secret)
        return self.write("in.yml", text)

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def run_import(self, source, *extra):
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(
            ["import-mailroom", source, "--out-config", os.path.join(self.dir, "fido.toml"), *extra],
            stdout=out, stderr=err, environ={},
        )
        self.output = out.getvalue() + err.getvalue()
        for secret in PASSWORDS:
            self.assertNotIn(secret, self.output)
        return status

    def load(self, key_file=""):
        with open(os.path.join(self.dir, "fido.toml"), "rb") as f:
            document = tomllib.load(f)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dir, "fido.toml")).st_mode), 0o600)
        fido = document["fido"]
        accounts_path = os.path.join(self.dir, fido["accounts_file"])
        self.assertEqual(stat.S_IMODE(os.stat(accounts_path).st_mode), 0o600)
        key = os.path.join(self.dir, fido["key_file"]) if fido["key_file"] else ""
        self.assertEqual(key, key_file)
        result = model.load_accounts(accounts_path, key)
        self.assertEqual(result.problems, ())
        # the daemon's own reading of the file: [delivery.NAME] through the
        # sink registry, each kind's validate() included
        settings = config.read_settings(os.path.join(self.dir, "fido.toml"))
        tables = settings.delivery_tables()
        deliveries = {name: dict(tables[name].options, kind=tables[name].kind)
                      for name in document.get("delivery", {})}
        for name, table in deliveries.items():
            sinks = {"webhook": webhook, "sidekiq": sidekiq}
            self.assertEqual(sinks[table["kind"]].KIND, table["kind"])
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["check", "--config", os.path.join(self.dir, "fido.toml")],
                          stdout=out, stderr=err, environ={})
        self.assertEqual(status, 0, out.getvalue() + err.getvalue())
        return document, {a.id: a for a in result.accounts}, deliveries

    def test_gitlab_webhook(self):
        self.assertEqual(self.run_import(self.fixture("gitlab_webhook.yml")), 0, self.output)
        document, accounts, deliveries = self.load()
        self.assertEqual(sorted(deliveries), ["incoming_email", "service_desk_email"])
        incoming = deliveries["incoming_email"]
        self.assertEqual(incoming["url"],
                         "http://gitlab.example.com/api/v4/internal/mail_room/incoming_email")
        self.assertEqual((incoming["auth"], incoming["secret_file"]), ("gitlab-jwt", self.secret))
        self.assertEqual(incoming["jwt_issuer"], "gitlab-mailroom")
        a = accounts["incoming@example.com"]
        self.assertEqual((a.host, a.port, a.security), ("imap.example.com", 993, "tls"))
        self.assertEqual((a.username, a.password), ("incoming@example.com", "incoming-Pa55"))
        self.assertEqual((a.mailbox, a.after_fetch, a.delivery), ("inbox", "delete", "incoming_email"))
        d = accounts["desk@example.com"]
        self.assertEqual((d.port, d.security, d.delivery), (143, "starttls", "service_desk_email"))
        self.assertIn(":arbitration_method: ignored", self.output)
        self.assertIn(":password: mapped: password (secret, not shown)", self.output)
        self.assertNotIn("could not map", self.output)
        self.assertNotIn("redis", document)

    def test_gitlab_sidekiq_with_sentinels(self):
        status = self.run_import(self.fixture("gitlab_sidekiq.yml"))
        if mailroom.sentinel_supported():
            self.assertEqual(status, 0, self.output)
        else:  # said, and the exit status tells the operator to edit
            self.assertEqual(status, 1, self.output)
            self.assertIn(":sentinels: could not map: this Fido cannot use Redis Sentinel", self.output)
        document, accounts, deliveries = self.load()
        self.assertEqual(document["redis"]["url"],
                         "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/gitlab-redis/0")
        self.assertEqual(sorted(deliveries), ["gitlab-incoming", "gitlab-service-desk"])
        jobs = deliveries["gitlab-incoming"]
        self.assertEqual((jobs["queue"], jobs["worker"], jobs["retry"]),
                         ("default", "EmailReceiverWorker", False))
        self.assertEqual(jobs["redis_url"], "")  # the shared connection: [redis] url
        self.assertEqual(deliveries["gitlab-service-desk"]["worker"], "ServiceDeskEmailReceiverWorker")
        self.assertEqual(accounts["desk@example.com"].after_fetch, "seen")
        self.assertEqual(accounts["incoming@example.com"].delivery, "gitlab-incoming")

    def test_gitlab_graph_mailbox(self):
        self.assertEqual(self.run_import(self.fixture("gitlab_graph.yml")), 0, self.output)
        _document, accounts, deliveries = self.load()
        [a] = accounts.values()
        self.assertEqual((a.source, a.user, a.mailbox), ("graph", "desk@contoso.onmicrosoft.com", "Inbox"))
        self.assertEqual(a.graph_endpoint, "https://graph.microsoft.us")
        self.assertEqual((a.oauth.provider, a.oauth.tenant, a.oauth.client_id),
                         ("microsoft", "11111111-2222-3333-4444-555555555555",
                          "66666666-7777-8888-9999-000000000000"))
        self.assertEqual(a.oauth.client_secret, "graph-S3cret")
        self.assertEqual(a.oauth.token_url,
                         "https://login.microsoftonline.us/11111111-2222-3333-4444-555555555555"
                         "/oauth2/v2.0/token")
        self.assertEqual(list(deliveries), ["service_desk_email"])
        self.assertIn(":host: ignored: a Graph mailbox", self.output)

    def test_encrypted_with_key(self):
        key = os.path.join(self.dir, "fido.key")
        with open(key, "wb") as f:
            f.write(model.generate_key())
        os.chmod(key, 0o600)
        status = self.run_import(self.fixture("gitlab_webhook.yml"), "--key", key)
        self.assertEqual(status, 0, self.output)
        with open(os.path.join(self.dir, "accounts.json.enc"), "rb") as f:
            token = f.read()
        self.assertNotIn(b"incoming-Pa55", token)
        _document, accounts, _ = self.load(key_file=key)
        self.assertEqual(len(accounts), 2)

    def test_mail_room_readme_format_token_and_basic(self):
        source = self.write("readme.yml", """---
:mailboxes:
  -
    :email: "user1@gmail.com"
    :password: "b4sic-pw"
    :name: "inbox"
    :search_command: 'NEW'
    :delivery_method: postback
    :delivery_options:
      :delivery_url: "http://localhost:3000/inbox"
      :delivery_token: "t0ken-XYZ"
    :host: imap.gmail.com
    :ssl: true
  -
    :email: "user2@gmail.com"
    :password: "b4sic-pw"
    :host: imap.gmail.com
    :ssl: true
    :delivery_method: postback
    :delivery_options:
      :delivery_url: "http://localhost:3000/inbox"
      :username: "fido"
      :password: "b4sic-pw"
""")
        self.assertEqual(self.run_import(source), 0, self.output)
        _document, accounts, deliveries = self.load()
        a = accounts["user1@gmail.com"]
        # NEW maps to select "new" from now: not the mailbox's old (read) mail
        self.assertEqual((a.port, a.select, a.start_from), (993, "new", "now"))
        self.assertEqual(accounts["user2@gmail.com"].start_from, "all")
        bearer = deliveries[a.delivery]
        self.assertEqual(bearer["auth"], "bearer")
        with open(bearer["token_file"]) as f:
            self.assertEqual(f.read().strip(), "t0ken-XYZ")
        self.assertEqual(stat.S_IMODE(os.stat(bearer["token_file"]).st_mode), 0o600)
        basic = deliveries[accounts["user2@gmail.com"].delivery]
        self.assertEqual((basic["auth"], basic["username"]), ("basic", "fido"))

    def test_unmappable_keys_are_written_but_exit_1(self):
        source = self.write("odd.yml", """
:mailboxes:
  - :email: a@b.test
    :password: pw
    :host: imap.b.test
    :ssl: true
    :search_command: ALL
    :delivery_method: que
    :colour: blue
""")
        self.assertEqual(self.run_import(source), 1)
        self.assertIn(":search_command: could not map", self.output)
        self.assertIn(":delivery_method: could not map", self.output)
        self.assertIn(":colour: ignored", self.output)
        _document, accounts, _ = self.load()
        self.assertEqual(accounts["a@b.test"].delivery, "default")

    def test_refuses_to_overwrite(self):
        source = self.fixture("gitlab_webhook.yml")
        self.assertEqual(self.run_import(source), 0)
        self.assertEqual(self.run_import(source), 1)
        self.assertIn("exists: move it away or pass --force", self.output)
        self.assertEqual(self.run_import(source, "--force"), 0)

    def test_broken_files_one_line_naming_the_key(self):
        cases = {
            "erb": (":mailboxes:\n  <% Gitlab::MailRoom.enabled_configs.each do |k, c| %>\n", "ERB tags"),
            "yaml": (":mailboxes:\n  - :host: [unclosed\n", "not valid YAML (line"),
            "none": ("other: 1\n", ":mailboxes: missing"),
            "empty": (":mailboxes: []\n", ":mailboxes: is empty"),
            "scalar": (":mailboxes:\n  - just a string\n", "entry 1: expected a mapping"),
            "noemail": (":mailboxes:\n  - :host: h\n    :password: p\n", "entry 1: :email: is required"),
            "nohost": (":mailboxes:\n  - :email: e@x\n    :password: p\n", "entry 1: :host: is required"),
            "port": (box(email="e@x", password="p", host="h", port="'993x'"),
                     "entry 1: :port: must be an integer"),
            "ssl": (box(email="e@x", password="p", host="h", ssl="'yes please'"),
                    ":ssl: must be true or false"),
            "nourl": (box(email="e@x", password="p", host="h", delivery_method="postback"), ":delivery_url: is required"),
            "noworker": (box(email="e@x", password="p", host="h", delivery_method="sidekiq",
                             delivery_options={"queue": "q"}),
                         ":worker: is required"),
            "graph": (box(email="e@x", inbox_method="microsoft_graph", inbox_options={"tenant_id": "t"}), ":inbox_options: :client_id: is required"),
        }
        for name, (text, expected) in cases.items():
            out, err = io.StringIO(), io.StringIO()
            status = cli.main(["import-mailroom", self.write(name + ".yml", text),
                               "--out-config", os.path.join(self.dir, name + ".toml")],
                              stdout=out, stderr=err, environ={})
            self.assertEqual(status, 1, name)
            lines = err.getvalue().splitlines()
            self.assertEqual(len(lines), 1, (name, err.getvalue()))
            self.assertIn(expected, lines[0], name)
            self.assertTrue(lines[0].startswith("fido: error: "), lines[0])
            self.assertFalse(os.path.exists(os.path.join(self.dir, name + ".toml")), name)
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(cli.main(["import-mailroom", os.path.join(self.dir, "missing.yml")],
                                  stdout=out, stderr=err, environ={}), 1)
        self.assertIn("No such file", err.getvalue())

    def test_conversion_lines_are_data(self):
        conv = mailroom.convert(mailroom.load_yaml(
            box(email="e@x", password="p", host="h", delivery_method="noop"), "x.yml"))
        self.assertEqual(conv.accounts[0]["security"], "none")
        self.assertNotIn("delivery", conv.accounts[0])
        self.assertEqual([line.key for line in conv.unmapped], ["delivery_method"])
        self.assertTrue(all(isinstance(line, mailroom.Line) for line in conv.lines))
        self.assertEqual(json.loads(mailroom.accounts_json(conv))["accounts"][0]["id"], "e@x")


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

KEYS = ["host", "port", "ssl", "start_tls", "email", "password", "name", "delete_after_delivery",
        "search_command", "delivery_method", "delivery_options", "inbox_method", "inbox_options",
        "delivery_url", "url", "delivery_token", "username", "jwt_auth_header", "jwt_secret_path",
        "jwt_algorithm", "redis_url", "redis_db", "worker", "queue", "namespace", "sentinels",
        "tenant_id", "client_id", "client_secret", "graph_endpoint", "azure_ad_endpoint", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=12),
                    st.sampled_from(["postback", "sidekiq", "microsoft_graph", "NEW", "UNSEEN",
                                     "http://h/x", "redis://r", "HS256"]))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(KEYS), inner, max_size=6),
    max_leaves=12,
)


class ConvertPropertyTests(SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(st.dictionaries(st.sampled_from(["mailboxes", "x"]),
                           st.lists(st.dictionaries(st.sampled_from(KEYS), values, max_size=10),
                                    max_size=3) | values, max_size=2))
    def test_any_document_converts_or_fails_with_one_line(self, document):
        try:
            conversion = mailroom.convert(document, "f.yml")
        except mailroom.MailRoomError as e:
            self.assertNotIn("\n", str(e))
            self.assertTrue(str(e).startswith("f.yml"))
            return
        self.assertEqual(len(conversion.accounts), len(document["mailboxes"]))
        json.loads(mailroom.accounts_json(conversion))
