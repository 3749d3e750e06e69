"""The status page of the real daemon over real HTTP: basic authentication
from [http] username / password_file, /healthz and /metrics left open."""

import json
import os

import attr
import pytest_twisted
import treq

from fido_tx import config, service
from tests import daemon
from tests.support.mockimap import MockIMAPServer, MockMailbox
from tests.support.redis_server import free_port
from tests.test_telling import _account, _raw, _settings


@pytest_twisted.inlineCallbacks
def test_the_daemons_page_asks_for_the_password_and_healthz_does_not(tmp_path, redis):
    from twisted.internet import reactor

    imap = MockIMAPServer(reactor, {"acme": MockMailbox("pw", [_raw("acme", 1)])})
    imap_port = imap.listen()
    directory = str(tmp_path)
    with open(os.path.join(directory, "accounts.json"), "w") as f:
        json.dump({"accounts": [_account(imap_port, "acme", "pw")]}, f)
    password_file = tmp_path / "page-password"
    password_file.write_text("correct horse battery\n")
    http_port = free_port()
    settings = attr.evolve(
        _settings(directory, redis.url, "", poll_interval=60),
        http=config.HttpSettings(listen=f"tcp:{http_port}:interface=127.0.0.1", username="ops",
                                 password_file=str(password_file)),
    )
    top = service.make_service(settings, reactor, observer=False)
    results = []
    top.parts["scheduler"].add_result_observer(lambda a, r: results.append(r))
    top.startService()
    base = f"http://127.0.0.1:{http_port}"
    try:
        yield daemon.until(reactor, lambda: results, 10, "a session")
        anonymous = yield treq.get(base + "/", reactor=reactor, persistent=False)
        yield anonymous.content()
        wrong = yield treq.get(base + "/", auth=("ops", "nope"), reactor=reactor,
                               persistent=False)
        yield wrong.content()
        right = yield treq.get(base + "/", auth=("ops", "correct horse battery"),
                               reactor=reactor, persistent=False)
        page = yield right.text()
        health = yield treq.get(base + "/healthz", reactor=reactor, persistent=False)
        yield health.content()
        metrics = yield treq.get(base + "/metrics", reactor=reactor, persistent=False)
        yield metrics.content()
    finally:
        yield top.stopService()
        yield imap.stop()
    assert (anonymous.code, wrong.code, right.code) == (401, 401, 200)
    assert "acme" in page and "correct horse" not in page
    assert health.code == 200
    assert metrics.code == 200
