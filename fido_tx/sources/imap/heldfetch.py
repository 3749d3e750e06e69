"""A check on a held connection: a NOOP when nothing announced new mail,
then the poll (search, deliver, mark) in a worker slot, again while new mail
came meanwhile; its result reported, a lost connection raised.

A check that nothing prompted is the NOOP alone when the last search ended
well, found nothing new and is recent (within ``full_search``; the
daemon's is ``idle_refresh``): RFC 3501's NOOP is how a client polls; the
server answers it with EXISTS/RECENT for new mail (the connection's
observer also counts EXPUNGE, so an expunge plus an arrival is seen too),
and only then are the search and the poll made.  After a poll that failed
or fetched something (a failed delivery, mail beyond ``max_search_uids``,
a dry run's unmarked mail) the next check searches.  An empty check is one
command and an empty result in a worker slot, with no poll object: most of
its CPU had been Fido's own work per search (0.713 ms on shared ticks,
against a 0.085 ms floor for batched round trips).  A full search still
runs every ``full_search`` seconds, for a server that announces nothing
(and for mail marked unread again, which announces no EXISTS).

One :class:`HeldFetch` per :class:`~fido_tx.sources.imap.held.HeldAccount`,
which enters the ``fetching`` state before it calls :meth:`HeldFetch.run`.
"""

from twisted.internet import defer

from fido_tx import errors
from fido_tx.errors import FidoError
from fido_tx.outcome import SessionResult
from fido_tx.sources.imap import idle as _idle
from fido_tx.sources.imap.heldconn import Lost, as_error, token_expired


class HeldFetch:
    """How one held account checks its held connection.

    :param machine: the :class:`~fido_tx.sources.imap.held.HeldAccount`
        (its ``poll``, ``report``, settings, clock, log, ``take_slot()``,
        ``fetched()``, and the ``dirty``, ``polling``, ``last_check`` and
        ``stopping`` it shares).
    """

    def __init__(self, machine):
        self.machine = machine
        #: clock seconds of the last search on this connection that ended
        #: well and found nothing new (None: the next check searches)
        self.searched_at = None

    async def run(self, conn, synced=False):
        """Poll on the held connection (again while new mail came meanwhile).

        ``synced``: the server just told this connection what it has (SELECT,
        an EXISTS); else a NOOP asks first: Dovecot and Courier do not look
        for new mail on UID SEARCH, only on NOOP (RFC 3501's poll) or in IDLE.
        """
        m = self.machine
        for _ in range(3):
            # in a worker slot, as every check: none runs while fetching is paused
            release = await m.take_slot()
            try:
                if not (synced or m.dirty) and self._quiet_allowed():
                    if not await self._announced(conn):
                        return
                    synced = True  # the NOOP told what is new
                result = await self._poll_once(conn, synced or m.dirty)
                if result.ok:
                    m.fetched()
                elif result.retry_after is not None:  # a sink's 429: leave it alone
                    m.hold_off(result.retry_after)
                # reported before the slot is given back, as a session ending
                # is: backpressure judges it before another fetch may start
                m.report(result)
            finally:
                if release is not None:
                    release()
            if not m.dirty or m.stopping or m.held_off() > 0:
                return

    def _quiet_allowed(self):
        """Whether a NOOP alone may answer for this check."""
        m = self.machine
        return (self.searched_at is not None
                and m.clock.seconds() - self.searched_at < m.settings.full_search)

    async def _announced(self, conn):
        """NOOP: whether it announced new mail; if not, the check is
        reported as an empty poll."""
        m = self.machine
        started = m.clock.seconds()
        try:
            woken, _ = await _idle.probe(conn.client, m.settings.command_timeout, conn.exists)
        except Exception as e:
            raise Lost(as_error(e, errors.PROTOCOL))
        if woken or m.dirty or m.stopping:
            return True
        m.last_check = now = m.clock.seconds()
        m.fetched()
        m.report(SessionResult(account_id=m.account_id, dry_run=m.settings.dry_run,
                               seconds=max(0.0, now - started)))
        return False

    async def _poll_once(self, conn, synced):
        m = self.machine
        self.searched_at = None
        searched_at = m.clock.seconds()
        if not synced:
            try:
                await _idle.probe(conn.client, m.settings.command_timeout, conn.exists)
            except Exception as e:
                raise Lost(as_error(e, errors.PROTOCOL))
        m.dirty = False  # an EXISTS from here on makes another poll
        m.last_check = m.clock.seconds()
        m.polling = defer.maybeDeferred(m.poll, conn)
        try:
            result = await m.polling
        except defer.CancelledError:
            raise Lost(FidoError(errors.TIMEOUT, "poll cancelled"), routine=False)
        except Exception as e:  # a poll never errbacks: a bug, keep holding safe
            m.log.failure("held {account_id}: poll failed", account_id=m.account_id)
            raise Lost(as_error(e, errors.PROTOCOL), routine=False)
        finally:
            m.polling = None
        if conn.client.closed or conn.client.error is not None:
            if result.ok:  # it finished its work, then the server went away
                m.report(result)
                raise Lost(as_error(conn.client.error, errors.PROTOCOL))
            raise Lost(FidoError(result.kind, result.message, result.debug), routine=False)
        if not result.ok and conn.expires_at is not None and token_expired(result.message):
            # a NO naming the expired token: a new login, not an error report
            raise Lost(FidoError(result.kind, result.message, result.debug))
        if result.ok and not result.fetched:
            # nothing left behind (a failed delivery, mail beyond
            # max_search_uids, a dry run's unmarked mail): quiet checks may follow
            self.searched_at = searched_at
        return result
