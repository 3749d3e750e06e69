"""The last protocol lines of one IMAP connection, kept raw and scrubbed when shown.

:class:`ProtocolTrace` is the debug text of a
:class:`~fido_tx.sources.imap.client.FidoIMAP4Client`: the last
:attr:`~ProtocolTrace.LINES` lines each way, credentials never kept (LOGIN
and AUTHENTICATE arguments and SASL continuations are replaced before they
are stored), a server's echo of a secret removed by the credentials'
``secret_forms`` when the trace is read, before any line is cut.

Lines are stored as ``(direction, bytes)`` and formatted only when read:
formatting every line cost ~7% of a fetch's CPU time, scrubbing each one as
it passed ~18 us a line, and both are for nothing when the session succeeds.
"""

import collections

from fido_tx.scrub import MIN_FORM_LENGTH
from fido_tx.sources.imap.parse import _show

_SECRET_COMMANDS = (b"LOGIN", b"AUTHENTICATE")


class ProtocolTrace:
    #: protocol lines kept for debug text
    LINES = 20
    #: characters kept of one traced line
    WIDTH = 200
    #: what a traced line keeps beyond WIDTH until it is shown: room for a
    #: whole secret (a token's SASL encoding is a few KiB) that starts inside
    #: the width, so that scrubbing happens before the cut
    SLACK = 8 * 1024

    __slots__ = ("_lines", "scrub_forms", "_scrub_bytes")

    def __init__(self):
        # (direction, bytes), (direction, (bytes, size)) or a ready str
        self._lines = collections.deque(maxlen=self.LINES)
        #: callable returning the secret's forms (credentials'
        #: ``secret_forms``): removed from server lines before they are cut
        self.scrub_forms = None
        self._scrub_bytes = None

    def add(self, direction, line):
        """Keep one line (``direction`` ``"S"`` or ``"C"``), bounded."""
        if len(line) > self.WIDTH + self.SLACK:
            line = (line[: self.WIDTH + self.SLACK], len(line))
        self._lines.append((direction, line))

    def note(self, text):
        """Keep a ready line (``"S: <literal 4096 bytes>"``)."""
        self._lines.append(text)

    def sent(self, line):
        """Keep a command line, with LOGIN's and AUTHENTICATE's arguments
        replaced."""
        parts = line.split(b" ", 2)
        if len(parts) == 3 and parts[1].upper() in _SECRET_COMMANDS:
            if parts[1].upper() == b"LOGIN":
                shown = parts[0] + b" LOGIN <redacted>"
            else:
                mech = parts[2].split(b" ", 1)
                shown = parts[0] + b" AUTHENTICATE " + mech[0]
                if len(mech) > 1:
                    shown += b" <redacted>"
            self._lines.append(("C", shown))  # formatted only when read
        else:
            self.add("C", line)

    def clear(self):
        self._lines.clear()

    def __len__(self):
        return len(self._lines)

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
        if size > self.WIDTH:
            line = line[: self.WIDTH] + b"... (%d bytes)" % size
        return line

    def lines(self):
        """The kept lines formatted (``"S: * OK ..."``), secrets removed
        before anything is cut."""
        return [t if isinstance(t, str) else f"{t[0]}: {_show(self._shown(t[1]), self.WIDTH + 40)}"
                for t in self._lines]


class TracedLines:
    """What a connection with a :class:`ProtocolTrace` (``_trace``) shows
    of it: the client's tracing API, apart from its protocol work."""

    @property
    def scrub_forms(self):
        """Callable returning the secret's forms (credentials'
        ``secret_forms``): removed from traced server lines before they are cut."""
        return self._trace.scrub_forms

    @scrub_forms.setter
    def scrub_forms(self, forms):
        self._trace.scrub_forms = forms

    @property
    def trace(self):
        """The last protocol lines, formatted (``"S: * OK ..."``), secrets
        removed before anything is cut."""
        return self._trace.lines()

    def debug_lines(self):
        return self._trace.lines()

    def clear_trace(self):
        """Forget the traced lines: a held connection waiting in IDLE keeps
        no debug text of its login (about 3 KiB per connection)."""
        self._trace.clear()
