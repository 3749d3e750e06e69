"""Shared pytest fixtures: real servers on loopback.

Unit tests are trial ``SynchronousTestCase`` classes (they run under pytest and
under ``python -m twisted.trial tests``); asynchronous tests are plain pytest
functions using pytest-twisted.  Never an async trial ``TestCase`` here.
"""

import pytest

from tests.support import dovecot as dovecot_support
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


@pytest.fixture
def aof_redis(tmp_path):
    """A Redis that keeps its data over stop()/start() (appendonly, fsync always)."""
    binary = redis_server.require("redis-server", redis_server.find_redis_server())
    directory = tmp_path / "redis"
    directory.mkdir()
    server = redis_server.RedisServer(binary, appendonly=True, directory=str(directory)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dovecot():
    """A fresh Dovecot on free loopback ports: STARTTLS on ``.port``, implicit
    TLS on ``.ssl_port``, the test CA's certificate for localhost."""
    with dovecot_support.started() as server:
        yield server
