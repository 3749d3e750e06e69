"""In-process CPU of the scheduler with the status tracker per session, and of an accounts reload.

No servers: instant sessions on a ``task.Clock`` through the real
``Scheduler`` and ``StatusTracker`` (a fake account state and reporter; one
session in ten fails), and the real ``AccountsSource`` reloading a plain
accounts file.  Run it with two trees on ``PYTHONPATH`` in turn to compare
a change (issue 10's splits)::

    PYTHONPATH=. .venv/bin/python bench/parts.py --accounts 2000 --rounds 20
"""

import argparse
import json
import os
import shutil
import tempfile
import time

from twisted.internet import defer, task
from twisted.logger import Logger

from fido_tx import config, errors
from fido_tx.accounts.model import Account
from fido_tx.observe.status import StatusTracker
from fido_tx.outcome import SessionResult
from fido_tx.schedule.scheduler import Scheduler
from fido_tx.testing import FakeRedis, FakeReporter

QUIET = Logger(observer=lambda event: None)


def sessions(n_accounts, rounds, workers=64):
    """Microseconds of CPU per session, and the number of sessions."""
    clock = task.Clock()
    count = [0]

    def run(account):
        count[0] += 1
        if count[0] % 10 == 0:
            return defer.succeed(SessionResult(account_id=account.id, kind=errors.AUTH,
                                               message="login failed"))
        return defer.succeed(SessionResult(account_id=account.id, fetched=1, bytes=100,
                                           marked=1))

    tracker = StatusTracker(clock, FakeRedis(), FakeReporter(), log=QUIET)
    sched = Scheduler(clock, run, workers=workers, poll_interval=60.0,
                      backoff=config.BackoffSettings())
    tracker.scheduler = sched
    sched.add_result_observer(tracker.record)
    sched.set_accounts([Account(id=f"a{i}", host="h", username="u", password="p")
                        for i in range(n_accounts)])
    started = time.process_time()
    sched.startService()
    for _ in range(rounds):
        clock.advance(61)
    return (time.process_time() - started) / count[0] * 1e6, count[0]


def reloads(n_accounts, times=5):
    """Milliseconds of CPU per reload of ``n_accounts`` with one change."""
    from fido_tx.accounts import reload

    directory = tempfile.mkdtemp(prefix="fido-parts-")
    path = os.path.join(directory, "accounts.json")

    def write(version):
        entries = [{"id": f"x{i}", "host": "h", "username": "u", "password": "p",
                    "mailbox": f"M{version if i == 0 else 0}"} for i in range(n_accounts)]
        with open(path + ".tmp", "w") as f:
            json.dump({"accounts": entries}, f)
        os.replace(path + ".tmp", path)

    class Watcher:
        def __init__(self, callback):
            self.callback = callback

        def start(self):
            pass

        def stop(self):
            pass

    watchers = []
    clock = task.Clock()
    write(0)
    source = reload.AccountsSource(
        clock, path, "", lambda accounts, diff: None,
        lambda p, callback: watchers.append(Watcher(callback)) or watchers[-1],
        cache_path=os.path.join(directory, "last-good"))
    source.log = QUIET
    source.startService()
    try:
        started = time.process_time()
        for version in range(1, times + 1):
            write(version)
            watchers[0].callback()
            clock.advance(0.3)
        return (time.process_time() - started) / times * 1e3
    finally:
        source.stopService()
        shutil.rmtree(directory, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--reload-accounts", type=int, default=10000)
    args = parser.parse_args()
    per_session, count = sessions(args.accounts, args.rounds)
    per_reload = reloads(args.reload_accounts)
    print(json.dumps({"session_us": round(per_session, 2), "sessions": count,
                      "reload_ms": round(per_reload, 1)}))


if __name__ == "__main__":
    main()
