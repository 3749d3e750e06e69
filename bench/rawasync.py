"""The raw asyncio fetcher Fido is compared with: one process, N connections, no library.

The least a one-process fetcher can do per message, as a floor for Fido's
CPU: ``asyncio`` streams, a minimal IMAP client and a minimal RESP writer
(no redis library), N sessions at once, each taking one account at a time::

    LOGIN, SELECT, UID SEARCH UNSEEN,
    per batch of 25 UIDs: UID FETCH BODY.PEEK[], one EVALSHA that, per
                          message, skips a UID already in the dedupe set,
                          else XADDs Fido's entry and SADDs the UID,
                          UID STORE +FLAGS.SILENT (\\Seen)
    LOGOUT

The stream entry has Fido's fields (account mailbox uidvalidity uid
message_id size fetched_at raw source route_key) and the dedupe set is
Fido's (``fido:uids:{<account>}:<uidvalidity>:<mailbox>``), so the server
side does what it does for Fido; what the raw client leaves out is what
Fido adds around it: the account's state hash and history, STATUS before
SELECT, RFC822.SIZE and the byte budget, per-command deadlines (one
deadline per session here), bounds on what a server sends, the scheduler,
reporting and logs.  All sessions share one Redis connection (pipelined, as
Fido's is).

Reads the same ``accounts.json`` as Fido (``security`` ``tls``/``none``,
``ca_file``), goes through every account once and exits; the exit status is
1 when an account failed::

    python bench/rawasync.py --accounts accounts.json --connections 16 \\
        --redis-url redis://127.0.0.1:6379/0 --stream fido:messages
"""

import argparse
import asyncio
import collections
import datetime
import json
import re
import ssl
import sys
import time
from urllib.parse import urlsplit

BATCH = 25
_LITERAL = re.compile(rb"\{(\d+)\}\r\n\Z")
_UID = re.compile(rb"UID (\d+)")
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*(<[^>\r\n]*>)")

#: KEYS: stream, dedupe set; ARGV: per message the UID, then 20 field values
_SCRIPT = b"""
local new = 0
for i = 1, #ARGV, 21 do
  if redis.call('SISMEMBER', KEYS[2], ARGV[i]) == 0 then
    redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 1, i + 20))
    redis.call('SADD', KEYS[2], ARGV[i])
    new = new + 1
  end
end
return new
"""


class CommandFailed(Exception):
    pass


# --- Redis ------------------------------------------------------------------


def resp(*args):
    """One command in RESP, as a list of pieces."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if not isinstance(a, bytes):
            a = str(a).encode()
        out.append(b"$%d\r\n" % len(a))
        out.append(a)
        out.append(b"\r\n")
    return out


class Redis:
    """One pipelined connection: replies answer the commands in order."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.waiting = collections.deque()
        self.task = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, url):
        u = urlsplit(url)
        reader, writer = await asyncio.open_connection(u.hostname or "127.0.0.1", u.port or 6379)
        r = cls(reader, writer)
        db = (u.path or "/0").strip("/") or "0"
        if db != "0":
            await r.call(b"SELECT", db)
        return r

    def call(self, *args):
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        self.writer.writelines(resp(*args))
        return fut

    async def _reply(self):
        line = await self.reader.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            return CommandFailed(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else (await self.reader.readexactly(n + 2))[:-2]
        if kind == b"*":
            return [await self._reply() for _ in range(int(rest))]
        raise ConnectionError(f"Redis: unexpected reply {line[:80]!r}")

    async def _read(self):
        try:
            while True:
                value = await self._reply()
                fut = self.waiting.popleft()
                if isinstance(value, CommandFailed):
                    fut.set_exception(value)
                else:
                    fut.set_result(value)
        except Exception as e:  # noqa: BLE001 - every caller waiting learns it
            while self.waiting:
                fut = self.waiting.popleft()
                if not fut.done():
                    fut.set_exception(ConnectionError(f"Redis connection lost: {e!r}"))

    def close(self):
        self.task.cancel()
        self.writer.close()


# --- IMAP -------------------------------------------------------------------


def quote(s):
    return b'"' + s.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


class Imap:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.tag = 0

    async def greeting(self):
        line = await self.reader.readline()
        if not line.startswith(b"* OK"):
            raise CommandFailed(f"greeting: {line[:80]!r}")

    async def command(self, line):
        """Send one command; return its untagged responses, each a list of
        text and literal pieces."""
        self.tag += 1
        tag = b"A%d" % self.tag
        self.writer.write(tag + b" " + line + b"\r\n")
        responses = []
        read = self.reader.readline
        while True:
            text = await read()
            if not text:
                raise ConnectionError("IMAP server closed the connection")
            if text.startswith(tag):
                if text[len(tag) + 1:len(tag) + 3] != b"OK":
                    raise CommandFailed(f"{line.split(b' ')[0].decode()}: {text[:120]!r}")
                return responses
            parts = [text]
            m = _LITERAL.search(text)
            while m:
                parts.append(await self.reader.readexactly(int(m.group(1))))
                text = await read()
                parts.append(text)
                m = _LITERAL.search(text)
            responses.append(parts)


async def session(account, redis, stream, contexts):
    host, port = account["host"], account["port"]
    ctx = None
    if account.get("security", "tls") == "tls":
        ca = account.get("ca_file") or None
        ctx = contexts.get(ca)
        if ctx is None:
            ctx = contexts[ca] = ssl.create_default_context(cafile=ca)
    async with asyncio.timeout(300):  # one deadline over the whole session
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ctx, server_hostname=host if ctx else None)
        try:
            imap = Imap(reader, writer)
            await imap.greeting()
            await imap.command(b"LOGIN " + quote(account["username"]) + b" "
                               + quote(account["password"]))
            mailbox = account.get("mailbox", "INBOX")
            uidvalidity = b"0"
            for parts in await imap.command(b"SELECT " + quote(mailbox)):
                m = _UIDVALIDITY.search(parts[0])
                if m:
                    uidvalidity = m.group(1)
            uids = []
            for parts in await imap.command(b"UID SEARCH UNSEEN"):
                if parts[0].startswith(b"* SEARCH"):
                    uids.extend(parts[0][8:].split())
            fetched = await fetch(imap, redis, stream, account["id"], mailbox, uidvalidity, uids)
            await imap.command(b"LOGOUT")
            return fetched
        finally:
            writer.close()


async def fetch(imap, redis, stream, account_id, mailbox, uidvalidity, uids):
    account_b, mailbox_b = account_id.encode(), mailbox.encode()
    dedupe = b"fido:uids:{%s}:%s:%s" % (account_b, uidvalidity, mailbox_b)
    fetched = 0
    for i in range(0, len(uids), BATCH):
        batch = b",".join(uids[i:i + BATCH])
        args = []
        done = []
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ").encode()
        for parts in await imap.command(b"UID FETCH " + batch + b" (BODY.PEEK[])"):
            if len(parts) < 3:
                continue
            m = _UID.search(parts[0]) or _UID.search(parts[2])
            if not m:
                continue
            uid, raw = m.group(1), parts[1]
            mid = _MESSAGE_ID.search(raw, 0, raw.find(b"\r\n\r\n") + 2 or len(raw))
            args += [uid, b"account", account_b, b"mailbox", mailbox_b,
                     b"uidvalidity", uidvalidity, b"uid", uid,
                     b"message_id", mid.group(1) if mid else b"",
                     b"size", b"%d" % len(raw), b"fetched_at", stamp, b"raw", raw,
                     b"source", b"imap", b"route_key", b""]
            done.append(uid)
        if done:
            await redis.call(b"EVALSHA", redis.sha, b"2", stream, dedupe, *args)
            await imap.command(b"UID STORE " + b",".join(done) + b" +FLAGS.SILENT (\\Seen)")
            fetched += len(done)
    return fetched


async def run(accounts, connections, redis_url, stream):
    redis = await Redis.connect(redis_url)
    redis.sha = await redis.call(b"SCRIPT", b"LOAD", _SCRIPT)
    queue = iter(accounts)
    contexts = {}
    totals = {"fetched": 0, "failed": 0}

    async def worker():
        for account in queue:
            try:
                n = await session(account, redis, stream, contexts)
                totals["fetched"] += n  # not "+= await": another worker adds meanwhile
            except Exception as e:  # noqa: BLE001 - report and go on with the next account
                totals["failed"] += 1
                print(f"rawasync: {account['id']}: {type(e).__name__}: {e}", file=sys.stderr,
                      flush=True)

    await asyncio.gather(*(worker() for _ in range(connections)))
    redis.close()
    return totals


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--accounts", required=True, help="accounts.json (plain)")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--stream", default="fido:messages")
    args = p.parse_args(argv)
    with open(args.accounts, encoding="utf-8") as f:
        accounts = json.load(f)["accounts"]
    start = time.monotonic()
    totals = asyncio.run(run(accounts, args.connections, args.redis_url, args.stream.encode()))
    print(f"rawasync: {len(accounts)} accounts, {totals['fetched']} messages, "
          f"{totals['failed']} failed, {time.monotonic() - start:.2f} s", flush=True)
    return 1 if totals["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
