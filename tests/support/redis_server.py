"""A real Redis server for tests: the package's helper plus skip-or-fail.

When no redis-server exists, tests skip locally but fail in CI (``CI=true``).
"""

import os

import pytest

from fido_tx.demo.redisserver import (  # noqa: F401 - re-exported for tests
    RedisServer,
    RespClient,
    find_redis_server,
    free_port,
)


def require(what, found):
    """Skip a test when a server is missing, but fail in CI."""
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required in CI but was not found", pytrace=False)
    pytest.skip(f"{what} not installed")
