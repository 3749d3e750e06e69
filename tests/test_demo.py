"""``fido demo``: the main job in one command."""

import subprocess
import sys

from tests.support.redis_server import find_redis_server, require


def test_demo_fetches_the_sample_mail_into_redis_and_exits_0():
    require("redis-server", find_redis_server())
    result = subprocess.run(
        [sys.executable, "-m", "fido_tx", "demo", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "12 of 12 messages in Redis, all marked on the server." in result.stdout
    assert result.stdout.count("<demo-") == 9  # three of the twelve have no Message-ID
    assert "(none)" in result.stdout
