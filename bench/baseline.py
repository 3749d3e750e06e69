"""The process-based fetcher Fido is compared with: W worker processes.

The way such fetchers are usually written: a ``multiprocessing.Pool`` of W
processes, each taking one account at a time and doing, with the standard
library's ``imaplib`` and ``redis-py``::

    LOGIN, SELECT, UID SEARCH UNSEEN,
    per batch of 25 UIDs: UID FETCH BODY.PEEK[], one RPUSH of the bodies,
                          UID STORE +FLAGS.SILENT (\\Seen)
    LOGOUT

Each worker keeps one Redis connection.  The bodies are pushed raw onto the
list ``--list`` (no dedupe: the baseline is a throughput and memory
reference, not a second implementation of Fido's exactly-once contract).
Reads the same ``accounts.json`` as Fido (``security`` ``tls``/``none``,
``ca_file``), goes through every account once and exits; the exit status is
1 when an account failed.

    python bench/baseline.py --accounts accounts.json --workers 8 \\
        --redis-url redis://127.0.0.1:6379/0
"""

import argparse
import imaplib
import json
import multiprocessing
import re
import ssl
import sys
import time

import redis

BATCH = 25
_UID = re.compile(rb"UID (\d+)")

_redis = None
_list = None
_contexts = {}


def _init(redis_url, list_key):
    global _redis, _list
    _redis = redis.Redis.from_url(redis_url)
    _list = list_key


def _context(ca_file):
    ctx = _contexts.get(ca_file)
    if ctx is None:
        ctx = ssl.create_default_context(cafile=ca_file or None)
        _contexts[ca_file] = ctx
    return ctx


def fetch_account(account):
    """One session; returns ``(id, fetched, error or "")``."""
    fetched = 0
    try:
        if account.get("security", "tls") == "tls":
            client = imaplib.IMAP4_SSL(account["host"], account["port"],
                                       ssl_context=_context(account.get("ca_file")),
                                       timeout=60)
        else:
            client = imaplib.IMAP4(account["host"], account["port"], timeout=60)
        try:
            client.login(account["username"], account["password"])
            typ, _ = client.select(account.get("mailbox", "INBOX"))
            if typ != "OK":
                raise RuntimeError("SELECT failed")
            typ, data = client.uid("SEARCH", "UNSEEN")
            uids = data[0].split() if data and data[0] else []
            for i in range(0, len(uids), BATCH):
                batch = b",".join(uids[i:i + BATCH])
                typ, data = client.uid("FETCH", batch, "(BODY.PEEK[])")
                if typ != "OK":
                    raise RuntimeError("UID FETCH failed")
                bodies, done = [], []
                for item in data:
                    if isinstance(item, tuple):
                        m = _UID.search(item[0])
                        if m:
                            done.append(m.group(1))
                        bodies.append(item[1])
                if bodies:
                    _redis.rpush(_list, *bodies)
                    client.uid("STORE", b",".join(done), "+FLAGS.SILENT", "(\\Seen)")
                    fetched += len(bodies)
                del bodies, data
        finally:
            try:
                client.logout()
            except Exception:
                pass
    except Exception as e:  # noqa: BLE001 - report and go on with the next account
        return account["id"], fetched, f"{type(e).__name__}: {e}"
    return account["id"], fetched, ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--accounts", required=True, help="accounts.json (plain)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--list", default="baseline:messages")
    args = p.parse_args(argv)
    with open(args.accounts, encoding="utf-8") as f:
        accounts = json.load(f)["accounts"]
    start = time.monotonic()
    total, failed = 0, 0
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(args.workers, initializer=_init, initargs=(args.redis_url, args.list)) as pool:
        for account_id, fetched, error in pool.imap_unordered(fetch_account, accounts, chunksize=1):
            total += fetched
            if error:
                failed += 1
                print(f"baseline: {account_id}: {error}", file=sys.stderr, flush=True)
        pool.close()
        pool.join()
    print(f"baseline: {len(accounts)} accounts, {total} messages, {failed} failed, "
          f"{time.monotonic() - start:.2f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
