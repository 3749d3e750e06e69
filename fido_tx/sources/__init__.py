"""Where mail comes from: one module per source, picked by the account's
``source`` field through :data:`SOURCES` (mail_room's delivery registry is
the example: a new source is a new file and one line here).

Each source module defines ``build(account, ctx, handle=None) -> ISource``
(:class:`fido_tx.interfaces.ISource`: ``poll() -> Deferred[SessionResult]``)
where ``ctx`` is the :class:`SourceContext` the composition root builds once
and ``handle`` the scheduler's :class:`~fido_tx.schedule.sessions.SessionHandle`
(a session that keeps its connection calls ``handle.release_slot()``).
"""

import importlib

import attr

__all__ = ["SOURCES", "OnDemand", "SourceContext", "make_session"]

#: source name -> module path (imported on first use)
SOURCES = {
    "imap": "fido_tx.sources.imap",
    "memory": "fido_tx.sources.memory",
    "graph": "fido_tx.sources.graph",
}


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SourceContext:
    """What every session of every source shares (built by the composition root)."""

    reactor: object
    #: the :class:`~fido_tx.interfaces.ISink` messages go to
    sink: object
    #: :class:`fido_tx.config.ImapSettings` (timeouts, batches, size limits, keywords)
    settings: object
    #: the shared :class:`~fido_tx.schedule.budget.ByteBudget` (or ``None``)
    budget: object = None
    #: the shared :class:`~fido_tx.schedule.pacer.StartPacer` (or ``None``)
    pacer: object = None
    #: IMAP: the shared :class:`~fido_tx.sources.imap.connect.Connector`
    connector: object = None
    #: ``f(account) -> ICredentials`` (default :func:`fido_tx.credentials.for_account`)
    credentials: object = None
    dry_run: bool = False
    #: whether anything reads debug events (per-step lines are skipped if not)
    debug: bool = True
    #: a :class:`twisted.logger.Logger` (``None``: the source's own)
    log: object = None
    #: the memory source's :class:`~fido_tx.sources.memory.MemoryMailboxes`
    memory: object = None
    #: IMAP: the :class:`~fido_tx.sources.imap.holding.HeldConnections`
    #: (``None``: no held connections, every poll logs in)
    held: object = None
    #: Graph: the shared :class:`~fido_tx.sources.graph.GraphShared` (HTTP pool,
    #: per-mailbox gates, the Redis connection for delta links), or an
    #: :class:`OnDemand` that builds it for the first Graph session
    graph: object = None
    #: IMAP: the :class:`~fido_tx.sources.imap.identity.Epochs` (the
    #: UIDVALIDITY each mailbox was last polled in; ``None``: unknown, so
    #: every poll checks new UIDs against the messages stored before)
    epochs: object = None
    #: IMAP: the :class:`~fido_tx.interfaces.IMailboxPositions` of accounts with
    #: ``select = "new"`` or ``start_from = "now"`` (``None``: only a dry run
    #: may poll those)
    positions: object = None


class OnDemand:
    """A part shared by one source's sessions, built by ``make()`` for the
    first session that asks (:meth:`get`): a daemon without Graph accounts
    never imports the Graph and HTTP client code (issue 15: memory)."""

    def __init__(self, make):
        self._make = make
        #: the part once built, else ``None``
        self.value = None

    def get(self):
        if self.value is None:
            self.value = self._make()
        return self.value


def make_session(account, ctx, handle=None):
    """A new :class:`~fido_tx.interfaces.ISource` session for ``account``.

    :raise KeyError: for a source not in :data:`SOURCES` (the accounts
        parser refuses those first).
    """
    build = _builders.get(account.source)
    if build is None:  # imported for the first account of that source only
        build = _builders[account.source] = importlib.import_module(
            SOURCES[account.source]).build
    return build(account, ctx, handle)


#: source name -> its module's ``build``, once imported (``import_module``
#: per session was a fifth of the cost of making one)
_builders = {}
