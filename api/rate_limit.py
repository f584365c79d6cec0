"""Per-client rate limit: a token bucket in Redis, shared by every API replica.

One Lua script refills and takes in one atomic round trip, on Redis' clock (replicas' clocks may
disagree). A bucket holds `burst` tokens and refills at `rate` per second; a request takes one.
An empty bucket answers how long until a token is back: the 429's `Retry-After`. A bucket holds 0 to
`burst` tokens, whatever its hash held (a negative count written by something else would otherwise
refuse its client for ever, refreshed at each try, with an endless `Retry-After`: a 500).

A script Redis fails (unreachable: the route then answers 503; refused: NOPERM for an ACL user
without the scripting commands, OOM) lets the request go unchecked: an outage of the limiter is no
outage of the API. Counted (`sentiment_rate_limit_unchecked_total`) and said at WARNING once a run
of failures, then at DEBUG until a take works: a limit that is off is otherwise never seen.
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.metrics import RATE_LIMIT_UNCHECKED
from core.protocol import Keys
from core.redis_errors import describe

log = logging.getLogger(__name__)

# KEYS[1]: the bucket (hash: tokens, ts). ARGV: rate (tokens/s), burst. Returns {taken, wait_s}.
TAKE = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, math.max(0, tokens) + math.max(0, now - ts) * rate)  -- never below 0: whatever the hash held
local taken, wait = 0, 0
if tokens >= 1 then
  tokens, taken = tokens - 1, 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {taken, tostring(wait)}
"""


class RateLimit:
    """`take(client)`: None when the request may go, else the seconds until it may."""

    def __init__(self, redis: Redis, keys: Keys, rate_per_s: float, burst: int) -> None:
        self._keys = keys
        self._rate = rate_per_s
        self._burst = burst
        self._take = redis.register_script(TAKE)
        self._failing = False  # the last take failed on Redis (said at WARNING once, then at DEBUG until one works)

    async def take(self, client: str) -> float | None:
        try:
            taken, wait = await self._take(keys=[self._keys.rate_limit(client)], args=[self._rate, self._burst])
        except RedisError as exc:
            RATE_LIMIT_UNCHECKED.inc()
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "rate limit off until redis runs its script: requests go unchecked (%s)", describe(exc))
            self._failing = True
            return None
        self._failing = False
        return None if taken else float(wait)
