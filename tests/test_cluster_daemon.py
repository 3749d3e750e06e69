"""Several real daemons (``twistd -n fido``) on one accounts file, with
``[cluster] mode = "lease"``, against a real Dovecot and Redis: every message
exactly once, never two sessions at once for one account (read from Dovecot's
own log, with microsecond timestamps), a SIGKILLed instance's accounts taken
over, and a joining instance given its share."""

import collections
import os
import re
import signal
import time

import pytest

from tests import daemon
from tests.support import dovecot as dovecot_support
from tests.support import redis_server
from tests.support.dovecot import make_message

N_ACCOUNTS = 300
PER_ACCOUNT = 5
LEASE_TTL = 6
POLL = 2


@pytest.fixture
def dovecot_us():
    """Dovecot logging login and logout with microseconds."""
    with dovecot_support.started(
        extra_config='log_timestamp = "%Y-%m-%d %H:%M:%S.%{usecs} "\n'
    ) as server:
        yield server


def _provision(dovecot, start, per_account):
    users = {f"lease{k:03d}@fido.test": f"lease-pw-{k}" for k in range(N_ACCOUNTS)}
    dovecot.add_users(users)
    for k, user in enumerate(users):
        for i in range(per_account):
            dovecot.add_message(user, make_message(start + k * 100 + i, 1024, tag=7))
    return users


def _wait(predicate, timeout, what, procs=()):
    deadline = time.monotonic() + timeout
    while not predicate():
        for name, p in procs:
            assert p.poll() is None, f"instance {name} exited ({p.returncode}): {what}"
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what()}")
        time.sleep(0.2)


_LOGIN = re.compile(r"^(\S+ \S+) imap-login: Info: Login: user=<([^>]+)>.*mpid=(\d+)")
_LOGOUT = re.compile(r"^(\S+ \S+) imap\(([^)]+)\)<(\d+)><[^>]*>: Info: Disconnected")


def _sessions(log):
    """``{user: [(start, end)]}`` from Dovecot's log (times as strings that
    sort as times: fixed-width date, time and microseconds); a login and its
    end are paired by the mail process id."""
    starts, spans = {}, collections.defaultdict(list)
    for line in log.splitlines():
        m = _LOGIN.match(line)
        if m:
            starts[m.group(3)] = (m.group(2), m.group(1))
            continue
        m = _LOGOUT.match(line)
        if m and m.group(3) in starts:
            user, began = starts.pop(m.group(3))
            spans[user].append((began, m.group(1)))
    return spans


def _overlaps(spans):
    bad = []
    for user, items in spans.items():
        items.sort()
        for (s1, e1), (s2, e2) in zip(items, items[1:]):
            if s2 < e1:
                bad.append((user, (s1, e1), (s2, e2)))
    return bad


def _held(redis):
    client = redis.client()
    out = {}
    for key in client("KEYS", "fido:instance:*"):
        out[key.decode()] = int(client("HGET", key, "accounts") or 0)
    return out


def test_three_instances_share_one_accounts_file_exactly_once_with_takeover_and_join(
    tmp_path, dovecot_us, redis
):
    dovecot = dovecot_us
    assert re.search(r"\d\d:\d\d:\d\d\.\d{6} ", dovecot.read_log() or "2000-01-01 00:00:00.000000 "), \
        "Dovecot does not log microseconds"
    users = _provision(dovecot, 0, PER_ACCOUNT)
    accounts = [daemon.dovecot_account(dovecot, u, "none", id=u.split("@")[0]) for u in users]
    directory = str(tmp_path / "fido")
    os.makedirs(directory)
    daemon.write_accounts(os.path.join(directory, "accounts.json"), accounts)
    config_path = os.path.join(directory, "fido.toml")
    daemon.write_config(config_path, directory, redis.url, workers=8, poll_interval=POLL,
                        extra=f'[cluster]\nmode = "lease"\nlease_ttl = {LEASE_TTL}\n')
    client = redis.client()
    xlen = lambda: client("XLEN", "fido:messages")
    logs = {n: os.path.join(directory, f"fido-{n}.log") for n in "ABCD"}
    procs = {}

    def start(name):
        procs[name] = daemon.start_twistd(config_path, directory, logs[name])

    def alive():
        return [(n, p) for n, p in procs.items() if n != "B"]

    def tails():
        return "".join(f"\n--- {n} ---\n{daemon.log_tail(logs[n], 1500)}" for n in procs)

    total = N_ACCOUNTS * PER_ACCOUNT
    try:
        for name in "ABC":
            start(name)
        _wait(lambda: xlen() >= total // 4, 60, lambda: f"{xlen()} entries{tails()}",
              list(procs.items()))
        _wait(lambda: len(_held(redis)) == 3, 30, lambda: f"heartbeats {_held(redis)}")
        procs["B"].send_signal(signal.SIGKILL)
        procs["B"].wait()
        killed_at = time.monotonic()
        _wait(lambda: xlen() >= total, 60 + LEASE_TTL,
              lambda: f"{xlen()}/{total} entries after the SIGKILL{tails()}", alive())
        took = time.monotonic() - killed_at
        print(f"all {total} messages in Redis {took:.1f} s after SIGKILLing one of 3 "
              f"instances (lease_ttl {LEASE_TTL} s, poll_interval {POLL} s)")

        # a fourth instance joins: the accounts spread over the three alive
        start("D")
        _wait(lambda: sum(1 for n in _held(redis).values() if n > 0) >= 3
              and max(_held(redis).values()) <= 2 * N_ACCOUNTS // 3, 4 * LEASE_TTL,
              lambda: f"held per instance {_held(redis)}{tails()}", alive())
        # more mail after the join: still exactly once
        _provision(dovecot, 50, 1)
        _wait(lambda: xlen() >= total + N_ACCOUNTS, 60,
              lambda: f"{xlen()}/{total + N_ACCOUNTS} entries after the join{tails()}", alive())
        time.sleep(POLL * 2)
        held = _held(redis)
        print(f"held per instance after the join: {sorted(held.values())}")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(20)
            except Exception:
                p.kill()

    entries = client("XRANGE", "fido:messages", "-", "+")
    keys = []
    for _, fields in entries:
        f = dict(zip(fields[::2], fields[1::2]))
        keys.append((f[b"account"], f[b"uidvalidity"], f[b"uid"]))
    assert len(keys) == total + N_ACCOUNTS
    assert len(set(keys)) == len(keys), "a message was delivered twice"
    for user in list(users)[:20]:
        assert all("S" in flags for flags in dovecot.flags(user).values())
    spans = _sessions(dovecot.read_log())
    assert sum(len(v) for v in spans.values()) >= N_ACCOUNTS
    bad = _overlaps(spans)
    assert not bad, f"two sessions at once for one account: {bad[:5]}"
