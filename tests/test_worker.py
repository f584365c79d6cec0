"""The worker on fakeredis with the tiny model: results, cache, dedupe, notifications, heartbeats,
Redis errors, shutdown."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import fakeredis
import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY
from redis.client import PubSub
from redis.exceptions import ReadOnlyError
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from batcher.queue import WorkQueue
from batcher.thread_failure import ThreadFailed
from batcher.worker import Worker
from benchmarks.checkpoints import write_tiny_model
from core.liveness import live_workers
from core.protocol import Keys, ModelInfo, Result, WorkItem, new_id, parse_replies, prediction
from core.settings import Settings
from model_store.classifier import Classifier
from model_store.long_texts import Tokenized
from tests.conftest import HANG_GUARD_S, SCORE_ABS, hold_forwards, start_worker, wait_for


def push(redis: fakeredis.FakeRedis, keys: Keys, *texts: str) -> WorkItem:
    now = time.time()
    item = WorkItem(new_id(), list(texts), now, now + 30, keys.reply_channel("api"))
    redis.lpush(keys.queue, item.encode())
    return item


def wait_result(redis: fakeredis.FakeRedis, keys: Keys, item: WorkItem) -> Result:
    return Result.decode(wait_for(f"the result of {item.id}", lambda: redis.get(keys.result(item.id))))


def worker_holding(
    redis: fakeredis.FakeRedis,
    settings: Settings,
    classifier: Classifier,
    monkeypatch: pytest.MonkeyPatch,
    item: WorkItem,
    onto: str,
) -> tuple[Worker, threading.Event, threading.Event]:
    """A worker, not started, whose forwards each wait for `release` (`hold_forwards`), with `item` queued
    for it on the list `onto`: (worker, forwarding, release)."""
    forwarding, release = hold_forwards(monkeypatch, classifier)
    redis.lpush(onto, item.encode())
    return Worker(settings, redis, classifier), forwarding, release


@contextlib.contextmanager
def running_until_released(worker: Worker, release: threading.Event) -> Iterator[None]:
    """`worker` running in a thread; at the end its held forwards released (`hold_forwards`), then stopped."""
    thread = start_worker(worker)
    try:
        yield
    finally:
        release.set()
        worker.stop()
        thread.join(10)


def reclaimed_once_its_heartbeat_lapses(redis: fakeredis.FakeRedis, keys: Keys, worker: Worker, item: WorkItem) -> None:
    """`worker`, stuck, stops beating; another worker then requeues `item`, which it held."""
    wait_for("the stuck worker's heartbeat to lapse", lambda: not live_workers(redis, keys.prefix))
    assert WorkQueue(redis, keys, "another worker").reclaim_dead() == 1
    assert WorkItem.decode(redis.rpop(keys.queue)).id == item.id


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
        assert [s["score"] for s in got] == pytest.approx([s["score"] for s in want], abs=SCORE_ABS)
    assert orjson.loads(redis.get(keys.cache(classifier.version, "bad"))) == result.predictions[1]
    assert redis.llen(keys.processing(worker.id)) == 0  # acknowledged once written
    # A result key lives a second past its request's deadline at most (nobody waits longer), and
    # never more than result_ttl_s.
    assert 0 < redis.ttl(keys.result(item.id)) <= round(item.deadline - item.enqueued_at) + 1 < settings.result_ttl_s
    now = time.time()
    patient = WorkItem(new_id(), ["a far deadline"], now, now + 10 * settings.result_ttl_s, keys.reply_channel("api"))
    redis.lpush(keys.queue, patient.encode())
    wait_result(redis, keys, patient)
    assert 0 < redis.ttl(keys.result(patient.id)) <= settings.result_ttl_s


def test_worker_announces_model_and_heartbeat(worker: Worker, redis: fakeredis.FakeRedis, settings: Settings) -> None:
    keys = Keys(settings.key_prefix)
    start_worker(worker)  # returns once the model is announced
    info = ModelInfo.decode(redis.get(keys.model))
    assert (info.version, info.labels) == (worker.classifier.version, ["NEGATIVE", "POSITIVE"])
    assert [s.id for s in live_workers(redis, settings.key_prefix)] == [worker.id]


def test_the_announced_model_is_one_a_live_worker_serves_through_a_rolled_back_upgrade(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings, tmp_path: Path
) -> None:
    # A rolling upgrade: a worker of a new checkpoint starts beside the old model's and announces its
    # model; the old one's beats leave it announced. The upgrade rolled back (the new worker gone, the
    # old serving on), a beat announces the old model again: the API would otherwise name, and look
    # up the cache of, a model nobody serves. A Redis that lost the announcement has it again too.
    keys = Keys(settings.key_prefix)
    start_worker(worker)
    upgrade = Worker(settings, redis, Classifier(write_tiny_model(tmp_path, seed=1), device="cpu", threads=1))
    thread = start_worker(upgrade)

    def announced() -> str:
        return ModelInfo.decode(redis.get(keys.model)).version

    assert announced() == upgrade.classifier.version != worker.classifier.version
    worker.heartbeat.beat()
    assert announced() == upgrade.classifier.version
    upgrade.stop()
    thread.join(HANG_GUARD_S)
    worker.heartbeat.beat()
    assert announced() == worker.classifier.version
    redis.delete(keys.model)
    worker.heartbeat.beat()
    assert announced() == worker.classifier.version


def test_the_heartbeat_publishes_the_measured_throughput_once_a_forward_was_timed(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings
) -> None:
    # What the API's admission predicts by: nothing before a forward (a cold start admits), then the
    # throughput of full forwards and a full forward's time, from the forwards timed so far.
    keys = Keys(settings.key_prefix)
    start_worker(worker)
    [cold] = live_workers(redis, settings.key_prefix)
    assert (cold.texts_per_s, cold.forward_s, cold.texts_ahead) == (None, None, 0)
    wait_result(redis, keys, push(redis, keys, "a timed forward", "of two texts"))
    worker.heartbeat.beat()
    [timed] = live_workers(redis, settings.key_prefix)
    assert timed.texts_per_s is not None and timed.forward_s is not None
    assert timed.texts_per_s == pytest.approx(worker.classifier.lanes * settings.max_batch_size / timed.forward_s)


def test_identical_texts_across_requests_are_computed_once(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings
) -> None:
    # Queued in one LPUSH while the worker waits on an empty queue: one take holds all four items, so
    # "same text" is one held text with four waiters (queued beforehand, the takes' doubling count
    # could leave the last item to a later take, and its text to a second forward).
    keys = Keys(settings.key_prefix)
    start_worker(worker)
    now = time.time()
    items = [WorkItem(new_id(), ["same text", f"own {i}"], now, now + 30, keys.reply_channel("api")) for i in range(3)]
    items.append(WorkItem(new_id(), ["same text"], now, now + 30, keys.reply_channel("api")))
    redis.lpush(keys.queue, *(item.encode() for item in items))
    results = [wait_result(redis, keys, item) for item in items]
    assert len({orjson.dumps(r.predictions[0]) for r in results}) == 1
    assert worker.lanes.computed == 4  # "same text" once, plus three own texts
    assert worker.status.largest_batch_requests == 4  # all four queued requests went in one forward


def test_cached_texts_are_not_recomputed(worker: Worker, redis: fakeredis.FakeRedis, settings: Settings) -> None:
    keys = Keys(settings.key_prefix)
    sentinel = prediction(["NEGATIVE", "POSITIVE"], [0.125, 0.875])
    redis.set(keys.cache(worker.classifier.version, "known"), orjson.dumps(sentinel))
    item = push(redis, keys, "known", "unknown")
    start_worker(worker)
    result = wait_result(redis, keys, item)
    assert result.predictions[0] == sentinel
    assert worker.lanes.computed == 1


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
    assert message and message["type"] == "message"
    [(request_id, result)] = parse_replies(message["data"])
    # The reply carries the result, byte for byte the result key's, so the API need not fetch it.
    assert request_id == item.id and result == redis.get(keys.result(item.id))
    assert Result.decode(result).predictions == wait_result(redis, keys, item).predictions


def test_stop_deregisters_and_hands_back_held_work(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings
) -> None:
    keys = Keys(settings.key_prefix)
    thread = start_worker(worker)
    wait_result(redis, keys, push(redis, keys, "warm"))
    now = time.time()
    held = WorkItem(new_id(), ["held"], now, now + 30, keys.reply_channel("api"))
    redis.lpush(keys.processing(worker.id), held.encode())  # as if taken and not finished
    worker.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert live_workers(redis, settings.key_prefix) == []
    assert not redis.sismember(keys.workers, worker.id)
    assert WorkItem.decode(redis.rpop(keys.queue)).id == held.id


def announcements(pubsub: PubSub) -> list[str]:
    """The request ids published so far on the subscribed reply channel."""
    ids = []
    while message := pubsub.get_message(timeout=0.5):
        ids += [request_id for request_id, _ in parse_replies(message["data"])]
    return ids


def test_a_forward_longer_than_the_heartbeat_ttl_keeps_its_work(
    redis: fakeredis.FakeRedis, settings: Settings, classifier: Classifier, monkeypatch
) -> None:
    # The forward outlasts the heartbeat TTL twice over (a full batch on a small CPU). Another
    # worker's reclaim, run late in it, must see a live worker: nothing requeued, computed or
    # answered twice.
    settings = settings.model_copy(update={"heartbeat_ttl_s": 1.0})
    keys = Keys(settings.key_prefix)
    other = WorkQueue(redis, keys, "another worker")
    reclaimed: list[int] = []
    real_forward = classifier.engine.forward

    def slow_forward(batch: list[list[int]], packed: bool = False) -> np.ndarray:
        time.sleep(2 * settings.heartbeat_ttl_s)
        reclaimed.append(other.reclaim_dead())
        return real_forward(batch, packed)

    monkeypatch.setattr(classifier.engine, "forward", slow_forward)
    pubsub = redis.pubsub()
    pubsub.subscribe(keys.reply_channel("api"))
    pubsub.get_message(timeout=1)
    item = push(redis, keys, "a long forward")
    worker = Worker(settings, redis, classifier)
    thread = start_worker(worker)
    try:
        assert wait_result(redis, keys, item).predictions
        assert reclaimed == [0]
        assert announcements(pubsub) == [item.id]
        assert worker.lanes.computed == 1
        assert (redis.llen(keys.queue), redis.llen(keys.processing(worker.id))) == (0, 0)
    finally:
        worker.stop()
        thread.join(10)


@pytest.mark.parametrize("deadline_s", [5, 1e300], ids=["its deadline", "a deadline far off (garbage)"])
def test_a_forward_past_its_deadlines_stops_beating_so_a_hung_worker_is_reclaimed(
    redis: fakeredis.FakeRedis, settings: Settings, classifier: Classifier, monkeypatch, deadline_s: float
) -> None:
    # A forward that never returns must not keep the worker "alive" forever: once its requests'
    # deadlines pass, nobody waits for it, its heartbeat lapses and its work is reclaimed. Nobody waits
    # past the request timeout either, whatever a work item's deadline says: one far off hid a hung lane.
    settings = settings.model_copy(update={"heartbeat_ttl_s": 1.0, "request_timeout_s": 5})
    keys = Keys(settings.key_prefix)
    now = time.time()
    item = WorkItem(new_id(), ["stuck"], now, now + deadline_s, keys.reply_channel("api"))
    worker, forwarding, release = worker_holding(redis, settings, classifier, monkeypatch, item, keys.queue)
    with running_until_released(worker, release):
        wait_for("the forward to start", forwarding.is_set)
        reclaimed_once_its_heartbeat_lapses(redis, keys, worker, item)


def test_a_worker_back_from_a_hang_is_registered_again_before_it_takes_work(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings, monkeypatch
) -> None:
    # Hung, its heartbeat lapsed and another worker deregistered it. Back, it took work before its
    # heartbeat thread's next beat: into the processing list of a worker no death watch looks at, lost
    # if it died then (found by tests/test_reclaim_states.py).
    keys = Keys(settings.key_prefix)
    hung, seen_hung = threading.Event(), threading.Event()
    registered_at_take: list[bool] = []
    real_hold = worker.intake.hold

    def healthy() -> bool:  # (a hung lane, a stuck reply stage: `Worker._healthy`)
        if hung.is_set():
            seen_hung.set()
        return not hung.is_set()

    def hold(raws: list[bytes], bulk: bool = False) -> None:
        registered_at_take.append(bool(redis.sismember(keys.workers, worker.id)))
        real_hold(raws, bulk)

    thread = start_worker(worker)
    monkeypatch.setattr(worker, "_healthy", healthy)
    monkeypatch.setattr(worker.heartbeat, "beat", lambda: None)  # its thread's next beat comes later
    monkeypatch.setattr(worker.intake, "hold", hold)
    try:
        hung.set()
        wait_for("the worker to see itself hung", seen_hung.is_set)
        redis.set(keys.heartbeat(worker.id), dataclasses.replace(worker.status, lapses_at=1.0).encode())  # lapsed
        assert WorkQueue(redis, keys, "another worker").reclaim_dead() == 0
        assert not redis.sismember(keys.workers, worker.id)
        hung.clear()
        item = push(redis, keys, "taken once back")
        assert wait_result(redis, keys, item).error is None
        assert registered_at_take == [True]
    finally:
        worker.stop()
        thread.join(10)


def test_a_bulk_forward_past_its_items_deadlines_is_work_not_a_hung_lane(
    redis: fakeredis.FakeRedis, settings: Settings, classifier: Classifier, monkeypatch
) -> None:
    # Bulk work is never late: its forward may run past its items' deadlines (held behind interactive
    # work). That is no hang: the worker keeps beating and taking; a hung lane is one past every deadline
    # and longer than the heartbeat TTL.
    keys = Keys(settings.key_prefix)
    now = time.time()
    chunk = WorkItem(new_id(), ["a job's text"], now, now + 0.5, keys.reply_channel("jobs"))
    worker, forwarding, release = worker_holding(redis, settings, classifier, monkeypatch, chunk, keys.bulk)
    with running_until_released(worker, release):
        wait_for("the bulk forward to start", forwarding.is_set)
        wait_for("the chunk's deadline to pass", lambda: time.time() > chunk.deadline)
        assert worker.heartbeat.writes()  # it still beats
        item = push(redis, keys, "asked meanwhile")
        wait_for("the interactive item to be held", lambda: len(worker.window) == 1)
        release.set()
        assert wait_result(redis, keys, item).error is None and wait_result(redis, keys, chunk).error is None


def test_an_error_reply_from_redis_is_survived_like_an_outage(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings, monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A replica turned read-only (or a revoked ACL) refuses the transaction that writes a batch's
    # results. redis-py quotes the refused command, work item and its text included. The worker keeps
    # the item, backs off, and answers it once Redis takes writes again: once, from the same worker
    # thread, without logging the text. (A full Redis is `test_redis_full.py`'s.)
    keys = Keys(settings.key_prefix)
    text = "private words"
    refusals = [ReadOnlyError(f"Command # 5 (LREM processing 1 {text}) of pipeline caused error: READONLY")]
    real_transaction = worker.replies.link.transaction

    def transaction(*commands: tuple) -> list:
        if refusals and any(command[0] == "PUBLISH" for command in commands):
            raise refusals.pop()  # EXECABORT: nothing in the transaction was applied
        return real_transaction(*commands)

    monkeypatch.setattr(worker.replies.link, "transaction", transaction)
    caplog.set_level(logging.INFO)
    pubsub = redis.pubsub()
    pubsub.subscribe(keys.reply_channel("api"))
    pubsub.get_message(timeout=1)
    thread = start_worker(worker)
    item = push(redis, keys, text)
    wait_for("the answer, or the worker's death", lambda: redis.exists(keys.result(item.id)) or not thread.is_alive())
    assert thread.is_alive()
    assert refusals == []  # the write was refused once, then retried
    assert wait_result(redis, keys, item).predictions
    assert announcements(pubsub) == [item.id]
    assert redis.llen(keys.processing(worker.id)) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("redis failed (ReadOnlyError)" in m for m in warnings), warnings
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and text in r.getMessage()]


def test_a_bulk_list_redis_refuses_leaves_interactive_work_going(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # Something else wrote the bulk list's key (WRONGTYPE), or an ACL leaves it out (NOPERM): every take
    # failed at its look for bulk work and backed off, and once one had found the queue empty, the next
    # looked for bulk work alone: no interactive request was ever taken again.
    keys = Keys(settings.key_prefix)
    redis.set(keys.bulk, "not a list")
    caplog.set_level(logging.INFO)
    thread = start_worker(worker)
    for i in range(3):
        assert wait_result(redis, keys, push(redis, keys, f"asked while the bulk list is garbage {i}")).predictions
    redis.delete(keys.bulk)
    now = time.time()
    chunk = WorkItem(new_id(), ["a job's text"], now, now + 30, keys.reply_channel("jobs"))
    redis.lpush(keys.bulk, chunk.encode())
    assert wait_result(redis, keys, chunk).predictions
    assert thread.is_alive()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == [
        "redis refuses the bulk list (ResponseError: WRONGTYPE Operation against a key holding the wrong kind of value): bulk work waits, interactive work goes on"
    ]


def crash(*args: object, **kwargs: object) -> NoReturn:
    raise RuntimeError("a bug")


@pytest.mark.parametrize("thread", ["take", "forward-0", "reply", "heartbeat"])
def test_a_bug_in_any_thread_stops_the_worker_which_hands_back_its_work_and_says_which(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings, monkeypatch, thread: str
) -> None:
    # Not a Redis error, not a text the model rejects (a bug): the worker stops, hands back what it
    # took and deregisters at once (not a heartbeat TTL later), and `run` raises naming the thread:
    # no thread dies while the others keep the worker looking alive.
    keys = Keys(settings.key_prefix)
    where = {
        "take": (worker.window, "add"),
        "forward-0": (worker.lanes, "_count"),
        "reply": (worker.replies, "_write"),
        "heartbeat": (worker.queue, "reclaim_dead"),
    }
    if thread == "heartbeat":  # its first look comes half a second in: keep the item held until then
        forwarding, release = hold_forwards(monkeypatch, worker.classifier)
        monkeypatch.setattr(worker.queue, "reclaim_dead", lambda: crash() if forwarding.is_set() else 0)
        threading.Thread(target=lambda: (worker.failure.failed.wait(HANG_GUARD_S), release.set()), daemon=True).start()
    else:
        monkeypatch.setattr(*where[thread], crash)
    item = push(redis, keys, "taken, then the worker crashes")
    before = set(threading.enumerate())
    with pytest.raises(ThreadFailed, match=f"the {thread} thread failed \\(RuntimeError: a bug\\)"):
        worker.run()
    assert redis.llen(keys.processing(worker.id)) == 0
    requeued = [WorkItem.decode(raw).id for raw in redis.lrange(keys.queue, 0, -1)]
    if thread == "heartbeat":  # the forward under way finished: answered, or else handed back
        assert requeued == [item.id] or (requeued == [] and redis.exists(keys.result(item.id)))
    else:
        assert requeued == [item.id]
    assert not redis.sismember(keys.workers, worker.id)
    assert live_workers(redis, settings.key_prefix) == []
    assert not [t.name for t in set(threading.enumerate()) - before if t.name in ("reply", "heartbeat", "forward-0")]


class UnreadableError(Exception):
    """An exception whose message cannot be read (as one that quotes a tensor of a broken device)."""

    def __str__(self) -> str:
        raise ValueError("no message")


class NoThreadTimer(threading.Timer):
    """A timer whose thread cannot start: the process is out of threads or memory."""

    def start(self) -> None:
        raise RuntimeError("can't start new thread")


@pytest.mark.parametrize("how", ["a message that cannot be read", "no thread left for the stop's bound"])
def test_a_thread_that_dies_stops_the_worker_even_where_its_failure_cannot_be_described_or_bounded(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings, monkeypatch, how: str
) -> None:
    # The failure's own handling failing (the message's `str`, the timer's thread) left the reply thread
    # dead and the worker beating: a live-looking worker whose taken work waited forever.
    def dies(*args: object) -> NoReturn:
        raise UnreadableError() if how == "a message that cannot be read" else MemoryError()

    monkeypatch.setattr(worker.replies, "_write", dies)
    if how == "no thread left for the stop's bound":
        monkeypatch.setattr(threading, "Timer", NoThreadTimer)
    keys = Keys(settings.key_prefix)
    item = push(redis, keys, "taken, then the reply thread dies")
    failed: list[BaseException] = []
    thread = threading.Thread(target=_run_catching, args=(worker, failed), daemon=True)
    thread.start()
    wait_for("the reply thread to start and die", lambda: (t := worker.replies.thread) and t.ident and not t.is_alive())
    assert worker.failure.failed.is_set(), "the worker goes on with its reply thread dead"
    thread.join(HANG_GUARD_S)
    assert [type(exc) for exc in failed] == [ThreadFailed]
    assert "the reply thread failed" in str(failed[0])
    assert [WorkItem.decode(raw).id for raw in redis.lrange(keys.queue, 0, -1)] == [item.id]
    assert not redis.exists(keys.heartbeat(worker.id))


def _run_catching(worker: Worker, failed: list[BaseException]) -> None:
    try:
        worker.run()
    except BaseException as exc:
        failed.append(exc)


def rust_panic() -> NoReturn:
    """A panic in a native library, as pyo3 raises it: `PanicException`, a BaseException (here tokenizers'
    truncation, asserting that its stride is shorter than what the special tokens leave of the length)."""
    tokenizer = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "[CLS]": 2, "[SEP]": 3}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    special = [("[CLS]", 2), ("[SEP]", 3)]
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=special)
    tokenizer.enable_truncation(4, stride=2)
    tokenizer.encode("a a a a a a")
    raise AssertionError("tokenizers no longer panics here: find another panic")


def cannot_spell() -> NoReturn:
    raise RuntimeError("cannot spell this")


@pytest.mark.parametrize("failure", [cannot_spell, rust_panic], ids=["an exception", "a Rust panic"])
def test_a_text_the_tokenizer_cannot_take_fails_only_its_own_request(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings, classifier: Classifier, monkeypatch, failure
) -> None:
    # A Rust panic (tokenizers on some inputs) is a BaseException: it stopped the worker, which handed the
    # item back for the next worker to stop on, one after the other.
    keys = Keys(settings.key_prefix)
    real_split = worker.intake.split

    def split(texts: list[str]) -> list[Tokenized]:
        if "unspeakable" in texts:
            failure()
        return real_split(texts)

    monkeypatch.setattr(worker.intake, "split", split)
    good, bad = push(redis, keys, "fine"), push(redis, keys, "ok", "unspeakable")
    thread = start_worker(worker)
    error = {cannot_spell: "RuntimeError", rust_panic: "PanicException"}[failure]
    assert wait_result(redis, keys, bad).error == f"the tokenizer failed on this request's texts ({error})"
    assert wait_result(redis, keys, good).predictions == expected(classifier, "fine")
    assert wait_result(redis, keys, push(redis, keys, "still serving")).predictions
    assert thread.is_alive()
    assert redis.llen(keys.processing(worker.id)) == 0


def test_an_engine_answering_the_wrong_shape_fails_the_requests_not_the_worker(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings, classifier: Classifier, monkeypatch
) -> None:
    # A rows-for-texts mismatch would otherwise surface in the reply stage, far from its cause.
    keys = Keys(settings.key_prefix)
    real_forward = classifier.engine.forward
    [odd] = classifier.tokenize(["three labels please"])

    def forward(batch: list[list[int]], packed: bool = False) -> np.ndarray:
        return np.full((len(batch), 3), 1 / 3) if odd in batch else real_forward(batch, packed)

    monkeypatch.setattr(classifier.engine, "forward", forward)
    bad, good = push(redis, keys, "three labels please"), push(redis, keys, "two labels")
    thread = start_worker(worker)
    assert wait_result(redis, keys, bad).error == "the model failed on this request's texts (ValueError)"
    assert wait_result(redis, keys, good).predictions == expected(classifier, "two labels")
    assert thread.is_alive()
    assert redis.llen(keys.processing(worker.id)) == 0


def test_a_stuck_reply_stage_stops_the_heartbeat_so_another_worker_reclaims_the_work(
    redis: fakeredis.FakeRedis, settings: Settings, classifier: Classifier, monkeypatch
) -> None:
    # Its lanes compute and its heartbeat thread runs, but results are never written: the worker
    # must stop saying it is alive, or its requests wait out their deadlines.
    settings = settings.model_copy(update={"heartbeat_ttl_s": 1.0})
    keys = Keys(settings.key_prefix)
    worker = Worker(settings, redis, classifier)
    writing, release = threading.Event(), threading.Event()
    real_write = worker.replies._write

    def stuck_write(outcomes: list) -> None:
        writing.set()
        release.wait(HANG_GUARD_S)
        real_write(outcomes)

    monkeypatch.setattr(worker.replies, "_write", stuck_write)
    thread = start_worker(worker)
    item = push(redis, keys, "computed, never written")
    try:
        wait_for("the reply stage to be stuck", writing.is_set)
        reclaimed_once_its_heartbeat_lapses(redis, keys, worker, item)
    finally:
        release.set()
        worker.stop()
        thread.join(10)


def cannot_digest() -> NoReturn:
    raise RuntimeError("cannot digest this")


@pytest.mark.parametrize("failure", [cannot_digest, rust_panic], ids=["an exception", "a Rust panic"])
def test_a_poison_text_fails_only_its_own_request(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings, classifier: Classifier, monkeypatch, failure
) -> None:
    keys = Keys(settings.key_prefix)
    [poison] = classifier.tokenize(["poison pill"])
    real_forward = classifier.engine.forward

    def forward(batch: list[list[int]], packed: bool = False) -> np.ndarray:
        if poison in batch:
            failure()
        return real_forward(batch, packed)

    monkeypatch.setattr(classifier.engine, "forward", forward)
    good, bad, other = push(redis, keys, "fine"), push(redis, keys, "ok", "poison pill"), push(redis, keys, "good")
    thread = start_worker(worker)
    error = {cannot_digest: "RuntimeError", rust_panic: "PanicException"}[failure]
    assert wait_result(redis, keys, bad).error == f"the model failed on this request's texts ({error})"
    assert wait_result(redis, keys, good).predictions and wait_result(redis, keys, other).predictions
    after = push(redis, keys, "still serving")
    assert wait_result(redis, keys, after).predictions
    assert thread.is_alive()
    assert redis.llen(keys.processing(worker.id)) == 0  # the failed request is answered, not stuck


def test_an_engine_that_fails_every_text_stops_the_worker_which_hands_back_its_work(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings, classifier: Classifier, monkeypatch
) -> None:
    # A CUDA error (an illegal memory access, a device-side assert) fails every forward after it in that
    # process. Read as poison, it failed every request with a 424 while the worker beat on and looked
    # ready; a broken engine is not its requests' fault: the worker stops, and another computes them.
    keys = Keys(settings.key_prefix)

    def broken(batch: list[list[int]], packed: bool = False) -> NoReturn:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(classifier.engine, "forward", broken)
    item = push(redis, keys, "a fine text", "another")
    failed: list[BaseException] = []
    thread = threading.Thread(target=_run_catching, args=(worker, failed), daemon=True)
    thread.start()
    wait_for("an answer, or the worker's stop", lambda: redis.exists(keys.result(item.id)) or not thread.is_alive())
    assert not redis.exists(keys.result(item.id)), Result.decode(redis.get(keys.result(item.id)))
    assert [type(exc) for exc in failed] == [ThreadFailed]
    assert "the forward-0 thread failed (EngineFailed: " in str(failed[0])
    assert [WorkItem.decode(raw).id for raw in redis.lrange(keys.queue, 0, -1)] == [item.id]


def test_a_malformed_work_item_is_dropped_and_the_worker_carries_on(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings
) -> None:
    keys = Keys(settings.key_prefix)
    redis.lpush(keys.queue, b"not json")
    item = push(redis, keys, "after the junk")
    start_worker(worker)
    assert wait_result(redis, keys, item).predictions
    assert redis.llen(keys.processing(worker.id)) == 0


@pytest.fixture(scope="module")
def two_lanes(tiny_model_dir: Path) -> Classifier:
    """Two forward lanes of one thread each: two forwards run side by side."""
    return Classifier(tiny_model_dir, device="cpu", threads=2, precision="fp32", engine="torch")


@pytest.mark.parametrize("lanes", [False, True], ids=["one lane", "two lanes"])
def test_every_item_is_answered_once_in_the_order_of_its_texts(
    redis: fakeredis.FakeRedis,
    settings: Settings,
    classifier: Classifier,
    lanes: bool,
    request: pytest.FixtureRequest,
) -> None:
    # Small forwards and a read-ahead window: items are split, regrouped by length, and computed
    # while the next forward is being chosen (with lanes, beside another forward).
    if lanes:
        classifier = request.getfixturevalue("two_lanes")
        assert classifier.lanes == 2
    settings = settings.model_copy(update={"max_batch_size": 3, "batch_window": 7})
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
                pytest.approx([s["score"] for s in w], abs=SCORE_ABS) for w in want
            ]
        assert sorted(announcements(pubsub)) == sorted(item.id for item in items)  # each exactly once
        assert worker.status.batches >= 10  # 30 texts in forwards of at most 3: items were split
        assert redis.llen(keys.processing(worker.id)) == 0
    finally:
        worker.stop()
        thread.join(10)


def test_the_next_forward_is_chosen_when_a_lane_is_free(
    redis: fakeredis.FakeRedis, settings: Settings, classifier: Classifier, monkeypatch
) -> None:
    # Forwards of 2, the first held until c and d are both held by the intake. While [a, b] computes,
    # c is queued at once and d once it started: the lane chooses its next forward only when it is
    # free, so c and d go together.
    settings = settings.model_copy(update={"max_batch_size": 2, "batch_window": 8})
    keys = Keys(settings.key_prefix)
    forwarding, release = hold_forwards(monkeypatch, classifier)
    worker = Worker(settings, redis, classifier)
    thread = start_worker(worker)
    try:
        now = time.time()
        a, b, c = (WorkItem(new_id(), [f"text {n}"], now, now + 30, keys.reply_channel("api")) for n in "abc")
        redis.lpush(keys.queue, *(item.encode() for item in (a, b, c)))  # at once, so [a, b] is one forward
        assert forwarding.wait(HANG_GUARD_S)
        d = push(redis, keys, "text d")
        wait_for("c and d held for the next forward", lambda: len(worker.window) == 2)
        release.set()
        for item in (a, b, c, d):
            assert wait_result(redis, keys, item).predictions
        assert worker.status.batches == 2  # [a, b], [c, d]; chosen at once it would be [c] then [d]
    finally:
        worker.stop()
        thread.join(10)


def test_a_worker_names_its_few_threads(worker: Worker) -> None:
    # The threads of docs/architecture.md: take on the caller's, a forward lane per engine lane, reply, heartbeat.
    # (threads, not names: another test's worker may still be ending, its threads named the same)
    before = set(threading.enumerate())
    thread = start_worker(worker)
    try:
        mine = set(threading.enumerate()) - before - {thread}
        assert {t.name for t in mine} == {"forward-0", "reply", "heartbeat"}
    finally:
        worker.stop()
        thread.join(10)
    assert not [t.name for t in mine if t.is_alive()]


def test_an_interactive_request_during_a_bulk_stream_rides_the_next_forward_with_bulk_in_its_spare_room(
    redis: fakeredis.FakeRedis, classifier: Classifier, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bulk work (a /jobs stream) waits for room: interactive work taken while a bulk forward runs goes
    in the next forward, and bulk texts fill the room that forward's caps leave. Its texts are counted
    apart (`sentiment_bulk_texts_total`), so what was computed for interactive work is known."""
    settings = Settings(  # (no bound on what bulk adds to a forward: the held forward times it as slow)
        key_prefix="two-classes", model_dir=tiny_model_dir, max_batch_size=4, max_wait_ms=0, bulk_delay_ms=1e9
    )
    keys = Keys(settings.key_prefix)
    forwards: list[list[list[int]]] = []  # each forward's token ids, as it starts
    permits = threading.Semaphore(0)  # each lets one forward finish
    real_forward = classifier.engine.forward

    def held(batch: list[list[int]], packed: bool = False) -> np.ndarray:
        forwards.append(batch)
        assert permits.acquire(timeout=HANG_GUARD_S)
        return real_forward(batch, packed)

    monkeypatch.setattr(classifier.engine, "forward", held)
    now = time.time()
    bulk = [
        WorkItem(new_id(), [f"bulk {i}", f"bulk {i} b", f"bulk {i} c", f"bulk {i} d"], now, now + 30, "jobs")
        for i in range(10)
    ]
    redis.lpush(keys.bulk, *(item.encode() for item in bulk))
    bulk_texts = REGISTRY.get_sample_value("sentiment_bulk_texts_total") or 0.0
    worker = Worker(settings, redis, classifier)
    try:
        start_worker(worker)
        wait_for("a bulk forward to start", lambda: forwards)
        question = "an interactive question asked meanwhile"
        item = push(redis, keys, question)
        wait_for("the interactive item to be held", lambda: len(worker.window) == 1)
        assert len(forwards) == 1  # the lane is still in its bulk forward
        permits.release()  # the bulk forward ends
        wait_for("the next forward", lambda: len(forwards) == 2)
        [ids] = classifier.tokenize([question])
        assert forwards[1][0] == ids  # the interactive text, first in the very next forward
        assert len(forwards[1]) == settings.max_batch_size  # the rest of its room: bulk texts
        permits.release(len(bulk) * 4)
        assert wait_result(redis, keys, item).error is None
        for work in bulk:  # the bulk stream is answered too, and acknowledged from its own list
            assert wait_result(redis, keys, work).error is None
        wait_for("the bulk items acknowledged", lambda: redis.llen(keys.bulk_processing(worker.id)) == 0)
        assert REGISTRY.get_sample_value("sentiment_bulk_texts_total") == bulk_texts + 4 * len(bulk)  # not the question
    finally:
        permits.release(100)
        worker.stop()


def test_a_worker_answers_around_an_item_queued_far_ahead_of_its_clock(
    settings: Settings, redis: fakeredis.FakeRedis, classifier: Classifier
) -> None:
    """End to end: the odd item and the one taken with it (texts of one length: one forward, which
    waits for company; the odd one first by its deadline) are answered, and the worker keeps serving."""
    worker = Worker(settings.model_copy(update={"max_wait_ms": 1000}), redis, classifier)
    keys = Keys(settings.key_prefix)
    now = time.time()
    items = [
        WorkItem(new_id(), ["ahead"], now + 1e10, now + 20, keys.reply_channel("api")),
        WorkItem(new_id(), ["today"], now, now + 30, keys.reply_channel("api")),
    ]
    for item in items:
        redis.lpush(keys.queue, item.encode())
    thread = start_worker(worker)
    try:
        for item in items:

            def answered(item: WorkItem = item) -> bytes | str:
                assert thread.is_alive(), worker.failure.cause  # (a dead worker answers nothing more)
                return redis.get(keys.result(item.id)) or b""

            result = Result.decode(wait_for(f"the result of {item.id}", answered))
            assert result.predictions is not None and len(result.predictions) == 1
    finally:
        worker.stop()
        thread.join(HANG_GUARD_S)


def test_logits_that_are_not_numbers_fail_their_requests_and_are_never_cached(
    worker: Worker, redis: fakeredis.FakeRedis, classifier: Classifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN or an infinity out of the model (an fp16 overflow, a broken artifact) has no score: JSON
    writes it as null, which would answer its request wrongly and be served from the cache for a day."""
    keys = Keys(worker.settings.key_prefix)
    real_forward = classifier.engine.forward
    [odd] = classifier.tokenize(["not a number"])

    def forward(batch: list[list[int]], packed: bool = False) -> np.ndarray:
        logits = real_forward(batch, packed)
        logits[[ids == odd for ids in batch]] = [np.nan, np.inf]
        return logits

    monkeypatch.setattr(classifier.engine, "forward", forward)
    now = time.time()
    bad, good = (WorkItem(new_id(), texts, now, now + 30, "api") for texts in (["not a number", "fine"], ["fine"]))
    for item in (bad, good):
        redis.lpush(keys.queue, item.encode())
    thread = start_worker(worker)
    try:
        assert Result.decode(wait_for("its answer", lambda: redis.get(keys.result(bad.id)) or b"")).error
        assert Result.decode(wait_for("its answer", lambda: redis.get(keys.result(good.id)) or b"")).predictions
        assert not redis.get(worker._cache_key("not a number", None))
    finally:
        worker.stop()
        thread.join(HANG_GUARD_S)


def test_a_failing_heartbeat_is_said_once_a_run_of_failures_not_at_each_tick(
    worker: Worker, fake_server: fakeredis.FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    # An idle worker whose beats Redis refuses (OOM, NOPERM) was logged at DEBUG alone: /ready counted it
    # out with nothing said. Said at WARNING once a run, not every half second of an outage.
    caplog.set_level(logging.DEBUG, logger="batcher.heartbeat")

    def warnings() -> int:
        return sum(r.levelno == logging.WARNING for r in caplog.records if r.name == "batcher.heartbeat")

    fake_server.connected = False
    for _ in range(3):
        worker.heartbeat._tick()
    assert warnings() == 1
    fake_server.connected = True
    worker.heartbeat._tick()
    fake_server.connected = False
    worker.heartbeat._tick()
    assert warnings() == 2, "a new run of failures is said again"
