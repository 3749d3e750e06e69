"""OAuth2 accounts on held connections, end to end on loopback: the mock IMAP
server checking XOAUTH2 tokens and ending a session when its token expires
as Microsoft 365 does (``* BYE Session invalidated - AccessTokenExpired``,
or a ``NO``), the fake token endpoint over HTTP, the real token provider
(fido_tx.credentials.oauth), HeldImap and HeldAccount, a MemorySink.

Tokens last seconds here instead of an hour; mail keeps arriving across
every switch of connection, and each message is delivered exactly once.
"""

import os
import random

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from fido_tx.accounts.model import Account, OAuth
from fido_tx.credentials import oauth
from fido_tx.httpclient import HttpClient
from fido_tx.sources import SourceContext
from fido_tx.sources.imap import held
from fido_tx.sources.imap.holding import HeldImap
from fido_tx.testing import MemorySink
from tests.support.mockimap import (
    IDLE_CAPABILITIES, Behaviour, MockIMAPServer, MockMailbox, sample_message)
from tests.support.oauthserver import FakeTokenEndpoint
from tests.test_held_imap import IMAP, until

USER = "support@contoso.test"
CAPS = IDLE_CAPABILITIES + ("AUTH=XOAUTH2", "SASL-IR")


class OAuthFleet:
    """One XOAUTH2 account held against the mock server, tokens from the fake
    endpoint on loopback (``expires_in`` seconds)."""

    def __init__(self, tmp_path, expires_in, **settings):
        self.tokens = FakeTokenEndpoint(clock=reactor, expires_in=expires_in)
        self.tokens.add_client("app-1", "fleet-secret-2222", refresh_token="rt-fleet-0001")
        root = Resource()
        root.putChild(b"token", self.tokens)
        self.http_port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.http = HttpClient(reactor, timeout=5.0, per_host=2)
        self.providers = oauth.Providers(reactor, self.http,
                                         oauth.RefreshTokenStore.in_dir(str(tmp_path)))
        self.server = MockIMAPServer(reactor, {USER: MockMailbox("unused", [sample_message(1)])})
        self.server.script(None, Behaviour(capabilities=CAPS))
        self.server.bearer_check = lambda user, token: self.tokens.valid(token)
        self.sink = MemorySink()
        self.results = []
        defaults = dict(idle_refresh=600.0, poll_interval=3600.0, command_timeout=2.0,
                        logout_timeout=0.5, min_hold=30.0)  # only a token makes it quiet
        defaults.update(settings)
        self.settings = held.HeldSettings(**defaults)
        self.pool = held.HeldPool()
        self.machine = None
        self.states = []

    def start(self):
        port = self.server.listen()
        url = f"http://127.0.0.1:{self.http_port.getHost().port}/token"
        acct = Account(id="contoso", host="127.0.0.1", port=port, username=USER,
                       security="none", auth="xoauth2",
                       oauth=OAuth(provider="microsoft", client_id="app-1",
                                   client_secret="fleet-secret-2222",
                                   refresh_token="rt-fleet-0001", token_url=url))
        ctx = SourceContext(reactor=reactor, sink=self.sink, settings=IMAP,
                            credentials=lambda a: oauth.for_account(a, self.providers))
        source = HeldImap(acct, ctx)
        self.machine = held.HeldAccount(
            acct.id, acct.host, source.open, source.poll, self.results.append, reactor,
            self.settings, self.pool, random.Random(0), tokens=source)
        enter = self.machine._enter

        def record(state):  # every state entered (``history`` keeps the last few)
            self.states.append(state)
            enter(state)

        self.machine._enter = record
        return self.machine.start()

    @defer.inlineCallbacks
    def deliver_for(self, seconds, every=0.2):
        """Deliver a message every ``every`` seconds for ``seconds``; their numbers."""
        numbers = []
        end = reactor.seconds() + seconds
        n = 2
        while reactor.seconds() < end:
            self.server.deliver(USER, sample_message(n))
            numbers.append(n)
            n += 1
            yield _sleep(every)
        return numbers

    def delivered(self):
        return sorted(int(m.id) for m in self.sink.entries)

    def deliveries(self):
        """Every message id handed to the sink, as often as it was."""
        return sorted(int(i) for call in self.sink.calls if call[0] == "deliver"
                      for i in call[1])

    def errors(self):
        return [r for r in self.results if not r.ok]

    @defer.inlineCallbacks
    def stop(self):
        if self.machine is not None:
            yield self.machine.stop(timeout=2)
        yield self.server.stop()
        yield self.http.close()
        yield self.http_port.stopListening()


def _sleep(seconds):
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


@pytest.fixture
def fleets():
    made = []
    yield made
    for f in made:
        pytest_twisted.blockon(f.stop())


@pytest_twisted.inlineCallbacks
def test_held_connection_logs_in_again_before_the_token_expires(tmp_path, fleets):
    # tokens last 2.5 s (renewable from 2 s: the provider's margin is a fifth
    # of the lifetime), the server ends a session the moment its token
    # expires: no session may ever get there
    f = OAuthFleet(tmp_path, expires_in=2.5, reauth_margin=0.3)
    fleets.append(f)
    f.server.bearer_expiry = lambda token: f.tokens.access_tokens[token][2]
    m = f.start()
    yield until(lambda: m.state == held.IDLING)
    numbers = yield f.deliver_for(5.5)
    yield until(lambda: f.delivered() == [1] + numbers, timeout=5)
    assert f.deliveries() == [1] + numbers  # each handed to the sink once
    assert f.errors() == []
    assert f.server.expired_sessions == []  # always replaced before expiry
    assert f.pool.reasons["token_renewal"] >= 2
    assert f.pool.reasons["token_expired"] == 0
    assert len(f.tokens.issued) == f.pool.reasons["token_renewal"] + 1
    logins = [c for c in f.server.commands(USER, "AUTHENTICATE")]
    assert len(logins) == len(f.tokens.issued)  # one login per token, no refusal


@pytest_twisted.inlineCallbacks
def test_server_ending_the_session_for_an_expired_token_is_a_quiet_reconnect(tmp_path, fleets):
    # the endpoint says an hour, the server expires a token after 1 s and
    # says so with Microsoft 365's BYE (in IDLE): reconnect with a fresh token
    f = OAuthFleet(tmp_path, expires_in=3600)
    fleets.append(f)
    f.server.bearer_expiry = lambda token: f.tokens.access_tokens[token][2] - 3599
    m = f.start()
    yield until(lambda: m.state == held.IDLING)
    numbers = yield f.deliver_for(3.5, every=0.25)
    yield until(lambda: f.delivered() == [1] + numbers, timeout=5)
    assert f.errors() == []
    assert len(f.server.expired_sessions) >= 2
    assert f.pool.reasons["token_expired"] >= 2
    assert held.BACKOFF not in f.states  # each reconnect at once
    # each reconnect took a fresh token: the cached one was dropped
    assert len(f.tokens.issued) >= f.pool.reasons["token_expired"] + 1


@pytest_twisted.inlineCallbacks
def test_a_no_naming_the_expired_token_is_a_quiet_reconnect(tmp_path, fleets):
    f = OAuthFleet(tmp_path, expires_in=3600)
    fleets.append(f)
    f.server.bearer_expired = "no"
    f.server.bearer_expiry = lambda token: f.tokens.access_tokens[token][2] - 3599
    m = f.start()
    yield until(lambda: m.state == held.IDLING)
    yield _sleep(1.2)  # the token expired; the server says nothing in IDLE
    started = reactor.seconds()
    f.server.deliver(USER, sample_message(2))  # EXISTS: the fetch gets a NO
    yield until(lambda: f.delivered() == [1, 2], timeout=5)
    assert reactor.seconds() - started < 0.9  # reconnected at once, not after a backoff
    assert f.errors() == []
    assert f.server.expired_sessions == [USER]
    assert f.pool.reasons["token_expired"] == 1
    assert len(f.tokens.issued) == 2


# -- through a real Dovecot ------------------------------------------------------

#: Dovecot's oauth2 passdb asks the fake endpoint's RFC 7662 introspection;
#: the password passdb before it refuses the token, then this one is asked
DOVECOT_OAUTH2 = """\
auth_mechanisms = plain login xoauth2 oauthbearer
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {conf}
}}
"""
DOVECOT_OAUTH2_CONF = """\
introspection_mode = post
introspection_url = {url}
force_introspection = yes
username_attribute = username
active_attribute = active
active_value = true
"""


@pytest_twisted.inlineCallbacks
def test_dovecot_xoauth2_held_connection_renews_its_token(tmp_path):
    """Dovecot checks each token once, at login, and never ends a session
    when it expires (as Gmail): the renewal is what keeps each login's token
    current; mail appended meanwhile arrives once."""
    import tempfile

    from twisted.internet import threads

    from tests.support import dovecot as dovecot_support
    from tests.support.dovecot import make_message
    from tests.support.oauthserver import FakeIntrospection

    tokens = FakeTokenEndpoint(clock=reactor, expires_in=2.5)
    tokens.add_client("app-1", "dovecot-secret-3333", refresh_token="rt-dovecot-0001")
    introspection = FakeIntrospection(tokens, "oauthuser")
    root = Resource()
    root.putChild(b"token", tokens)
    root.putChild(b"introspect", introspection)
    http_port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    base = f"http://127.0.0.1:{http_port.getHost().port}"
    fd, conf = tempfile.mkstemp(prefix="fido-dovecot-oauth2-", suffix=".conf.ext")
    with os.fdopen(fd, "w") as f:
        f.write(DOVECOT_OAUTH2_CONF.format(url=base + "/introspect"))
    os.chmod(conf, 0o644)
    http = HttpClient(reactor, timeout=5.0, per_host=2)
    machine = None
    try:
        with dovecot_support.started(tls=False,
                                     extra_config=DOVECOT_OAUTH2.format(conf=conf)) as server:
            server.add_users({"oauthuser": "pw-not-used-by-fido"})
            sent = [make_message(700, 2048)]
            server.add_message("oauthuser", sent[0])
            providers = oauth.Providers(reactor, http,
                                        oauth.RefreshTokenStore.in_dir(str(tmp_path)))
            acct = Account(id="dovecot-oauth", host="localhost", port=server.port,
                           username="oauthuser", security="none", auth="xoauth2",
                           oauth=OAuth(provider="generic", client_id="app-1",
                                       client_secret="dovecot-secret-3333",
                                       refresh_token="rt-dovecot-0001",
                                       token_url=base + "/token"))
            sink, results, pool = MemorySink(), [], held.HeldPool()
            source = HeldImap(acct, SourceContext(
                reactor=reactor, sink=sink, settings=IMAP,
                credentials=lambda a: oauth.for_account(a, providers)))
            machine = held.HeldAccount(
                acct.id, acct.host, source.open, source.poll, results.append, reactor,
                held.HeldSettings(command_timeout=2.0, logout_timeout=0.5, min_hold=30.0,
                                  reauth_margin=0.3, poll_interval=3600.0),
                pool, random.Random(0), tokens=source).start()
            yield until(lambda: [m.raw for m in sink.entries] == sent, timeout=10)
            for i in range(5):
                raw = make_message(701 + i, 2048)
                sent.append(raw)
                yield threads.deferToThread(server.add_message, "oauthuser", raw)
                yield _sleep(1.0)
            yield until(lambda: len(sink.entries) == len(sent), timeout=10)
            yield machine.stop(timeout=2)
            assert sorted(m.raw for m in sink.entries) == sorted(sent)  # once each
            assert [r for r in results if not r.ok] == []
            assert pool.reasons["token_renewal"] >= 2, pool.reasons
            # every login's token checked by Dovecot, each one valid then
            assert set(introspection.asked) <= set(tokens.issued)
            assert len(set(introspection.asked)) == pool.reasons["token_renewal"] + 1
    finally:
        if machine is not None:
            yield machine.stop(timeout=2)
        yield http.close()
        yield http_port.stopListening()
        os.unlink(conf)
