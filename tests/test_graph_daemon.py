"""``twistd -n fido`` with Microsoft Graph accounts, SIGKILLed in the middle
of fetching and started again: no message lost, none delivered twice, all
marked read; no secret in its log.  The fake token endpoint and Graph run in
their own process (``python -m tests.support.graphserver``)."""

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from tests import daemon
from tests.support.redis_server import free_port

SECRET = "sigkill-graph-secret-8642"
USERS = 5
MESSAGES = 20


def _state(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_state", timeout=10) as answer:
        return json.load(answer)


def _entries(client):
    return [dict(zip((k.decode() for k in flat[::2]), flat[1::2]))
            for _, flat in client("XRANGE", "fido:messages", "-", "+")]


def test_sigkill_mid_fetch_with_graph_accounts_neither_loses_nor_duplicates(tmp_path, redis):
    port = free_port()
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.support.graphserver", "--port", str(port),
         "--users", str(USERS), "--messages", str(MESSAGES), "--size", "20000",
         "--delay", "0.05", "--client-id", "app-1", "--client-secret", SECRET],
        stdout=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(__file__)))
    proc = None
    try:
        assert fake.stdout.readline().strip() == b"ready"
        base = f"http://127.0.0.1:{port}"
        directory = str(tmp_path / "fido")
        os.makedirs(directory)
        daemon.write_accounts(os.path.join(directory, "accounts.json"), [
            {"id": f"graph{u:02d}", "source": "graph", "user": f"user{u:02d}@contoso.test",
             "graph_endpoint": base,
             "oauth": {"provider": "microsoft", "client_id": "app-1", "client_secret": SECRET,
                       "token_url": base + "/token"}}
            for u in range(USERS)])
        config_path = os.path.join(directory, "fido.toml")
        daemon.write_config(config_path, directory, redis.url, workers=2,
                            extra="[imap]\nbatch_messages = 2\n")
        log_path = os.path.join(directory, "fido.log")
        client = redis.client()
        total = USERS * MESSAGES

        proc = daemon.start_twistd(config_path, directory, log_path)
        deadline = time.monotonic() + 60
        while client("XLEN", "fido:messages") < 15 and time.monotonic() < deadline:
            assert proc.poll() is None, daemon.log_tail(log_path)
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        at_kill = client("XLEN", "fido:messages")
        assert 0 < at_kill < total, f"the kill did not land mid-fetch ({at_kill} of {total})"

        proc = daemon.start_twistd(config_path, directory, log_path)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            state = _state(port)["state"]
            if (client("XLEN", "fido:messages") == total
                    and not any(s["unread"] for s in state.values())):
                break
            assert proc.poll() is None, daemon.log_tail(log_path)
            time.sleep(0.2)
        entries = _entries(client)
        keys = [(e["account"], e["uid"]) for e in entries]
        assert len(keys) == len(set(keys)), "duplicate stream entries"
        assert len(entries) == total, daemon.log_tail(log_path)
        state = _state(port)
        for user, s in state["state"].items():
            assert s["unread"] == [] and len(s["read"]) == MESSAGES, (user, s)
        assert {e["source"] for e in entries} == {b"graph"}
        # two daemons, one grant: a token request each (not one per account)
        assert state["token_requests"] == 2
        with open(log_path, encoding="utf-8", errors="replace") as f:
            log = f.read()
        for form in (SECRET, base64.b64encode(SECRET.encode()).decode()):
            assert form not in log
        assert "Bearer" not in log
    finally:
        for p in (proc, fake):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(30)
