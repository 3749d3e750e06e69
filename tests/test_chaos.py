"""Chaos: everything fails at once, and still every message lands exactly once.

50 accounts x 20 messages on a real Dovecot, reached only through fault
proxies that cut connections at random; a real Redis (appendonly, fsync
always) restarted twice during the run, once with SIGTERM and once with
SIGKILL; and the daemon itself (``twistd -n fido``) SIGKILLed once and
started again.  At the end: exactly 1000 stream entries, no two for one
(account, mailbox, uidvalidity, uid), every message \\Seen on the server,
and ``fetched_total`` adding up to 1000.

The proxies run in the test's reactor; the daemon is a subprocess, so a
blocked or killed daemon never stops the faults.  The randomness (proxy cuts
and the thresholds of the restarts) comes from one seed, printed at the start
and named in every assertion message; ``FIDO_CHAOS_SEED=<seed>`` replays it.
"""

import os
import random
import signal
import time

import pytest_twisted
from twisted.internet import task, threads

from tests import daemon
from tests.support.dovecot import make_message
from tests.support.proxy import FaultProxy

ACCOUNTS = 50
PER_ACCOUNT = 20
TOTAL = ACCOUNTS * PER_ACCOUNT
STREAM = "fido:messages"
#: seconds the whole run may take before the test gives up (it takes ~20 s)
DEADLINE = 100.0

CONFIG_EXTRA = """
[imap]
connect_timeout = 3
greeting_timeout = 3
command_timeout = 5
logout_timeout = 1
batch_messages = 5

[backoff]
initial = 0.5
maximum = 2
auth_initial = 0.5
auth_maximum = 2
jitter = 0.2
"""


def chaos_seed():
    value = os.environ.get("FIDO_CHAOS_SEED")
    return int(value) if value else random.SystemRandom().randrange(2**32)






def sleep(reactor, seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class Probe:
    """Blocking looks at Redis for the test (tolerates Redis being down)."""

    def __init__(self, redis):
        self.client = redis.client()

    def xlen(self):
        try:
            return self.client("XLEN", STREAM)
        except (OSError, RuntimeError):
            return None

    def entries(self):
        out = []
        for _, flat in self.client("XRANGE", STREAM, "-", "+"):
            out.append(dict(zip((k.decode() for k in flat[::2]), flat[1::2])))
        return out


def provision(dovecot):
    users = {f"chaos{k:02d}@fido.test": f"chaos-pw-{k}" for k in range(ACCOUNTS)}
    dovecot.add_users(users)
    sent = {}
    for k, user in enumerate(users):
        sent[user] = []
        for i in range(PER_ACCOUNT):
            n = k * 100 + i
            raw = make_message(n, 3000 + (n * 37) % 3000, eight_bit=(i % 5 == 0))
            dovecot.add_message(user, raw)
            sent[user].append(raw)
    return users, sent


def marked_but_not_stored(dovecot, users, probe):
    """Message-IDs \\Seen on the server but not in the stream (must be none).

    Flags are read first: a message marked before that was stored before
    it, and the stream only grows, so it is in the stream read after."""
    seen = {mid for u in users for mid, f in dovecot.flags(u).items() if "S" in f}
    stored = {e["message_id"].decode() for e in probe.entries()}
    return sorted(seen - stored)


def unseen(dovecot, users):
    """How many messages are not \\Seen on the server."""
    return sum(1 for u in users for f in dovecot.flags(u).values() if "S" not in f)


@pytest_twisted.inlineCallbacks
def test_chaos_cuts_redis_restarts_and_a_daemon_kill_still_land_every_message_exactly_once(
    tmp_path, dovecot, aof_redis
):
    from twisted.internet import reactor

    seed = chaos_seed()
    print(f"FIDO_CHAOS_SEED={seed}")
    rng = random.Random(seed)
    replay = f"(replay with FIDO_CHAOS_SEED={seed})"

    users, sent = provision(dovecot)
    plain = FaultProxy(reactor, "127.0.0.1", dovecot.port, seed=rng.randrange(2**32))
    tls = FaultProxy(reactor, "127.0.0.1", dovecot.ssl_port, seed=rng.randrange(2**32))
    # Per forwarded chunk and per connection-second: most sessions die
    # somewhere, yet each gets a few batches through before it does.
    for proxy in (plain, tls):
        proxy.cut_randomly(per_chunk=0.02, per_second=0.5)
        # and a short refusal and a short stall, somewhere in the first seconds
        proxy.schedule([
            (rng.uniform(0.5, 4.0), ("refuse", 1.0)),
            (rng.uniform(0.5, 4.0), ("stall", 1.0)),
        ])

    securities = ("none", "starttls", "tls")
    accounts = []
    for k, user in enumerate(users):
        security = securities[k % 3]
        accounts.append(daemon.dovecot_account(
            dovecot, user, security, port=tls.port if security == "tls" else plain.port,
        ))

    directory = str(tmp_path / "fido")
    os.makedirs(directory)
    daemon.write_accounts(os.path.join(directory, "accounts.json"), accounts)
    config_path = os.path.join(directory, "fido.toml")
    daemon.write_config(
        config_path, directory, aof_redis.url, workers=20, poll_interval=1,
        fido_extra="grace_period = 2\n", extra=CONFIG_EXTRA,
    )
    log_path = os.path.join(directory, "fido.log")
    probe = Probe(aof_redis)

    # The disasters, each when the stream has reached a (seeded) level, so
    # that each one surely lands in the middle of the run.
    plan = sorted([
        (rng.randrange(80, 200), "redis-restart"),
        (rng.randrange(300, 450), "daemon-kill"),
        (rng.randrange(550, 700), "redis-kill"),
    ])
    print(f"chaos plan {plan}")
    happened = []

    def context():
        return (f"{replay}; disasters {happened} of plan {plan}; proxy events: "
                f"{len(plain.events) + len(tls.events)} faults\n"
                f"--- daemon log tail ---\n{daemon.log_tail(log_path)}")

    started = time.monotonic()
    proc = daemon.start_twistd(config_path, directory, log_path)
    try:
        done = False
        while time.monotonic() - started < DEADLINE:
            assert proc.poll() is None, f"the daemon exited with {proc.returncode} {context()}"
            n = probe.xlen()
            if plan and n is not None and n >= plan[0][0]:
                level, what = plan.pop(0)
                happened.append((what, n, round(time.monotonic() - started, 1)))
                print(f"chaos: {what} at {n} entries")
                if what == "daemon-kill":
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(10)
                    proc = daemon.start_twistd(config_path, directory, log_path)
                else:
                    kill = what == "redis-kill"

                    def restart(kill=kill):
                        aof_redis.stop(kill=kill)
                        time.sleep(0.5)
                        aof_redis.start()

                    # in a thread: the proxies keep running meanwhile
                    yield threads.deferToThread(restart)
                lost = marked_but_not_stored(dovecot, users, probe)
                assert not lost, f"marked on the server but not in Redis: {lost} {context()}"
                continue
            if not plan and n == TOTAL and unseen(dovecot, users) == 0:
                done = True
                break
            yield sleep(reactor, 0.1)
        elapsed = time.monotonic() - started
        print(f"chaos: converged={done} after {elapsed:.1f} s; disasters {happened}; "
              f"{len(plain.events) + len(tls.events)} proxy faults")
        assert not plan, f"not every disaster happened before the end {context()}"
        late = [h for h in happened if h[1] >= TOTAL]
        assert not late, f"disasters {late} came after the last message, not mid-run {context()}"
        assert done, (
            f"no convergence within {DEADLINE:g} s: {probe.xlen()} of {TOTAL} entries, "
            f"{unseen(dovecot, users)} messages not \\Seen {context()}"
        )
        # Still under fire: stop the daemon as an operator would.
        proc.send_signal(signal.SIGTERM)
        stop_deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < stop_deadline:
            yield sleep(reactor, 0.1)  # the proxies keep forwarding meanwhile
        code = proc.poll()
        # twistd ends by re-raising the signal it stopped on (a clean stop
        # for systemd and shells alike)
        assert code in (0, -signal.SIGTERM), f"the daemon exited with {code} {context()}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        yield plain.stop()
        yield tls.stop()

    entries = probe.entries()
    keys = [(e["account"], e["mailbox"], e["uidvalidity"], e["uid"]) for e in entries]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    assert not duplicates, f"duplicate stream entries {duplicates[:10]} {replay}"
    assert len(entries) == TOTAL, f"{len(entries)} entries, not {TOTAL} {replay}"
    message_ids = [e["message_id"] for e in entries]
    assert len(set(message_ids)) == TOTAL, f"one message stored twice {replay}"
    for user in users:
        account_id = user.split("@")[0].encode()
        raws = sorted(e["raw"] for e in entries if e["account"] == account_id)
        assert raws == sorted(sent[user]), f"{user}: stream differs from the mailbox {replay}"
        flags = dovecot.flags(user)
        assert set(flags.values()) == {"S"}, f"{user} flags {flags} {replay}"
    client = aof_redis.client()
    totals = [
        int(client("HGET", f"fido:account:{user.split('@')[0]}", "fetched_total") or 0)
        for user in users
    ]
    assert sum(totals) == TOTAL, f"fetched_total adds up to {sum(totals)} {replay}"
