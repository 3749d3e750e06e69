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
    redis.client()("CONFIG", "RESETSTAT")
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
    # trimmed only once longer than kept: the 4th and 5th entries
    assert _calls(stats, "ltrim") == 2
    assert client("TTL", "fido:sessions:acme") > 0
    assert all("pw-secret" not in json.dumps(r) for r in recent)


@pytest_twisted.ensureDeferred
async def test_a_sessions_hash_fields_and_history_entry_are_one_script_call(redis):
    from fido_tx import errors
    from fido_tx.redis.state import AccountState

    reactor = _reactor()
    conn = await redisconn.shared_connection(reactor, redis.port)
    client = redis.client()
    client("CONFIG", "RESETSTAT")
    try:
        log = SessionLog(reactor, conn.execute, keep=3, script=conn.script)
        state = AccountState(conn, history=log)
        account = Account(id="acme", host="h", password="pw-secret")
        assert await state.record_session(SessionResult("acme", fetched=2), account=account,
                                          extra={"failing_since": ""})
        failed = SessionResult("acme", kind=errors.AUTH, message="login failed: pw-secret")
        assert await state.record_session(failed, account=account)
        # without the account (or with keep = 0) only the hash is written
        assert await state.record_session(SessionResult("other", fetched=1))
        recent = await log.recent("acme")
    finally:
        await redisconn.close(conn)
    stats = client("INFO", "commandstats")
    assert _calls(stats, "evalsha") + _calls(stats, "eval") == 2
    # commandstats counts the scripts' own calls: two HSET and two LPUSH
    # in the scripts, one HSET for "other"
    assert _calls(stats, "hset") == 3 and _calls(stats, "lpush") == 2
    assert _calls(stats, "ltrim") == 0  # 2 entries of the 3 kept: nothing to trim
    fields = {k.decode(): v.decode() for k, v in
              zip(*[iter(client("HGETALL", "fido:account:acme"))] * 2)}
    assert fields["state"] == "error" and fields["last_error_kind"] == errors.AUTH
    assert {"last_attempt_at", "last_success_at", "last_error", "last_error_at",
            "failing_since"} <= set(fields)
    assert [r["kind"] for r in recent] == [errors.AUTH, "ok"]
    assert all("pw-secret" not in json.dumps(r) for r in recent)
    assert client("TTL", "fido:sessions:acme") > 0
    assert client("EXISTS", "fido:sessions:other") == 0
