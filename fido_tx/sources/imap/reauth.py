"""OAuth2 on a held connection: log in again with a fresh token before the
one the connection logged in with expires, and tell an expired token from
other losses.

IMAP cannot authenticate an authenticated connection again, and servers
differ once a token expires: Microsoft 365 ends the session (``* BYE
Session invalidated - AccessTokenExpired`` on the next command, or a
``NO``), Gmail goes on.  So a held connection whose login used a token
(:attr:`HeldConnection.expires_at <fido_tx.sources.imap.heldconn.HeldConnection>`)
is replaced before then, quietly:

- at a moment drawn at random between the token's ``renew_at`` (from then
  on the token provider hands out a fresh one) and ``expires_at -
  reauth_margin``, so that the thousand mailboxes of one grant do not all
  log in again in the same second;
- first a fresh token is fetched (``tokens.renew()``) while the connection
  is still held; only then IDLE is ended, the connection logged out and a
  new one opened (the catch-up fetch of the new connection picks up what
  came in between: nothing is lost, and the sink's dedupe means nothing is
  delivered twice);
- if the fresh token cannot be had, the connection is kept for as long as
  the server takes it and renewing is tried again; ``invalid_grant``
  (kind ``reauthorize``: a person must sign in again) is reported at once.

A connection that the server ends naming an expired token is replaced at
once with a fresh token (the cached one is dropped: ``tokens.invalidate()``)
and without a report, unless it happens again before a fetch succeeds on
the new connection.
"""

from twisted.logger import Logger

from fido_tx import errors
from fido_tx.outcome import SessionResult
from fido_tx.sources.imap.heldconn import (
    LOST, TOKEN_EXPIRED, TOKEN_RENEWAL, Lost, Stopped, as_error, token_expired)

_log = Logger()


class Reauth:
    """One held account's token on its held connection.

    :param machine: the :class:`~fido_tx.sources.imap.held.HeldAccount`
        (its clock, settings, random, log, report, ``tokens`` and
        ``wait_for()``).
    """

    def __init__(self, machine):
        self.machine = machine
        #: clock time the held connection logs in again, or None
        self.switch_at = None
        #: connections ended by an expired token since the last good fetch
        self.expired_in_a_row = 0
        self._expires_at = None
        self._reported = False

    def held(self, conn):
        """``conn`` is held now: pick the moment it is replaced."""
        m = self.machine
        self.switch_at = self._expires_at = None
        self._reported = False
        if conn.expires_at is None:
            return
        renew_at = conn.renew_at if conn.renew_at is not None else conn.expires_at
        latest = max(renew_at, conn.expires_at - m.settings.reauth_margin)
        self._expires_at = conn.expires_at
        self.switch_at = renew_at + m.random.random() * (latest - renew_at)

    def fetched(self):
        """A fetch succeeded on the held connection."""
        self.expired_in_a_row = 0

    def until(self):
        """Seconds until the connection is to be replaced (inf: never)."""
        if self.switch_at is None:
            return float("inf")
        return self.switch_at - self.machine.clock.seconds()

    def due(self):
        return self.until() <= 0

    async def renew(self):
        """Fetch a fresh token, then end the connection
        (:class:`~fido_tx.sources.imap.heldconn.Lost`, reason
        ``token_renewal``); when no fresh token comes, keep it."""
        m = self.machine
        if m.tokens is not None:
            try:
                await m.wait_for(m.tokens.renew())
            except Stopped:
                raise
            except Exception as e:
                self._not_renewed(as_error(e, errors.AUTH))
                return
        raise Lost(errors.FidoError(errors.AUTH, "access token renewed"), reason=TOKEN_RENEWAL)

    def _not_renewed(self, error):
        m = self.machine
        now = m.clock.seconds()
        left = self._expires_at - now
        # again in a while, as long as the token lasts; after that the
        # server decides (Gmail goes on, Microsoft 365 ends the session)
        self.switch_at = now + min(60.0, max(1.0, left / 2)) if left > 1.0 else None
        m.log.info("held {account_id}: no fresh access token ({why}); keeping the held "
                   "connection while the server takes the current one ({left:.0f} s left)",
                   account_id=m.account_id, why=error.message, left=max(0.0, left))
        if error.kind == errors.REAUTHORIZE and not self._reported:
            self._reported = True
            m.report(SessionResult(account_id=m.account_id, kind=error.kind,
                                   message=error.message, debug=error.debug))

    def reason(self, lost):
        """Why ``lost`` (a :class:`Lost`) ended the connection; an expired
        token (only a connection that logged in with one has it) is dropped
        from the cache so that the next login takes a new one."""
        if lost.reason == TOKEN_RENEWAL:
            return TOKEN_RENEWAL
        if self._expires_at is not None and (lost.reason == TOKEN_EXPIRED
                                             or token_expired(lost.error)):
            self.expired_in_a_row += 1
            if self.machine.tokens is not None:
                self.machine.tokens.invalidate()
            return TOKEN_EXPIRED
        return LOST

    def quiet(self, reason):
        """Whether a reconnect for ``reason`` goes at once, without a report."""
        return reason == TOKEN_RENEWAL or (reason == TOKEN_EXPIRED
                                           and self.expired_in_a_row <= 1)
