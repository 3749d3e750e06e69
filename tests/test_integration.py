"""The spine end to end: the real daemon, a real Dovecot and a real Redis."""

import os
import signal
import time

import pytest_twisted

from tests import daemon
from tests.support import dovecot as dovecot_support
from tests.support.dovecot import make_message

TWO_MIB = 2 * 1024 * 1024




def stream_entries(redis):
    client = redis.client()
    out = []
    for entry_id, flat in client("XRANGE", "fido:messages", "-", "+"):
        out.append(dict(zip((k.decode() for k in flat[::2]), flat[1::2])))
    return out


def provision_mixed(dovecot, n_accounts):
    """n accounts, each with a plain and an 8-bit message; the first also has 2 MiB."""
    sent = {}
    users = {}
    for k in range(n_accounts):
        user = f"mixed{k:02d}@fido.test"
        users[user] = f"pw-{k}-secret"
    dovecot.add_users(users)
    for k, user in enumerate(users):
        messages = [make_message(k * 10 + 1, 4096), make_message(k * 10 + 2, 2048, eight_bit=True)]
        if k == 0:
            messages.append(make_message(k * 10 + 3, TWO_MIB, attachment=True))
        for raw in messages:
            dovecot.add_message(user, raw)
        sent[user] = messages
    return users, sent


def run_once(reactor, tmp_path, redis, accounts, **kw):
    """Run the daemon until every account had one session; then stop it."""
    directory = str(tmp_path / "fido")
    os.makedirs(directory, exist_ok=True)
    daemon.write_accounts(os.path.join(directory, "accounts.json"), accounts)
    d = daemon.InProcessDaemon(reactor, daemon.settings_for(directory, redis.url, **kw))
    d.start()
    waiting = d.wait_for_sessions([a["id"] for a in accounts], reactor)

    def stop(result):
        return d.stop().addCallback(lambda _: d)

    return waiting.addCallback(stop)


@pytest_twisted.inlineCallbacks
def test_twenty_accounts_land_exactly_once_byte_identical_and_marked_seen(
    tmp_path, dovecot, redis
):
    from twisted.internet import reactor

    users, sent = provision_mixed(dovecot, 20)
    securities = ["tls", "starttls", "none"]
    accounts = [
        daemon.dovecot_account(dovecot, user, securities[k % 3]) for k, user in enumerate(users)
    ]
    d = yield run_once(reactor, tmp_path, redis, accounts)
    assert [r.kind for _, r in d.results] == [None] * 20, [r.message for _, r in d.results]

    entries = stream_entries(redis)
    total = sum(len(m) for m in sent.values())
    assert len(entries) == total
    by_key = {}
    for e in entries:
        key = (e["account"], e["uid"])
        assert key not in by_key, f"duplicate entry {key}"
        by_key[key] = e
    for user, messages in sent.items():
        account_id = user.split("@")[0]
        raws = sorted(e["raw"] for e in entries if e["account"] == account_id.encode())
        assert raws == sorted(messages), f"{account_id}: not byte-identical"
        for e in entries:
            if e["account"] == account_id.encode():
                assert int(e["size"]) == len(e["raw"])
                assert e["mailbox"] == b"INBOX"
                assert e["message_id"].startswith(b"<fido.")
        assert set(dovecot.flags(user).values()) == {"S"}, dovecot.flags(user)
    assert any(len(e["raw"]) >= TWO_MIB for e in entries)

    hash_ = redis.client()("HGETALL", "fido:account:mixed00")
    fields = dict(zip(hash_[::2], hash_[1::2]))
    assert fields[b"state"] == b"ok"
    assert fields[b"fetched_total"] == b"3"

    [instance] = redis.client()("KEYS", "fido:instance:*")
    beat = redis.client()("HGETALL", instance)
    beat = dict(zip(beat[::2], beat[1::2]))
    assert beat[b"accounts"] == b"20"
    assert beat[b"sessions"].isdigit(), beat
    assert 0 < redis.client()("TTL", instance) <= 45

    # A second daemon run finds nothing new and adds nothing.
    d2 = yield run_once(reactor, tmp_path, redis, accounts)
    assert all(r.ok and r.fetched == 0 for _, r in d2.results)
    assert len(stream_entries(redis)) == total


@pytest_twisted.inlineCallbacks
def test_after_fetch_delete_removes_messages_from_the_server(tmp_path, dovecot, redis):
    from twisted.internet import reactor

    users, sent = provision_mixed(dovecot, 2)
    accounts = [daemon.dovecot_account(dovecot, u, "tls", after_fetch="delete") for u in users]
    d = yield run_once(reactor, tmp_path, redis, accounts)
    assert all(r.ok for _, r in d.results), [r.message for _, r in d.results]
    assert len(stream_entries(redis)) == sum(len(m) for m in sent.values())
    for user in users:
        assert dovecot.count(user) == 0


@pytest_twisted.inlineCallbacks
def test_after_fetch_move_puts_messages_in_archive(tmp_path, dovecot, redis):
    from twisted.internet import reactor

    users, sent = provision_mixed(dovecot, 2)
    for user in users:
        dovecot.create_folder(user, "Archive")
    accounts = [
        daemon.dovecot_account(dovecot, u, "starttls", after_fetch="move:Archive") for u in users
    ]
    d = yield run_once(reactor, tmp_path, redis, accounts)
    assert all(r.ok for _, r in d.results), [r.message for _, r in d.results]
    for user in users:
        assert dovecot.count(user) == 0
        assert dovecot.count(user, "Archive") == len(sent[user])
    assert len(stream_entries(redis)) == sum(len(m) for m in sent.values())


@pytest_twisted.inlineCallbacks
def test_certificate_for_another_host_fails_with_tls_error_and_no_login(tmp_path, redis):
    from twisted.internet import reactor

    pki = dovecot_support.tlsca.files()
    with dovecot_support.started(str(tmp_path / "dovecot"), cert=pki.wrong_name) as server:
        server.add_users({"tlsuser@fido.test": "never-sent-secret"})
        server.add_message("tlsuser@fido.test", make_message(1, 1000))
        account = daemon.dovecot_account(server, "tlsuser@fido.test", "tls")
        d = yield run_once(reactor, tmp_path, redis, [account])
        [(_, result)] = d.results
        assert result.kind == "tls"
        assert "certificate" in result.message.lower()
        assert "never-sent-secret" not in result.debug
        log = server.read_log()
        assert "tlsuser@fido.test" not in log, "the server saw a login attempt"
        assert stream_entries(redis) == []
        hash_ = redis.client()("HGETALL", "fido:account:tlsuser")
        fields = dict(zip(hash_[::2], hash_[1::2]))
        assert fields[b"last_error_kind"] == b"tls"


@pytest_twisted.inlineCallbacks
def test_starttls_account_is_refused_before_login_when_server_lacks_starttls(tmp_path, redis):
    from twisted.internet import reactor

    with dovecot_support.started(str(tmp_path / "dovecot"), tls=False) as server:
        server.add_users({"plainonly@fido.test": "never-sent-secret"})
        server.add_message("plainonly@fido.test", make_message(1, 1000))
        account = daemon.dovecot_account(server, "plainonly@fido.test", "starttls")
        d = yield run_once(reactor, tmp_path, redis, [account])
        [(_, result)] = d.results
        assert result.kind == "tls"
        assert "STARTTLS" in result.message
        assert "plainonly@fido.test" not in server.read_log()
        assert server.flags("plainonly@fido.test") == {"<fido.1.1000.0@fido.test>": ""}


def test_sigkill_in_the_middle_of_fetching_neither_loses_nor_duplicates(tmp_path, dovecot, redis):
    users = {f"kill{k:02d}@fido.test": f"pw{k}" for k in range(10)}
    dovecot.add_users(users)
    for k, user in enumerate(users):
        for i in range(20):
            dovecot.add_message(user, make_message(k * 100 + i, 40 * 1024))
    total = 10 * 20
    directory = str(tmp_path / "fido")
    os.makedirs(directory)
    accounts = [daemon.dovecot_account(dovecot, u, "tls") for u in users]
    daemon.write_accounts(os.path.join(directory, "accounts.json"), accounts)
    config_path = os.path.join(directory, "fido.toml")
    daemon.write_config(
        config_path, directory, redis.url, workers=2,
        extra="[imap]\nbatch_messages = 2\n",
    )
    log_path = os.path.join(directory, "fido.log")
    client = redis.client()

    def xlen():
        return client("XLEN", "fido:messages")

    proc = daemon.start_twistd(config_path, directory, log_path)
    try:
        deadline = time.monotonic() + 60
        while xlen() < 30 and time.monotonic() < deadline:
            assert proc.poll() is None, open(log_path).read()
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        at_kill = xlen()
        assert 0 < at_kill < total, f"kill did not land mid-fetch ({at_kill} of {total})"

        proc = daemon.start_twistd(config_path, directory, log_path)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            done = xlen() == total and all(
                set(dovecot.flags(u).values()) == {"S"} for u in users
            )
            if done:
                break
            assert proc.poll() is None, open(log_path).read()
            time.sleep(0.2)
        entries = stream_entries(redis)
        keys = [(e["account"], e["uidvalidity"], e["uid"]) for e in entries]
        assert len(keys) == len(set(keys)), "duplicate stream entries"
        assert len(entries) == total, open(log_path).read()[-3000:]
        for u in users:
            assert set(dovecot.flags(u).values()) == {"S"}
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


def test_sighup_reloads_the_accounts_file_and_the_daemon_keeps_running(tmp_path, redis):
    directory = str(tmp_path / "fido")
    os.makedirs(directory)
    account = {"id": "closed", "host": "127.0.0.1", "port": 9, "security": "none",
               "username": "u", "password": "p"}
    daemon.write_accounts(os.path.join(directory, "accounts.json"), [account])
    config_path = os.path.join(directory, "fido.toml")
    daemon.write_config(config_path, directory, redis.url)
    log_path = os.path.join(directory, "fido.log")
    proc = daemon.start_twistd(config_path, directory, log_path)
    try:
        deadline = time.monotonic() + 20
        # The handler is installed when the service starts, after the watch.
        while "for changes with" not in open(log_path).read():
            assert proc.poll() is None, open(log_path).read()
            assert time.monotonic() < deadline, open(log_path).read()
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "SIGHUP: reloading the accounts file" not in open(log_path).read():
            assert time.monotonic() < deadline, open(log_path).read()
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None, "SIGHUP ended the daemon"
        proc.terminate()
        assert proc.wait(30) == 0, open(log_path).read()
    finally:
        if proc.poll() is None:
            proc.kill()


MALFORMED = [
    # no Message-ID, a header line without a colon, a bare LF line end
    b"From: a@example.org\r\nThis line has no colon\r\nSubject: x\n\r\nbody\r\n",
    # broken MIME: the boundary never appears, a charset that does not exist
    b"Message-ID: <broken.mime@x>\r\nContent-Type: multipart/mixed; boundary=\"nope\"\r\n"
    b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\n\xff\xfe\x00\x01 binary\r\n",
    # NUL bytes and invalid UTF-8 in a header
    b"Message-ID: <nul@x>\r\nSubject: \xc3\x28 \x00 nul\r\n\r\n\x00\x00\x00\r\n",
    # a folded, oversized Message-ID and no body at all
    b"Message-ID:\r\n <folded.and." + b"x" * 900 + b"@x>\r\n\r\n",
]


@pytest_twisted.inlineCallbacks
def test_malformed_mail_is_stored_byte_for_byte(tmp_path, dovecot, redis):
    from twisted.internet import reactor

    dovecot.add_users({"odd@fido.test": "pw"})
    for raw in MALFORMED:
        dovecot.add_message("odd@fido.test", raw)
    # What the server sends (Dovecot itself turns a bare LF into CRLF and NUL
    # into 0x80), read without marking anything:
    client = dovecot.imap("tls", "odd@fido.test")
    client.select("INBOX", readonly=True)
    _, data = client.uid("FETCH", "1:*", "(BODY.PEEK[])")
    served = sorted(part[1] for part in data if isinstance(part, tuple))
    client.logout()
    assert len(served) == len(MALFORMED)
    d = yield run_once(reactor, tmp_path, redis, [daemon.dovecot_account(dovecot, "odd@fido.test")])
    [(_, result)] = d.results
    assert result.ok, result.message
    entries = stream_entries(redis)
    assert sorted(e["raw"] for e in entries) == served
    ids = sorted(e["message_id"] for e in entries)
    assert ids[0] == b"" and b"<broken.mime@x>" in ids and b"<nul@x>" in ids
    assert any(i.startswith(b"<folded.and.") for i in ids)


@pytest_twisted.inlineCallbacks
def test_dry_run_changes_neither_the_mailboxes_nor_redis(tmp_path, dovecot, redis):
    import attr
    from twisted.internet import reactor

    users, sent = provision_mixed(dovecot, 3)
    accounts = [daemon.dovecot_account(dovecot, u, "tls", after_fetch="delete") for u in users]
    directory = str(tmp_path / "fido")
    os.makedirs(directory)
    daemon.write_accounts(os.path.join(directory, "accounts.json"), accounts)
    settings = daemon.settings_for(directory, redis.url)
    settings = attr.evolve(settings, fido=attr.evolve(settings.fido, dry_run=True))
    d = daemon.InProcessDaemon(reactor, settings)
    d.start()
    yield d.wait_for_sessions([a["id"] for a in accounts], reactor)
    yield d.stop()
    assert all(r.ok and r.dry_run for _, r in d.results)
    assert sum(r.fetched for _, r in d.results) == sum(len(m) for m in sent.values())
    assert redis.client()("KEYS", "*") == [], "a dry run wrote to Redis"
    for user in users:
        assert dovecot.count(user) == len(sent[user])
        assert set(dovecot.flags(user).values()) == {""}, dovecot.flags(user)
