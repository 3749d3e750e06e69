"""The real daemon (``twistd -n fido``, a child process) against hostile IMAP
servers: its memory stays bounded and a healthy account keeps delivering.

``HOSTILE_ONLY=flood,search`` runs only those hostile accounts (``none``:
the healthy one alone, for a baseline); ``HOSTILE_EXTRA`` adds config lines.

The mock server runs in the test process and streams as fast as the daemon
reads: literal chains, a lying RFC822.SIZE, STATUS literal chains, endless
SEARCH lines, endless ``* OK`` lines and 50 MiB claims trickled at 8 KiB/s,
each to its own account, retried
every second or so.  The daemon's peak resident memory (``VmHWM`` in
/proc/<pid>/status) must stay under :data:`RSS_BOUND` while the hostile
accounts are cut off with kind ``protocol``, again and again, and the healthy
account's messages all reach the Redis stream.
"""

import os
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import task

from tests import daemon
from tests.support.mockimap import Behaviour, MockIMAPServer, MockMailbox, sample_message

RSS_BOUND = 150 * 1024 * 1024
DURATION = 20.0
HEALTHY = 300
PASSWORD = "hostile-daemon-pw"

HOSTILE = {
    # claims 1 MiB bodies, sends them, then chains more 1 MiB literals (its
    # batches take 3 MiB of the 8 MiB budget: claims near [imap]
    # max_inflight_bytes would keep the budget to themselves while they
    # last, see the README, Bounds)
    "chain": Behaviour(hostile="literal_chain", hostile_size=1024 * 1024,
                       claimed_size=1024 * 1024),
    "liar": Behaviour(hostile="lying_size", hostile_size=20 * 1024 * 1024),
    "status": Behaviour(hostile="status_chain", hostile_size=1024 * 1024),
    "search": Behaviour(hostile="search_flood", hostile_size=100_000),
    "flood": Behaviour(hostile="untagged_flood"),
    # claims 50 MiB bodies and trickles them at 8 KiB/s (above
    # min_literal_rate): a session lasting until session_timeout (30 min).
    # The budget charges what arrives, so it holds a few hundred KiB of the
    # 8 MiB, not all of it (a claim over the budget used to run alone)
    "slow": Behaviour(hostile="slow_body", hostile_size=50 * 1024 * 1024, hostile_rate=8192),
}
#: still in their first session when the test ends: no error kind yet
SLOW = {"slow"}


def vm_hwm(pid):
    """Peak resident set size of ``pid`` in bytes (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")
@pytest_twisted.inlineCallbacks
def test_daemon_memory_stays_bounded_while_hostile_servers_send_gigabytes(tmp_path, redis):
    from twisted.internet import reactor

    directory = str(tmp_path)
    boxes = {user: MockMailbox(PASSWORD, [sample_message(i, user, 2000) for i in range(1, 4)])
             for user in HOSTILE}
    boxes["good"] = MockMailbox(PASSWORD, [sample_message(i, "good", 20_000)
                                           for i in range(1, HEALTHY + 1)])
    server = MockIMAPServer(reactor, boxes, keep_records=False)
    hostile = {u: b for u, b in HOSTILE.items()
               if u in os.environ.get("HOSTILE_ONLY", ",".join(HOSTILE)).split(",")}
    for user, behaviour in hostile.items():
        server.script(user, behaviour)
    port = server.listen()
    # "status" attacks the STATUS a poll that logs in asks first; a held
    # connection (idle = true, the others) never sends STATUS
    daemon.write_accounts(os.path.join(directory, "accounts.json"), [
        {"id": user, "host": "127.0.0.1", "port": port, "security": "none",
         "username": user, "password": PASSWORD, "idle": user != "status"}
        for user in boxes])
    config_path = os.path.join(directory, "fido.toml")
    daemon.write_config(
        config_path, directory, redis.url, workers=8, poll_interval=1,
        extra="\n[backoff]\ninitial = 0.5\nmaximum = 1\nauth_initial = 0.5\n"
              "auth_maximum = 1\njitter = 0.1\n" + os.environ.get("HOSTILE_EXTRA", ""))
    log_path = os.path.join(directory, "fido.log")
    client = redis.client()
    proc = daemon.start_twistd(config_path, directory, log_path)
    started = time.monotonic()
    healthy_done = None
    try:
        while time.monotonic() - started < DURATION:
            assert proc.poll() is None, (
                f"the daemon exited with {proc.returncode}\n{daemon.log_tail(log_path)}")
            if healthy_done is None and client("XLEN", "fido:messages") >= HEALTHY:
                healthy_done = time.monotonic() - started
            yield task.deferLater(reactor, 0.25, lambda: None)
        peak = vm_hwm(proc.pid)
        stored = client("XLEN", "fido:messages")
        with open(f"/proc/{proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        daemon_cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        own_cpu = sum(os.times()[:2])
        kinds = {user: client("HGET", f"fido:account:{user}", "last_error_kind")
                 for user in hostile if user not in SLOW}
    finally:
        proc.terminate()
        proc.wait(30)
        yield server.stop()
    sent = server.bytes_sent
    print(f"\nhostile servers sent {sent / 2**20:.0f} MiB in {DURATION:g} s; daemon peak RSS "
          f"{peak / 2**20:.1f} MiB; healthy account's {HEALTHY} messages stored after "
          f"{healthy_done} s ({stored} stored); CPU s: daemon {daemon_cpu:.1f}, test process {own_cpu:.1f}")
    context = daemon.log_tail(log_path)
    assert peak < RSS_BOUND, f"peak RSS {peak / 2**20:.1f} MiB\n{context}"
    assert healthy_done is not None, f"the healthy account did not deliver\n{context}"
    assert all(k in (b"protocol", "protocol") for k in kinds.values()), f"{kinds}\n{context}"
    # each hostile session is cut off after at most ~16 MiB (the bounds), so
    # the volume comes from retries: hundreds of MiB in 20 s on a loaded box
    assert sent > 256 * 1024 * 1024, f"the hostile servers sent only {sent / 2**20:.0f} MiB"
