"""The real-Dovecot test support works: TLS, logins, byte-exact fetches,
server state read back from the Maildir.

These are the ground truth the Fido end-to-end tests and the bench stand on,
so they talk to Dovecot with the stdlib's imaplib, not with Fido's code.
"""

import email
import imaplib
import shutil
import socket
import ssl
import tempfile

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.support import dovecot as dc
from tests.support import tlsca


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with dc.started(tmp_path_factory.mktemp("dovecot"),
                    users={"alice": "secret", "bob@fido.test": "p@ss word"}) as server:
        yield server


@pytest.fixture
def alice(server):
    server.reset("alice")
    return server


BIG_8BIT = dc.make_message(1, 2 * 1024 * 1024, eight_bit=True)


def _fetch_all(client):
    """{uid: raw} for the selected mailbox via UID FETCH BODY.PEEK[]."""
    typ, data = client.uid("FETCH", "1:*", "(UID BODY.PEEK[])")
    assert typ == "OK"
    out = {}
    for item in data:
        if isinstance(item, tuple):
            uid = int(item[0].split(b"UID ")[1].split()[0])
            out[uid] = item[1]
    return out


def test_starttls_login_select_search_fetch_store(alice):
    alice.add_message("alice", BIG_8BIT)
    small = dc.make_message(2, 4096)
    alice.add_message("alice", small, flags="S")
    client = alice.imap("starttls", "alice")
    try:
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        typ, data = client.select("INBOX")
        assert (typ, data) == ("OK", [b"2"])
        typ, data = client.uid("SEARCH", None, "UNSEEN")
        assert (typ, data) == ("OK", [b"1"])
        bodies = _fetch_all(client)
        assert bodies == {1: BIG_8BIT, 2: small}
        # BODY.PEEK[] did not set \Seen.
        assert alice.flags("alice") == {
            "<fido.1.2097152.0@fido.test>": "",
            "<fido.2.4096.0@fido.test>": "S",
        }
        typ, _ = client.uid("STORE", "1", "+FLAGS.SILENT", r"(\Seen)")
        assert typ == "OK"
        assert alice.flags("alice")["<fido.1.2097152.0@fido.test>"] == "S"
        assert alice.flags_by_uid("alice") == {1: "S", 2: "S"}
        client.uid("STORE", "2", "+FLAGS.SILENT", r"(\Deleted)")
        assert alice.flags_by_uid("alice")[2] == "ST"
        client.expunge()
        assert alice.count("alice") == 1
    finally:
        client.logout()


def test_implicit_tls_login_and_raw_8bit_fetch(alice):
    raw = dc.make_message(3, 10000, eight_bit=True)
    assert any(b >= 0x80 for b in raw)
    alice.add_message("alice", raw)
    client = alice.imap("tls", "alice")
    try:
        assert client.select("INBOX", readonly=True) == ("OK", [b"1"])
        assert _fetch_all(client) == {1: raw}
    finally:
        client.logout()


def test_plain_login_without_tls_is_allowed(alice):
    client = alice.imap("none", "bob@fido.test")
    try:
        assert not isinstance(client.sock, ssl.SSLSocket)
        assert "STARTTLS" in client.capabilities
        assert client.select("INBOX")[0] == "OK"
    finally:
        client.logout()


def test_removed_users_cannot_log_in(server):
    server.add_user("dave", "dave-pw")
    server.remove_user("dave")
    client = server.imap("tls")
    try:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login("dave", "dave-pw")
    finally:
        client.shutdown()


def test_wrong_password_is_rejected(server):
    client = server.imap("starttls")
    try:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login("alice", "wrong")
    finally:
        client.shutdown()


def test_users_added_while_running_can_log_in_at_once(server):
    client = server.imap("tls")
    try:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login("carol", "carol-pw")
    finally:
        client.shutdown()
    server.add_user("carol", "carol-pw")
    server.add_message("carol", dc.make_message(4, 2000), folder="Archive")
    client = server.imap("tls", "carol")
    try:
        assert client.select("Archive") == ("OK", [b"1"])
        assert server.count("carol", "Archive") == 1
        assert server.flags_by_uid("carol", "Archive") == {1: ""}
    finally:
        client.logout()


def test_reset_with_uidvalidity_sets_it(alice):
    alice.reset("alice", uidvalidity=4242)
    alice.add_message("alice", dc.make_message(5, 1000))
    client = alice.imap("tls", "alice")
    try:
        client.select("INBOX")
        assert client.response("UIDVALIDITY") == ("UIDVALIDITY", [b"4242"])
    finally:
        client.logout()


def test_folders_with_non_ascii_names(alice):
    alice.create_folder("alice", "Ärchiv")
    alice.add_message("alice", dc.make_message(6, 1500), folder="Ärchiv")
    client = alice.imap("tls", "alice")
    try:
        typ, data = client.list()
        assert b'"." &AMQ-rchiv' in b"\n".join(data)
        assert client.select('"&AMQ-rchiv"') == ("OK", [b"1"])
    finally:
        client.logout()


def test_certificate_does_not_match_another_name(server):
    context = tlsca.ssl_context()
    with socket.create_connection(("127.0.0.1", server.ssl_port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|match"):
            context.wrap_socket(raw, server_hostname="wrong.example")


def test_server_with_wrong_name_certificate_fails_verification(tmp_path):
    pki = tlsca.files()
    with dc.started(tmp_path / "wrong", users={"u": "p"}, cert=pki.wrong_name) as wrong:
        with pytest.raises(ssl.SSLCertVerificationError):
            wrong.imap("tls")
        # Same CA, right name: trusted.
        with socket.create_connection(("127.0.0.1", wrong.ssl_port), timeout=5) as raw:
            with tlsca.ssl_context().wrap_socket(raw, server_hostname="wrong.example") as s:
                assert s.recv(4).startswith(b"* OK")


def test_untrusted_certificate_fails_verification(tmp_path):
    pki = tlsca.files()
    with dc.started(tmp_path / "untrusted", users={"u": "p"}, cert=pki.untrusted,
                    tls=True) as other:
        with pytest.raises(ssl.SSLCertVerificationError):
            other.imap("tls")


def test_provision_resets_to_the_same_mail(tmp_path):
    with dc.started(tmp_path / "prov") as server:
        users = server.provision(3, 4, mix=((0.5, 3000, False), (0.5, 20000, True)))
        assert list(users) == ["user0000@fido.test", "user0001@fido.test",
                               "user0002@fido.test"]
        first = {u: sorted(e.read() for e in server.entries(u)) for u in users}
        server.provision(3, 4, mix=((0.5, 3000, False), (0.5, 20000, True)))
        again = {u: sorted(e.read() for e in server.entries(u)) for u in users}
        assert first == again
        assert sum(len(v) for v in first.values()) == 12
        user, password = next(iter(users.items()))
        client = server.imap("tls", user, password)
        try:
            assert client.select("INBOX") == ("OK", [b"4"])
            assert sorted(_fetch_all(client).values()) == first[user]
        finally:
            client.logout()


class MessageTests(SynchronousTestCase):
    def test_messages_have_the_requested_size_and_crlf_lines(self):
        for size, attachment, eight_bit in [(4096, False, False), (40960, False, True),
                                            (1024 * 1024, True, False), (5000, True, True)]:
            raw = dc.make_message(7, size, attachment=attachment, eight_bit=eight_bit)
            self.assertEqual(len(raw), size)
            self.assertEqual(raw.count(b"\n"), raw.count(b"\r\n"))
            self.assertLessEqual(max(len(line) for line in raw.split(b"\r\n")), 998)

    def test_message_ids_are_unique_per_index_and_tag(self):
        ids = {email.message_from_bytes(dc.make_message(i, 1000, tag=t))["Message-ID"]
               for i in range(50) for t in range(2)}
        self.assertEqual(len(ids), 100)

    def test_attachment_is_valid_base64_mime(self):
        msg = email.message_from_bytes(dc.make_message(8, 100000, attachment=True))
        parts = [p.get_content_type() for p in msg.walk()]
        self.assertEqual(parts, ["multipart/mixed", "text/plain", "application/octet-stream"])
        self.assertGreater(len(msg.get_payload()[1].get_payload(decode=True)), 60000)

    def test_eight_bit_messages_carry_raw_high_bytes(self):
        raw = dc.make_message(9, 3000, eight_bit=True)
        self.assertIn(b"caf\xe9", raw)
        self.assertIn("Köln".encode("utf-8"), raw)

    def test_plan_follows_the_mix(self):
        plan = dc.message_plan(1000)
        self.assertEqual(len(plan), 1000)
        self.assertEqual(plan.count((4096, False)), 800)
        self.assertEqual(plan.count((40960, False)), 180)
        self.assertEqual(plan.count((1024 * 1024, True)), 20)
        self.assertEqual(plan, dc.message_plan(1000))

    def test_mutf7(self):
        self.assertEqual(dc.encode_mutf7("Ärchiv"), "&AMQ-rchiv")
        self.assertEqual(dc.encode_mutf7("A&B"), "A&-B")
        self.assertEqual(dc.encode_mutf7("日本語"), "&ZeVnLIqe-")


class TestCATests(SynchronousTestCase):
    def test_files_are_cached_per_process(self):
        self.assertIs(tlsca.files(), tlsca.files())

    def test_localhost_certificate_names(self):
        from cryptography import x509

        with open(tlsca.files().localhost.cert, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual([str(a) for a in san.get_values_for_type(x509.IPAddress)],
                         ["127.0.0.1"])

    def test_copy_to_writes_all_files(self):
        target = tempfile.mkdtemp(prefix="fido-pki-copy-")
        self.addCleanup(shutil.rmtree, target, True)
        copy = tlsca.files().copy_to(target)
        for path in (copy.ca, copy.localhost.cert, copy.localhost.key, copy.wrong_name.cert):
            with open(path, "rb") as f:
                self.assertIn(b"-----BEGIN", f.read())


FAKE_DAEMON = r'''
import json, os, sys, time, tomllib, urllib.parse
sys.path.insert(0, sys.argv[3])
from tests.support.redis_server import RespClient
with open(sys.argv[1], "rb") as f:
    cfg = tomllib.load(f)
r = RespClient(urllib.parse.urlsplit(cfg["redis"]["url"]).port)
with open(os.path.join(os.path.dirname(sys.argv[1]), cfg["fido"]["accounts_file"])) as f:
    accounts = json.load(f)["accounts"]
for account in accounts:
    for _ in range(int(sys.argv[2])):
        r("XADD", cfg["redis"]["stream"], "*", "account", account["id"])
time.sleep(60)
'''


def test_bench_harness_measures_the_daemon_it_runs(tmp_path, capsys):
    """The bench runs any daemon command and stops at N*M stream entries."""
    import json
    import os
    import sys

    from bench import fido_bench

    from tests.support import redis_server

    dc.require("dovecot", dc.find_dovecot())
    redis_server.require("redis-server", redis_server.find_redis_server())
    fake = tmp_path / "fake_daemon.py"
    fake.write_text(FAKE_DAEMON)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "result.json"
    status = fido_bench.main([
        "--accounts", "3", "--messages", "2", "--timeout", "30", "--json", str(out),
        "--command", f"{sys.executable} {fake} {{config}} 2 {root}",
    ])
    assert status == 0
    result = json.loads(out.read_text())["runs"][0]
    assert result["messages"] == 6
    assert result["stream_entries"] == 6
    assert result["duplicates_or_extra"] == 0
    assert result["cpu_s"] >= 0 and result["peak_rss_mib"] > 1
    assert "run 1:" in capsys.readouterr().out
