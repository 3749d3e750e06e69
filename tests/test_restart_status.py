"""The real daemon stopped and started again over the same Redis: reports
are sent on real changes only across the restart."""

import pytest_twisted
from twisted.internet import task

from tests import daemon
from tests.support.mockimap import MockIMAPServer, MockMailbox
from tests.test_telling import _account, _raw, _start, _web


@pytest_twisted.inlineCallbacks
def test_recovering_after_a_restart_gets_one_recovered_and_still_failing_gets_none(
    tmp_path, redis
):
    from twisted.internet import reactor

    imap = MockIMAPServer(reactor, {
        "stays": MockMailbox("right", [_raw("stays", 1)]),
        "heals": MockMailbox("right", [_raw("heals", 1)]),
    })
    imap_port = imap.listen()
    capture, web_port, url = _web(reactor)

    def kinds():
        return [(b["account"], b["kind"]) for b in capture.bodies]

    @pytest_twisted.inlineCallbacks
    def run(passwords, sessions_each):
        accounts = [_account(imap_port, user, pw) for user, pw in passwords.items()]
        top, results = _start(reactor, tmp_path, redis, accounts, url, poll_interval=0.2)
        try:
            yield daemon.until(
                reactor,
                lambda: all(sum(1 for i, _ in results if i == user) >= sessions_each
                            for user in passwords),
                20, f"{sessions_each} sessions of each account",
            )
            yield task.deferLater(reactor, 0.5, lambda: None)  # reports in flight land
        finally:
            yield top.stopService()
        return results

    try:
        yield run({"stays": "wrong", "heals": "wrong"}, 2)
        before = kinds()
        assert sorted(before) == [("heals", "auth"), ("stays", "auth")], before
        results = yield run({"stays": "wrong", "heals": "right"}, 3)
        after = kinds()[len(before):]
    finally:
        yield imap.stop()
        yield web_port.stopListening()
    assert [r.kind for i, r in results if i == "heals"][-1] is None
    assert after == [("heals", "recovered")], after
    assert "auth" in capture.bodies[-1]["message"]
    history = redis.client()("LRANGE", "fido:sessions:heals", 0, -1)
    assert 5 <= len(history) <= 50
    assert b'"kind":"ok"' in history[0]
