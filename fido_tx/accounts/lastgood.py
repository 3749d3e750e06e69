"""The last good copy of the accounts file: its raw bytes, saved atomically after a good load.

The bytes are the web application's, exactly as they loaded (still a Fernet
token when the file is encrypted), so the copy holds nothing the file did
not.  They are saved only when the file's stat signature was the same before
the load and when the bytes are read back, so the copy is never of a newer,
unvalidated version; and only when they differ from what is saved.  The
blocking methods run in the reload's worker thread, one load at a time.
"""

import hashlib
import os
import time

from fido_tx import boundedfile

__all__ = ["LastGoodCopy", "path_signature", "stat_signature", "write_atomically"]


def stat_signature(st):
    """What tells one version of a file from another: mtime, size, inode, device."""
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def path_signature(path):
    """:func:`stat_signature` of ``path``, or None when it cannot be stat'ed."""
    try:
        return stat_signature(os.stat(path))
    except OSError:
        return None


class LastGoodCopy:
    """The copy at ``path`` of the accounts file ``source``.

    ``path`` None: no copy is kept (:meth:`save` does nothing).
    """

    def __init__(self, path, source):
        self.path = os.path.abspath(path) if path else None
        self._source = source
        self._signature = None  # of the source version saved (or found saved)
        self._digest = None  # SHA-256 of the bytes saved

    def exists(self):
        return bool(self.path) and os.path.exists(self.path)

    def saved_at(self):
        """When the copy was written, for the operator (UTC)."""
        try:
            return time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                 time.gmtime(os.stat(self.path).st_mtime))
        except OSError:
            return "unknown time"

    def holds(self, signature):
        """The version with ``signature`` is the one saved."""
        return signature is not None and signature == self._signature

    def read_digest(self):
        """Remember what is saved already (at start), so that the same bytes
        are not written again."""
        if not self.path:
            return
        try:
            with open(self.path, "rb") as f:
                self._digest = hashlib.sha256(f.read()).digest()
        except OSError:
            self._digest = None

    def save(self, signature):
        """Save the source's bytes if they are the version just loaded (same
        ``signature`` now) and new.  Returns a one-line warning when they
        cannot be saved, else None."""
        if not self.path or signature is None or signature == self._signature:
            return None
        try:
            # the same bounds as the load (a regular file, a size limit)
            data = boundedfile.read_regular(self._source, boundedfile.MAX_ACCOUNTS_BYTES,
                                            "accounts file")
            now = stat_signature(os.stat(self._source))
        except OSError:
            return None
        if now != signature:
            # Changed while loading: an event for the newer version follows.
            return None
        digest = hashlib.sha256(data).digest()
        if digest != self._digest:
            try:
                write_atomically(self.path, data)
            except OSError as e:
                return f"{type(e).__name__}: {e}"
            self._digest = digest
        self._signature = signature
        return None


def write_atomically(path, data):
    """Write ``data`` to ``path`` (mode 0600) so that a crash leaves the old
    file or the new one, never a part: a temporary file, fsync, rename,
    fsync of the directory."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0),
                 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass
