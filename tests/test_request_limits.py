"""Limits that agree with the deadline: a request bigger than the model answers in time is refused at
once (413, its size and the ways out), and a 504 says what was slow."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import fakeredis
import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from api.app import create_app
from api.errors import ServiceError
from api.limits import body_limit
from api.predictions import ModelInfoCache, Predictor
from api.results import ResultWaiter
from core.protocol import Keys, ModelInfo, WorkerStatus
from core.settings import Settings
from tests.conftest import HANG_GUARD_S
from tests.test_abandoned import asgi_post
from tests.test_api import announce, client_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_request_past_its_character_limit_is_refused_at_once_with_its_size_and_the_ways_out(
    settings: Settings, fake_server: fakeredis.FakeServer
) -> None:
    assert settings.max_request_chars == 10_000  # 1,000 a second of the 10-s deadline
    texts = ["a" * 2000] * 5 + ["b" * 1999, "c"]  # 12,000 characters, every text within SENTIMENT_MAX_CHARS
    async with client_for(settings, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        response = await client.post("/predict", json={"text": texts})
    assert response.status_code == 413
    error = response.json()["error"]
    assert error.startswith("this request holds 12,000 characters in 7 texts; a request may hold 10,000")
    assert "split it into requests of at most 10,000 characters" in error and "(POST /jobs)" in error
    assert not fakeredis.FakeRedis(server=fake_server).llen(Keys(settings.key_prefix).queue)  # nothing queued


def test_the_limit_follows_the_deadline() -> None:
    assert Settings(request_timeout_s=30).max_request_chars == 30_000


async def late(fake_server: fakeredis.FakeServer, keys: Keys, alive: bool, take: bool) -> str:
    """The 504 of a request nobody answers: with a live worker's heartbeat or none, its work item
    left queued (behind another) or taken into a worker's processing list."""
    redis = fakeredis.FakeRedis(server=fake_server)
    redis.set(keys.model, ModelInfo("m", "v1", ["NEGATIVE", "POSITIVE"], "cpu", "fp32").encode())
    if alive:
        redis.sadd(keys.workers, "w1")
        redis.set(keys.heartbeat("w1"), WorkerStatus("w1", "h", 1, "v1", time.time()).encode(), ex=60)
    client = fakeredis.FakeAsyncRedis(server=fake_server)
    predictor = Predictor(client, keys, ResultWaiter(client, keys), ModelInfoCache(client, keys), 0.5, 0)
    redis.lpush(keys.queue, b"someone else's work")
    request = asyncio.create_task(predictor.predict(["anything"]))
    while redis.llen(keys.queue) != 2:
        await asyncio.sleep(0.01)
    if take:
        redis.lmove(keys.queue, keys.processing("w1"), "LEFT", "RIGHT")  # (our item: the newest, at the head)
    with pytest.raises(ServiceError) as refused:
        await request
    assert refused.value.error_type == "timeout"
    return refused.value.message


async def test_a_504_says_what_was_slow(fake_server: fakeredis.FakeServer) -> None:
    keys = Keys("late")
    queued = await late(fake_server, keys, alive=True, take=False)
    assert queued.startswith(
        "no result within 0.5 s: the deadline was reached at the queue stage: its work item was still queued "
        "(1 ahead of it)"
    )
    computing = await late(fakeredis.FakeServer(), keys, alive=True, take=True)
    assert "reached at the model stage: a worker took its work item and was still computing it" in computing
    nobody = await late(fakeredis.FakeServer(), keys, alive=False, take=False)
    assert "reached at the queue stage: no worker is alive to compute it" in nobody


async def test_a_chunked_body_is_read_within_its_deadline_fixed_at_arrival(
    settings: Settings, fake_server: fakeredis.FakeServer
) -> None:
    """With no access control, the body limit reads a chunked body before the route runs: it fixes
    the deadline first, so that the upload counts against it, as a body of declared size does."""
    assert not settings.api_keys and settings.rate_limit_per_s is None
    app = create_app(settings, fakeredis.FakeAsyncRedis(server=fake_server), fakeredis.FakeRedis(server=fake_server))
    fixed: list[bool] = []  # for each chunk read, whether the deadline was fixed by then

    async def spied(scope: Scope, receive: Receive, send: Send) -> None:
        async def reading() -> Message:
            message = await receive()
            fixed.append("deadline" in scope.get("state", {}))
            return message

        await app(scope, reading if scope["type"] == "http" else receive, send)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: sent chunked
        yield b'{"text": '
        yield b"[]}"

    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=spied), base_url="http://api") as client:
            response = await client.post("/predict", content=chunks())
    assert response.status_code == 422  # (the route reached: it read the body)
    assert fixed and all(fixed), fixed


async def test_a_body_sent_to_a_path_with_a_trailing_slash_is_redirected_within_the_route_s_limit(
    settings: Settings, fake_server: fakeredis.FakeServer
) -> None:
    """The router redirects `/predict/` to `/predict` (307: the client sends the body again), so the
    body limit of `/predict` applies there, not the 1,024 bytes of a path that takes no body."""
    body = {"text": ["a" * 2000]}
    async with client_for(settings, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        moved = await client.post("/predict/", json=body)
        too_large = await client.post("/predict/", json={"text": ["a"] * 1_000_000})
    assert (moved.status_code, moved.headers["location"]) == (307, "http://api/predict"), moved.text
    assert too_large.status_code == 413 and str(body_limit(settings.max_texts, settings.max_chars)) in too_large.text


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("path", ["/predict", "/", "/v2/models/tiny/infer"])
async def test_an_upload_that_outlasts_its_deadline_is_cut_there_with_a_504(
    settings: Settings, fake_server: fakeredis.FakeServer, path: str, chunked: bool
) -> None:
    """A client that stops sending midway through its body (less than its Content-Length, or a chunked
    body never ended) holds its request until its deadline, which runs from its arrival, and no
    longer: the 504 then names the upload, not a later stage it never reached."""
    announce(fakeredis.FakeRedis(server=fake_server), Keys(settings.key_prefix))
    app = create_app(settings, fakeredis.FakeAsyncRedis(server=fake_server), fakeredis.FakeRedis(server=fake_server))
    scope = asgi_post(path, b" " * 1000)  # (1,000 bytes declared, the first few sent)
    headers = [(name, value) for name, value in scope["headers"] if not (chunked and name == b"content-length")]
    scope["headers"] = [*headers, (b"x-request-timeout", b"0.1")]
    sent: list[Message] = []
    answered = asyncio.Event()
    first: list[Message] = [{"type": "http.request", "body": b'{"text": ["', "more_body": True}]

    async def receive() -> Message:
        if first:
            return first.pop()
        await answered.wait()  # (the rest of the body never comes; the client leaves once answered)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            answered.set()

    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app(scope, receive, send), HANG_GUARD_S)
    assert sent[0]["status"] == 504, sent
    error = json.loads(sent[1]["body"])
    assert error["error_type"] == "timeout"
    assert "no result within 0.1 s: the deadline was reached at the upload stage" in error["error"]
