"""Shared pytest fixtures: real servers on loopback.

Unit tests are trial ``SynchronousTestCase`` classes (they run under pytest and
under ``python -m twisted.trial tests``); asynchronous tests are plain pytest
functions using pytest-twisted.  Never an async trial ``TestCase`` here.
"""

import pytest

from tests.support import redis_server


@pytest.fixture
def redis():
    """A fresh redis-server on a free port, stopped after the test."""
    binary = redis_server.require("redis-server", redis_server.find_redis_server())
    server = redis_server.RedisServer(binary).start()
    try:
        yield server
    finally:
        server.close()
