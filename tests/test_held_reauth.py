"""OAuth2 on held connections (fido_tx.sources.imap.reauth): a fresh token
before the held one expires, and an expired token named by the server.

Synchronous: the held-connection harness of tests/test_held.py (a Clock, a
FidoIMAP4Client on a scripted StringTransport server) with a fake token
source whose tokens last an hour and may be renewed in their last 5 minutes,
as fido_tx.credentials.oauth's provider hands them out.
"""

import random

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import errors
from fido_tx.errors import FidoError
from fido_tx.outcome import SessionResult
from fido_tx.sources.imap import held
from fido_tx.sources.imap.heldconn import HeldConnection, HeldSettings
from fido_tx.sources.imap.reauth import Reauth
from tests.test_held import Harness

EXPIRED_BYE = b"* BYE Session invalidated - AccessTokenExpired"


class FakeTokens:
    """Tokens of ``lifetime`` seconds, renewable ``margin`` seconds before
    they expire; ``fail``: errors ``renew()`` answers first."""

    def __init__(self, clock, lifetime=3600.0, margin=300.0):
        self.clock = clock
        self.lifetime = lifetime
        self.margin = margin
        self.current = None  # (token, renew_at, expires_at)
        self.issued = 0
        self.renewals = []  # clock times of renew()
        self.invalidated = 0
        self.fail = []

    def login(self):
        now = self.clock.seconds()
        if self.current is None or now >= self.current[1]:
            self.issued += 1
            self.current = (f"tok-{self.issued}", now + self.lifetime - self.margin,
                            now + self.lifetime)
        return self.current

    def renew(self):
        self.renewals.append(self.clock.seconds())
        if self.fail:
            return defer.fail(self.fail.pop(0))
        return defer.succeed(self.login()[0])

    def invalidate(self):
        self.invalidated += 1
        self.current = None


class TokenHarness(Harness):
    """A Harness whose connections log in with tokens from :class:`FakeTokens`."""

    def __init__(self, test, **settings):
        super().__init__(test, **settings)
        self.tokens = FakeTokens(self.clock)
        self.logins = []  # (clock time, token)
        self.machine.tokens = self.tokens

    def open(self):
        if self.open_errors:
            return defer.fail(self.open_errors.pop(0))
        d = super().open()
        conn = self.test.successResultOf(d)
        token, renew_at, expires_at = self.tokens.login()
        self.logins.append((self.clock.seconds(), token))
        return defer.succeed(HeldConnection(conn.client, conn.capabilities, exists=0,
                                            renew_at=renew_at, expires_at=expires_at))

    def errors(self):
        return [r for r in self.reports if not r.ok]

    def until(self, when, step=1.0):
        """Advance the clock to ``when`` in steps (Clock.advance runs every
        call due with the clock already at the end)."""
        while self.clock.seconds() < when:
            self.turn(min(step, when - self.clock.seconds()))


class RenewalTests(SynchronousTestCase):
    def test_a_fresh_token_before_expiry_replaces_the_connection_quietly(self):
        h = TokenHarness(self)
        h.machine.start()
        h.turn()
        switch = h.machine.reauth.switch_at
        self.assertTrue(3300 <= switch <= 3570, switch)  # renewable .. expiry - 30 s
        h.until(switch - 1)
        self.assertEqual(len(h.servers), 1)
        first = h.server
        h.until(switch)
        self.assertEqual(h.tokens.renewals, [switch])  # the token before the switch
        self.assertEqual(len(h.servers), 2)
        self.assertEqual(first.commands()[-3:], [b"IDLE", b"DONE", b"LOGOUT"])
        self.assertEqual([t for _, t in h.logins], ["tok-1", "tok-2"])
        self.assertEqual(h.machine.state, held.IDLING)
        self.assertIn(held.RENEWING, h.machine.history)
        self.assertEqual(h.errors(), [])
        self.assertEqual(h.pool.reasons, {"lost": 0, "token_renewal": 1, "token_expired": 0})
        self.assertEqual(h.pool.reconnects, 1)
        # the new connection's catch-up poll: what came during the switch
        self.assertIs(h.polls[-1][1].client, h.server.client)
        self.assertEqual(h.polls[-1][0], switch)
        # and the next token an hour later, again without a report
        h.until(switch + 3600)
        self.assertEqual([t for _, t in h.logins], ["tok-1", "tok-2", "tok-3"])
        self.assertEqual(h.errors(), [])

    def test_idle_is_refreshed_at_the_switch_not_later(self):
        h = TokenHarness(self, idle_refresh=1500)
        h.machine.start()
        h.turn()
        switch = h.machine.reauth.switch_at
        h.until(switch - 0.5, step=1500)
        self.assertEqual(len(h.servers), 1)
        h.until(switch, step=1500)
        self.assertEqual(len(h.servers), 2)  # IDLE ended at the switch, not at 3000

    def test_the_switch_moments_of_one_grant_are_spread(self):
        tokens = FakeTokens(None)
        moments = []
        for seed in range(200):
            machine = _Machine(seed)
            r = Reauth(machine)
            r.held(HeldConnection(None, renew_at=3300.0, expires_at=3600.0))
            moments.append(r.switch_at)
        self.assertTrue(all(3300 <= t <= 3570 for t in moments))
        self.assertGreater(max(moments) - min(moments), 200)  # not all in one second
        self.assertIsNone(tokens.current)

    def test_a_short_token_switches_when_it_can_be_renewed(self):
        # margin larger than the renewable window: never before renew_at
        # (else the login would get the same token again)
        r = Reauth(_Machine(0, reauth_margin=30))
        r.held(HeldConnection(None, renew_at=48.0, expires_at=60.0))
        self.assertEqual(r.switch_at, 48.0)

    def test_a_password_connection_is_never_replaced(self):
        h = Harness(self, idle_refresh=600)
        h.machine.start()
        h.turn()
        for _ in range(20):
            h.turn(600)
        self.assertEqual(len(h.servers), 1)
        self.assertIsNone(h.machine.reauth.switch_at)


class RenewalFailureTests(SynchronousTestCase):
    def test_no_fresh_token_keeps_the_connection_and_tries_again(self):
        h = TokenHarness(self)
        h.tokens.fail = [FidoError(errors.CONNECT, "the token endpoint answered HTTP 503")]
        h.machine.start()
        h.turn()
        switch = h.machine.reauth.switch_at
        h.until(switch)
        self.assertEqual(len(h.servers), 1)  # kept
        self.assertEqual(h.machine.state, held.IDLING)
        self.assertEqual(h.errors(), [])
        h.until(switch + 60)
        self.assertEqual(len(h.tokens.renewals), 2)
        self.assertEqual(len(h.servers), 2)  # renewed the second time
        self.assertEqual(h.errors(), [])

    def test_invalid_grant_is_reported_once_as_reauthorize(self):
        h = TokenHarness(self)
        refused = FidoError(errors.REAUTHORIZE, "the token endpoint refused the grant "
                                                "(invalid_grant): a person must sign in again")
        h.tokens.fail = [refused] * 20
        h.machine.start()
        h.turn()
        h.until(3600)
        self.assertGreater(len(h.tokens.renewals), 3)
        self.assertEqual([r.kind for r in h.errors()], [errors.REAUTHORIZE])
        self.assertEqual(len(h.servers), 1)  # mail still comes while the server takes it

    def test_reauthorize_at_a_reconnect_is_reported_at_once(self):
        h = TokenHarness(self)
        h.machine.start()
        h.turn(100)
        h.open_errors = [FidoError(errors.REAUTHORIZE, "invalid_grant")]
        h.server.send(EXPIRED_BYE)
        h.server.drop()
        h.turn()
        self.assertEqual([r.kind for r in h.errors()], [errors.REAUTHORIZE])
        self.assertEqual(h.machine.state, held.BACKOFF)

    def test_stop_while_renewing_logs_out(self):
        h = TokenHarness(self)
        h.machine.start()
        h.turn()
        never = defer.Deferred()
        h.tokens.renew = lambda: never
        h.until(h.machine.reauth.switch_at)
        self.assertEqual(h.machine.state, held.RENEWING)
        d = h.machine.stop(timeout=10)
        h.turn()
        self.successResultOf(d)
        self.assertEqual(h.server.commands()[-1], b"LOGOUT")
        self.assertEqual(h.machine.state, held.CLOSED)


class ExpiredTokenTests(SynchronousTestCase):
    def test_bye_naming_an_expired_token_reconnects_at_once_with_a_fresh_one(self):
        h = TokenHarness(self)
        h.machine.start()
        h.turn(5)  # sooner than min_hold: any other loss would back off first
        h.server.send(EXPIRED_BYE)
        h.server.drop()
        h.turn()
        self.assertEqual(len(h.servers), 2)
        self.assertEqual(h.tokens.invalidated, 1)
        self.assertEqual([t for _, t in h.logins], ["tok-1", "tok-2"])
        self.assertEqual(h.errors(), [])
        self.assertEqual(h.pool.reasons["token_expired"], 1)
        self.assertEqual(h.machine.state, held.IDLING)

    def test_no_naming_an_expired_token_in_a_poll_reconnects_without_report(self):
        h = TokenHarness(self)
        h.poll_results = [
            defer.succeed(SessionResult(account_id="a1")),
            defer.succeed(SessionResult(
                account_id="a1", kind=errors.PROTOCOL,
                message="UID SEARCH failed: NO Session invalidated - AccessTokenExpired"))]
        h.machine.start()
        h.turn(100)
        h.server.send(b"* 1 EXISTS")
        h.turn()
        self.assertEqual(len(h.servers), 2)
        self.assertEqual(h.errors(), [])
        self.assertEqual(h.tokens.invalidated, 1)
        self.assertEqual(len(h.polls), 3)  # the new connection's catch-up poll

    def test_expired_again_before_a_good_fetch_backs_off_and_reports_if_it_keeps_on(self):
        h = TokenHarness(self)
        h.machine.start()
        h.turn(100)
        expired = SessionResult(account_id="a1", kind=errors.PROTOCOL,
                                message="NO Session invalidated - AccessTokenExpired")
        h.poll_results = [defer.succeed(expired) for _ in range(10)]
        h.server.send(EXPIRED_BYE)
        h.server.drop()
        h.turn()
        self.assertEqual(len(h.servers), 2)  # the first: at once
        first_report = None
        for _ in range(20):
            h.turn(1)
            if h.errors() and first_report is None:
                first_report = len(h.servers)
        # connections 2, 3 and 4 each expired at once: the third in a row is reported
        self.assertEqual(first_report, 4)
        self.assertTrue(all("AccessTokenExpired" in r.message for r in h.errors()))
        self.assertEqual(h.machine.state, held.BACKOFF)

    def test_a_password_connection_bye_naming_a_token_is_an_ordinary_loss(self):
        h = Harness(self)
        h.machine.start()
        h.turn(5)
        h.server.send(EXPIRED_BYE)
        h.server.drop()
        h.turn()
        self.assertEqual(h.pool.reasons, {"lost": 1, "token_renewal": 0, "token_expired": 0})
        self.assertEqual(h.machine.state, held.BACKOFF)  # lost before min_hold

    def test_a_password_connection_is_not_fooled_by_the_words(self):
        h = Harness(self)
        h.poll_results = [
            defer.succeed(SessionResult(account_id="a1")),
            defer.succeed(SessionResult(account_id="a1", kind=errors.PROTOCOL,
                                        message="NO your token expired"))]
        h.machine.start()
        h.turn(100)
        h.server.send(b"* 1 EXISTS")
        h.turn()
        self.assertEqual(len(h.servers), 1)  # a failed poll, reported as ever
        self.assertEqual([r.kind for r in h.reports if not r.ok], [errors.PROTOCOL])


class _Machine:
    """What Reauth reads of a HeldAccount, for the moments alone."""

    def __init__(self, seed, **settings):
        self.random = random.Random(seed)
        self.settings = HeldSettings(**settings)
        self.clock = None
