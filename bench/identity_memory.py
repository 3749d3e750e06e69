"""Redis memory per stored message of the identity records, beside the
dedupe set's, measured on a fresh local Redis.

    python bench/identity_memory.py [--messages 100000] [--keep 100000]

Records ``--messages`` messages of one mailbox with the sinks' own Lua
(:data:`fido_tx.sinks.identity.LUA`: the hash of identities and the order
list, bounded by ``--keep``), ids as an IMAP source gives them (UIDs from
1, one UIDVALIDITY), and prints ``MEMORY USAGE`` (exact: ``SAMPLES 0``) of
the identity hash, the list and the dedupe set, per message.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--keep", type=int, default=None)
    args = p.parse_args(argv)

    import redis

    from fido_tx.redis import keys
    from fido_tx.sinks import identity
    from fido_tx.sources.imap.identity import of
    from fido_tx.demo import redisserver as redis_server

    keep = args.keep or identity.KEEP
    server = redis_server.RedisServer(redis_server.find_redis_server()).start()
    try:
        r = redis.Redis(port=server.port)
        script = r.register_script(identity.lua(keep) + """
for i = 1, #ARGV, 2 do fido_remember(KEYS[1], KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('SADD', KEYS[3], unpack(ARGV, 1, #ARGV))
return 0
""")
        ikey, qkey = keys.identities("acme-support", "INBOX")
        dedupe = keys.dedupe("acme-support", "INBOX", "1700000000")
        chunk = 1000
        for start in range(1, args.messages + 1, chunk):
            argv = []
            for uid in range(start, min(start + chunk, args.messages + 1)):
                argv += [f"1700000000:{uid}", of(4000 + uid % 5000, f"<{uid}.x@mail.example.com>")]
            script(keys=[ikey, qkey, dedupe], args=argv)
        # the dedupe set's members are the bare UIDs: rebuild it as the sinks do
        r.delete(dedupe)
        for start in range(1, args.messages + 1, chunk):
            r.sadd(dedupe, *range(start, min(start + chunk, args.messages + 1)))
        n = args.messages
        kept = min(n, keep)
        usage = {name: r.memory_usage(key, samples=0)
                 for name, key in (("identity hash", ikey), ("order list", qkey),
                                   ("dedupe set", dedupe))}
        print(f"{n} messages stored, identities kept for {kept} (KEEP {keep})")
        for name, size in usage.items():
            per = kept if name != "dedupe set" else n
            print(f"  {name:14s} {size / 1024 / 1024:8.2f} MiB  {size / per:6.1f} bytes/message")
        both = usage["identity hash"] + usage["order list"]
        print(f"  identities     {both / 1024 / 1024:8.2f} MiB  {both / kept:6.1f} bytes/message")
    finally:
        server.close()


if __name__ == "__main__":
    main()
