"""How a session's end becomes a SessionResult, and the observers told about it.

A session is expected to end with a :class:`~fido_tx.outcome.SessionResult`;
anything else (an errback, another type) is a bug in the session, logged
with its traceback and counted as a ``protocol`` failure, so the account
is never lost.  A session the scheduler cancelled has no result.
"""

from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python import failure as _failure

from fido_tx import errors
from fido_tx.outcome import SessionResult

__all__ = ["ResultObservers", "session_result"]

log = Logger(namespace="fido_tx.schedule.scheduler")


def session_result(outcome, session):
    """The :class:`SessionResult` of a session that ended with ``outcome``
    (its Deferred's result or Failure), or None when the scheduler
    cancelled it."""
    if isinstance(outcome, SessionResult):
        return outcome
    if not isinstance(outcome, _failure.Failure):
        try:
            raise TypeError(f"run_session returned {type(outcome).__name__}, not SessionResult")
        except TypeError:
            outcome = _failure.Failure()
    if session.cancelled and outcome.check(defer.CancelledError):
        return None
    log.failure(
        "session for {account_id} failed with an unexpected error "
        "(a bug in the session; counted as a protocol failure)",
        outcome, level=LogLevel.error, account_id=session.account.id,
    )
    return SessionResult(
        account_id=session.account.id,
        kind=errors.PROTOCOL,
        message=f"internal error: {outcome.type.__name__}: {outcome.getErrorMessage()}",
        debug=outcome.getTraceback(),
    )


class ResultObservers:
    """``observer(account, result)`` callables, each called after every
    session that ends with a result; one that raises is logged and ignored."""

    def __init__(self):
        self._observers = []

    def add(self, observer):
        self._observers.append(observer)

    def remove(self, observer):
        self._observers.remove(observer)

    def notify(self, account, result):
        for observer in list(self._observers):
            try:
                observer(account, result)
            except Exception:
                log.failure("result observer {observer!r} failed for {account_id}",
                            level=LogLevel.error, observer=observer,
                            account_id=account.id)
