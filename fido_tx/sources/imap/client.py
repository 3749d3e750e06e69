"""One IMAP connection: commands sent one at a time, each with its deadline and bounds.

:class:`FidoIMAP4Client` is a Twisted protocol written for a daemon that
fetches from thousands of servers (it replaced an ``IMAP4Client`` subclass:
Fido used none of that class's commands or parsing, and its input path and
timeouts were unfit):

- commands through :meth:`~FidoIMAP4Client.command`, firing with the
  tagged OK text; a NO or BAD is an :class:`ImapCommandError`.  A command
  given while another runs is written at once and queued (RFC 3501 sec 5.5
  pipelining): it *runs* (its deadline, bounds and untagged handler apply)
  from the tagged answer of the one before, since a server answers in
  order.  A command that may need a continuation (``+``) is never queued;
  a ``+`` while a queued command waits is a protocol error;
- every command has its own deadline and bounds (one timer per connection,
  :mod:`~fido_tx.sources.imap.deadline`; every byte the server sends counted
  before it is held, :mod:`~fido_tx.sources.imap.bounds`); message literals
  must keep arriving at ``min_literal_rate`` bytes/s (except while the
  in-flight byte budget has paused reading: the wait is Fido's; see
  :mod:`fido_tx.schedule.budget`);
- responses are read by :class:`~fido_tx.sources.imap.responses.ResponseReader`
  (literals collected as chunks and joined once, a FETCH response handed on
  as text segments and literal ``bytes``, untagged responses to a
  per-command handler);
- every failure (timeout, BYE, unexpected close, unparsable response) ends
  the connection and fails the pending command with one
  :class:`~fido_tx.errors.FidoError`; a command sent after that fails at once;
- the last protocol lines (credentials redacted) are kept for debug text
  (:mod:`~fido_tx.sources.imap.trace`).

The small parsers of IMAP syntax are in :mod:`~fido_tx.sources.imap.parse`
and re-exported here.
"""

from twisted.internet import defer, protocol
from twisted.internet import error as ierror
from twisted.python import failure

from fido_tx import errors
from fido_tx.errors import FidoError
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
from fido_tx.sources.imap.deadline import Deadline, LiteralRate
from fido_tx.sources.imap.pipeline import CommandQueue
from fido_tx.sources.imap.trace import TracedLines
from fido_tx.sources.imap.responses import ImapCommandError, ResponseReader
from fido_tx.sources.imap.tlserror import tls_error  # noqa: F401 - re-exported
from fido_tx.sources.imap.trace import ProtocolTrace

#: what ends every line Fido sends (strict writing; lines are read up to LF,
#: see :mod:`fido_tx.sources.imap.reader`)
CRLF = b"\r\n"


class FidoIMAP4Client(ResponseReader, TracedLines, protocol.Protocol):
    """One IMAP connection with per-command timeouts and a debug trace.

    Use :meth:`command` for every command (queued behind a running one); wait for
    :attr:`greeting` first.  :meth:`fail` ends the connection with an error.
    """

    #: longest accepted line: a SEARCH reply with ~1 million UIDs
    MAX_LENGTH = 8 * 1024 * 1024
    #: protocol lines kept for debug text, and the characters shown of one
    TRACE_LINES = ProtocolTrace.LINES
    TRACE_WIDTH = ProtocolTrace.WIDTH
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

    #: ``"unauth"`` or ``"auth"`` once greeted
    state = None
    #: True once :meth:`start_tls` switched the transport
    startedTLS = False
    #: the running command's tag, or None
    waiting = None
    #: True once the server answered a queued command before the one
    #: running: it dropped a pipelined command
    pipeline_dropped = False

    def __init__(
        self,
        clock,
        greeting_timeout=30.0,
        command_timeout=60.0,
        min_literal_rate=4096,
    ):
        self.clock = clock
        self.greeting_timeout = greeting_timeout
        self.command_timeout = command_timeout
        self.min_literal_rate = min_literal_rate
        self._trace = ProtocolTrace()
        self._deadline = Deadline(clock, self._expired)
        self._rate = LiteralRate(clock, min_literal_rate, self.literal_check_interval,
                                 self._too_slow)
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
        self.line_mode = 1
        self._tag_number = 0
        self._command = None  # (name, Deferred, continuation) of ``waiting``
        #: commands written after ``waiting``, not running yet: (tag, name,
        #: Deferred, untagged, timeout, what, literal bounds)
        self._queued = CommandQueue()
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
        self._bounds = bounds.command_bounds(
            (self.max_literal, self.max_command_literal, self.max_response_literals,
             self.max_response_text, self.max_untagged, self.max_untagged_bytes,
             self.max_search_uids),
            literal_each, literal_total, literal_caps, what)

    @property
    def search_ignored(self):
        """UIDs of the last command's SEARCH responses dropped by ``max_search_uids``."""
        return self._bounds.search_ignored

    # -- timers --------------------------------------------------------------

    def _expired(self, what, seconds):
        self.fail(FidoError(errors.TIMEOUT, f"no response to {what} within {seconds:g} s"))

    def _too_slow(self, rate):
        self.fail(FidoError(
            errors.TIMEOUT,
            f"message data arrived at {rate:.0f} bytes/s, below the "
            f"minimum of {self.min_literal_rate} bytes/s",
        ))

    def rearm(self, seconds, what):
        """Give the running command a new deadline: ``seconds`` of silence
        from now (IDLE waits minutes for its answer, then seconds for DONE's)."""
        self._deadline.arm(seconds, what)

    # -- failure and connection state --------------------------------------

    def fail(self, error):
        """End the connection because of ``error`` (the first one wins)."""
        if self.error is None:
            self.error = error
        self._deadline.cancel()
        self._rate.stop()
        # what the server sent past the failure is never read: drop it now
        self.clearLineBuffer()
        self._literal = self._segments = None
        if self.transport is not None and not self.closed:
            self.transport.abortConnection()

    def connectionMade(self):
        self._write = self.transport.write
        self._deadline.arm(self.greeting_timeout, "the connection (server greeting)")

    def connectionLost(self, reason):
        self.closed = True
        self.connected = 0
        self._deadline.cancel()
        self._rate.stop()
        # the timers call back into this object: cut that cycle, so the
        # connection is freed by reference counting, not the collector
        self._deadline.expired = self._rate.too_slow = _ignore
        if self.error is None:
            self.error = lost_error(self, reason)
        err = failure.Failure(self.error)
        if not self.greeting.called:
            self.greeting.errback(err)
        if self.waiting is not None:
            d = self._command[1]
            self._finished()
            d.errback(err)
        self._queued.fail(self.error)
        if not self.lost.called:
            self.lost.callback(None)

    def forget(self):
        """The session is over: drop what refers back to it or to pending
        work, so the connection's objects are freed without the collector."""
        self._untagged = None
        self.observer = None
        self._literal = None
        self._segments = None

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

    # -- output ----------------------------------------------------------------

    def sendLine(self, line):
        self._trace.sent(line)
        return self._write(line + CRLF)

    def send_secret(self, line):
        """Send a continuation line that carries credentials (not traced)."""
        self._trace.note("C: <redacted>")
        self._write(line + CRLF)

    def command(self, name, args=None, untagged=None, continuation=None, timeout=None, what=None,
                literal_each=None, literal_total=None, literal_caps=None, pipelined=False):
        """Send one command; fire with the tagged OK text.

        While another command runs, the line is written at once and the
        command queued behind it (pipelining, see the module docstring); it
        must not take a ``continuation`` then.  With ``pipelined`` the
        queued command may also be answered *before* the running one (RFC
        3501 sec 5.5: a server may run commands that are not ambiguous side
        by side; Fido asks it only of a ``UID FETCH`` written behind a
        ``UID STORE +FLAGS.SILENT``): its bounds apply at once and every
        untagged response goes to its handler as well as the running one's.
        One such command at a time.

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
        d = defer.Deferred()
        if self.closed or self.error is not None:
            d.errback(failure.Failure(self.error or _closed()))
            return d
        if self.waiting is not None and continuation is not None:
            raise RuntimeError("FidoIMAP4Client queues no command that takes a continuation")
        if what is None:
            what = name.decode("ascii", "replace")
            if name == b"UID" and args:
                what += " " + args.split(b" ", 1)[0].decode("ascii", "replace")
        self._tag_number += 1
        tag = b"%04X" % self._tag_number
        timeout = self.command_timeout if timeout is None else timeout
        literals = (literal_each, literal_total, literal_caps)
        if self.waiting is None:
            self._run(tag, name, d, continuation, untagged, timeout, what, literals)
        else:
            self._queued.add((tag, name, d, untagged, timeout, what, literals), pipelined)
            if pipelined:
                self._limits(*literals, what)  # its literals may come first
        self.sendLine(tag + b" " + name if args is None else b" ".join((tag, name, args)))
        return d

    @property
    def queued(self):
        """Commands written and waiting for the running one's answer."""
        return len(self._queued)

    def _run(self, tag, name, d, continuation, untagged, timeout, what, literals):
        """Make ``tag`` the running command: its handler, bounds, deadline."""
        self._untagged = untagged
        self._limits(*literals, what)
        self.waiting = tag
        self._command = (name, d, continuation)
        self._deadline.arm(timeout, what)

    def _finished(self):
        """The running command has its answer (or never will); the next
        queued one runs from here."""
        self.waiting = None
        self._command = None
        self._untagged = None
        self._deadline.disarm()
        if self._queued and self.error is None:
            tag, name, d, untagged, timeout, what, literals = self._queued.next()
            self._run(tag, name, d, None, untagged, timeout, what, literals)

    def start_tls(self, context_factory):
        """Switch the transport to TLS (after a tagged OK to STARTTLS).

        Plain text the server sent after its OK would be read as if it came
        through TLS (STARTTLS response injection): refuse it.
        """
        leftover = self.clearLineBuffer()
        if leftover:
            raise FidoError(errors.TLS, "server sent data after its STARTTLS response")
        from fido_tx.sources.imap import stdtls

        stdtls.start_tls(self, context_factory)
        self._write = self.transport.write
        self.startedTLS = True


def lost_error(proto, reason):
    """The error of a connection the server or the network ended: TLS,
    LOGOUT, before the greeting, after a BYE, or unexpected."""
    tls = tls_error(reason, getattr(proto, "tls_host", None))
    if tls is not None:
        return tls
    if proto.logging_out:
        return FidoError(errors.PROTOCOL, "connection closed during LOGOUT")
    if not proto.greeting.called:
        return FidoError(
            errors.CONNECT,
            "server closed the connection before its greeting"
            + _reason_suffix(reason),
        )
    if proto.bye is not None:
        return FidoError(
            errors.PROTOCOL, f"server closed the connection: BYE {_show(proto.bye)}"
        )
    return FidoError(
        errors.PROTOCOL,
        "server closed the connection unexpectedly" + _reason_suffix(reason),
    )


def _ignore(*args):
    pass


def _closed():
    return FidoError(errors.PROTOCOL, "connection closed")


def _reason_suffix(reason):
    if reason is None or reason.check(ierror.ConnectionDone):
        return ""
    return f" ({reason.getErrorMessage()})"
