"""A value read from Redis that all of a process's requests share (the fleet's load for admission,
the model the workers announced): read again in the background once stale, one read at a time
whatever the requests, so that a request under load never waits on Redis for it."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from redis.exceptions import RedisError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Refreshed(Generic[T]):
    """`read`'s last value. Older than `refresh_s`, it is read again in the background while
    requests go on with it; older than `max_age_s` (the process's first read, or one from before a
    quiet spell), requests wait for that read. A failed read leaves the value and its age as they
    were: a request that waits meets the failure, the next one starts another read."""

    def __init__(
        self,
        read: Callable[[], Coroutine[Any, Any, T]],
        value: T,
        refresh_s: float,
        max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._value = value
        self._refresh_s = refresh_s
        self._max_age_s = max_age_s
        self._clock = clock
        self._read_at = -math.inf
        self.reading: asyncio.Task[None] | None = None  # the read on its way

    async def current(self) -> T:
        age = self._clock() - self._read_at
        if age >= min(self._refresh_s, self._max_age_s) and self.reading is None:
            self.reading = asyncio.ensure_future(self._refresh(self._read()))
            self.reading.add_done_callback(self._done)
        if age >= self._max_age_s and self.reading is not None:
            await asyncio.shield(self.reading)
        return self._value

    async def _refresh(self, read: Coroutine[Any, Any, T]) -> None:
        self._value = await read
        self._read_at = self._clock()

    def _done(self, task: asyncio.Task[None]) -> None:
        self.reading = None
        if task.cancelled():
            return
        exc = task.exception()  # (retrieved, also where no request waited for it)
        if exc is not None and not isinstance(exc, RedisError):  # a bug: Redis's failures, requests meet
            log.error("a background read from Redis failed", exc_info=exc)
