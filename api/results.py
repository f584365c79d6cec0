"""Waiting for results without a Redis connection per waiting request.

Each API process subscribes once to its own reply channel; the worker publishes a request id
there after writing the result key, which wakes that request's event. The result key stays the
source of truth: a waiter also looks at it every `poll_s` seconds, so a notification lost while
the subscription reconnects costs at most that much latency, never the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from batcher.protocol import Keys, new_id

log = logging.getLogger(__name__)


class Pending:
    """One request's wait for its result key."""

    def __init__(self, redis: Redis, key: str, poll_s: float) -> None:
        self._redis = redis
        self._key = key
        self._poll_s = poll_s
        self.arrived = asyncio.Event()

    async def result(self, deadline: float) -> bytes | None:
        """The result (taken out of Redis), or None when `deadline` (unix s) passes first."""
        while (remaining := deadline - time.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), min(remaining, self._poll_s))
            self.arrived.clear()
            if (raw := await self._redis.getdel(self._key)) is not None:
                return raw
        return None


class ResultWaiter:
    """Per-process reply channel and the events of the requests waiting on it."""

    def __init__(self, redis: Redis, keys: Keys, poll_s: float = 1.0) -> None:
        self._redis = redis
        self._keys = keys
        self._poll_s = poll_s
        self.channel = keys.reply_channel(new_id())
        self._pending: dict[str, Pending] = {}
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def expect(self, request_id: str) -> Iterator[Pending]:
        """Register before queueing the work, so a fast answer cannot be missed."""
        pending = self._pending[request_id] = Pending(self._redis, self._keys.result(request_id), self._poll_s)
        try:
            yield pending
        finally:
            del self._pending[request_id]

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="result-listener")

    async def stop(self) -> None:
        """Cancel the listener; shutdown never waits more than a second on it."""
        if self._task:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=1.0)

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    backoff = 0.1
                    async for message in pubsub.listen():
                        if message["type"] == "message" and (p := self._pending.get(message["data"].decode())):
                            p.arrived.set()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("result subscription lost (%s); resubscribing in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
