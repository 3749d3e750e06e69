"""Reading an IMAP connection's bytes into lines and literals, in linear time.

:class:`LinearLineReader` replaces ``LineReceiver``'s reading for
:class:`~fido_tx.sources.imap.client.FidoIMAP4Client`: a line that arrives in
many reads is kept as a list of pieces and joined once, and each line is cut
out of a read by position.  ``LineReceiver`` re-copied its whole buffer for
every read and every line: a hostile server's 8 MiB lines, or thousands of
short lines per read, cost seconds of CPU (quadratic).

The class using it provides ``error`` (reading stops once it is set),
``line_mode`` (true: lines; false: a literal is being read),
``_literal_remaining``, ``_take_literal(chunk)``, ``_end_literal()`` (back to
line mode), ``lineReceived(line)``, ``lineLengthExceeded(line)`` and
``MAX_LENGTH``, and calls :meth:`_reader_init` from its ``__init__``.

Literal bytes are charged to ``meter`` (``None``, or the in-flight budget's
:class:`~fido_tx.schedule.budget.Grant` of the running ``UID FETCH``) as
they are read, before they are kept: the budget admits bodies by what
arrives, and pauses the connection when it is full.

Lines are cut at LF and the CR before it is stripped; a line ended by a
bare LF (some servers send them) is read too and counted in
``bare_lf_lines``.
"""


class LinearLineReader:
    def _reader_init(self):
        self._pending = []  # pieces of an incomplete line
        self._pending_len = 0
        self._data = b""  # the read being scanned, and where
        self._pos = 0
        self._receiving = False
        self._backlog = []
        #: lines that ended in a bare LF instead of CRLF
        self.bare_lf_lines = 0
        #: what literal bytes are charged to (``charge(n)``), or ``None``
        self.meter = None

    @property
    def pending_bytes(self):
        """Bytes of an incomplete line held."""
        return self._pending_len

    def _receive(self, data):
        if self._receiving:  # re-entered from a callback: read it afterwards
            self._backlog.append(data)
            return
        self._receiving = True
        try:
            self._data, self._pos = data, 0
            self._scan()
            while self._backlog and self.error is None:
                self._data, self._pos = self._backlog.pop(0), 0
                self._scan()
        finally:
            self._receiving = False
            self._data, self._pos = b"", 0

    def _scan(self):
        while self.error is None:
            data, pos = self._data, self._pos
            if pos >= len(data):
                return
            if not self.line_mode:
                n = self._literal_remaining
                meter = self.meter
                if len(data) - pos < n:
                    if meter is not None:
                        meter.charge(len(data) - pos)
                    self._take_literal(data[pos:] if pos else data)
                    self._pos = len(data)
                    return
                if meter is not None:
                    meter.charge(n)
                self._take_literal(data[pos:pos + n])
                self._pos = pos + n
                self._end_literal()
                continue
            line = self._next_line(data, pos)
            if line is None:
                return
            if len(line) > self.MAX_LENGTH:
                self.lineLengthExceeded(line)
                return
            self.lineReceived(line)

    def _next_line(self, data, pos):
        """The next complete line (advancing ``_pos``), or ``None`` when the
        read ends inside one (kept as a piece).

        A line ends at LF; the CR before it is stripped, and a line without
        one (a bare LF) is read all the same and counted in
        ``bare_lf_lines``: tolerated, never silently mis-parsed."""
        pending = self._pending
        end = data.find(b"\n", pos)
        if end == -1:
            piece = data[pos:] if pos else data
            self._pos = len(data)
            pending.append(piece)
            self._pending_len += len(piece)
            if self._pending_len > self.MAX_LENGTH + 1:
                self._pending, self._pending_len = [], 0
                self.lineLengthExceeded(piece)
            return None
        line = data[pos:end]
        if pending:
            line = b"".join(pending) + line
        self._pos = end + 1
        self._pending, self._pending_len = [], 0
        if line.endswith(b"\r"):
            return line[:-1]
        self.bare_lf_lines += 1
        return line

    def clearLineBuffer(self):
        """What was received and not yet read (and forget it)."""
        rest = b"".join(self._pending) + self._data[self._pos:]
        self._pending, self._pending_len = [], 0
        self._pos = len(self._data)
        return rest
