"""An in-memory ``execute(*args) -> Deferred`` for the few commands the
observe modules send (HGETALL, HSET, LPUSH, LTRIM, LRANGE, SCAN, DEL)."""

import fnmatch

from twisted.internet import defer

from fido_tx import errors


def _b(value):
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


class FakeRedisExecute:
    def __init__(self):
        self.data = {}
        self.commands = []
        self.down = False

    def __call__(self, *args):
        name = _b(args[0]).decode().upper()
        self.commands.append((name,) + tuple(args[1:]))
        if self.down:
            return defer.fail(errors.FidoError(errors.REDIS, "Redis at fake is unreachable"))
        try:
            return defer.succeed(getattr(self, "_" + name.lower())(*[_b(a) for a in args[1:]]))
        except TypeError as e:
            return defer.fail(errors.FidoError(errors.REDIS, f"Redis refused {name}: {e}"))

    def count(self, name):
        return sum(1 for c in self.commands if c[0] == name)

    def _hash(self, key):
        value = self.data.setdefault(key, {})
        if not isinstance(value, dict):
            raise TypeError("WRONGTYPE")
        return value

    def _list(self, key):
        value = self.data.setdefault(key, [])
        if not isinstance(value, list):
            raise TypeError("WRONGTYPE")
        return value

    def _hgetall(self, key):
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            raise TypeError("WRONGTYPE Operation against a key holding the wrong kind of value")
        return [x for k, v in value.items() for x in (k, v)]

    def _hset(self, key, *pairs):
        h = self._hash(key)
        for k, v in zip(pairs[::2], pairs[1::2]):
            h[k] = v
        return len(pairs) // 2

    def _lpush(self, key, *values):
        lst = self._list(key)
        for v in values:
            lst.insert(0, v)
        return len(lst)

    def _ltrim(self, key, start, stop):
        lst = self._list(key)
        del lst[int(stop) + 1:]
        del lst[:int(start)]
        return b"OK"

    def _eval(self, script, numkeys, *rest):
        """The scripts the fakes' users send: the session history's."""
        if b"LPUSH" in script and b"LTRIM" in script and int(numkeys) == 1:
            key, entry, last, ttl = rest
            self._lpush(key, entry)
            self._ltrim(key, 0, last)
            return self._expire(key, ttl)
        raise TypeError("unknown script")

    def _expire(self, key, seconds):
        self.ttls = getattr(self, "ttls", {})
        self.ttls[key] = int(seconds)
        return 1 if key in self.data else 0

    def _lrange(self, key, start, stop):
        return list(self._list(key)[int(start):int(stop) + 1])

    def _scan(self, cursor, *options):
        pattern = b"*"
        for name, value in zip(options[::2], options[1::2]):
            if name.upper() == b"MATCH":
                pattern = value
        keys = sorted(k for k in self.data if fnmatch.fnmatchcase(k, pattern))
        # two pages, so the caller's cursor loop runs
        if cursor == b"0" and len(keys) > 1:
            return [b"7", keys[:1]]
        if cursor == b"7":
            return [b"0", keys[1:]]
        return [b"0", keys]
