"""select = "new" / start_from = "now" against a real Dovecot mailbox holding
3,000 old unread messages, delivering to a real Redis stream (issue 11)."""

import pytest_twisted
from twisted.internet import reactor

from fido_tx import sinks
from fido_tx.accounts.model import Account
from fido_tx.config import ImapSettings
from fido_tx.redis.positions import MailboxPositions
from fido_tx.sources.imap.session import fetch_mailbox
from tests.support.dovecot import make_message
from tests.support.redisconn import close, shared_connection

OLD = 3000
SETTINGS = ImapSettings(connect_timeout=10.0, greeting_timeout=10.0, command_timeout=20.0)


def _account(dovecot, user, **kw):
    return Account(id=user.split("@")[0], host="localhost", port=dovecot.port,
                   security="starttls", username=user, password=dovecot.users[user],
                   ca_file=dovecot.ca_file, **kw)


def _entries(redis, account_id):
    out = []
    for _id, flat in redis.client()("XRANGE", "fido:messages", "-", "+"):
        fields = dict(zip(flat[::2], flat[1::2]))
        if fields[b"account"] == account_id.encode():
            out.append(fields)
    return out


@pytest_twisted.inlineCallbacks
def test_3000_old_unread_are_left_and_each_later_message_is_delivered_once(dovecot, redis):
    users = {"old-unseen@fido.test": "pw-unseen", "old-new@fido.test": "pw-new"}
    dovecot.add_users(users)
    for k, user in enumerate(users):
        for i in range(OLD):  # written straight into the Maildir: fast
            dovecot.add_message(user, make_message(k * 10000 + i, 300))
    conn = yield shared_connection(reactor, redis.port)
    try:
        module = sinks.module("stream")
        sink = module.build("default", module.validate(dict(module.OPTIONS), "/"),
                            sinks.SinkContext(reactor, conn))
        positions = MailboxPositions(conn)
        accounts = {
            "unseen": _account(dovecot, "old-unseen@fido.test", start_from="now"),
            "new": _account(dovecot, "old-new@fido.test", start_from="now", select="new"),
        }

        def poll(account):
            return fetch_mailbox(reactor, account, sink, SETTINGS, positions=positions)

        for account in accounts.values():
            result = yield poll(account)
            assert result.ok and result.fetched == 0 and result.marked == 0, result
            assert (yield positions.get(account.id, "INBOX"))[1] == OLD
        assert redis.client()("XLEN", "fido:messages") == 0

        later = {}
        for name, account in accounts.items():
            user = account.username
            later[name] = [make_message(90000 + j, 500, tag=j) for j in range(3)]
            dovecot.add_message(user, later[name][0])
            dovecot.add_message(user, later[name][1], flags="S")  # a person read it already
            dovecot.add_message(user, later[name][2])
        for _ in range(2):  # the second poll finds nothing more
            for account in accounts.values():
                result = yield poll(account)
                assert result.ok, result

        unseen = _entries(redis, accounts["unseen"].id)
        new = _entries(redis, accounts["new"].id)
        assert [e[b"raw"] for e in unseen] == [later["unseen"][0], later["unseen"][2]]
        assert [e[b"raw"] for e in new] == later["new"]  # the \\Seen one too, once
        assert [int(e[b"uid"]) for e in new] == [OLD + 1, OLD + 2, OLD + 3]
        for name, account in accounts.items():
            flags = dovecot.flags(account.username)
            old_flags = [f for mid, f in flags.items() if mid.endswith(".300.0@fido.test>")]
            assert len(old_flags) == OLD and set(old_flags) == {""}, name  # untouched
            assert (yield positions.get(account.id, "INBOX"))[1] == OLD + 3
        # and a dry run on it reads the position, writes nothing, would take nothing
        dry = yield fetch_mailbox(reactor, accounts["new"], sink, SETTINGS,
                                  positions=positions, dry_run=True)
        assert dry.ok and dry.fetched == 0, dry
    finally:
        yield close(conn)
