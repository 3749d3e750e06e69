"""One IMAP session: wait for the start pacer, log in, poll the mailbox, log out.

:class:`ImapSession` (an :class:`~fido_tx.interfaces.ISource`) composes the
two separable parts: :class:`~fido_tx.sources.imap.login.Login` (connect,
TLS, authenticate -> a logged-in connection) and
:class:`~fido_tx.sources.imap.poll.MailboxPoll` (one poll of a selected
mailbox).  :func:`fetch_mailbox` is the old one-call entry.

It never fails: every outcome is a :class:`~fido_tx.outcome.SessionResult`
(with an error kind from :mod:`fido_tx.errors` when something went wrong),
except when the caller cancels the returned Deferred: then the connection is
aborted, nothing more is marked and the Deferred errbacks with
``CancelledError``.

One way to stop: :meth:`ImapSession.stop` records the reason and cancels
the Deferred the session is waiting on (the pacer, the byte budget, the
connect, a command; a sink's own write is left to finish, unmarked).  The
caller's cancel and ``session_timeout`` both go through it.

Timeouts: ``connect_timeout`` covers name resolution and the TCP connect;
``greeting_timeout`` the TLS handshake (implicit TLS) and the greeting;
``command_timeout`` is the longest silence while a command runs (any line or
literal data from the server restarts it); while a message literal arrives it
must also keep up ``min_literal_rate`` bytes/s (checked every 5 s);
``logout_timeout`` bounds the close after LOGOUT (whose answer is not
waited for), after which the connection is aborted.

Round trips: with a LOGIN that needs no literal, the poll's STATUS is
written in the same packet (RFC 3501 sec 5.5 pipelining), so an empty poll
is greeting, LOGIN+STATUS, LOGOUT-and-close.  After a poll that found mail
the next one asks no STATUS (:meth:`ImapSession.wants_status`).

Every log line of a session carries its account id and a short random
session id (``s=3f9a2c``): ``grep s=3f9a2c`` tells the whole story of one poll.
"""

import os

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from fido_tx import errors
from fido_tx.credentials import for_account
from fido_tx.errors import FidoError
from fido_tx.interfaces import ISource
from fido_tx.outcome import SessionResult
from fido_tx.scrub import scrub
from fido_tx.sources.imap.client import ImapCommandError
from fido_tx.sources.imap.connect import Connector
from fido_tx.sources.imap.login import Login
from fido_tx.sources.imap.parse import _show, extract_message_id  # noqa: F401 - re-export
from fido_tx.sources.imap.poll import SIZE_CHUNK, MailboxPoll  # noqa: F401 - re-export
from fido_tx.sources.imap.select import send_status, status_items

_log = Logger()

#: the reason of a stop by the caller (whose Deferred then errbacks)
CANCELLED = "session cancelled"

__all__ = ["ImapSession", "StepLog", "fetch_mailbox", "new_session_id"]

#: error kinds after which the connection is closed without LOGOUT
_ABRUPT = frozenset([errors.TIMEOUT, errors.PROTOCOL, errors.TLS, errors.CONNECT,
                     errors.DNS, errors.CONFIG])


def new_session_id():
    """A short random id for the log lines of one session (``3f9a2c``)."""
    return os.urandom(3).hex()


class StepLog:
    """The debug lines of one session, each with account id and session id.

    ``enabled`` is ``False`` when nothing reads debug events: the lines are
    then not even built (~10% of the CPU of a session with nothing new).
    """

    __slots__ = ("log", "account_id", "session_id", "enabled")

    def __init__(self, log, account_id, session_id, enabled=True):
        self.log = log
        self.account_id = account_id
        self.session_id = session_id
        self.enabled = enabled

    def __call__(self, text, **kw):
        if self.enabled:
            self.log.debug("session {account_id} s={session_id}: " + text,
                           account_id=self.account_id, session_id=self.session_id, **kw)

    def info(self, text, **kw):
        self.log.info("session {account_id} s={session_id}: " + text,
                      account_id=self.account_id, session_id=self.session_id, **kw)


def fetch_mailbox(reactor, account, sink, settings, dry_run=False, log=None, budget=None,
                  pacer=None, debug=True, connector=None, credentials=None, positions=None,
                  epochs=None):
    """Run one session on ``account``'s mailbox.

    :param reactor: IReactorTCP, IReactorTime and
        IReactorPluggableNameResolver.
    :param account: a :class:`fido_tx.accounts.model.Account`.
    :param sink: an :class:`fido_tx.interfaces.ISink`.
    :param settings: :class:`fido_tx.config.ImapSettings`.
    :param dry_run: EXAMINE instead of SELECT, fetch no bodies, store and
        mark nothing; the result's ``fetched``/``bytes`` say what would have
        been fetched.
    :param log: a :class:`twisted.logger.Logger` (one debug line per step).
    :param budget: a :class:`fido_tx.schedule.budget.ByteBudget` shared by all
        sessions: each batch's bytes (by ``RFC822.SIZE``) are acquired before
        its ``UID FETCH`` and released once the sink has answered.
    :param pacer: a :class:`fido_tx.schedule.pacer.StartPacer` shared by all
        sessions: the connection is started when it lets this session through.
    :param debug: ``False`` when nothing reads debug events.
    :param connector: the shared :class:`~fido_tx.sources.imap.connect.Connector`
        (endpoints, TLS options and sessions); a new one when ``None``.
    :param credentials: the account's :class:`~fido_tx.interfaces.ICredentials`
        (by default :func:`fido_tx.credentials.for_account`).
    :param positions: the :class:`~fido_tx.interfaces.IMailboxPositions` an
        account with ``select = "new"`` or ``start_from = "now"`` needs.
    :param epochs: the :class:`~fido_tx.sources.imap.identity.Epochs` of
        the polls before (see :func:`fido_tx.sources.imap.identity.sizes`).
    :return: Deferred firing with a :class:`SessionResult`.
    """
    return ImapSession(reactor, account, sink, settings, connector=connector,
                       credentials=credentials, dry_run=dry_run, log=log, budget=budget,
                       pacer=pacer, debug=debug, positions=positions,
                       epochs=epochs).poll()


@implementer(ISource)
class ImapSession:
    """One session on one account (see the module docstring)."""

    def __init__(self, reactor, account, sink, settings, connector=None, credentials=None,
                 dry_run=False, log=None, budget=None, pacer=None, debug=True,
                 credentials_factory=None, handle=None, positions=None, epochs=None):
        self.reactor = reactor
        self.account = account
        self.sink = sink
        self.settings = settings
        self.connector = connector if connector is not None else Connector(reactor)
        self.credentials = credentials
        #: ``f(account) -> ICredentials``, asked when ``credentials`` is None
        self.credentials_factory = credentials_factory or for_account
        self.dry_run = dry_run
        self.log = log or _log
        self.budget = budget
        self.pacer = pacer
        #: the scheduler's SessionHandle (IDLE releases its slot through it)
        self.handle = handle
        self.positions = positions
        #: the daemon's :class:`~fido_tx.sources.imap.identity.Epochs`, or None
        self.epochs = epochs
        self.session_id = new_session_id()
        self.step = StepLog(self.log, account.id, self.session_id, debug)
        #: why the session was stopped (``None`` while it was not)
        self.stopped = None
        self.login = None
        self.mailbox_poll = None
        self.started = None
        self._steps = None
        #: the answer of the STATUS written with LOGIN (or None)
        self._status = None
        #: whether STATUS was written with LOGIN
        self.pipelined = False
        self._failed_response = b""
        self._failed_bye = None

    # -- lifecycle -------------------------------------------------------------

    def poll(self):
        self.started = self.reactor.seconds()
        outer = defer.Deferred(lambda d: self.stop(CANCELLED))
        limit = self.settings.session_timeout
        deadline = self.reactor.callLater(limit, self._expire) if limit else None

        def deliver(result):
            if deadline is not None and deadline.active():
                deadline.cancel()
            self._forget()
            if not outer.called and self.stopped != CANCELLED:
                outer.callback(result)

        def crashed(f):  # a bug: still give the scheduler its account back
            self.log.failure("session {account_id} s={session_id} crashed", f,
                             account_id=self.account.id, session_id=self.session_id)
            return self._result(FidoError(errors.PROTOCOL,
                                          f"internal error: {f.getErrorMessage()}"))

        self._steps = defer.ensureDeferred(self._run())
        self._steps.addErrback(crashed)
        self._steps.addCallback(deliver)
        return outer

    def stop(self, why):
        """Stop the session (the one way): record ``why`` (the first reason
        wins) and cancel whatever it is waiting for."""
        if self.stopped is None:
            self.stopped = why
        if self._steps is not None:
            self._steps.cancel()

    def _expire(self):
        self.stop(f"session took longer than session_timeout "
                  f"({self.settings.session_timeout:g} s)")

    @property
    def connection(self):
        return self.login.connection if self.login is not None else None

    def _forget(self):
        """Drop the connection's objects once the session is over, so they
        are freed at once instead of by the garbage collector."""
        conn = self.connection
        if conn is not None:
            conn.forget()
        self.login = None
        self.mailbox_poll = None

    # -- the steps -------------------------------------------------------------

    async def _run(self):
        error = None
        try:
            await self._session()
        except defer.CancelledError:
            error = FidoError(errors.TIMEOUT, self.stopped or CANCELLED)
        except FidoError as e:
            error = e
        except ImapCommandError as e:
            error = FidoError(errors.PROTOCOL, str(e))
        except Exception as e:
            self.log.failure("session {account_id} s={session_id}: unexpected error",
                             account_id=self.account.id, session_id=self.session_id)
            error = FidoError(errors.PROTOCOL, f"unexpected error: {type(e).__name__}: {e}")
        if self.stopped is not None:
            error = FidoError(errors.TIMEOUT, self.stopped)
        conn = self.connection
        if error is not None and conn is not None and conn.proto is not None:
            # what the server said when it went wrong (before any LOGOUT)
            self._failed_response = conn.proto.last_response
            self._failed_bye = conn.proto.bye
        if conn is not None and conn.proto is not None and conn.proto.pipeline_dropped:
            self.connector.dropped(self.account)
        await self._close(error)
        if self._status is not None:
            # a STATUS pipelined with a LOGIN that failed: not read
            self._status.addErrback(lambda f: None)
        return self._result(error)

    async def _session(self):
        if self.pacer is not None:
            await self.pacer.wait()
        if self.credentials is None:
            self.credentials = self.credentials_factory(self.account)
        status = self.wants_status()
        pipeline = (self._send_status if status and self.connector.pipelines_login(self.account)
                    else None)
        self.login = Login(self.reactor, self.connector, self.account, self.settings,
                           self.credentials, self.step, pipeline=pipeline)
        conn = await self.login.run()
        if self.login.mechanism_was_login:
            self.connector.learned_login(self.account, self.login.answer_capabilities)
        self.mailbox_poll = MailboxPoll(conn, self.account, self.sink, self.settings,
                                        self.step, budget=self.budget, dry_run=self.dry_run,
                                        positions=self.positions, epochs=self.epochs,
                                        status=self._status)
        if not status:
            self.mailbox_poll.status_allowed = False
        if not self.connector.pipelines(self.account):
            self.mailbox_poll.search_with_select = False
        await self.mailbox_poll.run()
        if self.dry_run:
            p = self.mailbox_poll
            self.step.info("dry run: would fetch {count} messages ({nbytes} bytes), "
                           "would mark {mark}", count=p.fetched, nbytes=p.bytes,
                           mark=self.account.after_fetch)

    def wants_status(self):
        """Whether the poll asks STATUS before SELECT.  For an account
        without a position STATUS decides one thing, whether anything is
        unseen (else no SELECT): not asked when the mailbox's last poll in
        this process found mail, where it would most likely decide nothing
        and cost Dovecot a second opening of the mailbox (~2-4 ms of its
        CPU per session, bench/server_share.py).  LOGIN, then SELECT with
        its SEARCH, is as many round trips as LOGIN+STATUS, then SELECT."""
        account, epochs = self.account, self.epochs
        if account.select == "new" or account.start_from == "now":
            return True  # STATUS also moves or settles the position
        return epochs is None or not epochs.found_mail(account.id, account.mailbox)

    def _send_status(self, command):
        """The poll's STATUS, written with LOGIN (to a server known to take
        it, see :meth:`Connector.pipelines_login`): an empty poll is then
        one round trip after the greeting (LOGIN and STATUS answered
        together)."""
        self.pipelined = True
        self._status = send_status(command, self.account.mailbox, status_items(self.account))

    async def _close(self, error):
        conn = self.connection
        if conn is None or conn.closed:
            return
        if self.stopped is None and (error is None or error.kind not in _ABRUPT):
            await conn.logout(self.settings.logout_timeout)
        else:
            conn.abort()

    # -- the result ------------------------------------------------------------

    def _forms(self):
        return self.credentials.secret_forms() if self.credentials is not None else ()

    def _deviations(self):
        """What the server's protocol bent and Fido read anyway (client's
        ``deviations``): ``(("bare_lf", n), ...)``."""
        conn = self.connection
        proto = conn.proto if conn is not None else None
        counted = getattr(proto, "deviations", None)
        return tuple(sorted(counted.items())) if counted else ()

    def _result(self, error=None):
        p = self.mailbox_poll
        fields = dict(
            account_id=self.account.id,
            fetched=p.fetched if p else 0,
            bytes=p.bytes if p else 0,
            marked=p.marked if p else 0,
            too_large=tuple(p.too_large) if p else (),
            seconds=max(0.0, self.reactor.seconds() - self.started),
            dry_run=self.dry_run,
            session_id=self.session_id,
            deviations=self._deviations(),
        )
        if error is None:
            return SessionResult(**fields)
        forms = self._forms()
        return SessionResult(kind=error.kind, message=scrub(error.message, forms),
                             debug=scrub(self._debug(error), forms), **fields,
                             retry_after=error.retry_after)

    def _debug(self, error):
        """The debug text, built whole from unscrubbed parts (the caller
        scrubs it before anything is cut)."""
        account = self.account
        lines = [f"server: {account.host}:{account.port} ({account.security})"]
        if error.debug:
            lines.append(error.debug)
        conn = self.connection
        if conn is not None and conn.proto is not None:
            forms = self._forms()
            if self._failed_response:
                lines.append("server response: " + _shown(self._failed_response, forms))
            if self._failed_bye is not None:
                lines.append("server said BYE: " + _shown(self._failed_bye, forms))
            trace = conn.proto.debug_lines()
            if trace:
                lines.append("recent protocol lines:")
                lines.extend("  " + t for t in trace)
        return "\n".join(lines)


def _shown(data, forms):
    """Server bytes for display: scrubbed whole, then escaped and cut."""
    return _show(scrub(data.decode("utf-8", "replace"), forms))
