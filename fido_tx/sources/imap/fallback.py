"""Polling on fresh connections while holding one is refused ("too many
connections", ``max_connections_per_host``): an ordinary session every
``poll_interval`` for ``fallback_retry`` seconds, then holding is tried again.

One :class:`Fallback` per :class:`~fido_tx.sources.imap.held.HeldAccount`,
which enters the ``fallback`` state before it calls :meth:`Fallback.run`.
"""


from twisted.internet import defer


class Fallback:
    """One held account's spell of fresh-connection polling.

    :param machine: the :class:`~fido_tx.sources.imap.held.HeldAccount`
        (its settings, clock, pool, log, ``poll_fresh``, ``report``,
        ``take_slot()``, ``wait_for()`` and ``sleep()``).
    """

    def __init__(self, machine):
        self.machine = machine
        #: clock time the spell ends, or None when holding
        self.until = None

    @property
    def active(self):
        return self.until is not None

    def start(self, why):
        """Poll with fresh connections from now on, for ``fallback_retry`` s."""
        m = self.machine
        m.log.info("held {account_id}: {why}; polling with fresh connections for "
                   "{seconds:g} s", account_id=m.account_id, why=why,
                   seconds=m.settings.fallback_retry)
        self.until = m.clock.seconds() + m.settings.fallback_retry

    async def run(self):
        """Poll until the spell ends (or stop() interrupts a wait)."""
        m = self.machine
        m.pool.fallback += 1
        try:
            while m.clock.seconds() < self.until:
                if m.poll_fresh is not None:
                    await self._poll_once()
                await m.sleep(min(m.settings.poll_interval,
                                  self.until - m.clock.seconds()))
        finally:
            m.pool.fallback -= 1
        self.until = None

    async def _poll_once(self):
        m = self.machine
        release = await m.take_slot()
        m.polling = defer.maybeDeferred(m.poll_fresh)
        try:
            m.report(await m.wait_for(m.polling))
        finally:
            m.polling = None
            if release is not None:
                release()
