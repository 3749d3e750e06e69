"""The recent-sessions list against a real Redis through the daemon's own
connection: each session's entry goes by EVALSHA (the script loaded once per
connection), not the script's text at every session."""

import json

import pytest_twisted

from fido_tx.accounts.model import Account
from fido_tx.observe.history import SessionLog
from fido_tx.outcome import SessionResult
from tests.support import redisconn


def _reactor():
    from twisted.internet import reactor

    return reactor


def _calls(info, command):
    for line in info.decode().splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


@pytest_twisted.ensureDeferred
async def test_session_entries_go_by_evalsha_on_the_daemons_connection(redis):
    reactor = _reactor()
    conn = await redisconn.shared_connection(reactor, redis.port)
    try:
        log = SessionLog(reactor, conn.execute, keep=3, script=conn.script)
        account = Account(id="acme", host="h", password="pw-secret")
        for i in range(5):
            assert await log.record(account, SessionResult("acme", fetched=i))
        recent = await log.recent("acme")
    finally:
        await redisconn.close(conn)
    assert [r["fetched"] for r in recent] == [4, 3, 2]
    client = redis.client()
    stats = client("INFO", "commandstats")
    assert _calls(stats, "evalsha") >= 5
    assert _calls(stats, "eval") <= 1  # at most one EVAL, after a NOSCRIPT
    assert client("TTL", "fido:sessions:acme") > 0
    assert all("pw-secret" not in json.dumps(r) for r in recent)
