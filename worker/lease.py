"""A lease in Redis: one holder at a time, renewed while it works, taken over when it lapses.

Used by the sweeper (one leader in the fleet) and the webhook drivers (one per endpoint). The
holder renews before the TTL runs out; a holder that dies stops renewing and another takes the
lease within the TTL. A holder that comes back under the same name takes its lease back at
once (a restarted worker process need not wait out its own lease).
"""

from __future__ import annotations

import redis

# Renew the lease only if we still hold it; take it when free. Returns 1 when held afterwards.
_HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    """The lease ``key`` for holder ``owner`` with a TTL of ``ttl`` seconds."""

    def __init__(self, client: redis.Redis, key: str, owner: str, ttl: float) -> None:
        self.key = key
        self.owner = owner
        self.ttl_ms = int(ttl * 1000)
        self._hold = client.register_script(_HOLD)
        self._release = client.register_script(_RELEASE)

    def hold(self) -> bool:
        """Take or renew the lease; True when this owner holds it now."""
        return bool(self._hold(keys=[self.key], args=[self.owner, self.ttl_ms]))

    def release(self) -> None:
        """Give the lease up if this owner holds it."""
        self._release(keys=[self.key], args=[self.owner])
