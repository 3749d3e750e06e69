"""A tiny blocking RESP2 client, for the ``fido`` command and tests.

The daemon talks to Redis through txredisapi on the reactor; a command-line
tool may block, and needs only a few commands: this is a socket (TCP, TLS for
``rediss://``, or a Unix socket) with a timeout on every read, and no Redis
library.
"""

import socket
import ssl

from fido_tx.redis import text

SCAN_COUNT = 500


def encode(args):
    """One command in RESP2 (str as UTF-8, int as decimal, bytes as they are)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode("utf-8")
        elif isinstance(a, int):
            a = str(a).encode("ascii")
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class RedisReplyError(Exception):
    """An error reply (``-ERR ...``) from Redis."""


class RespConnection:
    """One blocking connection speaking RESP2.  ``url`` is a ``redisurl.RedisURL``."""

    def __init__(self, url, timeout=5.0):
        self.url = url
        self.timeout = timeout
        self._sock = None
        self._file = None

    def connect(self):
        url = self.url
        if url.sentinel:  # ask the sentinels where the master is now
            from fido_tx.redis.sentinel import SentinelError, resolve_master

            try:
                url = resolve_master(url, self.timeout)
            except SentinelError as e:
                raise ConnectionError(str(e)) from None
        if url.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            sock.connect(url.path)
        else:
            sock = socket.create_connection((url.host, url.port), timeout=self.timeout)
            if url.tls:
                context = ssl.create_default_context(cafile=url.ca_file or None)
                sock = context.wrap_socket(sock, server_hostname=url.host)
        sock.settimeout(self.timeout)
        self._sock = sock
        self._file = sock.makefile("rb")
        if url.password is not None:
            if url.username:
                self.command("AUTH", url.username, url.password)
            else:
                self.command("AUTH", url.password)
        if url.db:
            self.command("SELECT", str(url.db))
        return self

    def close(self):
        for closeable in (self._file, self._sock):
            if closeable is not None:
                try:
                    closeable.close()
                except OSError:
                    pass
        self._file = self._sock = None

    def __enter__(self):
        return self.connect()

    def __exit__(self, *exc):
        self.close()

    def command(self, *args):
        """Send one command, return its reply; an error reply raises."""
        reply = self.pipeline([args])[0]
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    def pipeline(self, commands):
        """Send several commands at once; replies in order (errors as values)."""
        if not commands:
            return []
        self._sock.sendall(b"".join(encode(c) for c in commands))
        return [self._read() for _ in commands]

    def _read(self):
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed by Redis")
        prefix, rest = line[:1], line[1:-2]
        if prefix == b"+":
            return rest
        if prefix == b"-":
            return RedisReplyError(rest.decode("utf-8", "replace"))
        if prefix == b":":
            return int(rest)
        if prefix == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self._file.read(n + 2)
            if len(data) != n + 2:
                raise ConnectionError("connection closed by Redis")
            return data[:-2]
        if prefix == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [self._read() for _ in range(n)]
        raise ConnectionError(f"unexpected reply from Redis: {line[:40]!r}")

    def scan(self, pattern, count=SCAN_COUNT):
        """All keys matching ``pattern`` (``SCAN``; never ``KEYS``)."""
        cursor = b"0"
        seen = set()
        while True:
            cursor, keys = self.command("SCAN", cursor, "MATCH", pattern, "COUNT", str(count))
            for key in keys:
                if key not in seen:  # SCAN may return a key twice
                    seen.add(key)
                    yield key
            if cursor == b"0":
                return

    def hashes(self, keys, batch=SCAN_COUNT):
        """``{key: {field: value}}`` (str) of the hashes, pipelined in batches."""
        out = {}
        keys = list(keys)
        for i in range(0, len(keys), batch):
            chunk = keys[i:i + batch]
            replies = self.pipeline([("HGETALL", k) for k in chunk])
            for key, reply in zip(chunk, replies):
                if isinstance(reply, RedisReplyError) or not reply:
                    continue  # gone meanwhile, or not a hash
                out[text(key)] = {
                    text(reply[j]): text(reply[j + 1]) for j in range(0, len(reply) - 1, 2)
                }
        return out
