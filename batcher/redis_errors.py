"""Redis errors as the API and the workers tell them apart and log them.

An outage (connection lost, refused or timed out) heals by itself; an error reply (OOM at
maxmemory, READONLY, NOPERM) needs an operator. Both are logged by class; only an outage's message
too, since redis-py quotes a failed pipeline's commands in an error reply, work items and their
text included.
"""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

OUTAGE = (RedisConnectionError, RedisTimeoutError, OSError)


def describe(exc: Exception) -> str:
    """`ConnectionError: Error 111 connecting to ...` for an outage, `OutOfMemoryError` for a reply."""
    return f"{type(exc).__name__}: {exc}" if isinstance(exc, OUTAGE) else type(exc).__name__
