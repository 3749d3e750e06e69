"""Running the real daemon in tests: in-process on the test's reactor, or as
``twistd -n fido`` in a subprocess (for SIGKILL)."""

import json
import os
import subprocess
import sys
import time

from twisted.internet import defer, task

from fido_tx import config
from fido_tx import service


def write_accounts(path, accounts):
    with open(path, "w") as f:
        json.dump({"accounts": accounts}, f)


def dovecot_account(dovecot, user, security="tls", **extra):
    account = {
        "id": user.split("@")[0],
        "host": "localhost",
        "port": dovecot.ssl_port if security == "tls" else dovecot.port,
        "security": security,
        "username": user,
        "password": dovecot.users[user],
        "ca_file": dovecot.ca_file,
    }
    if security == "none":
        del account["ca_file"]
    account.update(extra)
    return account


def settings_for(directory, redis_url, workers=8, poll_interval=3600.0, **imap):
    return config.Settings(
        fido=config.FidoSettings(
            accounts_file=os.path.join(directory, "accounts.json"),
            key_file="",
            workers=workers,
            poll_interval=poll_interval,
            state_dir=directory,
        ),
        imap=config.ImapSettings(**imap),
        redis=config.RedisSettings(url=redis_url),
        http=config.HttpSettings(listen=""),
        path=os.path.join(directory, "fido.toml"),
    )


class InProcessDaemon:
    """``make_service`` on the running reactor, with a way to wait for sessions."""

    def __init__(self, reactor, settings):
        self.top = service.make_service(settings, reactor, observer=False)
        self.scheduler = self.top.parts["scheduler"]
        self.results = []
        self._waiters = []
        self.scheduler.add_result_observer(self._on_result)

    def _on_result(self, account, result):
        self.results.append((account, result))
        for ids, d in list(self._waiters):
            if ids <= {a.id for a, _ in self.results}:
                self._waiters.remove((ids, d))
                d.callback(None)

    def wait_for_sessions(self, account_ids, reactor, timeout=60):
        """Fires when every account in ``account_ids`` has had a session."""
        d = defer.Deferred()
        self._waiters.append((set(account_ids), d))
        self._on_result_check()
        return d.addTimeout(timeout, reactor)

    def _on_result_check(self):
        seen = {a.id for a, _ in self.results}
        for ids, d in list(self._waiters):
            if ids <= seen:
                self._waiters.remove((ids, d))
                d.callback(None)

    def start(self):
        self.top.startService()

    def stop(self):
        return self.top.stopService()


def write_config(path, directory, redis_url, workers=8, poll_interval=60, extra="",
                 fido_extra=""):
    """``fido_extra``: more lines for the ``[fido]`` section (TOML cannot
    reopen a table in ``extra``), e.g. ``"grace_period = 3\n"``."""
    with open(path, "w") as f:
        f.write(
            f"""[fido]
accounts_file = "accounts.json"
key_file = ""
workers = {workers}
poll_interval = {poll_interval}
state_dir = "{directory}"
{fido_extra}

[redis]
url = "{redis_url}"

[http]
listen = ""
{extra}
"""
        )


def twistd():
    """The twistd script of the Python running the tests."""
    return os.path.join(os.path.dirname(sys.executable), "twistd")


def start_twistd(config_path, cwd, log_path):
    """``twistd -n fido --config`` as a subprocess (no pidfile)."""
    log = open(log_path, "ab")
    return subprocess.Popen(
        [twistd(), "-n", "--pidfile=", "fido", "--config", config_path],
        cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
    )


def log_tail(path, chars=4000):
    """The end of a daemon's log file, for assertion messages."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chars))
            return f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(no log: {e})"


@defer.inlineCallbacks
def until(reactor, predicate, timeout, what):
    """Fires once ``predicate()`` is true; fails after ``timeout`` seconds
    with a message naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        yield task.deferLater(reactor, 0.02, lambda: None)
