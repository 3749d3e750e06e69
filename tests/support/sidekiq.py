"""A real Sidekiq (Debian's ruby-sidekiq) on a test Redis, running the
GitLab-named workers of ``sidekiq_workers.rb``; what they receive is read
back from a JSON-lines file."""

import json
import os
import shutil
import signal
import subprocess
import time

from tests.support.redis_server import require

WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sidekiq_workers.rb")


def find_sidekiq():
    return shutil.which("sidekiq")


class Sidekiq:
    def __init__(self, redis_url, directory, queues=("default",), namespace=""):
        self.binary = require("sidekiq (Debian package ruby-sidekiq)", find_sidekiq())
        self.redis_url = redis_url
        self.out = os.path.join(directory, "jobs.jsonl")
        self.log = os.path.join(directory, "sidekiq.log")
        self.queues = queues
        self.namespace = namespace
        self.process = None

    def start(self):
        env = dict(os.environ, REDIS_URL=self.redis_url, FIDO_SIDEKIQ_OUT=self.out)
        args = [self.binary, "-r", WORKERS, "-c", "2", "-t", "2"]
        for q in self.queues:
            args += ["-q", q]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        return self

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def received(self):
        if not os.path.exists(self.out):
            return []
        with open(self.out) as f:
            return [json.loads(line) for line in f if line.strip()]

    def wait_for(self, count, timeout=25.0):
        """The jobs received once ``count`` are in (a subprocess writing a
        file has no event to wait on: the file is re-read every 0.1 s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.received()
            if len(got) >= count:
                return got
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        with open(self.log, "rb") as f:
            tail = f.read()[-2000:].decode("utf-8", "replace")
        raise AssertionError(f"sidekiq processed {len(self.received())} of {count} jobs; log:\n{tail}")
