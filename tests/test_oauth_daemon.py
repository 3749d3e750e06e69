"""The daemon with an XOAUTH2 account: tokens from the fake endpoint over
loopback, the mock IMAP server checking them, a real Redis (the wiring of
fido_tx.credentials.oauth and sources/imap/bearer into the service)."""

import base64
import os

import pytest_twisted
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests import daemon
from tests.support.mockimap import (
    DEFAULT_CAPABILITIES, Behaviour, MockIMAPServer, MockMailbox, sample_message)
from tests.support.oauthserver import FakeTokenEndpoint

USER = "support@contoso.test"


@pytest_twisted.inlineCallbacks
def test_daemon_fetches_an_xoauth2_account(tmp_path, redis):
    events = []
    globalLogPublisher.addObserver(events.append)
    tokens = FakeTokenEndpoint(clock=reactor)
    tokens.add_client("app-1", "daemon-secret-1357", refresh_token="rt-daemon-0001")
    root = Resource()
    root.putChild(b"token", tokens)
    http = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    imap = MockIMAPServer(reactor, {USER: MockMailbox("unused", [sample_message(n)
                                                                 for n in range(3)])})
    imap.bearer_check = lambda user, token: tokens.valid(token)
    imap.script(None, Behaviour(capabilities=DEFAULT_CAPABILITIES + (
        "AUTH=XOAUTH2", "AUTH=OAUTHBEARER", "SASL-IR")))
    port = imap.listen()
    directory = str(tmp_path)
    daemon.write_accounts(os.path.join(directory, "accounts.json"), [{
        "id": "contoso", "host": "127.0.0.1", "port": port, "security": "none",
        "username": USER, "auth": "xoauth2",
        "oauth": {"provider": "microsoft", "client_id": "app-1",
                  "client_secret": "daemon-secret-1357", "refresh_token": "rt-daemon-0001",
                  "token_url": f"http://127.0.0.1:{http.getHost().port}/token"}}])
    fido = daemon.InProcessDaemon(reactor, daemon.settings_for(directory, redis.url))
    fido.start()
    try:
        yield fido.wait_for_sessions(["contoso"], reactor, timeout=30)
    finally:
        yield fido.stop()
        yield http.stopListening()
        imap.stop()
        globalLogPublisher.removeObserver(events.append)
    [(_, result)] = fido.results[:1]
    assert result.kind is None, result
    assert result.fetched == 3
    assert redis.client()("XLEN", "fido:messages") == 3
    assert len(tokens.requests) == 1
    assert [m for m, *_ in imap.bearer_attempts] == ["XOAUTH2"]
    # the rotated refresh token is kept in the state dir, mode 0600
    store = os.path.join(directory, "oauth-refresh-tokens.json")
    assert oct(os.stat(store).st_mode & 0o777) == "0o600"
    text = "\n".join(formatEvent(e) for e in events)
    for secret in ["daemon-secret-1357", "rt-daemon-0001"] + tokens.issued:
        assert secret not in text
        assert base64.b64encode(secret.encode()).decode() not in text


@pytest_twisted.inlineCallbacks
def test_check_connect_takes_a_token_for_an_xoauth2_account(tmp_path):
    from fido_tx.accounts.model import Account, OAuth
    from fido_tx.cmd import check
    from fido_tx.config import ImapSettings
    from fido_tx.credentials import oauth

    tokens = FakeTokenEndpoint(clock=reactor)
    tokens.add_client("app-1", "check-secret-2468")
    root = Resource()
    root.putChild(b"token", tokens)
    http = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    imap = MockIMAPServer(reactor, {USER: MockMailbox("unused", [sample_message(n)
                                                                 for n in range(2)])})
    imap.bearer_check = lambda user, token: tokens.valid(token)
    imap.script(None, Behaviour(capabilities=DEFAULT_CAPABILITIES + ("AUTH=XOAUTH2",)))
    account = Account(id="contoso", host="127.0.0.1", port=imap.listen(), security="none",
                      username=USER, auth="xoauth2", oauth=OAuth(
                          provider="microsoft", client_id="app-1",
                          client_secret="check-secret-2468",
                          token_url=f"http://127.0.0.1:{http.getHost().port}/token"))
    try:
        [(_, result)] = yield check.check_accounts(reactor, [account], ImapSettings(),
                                                   timeout=10, state_dir=str(tmp_path))
        yield oauth.close_shared()
    finally:
        yield http.stopListening()
        imap.stop()
    assert result.ok, result
    assert check.result_text(result) == "ok: 2 unseen"
    assert [m for m, *_ in imap.bearer_attempts] == ["XOAUTH2"]


@pytest_twisted.inlineCallbacks
def test_daemon_fetches_a_graph_account(tmp_path, redis):
    from tests.support.graphserver import FakeGraph
    from tests.test_graph import mime

    tokens = FakeTokenEndpoint(clock=reactor)
    tokens.add_client("app-1", "graph-daemon-secret-9")
    fake = FakeGraph(tokens=tokens, clock=reactor)
    root = Resource()
    root.putChild(b"token", tokens)
    root.putChild(b"v1.0", fake)
    http = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    base = f"http://127.0.0.1:{http.getHost().port}"
    fake.base_url = base
    ids = [fake.add_message(USER, mime(n)) for n in range(5)]
    directory = str(tmp_path)
    daemon.write_accounts(os.path.join(directory, "accounts.json"), [{
        "id": "contoso-graph", "source": "graph", "user": USER, "select": "new",
        "graph_endpoint": base,
        "oauth": {"provider": "microsoft", "client_id": "app-1",
                  "client_secret": "graph-daemon-secret-9", "token_url": base + "/token"}}])
    fido = daemon.InProcessDaemon(reactor, daemon.settings_for(directory, redis.url))
    fido.start()
    try:
        yield fido.wait_for_sessions(["contoso-graph"], reactor, timeout=30)
    finally:
        yield fido.stop()
        yield http.stopListening()
    [(_, result)] = fido.results[:1]
    assert result.kind is None, result
    assert result.fetched == 5
    client = redis.client()
    entries = client("XRANGE", "fido:messages", "-", "+")
    uids = sorted(dict(zip(e[1][::2], e[1][1::2]))[b"uid"].decode() for e in entries)
    assert uids == sorted(ids)
    assert all(m.is_read for m in fake.messages_in(USER))
    assert client("EXISTS", "fido:graph:delta:{contoso-graph}:Inbox") == 1
