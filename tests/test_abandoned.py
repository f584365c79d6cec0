"""Abandoned work: a /predict request whose client went away, or whose deadline cut its wait, marks
its work item abandoned, and the worker drops it before a forward has it (a text another live
request waits for is still computed). In process on fakeredis, then with real processes."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from pathlib import Path

import fakeredis
import httpx
import orjson
import pytest
import redis as sync_redis
from starlette.types import ASGIApp, Receive

from api import predictions
from api.app import create_app
from api.results import ResultWait
from batcher import intake as intake_module
from batcher.plan import Window
from batcher.worker import Worker
from core.protocol import ABANDONED_GRACE_S, Keys, ModelInfo, Result, WorkItem, new_id, prediction
from core.settings import Settings
from model_store.classifier import Classifier
from sentiment.embedded import free_port
from tests.conftest import HANG_GUARD_S, Service, hold_forwards, start_worker, wait_for
from tests.test_api import client_for
from tests.test_metrics import samples, value
from tests.test_plan import HOUR_S, KEYS, held_texts, make_intake, policy, work_item


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def push(redis: fakeredis.FakeRedis, keys: Keys, *texts: str) -> WorkItem:
    now = time.time()
    item = WorkItem(new_id(), list(texts), now, now + 30, keys.reply_channel("api"))
    redis.lpush(keys.queue, item.encode())
    return item


def abandon(redis: fakeredis.FakeRedis, keys: Keys, item: WorkItem) -> None:
    """Mark `item` abandoned as the API does: its marker, and the epoch moved."""
    redis.set(keys.abandoned(item.id), 1, px=int((item.deadline - time.time() + ABANDONED_GRACE_S) * 1000))
    redis.incr(keys.abandoned_epoch)


def wait_result(redis: fakeredis.FakeRedis, keys: Keys, item: WorkItem) -> Result:
    return Result.decode(wait_for(f"the result of {item.id}", lambda: redis.get(keys.result(item.id))))


def marked_until(redis: fakeredis.FakeRedis, keys: Keys, item: WorkItem) -> float:
    """When `item`'s abandoned marker expires (unix s, at most a little early)."""
    return time.time() + redis.pttl(keys.abandoned(item.id)) / 1000


def processing(redis: fakeredis.FakeRedis, keys: Keys, worker_id: str = "w1") -> set[str]:
    return {WorkItem.decode(raw).id for raw in redis.lrange(keys.processing(worker_id), 0, -1)}


# --- the worker -----------------------------------------------------------------------------------


def test_an_item_abandoned_before_it_is_taken_is_never_computed(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings
) -> None:
    keys = Keys(settings.key_prefix)
    gone = push(redis, keys, "nobody waits for this")
    abandon(redis, keys, gone)
    live = push(redis, keys, "still wanted")
    start_worker(worker)
    assert wait_result(redis, keys, live).predictions
    assert (worker.intake.abandoned, worker.lanes.computed) == (1, 1)
    assert not redis.exists(keys.result(gone.id))
    assert (redis.llen(keys.queue), redis.llen(keys.processing(worker.id))) == (0, 0)


def test_an_abandoned_item_held_but_not_yet_in_a_forward_is_dropped_at_the_next_take(
    redis: fakeredis.FakeRedis,
) -> None:
    intake = make_intake(redis, Window(policy()))
    gone, live = push(redis, KEYS, "nobody waits", "for these"), push(redis, KEYS, "still wanted")
    assert intake.take()  # both held, neither in a forward
    abandon(redis, KEYS, gone)
    later = push(redis, KEYS, "the next take")
    assert intake.take()  # the epoch moved: the held items' markers are looked up
    assert intake.abandoned == 1
    assert processing(redis, KEYS) == {live.id, later.id}  # acknowledged, as an expired item is
    assert gone.encode() not in intake.queue.held_raws
    assert held_texts(intake.window) == ["still wanted", "the next take"]


def test_while_work_is_being_abandoned_a_full_window_is_looked_over_between_takes(
    redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under overload a take waits a whole forward for room: meanwhile the held work is looked over.
    monkeypatch.setattr(intake_module, "ABANDONING_FOR_S", HOUR_S)
    intake = make_intake(redis, Window(policy(window=2)))
    abandon(redis, KEYS, work_item("someone else's"))  # the epoch moves: work is being abandoned
    first, second = push(redis, KEYS, "first"), push(redis, KEYS, "second")
    push(redis, KEYS, "no room for this yet")
    assert intake.take()
    assert intake.window.room() == 0
    abandon(redis, KEYS, first)
    assert not intake.take()  # no room: a look instead
    assert intake.abandoned == 1
    assert processing(redis, KEYS) == {second.id}
    assert redis.llen(KEYS.queue) == 1
    assert held_texts(intake.window) == ["second"]


def test_a_text_held_for_an_abandoned_and_a_live_item_stays_with_the_live_one(redis: fakeredis.FakeRedis) -> None:
    intake = make_intake(redis, Window(policy()))
    gone, live = push(redis, KEYS, "shared", "only theirs"), push(redis, KEYS, "shared")
    assert intake.take()
    abandon(redis, KEYS, gone)
    push(redis, KEYS, "the next take")
    assert intake.take()
    shared, *rest = intake.window.close()
    assert [(held.item.id, index) for held, index in shared.waiters] == [(live.id, 0)]
    assert [shared.text, *(t.text for t in rest)] == ["shared", "the next take"]


def test_without_a_move_of_the_epoch_no_marker_is_looked_up(
    redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The normal case: nothing was ever abandoned, and a take makes its one cache round trip only.
    intake = make_intake(redis, Window(policy()))
    calls: list[str] = []
    call = intake.queue.link.call

    def recorded(*commands: tuple[object, ...], **kwargs: bool) -> list[object]:
        calls.extend(str(c[0]) for c in commands)
        return call(*commands, **kwargs)

    monkeypatch.setattr(intake.queue.link, "call", recorded)
    push(redis, KEYS, "one")
    assert intake.take()
    push(redis, KEYS, "two")
    assert intake.take()
    assert [c for c in calls if c != "LMOVE"] == ["MGET", "GET"] * 2  # cache check, epoch along


def test_with_dropping_off_abandoned_work_is_computed_as_before(redis: fakeredis.FakeRedis) -> None:
    # SENTIMENT_DROP_ABANDONED=false: the baseline `sentiment bench --only cancel` measures against.
    intake = make_intake(redis, Window(policy()))
    intake.drop_abandoned = False
    gone = push(redis, KEYS, "nobody waits")
    abandon(redis, KEYS, gone)
    assert intake.take()
    assert intake.abandoned == 0 and held_texts(intake.window) == ["nobody waits"]


def test_a_text_shared_with_a_live_request_is_still_computed_and_that_request_answered(
    redis: fakeredis.FakeRedis, settings: Settings, classifier: Classifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The one lane is held in a forward, so what is taken next waits unstarted; then one of two
    # items sharing a text is abandoned.
    keys = Keys(settings.key_prefix)
    forwarding, release = hold_forwards(monkeypatch, classifier)
    worker = Worker(settings, redis, classifier)
    thread = start_worker(worker)
    try:
        first = push(redis, keys, "in the forward")
        assert forwarding.wait(HANG_GUARD_S)
        gone, live = push(redis, keys, "shared", "only theirs"), push(redis, keys, "shared")
        wait_for("both items held", lambda: len(worker.window) == 2)
        abandon(redis, keys, gone)
        later = push(redis, keys, "the next take")
        wait_for("the abandoned item dropped", lambda: worker.intake.abandoned == 1)
        release.set()
        answers = [wait_result(redis, keys, item) for item in (first, live, later)]
        assert all(a.predictions for a in answers)
        assert worker.lanes.computed == 3  # "in the forward", "shared", "the next take"; never "only theirs"
        assert not redis.exists(keys.result(gone.id))
        assert redis.llen(keys.processing(worker.id)) == 0
    finally:
        release.set()
        worker.stop()
        thread.join(10)


# --- the API --------------------------------------------------------------------------------------


def asgi_post(path: str, body: bytes) -> dict[str, object]:
    """The scope of a JSON POST, as a server hands it to the app."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("api", 80),
    }


async def post(app: ASGIApp, body: bytes, receive: Receive) -> list[dict[str, object]]:
    """POST `body` to /predict as a server would, `receive` its channel; the messages sent back."""
    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(asgi_post("/predict", body), receive, send), HANG_GUARD_S)
    return sent


@pytest.mark.anyio
async def test_a_client_that_goes_away_while_it_waits_gets_its_work_dropped(
    settings: Settings, fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis, worker: Worker
) -> None:
    # The app driven as a server drives it: once the work is queued, the receive channel says the
    # client disconnected. No worker yet: the one started afterwards finds the item abandoned.
    keys = Keys(settings.key_prefix)
    body = orjson.dumps({"text": ["nobody will read this"]})
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, object]:
        if messages:
            return messages.pop()
        await asyncio.to_thread(wait_for, "the work item", lambda: redis.llen(keys.queue))
        return {"type": "http.disconnect"}

    app = create_app(settings, redis=fakeredis.FakeAsyncRedis(server=fake_server), jobs_redis=fakeredis.FakeRedis())
    async with app.router.lifespan_context(app):
        sent = await post(app, body, receive)
        item = WorkItem.decode(redis.lindex(keys.queue, 0))
        await asyncio.to_thread(wait_for, "the abandoned marker", lambda: redis.exists(keys.abandoned(item.id)))
        assert app.state.predictor._waiter._waits == {}
    assert sent[0]["status"] == 499  # what the request metrics record; nobody reads it
    assert item.deadline < marked_until(redis, keys, item) <= item.deadline + 2 * ABANDONED_GRACE_S
    assert redis.get(keys.abandoned_epoch) == b"1"
    assert redis.zcard(keys.outstanding(item.client)) == 0  # no longer its client's work (the overload refusal)
    start_worker(worker)
    wait_for("the worker to drop the item", lambda: worker.intake.abandoned == 1)
    assert worker.lanes.computed == 0
    assert (redis.llen(keys.queue), redis.llen(keys.processing(worker.id))) == (0, 0)
    assert not redis.exists(keys.result(item.id))


@pytest.mark.anyio
async def test_a_cache_hit_never_watches_for_the_disconnect(
    settings: Settings, fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis
) -> None:
    keys = Keys(settings.key_prefix)
    redis.set(keys.model, ModelInfo("tiny", "v1", ["NEGATIVE", "POSITIVE"], "cpu", "float32").encode())
    hot = prediction(["NEGATIVE", "POSITIVE"], [0.25, 0.75])
    redis.set(keys.cache("v1", "hot"), orjson.dumps(hot))
    body = orjson.dumps({"text": ["hot"]})
    received: list[str] = []

    async def receive() -> dict[str, object]:
        received.append("receive")
        assert len(received) == 1, "a cache hit reads its body and nothing more"
        return {"type": "http.request", "body": body, "more_body": False}

    app = create_app(settings, redis=fakeredis.FakeAsyncRedis(server=fake_server), jobs_redis=fakeredis.FakeRedis())
    async with app.router.lifespan_context(app):
        sent = await post(app, body, receive)
    assert sent[0]["status"] == 200 and orjson.loads(sent[1]["body"]) == {"predictions": [hot]}  # type: ignore[arg-type]
    assert received == ["receive"]
    assert not redis.exists(keys.abandoned_epoch)


@pytest.mark.anyio
async def test_a_wait_watched_for_the_disconnect_leaves_no_garbage_cycle(
    settings: Settings,
    fake_server: fakeredis.FakeServer,
    worker: Worker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every wait past WATCH_AFTER_S (all of them under load) runs a watch task, cancelled when the
    # result comes: what it leaves must go with the request, not wait for a collection.
    watches: list[weakref.ref[predictions._DisconnectWatch]] = []

    class Watch(predictions._DisconnectWatch):
        def __init__(self, receive: Receive, wait: ResultWait) -> None:
            super().__init__(receive, wait)
            watches.append(weakref.ref(self))

    monkeypatch.setattr(predictions, "_DisconnectWatch", Watch)
    monkeypatch.setattr(predictions, "WATCH_AFTER_S", 0.0)  # the watch runs from the start of the wait
    start_worker(worker)
    body = orjson.dumps({"text": ["a text to wait for"]})
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, object]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # the client stays
        return {"type": "http.disconnect"}

    app = create_app(settings, redis=fakeredis.FakeAsyncRedis(server=fake_server), jobs_redis=fakeredis.FakeRedis())
    async with app.router.lifespan_context(app):
        gc.disable()
        try:
            sent = await post(app, body, receive)
            for _ in range(3):  # the cancelled watch task's last step, and its done callback
                await asyncio.sleep(0)
            assert sent[0]["status"] == 200
            assert len(watches) == 1 and watches[0]() is None  # freed as the request ended, no collection
        finally:
            gc.enable()


@pytest.mark.anyio
async def test_a_request_cut_at_its_deadline_marks_its_work_abandoned(
    settings: Settings, fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis
) -> None:
    keys = Keys(settings.key_prefix)
    short = settings.model_copy(update={"request_timeout_s": 0.3})
    async with client_for(short, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        response = await asyncio.wait_for(client.post("/predict", json={"text": ["cut short"]}), HANG_GUARD_S)
        item = WorkItem.decode(redis.lindex(keys.queue, 0))
        await asyncio.to_thread(wait_for, "the abandoned marker", lambda: redis.exists(keys.abandoned(item.id)))
    assert response.status_code == 504
    assert item.deadline < marked_until(redis, keys, item) <= item.deadline + 2 * ABANDONED_GRACE_S
    assert redis.get(keys.abandoned_epoch) == b"1"


@pytest.mark.anyio
async def test_a_request_cut_while_its_push_is_in_flight_marks_its_work_abandoned(
    settings: Settings, fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis
) -> None:
    # Redis queues the item but its answer never comes back: when the deadline cuts the request, the
    # item may be queued, so it is marked abandoned for the workers to drop.
    keys = Keys(settings.key_prefix)
    client = fakeredis.FakeAsyncRedis(server=fake_server)
    pipeline = client.pipeline

    def answer_lost(*args: object, **kwargs: object) -> object:
        pipe = pipeline(*args, **kwargs)
        execute = pipe.execute

        async def queued_then_silent(*a: object, **k: object) -> object:
            pushing = any(command[0] == "LPUSH" for command, _ in pipe.command_stack)
            answer = await execute(*a, **k)
            if pushing:
                await asyncio.Event().wait()
            return answer

        pipe.execute = queued_then_silent
        return pipe

    client.pipeline = answer_lost  # type: ignore[method-assign]
    short = settings.model_copy(update={"request_timeout_s": 0.3})
    async with client_for(short, client) as api:
        response = await asyncio.wait_for(api.post("/predict", json={"text": ["cut mid-push"]}), HANG_GUARD_S)
        item = WorkItem.decode(redis.lindex(keys.queue, 0))
        await asyncio.to_thread(wait_for, "the abandoned marker", lambda: redis.exists(keys.abandoned(item.id)))
    assert response.status_code == 504
    assert redis.get(keys.abandoned_epoch) == b"1"


# --- real processes -------------------------------------------------------------------------------


def scraped(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return samples(httpx.get(url, timeout=HANG_GUARD_S).text)


def test_clients_that_give_up_leave_the_worker_nothing_to_compute(redis_url: str, tiny_model_dir: Path) -> None:
    # `sentiment api` under uvicorn sees each client close its connection (an HTTP client's read
    # timeout) while its request waits; the worker, started afterwards, drops all their items.
    prefix = f"abandoned-{new_id()[:8]}"
    keys = Keys(prefix)
    client = sync_redis.Redis.from_url(redis_url)
    metrics_port = free_port()
    svc = Service(
        redis_url, tiny_model_dir, prefix, SENTIMENT_REQUEST_TIMEOUT_S="60", SENTIMENT_METRICS_PORT=str(metrics_port)
    )
    try:
        svc.start("api", "--port", str(svc.port))
        wait_for("the API", lambda: _up(svc.url))
        for i in range(3):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(
                    f"{svc.url}/predict", json={"text": [f"given up on {i}"]}, timeout=httpx.Timeout(60, read=0.5)
                )
        wait_for("three abandoned markers", lambda: len(list(client.scan_iter(keys.abandoned("*")))) == 3)
        assert client.llen(keys.queue) == 3
        svc.start("worker")
        svc.wait_ready()
        live = httpx.post(f"{svc.url}/predict", json={"text": ["still wanted"]}, timeout=HANG_GUARD_S)
        assert live.status_code == 200
        worker = f"http://127.0.0.1:{metrics_port}/metrics"
        wait_for(
            "the worker to drop the three items",
            lambda: value(scraped(worker), "sentiment_work_items_abandoned_total", when="queued") == 3,
        )
        assert value(scraped(worker), "sentiment_batch_size_sum") == 1  # only the live text went through the model
        api = scraped(f"{svc.url}/metrics")
        assert value(api, "sentiment_requests_abandoned_total", reason="disconnected") == 3
        assert value(api, "sentiment_replies_unclaimed_total") == 0  # no work was done for nobody
        assert client.llen(keys.queue) == 0
        assert list(client.scan_iter(keys.processing("*"))) == []  # (an emptied list is no key)
    finally:
        svc.stop()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.TransportError:
        return False
