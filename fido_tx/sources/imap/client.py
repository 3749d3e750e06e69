"""The IMAP protocol side of a mailbox session: an ``IMAP4Client`` subclass.

:class:`FidoIMAP4Client` keeps ``IMAP4Client``'s tagging and command objects
but replaces its input path, because the stock one is unfit for a daemon that
fetches from thousands of servers:

- every command has its own timeout (``reactor.callLater`` and
  ``transport.abortConnection()``), not ``IMAP4Client.timeout``, which
  misbehaves with queued commands;
- message literals must keep arriving at ``min_literal_rate`` bytes/s
  (except while the in-flight byte budget has paused reading: the wait is
  Fido's; see :mod:`fido_tx.schedule.budget`);
- literals are collected as chunks and joined once; a FETCH response is handed
  to the caller as text segments and literal ``bytes`` (no ``charmap`` strings,
  no re-joining the whole response, no copy per parse step);
- untagged responses go to a per-command handler (SEARCH replies with
  thousands of UIDs are split, not run through ``parseNestedParens``);
- lines up to :attr:`FidoIMAP4Client.MAX_LENGTH` (8 MiB) are accepted;
- every failure (timeout, BYE, unexpected close, unparsable response) ends
  the connection and fails the pending command with one
  :class:`~fido_tx.errors.FidoError`; a command sent after that fails at once;
- the last protocol lines (credentials redacted) are kept for debug text.

It also holds the small parsers of IMAP syntax the session needs
(capabilities, SELECT data, FETCH items, UID sets, quoting).
"""

import collections
import re

from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.mail import imap4
from twisted.python import failure

from fido_tx import errors
from fido_tx.errors import FidoError
from fido_tx.scrub import MIN_FORM_LENGTH
from fido_tx.sources.imap.parse import (  # noqa: F401 - re-exported for callers
    SelectInfo,
    _LITERAL_AT_END,
    _needs_literal,
    _RESP_CODE,
    _show,
    astring_parts,
    greeting_capabilities,
    mailbox_name,
    parse_capabilities,
    parse_fetch,
    parse_flag_list,
    parse_search,
    parse_status,
    plain_response,
    quote,
    response_code,
    uid_set,
)
from fido_tx.sources.imap import bounds
from fido_tx.sources.imap.reader import LinearLineReader

#: what ends every line Fido sends (strict writing; lines are read up to LF,
#: see :mod:`fido_tx.sources.imap.reader`)
CRLF = b"\r\n"
_TAGGED = re.compile(rb"([A-Za-z]+)(?: (.*))?\Z", re.S)


class ImapCommandError(imap4.IMAP4Exception):
    """A tagged NO or BAD answer.

    :ivar status: ``b"NO"`` or ``b"BAD"``.
    :ivar text: the rest of the tagged line (with any ``[CODE]``).
    """

    def __init__(self, command, status, text):
        super().__init__(f"{command} failed: {status.decode()} {_show(text)}")
        self.command = command
        self.status = status
        self.text = text

    @property
    def code(self):
        """The response code (``b"AUTHENTICATIONFAILED"``), upper-case, or ``b""``."""
        return response_code(self.text)


# --- the protocol -------------------------------------------------------------


class FidoIMAP4Client(LinearLineReader, imap4.IMAP4Client):
    """One IMAP connection with per-command timeouts and a debug trace.

    Use :meth:`command` for every command (one at a time); wait for
    :attr:`greeting` first.  :meth:`fail` ends the connection with an error.
    """

    #: longest accepted line: a SEARCH reply with ~1 million UIDs
    MAX_LENGTH = 8 * 1024 * 1024
    #: protocol lines kept for debug text
    TRACE_LINES = 20
    #: characters kept of one traced line
    TRACE_WIDTH = 200
    #: seconds between checks of the literal transfer rate
    literal_check_interval = 5.0

    # Bounds (see README "Bounds").  Every byte the server sends is counted
    # against one of them BEFORE it is held: a literal is refused when it is
    # announced, not after it has arrived.  The per-command ones start again
    # at every :meth:`command` (which may override the literal ones).
    #: literal bytes of ONE response, all its literals together (a FETCH
    #: answer may chain any number); a session sets it from max_message_size
    max_literal = 1024 * 1024 * 1024
    #: literal bytes of all the responses to one command; a command that
    #: fetches bodies passes ``literal_total`` (what RFC822.SIZE claimed)
    max_command_literal = 1024 * 1024
    #: literals in one response (a FETCH of BODY[] has one)
    max_response_literals = 64
    #: bytes of the text lines of one response held while its literals arrive
    max_response_text = 1024 * 1024
    #: untagged responses to one command (endless ``* OK`` lines end here)
    max_untagged = 50_000
    #: bytes of all the lines the server sends while one command runs (two
    #: of the longest lines, MAX_LENGTH: a SEARCH of a million UIDs)
    max_untagged_bytes = 16 * 1024 * 1024
    #: UIDs passed on from the SEARCH responses of one command; the rest is
    #: dropped unparsed (``search_ignored`` counts them): fetched next poll
    max_search_uids = 100_000

    def __init__(
        self,
        clock,
        greeting_timeout=30.0,
        command_timeout=60.0,
        min_literal_rate=4096,
    ):
        super().__init__()
        self.clock = clock
        self.greeting_timeout = greeting_timeout
        self.command_timeout = command_timeout
        self.min_literal_rate = min_literal_rate
        # (direction, bytes) or a ready str; formatted only when read
        # (formatting every line cost ~7% of a fetch's CPU time)
        self._trace_lines = collections.deque(maxlen=self.TRACE_LINES)
        #: fires with the greeting's capabilities (frozenset or None)
        self.greeting = defer.Deferred()
        #: fires (with None) when the connection is gone
        self.lost = defer.Deferred()
        self.error = None
        self.closed = False
        #: True once the server greeted with PREAUTH
        self.preauth = False
        #: the server's BYE text, if it said goodbye
        self.bye = None
        #: the text of the server's last tagged/greeting response
        self.last_response = b""
        self.logging_out = False
        self._timer = None
        self._deadline = None
        self._timer_seconds = None
        self._timer_what = ""
        self._segments = None
        self._literal = None
        self._literal_remaining = 0
        self._literal_window = 0
        self._rate_check = None
        self._untagged = None
        #: called with the segments of EVERY untagged response, whatever
        #: command runs (or none): a held connection's watch for EXISTS
        self.observer = None
        self._limits(None, None, None)
        self._reader_init()

    @property
    def deviations(self):
        """Harmless deviations from RFC 3501 read anyway: ``{kind: count}``
        (``bare_lf``: lines ended by LF alone, see the reader)."""
        return {"bare_lf": self.bare_lf_lines} if self.bare_lf_lines else {}

    # -- bounds ----------------------------------------------------------------

    #: ``body_limits(claimed, largest)``: command() keyword arguments bounding a
    #: UID FETCH of bodies by their claimed sizes (see fido_tx.sources.imap.bounds)
    body_limits = staticmethod(bounds.body_limits)
    BODY_SLACK_BYTES = bounds.BODY_SLACK_BYTES
    BODY_SLACK_FRACTION = bounds.BODY_SLACK_FRACTION

    def _limits(self, literal_each, literal_total, literal_caps, what=""):
        """Start the counters of a command (with its own literal bounds)."""
        self._bounds = bounds.CommandBounds(bounds.Limits(
            literal_each=self.max_literal if literal_each is None else literal_each,
            literal_total=self.max_command_literal if literal_total is None else literal_total,
            literal_caps=literal_caps,
            response_literals=self.max_response_literals,
            response_text=self.max_response_text,
            untagged=self.max_untagged,
            untagged_bytes=self.max_untagged_bytes,
            search_uids=self.max_search_uids,
        ), what)

    @property
    def search_ignored(self):
        """UIDs of the last command's SEARCH responses dropped by ``max_search_uids``."""
        return self._bounds.search_ignored

    # -- tracing -----------------------------------------------------------

    #: callable returning the secret's forms (credentials' ``secret_forms``):
    #: removed from traced server lines before they are cut
    scrub_forms = None
    _scrub_bytes = None
    #: what a traced line keeps beyond TRACE_WIDTH until it is shown: room
    #: for a whole secret (a token's SASL encoding is a few KiB) that starts
    #: inside the width, so that scrubbing happens before the cut
    TRACE_SLACK = 8 * 1024

    def _trace(self, direction, line):
        # Kept raw (but bounded) and scrubbed only when shown: the trace is
        # read on failure, while every session traces all its lines; scrubbing
        # each line as it passed cost ~18 us a line and the secret's forms
        # ~0.2 ms a session, for nothing when the session succeeds.
        if len(line) > self.TRACE_WIDTH + self.TRACE_SLACK:
            line = (line[: self.TRACE_WIDTH + self.TRACE_SLACK], len(line))
        self._trace_lines.append((direction, line))

    def _scrubbed(self, line):
        if self.scrub_forms is None:
            return line
        forms = self._scrub_bytes
        if forms is None:
            forms = self._scrub_bytes = tuple(
                f.encode("utf-8") for f in self.scrub_forms() if len(f) >= MIN_FORM_LENGTH)
        for form in forms:
            if form in line:
                line = line.replace(form, b"<redacted>")
        return line

    def _shown(self, line):
        size = len(line) if isinstance(line, bytes) else line[1]
        line = self._scrubbed(line if isinstance(line, bytes) else line[0])
        if size > self.TRACE_WIDTH:
            line = line[: self.TRACE_WIDTH] + b"... (%d bytes)" % size
        return line

    @property
    def trace(self):
        """The last protocol lines, formatted (``"S: * OK ..."``), secrets
        removed before anything is cut."""
        return [t if isinstance(t, str) else f"{t[0]}: {_show(self._shown(t[1]), self.TRACE_WIDTH + 40)}"
                for t in self._trace_lines]

    def debug_lines(self):
        return self.trace

    def sendLine(self, line):
        parts = line.split(b" ", 2)
        if len(parts) == 3 and parts[1].upper() in (b"LOGIN", b"AUTHENTICATE"):
            if parts[1].upper() == b"LOGIN":
                shown = parts[0] + b" LOGIN <redacted>"
            else:
                mech = parts[2].split(b" ", 1)
                shown = parts[0] + b" AUTHENTICATE " + mech[0]
                if len(mech) > 1:
                    shown += b" <redacted>"
            self._trace_lines.append("C: " + _show(shown))
        else:
            self._trace("C", line)
        return self.transport.write(line + CRLF)

    def send_secret(self, line):
        """Send a continuation line that carries credentials (not traced)."""
        self._trace_lines.append("C: <redacted>")
        self.transport.write(line + CRLF)

    # -- timers --------------------------------------------------------------

    # One deadline and one pending timer per connection.  A timer cancelled
    # and created per command, and reset per chunk of a literal, was a
    # reactor heap operation each time; now arming and progress only move
    # the deadline, and the timer, when it fires early, waits for the rest.

    def _arm(self, seconds, what):
        self._timer_seconds = seconds
        self._timer_what = what
        self._deadline = deadline = self.clock.seconds() + seconds
        timer = self._timer
        if timer is None or not timer.active():
            self._timer = self.clock.callLater(seconds, self._timer_fired)
        elif timer.getTime() > deadline:  # sooner than the pending call
            # cancelled and scheduled anew: DelayedCall.reset() to a sooner
            # time searches the reactor's heap linearly, and with thousands
            # of held connections (each with a timer minutes ahead) every
            # command after an IDLE did that: stopping 10,000 took 5 minutes
            timer.cancel()
            self._timer = self.clock.callLater(seconds, self._timer_fired)

    def _disarm(self):
        self._deadline = None  # a pending call finds nothing to do

    def _progress(self):
        if self._deadline is not None:
            self._deadline = self.clock.seconds() + self._timer_seconds

    def _cancel_timer(self):
        """The connection is over: nothing may keep it alive or fire later."""
        self._deadline = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timer_fired(self):
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return
        now = self.clock.seconds()
        if now < deadline:
            self._timer = self.clock.callLater(deadline - now, self._timer_fired)
            return
        self._deadline = None
        self.fail(
            FidoError(
                errors.TIMEOUT,
                f"no response to {self._timer_what} within {self._timer_seconds:g} s",
            )
        )

    def _stop_rate_check(self):
        if self._rate_check is not None and self._rate_check.active():
            self._rate_check.cancel()
        self._rate_check = None

    def _check_rate(self):
        self._rate_check = None
        if self.budget_paused:  # a literal announced after the pause: budget_resume
            return              # starts its window
        rate = self._literal_window / self.literal_check_interval
        if rate < self.min_literal_rate:
            self.fail(
                FidoError(
                    errors.TIMEOUT,
                    f"message data arrived at {rate:.0f} bytes/s, below the "
                    f"minimum of {self.min_literal_rate} bytes/s",
                )
            )
            return
        self._literal_window = 0
        self._rate_check = self.clock.callLater(
            self.literal_check_interval, self._check_rate
        )

    # -- failure and connection state --------------------------------------

    def fail(self, error):
        """End the connection because of ``error`` (the first one wins)."""
        if self.error is None:
            self.error = error
        self._cancel_timer()
        self._stop_rate_check()
        # what the server sent past the failure is never read: drop it now
        self.clearLineBuffer()
        self._literal = self._segments = None
        if self.transport is not None and not self.closed:
            self.transport.abortConnection()

    def connectionMade(self):
        self._arm(self.greeting_timeout, "the connection (server greeting)")

    def connectionLost(self, reason):
        self.closed = True
        self._cancel_timer()
        self._stop_rate_check()
        if self.error is None:
            self.error = self._lost_error(reason)
        err = failure.Failure(self.error)
        if not self.greeting.called:
            self.greeting.errback(err)
        imap4.IMAP4Client.connectionLost(self, err)
        if not self.lost.called:
            self.lost.callback(None)

    def forget(self):
        """The session is over: drop what refers back to it or to pending
        work, so the connection's objects are freed without the collector."""
        self.tls_explain = None
        self._untagged = None
        self.observer = None
        self._literal = None
        self._segments = None

    def _lost_error(self, reason):
        tls = tls_error(reason, getattr(self, "tls_explain", None),
                        getattr(self, "tls_host", None))
        if tls is not None:
            return tls
        if self.logging_out:
            return FidoError(errors.PROTOCOL, "connection closed during LOGOUT")
        if not self.greeting.called:
            return FidoError(
                errors.CONNECT,
                "server closed the connection before its greeting"
                + _reason_suffix(reason),
            )
        if self.bye is not None:
            return FidoError(
                errors.PROTOCOL, f"server closed the connection: BYE {_show(self.bye)}"
            )
        return FidoError(
            errors.PROTOCOL,
            "server closed the connection unexpectedly" + _reason_suffix(reason),
        )

    def lineLengthExceeded(self, line):
        self.fail(
            FidoError(
                errors.PROTOCOL,
                f"server sent a line longer than {self.MAX_LENGTH} bytes",
            )
        )

    # -- input ---------------------------------------------------------------

    def dataReceived(self, data):
        if self.error is not None:
            return
        try:
            self._receive(data)
        except FidoError as e:
            self.fail(e)
        except Exception as e:
            self.fail(
                FidoError(
                    errors.PROTOCOL,
                    f"could not parse the server's response ({type(e).__name__}: {e})",
                )
            )

    def lineReceived(self, line):
        if self.error is not None:
            return
        self._progress()
        self._trace("S", line)
        self._bounds.count_line(len(line) + 2)
        m = _LITERAL_AT_END.search(line)
        if m is not None:
            size = int(m.group(1))
            texts = (self._segments[0::2] if self._segments else []) + [line]
            self._bounds.admit_literal(texts, size)
            if self._segments is None:
                self._segments = []
            self._segments.append(line)
            self._literal = []
            self._literal_remaining = size
            self._literal_window = 0
            if self._literal_remaining > self.min_literal_rate * self.literal_check_interval:
                self._rate_check = self.clock.callLater(
                    self.literal_check_interval, self._check_rate
                )
            self.line_mode = 0
            if self._literal_remaining == 0:
                self._end_literal()
            return
        if self._segments is not None:
            self._segments.append(line)
            segments, self._segments = self._segments, None
        else:
            segments = [line]
        self._bounds.response_done()
        self._dispatch(segments)

    def rawDataReceived(self, data):  # not used: _scan reads literals
        self._receive(data)

    def _take_literal(self, chunk):
        self._progress()
        self._literal.append(chunk)
        self._literal_remaining -= len(chunk)
        self._literal_window += len(chunk)

    def _end_literal(self):
        chunks, self._literal = self._literal, None
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        del chunks
        self._stop_rate_check()
        self._trace_lines.append(f"S: <literal {len(body)} bytes>")
        self._segments.append(body)
        self._literal_remaining = 0
        self.line_mode = 1

    def _dispatch(self, segments):
        first = segments[0]
        parts = first.split(b" ", 1)
        tag = parts[0]
        rest0 = parts[1] if len(parts) > 1 else b""
        segments[0] = rest0
        if self.state is None:
            self._greeted(tag, rest0)
        elif tag == b"+":
            self._continuation(rest0)
        elif tag == b"*":
            self._untagged_response(segments)
        else:
            if len(segments) > 1:
                raise FidoError(errors.PROTOCOL, "literal in a tagged response")
            self._tagged(tag, rest0)

    def _greeted(self, tag, rest):
        self._disarm()
        m = _TAGGED.match(rest)
        status = m.group(1).upper() if m and tag == b"*" else b""
        text = (m.group(2) or b"") if m else rest
        self.last_response = rest
        if status == b"OK":
            self.state = "unauth"
        elif status == b"PREAUTH":
            self.state = "auth"
            self.preauth = True
        elif status == b"BYE":
            self.bye = text
            raise FidoError(
                errors.CONNECT, f"server refused the session: BYE {_show(text)}"
            )
        else:
            raise FidoError(
                errors.PROTOCOL, f"not an IMAP server greeting: {_show(tag + b' ' + rest)}"
            )
        self.greeting.callback(greeting_capabilities(text))

    def _continuation(self, rest):
        cmd = self.tags.get(self.waiting) if self.waiting else None
        if cmd is None or cmd.continuation is None:
            raise FidoError(errors.PROTOCOL, "unexpected continuation request")
        cmd.continuation(rest)

    def _untagged_response(self, segments):
        self._bounds.count_untagged()
        text = segments[0]
        if len(segments) == 1 and text[:4].upper() == b"BYE " or text.upper() == b"BYE":
            self.bye = text[4:]
            return
        observer = self.observer
        if observer is not None:
            observer(segments)
        handler = self._untagged
        if handler is None:
            return
        if len(segments) == 1 and text[:6].upper() == b"SEARCH":
            text = self._bounds.bound_search(text)
            if text is None:
                return
            segments = [text]
        handler(segments)

    def _tagged(self, tag, rest):
        cmd = self.tags.pop(tag, None) if self.tags is not None else None
        if cmd is None:
            raise FidoError(
                errors.PROTOCOL, f"response with an unknown tag: {_show(tag + b' ' + rest)}"
            )
        self.waiting = None
        self.last_response = rest
        m = _TAGGED.match(rest)
        status = m.group(1).upper() if m else b""
        text = (m.group(2) or b"") if m else b""
        d, cmd.defer = cmd.defer, None
        if status == b"OK":
            d.callback(text)
        elif status in (b"NO", b"BAD"):
            d.errback(ImapCommandError(cmd.command.decode("ascii", "replace"), status, text))
        else:
            err = FidoError(errors.PROTOCOL, f"bad tagged response: {_show(rest)}")
            self.fail(err)
            d.errback(err)  # the command is no longer in self.tags: fail it here

    # -- output ----------------------------------------------------------------

    def sendCommand(self, cmd):
        if self.closed or self.error is not None:
            cmd.defer = defer.Deferred()
            cmd.defer.errback(failure.Failure(self.error or _closed()))
            return cmd.defer
        if self.waiting:
            raise RuntimeError("FidoIMAP4Client runs one command at a time")
        return super().sendCommand(cmd)

    def command(self, name, args=None, untagged=None, continuation=None, timeout=None, what=None,
                literal_each=None, literal_total=None, literal_caps=None):
        """Send one command; fire with the tagged OK text.

        :param untagged: called with the segments of each untagged response
            (``[text]``, or ``[text, literal, text, ...]``) while it runs;
            SEARCH responses arrive cut to ``max_search_uids`` UIDs.
        :param continuation: called with the text of each ``+`` request.
        :param literal_each: literal bytes of one response (default
            :attr:`max_literal`); ``literal_total``: of all the responses
            (default :attr:`max_command_literal`); ``literal_caps``:
            ``{uid: bytes}``, the largest literal of a response naming that
            UID before its literal.  :meth:`body_limits` computes all three
            from the claimed sizes.
        :return: Deferred; errbacks with :class:`ImapCommandError` on NO/BAD,
            with :class:`FidoError` when the connection fails.
        """
        cmd = imap4.Command(name, args)
        cmd.continuation = continuation
        if what is None:
            what = name.decode("ascii", "replace")
            if name == b"UID" and args:
                what += " " + args.split(b" ", 1)[0].decode("ascii", "replace")
        self._untagged = untagged
        self._timer_what = what
        self._limits(literal_each, literal_total, literal_caps, what)
        d = self.sendCommand(cmd)
        if not d.called:
            self._arm(self.command_timeout if timeout is None else timeout, what)

        def done(result):
            self._disarm()
            self._untagged = None
            return result

        d.addBoth(done)
        return d

    # -- the in-flight byte budget pauses reading ------------------------------

    #: reading is paused by the in-flight budget (see budget_pause)
    budget_paused = False
    _paused_deadline = False

    def budget_pause(self):
        """The in-flight budget is full: stop reading until
        :meth:`budget_resume`.  The wait is Fido's, not the server's: the
        command's deadline and the literal rate check stop meanwhile."""
        if self.budget_paused or self.closed:
            return
        self.budget_paused = True
        self._paused_deadline = self._deadline is not None
        self._deadline = None  # a pending timer call finds nothing to do
        self._stop_rate_check()
        self.transport.pauseProducing()

    def budget_resume(self):
        """Bytes were released: read again, with a fresh deadline and rate window."""
        if not self.budget_paused:
            return
        self.budget_paused = False
        if self.closed or self.error is not None:
            return
        if self._paused_deadline and self.waiting:
            self._arm(self._timer_seconds, self._timer_what)
        if not self.line_mode and \
                self._literal_remaining > self.min_literal_rate * self.literal_check_interval:
            self._literal_window = 0
            self._rate_check = self.clock.callLater(self.literal_check_interval,
                                                    self._check_rate)
        self.transport.resumeProducing()

    def clear_trace(self):
        """Forget the traced lines: a held connection waiting in IDLE keeps
        no debug text of its login (about 3 KiB per connection)."""
        self._trace_lines.clear()

    def rearm(self, seconds, what):
        """Give the running command a new deadline: ``seconds`` of silence
        from now (IDLE waits minutes for its answer, then seconds for DONE's)."""
        self._arm(seconds, what)

    def start_tls(self, context_factory):
        """Switch the transport to TLS (after a tagged OK to STARTTLS).

        Plain text the server sent after its OK would be read as if it came
        through TLS (STARTTLS response injection): refuse it.
        """
        leftover = self.clearLineBuffer()
        if leftover:
            raise FidoError(errors.TLS, "server sent data after its STARTTLS response")
        self.transport.startTLS(context_factory)
        self.startedTLS = True


def _closed():
    return FidoError(errors.PROTOCOL, "connection closed")


def _reason_suffix(reason):
    if reason is None or reason.check(ierror.ConnectionDone):
        return ""
    return f" ({reason.getErrorMessage()})"


def tls_error(reason, explain=None, host=None):
    """A :class:`FidoError` of kind ``tls`` for a TLS failure, else ``None``.

    :param explain: optional callable returning why the certificate chain
        was not trusted (``"self-signed certificate"``) or ``None``.
    """
    if reason is None:
        return None
    try:
        from OpenSSL import SSL
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover
        return None
    if reason.check(VerificationError):
        return FidoError(
            errors.TLS,
            "certificate does not match host" + (f" {host!r}" if host else ""),
            debug=f"certificate verification: {reason.getErrorMessage()}",
        )
    if reason.check(SSL.Error):
        text = _ssl_text(reason.value)
        if "certificate verify failed" in text:
            why = None
            if explain is not None:
                try:
                    why = explain()
                except Exception:
                    why = None
            return FidoError(
                errors.TLS, "certificate verify failed" + (f": {why}" if why else "")
            )
        return FidoError(errors.TLS, f"TLS handshake failed: {text}")
    return None


def _ssl_text(exc):
    try:
        parts = [e[2] for e in exc.args[0] if e and e[2]]
    except (IndexError, TypeError):
        parts = []
    return "; ".join(parts) or str(exc) or type(exc).__name__
