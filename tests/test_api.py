"""The API in process (httpx ASGI transport) against fakeredis, with a worker thread on the tiny model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from unittest.mock import AsyncMock

import fakeredis
import httpx
import pytest
from redis.asyncio import Redis

from api.app import create_app
from batcher.protocol import Keys, WorkItem, prediction
from batcher.worker import Worker
from model_store.classifier import Classifier
from sentiment.embedded import free_port
from sentiment.settings import Settings
from tests.conftest import start_worker

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def client_for(settings: Settings, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    # Bulk jobs get a fake Redis of their own: never the default URL's (a Redis these tests did not start).
    app = create_app(settings, redis=redis, jobs_redis=fakeredis.FakeRedis())
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            yield client


@pytest.fixture
async def client(settings: Settings, fake_server: fakeredis.FakeServer) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(settings, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        yield client


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
        assert got == pytest.approx(expected, abs=1e-5)


async def test_cache_status_miss_then_hit_then_partial(client: httpx.AsyncClient, worker: Worker) -> None:
    start_worker(worker)
    first = await client.post("/predict", json={"text": ["one", "two"]})
    again = await client.post("/predict", json={"text": ["two", "one"]})
    partial = await client.post("/predict", json={"text": ["one", "three"]})
    assert [r.headers["x-cache"] for r in (first, again, partial)] == ["miss", "hit", "partial"]
    assert again.json()["predictions"] == first.json()["predictions"][::-1]
    assert partial.json()["predictions"][0] == first.json()["predictions"][0]
    assert worker.inference.computed == 3


async def test_one_work_item_with_deduplicated_misses(
    settings: Settings, fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis
) -> None:
    # No worker: the request times out, and the queue shows exactly what the API asked for.
    fast = settings.model_copy(update={"request_timeout_s": 0.3})
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
    assert worker.inference.computed == 21
    assert worker.status.largest_batch_requests > 1


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
        ({"text": "just a string"}, "valid list"),
        ({"text": ["ok", 3]}, "valid string"),
        ({"text": ["ok", None]}, "valid string"),
        ({"text": [["nested"]]}, "valid string"),
        ({"text": ["x"] * 65}, "at most 64 items"),
        ({"text": ["x" * 2001]}, "at most 2000 characters"),
        ({"text": ["ok"], "extra": 1}, "Extra inputs"),
        ([], "valid dictionary"),
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
        (b'{"text": ["\\ud800"]}', "unable to parse raw data as a unicode string"),
        (b"\xff\xfe", "JSON decode error"),
    ],
)
async def test_malformed_json_gets_a_422(client: httpx.AsyncClient, raw: bytes, complaint: str) -> None:
    response = await client.post("/predict", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert complaint in str(response.json()["detail"])


async def test_openapi_states_the_configured_limits_and_docs_render(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    request = schema["components"]["schemas"]["PredictRequest"]["properties"]["text"]
    assert (request["minItems"], request["maxItems"], request["items"]["maxLength"]) == (1, 64, 2000)
    assert {"200", "422", "503", "504"} <= set(schema["paths"]["/predict"]["post"]["responses"])
    assert (await client.get("/docs")).status_code == 200


async def test_model_failure_is_a_424_json_error(
    client: httpx.AsyncClient, worker: Worker, classifier: Classifier, monkeypatch
) -> None:
    def broken(batch: list[list[int]]) -> list[list[float]]:
        raise RuntimeError("out of cheese")

    monkeypatch.setattr(classifier, "forward", broken)
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
    full = settings.model_copy(update={"max_queue_depth": 1, "request_timeout_s": 5})
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
    assert worker.inference.computed == 1

    off = settings.model_copy(update={"local_cache_size": 0})
    async with client_for(off, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        fakeredis.FakeRedis(server=fake_server).delete(keys.cache(worker.classifier.version, "hot text"))
        again = await client.post("/predict", json={"text": ["hot text"]})
    assert again.headers["x-cache"] == "miss"
    assert worker.inference.computed == 2
