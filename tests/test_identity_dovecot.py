"""A real UIDVALIDITY change on a real Dovecot, into a real Redis stream:
the mailbox is deleted and recreated (a restore from backup) with the same
messages unseen again and one new message.  Nothing is delivered twice and
everything is marked; with the daemon's epochs no body is fetched again."""

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from fido_tx.accounts.model import Account
from fido_tx.config import ImapSettings, RedisSettings
from fido_tx.redis import keys
from fido_tx.sources.imap import identity
from fido_tx.sources.imap.session import fetch_mailbox

PASSWORD = "restore-pw"
SETTINGS = ImapSettings(connect_timeout=5.0, greeting_timeout=5.0, command_timeout=5.0,
                        logout_timeout=2.0)


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory):
    from tests.support import dovecot as dc

    with dc.started(tmp_path_factory.mktemp("dovecot"), users={"alice": PASSWORD}) as server:
        yield server


def stream_sink(redis):
    from fido_tx.redis.connection import RedisConnection
    from fido_tx.sinks import SinkContext, module

    connection = RedisConnection(reactor, RedisSettings(url=redis.url))
    connection.startService()
    stream = module("stream")
    sink = stream.build("default", stream.validate({"stream": "fido:messages"}, "."),
                        SinkContext(reactor=reactor, redis=connection))
    return connection, sink


def uidvalidity(dovecot):
    client = dovecot.imap(user="alice")
    try:
        typ, data = client.status("INBOX", "(UIDVALIDITY)")
        return int(data[0].split(b"UIDVALIDITY ")[1].rstrip(b")"))
    finally:
        client.logout()


@pytest.mark.parametrize("epochs", [True, False], ids=["daemon-epochs", "session-alone"])
@pytest_twisted.inlineCallbacks
def test_a_mailbox_recreated_with_a_new_uidvalidity_delivers_only_the_new_message(
        dovecot, redis, epochs):
    from tests.support import dovecot as dc

    dovecot.reset("alice", uidvalidity=1000)
    old = [dc.make_message(i, 3000) for i in range(3)]
    old.append(b"From: a@example.test\r\nSubject: no id\r\n\r\nno Message-ID here\r\n")
    for raw in old:
        dovecot.add_message("alice", raw)
    acct = Account(id="restore", host="localhost", port=dovecot.port, username="alice",
                   password=PASSWORD, security="starttls", ca_file=dovecot.ca_file)
    connection, sink = stream_sink(redis)
    memory = identity.Epochs() if epochs else None
    try:
        yield _connected(connection)
        first = yield fetch_mailbox(reactor, acct, sink, SETTINGS, epochs=memory)
        assert first.ok and first.fetched == 4, first.debug
        # restored from a backup taken before the fetch: a new UIDVALIDITY,
        # the same messages unseen, and one that arrived meanwhile
        dovecot.reset("alice", uidvalidity=2000)
        new = dc.make_message(9, 5000)
        for raw in old + [new]:
            dovecot.add_message("alice", raw)
        assert uidvalidity(dovecot) == 2000
        second = yield fetch_mailbox(reactor, acct, sink, SETTINGS, epochs=memory)
    finally:
        yield connection.stopService()
    assert second.ok, second.debug
    r = redis.client()
    entries = r("XRANGE", "fido:messages", "-", "+")
    raws = [dict(zip(f[0::2], f[1::2]))[b"raw"] for _, f in entries]
    assert raws == old + [new]
    assert sorted(r("SMEMBERS", keys.dedupe("restore", "INBOX", "2000"))) == \
        [b"1", b"2", b"3", b"4", b"5"]
    assert set(dovecot.flags("alice").values()) == {"S"}
    assert second.marked == 5
    # with the daemon's epochs only the new message and the one without a
    # Message-ID (told by its bytes) are fetched again; alone, every body
    fetched_again = [new, old[3]] if epochs else old + [new]
    assert (second.fetched, second.bytes) == (len(fetched_again),
                                             sum(map(len, fetched_again)))


def _connected(connection):
    if connection.connected:
        return defer.succeed(True)
    d = defer.Deferred()
    connection.add_connection_observer(lambda up: up and not d.called and d.callback(True))
    return d.addTimeout(10, reactor)
