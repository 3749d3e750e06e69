"""The status page in a real browser: headless Chromium (Debian's package)
against the running daemon with working and failing accounts.

``FIDO_UPDATE_SCREENSHOTS=1`` also copies the screenshots to
docs/status-page.png (1280 px wide) and docs/status-page-phone.png (390 px).
"""

import os
import shutil

import pytest_twisted
from twisted.internet import defer, protocol

from tests import daemon
from tests.support.mockimap import MockIMAPServer, MockMailbox
from tests.support.redis_server import free_port, require
from tests.test_telling import _account, _raw, _start, _web

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM_TIMEOUT = 90


class _Collect(protocol.ProcessProtocol):
    def __init__(self):
        self.out = []
        self.err = []
        self.done = defer.Deferred()

    def outReceived(self, data):
        self.out.append(data)

    def errReceived(self, data):
        self.err.append(data)

    def processEnded(self, reason):
        self.done.callback(reason.value.exitCode)


@defer.inlineCallbacks
def chromium(reactor, profile, *args):
    """Run headless Chromium without blocking the reactor (the daemon under
    test answers it); killed (by its pid) after CHROMIUM_TIMEOUT s."""
    binary = require("chromium (Debian package chromium)", shutil.which("chromium"))
    proto = _Collect()
    argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
            "--force-device-scale-factor=1", *args]
    process = reactor.spawnProcess(proto, binary, argv, env=dict(os.environ))
    killer = reactor.callLater(CHROMIUM_TIMEOUT, process.signalProcess, "KILL")
    code = yield proto.done
    if killer.active():
        killer.cancel()
    assert code == 0, f"chromium exited {code}: {b''.join(proto.err)[-2000:]!r}"
    return b"".join(proto.out).decode("utf-8", "replace")


def _first_account_row(dom):
    table = dom.split("<th>Account</th>", 1)[1]
    body = table.split("<tbody>", 1)[1]
    return body.split("</tr>", 1)[0]


@pytest_twisted.inlineCallbacks
def test_a_person_sees_the_failing_account_on_top_with_its_error_and_the_chart(
    tmp_path, redis
):
    from twisted.internet import reactor

    users = ["support-acme", "sales-acme", "info-initech", "help-umbrella", "jobs-globex"]
    imap = MockIMAPServer(reactor, {
        **{u: MockMailbox("pw", [_raw(u, i) for i in range(1 + len(u) % 4)]) for u in users},
        "billing-globex": MockMailbox("pw", [_raw("billing-globex", 1)]),
    })
    imap_port = imap.listen()
    capture, web_port, url = _web(reactor)
    http_port = free_port()
    accounts = [_account(imap_port, u, "pw") for u in users]
    accounts.append(_account(imap_port, "billing-globex", "expired-password"))
    closed = _account(free_port(), "orders-hooli", "pw")
    accounts.append(closed)
    top, results = _start(reactor, tmp_path, redis, accounts, url, poll_interval=1,
                          listen=f"tcp:{http_port}:interface=127.0.0.1")
    base = f"http://127.0.0.1:{http_port}"
    try:
        ids = {a["id"] for a in accounts}
        yield daemon.until(reactor, lambda: ids <= {i for i, _ in results}, 20,
                           "a session of every account")
        yield top.parts["instances"].refresh()
        dom = yield chromium(reactor, tmp_path / "profile", "--dump-dom", base + "/")
        account_dom = yield chromium(reactor, tmp_path / "profile", "--dump-dom",
                                     base + "/account/billing-globex")
        shots = {}
        for name, size in (("status-page.png", "1280,900"), ("status-page-phone.png", "390,1400")):
            shots[name] = tmp_path / name
            yield chromium(reactor, tmp_path / "profile", f"--screenshot={shots[name]}",
                           f"--window-size={size}", base + "/")
    finally:
        yield top.stopService()
        yield imap.stop()
        yield web_port.stopListening()

    first = _first_account_row(dom)
    assert "billing-globex" in first or "orders-hooli" in first, first
    failing_rows = dom.split("<tbody>")[-1].split("</tr>")[:2]
    assert any("billing-globex" in r and "AUTHENTICATIONFAILED" in r for r in failing_rows), \
        failing_rows
    assert any("orders-hooli" in r for r in failing_rows)
    assert "<svg" in dom and 'class="bar"' in dom
    assert "support-acme" in dom and "2 failing" in dom.replace("</span> failing", " failing")
    assert "Instances alive (1)" in dom
    assert "Recent sessions" in account_dom and "AUTHENTICATIONFAILED" in account_dom
    assert "expired-password" not in dom + account_dom
    for path in shots.values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("FIDO_UPDATE_SCREENSHOTS"):
        for name, path in shots.items():
            shutil.copyfile(path, os.path.join(ROOT, "docs", name))
