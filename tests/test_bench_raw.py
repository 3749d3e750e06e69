"""The raw asyncio fetcher of the benchmark (bench/rawasync.py) against real Dovecot and Redis.

It is the floor Fido's CPU per message is compared with, so it must do the
same server-side work: every message once in Fido's stream with Fido's
fields, its UID in Fido's dedupe set, flagged \\Seen; and a second pass
with nothing new stores nothing.
"""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import rawasync  # noqa: E402
from bench.fido_bench import write_accounts  # noqa: E402


@pytest.mark.parametrize("security", ["tls", "none"])
def test_raw_fetcher_stores_each_message_once_in_fidos_layout_and_marks_it(
        tmp_path, dovecot, redis, security, capsys):
    users = dovecot.provision(3, 4, mix=((1.0, 4096, False),))
    path = write_accounts(str(tmp_path), dovecot, users, security, "seen")
    args = ["--accounts", path, "--connections", "2", "--redis-url", redis.url]
    assert rawasync.main(args) == 0
    client = redis.client()
    assert client("XLEN", "fido:messages") == 12
    entry = client("XRANGE", "fido:messages", "-", "+", "COUNT", "1")[0][1]
    fields = dict(zip(entry[0::2], entry[1::2]))
    assert list(fields)[:8] == [b"account", b"mailbox", b"uidvalidity", b"uid", b"message_id",
                                b"size", b"fetched_at", b"raw"]
    assert fields[b"message_id"].startswith(b"<") and int(fields[b"size"]) == len(fields[b"raw"])
    accounts = json.load(open(path))["accounts"]
    for account, user in zip(accounts, users):
        [key] = client("KEYS", "fido:uids:{%s}:*:INBOX" % account["id"])
        assert client("SCARD", key) == 4
        assert set(dovecot.flags(user).values()) == {"S"}
    # nothing unseen: nothing stored again
    assert rawasync.main(args) == 0
    assert client("XLEN", "fido:messages") == 12
    assert "3 accounts, 0 messages, 0 failed" in capsys.readouterr().out
