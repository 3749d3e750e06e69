"""The value a mailbox session ends with."""

import attr


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SessionResult:
    """What one mailbox session did.

    ``kind`` is ``None`` when the session succeeded, else an error kind from
    :mod:`fido_tx.errors`.  A session never raises: every failure ends as a
    result with a kind, so the scheduler always gets the account back.
    """

    account_id: str
    kind: str | None = None
    message: str = ""
    debug: str = ""
    #: messages newly confirmed by the sink in this session
    fetched: int = 0
    #: bytes of ``raw`` of those messages
    bytes: int = 0
    #: messages marked (seen/deleted/moved) on the server
    marked: int = 0
    #: UIDs left on the server because they are over ``max_message_size``
    too_large: tuple = ()
    #: wall seconds from connect to close
    seconds: float = 0.0
    #: True when the session ran in dry-run mode
    dry_run: bool = False
    #: harmless protocol deviations the server made and Fido read anyway:
    #: ``(("bare_lf", lines), ...)``, sorted (counted in the metrics)
    deviations: tuple = ()
    #: the short random id on every log line of the session (``3f9a2c``)
    session_id: str = ""
    #: True when the source had nothing to do this turn (e.g. a held
    #: connection polls instead): not backed off, not reported, not counted
    skipped: bool = False
    #: seconds the delivery asked to be left alone (``throttled`` with a
    #: Retry-After): the next session waits that long instead of the backoff
    retry_after: float | None = None

    @property
    def ok(self):
        return self.kind is None
