"""``fido check --connect`` and ``fido status`` as an operator runs them:
subprocesses against a real Dovecot and Redis, one good and one bad account."""

import json
import os
import subprocess
import sys

import pytest

from tests import daemon
from tests.support.dovecot import make_message




def fido(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "fido_tx", *args],
        capture_output=True, text=True, timeout=120, env=env,
    )


@pytest.fixture
def setup(tmp_path, dovecot, redis):
    dovecot.add_users({"good@fido.test": "good-secret", "bad@fido.test": "real-secret"})
    for i in range(3):
        dovecot.add_message("good@fido.test", make_message(i, 2000))
    directory = str(tmp_path / "fido")
    os.makedirs(directory)
    good = daemon.dovecot_account(dovecot, "good@fido.test", "tls", id="acme-support")
    bad = daemon.dovecot_account(dovecot, "bad@fido.test", "starttls", id="acme-billing")
    bad["password"] = "typo-secret"
    daemon.write_accounts(os.path.join(directory, "accounts.json"), [good, bad])
    config_path = os.path.join(directory, "fido.toml")
    daemon.write_config(config_path, directory, redis.url)
    return config_path, directory


def test_check_connect_shows_the_good_and_the_bad_account(setup):
    config_path, _ = setup
    result = fido("--config", config_path, "check", "--connect")
    print(result.stdout)
    assert result.returncode == 1, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("acme")}
    assert "ok: 3 unseen" in lines["acme-support"]
    assert "auth" in lines["acme-billing"]
    assert "typo-secret" not in result.stdout + result.stderr
    as_json = json.loads(fido("--config", config_path, "check", "--connect", "--json").stdout)
    assert as_json  # a document a script can read


def test_status_after_a_daemon_run_lists_states_errors_and_the_instance(setup, redis):
    config_path, directory = setup
    proc = daemon.start_twistd(config_path, directory, os.path.join(directory, "fido.log"))
    try:
        client = redis.client()
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if len(client("KEYS", "fido:account:*")) == 2:
                break
            time.sleep(0.1)
        result = fido("--config", config_path, "status")
        print(result.stdout)
        assert result.returncode == 0, result.stderr
        assert "acme-billing" in result.stdout and "auth" in result.stdout
        assert "acme-support" in result.stdout or "1 ok" in result.stdout
        doc = json.loads(fido("--config", config_path, "status", "--json").stdout)
        assert doc["summary"]["total"] == 2
        assert doc["summary"]["by_kind"] == {"auth": 1}
        assert len(doc["instances"]) == 1
        assert "typo-secret" not in json.dumps(doc)
    finally:
        proc.terminate()
        proc.wait(30)
