"""The cache-first prediction path: cache lookup, one queued work item for the misses, merge.

Texts neither cache holds meet admission (`api.admission`, the `deadline` policy): a cache hit is
answered under any load. Each of the three Redis commands is coalesced (`api.coalescing`): the requests that
look up, queue or give up in the same turn of the event loop share one MGET, one LPUSH of their work
items, and one write of their abandoned marks. A request that stops waiting for its work (its client
went away, or its deadline cut the wait) marks the item abandoned, for the workers to drop
(`Predictor._bounded`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from enum import StrEnum

from cachetools import TTLCache
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError
from starlette.types import Receive

from api.admission import Admission
from api.coalescing import Coalescer
from api.deadline import Deadline, Stage
from api.errors import ErrorType, ServiceError
from api.metrics import CACHE_HITS, CACHE_MISSES, REQUESTS_ABANDONED
from api.refreshed import Refreshed
from api.results import ResultWait, ResultWaiter
from core import redis_replies, tracing
from core.liveness import beating
from core.protocol import (
    ABANDONED_GRACE_S,
    DEFAULT_CLIENT,
    Keys,
    ModelInfo,
    Prediction,
    Result,
    ScoreFunction,
    Unreadable,
    WorkItem,
    new_id,
    read_prediction,
    scored_version,
)
from core.redis_replies import raws

log = logging.getLogger(__name__)

CLIENTS_TTL_S = (
    60.0  # how often a process re-adds a client it queues for to `Keys.clients` (a Redis restart empties it)
)
MODEL_INFO_MAX_AGE_S = 1.0  # how stale the API's idea of the served model (and cache version) may be
MODEL_INFO_REFRESH_S = 0.5  # how stale it may be before it is read again in the background
WATCH_AFTER_S = 0.05  # how far into a wait for the worker its client's going away is watched for
LOCATE_BEFORE_S = 0.1  # how long before its deadline a request still waiting looks where its work item is (`_locate`)


class CacheStatus(StrEnum):
    HIT = "hit"  # every text answered from the cache
    PARTIAL = "partial"
    MISS = "miss"  # no text was in the cache


class ModelInfoCache:
    """The model the workers announced (its version names the cache), shared by the process's
    requests (`Refreshed`): read again in the background every `MODEL_INFO_REFRESH_S`, waited for
    only when older than `MODEL_INFO_MAX_AGE_S`, so a request under load never waits on Redis for it."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._unreadable: bytes | str | None = None  # the last unreadable announcement, logged once
        self.view: Refreshed[ModelInfo | None] = Refreshed(self._read, None, MODEL_INFO_REFRESH_S, MODEL_INFO_MAX_AGE_S)

    async def current(self) -> ModelInfo | None:
        """The announced model; None before any worker announced one, or while the announcement is
        unreadable (logged once per value): requests are then queued without a cache lookup."""
        return await self.view.current()

    async def _read(self) -> ModelInfo | None:
        raw = await self._redis.get(self._keys.model)
        return self._decode(raw) if raw else None

    def _decode(self, raw: bytes | str) -> ModelInfo | None:
        try:
            return ModelInfo.decode(raw)
        except Unreadable as exc:
            if raw != self._unreadable:
                self._unreadable = raw
                log.error("the announced model is unreadable (%s): no cache lookups until a worker announces it", exc)
            return None


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
        max_request_chars: int | None = None,
        admission: Admission | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._waiter = waiter
        self._models = models
        self._timeout_s = timeout_s
        self._max_queue_depth = max_queue_depth
        self._max_request_chars = max_request_chars  # a request's characters, all texts (None: no limit)
        # Hot texts skip Redis: entries are keyed like Redis' (model version + digest), so they can
        # never outlive their model, and expire with the same TTL.
        self._local = local_cache
        self._admission = admission  # the `deadline` overload policy's refusal of what would be late
        self._lookup = Coalescer(self._mget)
        self._push = Coalescer(self._lpush)
        self._mark = Coalescer(self._set_abandoned)
        self._marking: set[asyncio.Task[None]] = set()  # abandoned marks on their way (the loop keeps weak references)
        self._clients_seen: dict[str, float] = {}  # client -> when this process last added it to `Keys.clients`
        self._clients_known: set[str] = set()  # `Keys.clients` as the last refusal read it (`_loads`)

    async def predict(
        self,
        texts: list[str],
        client: str = DEFAULT_CLIENT,
        receive: Receive | None = None,
        function: ScoreFunction | None = None,
        deadline: Deadline | None = None,
    ) -> tuple[list[Prediction], CacheStatus]:
        """Bounded as a whole by the request's `deadline`, fixed when it arrived (`api.deadline`; by
        default the request timeout from now): a Redis stall anywhere (model and cache lookups, pool
        wait, enqueue, the final GETDEL) ends in the 504 at the deadline, not after it, naming the stage
        it reached. `receive`: the request's ASGI receive channel, its body read; a wait for the worker
        ends when it says the client went away (499). `function`: scores by this function rather than
        the model's own (`ScoreFunction`). Traced (tracing on), in FastAPI's span of the HTTP request,
        which continues a client's trace."""
        if deadline is None:
            deadline = Deadline(self._timeout_s)
        self._check_size(texts)
        call = _Call(deadline, client, receive, function)
        if tracing.enabled:
            with tracing.tracer.start_as_current_span("predict", attributes={"sentiment.texts": len(texts)}) as span:
                predictions, status = await self._bounded(texts, call)
                span.set_attribute("sentiment.cache", status.value)
                return predictions, status
        return await self._bounded(texts, call)

    def _check_size(self, texts: list[str]) -> None:
        """413 at once for a request of more characters than the model computes within the deadline
        (`SENTIMENT_MAX_REQUEST_CHARS`): refused now, rather than a 504 once the deadline passed."""
        most = self._max_request_chars
        if most is not None and (size := sum(map(len, texts))) > most:
            raise ServiceError(
                ErrorType.TOO_LARGE,
                f"this request holds {size:,} characters in {len(texts)} texts; a request may hold {most:,}, what the "
                f"model answers within the {self._timeout_s:g}-s deadline (SENTIMENT_MAX_REQUEST_CHARS): split it "
                f"into requests of at most {most:,} characters, or submit it as a bulk job (POST /jobs), which has "
                "no deadline",
            )

    async def _bounded(self, texts: list[str], call: _Call) -> tuple[list[Prediction], CacheStatus]:
        try:
            async with asyncio.timeout_at(call.deadline.loop_at()):
                return await self._predict(texts, call)
        except TimeoutError:
            self._abandon(call, "deadline")
            raise call.deadline.reached(call.where()) from None
        except asyncio.CancelledError:  # its caller gave up (a gRPC client's cancel)
            self._abandon(call, "disconnected")
            raise
        except ServiceError as exc:
            if exc.error_type is ErrorType.CLIENT_GONE:  # (the disconnect watch's, `_wait`)
                self._abandon(call, "disconnected")
            raise

    def _locate(self, call: _Call, item: bytes) -> None:
        call.looking = asyncio.ensure_future(self._where(call, item))

    async def _where(self, call: _Call, item: bytes) -> None:
        """Where the call's queued `item` is, for its 504 to say (`_Call.found`): still in the queue
        (behind how many), with no live worker to take it, or taken by a worker (the model stage)."""
        keys = self._keys
        try:
            pipe = self._redis.pipeline(transaction=False)
            # (`type: ignore`: redis-py's LPOS wants the value as str; bytes are sent as they are.)
            pipe.lpos(keys.queue, item)  # type: ignore[arg-type]
            pipe.llen(keys.queue)
            pipe.smembers(keys.workers)
            position, depth, members = await pipe.execute()
            workers = [redis_replies.text(w) for w in members]
            alive = beating(workers, await self._redis.mget([keys.heartbeat(w) for w in workers])) if workers else []
        except RedisError:
            return
        if not alive:
            call.found = "no worker is alive to compute it (see /ready)"
        elif position is not None:
            ahead = depth - position - 1  # LPUSH at the head, workers take from the tail
            call.found = (
                f"its work item was still queued ({ahead} ahead of it): the service is busy; retry later, "
                "or send fewer texts a request"
            )
        else:
            call.deadline.stage = Stage.MODEL
            call.found = (
                "a worker took its work item and was still computing it: the model is slower than this request "
                "needs; send fewer or shorter texts a request, or submit them as a bulk job (POST /jobs)"
            )

    async def _predict(self, texts: list[str], call: _Call) -> tuple[list[Prediction], CacheStatus]:
        """The process's own cache, then Redis's, then admission (`deadline` policy) and the workers
        for the rest: what either cache holds is answered however loaded the workers are."""
        unique = list(dict.fromkeys(texts))
        found: dict[str, Prediction] = {}
        keys: dict[str, str] = {}  # each text's cache key, while a model is announced
        local = self._local if self._local is not None else {}  # disabled: a throwaway per request
        with call.deadline.on_redis(Stage.MODEL_LOOKUP):
            model = await self._models.current()
        if model:
            # The model's own function by name is its cache; its work still names it, for a worker of
            # another model (a rolling upgrade) whose own function is another.
            version = scored_version(model.version, None if call.function == model.function else call.function)
            keys = {t: self._keys.cache(version, t) for t in unique}
            # One read per entry: `in` then `[]` reads a TTLCache's clock twice, and an entry expiring
            # in between would raise KeyError.
            found = {t: p for t, k in keys.items() if (p := local.get(k)) is not None}
        remote = [t for t in unique if t not in found]
        if remote and keys:
            with tracing.span("predict.cache_lookup"), call.deadline.on_redis(Stage.CACHE_LOOKUP):
                cached = await self._lookup([keys[t] for t in remote])
            for text, raw in zip(remote, cached, strict=True):
                if raw is not None and (cached_prediction := read_prediction(raw)) is not None:
                    found[text] = local[keys[text]] = cached_prediction
        missing = [t for t in unique if t not in found]
        if missing and self._admission is not None:
            with call.deadline.on_redis(Stage.ADMISSION):
                await self._admission.admit(len(missing), call.deadline.left_s())
        status = CacheStatus.HIT if not missing else CacheStatus.PARTIAL if found else CacheStatus.MISS
        CACHE_HITS.inc(len(found))
        CACHE_MISSES.inc(len(missing))
        if missing:
            try:
                computed = await self._compute(missing, call)
            except _TooLong as exc:
                raise exc.refusal(texts) from None
            found.update(zip(missing, computed, strict=True))
        return [found[t] for t in texts], status

    async def _compute(self, texts: list[str], call: _Call) -> list[Prediction]:
        """Queue the texts, scored by `call.function` (None: the model's own), and wait for the worker's
        result. From its push (Redis may queue it, whatever the push's answer) until its result, the
        item is `call.pending`: a request cut meanwhile, by the deadline or by its client going away,
        unregisters its wait and marks the item abandoned (`_bounded`); a worker drops it unstarted, or
        as expired, else its result key expires unread."""
        item = WorkItem(
            id=new_id(),
            texts=texts,
            enqueued_at=time.time(),
            deadline=call.deadline.at,
            reply_to=self._waiter.channel,
            client=call.client,
            traceparent=tracing.traceparent() if tracing.enabled else None,  # the `predict` span's
            function=call.function,
        )
        encoded = item.encode()
        with self._waiter.expect(item.id, encoded) as wait:
            with tracing.span("predict.enqueue"), call.deadline.on_redis(Stage.QUEUE):
                call.pending = item
                accepted = await self._push((item, encoded))
            if not accepted:
                call.pending = None
                raise ServiceError(
                    ErrorType.OVERLOADED,
                    f"the queue is full ({self._max_queue_depth} requests waiting) and this client holds the most "
                    "of it; retry later",
                )
            with tracing.span("predict.wait"):
                raw = await self._wait(wait, call, encoded)
            call.pending = None
        try:
            result = Result.decode(raw)
        except Unreadable as exc:
            log.error("request %s: unreadable result (%s)", item.id, exc)
            raise ServiceError(ErrorType.BAD_RESULT, "the worker's result could not be read; retry") from None
        if result.error is not None and result.too_long:
            raise _TooLong(result.error, [(texts[i], tokens) for i, tokens in result.too_long if 0 <= i < len(texts)])
        if result.late:
            raise ServiceError(
                ErrorType.TIMEOUT,
                f"late, not lost: the service could not answer within this request's deadline "
                f"({item.deadline - item.enqueued_at:.3g} s), so it was dropped before the model ran; retry later or "
                "with a longer deadline",
            )
        if result.error is not None:
            raise ServiceError(ErrorType.INFERENCE, result.error)
        if result.predictions is None or len(result.predictions) != len(texts):
            log.error(
                "request %s: a result of %s predictions for %d texts",
                item.id,
                result.predictions and len(result.predictions),
                len(texts),
            )
            raise ServiceError(ErrorType.BAD_RESULT, "the worker's result does not answer every text; retry")
        return result.predictions

    async def _wait(self, wait: ResultWait, call: _Call, item: bytes) -> bytes:
        """The queued `item`'s result; the wait ends with a 499 when `call.receive` says the client went
        away (`_DisconnectWatch`). `LOCATE_BEFORE_S` before the deadline, a request still waiting looks
        where its item is (`_where`), so that its 504 can say so at the deadline, not after it."""
        receive = call.receive
        watch = _DisconnectWatch(receive, wait) if receive is not None else None
        locate = asyncio.get_running_loop().call_at(call.deadline.loop_at() - LOCATE_BEFORE_S, self._locate, call, item)
        try:
            return await wait.result()
        finally:
            locate.cancel()
            if call.looking is not None:
                call.looking.cancel()
            if watch is not None:
                watch.stop()

    def _abandon(self, call: _Call, reason: str) -> None:
        """Mark the call's pending item, if any, abandoned in the background, so a worker drops it
        before a forward has it; the request ends now (its 504, or nothing for a client gone), even
        while Redis stalls. `reason`: who stopped waiting, the deadline or the client."""
        if (item := call.pending) is None:
            return
        REQUESTS_ABANDONED.labels(reason).inc()
        task = asyncio.get_running_loop().create_task(self._mark_abandoned(item))
        self._marking.add(task)
        task.add_done_callback(self._marking.discard)

    async def _mark_abandoned(self, item: WorkItem) -> None:
        with contextlib.suppress(RedisError):  # Redis down: the item is computed for nobody, as it was before
            await self._mark(item)

    async def _set_abandoned(self, items: list[WorkItem]) -> list[None]:
        """Mark several items abandoned in one round trip (`Keys.abandoned`, each until a little past its
        deadline), no longer their clients' outstanding work, and move the epoch once for all of them."""
        now = time.time()
        pipe = self._redis.pipeline(transaction=False)
        for item in items:
            ttl_ms = int((max(item.deadline - now, 0.0) + ABANDONED_GRACE_S) * 1000)
            pipe.set(self._keys.abandoned(item.id), 1, px=ttl_ms)
            pipe.zrem(self._keys.outstanding(item.client), item.id)
        pipe.incr(self._keys.abandoned_epoch)
        await pipe.execute()
        return [None] * len(items)

    async def _mget(self, lookups: list[list[str]]) -> list[list[bytes | None]]:
        """The cache entries of several requests' keys, in one MGET."""
        values = iter(raws(await self._redis.mget([key for keys in lookups for key in keys])))
        return [[next(values) for _ in keys] for keys in lookups]

    async def _lpush(self, items: list[tuple[WorkItem, bytes]]) -> list[bool]:
        """Queue several requests' work items in one round trip: one LPUSH, and each item in its
        client's `outstanding` set; whether each was queued.

        LPUSH answers the new depth in the same atomic step. Past `max_queue_depth` an item is
        refused (a 503 now beats a 504 later) when its client holds the most outstanding work, so a
        flood is refused while quieter clients still get in; past twice the depth every item is. The
        turn's refused items are taken back in one round trip (LREMs, and their `outstanding`
        entries); one a worker already took is served. Every request of the turn waits on these round
        trips: a refusal costs it at most two (`_loads`, the take-back). No Lua: fakeredis without
        lupa has none.
        """
        by_client: dict[str, dict[str, float]] = {}
        for item, _ in items:
            by_client.setdefault(item.client, {})[item.id] = item.deadline
        pipe = self._redis.pipeline(transaction=False)
        pipe.lpush(self._keys.queue, *(raw for _, raw in items))
        for client, members in by_client.items():
            pipe.zadd(self._keys.outstanding(client), members)
        now = time.monotonic()
        if new := [c for c in by_client if self._clients_seen.get(c, float("-inf")) < now - CLIENTS_TTL_S]:
            pipe.sadd(self._keys.clients, *new)
            self._clients_seen.update(dict.fromkeys(new, now))
        depth: int = (await pipe.execute())[0]
        refused, loads = [], None
        for position, (item, raw) in enumerate(items, start=depth - len(items) + 1):  # each item's depth once pushed
            refuse = 0 < self._max_queue_depth < position
            if refuse and position <= 2 * self._max_queue_depth:
                loads = loads if loads is not None else await self._loads()
                refuse = loads.get(item.client, 0) >= max(loads.values(), default=0)
            if refuse:
                refused.append((item, raw))
        taken_back = await self._take_back(refused) if refused else set()
        return [item.id not in taken_back for item, _ in items]

    async def _take_back(self, items: list[tuple[WorkItem, bytes]]) -> set[str]:
        """Take refused items off the queue and out of their clients' `outstanding` sets, in one round
        trip; the ids of those taken back (one a worker took meanwhile is served, uncounted in its
        client's load from now on)."""
        pipe = self._redis.pipeline(transaction=False)
        for _, raw in items:
            # (`type: ignore`: redis-py's LREM wants the value as str; bytes are sent as they are.)
            pipe.lrem(self._keys.queue, 1, raw)  # type: ignore[arg-type]
        for item, _ in items:
            pipe.zrem(self._keys.outstanding(item.client), item.id)
        removed = await pipe.execute()
        return {item.id for (item, _), count in zip(items, removed[: len(items)], strict=True) if count}

    async def _loads(self) -> dict[str, int]:
        """Each client's outstanding work items, those past their deadline dropped first, in one round
        trip: the set of clients is read with the loads of those it held at the last read and those
        this process queues for; a second reads the clients new since, if any."""
        known = sorted(self._clients_known | self._clients_seen.keys())
        pipe = self._redis.pipeline(transaction=False)
        pipe.smembers(self._keys.clients)
        self._read_loads(pipe, known)
        members, *replies = await pipe.execute()
        loads = dict(zip(known, replies[1::2], strict=True))
        self._clients_known = {redis_replies.text(c) for c in members}
        if new := sorted(self._clients_known - loads.keys()):
            pipe = self._redis.pipeline(transaction=False)
            self._read_loads(pipe, new)
            loads.update(zip(new, (await pipe.execute())[1::2], strict=True))
        return loads

    def _read_loads(self, pipe: Pipeline, clients: list[str]) -> None:
        now = time.time()
        for client in clients:
            pipe.zremrangebyscore(self._keys.outstanding(client), "-inf", now)
            pipe.zcard(self._keys.outstanding(client))


@dataclass
class _Call:
    """What one request's path carries: its deadline, client, receive channel and asked-for score
    function, its work item while it may be queued unanswered (`pending`), and where the look shortly
    before the deadline found that item (`found`, `looking`)."""

    deadline: Deadline
    client: str
    receive: Receive | None
    function: ScoreFunction | None
    pending: WorkItem | None = None  # its work item, from its push until its result
    looking: asyncio.Task[None] | None = None
    found: str | None = None

    def where(self) -> str | None:
        """What a 504 says of the item: where the look found it, or that Redis did not say."""
        if self.found is None and self.looking is not None:
            return "its work item was queued; where it was, Redis did not say in time"
        return self.found


class _TooLong(Exception):
    """The worker refused texts as longer than the model takes (`Result.too_long`): the texts and their
    tokens, named in the 422 by their places in the request."""

    def __init__(self, why: str, texts: list[tuple[str, int]]) -> None:
        super().__init__(why)
        self.why = why
        self.texts = texts

    def refusal(self, request: list[str]) -> ServiceError:
        """The 422: each text named by its first place in `request` (in the message, and one `detail`
        entry each, as a 422 of request validation names each field; the text itself is not echoed)."""
        places: dict[str, int] = {}
        for index, text in enumerate(request):
            places.setdefault(text, index)
        refused = sorted((places[text], tokens) for text, tokens in self.texts if text in places)
        named = ", ".join(f"text {place} ({tokens:,} tokens)" for place, tokens in refused)
        detail = [
            {"loc": ["text", place], "msg": f"{tokens:,} tokens: {self.why}", "type": "text_too_long", "tokens": tokens}
            for place, tokens in refused
        ]
        return ServiceError(
            ErrorType.TEXT_TOO_LONG,
            f"{named}: {self.why}; shorten it or split it, or send it to a service with SENTIMENT_LONG_TEXTS=chunk",
            detail=detail,
        )


class _DisconnectWatch:
    """Ends a wait for the worker with a 499 when `receive` says the client went away. It starts
    `WATCH_AFTER_S` into the wait: a miss answered sooner (most) costs a timer, not a task, and a
    client gone before then is seen at once when it starts."""

    def __init__(self, receive: Receive, wait: ResultWait) -> None:
        self._receive = receive
        self._wait = wait
        self._task: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._start)

    def stop(self) -> None:
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()

    def _start(self) -> None:
        self._task = asyncio.ensure_future(self._disconnected())
        self._task.add_done_callback(self._gone)

    async def _disconnected(self) -> None:
        """Returns once the client has gone: with the body read, the next message is the disconnect."""
        while (await self._receive())["type"] != "http.disconnect":
            pass

    def _gone(self, task: asyncio.Task[None]) -> None:
        # Let go of the ended task: it keeps its CancelledError, whose traceback holds this watch, and
        # that cycle would be the garbage collector's to free (docs/tuning.md, "Garbage collection").
        self._task = None
        if not task.cancelled() and task.exception() is None:  # (a watch stopped or failed ends nothing)
            self._wait.abort(ServiceError(ErrorType.CLIENT_GONE, "the client went away while its request waited"))
