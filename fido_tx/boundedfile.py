"""Reading a configuration file that may not be what its name says.

``fido.toml``, the accounts file and the key file are read only when they
are regular files, and only up to a size limit: a FIFO would block the start
for ever (and SIGTERM with it), ``/dev/zero`` would be read until memory runs
out.  The file is opened with ``O_NONBLOCK`` (opening a FIFO then returns at
once) and checked with ``fstat`` on the open descriptor, so a file swapped
between a check and the open cannot slip through.
"""

import errno
import os
import stat

#: largest accounts file read (about 100,000 accounts of ~600 bytes)
MAX_ACCOUNTS_BYTES = 64 * 1024 * 1024
#: largest key file read
MAX_KEY_BYTES = 64 * 1024


class FileRefused(OSError):
    """The file is not a regular file, or too large; ``str()`` is one line
    (without the path: callers name it)."""

    def __init__(self, message):
        super().__init__(errno.EINVAL, message)

    def __str__(self):
        return self.strerror


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def _what(mode):
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def read_regular(path, limit, what="file"):
    """The bytes of ``path`` when it is a regular file of at most ``limit`` bytes.

    :param what: names the file in the message (``"accounts file"``).
    :raises FileRefused: not a regular file, or larger than ``limit``.
    :raises OSError: cannot be opened or read (missing, permissions).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(f"is {_what(st.st_mode)}, not a regular {what}")
        if st.st_size > limit:
            raise FileRefused(
                f"is {st.st_size} bytes, over the limit of {limit} bytes for a {what}")
        chunks = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1024 * 1024))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:  # grew while being read
            raise FileRefused(f"is over the limit of {limit} bytes for a {what}")
        return data
    finally:
        os.close(fd)
