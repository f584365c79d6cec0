"""The worker on fakeredis with the tiny model: results, cache, dedupe, notifications, shutdown."""

from __future__ import annotations

import threading
import time

import fakeredis
import orjson
import pytest

from batcher.liveness import live_workers
from batcher.protocol import Keys, ModelInfo, Result, WorkItem, new_id, prediction
from batcher.worker import Worker
from model_store.classifier import Classifier
from sentiment.settings import Settings
from tests.conftest import start_worker, wait_for


def push(redis: fakeredis.FakeRedis, keys: Keys, *texts: str) -> WorkItem:
    now = time.time()
    item = WorkItem(new_id(), list(texts), now, now + 30, keys.reply_channel("api"))
    redis.lpush(keys.queue, item.encode())
    return item


def wait_result(redis: fakeredis.FakeRedis, keys: Keys, item: WorkItem) -> Result:
    return Result.decode(wait_for(f"the result of {item.id}", lambda: redis.get(keys.result(item.id))))


def expected(classifier: Classifier, *texts: str) -> list[list[dict]]:
    return [prediction(classifier.labels, p) for p in classifier.forward(classifier.tokenize(list(texts)))]


def test_results_cache_and_acknowledgement(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings, classifier: Classifier
) -> None:
    keys = Keys(settings.key_prefix)
    start_worker(worker)
    item = push(redis, keys, "a good movie", "bad")
    result = wait_result(redis, keys, item)
    assert result.error is None
    for got, want in zip(result.predictions, expected(classifier, "a good movie", "bad"), strict=True):
        assert [s["label"] for s in got] == ["NEGATIVE", "POSITIVE"]
        assert [s["score"] for s in got] == pytest.approx([s["score"] for s in want], abs=1e-5)
    assert orjson.loads(redis.get(keys.cache(classifier.version, "bad"))) == result.predictions[1]
    assert redis.ttl(keys.result(item.id)) <= settings.result_ttl_s
    assert redis.llen(keys.processing(worker.status.id)) == 0  # acknowledged once written


def test_worker_announces_model_and_heartbeat(worker: Worker, redis: fakeredis.FakeRedis, settings: Settings) -> None:
    keys = Keys(settings.key_prefix)
    start_worker(worker)  # returns once the model is announced
    info = ModelInfo.decode(redis.get(keys.model))
    assert (info.version, info.labels) == (worker.classifier.version, ["NEGATIVE", "POSITIVE"])
    assert [s.id for s in live_workers(redis, settings.key_prefix)] == [worker.status.id]


def test_identical_texts_across_requests_are_computed_once(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings
) -> None:
    keys = Keys(settings.key_prefix)
    items = [push(redis, keys, "same text", f"own {i}") for i in range(3)] + [push(redis, keys, "same text")]
    start_worker(worker)
    results = [wait_result(redis, keys, item) for item in items]
    assert len({orjson.dumps(r.predictions[0]) for r in results}) == 1
    assert worker.inference.computed == 4  # "same text" once, plus three own texts
    assert worker.status.largest_batch_requests == 4  # all four queued requests went in one batch


def test_cached_texts_are_not_recomputed(worker: Worker, redis: fakeredis.FakeRedis, settings: Settings) -> None:
    keys = Keys(settings.key_prefix)
    sentinel = prediction(["NEGATIVE", "POSITIVE"], [0.125, 0.875])
    redis.set(keys.cache(worker.classifier.version, "known"), orjson.dumps(sentinel))
    item = push(redis, keys, "known", "unknown")
    start_worker(worker)
    result = wait_result(redis, keys, item)
    assert result.predictions[0] == sentinel
    assert worker.inference.computed == 1


def test_finished_requests_are_announced_on_their_reply_channel(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings
) -> None:
    keys = Keys(settings.key_prefix)
    pubsub = redis.pubsub()
    pubsub.subscribe(keys.reply_channel("api"))
    pubsub.get_message(timeout=1)  # subscription confirmation
    item = push(redis, keys, "hello")
    start_worker(worker)
    message = pubsub.get_message(timeout=10)
    assert message and message["data"].decode() == item.id


def test_stop_deregisters_and_hands_back_held_work(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings
) -> None:
    keys = Keys(settings.key_prefix)
    thread = start_worker(worker)
    wait_result(redis, keys, push(redis, keys, "warm"))
    now = time.time()
    held = WorkItem(new_id(), ["held"], now, now + 30, keys.reply_channel("api"))
    redis.lpush(keys.processing(worker.status.id), held.encode())  # as if taken and not finished
    worker.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert live_workers(redis, settings.key_prefix) == []
    assert not redis.sismember(keys.workers, worker.status.id)
    assert WorkItem.decode(redis.rpop(keys.queue)).id == held.id


def test_a_poison_text_fails_only_its_own_request(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings, classifier: Classifier, monkeypatch
) -> None:
    keys = Keys(settings.key_prefix)
    [poison] = classifier.tokenize(["poison pill"])
    real_forward = classifier.forward

    def forward(batch: list[list[int]]) -> list[list[float]]:
        if poison in batch:
            raise RuntimeError("cannot digest this")
        return real_forward(batch)

    monkeypatch.setattr(classifier, "forward", forward)
    good, bad, other = push(redis, keys, "fine"), push(redis, keys, "ok", "poison pill"), push(redis, keys, "good")
    thread = start_worker(worker)
    assert wait_result(redis, keys, bad).error == "the model failed on this request's texts (RuntimeError)"
    assert wait_result(redis, keys, good).predictions and wait_result(redis, keys, other).predictions
    after = push(redis, keys, "still serving")
    assert wait_result(redis, keys, after).predictions
    assert thread.is_alive()
    assert redis.llen(keys.processing(worker.status.id)) == 0  # the failed request is answered, not stuck


def test_a_malformed_work_item_is_dropped_and_the_worker_carries_on(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings
) -> None:
    keys = Keys(settings.key_prefix)
    redis.lpush(keys.queue, b"not json")
    item = push(redis, keys, "after the junk")
    start_worker(worker)
    assert wait_result(redis, keys, item).predictions
    assert redis.llen(keys.processing(worker.status.id)) == 0


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])
def test_every_item_is_answered_once_in_the_order_of_its_texts(
    redis: fakeredis.FakeRedis, settings: Settings, classifier: Classifier, overlap: bool
) -> None:
    # Small batches and a read-ahead window: items are split, regrouped by length, and computed
    # while the next batch is being formed.
    settings = settings.model_copy(update={"max_batch_size": 3, "batch_window": 7, "overlap": overlap})
    keys = Keys(settings.key_prefix)
    pubsub = redis.pubsub()
    pubsub.subscribe(keys.reply_channel("api"))
    pubsub.get_message(timeout=1)
    texts = [[("very " * (j * 3 % 7)) + f"good movie {i} {j}" for j in range(i % 4 + 1)] for i in range(12)]
    items = [push(redis, keys, *t) for t in texts]
    worker = Worker(settings, redis, classifier)
    thread = start_worker(worker)
    try:
        for item, item_texts in zip(items, texts, strict=True):
            result = wait_result(redis, keys, item)
            want = expected(classifier, *item_texts)
            assert [[s["score"] for s in p] for p in result.predictions] == [
                pytest.approx([s["score"] for s in w], abs=1e-5) for w in want
            ]
        announced = []
        while message := pubsub.get_message(timeout=0.5):
            announced.append(message["data"].decode())
        assert sorted(announced) == sorted(item.id for item in items)  # each exactly once
        assert worker.status.batches >= 10  # 30 texts in batches of at most 3: items were split
        assert redis.llen(keys.processing(worker.status.id)) == 0
    finally:
        worker.stop()
        thread.join(10)


def test_the_next_batch_is_taken_late_in_the_running_forward(
    redis: fakeredis.FakeRedis, settings: Settings, classifier: Classifier, monkeypatch
) -> None:
    # A slow model and batches of 2. While [a, b] computes, c is queued at once and d 0.1 s into
    # the forward: taken late in the forward, c waits for d and both go in one batch.
    settings = settings.model_copy(update={"max_batch_size": 2, "batch_window": 2, "overlap": True})
    keys = Keys(settings.key_prefix)
    real_forward = classifier.forward
    forwarding = threading.Event()

    def slow_forward(batch: list[list[int]]) -> list[list[float]]:
        forwarding.set()
        time.sleep(0.5)
        return real_forward(batch)

    monkeypatch.setattr(classifier, "forward", slow_forward)
    worker = Worker(settings, redis, classifier)
    thread = start_worker(worker)
    try:
        wait_result(redis, keys, push(redis, keys, "warm up"))  # the worker learns how long a forward takes
        forwarding.clear()
        now = time.time()
        a, b, c = (WorkItem(new_id(), [f"text {n}"], now, now + 30, keys.reply_channel("api")) for n in "abc")
        redis.lpush(keys.queue, *(item.encode() for item in (a, b, c)))  # at once, so [a, b] is one batch
        assert forwarding.wait(5)
        time.sleep(0.1)
        d = push(redis, keys, "text d")
        for item in (a, b, c, d):
            assert wait_result(redis, keys, item).predictions
        assert worker.status.batches == 3  # warm up, [a, b], [c, d]; taken at once it would be [c] then [d]
    finally:
        worker.stop()
        thread.join(10)
