"""A local Redis Sentinel setup for tests: one master, one replica and three
sentinels, all redis-server processes on free loopback ports in one
temporary directory, stopped by process id."""

import os
import shutil
import subprocess
import tempfile
import time

from fido_tx.demo.redisserver import RespClient, free_port

MASTER_NAME = "fidomaster"


class _Process:
    def __init__(self, binary, directory, name, port, args):
        self.port = port
        self.name = name
        self.directory = os.path.join(directory, name)
        os.makedirs(self.directory, exist_ok=True)
        self.argv = [binary] + args
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            self.argv, cwd=self.directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return self

    def client(self):
        return RespClient(self.port)

    def wait_ping(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}")
            try:
                if self.client()("PING") == b"PONG":
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer PING in time")

    def stop(self, kill=False):
        if self.process is None or self.process.poll() is not None:
            return
        self.process.kill() if kill else self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class SentinelSetup:
    """``master``, ``replica``, ``sentinels`` (three); :attr:`url` is the
    ``redis+sentinel://`` URL of the set."""

    def __init__(self, binary, failover_timeout_ms=4000):
        self.binary = binary
        #: also how long a sentinel leaves a replica that replicates from an
        #: address other than the master's (a proxy) before it "fixes" it
        self.failover_timeout_ms = failover_timeout_ms
        self.directory = tempfile.mkdtemp(prefix="fido-sentinel-")
        self.master = self._server("master", free_port(), [])
        self.replica = self._server(
            "replica", free_port(), ["--replicaof", "127.0.0.1", str(self.master.port)]
        )
        self.sentinels = [self._sentinel(i) for i in range(3)]

    def replicate_through(self, port):
        """Before :meth:`start`: the replica replicates through ``port`` (a
        proxy to the master) instead of connecting to the master itself."""
        argv = self.replica.argv
        argv[argv.index("--replicaof") + 2] = str(port)

    def _server(self, name, port, extra):
        return _Process(self.binary, self.directory, name, port, [
            "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "always",
            "--logfile", "redis.log", "--dir", ".",
        ] + extra)

    def _sentinel(self, index):
        port = free_port()
        directory = os.path.join(self.directory, f"sentinel{index}")
        os.makedirs(directory, exist_ok=True)
        conf = os.path.join(directory, "sentinel.conf")
        with open(conf, "w") as f:
            f.write(
                f"port {port}\nbind 127.0.0.1\ndir {directory}\nlogfile sentinel.log\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
        return _Process(self.binary, self.directory, f"sentinel{index}", port,
                        [conf, "--sentinel"])

    @property
    def url(self):
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def start(self, timeout=20.0):
        self.master.start().wait_ping()
        self.replica.start().wait_ping()
        for s in self.sentinels:
            s.start().wait_ping()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # replica in sync, sentinels agree
            info = self.master.client()("INFO", "replication")
            seen = [s.client()("SENTINEL", "replicas", MASTER_NAME) for s in self.sentinels]
            if b"state=online" in info and all(seen):
                return self
            time.sleep(0.1)
        raise RuntimeError("the sentinel setup did not settle in time")

    def master_port(self):
        """The master port the first live sentinel names now."""
        for s in self.sentinels:
            try:
                host, port = s.client()("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
                return int(port)
            except OSError:
                continue
        raise RuntimeError("no sentinel answers")

    def wait_failover(self, old_port, timeout=30.0):
        """Wait until every sentinel names a master other than ``old_port``
        and that server says it is a master; its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ports = set()
            for s in self.sentinels:
                try:
                    ports.add(int(s.client()("SENTINEL", "get-master-addr-by-name", MASTER_NAME)[1]))
                except OSError:
                    ports.add(None)
            if len(ports) == 1 and old_port not in ports and None not in ports:
                port = ports.pop()
                server = self.master if port == self.master.port else self.replica
                if server.client()("ROLE")[0] == b"master":
                    return port
            time.sleep(0.1)
        raise RuntimeError("no failover within the time")

    def server(self, port):
        return self.master if port == self.master.port else self.replica

    def close(self):
        for p in self.sentinels + [self.replica, self.master]:
            p.stop(kill=True)
        shutil.rmtree(self.directory, ignore_errors=True)
