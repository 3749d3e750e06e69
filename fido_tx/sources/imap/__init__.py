"""The IMAP source: ``parse`` (IMAP syntax), ``client`` (the protocol),
``connect`` (endpoints, TLS), ``login`` (to a logged-in connection), ``poll``
(one poll of a mailbox) and ``session`` (login, poll, logout)."""


def build(account, ctx, handle=None):
    """The :data:`fido_tx.sources.SOURCES` factory: an :class:`ImapSession`,
    or for an account with ``idle = true`` run by the scheduler (``handle``)
    with held connections on (``ctx.held``), a
    :class:`~fido_tx.sources.imap.holding.HeldSession`."""
    from fido_tx.sources.imap.session import ImapSession

    if handle is not None and account.idle and ctx.held is not None:
        from fido_tx.sources.imap.holding import HeldSession

        return HeldSession(account, ctx, handle, ctx.held,
                           fresh=lambda: build(account, ctx).poll())
    return ImapSession(
        ctx.reactor, account, ctx.sink, ctx.settings,
        connector=ctx.connector,  # the session makes its own when there is none
        credentials_factory=ctx.credentials, dry_run=ctx.dry_run, log=ctx.log, budget=ctx.budget,
        pacer=ctx.pacer, debug=ctx.debug, handle=handle, positions=ctx.positions,
        epochs=ctx.epochs,
    )
