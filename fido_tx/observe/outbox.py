"""Hands a report to the reporter, or logs what a dry run would have reported.

The one way the status side sends a report, per account or about the whole
instance: never raises (a broken reporter is logged), never sends in dry run.
"""

from fido_tx.timefmt import iso_utc

__all__ = ["ReportOutbox"]


class ReportOutbox:
    """:param reporter: has ``report(account_id, kind, message, debug,
    occurred_at, secrets=())``; may be None (reports go nowhere)."""

    def __init__(self, reporter, log):
        self._reporter = reporter
        self.log = log

    def send(self, account_id, kind, message, debug, now, dry, secrets):
        if dry:
            self.log.info(
                "{account_id}: dry run, not reported: {kind}: {error}",
                account_id=account_id, kind=kind, error=message,
            )
            return
        if self._reporter is None:
            return
        try:
            self._reporter.report(
                account_id, kind, message, debug, occurred_at=iso_utc(now), secrets=secrets
            )
        except Exception:
            self.log.failure("reporter failed for {account_id}", account_id=account_id)
