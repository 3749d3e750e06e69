"""The accounts file: loading, decryption, key rotation, validation, diff, shards."""

import json
import os
import shutil
import tempfile
import zlib

from cryptography.fernet import Fernet
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fido_tx.accounts import model as accounts
from fido_tx.accounts.model import (
    Account,
    AccountsDiff,
    AccountsFileError,
    KeyFileError,
    Problem,
    diff_accounts,
    in_shard,
    load_accounts,
)

PASSWORD = "Pa55-w0rd-do-not-log"


def entry(**fields):
    base = {
        "id": "acme-support",
        "host": "imap.example.com",
        "username": "support@acme.test",
        "password": PASSWORD,
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


class _FilesMixin:
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="fido-accounts-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write(self, name, data, mode=0o600):
        path = os.path.join(self.dir, name)
        if isinstance(data, str):
            data = data.encode("utf-8")
        elif not isinstance(data, bytes):
            data = json.dumps(data).encode("utf-8")
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        return path

    def key_file(self, *keys, name="fido.key"):
        return self.write(name, b"".join(k + b"\n" for k in keys))

    def file_error(self, path, key_file=""):
        e = self.assertRaises(AccountsFileError, load_accounts, path, key_file)
        message = str(e)
        self.assertNotIn("\n", message)
        self.assertNotIn(PASSWORD, message)
        return message


class LoadTests(_FilesMixin, SynchronousTestCase):
    def test_valid_plain_file_with_defaults(self):
        path = self.write(
            "accounts.json",
            {
                "accounts": [
                    entry(),
                    entry(id="b", security="starttls", after_fetch="move:Archive"),
                    entry(id="c", security="none", after_fetch="delete", port=1143,
                          ca_file="certs/ca.pem", mailbox="Support", auth="plain"),
                ]
            },
        )
        result = load_accounts(path)
        self.assertEqual(result.problems, ())
        a, b, c = result.accounts
        self.assertEqual(
            a,
            Account(
                id="acme-support",
                host="imap.example.com",
                username="support@acme.test",
                password=PASSWORD,
                port=993,
                security="tls",
                mailbox="INBOX",
                after_fetch="seen",
                ca_file=None,
                auth="login",
            ),
        )
        self.assertEqual((b.port, b.security, b.move_target), (143, "starttls", "Archive"))
        self.assertEqual((c.port, c.security, c.after_fetch), (1143, "none", "delete"))
        self.assertEqual(c.ca_file, os.path.join(self.dir, "certs", "ca.pem"))
        self.assertEqual((c.mailbox, c.auth), ("Support", "plain"))

    def test_text_most_accounts_share_is_one_string_but_never_a_password(self):
        # 10,000 accounts on one server: one "imap.example.com", not 10,000
        path = self.write("a.json", {"accounts": [
            entry(id="a", mailbox="Support", security="none"),
            entry(id="b", mailbox="Support", security="none")]})
        a, b = load_accounts(path).accounts
        self.assertIs(a.host, b.host)
        self.assertIs(a.mailbox, b.mailbox)
        self.assertIs(a.security, b.security)
        self.assertIsNot(a.password, b.password)
        self.assertEqual(a.password, b.password)

    def test_none_security_defaults_to_port_143(self):
        path = self.write("a.json", {"accounts": [entry(security="none")]})
        self.assertEqual(load_accounts(path).accounts[0].port, 143)

    def test_empty_list_is_valid(self):
        path = self.write("a.json", {"accounts": []})
        self.assertEqual(load_accounts(path), accounts.LoadResult((), ()))

    def test_base_dir_resolves_ca_file_for_a_cached_copy(self):
        path = self.write("a.json", {"accounts": [entry(ca_file="ca.pem")]})
        result = load_accounts(path, base_dir="/etc/fido")
        self.assertEqual(result.accounts[0].ca_file, "/etc/fido/ca.pem")

    def test_utf8_bom_is_accepted(self):
        path = self.write("a.json", b"\xef\xbb\xbf" + json.dumps({"accounts": [entry()]}).encode())
        self.assertEqual(len(load_accounts(path).accounts), 1)


class EncryptedTests(_FilesMixin, SynchronousTestCase):
    def test_encrypted_file(self):
        key = Fernet.generate_key()
        key_file = self.key_file(key)
        plain = json.dumps({"accounts": [entry()]}).encode()
        path = self.write("a.json.enc", Fernet(key).encrypt(plain))
        result = load_accounts(path, key_file)
        self.assertEqual([a.id for a in result.accounts], ["acme-support"])

    def test_key_rotation_old_token_new_and_old_keys(self):
        old, new = Fernet.generate_key(), Fernet.generate_key()
        plain = json.dumps({"accounts": [entry()]}).encode()
        path = self.write("a.json.enc", Fernet(old).encrypt(plain))
        key_file = self.write(
            "fido.key", b"# rotated 2026-11\n" + new + b"\n\n# previous\n" + old + b"\n"
        )
        self.assertEqual(len(load_accounts(path, key_file).accounts), 1)
        # encrypt_bytes uses the newest key: the new key alone reads it.
        token = accounts.encrypt_bytes(plain, key_file)
        self.assertEqual(Fernet(new).decrypt(token), plain)
        self.assertEqual(accounts.decrypt_bytes(token, key_file), plain)

    def test_wrong_key(self):
        plain = json.dumps({"accounts": [entry()]}).encode()
        path = self.write("a.json.enc", Fernet(Fernet.generate_key()).encrypt(plain))
        key_file = self.key_file(Fernet.generate_key())
        message = self.file_error(path, key_file)
        self.assertIn(path, message)
        self.assertIn(key_file, message)
        self.assertIn("wrong key", message)

    def test_truncated_token(self):
        key = Fernet.generate_key()
        token = Fernet(key).encrypt(json.dumps({"accounts": [entry()]}).encode())
        path = self.write("a.json.enc", token[: len(token) // 2])
        message = self.file_error(path, self.key_file(key))
        self.assertIn("cannot decrypt", message)
        self.assertIn("truncated", message)

    def test_garbage_token(self):
        path = self.write("a.json.enc", b"\x00\x01garbage")
        message = self.file_error(path, self.key_file(Fernet.generate_key()))
        self.assertIn("not a Fernet token", message)

    def test_plain_json_with_a_key_file_hints(self):
        path = self.write("a.json", {"accounts": [entry()]})
        message = self.file_error(path, self.key_file(Fernet.generate_key()))
        self.assertIn("plain JSON", message)

    def test_encrypted_file_without_key_file_hints(self):
        key = Fernet.generate_key()
        path = self.write("a.json.enc", Fernet(key).encrypt(b'{"accounts": []}'))
        self.assertIn("set key_file", self.file_error(path))

    def test_missing_key_file(self):
        path = self.write("a.json.enc", b"gAAAAAx")
        missing = os.path.join(self.dir, "nokey")
        e = self.assertRaises(KeyFileError, load_accounts, path, missing)
        self.assertIn(missing, str(e))
        self.assertIn("cannot read key file", str(e))

    def test_bad_key_line_names_the_line_not_the_key(self):
        good = Fernet.generate_key()
        key_file = self.write("fido.key", good + b"\nnot-a-key-material\n")
        path = self.write("a.json.enc", b"gAAAAAx")
        message = self.file_error(path, key_file)
        self.assertIn("line 2 is not a Fernet key", message)
        self.assertNotIn("not-a-key-material", message)

    def test_empty_key_file(self):
        key_file = self.write("fido.key", b"# nothing yet\n\n")
        path = self.write("a.json.enc", b"gAAAAAx")
        self.assertIn("holds no key", self.file_error(path, key_file))


class FileErrorTests(_FilesMixin, SynchronousTestCase):
    def test_missing_file(self):
        path = os.path.join(self.dir, "none.json")
        message = self.file_error(path)
        self.assertIn(path, message)
        self.assertIn("No such file", message)

    def test_directory(self):
        self.assertIn("is a directory", self.file_error(self.dir))

    def test_invalid_json_names_line_and_column(self):
        path = self.write("a.json", '{"accounts": [\n  {"id": "x",}\n]}')
        message = self.file_error(path)
        self.assertIn(path, message)
        self.assertIn("invalid JSON at line 2 column", message)

    def test_not_utf8(self):
        self.assertIn("not UTF-8", self.file_error(self.write("a.json", b'{"accounts": ["\xff"]}')))

    def test_wrong_shapes(self):
        cases = [
            ([1, 2], 'expected {"accounts": [...]}, got a JSON list'),
            ({}, 'no "accounts" key'),
            ({"accounts": {}}, '"accounts" is a JSON object, not a list'),
            ({"accounts": [], "version": 2}, "unknown top-level key 'version'"),
            ('"accounts"', "got a JSON string"),
        ]
        for document, expected in cases:
            self.assertIn(expected, self.file_error(self.write("a.json", document)))

    def test_duplicate_id_names_the_id(self):
        path = self.write("a.json", {"accounts": [entry(id="twice"), entry(id="x"), entry(id="twice")]})
        self.assertIn("duplicate account id 'twice'", self.file_error(path))


class ProblemTests(_FilesMixin, SynchronousTestCase):
    def problems(self, *entries):
        path = self.write("a.json", {"accounts": [entry(id="good")] + list(entries)})
        result = load_accounts(path)
        self.assertEqual([a.id for a in result.accounts], ["good"])
        for p in result.problems:
            self.assertNotIn(PASSWORD, str(p))
            self.assertNotIn("\n", str(p))
        return result.problems

    def problem(self, **fields):
        (p,) = self.problems(entry(id="bad", **fields))
        return p

    def test_each_bad_field_names_id_and_field(self):
        cases = [
            (dict(port="993"), "port", "expected an integer"),
            (dict(port=True), "port", "expected an integer"),
            (dict(port=0), "port", "from 1 to 65535"),
            (dict(port=70000), "port", "from 1 to 65535"),
            (dict(security="ssl"), "security", '"tls", "starttls" or "none"'),
            (dict(after_fetch="archive"), "after_fetch", '"seen", "delete" or "move:FOLDER"'),
            (dict(after_fetch="move:"), "after_fetch", "move needs a folder"),
            (dict(after_fetch="move:INBOX"), "after_fetch", "fetched mailbox itself"),
            (dict(auth="cram-md5"), "auth", '"login", "plain"'),
            (dict(auth="xoauth2"), "oauth", "missing"),
            (dict(select="all"), "select", '"unseen" or "new"'),
            (dict(start_from="never"), "start_from", '"all" or "now"'),
            (dict(idle="yes"), "idle", "true or false"),
            (dict(delivery="a b"), "delivery", "[delivery.NAME]"),
            (dict(source="pop3"), "source", '"imap" or "graph"'),
            (dict(oauth={"client_id": "c", "provider": "x"}), "oauth.provider", '"microsoft"'),
            (dict(oauth={"provider": "google"}), "oauth.client_id", "missing"),
            (dict(oauth={"client_id": "c", "secret": "s"}), "oauth.secret", "unknown field"),
            (dict(mailbox=""), "mailbox", "must not be empty"),
            (dict(mailbox="A\r\nB"), "mailbox", "control character"),
            (dict(host=""), "host", "host name"),
            (dict(host="imap.example.com\r\nX"), "host", "host name"),
            (dict(host=5), "host", "expected a string"),
            (dict(username=""), "username", "must not be empty"),
            (dict(ca_file=5), "ca_file", "expected a string"),
            (dict(ca_file=""), "ca_file", "must not be empty"),
            (dict(passwd="x"), "passwd", "unknown field"),
            (dict(host=_DROP), "host", "missing"),
            (dict(username=_DROP), "username", "missing"),
            (dict(password=_DROP), "password", "missing"),
        ]
        for fields, field, text in cases:
            p = self.problem(**fields)
            self.assertEqual((p.account_id, p.field), ("bad", field), fields)
            self.assertIn(text, p.message, fields)
            self.assertTrue(str(p).startswith(f"account bad: {field}: "), str(p))

    def test_password_never_in_messages(self):
        for fields in (
            dict(password=PASSWORD + "\n"),
            dict(password=PASSWORD + "\x00"),
            dict(password=12345),
        ):
            p = self.problem(**fields)
            self.assertEqual(p.field, "password")
            self.assertNotIn("12345", str(p))

    def test_bad_id(self):
        for bad_id in ("", "has space", "a/b", "x" * 201, "naïve"):
            (p,) = self.problems(entry(id=bad_id))
            self.assertIsNone(p.account_id)
            self.assertEqual(p.field, "id")
            self.assertEqual(p.index, 1)
            self.assertIn("accounts[1] (no valid id)", str(p))
        (p,) = self.problems(entry(id=7))
        self.assertEqual((p.field, p.message), ("id", "expected a string, got a number"))
        (p,) = self.problems(entry(id=_DROP))
        self.assertEqual((p.field, p.message), ("id", "missing (required)"))

    def test_id_limit_and_charset(self):
        ok = "A-z_0.9@x+y" + "x" * 189
        self.assertEqual(len(ok), 200)
        path = self.write("a.json", {"accounts": [entry(id=ok)]})
        self.assertEqual(load_accounts(path).accounts[0].id, ok)

    def test_entry_not_an_object(self):
        (p,) = self.problems(["x"])
        self.assertEqual(str(p), "accounts[1] (no valid id): expected a JSON object, got a list")

    def test_several_bad_entries_all_reported(self):
        ps = self.problems(entry(id="b1", port=-1), entry(id="b2", security="x"))
        self.assertEqual([(p.account_id, p.field) for p in ps], [("b1", "port"), ("b2", "security")])


class DiffTests(SynchronousTestCase):
    def acc(self, account_id, **kw):
        return Account(id=account_id, host="h", username="u", password="p", **kw)

    def test_partition(self):
        old = [self.acc("keep"), self.acc("change"), self.acc("gone")]
        new = [self.acc("keep"), self.acc("change", port=1993), self.acc("new")]
        d = diff_accounts(old, new)
        self.assertEqual(
            d,
            AccountsDiff(
                added=(self.acc("new"),),
                removed=(self.acc("gone"),),
                changed=(self.acc("change", port=1993),),
                unchanged=(self.acc("keep"),),
            ),
        )
        self.assertFalse(d.empty)

    def test_password_change_is_a_change(self):
        a = self.acc("x")
        b = Account(id="x", host="h", username="u", password="other")
        self.assertEqual(diff_accounts([a], [b]).changed, (b,))

    def test_empty(self):
        self.assertTrue(diff_accounts([self.acc("a")], [self.acc("a")]).empty)
        self.assertTrue(diff_accounts([], []).empty)


class ShardTests(SynchronousTestCase):
    def test_single_shard_has_everything(self):
        self.assertTrue(in_shard("anything", "1/1"))

    def test_stable_crc32(self):
        account_id = "acme-support"
        n = 3
        k = zlib.crc32(account_id.encode()) % n + 1
        self.assertTrue(in_shard(account_id, f"{k}/{n}"))
        self.assertEqual(sum(in_shard(account_id, f"{i}/{n}") for i in range(1, n + 1)), 1)

    def test_bad_shard(self):
        self.assertRaises(ValueError, in_shard, "a", "0/2")


class PermissionTests(_FilesMixin, SynchronousTestCase):
    def test_insecure_permissions(self):
        path = self.write("k", b"x", mode=0o600)
        self.assertFalse(accounts.insecure_permissions(path))
        os.chmod(path, 0o640)
        self.assertTrue(accounts.insecure_permissions(path))
        os.chmod(path, 0o604)
        self.assertTrue(accounts.insecure_permissions(path))
        self.assertFalse(accounts.insecure_permissions(os.path.join(self.dir, "none")))

    def test_generate_key_is_a_fernet_key(self):
        key = accounts.generate_key()
        self.assertEqual(Fernet(key).decrypt(Fernet(key).encrypt(b"x")), b"x")


# -- properties --------------------------------------------------------------

_json = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.text(max_size=10),
        st.sampled_from(["tls", "starttls", "none", "seen", "delete", "move:", "move:A", "INBOX"]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(
                st.sampled_from(sorted(accounts.FIELDS) + ["accounts"]), st.text(max_size=5)
            ),
            children,
            max_size=6,
        ),
    ),
    max_leaves=20,
)


def _raw_documents():
    wrapped = st.builds(lambda xs: {"accounts": xs}, st.lists(_json, max_size=5))
    as_text = st.one_of(_json, wrapped).map(lambda d: json.dumps(d).encode())
    return st.one_of(as_text, st.binary(max_size=60), st.text(max_size=60).map(str.encode))


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(_raw_documents())
    def test_parse_raises_only_accounts_file_error(self, data):
        try:
            result = accounts.parse_accounts(data, "/x/accounts.json")
        except AccountsFileError as e:
            self.assertNotIn("\n", str(e))
            self.assertTrue(str(e).startswith("/x/accounts.json: "), str(e))
        else:
            for a in result.accounts:
                self.assertIsInstance(a, Account)
            for p in result.problems:
                self.assertIsInstance(p, Problem)
                self.assertNotIn("\n", str(p))
            ids = [a.id for a in result.accounts]
            self.assertEqual(len(ids), len(set(ids)))

    @settings(max_examples=200, deadline=None)
    @given(
        st.dictionaries(st.sampled_from("abcdefgh"), st.integers(1, 3), max_size=8),
        st.dictionaries(st.sampled_from("abcdefgh"), st.integers(1, 3), max_size=8),
    )
    def test_diff_partitions_ids(self, old_ports, new_ports):
        def make(ports):
            return [Account(id=i, host="h", username="u", password="p", port=p) for i, p in ports.items()]

        old, new = make(old_ports), make(new_ports)
        d = diff_accounts(old, new)
        ids = lambda xs: {a.id for a in xs}  # noqa: E731
        self.assertEqual(ids(d.added), set(new_ports) - set(old_ports))
        self.assertEqual(ids(d.removed), set(old_ports) - set(new_ports))
        both = set(old_ports) & set(new_ports)
        self.assertEqual(ids(d.changed), {i for i in both if old_ports[i] != new_ports[i]})
        self.assertEqual(ids(d.unchanged), {i for i in both if old_ports[i] == new_ports[i]})
        # removed are the old values, the rest are new values
        self.assertTrue(set(d.removed) <= set(old))
        self.assertTrue(set(d.added + d.changed + d.unchanged) <= set(new))
        self.assertEqual(d.empty, old_ports == new_ports)


class EncryptedPropertyTests(_FilesMixin, SynchronousTestCase):
    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=200), st.booleans())
    def test_any_bytes_with_a_key_raise_only_accounts_file_error(self, data, as_token):
        if not hasattr(self, "_key_file"):
            self._key_file = self.key_file(Fernet.generate_key())
        if as_token:  # valid token around arbitrary plaintext
            data = accounts.encrypt_bytes(data, self._key_file)
        try:
            accounts.parse_accounts(data, "/x/a.enc", key_file=self._key_file)
        except AccountsFileError as e:
            self.assertNotIn("\n", str(e))
