"""The API in process (httpx ASGI transport) against fakeredis, with a worker thread on the tiny model;
Redis refusing commands against a redis-server the test owns."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import logging
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from unittest.mock import AsyncMock

import fakeredis
import httpx
import numpy as np
import orjson
import pytest
import redis as sync_redis
from cachetools import TTLCache
from fastapi import APIRouter, Depends, Request, Response
from redis.asyncio import Redis

from api.admission import MAX_AGE_S, Admission, Load
from api.app import create_app
from api.errors import ErrorType, ServiceError
from api.predictions import CacheStatus, ModelInfoCache, Predictor
from api.results import ResultWaiter
from api.routes import RequestRoute
from batcher.worker import Worker
from core.protocol import Keys, ModelInfo, Result, WorkerStatus, WorkItem, new_id, prediction, read_prediction, replies
from core.redis_errors import describe
from core.settings import Settings
from model_store.classifier import Classifier
from sentiment.embedded import free_port
from tests.conftest import HANG_GUARD_S, SCORE_ABS, RedisServer, start_worker, wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def client_for(
    settings: Settings, redis: Redis, jobs_redis: sync_redis.Redis | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    # Bulk jobs get a fake Redis of their own unless the test hands one in: never the default URL's
    # (a Redis these tests did not start).
    app = create_app(settings, redis=redis, jobs_redis=jobs_redis or fakeredis.FakeRedis())
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            yield client


@pytest.fixture
async def client(settings: Settings, fake_server: fakeredis.FakeServer) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(settings, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        yield client


async def stall(*_: object, **__: object) -> None:
    """A Redis command that never answers (a frozen or partitioned Redis, with no socket timeout)."""
    await asyncio.Event().wait()


def announce(redis: fakeredis.FakeRedis, keys: Keys, version: str = "v1") -> None:
    """A model as a worker announces it, so the API looks texts up in the cache."""
    redis.set(keys.model, ModelInfo("tiny", version, ["NEGATIVE", "POSITIVE"], "cpu", "float32").encode())


def behind(redis: fakeredis.FakeRedis, keys: Keys, items: int) -> None:
    """One worker announced, computing 10 texts a second at 0.1 s a forward, with `items` one-text
    work items queued: (items + 1) / 10 s until a new request's text is answered."""
    announce(redis, keys)
    worker = WorkerStatus(id="w", host="h", pid=1, model_version="v1", started_at=0.0, texts_per_s=10.0, forward_s=0.1)
    redis.sadd(keys.workers, worker.id)
    redis.set(keys.heartbeat(worker.id), worker.encode())
    queue_more(redis, keys, items)


def queue_more(redis: fakeredis.FakeRedis, keys: Keys, items: int) -> None:
    queued = WorkItem(id="i", texts=["x"], enqueued_at=0.0, deadline=0.0, reply_to="r").encode()
    redis.lpush(keys.queue, *[queued] * items)


def scores(predictions: list[list[dict]]) -> list[list[float]]:
    return [[s["score"] for s in p] for p in predictions]


async def test_predictions_in_input_order_with_every_label(
    client: httpx.AsyncClient, worker: Worker, classifier: Classifier
) -> None:
    start_worker(worker)
    texts = ["a good movie", "bad", "", "a good movie"]
    response = await client.post("/predict", json={"text": texts})
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["predictions"]
    assert [[s["label"] for s in p] for p in body["predictions"]] == [["NEGATIVE", "POSITIVE"]] * 4
    want = [prediction(classifier.labels, p) for p in classifier.forward(classifier.tokenize(texts))]
    for got, expected in zip(scores(body["predictions"]), scores(want), strict=True):
        assert got == pytest.approx(expected, abs=SCORE_ABS)


async def test_cache_status_miss_then_hit_then_partial(client: httpx.AsyncClient, worker: Worker) -> None:
    start_worker(worker)
    first = await client.post("/predict", json={"text": ["one", "two"]})
    again = await client.post("/predict", json={"text": ["two", "one"]})
    partial = await client.post("/predict", json={"text": ["one", "three"]})
    assert [r.headers["x-cache"] for r in (first, again, partial)] == ["miss", "hit", "partial"]
    assert again.json()["predictions"] == first.json()["predictions"][::-1]
    assert partial.json()["predictions"][0] == first.json()["predictions"][0]
    assert worker.lanes.computed == 3


async def test_one_work_item_with_deduplicated_misses(
    settings: Settings, fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis
) -> None:
    # No worker: the request times out, and the queue shows exactly what the API asked for. The deadline
    # leaves room for a new app's first lookups on a busy box: the test is of what is queued, not how fast.
    fast = settings.model_copy(update={"request_timeout_s": 2.0})
    async with client_for(fast, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        response = await client.post("/predict", json={"text": ["x", "y", "x", "x"]})
    assert response.status_code == 504
    assert response.json()["error_type"] == "timeout"
    [raw] = redis.lrange(Keys(settings.key_prefix).queue, 0, -1)
    assert WorkItem.decode(raw).texts == ["x", "y"]


async def test_concurrent_requests_share_batches_and_compute_shared_texts_once(
    client: httpx.AsyncClient, worker: Worker
) -> None:
    start_worker(worker)
    responses = await asyncio.gather(
        *(client.post("/predict", json={"text": ["shared", f"own {i}"]}) for i in range(20))
    )
    assert all(r.status_code == 200 for r in responses)
    assert len({str(r.json()["predictions"][0]) for r in responses}) == 1
    assert worker.lanes.computed == 21
    assert worker.status.largest_batch_requests > 1


def record_calls(client: Redis, calls: list[tuple[str, int]]) -> None:
    """Record each MGET (with its key count) the client sends, and each LPUSH (with its value count)
    its pipelines send."""
    mget, pipeline = client.mget, client.pipeline

    async def recorded_mget(*args: Any) -> object:
        calls.append(("mget", len(args[-1])))
        return await mget(*args)

    def recorded_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = pipeline(*args, **kwargs)
        execute = pipe.execute

        async def recorded_execute(*execute_args: Any) -> object:
            calls.extend(("lpush", len(command) - 2) for command, _ in pipe.command_stack if command[0] == "LPUSH")
            return await execute(*execute_args)

        pipe.execute = recorded_execute
        return pipe

    client.mget, client.pipeline = recorded_mget, recorded_pipeline  # type: ignore[method-assign]


async def predictor_for(client: Redis, keys: Keys, timeout_s: float, max_queue_depth: int = 0) -> Predictor:
    models = ModelInfoCache(client, keys)
    await models.current()  # read once, as every request within the second after finds it
    return Predictor(client, keys, ResultWaiter(client, keys), models, timeout_s, max_queue_depth)


async def test_requests_of_one_turn_share_one_cache_lookup_and_one_push(
    settings: Settings, fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis
) -> None:
    # No worker: the requests time out, and Redis shows what the API asked of it.
    keys = Keys(settings.key_prefix)
    announce(redis, keys)
    client, calls = fakeredis.FakeAsyncRedis(server=fake_server), []
    record_calls(client, calls)
    predictor = await predictor_for(client, keys, 0.3)
    outcomes = await asyncio.gather(
        *(predictor.predict(["shared", f"own {i}"]) for i in range(5)), return_exceptions=True
    )
    assert [getattr(o, "error_type", o) for o in outcomes] == ["timeout"] * 5
    assert calls == [("mget", 10), ("lpush", 5)]  # every request's keys, then every request's item
    queued = [WorkItem.decode(raw).texts for raw in reversed(redis.lrange(keys.queue, 0, -1))]
    assert queued == [["shared", f"own {i}"] for i in range(5)]  # one item each, first come first out


async def test_requests_pushed_together_past_the_queue_limit_are_refused_one_by_one(
    settings: Settings, fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis
) -> None:
    keys = Keys(settings.key_prefix)
    redis.lpush(keys.queue, b"someone else's work")
    client, calls = fakeredis.FakeAsyncRedis(server=fake_server), []
    record_calls(client, calls)
    predictor = await predictor_for(client, keys, 0.3, max_queue_depth=3)
    outcomes = await asyncio.gather(*(predictor.predict([f"text {i}"]) for i in range(4)), return_exceptions=True)
    # One LPUSH took the queue from 1 to 5 items: the first two fit under the limit of 3 (and time
    # out, no worker here), the last two were taken back out and refused at once.
    assert calls == [("lpush", 4)]
    assert [o.error_type for o in outcomes] == ["timeout", "timeout", "overloaded", "overloaded"]
    queued = [WorkItem.decode(raw).texts for raw in reversed(redis.lrange(keys.queue, 0, -2))]
    assert queued == [["text 0"], ["text 1"]]


def record_round_trips(client: Redis, round_trips: list[list[str]]) -> None:
    """Record each round trip the client makes: the names of its commands, one for a command alone."""
    execute_command, pipeline = client.execute_command, client.pipeline

    async def recorded_command(*args: Any, **options: Any) -> object:
        round_trips.append([str(args[0]).upper()])
        return await execute_command(*args, **options)

    def recorded_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = pipeline(*args, **kwargs)
        execute = pipe.execute

        async def recorded_execute(*execute_args: Any) -> object:
            round_trips.append([str(command[0]).upper() for command, _ in pipe.command_stack])
            return await execute(*execute_args)

        pipe.execute = recorded_execute
        return pipe

    client.execute_command, client.pipeline = recorded_command, recorded_pipeline  # type: ignore[method-assign]


async def test_refusals_past_the_queue_limit_cost_the_turn_two_round_trips_after_its_push(
    settings: Settings, fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis
) -> None:
    # Inside the coalesced turn every other request of the turn waits on them: the clients' loads,
    # read in one round trip, then the refused items taken back in one, however many are refused.
    keys = Keys(settings.key_prefix)
    redis.lpush(keys.queue, b"someone else's work")
    client, round_trips = fakeredis.FakeAsyncRedis(server=fake_server), []
    predictor = await predictor_for(client, keys, HANG_GUARD_S, max_queue_depth=3)
    record_round_trips(client, round_trips)
    requests = [asyncio.create_task(predictor.predict([f"text {i}"])) for i in range(5)]
    try:
        accepted, refused = requests[:2], requests[2:]
        await asyncio.wait(refused, timeout=HANG_GUARD_S)  # refused at once; the others wait for a worker
        assert [getattr(r.exception(), "error_type", None) for r in refused] == ["overloaded"] * 3
        assert not any(r.done() for r in accepted)
        assert round_trips[0][0] == "LPUSH"  # (no model announced: no cache lookup)
        assert [sorted(set(commands)) for commands in round_trips[1:]] == [
            ["SMEMBERS", "ZCARD", "ZREMRANGEBYSCORE"],  # the loads
            ["LREM", "ZREM"],  # the take-back
        ]
        queued = [WorkItem.decode(raw).texts for raw in reversed(redis.lrange(keys.queue, 0, -2))]
        assert queued == [["text 0"], ["text 1"]]
        assert redis.zcard(keys.outstanding("default")) == 2
    finally:
        for request in requests:
            request.cancel()
        await asyncio.gather(*requests, return_exceptions=True)


async def test_past_the_queue_limit_the_loads_count_a_client_new_to_this_process(
    settings: Settings, fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis
) -> None:
    # Another API process queued three items for its client: this one learns of that client from the
    # set it reads with the loads it knows of, and reads its load in a second round trip.
    keys = Keys(settings.key_prefix)
    redis.sadd(keys.clients, "elsewhere")
    redis.zadd(keys.outstanding("elsewhere"), {f"item {i}": time.time() + HANG_GUARD_S for i in range(3)})
    redis.lpush(keys.queue, *[b"elsewhere's work"] * 3)
    client, round_trips = fakeredis.FakeAsyncRedis(server=fake_server), []
    predictor = await predictor_for(client, keys, 0.3, max_queue_depth=3)
    record_round_trips(client, round_trips)
    with pytest.raises(ServiceError) as cut:
        await predictor.predict(["mine"])
    assert cut.value.error_type == ErrorType.TIMEOUT  # past the limit, and in (no worker): it holds less
    assert [sorted(set(commands)) for commands in round_trips[:3]] == [
        ["LPUSH", "SADD", "ZADD"],
        ["SMEMBERS", "ZCARD", "ZREMRANGEBYSCORE"],  # "default", which this process queues for
        ["ZCARD", "ZREMRANGEBYSCORE"],  # "elsewhere"
    ]


async def test_past_the_queue_limit_the_client_holding_the_most_is_refused_and_others_get_in(
    settings: Settings, fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis
) -> None:
    keys = Keys(settings.key_prefix)
    predictor = await predictor_for(fakeredis.FakeAsyncRedis(server=fake_server), keys, HANG_GUARD_S, max_queue_depth=2)

    async def refused(texts: list[str], client: str) -> bool:
        """Whether the request was refused as overloaded, which it is at once; an accepted one waits
        for a worker (there is none) until the test ends."""
        request = asyncio.create_task(predictor.predict(texts, client))
        await asyncio.wait({request}, timeout=1.0)
        if not request.done():
            accepted.append(request)
            return False
        error = request.exception()
        assert isinstance(error, ServiceError)
        return error.error_type == ErrorType.OVERLOADED

    accepted: list[asyncio.Task] = []
    try:
        assert [await refused([f"flood {i}"], "flood") for i in range(3)] == [
            False,
            False,
            True,
        ]  # past 2: the flood holds all
        assert not await refused(["quiet"], "quiet")  # past the limit too, but a client holding less gets in
        assert await refused(["flood 3"], "flood")  # the flood still holds the most
        assert await refused(["quiet again"], "quiet")  # a client as heavy as the heaviest is refused too
        assert not await refused(["third"], "third")
        assert await refused(["fourth"], "fourth")  # past twice the limit, everyone is
        queued = sorted(WorkItem.decode(raw).client for raw in redis.lrange(keys.queue, 0, -1))
        assert queued == ["flood", "flood", "quiet", "third"]
        assert {c: redis.zcard(keys.outstanding(c)) for c in ("flood", "quiet", "third", "fourth")} == {
            "flood": 2,
            "quiet": 1,
            "third": 1,
            "fourth": 0,
        }
    finally:
        for request in accepted:
            request.cancel()


async def test_redis_unreachable_is_503_with_retry_after(settings: Settings) -> None:
    down = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    async with client_for(settings, down) as client:
        predict = await client.post("/predict", json={"text": ["hi"]})
        ready = await client.get("/ready")
        health = await client.get("/health")
    assert predict.status_code == 503
    assert predict.headers["retry-after"] == "1"
    assert predict.json()["error_type"] == "unavailable"
    assert ready.status_code == 503 and "redis" in ready.json()["reason"]
    assert health.status_code == 200


async def test_the_probes_say_redis_is_unavailable_never_where_nor_its_words(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    down = Redis.from_url(f"redis://localhost:{port}/0", socket_connect_timeout=1)
    with caplog.at_level(logging.WARNING, logger="api"):
        async with client_for(settings, down) as client:
            answers = [await client.get(path) for path in ("/ready", "/v2/health/ready")]
    for answer in answers:
        assert (answer.status_code, answer.json()["reason"]) == (503, "redis unavailable (ConnectionError)")
        assert "localhost" not in answer.text and str(port) not in answer.text and "refused" not in answer.text
    probe_logs = [r.getMessage() for r in caplog.records if r.name == "api.routes"]
    assert probe_logs and all(f"localhost:{port}" in m for m in probe_logs)  # where, and Redis's words: the log's


@pytest.mark.parametrize(
    ("refuse", "error_class"),
    [
        (("CONFIG", "SET", "maxmemory", "1"), "OutOfMemoryError"),  # maxmemory reached, noeviction
        (("REPLICAOF", "127.0.0.1", "1"), "ReadOnlyError"),  # a failover left the API on a replica
    ],
    ids=["out-of-memory", "read-only"],
)
async def test_redis_refusing_commands_is_503_with_retry_after(
    settings: Settings,
    redis_server: RedisServer,
    refuse: tuple[str, ...],
    error_class: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Redis answers but refuses writes: the client's remedy is an outage's, retry later.
    with sync_redis.Redis.from_url(redis_server.url) as jobs_redis:
        jobs_redis.execute_command(*refuse)
        async with Redis.from_url(redis_server.url) as redis, client_for(settings, redis, jobs_redis) as client:
            predict = await client.post("/predict", json={"text": ["hi"]})  # refused at LPUSH
            job = await client.post("/jobs", json={"text": ["hi"]})  # refused in RQ's enqueue
    assert predict.json() == {
        "error": f"the queue backend (Redis) is unavailable ({error_class})",
        "error_type": "unavailable",
    }
    for response in (predict, job):
        assert (response.status_code, response.headers["retry-after"]) == (503, "1")
        assert response.json()["error_type"] == "unavailable"
    assert f"redis unavailable ({error_class})" in caplog.text


@pytest.mark.slow
async def test_redis_refusing_writes_for_its_disk_is_logged_in_its_own_words_not_told_to_probes(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A full disk (here: its directory gone, a snapshot failing) makes redis-server refuse writes and
    # PING with MISCONF, a reply redis-py raises as a bare ResponseError: the log must say why, the
    # probe only that Redis is unavailable (docs/security.md, "Open paths").
    server = RedisServer(tmp_path / "data")
    server.data.mkdir()  # type: ignore[union-attr]
    server.start()
    try:
        with sync_redis.Redis.from_url(server.url) as admin:
            admin.config_set("save", "3600 1")  # (a failed snapshot then stops writes)
            shutil.rmtree(tmp_path / "data")
            admin.bgsave()
            wait_for("the snapshot to fail", lambda: admin.info("persistence")["rdb_last_bgsave_status"] == "err")
            with caplog.at_level(logging.WARNING, logger="api"):
                async with Redis.from_url(server.url) as redis, client_for(settings, redis) as client:
                    ready = await client.get("/ready")
                    predict = await client.post("/predict", json={"text": ["private words"]})
            with pytest.raises(sync_redis.ResponseError) as refused:  # (a worker's writes: a transaction)
                admin.pipeline().lpush("queue", "private words").execute()
            admin.config_set("save", "")  # (else it refuses SIGTERM, unable to save)
    finally:
        server.stop()
    assert (ready.status_code, ready.json()["reason"]) == (503, "redis unavailable (ResponseError)")
    assert predict.status_code == 503 and "MISCONF" not in predict.text
    logged = [r.getMessage() for r in caplog.records if "redis unavailable" in r.getMessage()]
    assert len(logged) >= 2 and all("ResponseError: MISCONF " in m for m in logged), logged
    assert all(len(m) < 200 and "\n" not in m and "private words" not in m for m in logged), logged
    assert describe(refused.value).startswith("ResponseError: MISCONF ")  # redis-py's quote of the command dropped


INFER = "/v2/models/tiny/infer"


def stall_command(client: Redis, command: str, reached: asyncio.Event) -> None:
    """Make every call of `command` the client sends, alone or in a pipeline, stall (`reached` set)."""
    execute_command, pipeline = client.execute_command, client.pipeline

    async def stalled_command(*args: Any, **options: Any) -> object:
        if str(args[0]).upper() == command:
            reached.set()
            await stall()
        return await execute_command(*args, **options)

    def stalled_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = pipeline(*args, **kwargs)
        execute = pipe.execute

        async def stalled_execute(*execute_args: Any) -> object:
            if any(str(c[0]).upper() == command for c, _ in pipe.command_stack):
                reached.set()
                await stall()
            return await execute(*execute_args)

        pipe.execute = stalled_execute
        return pipe

    client.execute_command, client.pipeline = stalled_command, stalled_pipeline  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("path", "command", "stage"),
    [
        ("/predict", "GET", "model lookup"),
        ("/predict", "LLEN", "admission"),  # the fleet's load
        ("/predict", "MGET", "cache lookup"),
        ("/predict", "LPUSH", "queue"),  # the enqueue
        ("/predict", "GETDEL", "queue"),  # the result, read when woken without it
        (INFER, "GET", "model lookup"),  # the route's own, before it reads the texts
    ],
)
async def test_a_redis_stall_anywhere_in_a_request_ends_in_the_504_naming_its_stage(
    settings: Settings,
    fake_server: fakeredis.FakeServer,
    redis: fakeredis.FakeRedis,
    path: str,
    command: str,
    stage: str,
) -> None:
    keys = Keys(settings.key_prefix)
    announce(redis, keys)
    stalled, reached = fakeredis.FakeAsyncRedis(server=fake_server), asyncio.Event()
    stall_command(stalled, command, reached)
    body = (
        {"text": ["x"]}
        if path == "/predict"
        else {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    )
    patient = settings.model_copy(update={"request_timeout_s": 1.0})
    app = create_app(patient, redis=stalled, jobs_redis=fakeredis.FakeRedis())
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            request = asyncio.create_task(client.post(path, json=body))
            if command == "GETDEL":  # only when woken without the result: here by a bare id, as older workers sent
                raw = await asyncio.to_thread(wait_for, "the work item", lambda: redis.lindex(keys.queue, 0))
                item = WorkItem.decode(raw)
                redis.publish(item.reply_to, item.id)
            response = await asyncio.wait_for(request, HANG_GUARD_S)
    assert reached.is_set()
    assert response.status_code == 504
    assert response.json()["error_type"] == "timeout"
    error = response.json()["error"]
    assert error.startswith(f"no result within 1 s: the deadline was reached at the {stage} stage"), error
    assert ("waiting on Redis" in error) == (command != "GETDEL")  # (a worker's reply was what it waited for)
    assert app.state.predictor._waiter._waits == {}  # the cut wait unregistered itself


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/predict", {"text": ["hot"]}),
        (INFER, {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["hot"]}]}),
        ("/", {"inputs": "hot"}),  # Hugging Face's task
    ],
)
async def test_a_deadline_passed_before_any_redis_call_is_a_504_naming_the_stage_not_redis(
    client: httpx.AsyncClient, redis: fakeredis.FakeRedis, settings: Settings, path: str, body: dict
) -> None:
    # Its answer is in the cache, and Redis is healthy: 1 µs has passed before the model lookup.
    keys = Keys(settings.key_prefix)
    announce(redis, keys)
    redis.set(keys.cache("v1", "hot"), orjson.dumps(prediction(["NEGATIVE", "POSITIVE"], [0.25, 0.75])))
    response = await client.post(path, json=body, headers={"X-Request-Timeout": "0.000001"})
    assert (response.status_code, response.json()) == (
        504,
        {
            "error": "no result within 1e-06 s: the deadline was reached at the model lookup stage",
            "error_type": "timeout",
        },
    )


@pytest.mark.parametrize("seconds", [b"1_0", b"inf", b"nan", b"\xa01", b"0x1p0", b"1,5", b"+1", b"", b"0", b"31"])
async def test_a_deadline_header_that_is_no_number_of_seconds_in_range_is_a_422(
    client: httpx.AsyncClient, seconds: bytes
) -> None:
    # Python's `float` takes `1_0`, `inf`, `nan` and a leading no-break space: none is a number of seconds.
    response = await client.post("/predict", json={"text": ["x"]}, headers={"X-Request-Timeout": seconds})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["header", "X-Request-Timeout"]


async def test_a_504_waits_on_no_redis_call_after_the_deadline(
    settings: Settings, fake_server: fakeredis.FakeServer
) -> None:
    # Redis goes silent the moment the request stops waiting for its result: the 504 still says where
    # its work item was, looked up before the deadline, and waits on nothing after it.
    keys = Keys(settings.key_prefix)
    client = fakeredis.FakeAsyncRedis(server=fake_server)
    predictor = await predictor_for(client, keys, 0.5)
    waits, waited = predictor._waiter._waits, []
    execute_command, pipeline = client.execute_command, client.pipeline

    async def silent_once_it_stopped_waiting() -> None:
        waited.append(bool(waits))
        if any(waited) and not waits:
            await stall()

    async def command(*args: Any, **options: Any) -> object:
        await silent_once_it_stopped_waiting()
        return await execute_command(*args, **options)

    def silent_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = pipeline(*args, **kwargs)
        execute = pipe.execute

        async def silent_execute(*execute_args: Any) -> object:
            await silent_once_it_stopped_waiting()
            return await execute(*execute_args)

        pipe.execute = silent_execute
        return pipe

    client.execute_command, client.pipeline = command, silent_pipeline  # type: ignore[method-assign]
    with pytest.raises(ServiceError) as cut:
        await asyncio.wait_for(predictor.predict(["x"]), HANG_GUARD_S)
    assert cut.value.error_type == ErrorType.TIMEOUT
    assert cut.value.message == (
        "no result within 0.5 s: the deadline was reached at the queue stage: "
        "no worker is alive to compute it (see /ready)"
    )


async def test_a_request_cut_at_its_deadline_leaves_no_work_behind(
    settings: Settings, fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis, worker: Worker
) -> None:
    # Queued, then cut while waiting for its reply: the item carries the request's deadline, so a
    # worker taking it afterwards drops it instead of computing an answer nobody collects.
    keys = Keys(settings.key_prefix)
    short = settings.model_copy(update={"request_timeout_s": 0.3})
    async with client_for(short, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        response = await asyncio.wait_for(client.post("/predict", json={"text": ["cut short"]}), HANG_GUARD_S)
    assert response.status_code == 504
    assert redis.llen(keys.queue) == 1
    start_worker(worker)
    wait_for("the worker to drop the expired item", lambda: worker.intake.expired == 1)
    assert worker.lanes.computed == 0
    assert (redis.llen(keys.queue), list(redis.scan_iter(keys.result("*")))) == (0, [])


async def test_a_local_cache_entry_expiring_during_the_lookup_is_no_500(
    settings: Settings, fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis
) -> None:
    # This clock ticks on every read: an entry there at one read is gone at the next, the race
    # between `in` and `[]` that raised KeyError. Redis holds it too, so either way it is a hit.
    keys = Keys(settings.key_prefix)
    hot = [{"label": "NEGATIVE", "score": 0.1}, {"label": "POSITIVE", "score": 0.9}]
    announce(redis, keys)
    redis.set(keys.cache("v1", "hot"), orjson.dumps(hot))
    ticks = itertools.count()
    local: TTLCache[str, list[dict]] = TTLCache(10, ttl=2, timer=lambda: next(ticks))
    local[keys.cache("v1", "hot")] = hot
    client = fakeredis.FakeAsyncRedis(server=fake_server)
    predictor = Predictor(client, keys, ResultWaiter(client, keys), ModelInfoCache(client, keys), 1.0, 0, local)
    assert await predictor.predict(["hot"]) == ([hot], CacheStatus.HIT)


async def test_the_result_listener_outlives_a_refused_subscription(
    settings: Settings, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # An ACL user without channel access gets NOPERM at SUBSCRIBE: the listener says so at error
    # level and keeps trying, and subscribes once access is granted, without a restart.
    def refusals() -> int:
        return sum(
            r.name == "api.results" and r.levelno == logging.ERROR and "NoPermissionError" in r.getMessage()
            for r in caplog.records
        )

    channels = Keys(settings.key_prefix).reply_channel("*")
    with sync_redis.Redis.from_url(redis_server.url) as admin:
        admin.execute_command("ACL", "SETUSER", "api", "on", ">secret", "~*", "+@all", "resetchannels")
        async with Redis.from_url(f"redis://api:secret@127.0.0.1:{redis_server.port}/0") as redis:
            async with client_for(settings, redis):
                # Waited on in a thread: the listener runs on this event loop.
                await asyncio.to_thread(wait_for, "the subscription to be refused twice", lambda: refusals() >= 2)
                admin.execute_command("ACL", "SETUSER", "api", "allchannels")
                await asyncio.to_thread(wait_for, "the listener to subscribe", lambda: admin.pubsub_channels(channels))


async def test_a_reply_hands_over_its_result_and_a_missed_reply_is_made_good_by_the_key(
    settings: Settings, fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis
) -> None:
    # The result rides in the reply, so a request is answered without its key (never written here).
    # A bare id, as workers before replies sent, wakes the request to take the key. With no reply at
    # all (lost while the subscription reconnected), the poll takes the key.
    keys = Keys(settings.key_prefix)
    client = fakeredis.FakeAsyncRedis(server=fake_server)
    woken, polling = ResultWaiter(client, keys, poll_s=HANG_GUARD_S), ResultWaiter(client, keys, poll_s=0.05)
    for waiter in (woken, polling):
        waiter.start()
    try:
        await asyncio.to_thread(wait_for, "the listeners to subscribe", lambda: len(redis.pubsub_channels()) == 2)
        delivered, bare, lost = new_id(), new_id(), new_id()
        with woken.expect(delivered) as wait:
            redis.publish(woken.channel, replies([(delivered, b"from the reply")]))
            assert await asyncio.wait_for(wait.result(), 5) == b"from the reply"
        with woken.expect(bare) as wait:
            redis.set(keys.result(bare), b"from the key")
            redis.publish(woken.channel, bare)
            assert await asyncio.wait_for(wait.result(), 5) == b"from the key"
        with polling.expect(lost) as wait:
            redis.set(keys.result(lost), b"found by the poll")
            assert await asyncio.wait_for(wait.result(), 5) == b"found by the poll"
        assert redis.exists(keys.result(bare), keys.result(lost)) == 0  # taken
    finally:
        for waiter in (woken, polling):
            await waiter.stop()


async def test_unreadable_results_are_a_502_and_the_listener_carries_on(
    settings: Settings, fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis
) -> None:
    # What a worker of another protocol version, or garbage in Redis, would send: never a 500, never
    # the end of the process's one subscription.
    keys = Keys(settings.key_prefix)

    def answer(result: bytes) -> None:
        """A stand-in worker: takes the next work item and replies `result`, after a line naming nobody."""
        item = WorkItem.decode(wait_for("a work item", lambda: redis.rpop(keys.queue)))
        redis.publish(item.reply_to, b"\xff\xfe not ours\n" + replies([(item.id, result)]))

    good = Result(predictions=[prediction(["NEGATIVE", "POSITIVE"], [0.25, 0.75])]).encode()
    async with client_for(settings, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        await asyncio.to_thread(wait_for, "the listener to subscribe", lambda: redis.pubsub_channels())
        for result, status in [(b"not json", 502), (Result(predictions=[]).encode(), 502), (good, 200)]:
            answering = asyncio.create_task(asyncio.to_thread(answer, result))
            response = await client.post("/predict", json={"text": ["anything"]})
            await answering
            assert response.status_code == status, response.text
            if status == 502:
                assert response.json()["error_type"] == "bad_result"
        assert response.json() == {"predictions": [prediction(["NEGATIVE", "POSITIVE"], [0.25, 0.75])]}


async def test_an_unreadable_model_announcement_costs_the_cache_not_the_requests(
    client: httpx.AsyncClient, worker: Worker, redis: fakeredis.FakeRedis, settings: Settings
) -> None:
    start_worker(worker)
    redis.set(Keys(settings.key_prefix).model, b"\x00 garbage")
    response = await client.post("/predict", json={"text": ["still answered"]})
    assert response.status_code == 200 and len(response.json()["predictions"]) == 1
    assert (await client.get("/model")).status_code == 503


@pytest.mark.parametrize("garbage", [b"\x00 garbage", b'"a string"', b'[{"label": "POSITIVE"}]', b"[]"])
async def test_a_cache_entry_that_holds_no_prediction_is_a_miss_computed_and_written_over(
    client: httpx.AsyncClient, worker: Worker, redis: fakeredis.FakeRedis, garbage: bytes
) -> None:
    """Garbage where a text's prediction is cached (written by something else) was a 500, or a 502 from
    the worker's copy of it, for every request of that text until the entry expired (a day)."""
    start_worker(worker)
    assert (await client.post("/predict", json={"text": ["a model announced"]})).status_code == 200
    key = worker._cache_key("garbled", None)
    redis.set(key, garbage)
    response = await client.post("/predict", json={"text": ["garbled"]})
    assert (response.status_code, response.headers["x-cache"]) == (200, "miss"), response.text
    [prediction] = response.json()["predictions"]
    assert [s["label"] for s in prediction] == ["NEGATIVE", "POSITIVE"]
    assert read_prediction(redis.get(key) or b"") == prediction


async def test_a_bug_in_the_result_listener_resubscribes_and_no_waiter_is_left_behind(
    settings: Settings,
    fake_server: fakeredis.FakeServer,
    redis: fakeredis.FakeRedis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The listener is the only way replies reach this process's requests: whatever fails in it, it
    # subscribes again, and the waiters look at their result keys at once.
    keys = Keys(settings.key_prefix)
    waiter = ResultWaiter(fakeredis.FakeAsyncRedis(server=fake_server), keys, poll_s=HANG_GUARD_S)
    failures = [RuntimeError("a bug")]
    real_deliver = waiter._deliver

    def deliver(message: bytes) -> None:
        if failures:
            raise failures.pop()
        real_deliver(message)

    monkeypatch.setattr(waiter, "_deliver", deliver)
    waiter.start()
    try:
        await asyncio.to_thread(wait_for, "the listener to subscribe", lambda: redis.pubsub_channels())
        first, second = new_id(), new_id()
        with waiter.expect(first) as wait:
            redis.set(keys.result(first), b"from the key")
            redis.publish(waiter.channel, replies([(first, b"lost with the bug")]))
            assert await asyncio.wait_for(wait.result(), 10) == b"from the key"  # not the 60-s poll
        with waiter.expect(second) as wait:
            await asyncio.to_thread(wait_for, "the listener to subscribe again", lambda: redis.pubsub_channels())
            redis.publish(waiter.channel, replies([(second, b"delivered")]))
            assert await asyncio.wait_for(wait.result(), 10) == b"delivered"
    finally:
        await waiter.stop()
    errors = [r for r in caplog.records if r.name == "api.results" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None  # the bug, with its traceback


async def test_ready_counts_the_workers_whose_heartbeats_have_not_lapsed(
    client: httpx.AsyncClient, redis: fakeredis.FakeRedis, settings: Settings
) -> None:
    # A heartbeat has no expiry (no memory policy evicts it): a key past its lapse time is no worker.
    keys = Keys(settings.key_prefix)
    for worker_id, lapses_at in (("lapsed", time.time() - 1), ("beating", time.time() + 60)):
        status = WorkerStatus(id=worker_id, host="h", pid=1, model_version="v", started_at=0, lapses_at=lapses_at)
        redis.set(keys.heartbeat(worker_id), status.encode())
        redis.sadd(keys.workers, worker_id)
    assert (await client.get("/ready")).json() == {"status": "ready", "workers": 1}


async def test_ready_and_model_follow_the_worker(client: httpx.AsyncClient, worker: Worker) -> None:
    assert (await client.get("/health")).json() == {"status": "healthy"}
    not_ready = await client.get("/ready")
    assert not_ready.status_code == 503 and not_ready.json()["reason"] == "no live worker"
    assert (await client.get("/model")).status_code == 503
    start_worker(worker)
    await client.post("/predict", json={"text": ["wake up"]})
    assert (await client.get("/ready")).json() == {"status": "ready", "workers": 1}
    await asyncio.sleep(1.1)  # the API re-reads the announced model at most once a second
    model = (await client.get("/model")).json()
    assert model["version"] == worker.classifier.version
    assert model["labels"] == ["NEGATIVE", "POSITIVE"]
    assert (model["dtype"], model["engine"]) == (worker.classifier.dtype_name, worker.classifier.engine.name)


async def test_no_user_text_in_any_key(client: httpx.AsyncClient, worker: Worker, redis: fakeredis.FakeRedis) -> None:
    start_worker(worker)
    texts = ["private words here", "secret review"]
    assert (await client.post("/predict", json={"text": texts})).status_code == 200
    keys = [k.decode() for k in redis.keys("*")]
    assert any(":cache:" in k for k in keys)
    assert not [k for k in keys for word in ("private", "secret", "review", "words") if word in k]


async def test_empty_string_is_a_valid_text(client: httpx.AsyncClient, worker: Worker) -> None:
    start_worker(worker)
    response = await client.post("/predict", json={"text": [""]})
    assert response.status_code == 200
    assert len(response.json()["predictions"][0]) == 2


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ({"text": []}, "at least 1 item"),
        ({}, "Field required"),
        ({"text": "just a string"}, "valid array"),
        ({"text": ["ok", 3]}, "valid string"),
        ({"text": ["ok", None]}, "valid string"),
        ({"text": [["nested"]]}, "valid string"),
        ({"text": ["x"] * 65}, "at most 64 items"),
        ({"text": ["x" * 2001]}, "at most 2000 characters"),
        ({"text": ["ok"], "extra": 1}, "Extra inputs"),
        ([], "should be an object"),
    ],
)
async def test_bad_bodies_get_a_422_that_says_what_is_wrong(
    client: httpx.AsyncClient, body: object, complaint: str
) -> None:
    response = await client.post("/predict", json=body)
    assert response.status_code == 422
    assert complaint in str(response.json()["detail"])


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        (b'{"text": ["ok"', "JSON decode error"),
        (b'{"text": ["\\ud800"]}', "JSON decode error"),  # a lone surrogate is not text
        (b"\xff\xfe", "JSON decode error"),
    ],
)
async def test_malformed_json_gets_a_422(client: httpx.AsyncClient, raw: bytes, complaint: str) -> None:
    response = await client.post("/predict", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert complaint in str(response.json()["detail"])


async def test_a_body_without_content_type_is_read_as_json(client: httpx.AsyncClient, worker: Worker) -> None:
    start_worker(worker)
    response = await client.post("/predict", content=b'{"text": ["ok", "fine"]}')  # as k6 and many scripts send it
    assert "content-type" not in response.request.headers
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == 2


@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", "Application/JSON", "application/vnd.x+json", "application/problem+json"],
)
async def test_every_json_media_type_is_read_as_json(client: httpx.AsyncClient, content_type: str) -> None:
    response = await client.post("/predict", content=b'{"text": []}', headers={"content-type": content_type})
    assert response.status_code == 422  # parsed: the complaint is about the body
    assert "at least 1 item" in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "text/json", "application/json-seq", "a/b/+json"],
)
async def test_a_body_declared_as_another_media_type_is_a_415_naming_the_header(
    client: httpx.AsyncClient, content_type: str
) -> None:
    response = await client.post("/predict", content=b'{"text": ["ok"]}', headers={"content-type": content_type})
    assert response.status_code == 415
    assert response.json()["error_type"] == "unsupported_media_type"
    assert "Content-Type" in response.json()["error"] and content_type in response.json()["error"]


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", " GZIP "])
async def test_a_compressed_body_is_a_415_not_malformed_json(client: httpx.AsyncClient, coding: str) -> None:
    """A client that compresses its body (`Content-Encoding`) hears why, as on /v2/.../infer: not a
    misleading "JSON decode error"."""
    response = await client.post(
        "/predict", content=gzip.compress(b'{"text": ["ok"]}'), headers={"content-encoding": coding}
    )
    assert response.status_code == 415, response.text
    assert response.json()["error_type"] == "unsupported_media_type"
    assert response.json()["error"].startswith("the body must not be compressed")
    assert coding.strip().lower() in response.json()["error"]


async def test_an_identity_content_encoding_is_read_as_it_is(client: httpx.AsyncClient) -> None:
    response = await client.post("/predict", content=b'{"text": []}', headers={"content-encoding": "identity"})
    assert response.status_code == 422  # parsed: the complaint is about the body
    assert "at least 1 item" in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/predict", {"text": ["ok"]}),
        ("/", {"inputs": "ok"}),
        ("/jobs", {"text": ["ok"]}),
        ("/v2/models/tiny/infer", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["ok"]}]}),
    ],
)
async def test_a_content_encoding_in_two_header_lines_is_read_as_one_list(
    client: httpx.AsyncClient, redis: fakeredis.FakeRedis, settings: Settings, path: str, body: dict
) -> None:
    """`identity` then `gzip` on two lines is `identity, gzip` (RFC 9110 5.3): a compressed body, the
    415, not the first line alone and the misleading "JSON decode error" of gzip read as JSON."""
    announce(redis, Keys(settings.key_prefix))
    split = [("content-encoding", "identity"), ("content-encoding", "gzip")]
    response = await client.post(path, content=gzip.compress(orjson.dumps(body)), headers=split)
    assert response.status_code == 415, response.text
    assert (
        response.json()["error"]
        == "the body must not be compressed: send it with no Content-Encoding, not 'identity, gzip'"
    )
    both = [("content-encoding", "identity"), ("content-encoding", "Identity")]  # (uncompressed, twice said)
    unread = await client.post(path, content=b"[]", headers=both)
    assert unread.status_code == 422, unread.text


@pytest.mark.parametrize(
    ("body", "quoted"),
    [
        ({"text": ["x" * 100_000]}, "x" * 100 + "… (100000 characters)"),
        ({"text": ["x"] * 10_001}, ["x"] * 20 + ["… (10001 in all)"]),
        ({"text": ["ok"], "k" * 1000: 1}, 1),  # the key, in `loc`, is cut instead
        ([{"text": ["x" * 500]}] * 100, [{"text": ["x" * 94 + "… (500 characters)"]}, "… (100 in all)"]),
    ],
    ids=["long-text", "many-texts", "long-key", "nested"],
)
async def test_a_422_quotes_at_most_about_100_characters_of_a_bad_value(
    client: httpx.AsyncClient, body: object, quoted: object
) -> None:
    response = await client.post("/predict", json=body)
    assert response.status_code == 422 and len(response.content) < 1000  # not 100 KB
    error = response.json()["detail"][0]
    assert error["input"] == quoted
    assert all(len(str(part)) < 130 for part in error["loc"])


async def test_a_422_names_a_number_of_thousands_of_digits_by_its_size(client: httpx.AsyncClient) -> None:
    body = b'{"text": [%s]}' % (b"9" * 4000)
    response = await client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["input"] == "a number of more than 100 digits"


async def test_openapi_states_the_configured_limits_and_docs_render(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    predict = schema["paths"]["/predict"]["post"]
    request = predict["requestBody"]["content"]["application/json"]["schema"]["properties"]["text"]
    assert (request["minItems"], request["maxItems"], request["items"]["maxLength"]) == (1, 64, 2000)
    assert {"200", "413", "415", "422", "503", "504"} <= set(predict["responses"])
    ref = predict["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.rsplit("/", 1)[1] in schema["components"]["schemas"]  # the 422 documents FastAPI's shape
    assert (await client.get("/docs")).status_code == 200


async def test_model_failure_is_a_424_json_error(
    client: httpx.AsyncClient, worker: Worker, classifier: Classifier, monkeypatch
) -> None:
    # A text the model cannot take; the engine still computes the one it computed at start (else it is
    # broken, and the worker stops: tests/test_worker.py).
    forward = classifier.engine.forward

    def broken(batch: list[list[int]], packed: bool = False) -> np.ndarray:
        if batch != [classifier.known_good]:
            raise RuntimeError("out of cheese")
        return forward(batch, packed)

    monkeypatch.setattr(classifier.engine, "forward", broken)
    start_worker(worker)
    response = await client.post("/predict", json={"text": ["anything"]})
    assert response.status_code == 424
    assert response.json() == {
        "error": "the model failed on this request's texts (RuntimeError)",
        "error_type": "inference",
    }


async def test_past_the_queue_limit_a_request_is_refused_unless_a_worker_already_took_it(
    settings: Settings, fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis, worker: Worker, monkeypatch
) -> None:
    keys = Keys(settings.key_prefix)
    # (a deadline as long as the hang guards: on a loaded box a shorter one is refused by admission, 503)
    full = settings.model_copy(update={"max_queue_depth": 1, "request_timeout_s": HANG_GUARD_S})
    async with client_for(full, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        redis.lpush(keys.queue, b"someone else's work")
        refused = await client.post("/predict", json={"text": ["over the limit"]})
        assert (refused.status_code, refused.headers["retry-after"]) == (503, "1")
        assert refused.json()["error_type"] == "overloaded"
        assert redis.lrange(keys.queue, 0, -1) == [b"someone else's work"]  # taken back out
        # A worker took the item between LPUSH and LREM: it is served, not refused.
        monkeypatch.setattr(fakeredis.FakeAsyncRedis, "lrem", AsyncMock(return_value=0))
        start_worker(worker)
        served = await client.post("/predict", json={"text": ["taken in time"]})
        assert served.status_code == 200


async def test_hot_texts_are_answered_from_the_process_cache_without_redis(
    settings: Settings, fake_server: fakeredis.FakeServer, worker: Worker
) -> None:
    start_worker(worker)
    keys = Keys(settings.key_prefix)
    async with client_for(settings, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        first = await client.post("/predict", json={"text": ["hot text"]})  # computed
        second = await client.post("/predict", json={"text": ["hot text"]})  # from Redis, now held locally
        fakeredis.FakeRedis(server=fake_server).delete(keys.cache(worker.classifier.version, "hot text"))
        third = await client.post("/predict", json={"text": ["hot text"]})  # Redis no longer has it
    assert [r.headers["x-cache"] for r in (first, second, third)] == ["miss", "hit", "hit"]
    assert third.json() == first.json()
    assert worker.lanes.computed == 1

    off = settings.model_copy(update={"local_cache_size": 0})
    async with client_for(off, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        fakeredis.FakeRedis(server=fake_server).delete(keys.cache(worker.classifier.version, "hot text"))
        again = await client.post("/predict", json={"text": ["hot text"]})
    assert again.headers["x-cache"] == "miss"
    assert worker.lanes.computed == 2


def test_a_request_route_refuses_what_it_would_not_inject() -> None:
    """Its endpoint gets the Request and nothing else: a parameter or a dependency would silently
    never be filled, so the route refuses it when made."""

    async def with_a_parameter(request: Request, limit: int) -> Response:
        return Response()

    async def plain(request: Request) -> Response:
        return Response()

    APIRouter(route_class=RequestRoute).add_api_route("/plain", plain)
    with pytest.raises(TypeError, match="takes only the Request"):
        APIRouter(route_class=RequestRoute).add_api_route("/parameter", with_a_parameter)
    with pytest.raises(TypeError, match="no dependencies"):
        APIRouter(route_class=RequestRoute, dependencies=[Depends(lambda: None)]).add_api_route("/guarded", plain)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/predict", {"text": ["in a hurry"]}),
        (
            "/v2/models/tiny/infer",
            {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["in a hurry"]}]},
        ),
    ],
)
async def test_a_request_timeout_header_is_the_work_items_deadline(
    client: httpx.AsyncClient, redis: fakeredis.FakeRedis, settings: Settings, path: str, body: dict
) -> None:
    # No worker: the request waits out its own deadline, not the service's 10 s, and the item it
    # queued carries that deadline for every later decision (the worker's plan, its expiry).
    keys = Keys(settings.key_prefix)
    announce(redis, keys)
    sent_at = time.time()
    response = await asyncio.wait_for(client.post(path, json=body, headers={"X-Request-Timeout": "0.5"}), HANG_GUARD_S)
    assert response.status_code == 504, response.text
    assert response.json()["error_type"] == "timeout"
    item = WorkItem.decode(redis.lindex(keys.queue, 0))
    # (0.5 s from the request's arrival, between its sending and its item's queueing, however loaded the box)
    assert sent_at + 0.5 <= item.deadline <= item.enqueued_at + 0.5


@pytest.mark.parametrize("value", ["0.5 ", " 0.5", "\t0.5\t"])
async def test_a_request_timeout_header_with_whitespace_around_it_is_its_number(
    client: httpx.AsyncClient, redis: fakeredis.FakeRedis, settings: Settings, value: str
) -> None:
    """HTTP's optional whitespace around a value is no part of it; httptools (uvicorn's default
    parser) leaves the trailing whitespace in place, where h11 strips it."""
    keys = Keys(settings.key_prefix)
    announce(redis, keys)
    response = await asyncio.wait_for(
        client.post("/predict", json={"text": ["x"]}, headers={"X-Request-Timeout": value}), HANG_GUARD_S
    )
    assert response.status_code == 504, response.text
    item = WorkItem.decode(redis.lindex(keys.queue, 0))
    assert 0.4 < item.deadline - item.enqueued_at <= 0.5


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf", "10.5", ""])
async def test_a_bad_request_timeout_header_is_a_422_naming_it(client: httpx.AsyncClient, value: str) -> None:
    response = await client.post("/predict", json={"text": ["x"]}, headers={"X-Request-Timeout": value})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["header", "X-Request-Timeout"]
    assert "at most 10" in error["msg"]


@pytest.mark.parametrize(
    "sent", [[("X-Request-Timeout", "0.5"), ("X-Request-Timeout", "9")], [("X-Request-Timeout", "0.5, 9")]]
)
async def test_a_deadline_sent_twice_is_a_422_whether_or_not_a_proxy_joined_the_two(
    client: httpx.AsyncClient, sent: list[tuple[str, str]]
) -> None:
    """Two field lines of a name are the one value of the two joined (RFC 9110 5.3), which a proxy may
    join on the way: either way the request names two deadlines, refused alike, the first never
    taken as if alone."""
    response = await client.post("/predict", json={"text": ["x"]}, headers=sent)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert (error["loc"], error["input"]) == (["header", "X-Request-Timeout"], "0.5, 9")


async def test_work_that_cannot_make_its_deadline_is_answered_late_unstarted(
    settings: Settings,
    fake_server: fakeredis.FakeServer,
    worker: Worker,
    classifier: Classifier,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Forwards take 3 s here: a request due within 1 s cannot be answered in time, so the worker's
    # plan drops it before the model runs and the API says so (late, not lost), within its deadline.
    # The API admits it (an API without admission here: a prediction can be wrong), the plan is the last word.
    admitting = settings.model_copy(update={"overload_policy": "queue-length"})
    real_forward = classifier.engine.forward

    def slow(batch: list[list[int]], packed: bool = False) -> Any:
        time.sleep(3.0)
        return real_forward(batch, packed)

    monkeypatch.setattr(classifier.engine, "forward", slow)
    start_worker(worker)
    async with client_for(admitting, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        timed = await asyncio.wait_for(client.post("/predict", json={"text": ["the forward is timed"]}), HANG_GUARD_S)
        assert timed.status_code == 200
        computed = worker.lanes.computed
        response = await asyncio.wait_for(
            client.post("/predict", json={"text": ["in a hurry"]}, headers={"X-Request-Timeout": "1"}), HANG_GUARD_S
        )
    assert response.status_code == 504
    assert response.json()["error"].startswith("late, not lost")
    assert worker.lanes.computed == computed


async def test_a_request_the_workers_could_not_answer_in_time_is_refused_at_once_writing_nothing(
    client: httpx.AsyncClient, redis: fakeredis.FakeRedis, settings: Settings
) -> None:
    # A worker that computes 10 texts a second, 100 texts queued: about 10 s until a new one is answered.
    keys = Keys(settings.key_prefix)
    behind(redis, keys, 100)
    before = redis.dbsize()
    response = await asyncio.wait_for(
        client.post("/predict", json={"text": ["in a hurry"]}, headers={"X-Request-Timeout": "1"}), HANG_GUARD_S
    )
    assert response.status_code == 503
    assert response.json()["error_type"] == "overloaded"
    assert response.headers["Retry-After"] == "20"  # 2 x 10 s + 0.1 s - 1 s, rounded up
    assert (redis.llen(keys.queue), redis.dbsize()) == (100, before)  # nothing queued, nothing written


async def test_under_overload_a_cache_hit_is_answered_and_only_texts_no_cache_holds_are_refused(
    settings: Settings, fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis
) -> None:
    # A cache hit costs the model nothing: however loaded the fleet, a text in Redis's cache (this
    # process's own cache empty, as behind another API process) is answered; admission decides for
    # the texts neither cache holds, and counts only those it admitted.
    keys = Keys(settings.key_prefix)
    hot = [{"label": "NEGATIVE", "score": 0.1}, {"label": "POSITIVE", "score": 0.9}]
    behind(redis, keys, 4)  # 0.5 s until a new request is answered (0.9 counted with the margin): in time
    for text in ("in redis", "also in redis", "held here"):
        redis.set(keys.cache("v1", text), orjson.dumps(hot))
    now = [0.0]
    client = fakeredis.FakeAsyncRedis(server=fake_server)
    admission = Admission(Load(fakeredis.FakeAsyncRedis(server=fake_server), keys, lambda: now[0]))
    local: TTLCache[str, list[dict]] = TTLCache(10, ttl=60)
    local[keys.cache("v1", "held here")] = hot
    predictor = Predictor(
        client, keys, ResultWaiter(client, keys), ModelInfoCache(client, keys), 1.0, 0, local, admission=admission
    )
    assert await predictor.predict(["in redis"]) == ([hot], CacheStatus.HIT)  # and held here from now on
    assert admission.load.admitted == 0

    queue_more(redis, keys, 95)  # 10 s: past a 1-s deadline
    now[0] += MAX_AGE_S  # the view is read again before the next request decides by it
    assert await predictor.predict(["also in redis"]) == ([hot], CacheStatus.HIT)
    assert await predictor.predict(["held here", "in redis"]) == ([hot, hot], CacheStatus.HIT)
    for texts in (["never seen"], ["also in redis", "never seen"]):
        with pytest.raises(ServiceError) as refused:
            await predictor.predict(texts)
        assert refused.value.error_type is ErrorType.OVERLOADED
    assert (admission.load.admitted, redis.llen(keys.queue)) == (0, 99)  # nothing admitted, nothing queued


async def test_under_overload_a_refusal_waits_on_no_read_of_the_announced_model_and_requests_share_one(
    settings: Settings, fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The announced model (the cache's version) is read again in the background: while that read
    # is on its way (Redis slow to answer), requests go on with the model read last, refused at once
    # under overload, and all of them together make one read; the next request sees what it read.
    monkeypatch.setattr("api.predictions.MODEL_INFO_REFRESH_S", 0)  # stale at once: every request would read it
    keys = Keys(settings.key_prefix)
    behind(redis, keys, 100)  # 10.1 s until a new request is answered: past a 1-s deadline
    client = fakeredis.FakeAsyncRedis(server=fake_server)
    models = ModelInfoCache(client, keys)
    assert (await models.current()) is not None  # the first read, waited for
    admission = Admission(Load(fakeredis.FakeAsyncRedis(server=fake_server), keys))
    predictor = Predictor(client, keys, ResultWaiter(client, keys), models, 1.0, 0, admission=admission)
    answer, reads, get = asyncio.Event(), [], client.get

    async def slow_get(key: str) -> bytes | None:
        reads.append(key)
        await answer.wait()
        return await get(key)

    monkeypatch.setattr(client, "get", slow_get)
    announce(redis, keys, version="v2")
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(predictor.predict([f"text {i}"]) for i in range(20)), return_exceptions=True), HANG_GUARD_S
    )
    assert [getattr(o, "error_type", o) for o in outcomes] == [ErrorType.OVERLOADED] * 20
    assert reads == [keys.model]  # one read of the announcement for all of them, still on its way
    answer.set()
    assert models.view.reading is not None
    await models.view.reading
    info = await models.current()  # by what that read found
    assert info is not None and info.version == "v2"
