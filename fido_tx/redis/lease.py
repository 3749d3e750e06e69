"""Per-account leases in Redis, for several instances on one accounts file.

``[cluster] mode = "lease"``: every instance loads the whole accounts file,
and an account is fetched only by the instance that holds its lease.

Keys:

``fido:lease:{<account>}``
    String: the id of the instance holding the lease; expires after
    ``lease_ttl`` unless renewed.  Taken with ``SET NX PX`` (never over
    another instance's lease), renewed and released only by the holder
    (compare-and-``PEXPIRE`` / compare-and-``DEL``, in Lua, so that a lease
    that expired and was taken by another instance meanwhile is never
    extended or deleted by the old holder).
``fido:cluster``
    Sorted set: the instances alive, scored by when their membership expires
    (milliseconds, Redis's own clock, so instances' clocks do not matter).
    Each instance re-adds itself on every balance tick and the same script
    drops the expired members, so an instance that dies leaves the set within
    ``lease_ttl``.

Every call is one script, one round trip, whatever the number of accounts.
"""

from twisted.internet import defer

from fido_tx.redis import keys, text

CLUSTER_KEY = keys.CLUSTER
lease_key = keys.lease


#: KEYS[1] the cluster set; ARGV: instance id, ttl ms -> the live members
MEMBERS = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 4)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

#: KEYS: lease keys; ARGV: instance id, ttl ms -> 1/0 per key: held after this
ACQUIRE = """
local held = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    held[i] = 1
  elseif redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    held[i] = 1
  else
    held[i] = 0
  end
end
return held
"""

#: KEYS: lease keys; ARGV: instance id, ttl ms -> 1/0 per key: still held
RENEW = """
local held = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    held[i] = 1
  else
    held[i] = 0
  end
end
return held
"""

#: KEYS: lease keys; ARGV: instance id (and ``leave`` to drop out of the
#: cluster set, KEYS[#KEYS] being that set) -> how many were released
RELEASE = """
local n = 0
local last = #KEYS
if ARGV[2] == 'leave' then
  redis.call('ZREM', KEYS[last], ARGV[1])
  last = last - 1
end
for i = 1, last do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
    n = n + 1
  end
end
return n
"""


class RedisLeases:
    """The lease calls of one instance, on the shared connection.

    ``connection`` provides ``script(source) -> Script`` with
    ``Script.run(keys, args) -> Deferred`` (:mod:`fido_tx.redis.connection`).
    """

    def __init__(self, connection, instance_id, ttl):
        self.instance_id = instance_id
        self.ttl_ms = int(ttl * 1000)
        self._members = connection.script(MEMBERS)
        self._acquire = connection.script(ACQUIRE)
        self._renew = connection.script(RENEW)
        self._release = connection.script(RELEASE)

    def members(self):
        """Announce this instance; Deferred firing with the live instance ids."""
        d = self._members.run([CLUSTER_KEY], [self.instance_id, self.ttl_ms])
        return d.addCallback(lambda ids: sorted(text(i) for i in ids))

    def _each(self, script, account_ids):
        ids = list(account_ids)
        if not ids:
            return defer.succeed(set())
        d = script.run([lease_key(a) for a in ids], [self.instance_id, self.ttl_ms])
        return d.addCallback(lambda flags: {a for a, f in zip(ids, flags) if int(f)})

    def acquire(self, account_ids):
        """Take the free leases (and keep our own): the set now held."""
        return self._each(self._acquire, account_ids)

    def renew(self, account_ids):
        """Extend our leases: the set still held (the others were lost)."""
        return self._each(self._renew, account_ids)

    def release(self, account_ids, leave=False):
        """Give leases back; ``leave`` also drops out of the cluster set."""
        keys = [lease_key(a) for a in account_ids] + ([CLUSTER_KEY] if leave else [])
        args = [self.instance_id] + (["leave"] if leave else [])
        return self._release.run(keys, args)
