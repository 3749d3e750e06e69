"""The sysadmin's lines about accounts: one per session, one per change of state.

Each line carries its numbers as format fields (``account_id``, ``outcome``,
``messages``, ``bytes``, ``marked``, ``seconds``, ``kind``, ``error``,
``retry_in``) so the JSON log format has them as fields (never a field
called ``message``: the JSON format uses that for the whole line).
"""

from fido_tx import errors
from fido_tx.observe.transitions import OK
from fido_tx.timefmt import iso_utc

__all__ = ["SessionLog"]


class SessionLog:
    """Writes the session and state-change lines to ``log``."""

    def __init__(self, log):
        self.log = log

    def session(self, account_id, result, dry, retry_in=None):
        """The one line of a session (``retry_in``: seconds, for a failure)."""
        suffix = " (dry run)" if dry else ""
        fields = dict(
            account_id=account_id,
            session_id=result.session_id,
            outcome=OK if result.ok else result.kind,
            kind=result.kind,
            messages=result.fetched,
            bytes=result.bytes,
            marked=result.marked,
            seconds=round(result.seconds, 3),
            too_large=len(result.too_large),
            dry_run=dry,
        )
        extra = ", {too_large} too large left on the server" if result.too_large else ""
        # the session's id (s=3f9a2c) on its summary line: grep gives its whole story
        head = "{account_id} s={session_id}" if result.session_id else "{account_id}"
        if result.ok:
            self.log.info(
                head + " ok: {messages} messages, {bytes} bytes, marked {marked}, "
                "{seconds:.2f} s" + extra + suffix,
                **fields,
            )
            return
        fields["error"] = result.message
        fields["retry_in"] = None if retry_in is None else round(retry_in)
        tail = "; retry in {retry_in} s" if retry_in is not None else ""
        if result.fetched:
            tail = ", after {messages} messages, {bytes} bytes, marked {marked}" + tail
        self.log.info(
            head + " failed ({kind}): {error}" + tail + extra + suffix,
            **fields,
        )

    def change(self, account_id, old, new, result):
        """The account's state changed from ``old`` (None: new) to ``new``."""
        old_state = old.state if old is not None else "new"
        fields = dict(account_id=account_id, old_state=old_state, state=new.state, kind=result.kind)
        if result.ok:
            if old is None:
                return  # a new account that works: the session line says it all
            self.log.info(
                "{account_id} state {old_state} -> ok: working again after {failures} failed "
                "session(s) since {failing_since}",
                failures=old.failures,
                failing_since=iso_utc(old.failing_since) if old.failing_since else "?",
                **fields,
            )
        else:
            # a redis result is the sink's problem, reported once per instance
            level = self.log.info if result.kind == errors.REDIS else self.log.warn
            level(
                "{account_id} state {old_state} -> {state}: {error}",
                error=result.message,
                **fields,
            )
