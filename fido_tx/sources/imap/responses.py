"""Reading IMAP responses: lines and literals into responses, each sent where it belongs.

:class:`ResponseReader` is the input half of
:class:`~fido_tx.sources.imap.client.FidoIMAP4Client`, on top of
:class:`~fido_tx.sources.imap.reader.LinearLineReader`:

- a line ending in a literal announcement (``{n}``) is admitted by the
  command's bounds before a byte of it is held, then the literal is
  collected as chunks and joined once (no copy when it came in one chunk);
- a whole response is a list of *segments*, text and literal ``bytes``
  alternating, handed on once: the greeting, a ``+`` continuation to the
  running command, an untagged response to the observer and the command's
  handler (SEARCH replies cut to ``max_search_uids``), the tagged one to the
  command's Deferred.

The class using it provides ``_bounds`` (a
:class:`~fido_tx.sources.imap.bounds.CommandBounds`), ``_trace`` (a
:class:`~fido_tx.sources.imap.trace.ProtocolTrace`), ``_deadline`` and
``_rate`` (see :mod:`~fido_tx.sources.imap.deadline`), ``state``,
``waiting`` (the running command's tag) and ``_command`` (its name,
Deferred and continuation), ``_queued`` (the commands written behind it,
a :class:`~fido_tx.sources.imap.pipeline.CommandQueue`), ``_untagged``, ``observer``, ``greeting``,
``error``, ``closed``, ``line_mode``, ``transport`` and ``fail(error)``.
"""

import re

from fido_tx import errors
from fido_tx.errors import FidoError
from fido_tx.sources.imap.parse import (
    _LITERAL_AT_END,
    _show,
    greeting_capabilities,
    response_code,
)
from fido_tx.sources.imap.reader import LinearLineReader

_TAGGED = re.compile(rb"([A-Za-z]+)(?: (.*))?\Z", re.S)


class ImapCommandError(Exception):
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


class ResponseReader(LinearLineReader):
    _segments = None  # the response being read, while it has literals
    _literal = None  # chunks of the literal being read
    _literal_remaining = 0

    def lineReceived(self, line):
        if self.error is not None:
            return
        self._deadline.progress()
        self._trace.add("S", line)
        self._bounds.count_line(len(line) + 2)
        m = _LITERAL_AT_END.search(line)
        if m is not None:
            self._start_literal(line, int(m.group(1)))
            return
        if self._segments is not None:
            self._segments.append(line)
            segments, self._segments = self._segments, None
        else:
            segments = [line]
        self._bounds.response_done()
        self._dispatch(segments)

    def _start_literal(self, line, size):
        texts = (self._segments[0::2] if self._segments else []) + [line]
        self._bounds.admit_literal(texts, size)
        if self._segments is None:
            self._segments = []
        self._segments.append(line)
        self._literal = []
        self._literal_remaining = size
        self._rate.start(size)
        self.line_mode = 0
        if size == 0:
            self._end_literal()

    def _take_literal(self, chunk):
        self._deadline.progress()
        self._literal.append(chunk)
        self._literal_remaining -= len(chunk)
        self._rate.window += len(chunk)

    def _end_literal(self):
        chunks, self._literal = self._literal, None
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        del chunks
        self._rate.stop()
        self._trace.note(f"S: <literal {len(body)} bytes>")
        self._segments.append(body)
        self._literal_remaining = 0
        self.line_mode = 1

    # -- the in-flight byte budget pauses reading ---------------------------
    # (the reader charges literal bytes to the budget's grant; a full budget
    # stops reading here, on the transport)

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
        self._paused_deadline = self._deadline.armed
        self._deadline.disarm()  # a pending timer call finds nothing to do
        self._rate.stop()
        # a literal announced in the read that paused must not start a check
        self._rate.paused = True
        self.transport.pauseProducing()

    def budget_resume(self):
        """Bytes were released: read again, with a fresh deadline and rate window."""
        if not self.budget_paused:
            return
        self.budget_paused = False
        self._rate.paused = False
        if self.closed or self.error is not None:
            return
        if self._paused_deadline and self.waiting:
            self._deadline.arm(self._deadline.seconds, self._deadline.what)
        if not self.line_mode:
            self._rate.stop()
            self._rate.start(self._literal_remaining)  # a fresh window
        self.transport.resumeProducing()

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
        self._deadline.disarm()
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
        continuation = self._command[2] if self.waiting else None
        if continuation is None:
            raise FidoError(errors.PROTOCOL, "unexpected continuation request")
        continuation(rest)

    def _untagged_response(self, segments):
        self._bounds.count_untagged()
        text = segments[0]
        if len(segments) == 1 and text[:4].upper() == b"BYE " or text.upper() == b"BYE":
            self.bye = text[4:]
            return
        observer = self.observer
        if observer is not None:
            observer(segments)
        handler = self._queued.untagged(self._untagged)
        if handler is None:
            return
        if len(segments) == 1 and text[:6].upper() == b"SEARCH":
            text = self._bounds.bound_search(text)
            if text is None:
                return
            segments = [text]
        handler(segments)

    def _tagged(self, tag, rest):
        early = None if tag == self.waiting else self._queued.answered_early(tag)
        if early is not None:
            name, d = early[1], early[2]
        elif tag != self.waiting:
            if any(queued[0] == tag for queued in self._queued):
                self.pipeline_dropped = True
                raise FidoError(
                    errors.PROTOCOL, f"the server answered command {_show(tag)} before "
                                     f"{_show(self.waiting)}, written before it (IMAP answers "
                                     "in order: it dropped or mixed up pipelined commands; "
                                     "none are pipelined to it again)")
            raise FidoError(
                errors.PROTOCOL, f"response with an unknown tag: {_show(tag + b' ' + rest)}"
            )
        else:
            name, d, _ = self._command
            self._finished()
        self.last_response = rest
        m = _TAGGED.match(rest)
        status = m.group(1).upper() if m else b""
        text = (m.group(2) or b"") if m else b""
        if status == b"OK":
            d.callback(text)
        elif status in (b"NO", b"BAD"):
            d.errback(ImapCommandError(name.decode("ascii", "replace"), status, text))
        else:
            err = FidoError(errors.PROTOCOL, f"bad tagged response: {_show(rest)}")
            self.fail(err)
            d.errback(err)  # no longer the running command: fail it here
