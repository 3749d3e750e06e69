"""The commands written behind the running one on an IMAP connection (RFC
3501 sec 5.5 pipelining): they run in the order written, as a server answers
them, but for at most one that may be answered first.

Owned by :class:`~fido_tx.sources.imap.client.FidoIMAP4Client`; the reader
(:mod:`~fido_tx.sources.imap.responses`) asks it whose a tagged answer is
and where untagged responses go.
"""

import collections

from twisted.python import failure


class CommandQueue:
    """Commands written and not running yet, oldest first: each a tuple
    ``(tag, name, Deferred, untagged, timeout, what, literal bounds)``."""

    def __init__(self):
        self._entries = collections.deque()
        #: the entry that may be answered before the running command, or None
        self.early = None

    def __len__(self):
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def add(self, entry, early=False):
        """Queue ``entry``; ``early``: its answer may come first (one at a time)."""
        if early:
            if self.early is not None:
                raise RuntimeError("FidoIMAP4Client runs one command out of order at a time")
            self.early = entry
        self._entries.append(entry)

    def next(self):
        """The oldest entry, to run now."""
        entry = self._entries.popleft()
        if entry is self.early:
            self.early = None  # running now, in order
        return entry

    def answered_early(self, tag):
        """The early entry if ``tag`` is its (it leaves the queue), else None."""
        entry = self.early
        if entry is None or entry[0] != tag:
            return None
        self.early = None
        self._entries.remove(entry)
        return entry

    def fail(self, error):
        """The connection failed: every queued command fails with ``error``."""
        self.early = None
        while self._entries:
            self._entries.popleft()[2].errback(failure.Failure(error))

    def untagged(self, handler):
        """The running command's ``handler`` combined with the early
        entry's, if there is one: its responses may come first."""
        early = self.early
        if early is None or early[3] is None:
            return handler
        if handler is None:
            return early[3]
        return _both(handler, early[3])


def _both(first, second):
    def untagged(segments):
        first(segments)
        second(segments)

    return untagged
