"""Between checks on a held connection: IDLE (re-issued every
``idle_refresh``, then a NOOP proves the server still answers), or a plain
wait on the connection when the server or the account has no IDLE; new mail
announced meanwhile wakes a fetch.

One :class:`HeldWait` per :class:`~fido_tx.sources.imap.held.HeldAccount`,
which enters the state (idling or waiting) before it calls in here.
"""

from twisted.internet import defer

from fido_tx import errors
from fido_tx.sources.imap import idle as _idle
from fido_tx.sources.imap.client import ImapCommandError
from fido_tx.sources.imap.heldconn import Lost, as_error


class HeldWait:
    """How one held account waits between checks.

    :param machine: the :class:`~fido_tx.sources.imap.held.HeldAccount`
        (its settings, clock, pool, log, ``next_wait()``, ``sleep()``, ``wake()``
        and ``dirty`` flag).
    """

    def __init__(self, machine):
        self.machine = machine
        #: the :class:`~fido_tx.sources.imap.idle.Idle` in progress
        self.idler = None
        #: the server refused IDLE: plain waits from now on
        self.no_idle = False

    def uses_idle(self, conn):
        """Whether this connection waits in IDLE (else: a plain wait)."""
        return (self.machine.settings.idle and not self.no_idle
                and _idle.supports_idle(conn.capabilities))

    def interrupt(self):
        """End IDLE now (stop)."""
        if self.idler is not None:
            self.idler.stop()

    async def idle(self, conn):
        """One IDLE, until woken, refreshed or stopped; a refresh probes.

        Raises :class:`~fido_tx.sources.imap.heldconn.Lost` when the
        connection fails; a server refusing IDLE turns it off for good.
        """
        m, settings = self.machine, self.machine.settings
        counted = []

        def on_idling():
            counted.append(True)
            m.pool.idle_started()

        refresh = min(settings.idle_refresh, m.next_wait())
        # the refresh timer on the shared tick: a check due then goes out
        # with the other accounts' checks of that tick
        self.idler = _idle.Idle(conn.client, m.ticker or m.clock, refresh,
                                settings.command_timeout,
                                exists=conn.exists, wake_on_unseen=settings.wake_on_unseen,
                                on_idling=on_idling)
        try:
            end = await self.idler.start()
        except ImapCommandError as e:
            m.log.info("held {account_id}: server refused IDLE ({why}); polling the "
                       "held connection every {interval:g} s", account_id=m.account_id,
                       why=str(e), interval=settings.poll_interval)
            self.no_idle = True
            return
        except Exception as e:
            raise Lost(as_error(e, errors.PROTOCOL))
        finally:
            self.idler = None
            if counted:
                m.pool.idle_ended()
        if m.stopping:
            return
        if end.woken:
            m.dirty = True
        elif m.next_wait() > 0:  # a refresh: is the server still there?
            try:
                woken, exists = await _idle.probe(conn.client, settings.command_timeout,
                                                  conn.exists)
            except Exception as e:
                raise Lost(as_error(e, errors.PROTOCOL))
            m.dirty = m.dirty or woken

    async def plain(self, conn):
        """No IDLE: wait on the held connection until the next check (an
        unsolicited EXISTS cuts it short)."""
        m = self.machine
        try:
            await m.sleep_until_check()
        except defer.CancelledError:  # woken early by an unsolicited EXISTS
            pass
        if conn.client.closed:
            raise Lost(as_error(conn.client.error, errors.PROTOCOL))

    def observer(self, conn):
        """Watch every untagged response of the held connection."""
        machine = self.machine

        def observe(segments):
            what, number = _idle.parse_untagged(segments[0])
            if what == b"EXISTS":
                if conn.exists is None or number > conn.exists:
                    machine.wake()
                conn.exists = number
            elif what == b"RECENT" and number > 0:
                machine.wake()
            elif what == b"EXPUNGE" and conn.exists:
                conn.exists -= 1

        return observe
