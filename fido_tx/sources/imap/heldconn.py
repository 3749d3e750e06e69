"""What every held connection's parts share: the connection handed over,
the settings, the per-host pool, and how a loss or a stop travels.

:class:`~fido_tx.sources.imap.held.HeldAccount` (the state machine),
:class:`~fido_tx.sources.imap.heldwait.HeldWait` (IDLE or a plain wait) and
:class:`~fido_tx.sources.imap.fallback.Fallback` (fresh-connection polling)
are built on these.
"""

import re

import attr

from fido_tx.config import BackoffSettings
from fido_tx.errors import PROTOCOL, FidoError
from fido_tx.sources.imap.client import ImapCommandError

_TOO_MANY = re.compile(r"\[(LIMIT|INUSE)\]|too many (simultaneous )?connections", re.I)
#: a server ending a session, or refusing a command, because the token it
#: was logged in with expired (Microsoft 365: "* BYE Session invalidated -
#: AccessTokenExpired")
_TOKEN_EXPIRED = re.compile(r"AccessTokenExpired|Session invalidated|"
                            r"\btoken\b[^\r\n]{0,40}\bexpired", re.I)

#: why a held connection was replaced (``fido_held_reconnects_total{reason}``)
LOST = "lost"  # dropped, restarted, BYE, silent, failed
TOKEN_RENEWAL = "token_renewal"  # logged in again before the token expired
TOKEN_EXPIRED = "token_expired"  # the server said the token expired
REASONS = (LOST, TOKEN_RENEWAL, TOKEN_EXPIRED)


def too_many_connections(error):
    """Whether a failed connect/login says the server's connection limit is hit."""
    return isinstance(error, FidoError) and bool(_TOO_MANY.search(error.message))


def token_expired(error):
    """Whether a lost connection or a failed command names an expired token."""
    return bool(error) and bool(_TOKEN_EXPIRED.search(
        error.message if isinstance(error, FidoError) else str(error)))


@attr.s(slots=True)
class HeldConnection:
    """What ``open()`` hands over: a logged-in connection with the mailbox selected.

    :ivar client: the :class:`~fido_tx.sources.imap.client.FidoIMAP4Client`.
    :ivar capabilities: the server's, after login (upper-case bytes).
    :ivar exists: the message count SELECT reported (kept up to date).
    :ivar state: anything the opener wants ``poll`` to get back (the
        session object, the UIDVALIDITY, ...).
    :ivar on_close: called once the connection is closed or being aborted
        (drop what refers to it, so it is freed at once, not by the collector).
    """

    client = attr.ib()
    capabilities = attr.ib(default=frozenset())
    exists = attr.ib(default=None)
    state = attr.ib(default=None)
    on_close = attr.ib(default=None)
    #: OAuth2: clock seconds from which a fresh token can be had, and when
    #: the server stops taking the one this connection logged in with
    #: (``None``: a password, which does not expire)
    renew_at = attr.ib(default=None)
    expires_at = attr.ib(default=None)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class HeldSettings:
    #: use IDLE when the server offers it (the account's ``idle``)
    idle: bool = True
    #: seconds before IDLE is ended and re-issued (under 29 minutes)
    idle_refresh: float = 600.0
    #: the longest an account goes without a check
    poll_interval: float = 60.0
    #: seconds for ``+``, DONE's answer and the NOOP probe
    command_timeout: float = 60.0
    logout_timeout: float = 5.0
    #: failures in a row (connects, early losses) before one is reported
    report_after: int = 3
    #: a connection lost sooner than this after it was opened counts as a failure
    min_hold: float = 30.0
    #: seconds on fresh-connection polling before holding is tried again
    fallback_retry: float = 600.0
    #: the reconnect schedule (first retry after 1 s, not the sessions' 30 s)
    reconnect: BackoffSettings = BackoffSettings(initial=1.0, maximum=300.0)
    #: an untagged FETCH without \\Seen (mail marked unread again) wakes too
    wake_on_unseen: bool = False
    #: OAuth2: a held connection logs in again with a fresh token at least
    #: this long before its token expires (and not before the token can be
    #: renewed); the moment is spread at random over that window
    reauth_margin: float = 30.0
    #: a check prompted by nothing is a NOOP alone while the last search is
    #: younger than this (see :mod:`~fido_tx.sources.imap.heldfetch`); 0:
    #: every check searches (the daemon: ``idle_refresh``)
    full_search: float = 0.0
    #: the daemon's dry run (what an empty check reports)
    dry_run: bool = False

    @classmethod
    def from_settings(cls, settings, account_idle=True):
        """From :class:`fido_tx.config.Settings` and the account's ``idle``."""
        imap, b = settings.imap, settings.backoff
        return cls(
            idle=bool(account_idle),
            idle_refresh=getattr(imap, "idle_refresh", 600.0),
            full_search=getattr(imap, "idle_refresh", 600.0),
            dry_run=bool(settings.fido.dry_run),
            poll_interval=settings.fido.poll_interval,
            command_timeout=imap.command_timeout,
            logout_timeout=imap.logout_timeout,
            reconnect=attr.evolve(b, initial=min(1.0, b.initial),
                                  maximum=min(300.0, b.maximum)),
        )


class HeldPool:
    """What all held connections share: the per-host limit and the counts
    for /metrics and ``fido status``.

    :param on_idle: called each time a connection starts to wait in IDLE
        (the daemon freezes the collector's view of settled connections).
    :param ticker: a :class:`~fido_tx.schedule.ticker.PollTicker`: the
        periodic checks (``poll_interval``, IDLE refresh) due on its grid.
    """

    def __init__(self, max_per_host=1000, on_idle=None, ticker=None):
        self.max_per_host = max_per_host
        self.on_idle = on_idle
        #: the :class:`~fido_tx.schedule.ticker.PollTicker` the held
        #: accounts' checks are due on (None: each its own timer)
        self.ticker = ticker
        self._hosts = {}
        #: connections logged in and held now
        self.held = 0
        #: of those, waiting in IDLE now
        self.idling = 0
        #: connections replaced since start
        self.reconnects = 0
        #: of those, by reason (:data:`REASONS`)
        self.reasons = dict.fromkeys(REASONS, 0)
        #: accounts polling on fresh connections now (limits hit)
        self.fallback = 0

    def try_hold(self, host):
        """Take one of ``host``'s connection slots; False when all are taken."""
        n = self._hosts.get(host, 0)
        if n >= self.max_per_host:
            return False
        self._hosts[host] = n + 1
        return True

    def release(self, host):
        n = self._hosts.get(host, 0) - 1
        if n > 0:
            self._hosts[host] = n
        else:
            self._hosts.pop(host, None)

    def reconnected(self, reason):
        self.reconnects += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def idle_started(self):
        self.idling += 1
        if self.on_idle is not None:
            self.on_idle()

    def idle_ended(self):
        self.idling -= 1

    def per_host(self, host):
        return self._hosts.get(host, 0)

    def snapshot(self):
        return {"held": self.held, "idling": self.idling,
                "reconnects": self.reconnects, "fallback": self.fallback}


class Stopped(Exception):
    """stop() interrupted a wait."""


class Lost(Exception):
    """The held connection is gone (``error`` says why).

    ``routine`` is False when it went down during a poll: that poll failed,
    so the loss counts towards a report even after a long hold.  ``reason``
    is one of :data:`REASONS`; a :data:`TOKEN_RENEWAL` is planned (the
    connection is logged out politely, and replaced at once).
    """

    def __init__(self, error, routine=True, reason=LOST):
        super().__init__(error)
        self.error = error
        self.routine = routine
        self.reason = reason


def as_error(exc, kind, message=None):
    """Any exception (or ``None``) as a :class:`FidoError`."""
    if isinstance(exc, FidoError):
        return exc
    if isinstance(exc, ImapCommandError):
        return FidoError(PROTOCOL, str(exc))
    if exc is None:
        return FidoError(kind, message or "connection closed")
    return FidoError(kind, message or f"{type(exc).__name__}: {exc}")
