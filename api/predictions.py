"""The cache-first prediction path: cache lookup, one queued work item for the misses, merge.

Both Redis commands are coalesced (`api.coalescing`): the requests that look up, or queue, in the
same turn of the event loop share one MGET, and one LPUSH of their work items."""

from __future__ import annotations

import asyncio
import time
from enum import StrEnum

import orjson
from cachetools import TTLCache
from redis.asyncio import Redis

from api.coalescing import Coalescer
from api.errors import ErrorType, ServiceError
from api.metrics import CACHE_HITS, CACHE_MISSES
from api.results import ResultWaiter
from core import tracing
from core.protocol import Keys, ModelInfo, Prediction, Result, WorkItem, new_id
from core.redis_replies import raws

MODEL_INFO_TTL_S = 1.0  # how stale the API's idea of the served model (and cache version) may be


class CacheStatus(StrEnum):
    HIT = "hit"  # every text answered from the cache
    PARTIAL = "partial"
    MISS = "miss"  # no text was in the cache


class ModelInfoCache:
    """The model the workers announced (its version names the cache), re-read at most once a second."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._info: ModelInfo | None = None
        self._expires = 0.0

    async def current(self) -> ModelInfo | None:
        if time.monotonic() >= self._expires:
            raw = await self._redis.get(self._keys.model)
            self._info = ModelInfo.decode(raw) if raw else None
            self._expires = time.monotonic() + MODEL_INFO_TTL_S
        return self._info


class Predictor:
    """Answers a list of texts from the cache and, for the misses, from the worker."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        waiter: ResultWaiter,
        models: ModelInfoCache,
        timeout_s: float,
        max_queue_depth: int,
        local_cache: TTLCache[str, Prediction] | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._waiter = waiter
        self._models = models
        self._timeout_s = timeout_s
        self._max_queue_depth = max_queue_depth
        # Hot texts skip Redis: entries are keyed like Redis' (model version + digest), so they can
        # never outlive their model, and expire with the same TTL.
        self._local = local_cache
        self._lookup = Coalescer(self._mget)
        self._push = Coalescer(self._lpush)

    async def predict(self, texts: list[str]) -> tuple[list[Prediction], CacheStatus]:
        """Bounded as a whole by the request timeout from its start: a Redis stall anywhere (cache
        lookup, pool wait, enqueue, the final GETDEL) ends in the 504 at the deadline, not after it.
        Traced (tracing on), in FastAPI's span of the HTTP request, which continues a client's trace."""
        if tracing.enabled:
            with tracing.tracer.start_as_current_span("predict", attributes={"sentiment.texts": len(texts)}) as span:
                predictions, status = await self._bounded(texts)
                span.set_attribute("sentiment.cache", status.value)
                return predictions, status
        return await self._bounded(texts)

    async def _bounded(self, texts: list[str]) -> tuple[list[Prediction], CacheStatus]:
        deadline = time.time() + self._timeout_s  # the work item's too: a worker skips it once we gave up
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._predict(texts, deadline)
        except TimeoutError:
            raise ServiceError(
                ErrorType.TIMEOUT, f"no result within {self._timeout_s:g} s; the service is busy or has no worker"
            ) from None

    async def _predict(self, texts: list[str], deadline: float) -> tuple[list[Prediction], CacheStatus]:
        unique = list(dict.fromkeys(texts))
        found: dict[str, Prediction] = {}
        if model := await self._models.current():
            keys = {t: self._keys.cache(model.version, t) for t in unique}
            local = self._local if self._local is not None else {}  # disabled: a throwaway per request
            # One read per entry: `in` then `[]` reads a TTLCache's clock twice, and an entry expiring
            # in between would raise KeyError.
            found = {t: p for t, k in keys.items() if (p := local.get(k)) is not None}
            if remote := [t for t in unique if t not in found]:
                with tracing.span("predict.cache_lookup"):
                    cached = await self._lookup([keys[t] for t in remote])
                for text, raw in zip(remote, cached, strict=True):
                    if raw is not None:
                        found[text] = local[keys[text]] = orjson.loads(raw)
        missing = [t for t in unique if t not in found]
        status = CacheStatus.HIT if not missing else CacheStatus.PARTIAL if found else CacheStatus.MISS
        CACHE_HITS.inc(len(found))
        CACHE_MISSES.inc(len(missing))
        if missing:
            found.update(zip(missing, await self._compute(missing, deadline), strict=True))
        return [found[t] for t in texts], status

    async def _compute(self, texts: list[str], deadline: float) -> list[Prediction]:
        """Queue the texts and wait for the worker's result. A wait cut by the deadline unregisters
        itself; its item is then dropped by the worker as expired, or its result key expires unread."""
        item = WorkItem(
            id=new_id(),
            texts=texts,
            enqueued_at=time.time(),
            deadline=deadline,
            reply_to=self._waiter.channel,
            traceparent=tracing.traceparent() if tracing.enabled else None,  # the `predict` span's
        )
        encoded = item.encode()
        with self._waiter.expect(item.id, encoded) as pending:
            with tracing.span("predict.enqueue"):
                queued = await self._push(encoded)
            if not queued:
                raise ServiceError(
                    ErrorType.OVERLOADED, f"the queue is full ({self._max_queue_depth} requests waiting); retry later"
                )
            with tracing.span("predict.wait"):
                result = Result.decode(await pending.result())
        if result.error is not None or result.predictions is None:
            raise ServiceError(ErrorType.INFERENCE, result.error or "the worker returned no predictions")
        return result.predictions

    async def _mget(self, lookups: list[list[str]]) -> list[list[bytes | None]]:
        """The cache entries of several requests' keys, in one MGET."""
        values = iter(raws(await self._redis.mget([key for keys in lookups for key in keys])))
        return [[next(values) for _ in keys] for keys in lookups]

    async def _lpush(self, items: list[bytes]) -> list[bool]:
        """Queue several requests' work items in one LPUSH; whether each was queued, or refused at
        once because the queue already held `max_queue_depth` items (a 503 now beats a 504 later).

        LPUSH answers the new depth in the same atomic step, so the common case is one round trip
        and works on any Redis-compatible server (no Lua: fakeredis without lupa has none). An item
        pushed past the limit is taken back with LREM; if a worker already took it, it is served.
        """
        depth = await self._redis.lpush(self._keys.queue, *items)
        queued = []
        for position, raw in enumerate(items, start=depth - len(items) + 1):  # each item's depth once pushed
            # (`type: ignore`: redis-py's LREM wants the value as str; bytes are sent as they are.)
            refused = 0 < self._max_queue_depth < position and await self._redis.lrem(
                self._keys.queue,
                1,
                raw,  # type: ignore[arg-type]
            )
            queued.append(not refused)
        return queued
