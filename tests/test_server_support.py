"""The Cyrus and Courier test support is honest: passwords are checked, TLS
is the test CA's, and stopping the server leaves no process behind.

Like tests/test_dovecot_support.py, these talk to the servers with the
stdlib's imaplib, not with Fido's code.
"""

import imaplib
import os
import ssl
import time

import pytest

from tests.support import courier as courier_support
from tests.support import cyrus as cyrus_support
from tests.support.dovecot import make_message

KINDS = {"cyrus": (cyrus_support, cyrus_support.Cyrus),
         "courier": (courier_support, courier_support.Courier)}


def _namespace_pids(server):
    """Every process in the server's PID namespace (children of unshare, recursively)."""
    found, todo = [], [server.process.pid]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = [int(p) for p in f.read().split()]
        except OSError:
            continue
        found.extend(children)
        todo.extend(children)
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.fixture(params=sorted(KINDS))
def server(request):
    module, cls = KINDS[request.param]
    _, _, reason = module.find()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{request.param} is required in CI but cannot start: {reason}",
                        pytrace=False)
        pytest.skip(reason)
    with cls(users={"alice": "right-password"}) as started:
        yield started


def test_wrong_password_is_refused_and_right_one_works(server):
    with pytest.raises(imaplib.IMAP4.error):
        server.imap("none", "alice", "wrong-password")
    server.imap("none", "alice").logout()


def test_tls_is_the_test_ca_for_localhost_on_both_ports(server):
    for security in ("tls", "starttls"):
        client = server.imap(security, "alice")
        try:
            assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        finally:
            client.logout()
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL("localhost", server.ssl_port, ssl_context=ssl.create_default_context(),
                          timeout=5)


def test_append_then_flags_and_counts_read_back(server):
    server.add_user("bob", "bob-password")
    server.create_folder("bob", "Größe")
    server.add_message("bob", make_message(1, 2048))
    server.add_message("bob", make_message(2, 2048), folder="Größe", flags="S")
    assert server.flags("bob") == {"<fido.1.2048.0@fido.test>": ""}
    assert server.flags("bob", "Größe") == {"<fido.2.2048.0@fido.test>": "S"}
    assert server.count("bob", "Größe") == 1
    assert not server.has_folder("bob", "Nowhere")


def test_stop_leaves_no_process_behind(server):
    client = server.imap("tls", "alice")  # a logged-in session process exists
    pids = _namespace_pids(server)
    assert len(pids) >= 3, pids
    server.stop()
    # The kernel kills a PID namespace's processes when its init dies; that
    # takes a moment, and no event tells us when.
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [p for p in pids if _alive(p)] == []
    try:
        client.logout()
    except (imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError, ssl.SSLError):
        pass
