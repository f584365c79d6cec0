"""Bulk jobs (/jobs) lifecycle on fakeredis, with the RQ jobs worker run in burst mode in-process."""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import fakeredis
import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule
from redis import exceptions as redis_exceptions
from redis.client import Pipeline, PubSubWorkerThread
from rq import Queue
from rq.exceptions import StopRequested
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job

from api.app import create_app
from api.errors import ErrorType, ServiceError
from api.job_store import JobStore
from batcher.bulk import Bulk, BulkStopped, Part
from batcher.jobs import Context, JobsWorker, serve_jobs
from batcher.queue import WorkQueue
from batcher.worker import Worker
from benchmarks.checkpoints import write_tiny_model
from core.job_spec import SERIALIZER
from core.protocol import Keys, ModelInfo, WorkItem
from core.settings import Settings
from model_store.classifier import Classifier
from tests.conftest import HANG_GUARD_S, examples, wait_for

TEXTS = [
    "i love this movie",
    "awful film",
    "i love this movie",
    "not very good",
    "fun",
    "boring",
    "great",
    "bad",
    "i hate it",
    "this is a very very long text that is not boring at all",
]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    return Classifier(write_tiny_model(tmp_path_factory.mktemp("model")), "cpu", 1)


class SpyBulk(Bulk):
    """The real way to the model workers, with a hook run before each part (to look at or poke the
    running job), and a count of the texts sent to the model workers (`computed`: not in the cache)."""

    before_part: Callable[[list[str]], None] = staticmethod(lambda texts: None)
    computed = 0
    parts = 0  # sent

    def __init__(self, settings: Settings, redis: fakeredis.FakeRedis) -> None:
        super().__init__(settings, redis)
        self.items: list[list[str]] = []  # each queue's work item ids

    def send(self, texts: Sequence[str]) -> Part:
        self.before_part(list(texts))
        self.parts += 1
        return super().send(texts)

    def _queue(self, part: Part, texts: list[str]) -> None:
        self.computed += len(texts)
        super()._queue(part, texts)
        self.items.append(list(part.queued))


class Service:
    """API + model worker thread on one fakeredis server; jobs run by `run_jobs` (burst), through the worker."""

    def __init__(self, classifier: Classifier, settings: Settings) -> None:
        server = fakeredis.FakeServer()
        self.redis = fakeredis.FakeRedis(server=server)
        self.settings = settings
        self.bulk = SpyBulk(settings, self.redis)
        self.app = create_app(settings, redis=fakeredis.FakeAsyncRedis(server=server), jobs_redis=self.redis)
        self.worker = Worker(settings, fakeredis.FakeRedis(server=server), classifier)

    def run_jobs(self) -> None:
        serve_jobs(self.settings, self.bulk, self.redis, burst=True)

    def job(self, job_id: str) -> Job:
        return Job.fetch(job_id, connection=self.redis, serializer=SERIALIZER)

    @staticmethod
    def job_key(job_id: str) -> str:
        return Job.key_for(job_id)


@pytest.fixture
def service(classifier: Classifier) -> Iterator[tuple[Service, TestClient]]:
    settings = Settings(
        redis_url="redis://unused:1/0",
        max_batch_size=2,
        max_texts=64,
        jobs_max_texts=20,
        max_chars=100,
        job_ttl_s=600,
        heartbeat_ttl_s=5,
    )
    svc = Service(classifier, settings)
    thread = threading.Thread(target=svc.worker.run, daemon=True)
    thread.start()
    with TestClient(svc.app) as client:
        yield svc, client
    svc.worker.stop()
    thread.join(10)


def submit(client: TestClient, texts: list[str]) -> str:
    response = client.post("/jobs", json={"text": texts})
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def test_job_runs_to_the_same_predictions_as_predict(service: tuple[Service, TestClient]) -> None:
    svc, client = service
    response = client.post("/jobs", json={"text": TEXTS})
    assert response.status_code == 202
    body = response.json()
    assert body == {"job_id": body["job_id"], "status": "queued", "status_url": f"/jobs/{body['job_id']}"}
    assert response.headers["location"] == body["status_url"]
    assert len(body["job_id"]) == 32
    queued = client.get(body["status_url"]).json()
    assert queued["status"] == "queued" and queued["progress"] == {"done": 0, "total": len(TEXTS)}
    assert queued["started_at"] is None and queued["ended_at"] is None and "predictions" not in queued

    svc.run_jobs()

    done = client.get(body["status_url"]).json()
    assert done["status"] == "finished"
    assert done["progress"] == {"done": len(TEXTS), "total": len(TEXTS)}
    assert done["created_at"] <= done["started_at"] <= done["ended_at"]
    expected = client.post("/predict", json={"text": TEXTS}).json()["predictions"]
    assert len(done["predictions"]) == len(TEXTS)
    for got, want in zip(done["predictions"], expected, strict=True):
        assert [s["label"] for s in got] == [s["label"] for s in want]
        assert [s["score"] for s in got] == pytest.approx([s["score"] for s in want], abs=1e-5)


def test_a_job_reads_the_cache_instead_of_recomputing(service: tuple[Service, TestClient]) -> None:
    svc, client = service
    first = submit(client, TEXTS)
    svc.run_jobs()
    computed = svc.bulk.computed
    assert computed == len(set(TEXTS))
    second = submit(client, list(reversed(TEXTS)))
    svc.run_jobs()
    assert svc.bulk.computed == computed  # all from the cache (as a retried job's first parts are)
    assert (
        client.get(f"/jobs/{second}").json()["predictions"] == client.get(f"/jobs/{first}").json()["predictions"][::-1]
    )


def test_a_deployment_under_another_key_prefix_never_runs_this_ones_jobs(service: tuple[Service, TestClient]) -> None:
    svc, client = service
    job_id = submit(client, TEXTS)
    neighbour = Settings(redis_url=svc.settings.redis_url, key_prefix="neighbour")  # its own model, maybe
    assert (svc.settings.jobs_queue, neighbour.jobs_queue) == ("sentiment-jobs", "neighbour-jobs")
    serve_jobs(neighbour, svc.bulk, svc.redis, burst=True)
    assert client.get(f"/jobs/{job_id}").json()["status"] == "queued" and svc.bulk.computed == 0
    svc.run_jobs()
    assert client.get(f"/jobs/{job_id}").json()["status"] == "finished"


def test_progress_moves_part_by_part_each_sent_while_the_last_computes(service: tuple[Service, TestClient]) -> None:
    svc, client = service
    job_id = submit(client, TEXTS * 2)  # three parts
    seen: list[tuple[str, int]] = []

    def look(_: list[str]) -> None:
        view = client.get(f"/jobs/{job_id}").json()
        seen.append((view["status"], view["progress"]["done"]))

    svc.bulk.before_part = look
    svc.run_jobs()
    part = svc.settings.max_batch_size * 4  # BATCHES_PER_PART
    assert seen == [("started", 0), ("started", 0), ("started", part)]  # the second sent before the first's answer
    assert client.get(f"/jobs/{job_id}").json()["progress"] == {"done": 2 * len(TEXTS), "total": 2 * len(TEXTS)}


def test_progress_never_goes_back_when_a_job_is_retried(
    service: tuple[Service, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry reads back from the cache, part by part, what the run before it computed: its progress
    started again from 0 under the eyes of whoever polled (16 of 20 done, then 8)."""
    svc, client = service
    job_id = submit(client, TEXTS * 2)  # three parts
    seen: list[int] = []
    svc.bulk.before_part = lambda _: seen.append(client.get(f"/jobs/{job_id}").json()["progress"]["done"])
    receive, received = svc.bulk.receive, []

    def fails_at_the_first_runs_last_part(part: Part, *args: Any) -> list[Any]:
        received.append(part)
        if len(received) == 3:
            raise RuntimeError("model exploded")
        return receive(part, *args)

    monkeypatch.setattr(svc.bulk, "receive", fails_at_the_first_runs_last_part)
    svc.run_jobs()
    view = client.get(f"/jobs/{job_id}").json()
    assert view["status"] == "finished" and view["progress"]["done"] == 2 * len(TEXTS)
    assert len(seen) == 6 and seen == sorted(seen), seen  # two runs of three parts


def test_cancel_a_queued_job(service: tuple[Service, TestClient]) -> None:
    svc, client = service
    job_id = submit(client, TEXTS)
    response = client.delete(f"/jobs/{job_id}")
    assert (response.status_code, response.content) == (204, b"")
    svc.run_jobs()
    assert svc.bulk.computed == 0
    view = client.get(f"/jobs/{job_id}").json()
    assert view["status"] == "canceled" and view["ended_at"] is not None and "predictions" not in view
    assert 0 < svc.redis.ttl(svc.job(job_id).key) <= svc.settings.job_ttl_s  # expires like any job


def test_cancel_a_started_job_stops_it_at_the_next_part(service: tuple[Service, TestClient]) -> None:
    svc, client = service
    job_id = submit(client, TEXTS * 2)  # three parts
    answers: list[int] = []

    def cancel_as_the_second_part_is_sent(_: list[str]) -> None:
        if svc.bulk.parts == 1 and not answers:
            answers.append(client.delete(f"/jobs/{job_id}").status_code)

    svc.bulk.before_part = cancel_as_the_second_part_is_sent
    svc.run_jobs()  # returns: the job stopped, and was neither retried nor failed
    assert answers == [204]
    assert svc.bulk.parts == 2  # no third part queued once canceled
    part = svc.settings.max_batch_size * 4
    view = client.get(f"/jobs/{job_id}").json()
    assert view["status"] == "canceled"
    assert view["progress"] == {"done": part, "total": 2 * len(TEXTS)}  # the part in hand finished, no more
    assert "predictions" not in view and "error" not in view
    queue = svc.app.state.jobs.queue
    assert job_id not in queue.failed_job_registry and job_id not in queue.started_job_registry
    assert queue.count == 0


def test_a_job_canceled_while_no_model_worker_answers_queues_its_part_no_more(classifier: Classifier) -> None:
    """Nothing answers its part (the model workers busy, or none up): canceled, the job still waited
    for it, queueing its texts again at every deadline to be computed for nobody, its jobs worker
    held for up to the job's hour-long timeout."""
    settings = Settings(redis_url="redis://unused:1/0", max_batch_size=2, request_timeout_s=0.1)
    svc = Service(classifier, settings)  # its model worker never runs
    requeued: list[list[str]] = []

    def queue(part: Part, texts: list[str]) -> None:
        if len(svc.bulk.items) == 2:  # both parts sent: this is the first one's texts past their deadline
            requeued.append(texts)
            raise RuntimeError("queued again for a canceled job")  # (ends the wait the bug makes endless)
        SpyBulk._queue(svc.bulk, part, texts)

    with TestClient(svc.app) as client:
        job_id = submit(client, TEXTS)  # two parts
        svc.bulk.before_part = lambda _: svc.bulk.parts == 1 and client.delete(f"/jobs/{job_id}")
        svc.bulk._queue = queue  # type: ignore[method-assign]
        svc.run_jobs()
        assert requeued == []
        assert client.get(f"/jobs/{job_id}").json()["status"] == "canceled"
    assert svc.redis.llen(Keys(settings.key_prefix).bulk) == 0  # taken back: nothing left to compute for nobody


def test_a_job_canceled_with_a_part_queued_takes_it_back_off_the_bulk_list(
    service: tuple[Service, TestClient],
) -> None:
    svc, client = service
    job_id = submit(client, [f"{text} {i}" for i, text in enumerate(TEXTS * 2)])  # three parts, none cached
    keys = Keys(svc.settings.key_prefix)
    answers: list[int] = []

    def cancel_with_no_model_worker_as_the_second_part_is_sent(_: list[str]) -> None:
        if svc.bulk.parts == 1 and not answers:
            first = svc.bulk.items[0]
            wait_for("the first part's results", lambda: svc.redis.exists(*map(keys.result, first)) == len(first))
            svc.worker.stop()  # nothing takes the second part from here on
            answers.append(client.delete(f"/jobs/{job_id}").status_code)

    svc.bulk.before_part = cancel_with_no_model_worker_as_the_second_part_is_sent
    svc.run_jobs()  # the first part's answers in hand, the cancel found at that boundary
    assert answers == [204] and svc.bulk.parts == 2
    assert client.get(f"/jobs/{job_id}").json()["status"] == "canceled"
    assert len(svc.bulk.items[1]) == 4 and svc.redis.llen(keys.bulk) == 0  # queued, then taken back


def test_a_cache_entry_that_holds_no_prediction_is_queued_as_a_miss(redis: fakeredis.FakeRedis) -> None:
    """A job's part read garbage where a text's prediction is cached as that text's prediction (a job
    result of garbage, or a 500 reading it); it is a miss, for a model worker to compute and write over."""
    settings = Settings(key_prefix="garbled")
    keys = Keys(settings.key_prefix)
    redis.set(keys.model, ModelInfo("tiny", "v1", ["NEGATIVE", "POSITIVE"], "cpu", "float32").encode())
    good = orjson.dumps([{"label": "NEGATIVE", "score": 0.25}, {"label": "POSITIVE", "score": 0.75}])
    redis.set(keys.cache("v1", "cached"), good)
    redis.set(keys.cache("v1", "garbled"), b"\x00 garbage")
    part = Bulk(settings, redis).send(["cached", "garbled"])
    assert part.found == {"cached": orjson.loads(good)}
    [queued] = [WorkItem.decode(raw) for raw in redis.lrange(keys.bulk, 0, -1)]
    assert queued.texts == ["garbled"]


def test_an_unreadable_announcement_costs_a_part_the_cache_not_the_job(redis: fakeredis.FakeRedis) -> None:
    """Garbage where the model is announced (until a model worker's next beat announces it again) is,
    as on /predict, no model announced: the part's texts are queued, for the model workers to read
    from their cache or compute, never the job failed (it failed, all its runs at once, on Unreadable)."""
    settings = Settings(key_prefix="garbled-model")
    keys = Keys(settings.key_prefix)
    redis.set(keys.model, b"\x00 garbage")
    part = Bulk(settings, redis).send(["a text", "another"])
    assert part.found == {}
    [queued] = [WorkItem.decode(raw) for raw in redis.lrange(keys.bulk, 0, -1)]
    assert queued.texts == ["a text", "another"]


def test_texts_past_their_deadline_are_queued_again_once_however_many_deadlines_pass(
    redis: fakeredis.FakeRedis,
) -> None:
    # No model worker answers (a busy service): each deadline queues the part's texts again. The bulk
    # list, which KEDA scales on, must hold each unanswered text once, not a copy per deadline; a copy a
    # worker took (held, or dropped as expired) is not on it, and its texts are queued again too.
    settings = Settings(key_prefix="requeue", max_batch_size=2, request_timeout_s=0.1)
    keys = Keys(settings.key_prefix)
    bulk = Bulk(settings, redis)
    texts = [f"text {i}" for i in range(5)]
    part = bulk.send(texts)
    assert WorkQueue(redis, keys, "busy").take_queued(1, bulk=True)  # a worker took one, never to answer
    stopping = threading.Event()

    def wait() -> None:
        with contextlib.suppress(BulkStopped):
            bulk.receive(part, stopping)

    deadlines = {part.deadline}

    def queued_again_three_times() -> bool:
        deadlines.add(part.deadline)
        return len(deadlines) > 3

    waiting = threading.Thread(target=wait)
    waiting.start()
    try:
        wait_for("three deadlines to pass", queued_again_three_times)
    finally:
        stopping.set()
        waiting.join(HANG_GUARD_S)
    queued = [WorkItem.decode(raw) for raw in redis.lrange(keys.bulk, 0, -1)]
    assert sorted(t for item in queued for t in item.texts) == texts
    assert {item.id for item in queued} == set(part.queued)  # the copies the part waits for


def explode(_: list[str]) -> None:
    raise RuntimeError("model exploded")


@pytest.mark.parametrize("ending", ["finished", "failed", "canceled"])
def test_deleting_an_ended_job_removes_it_with_its_texts_and_results(
    service: tuple[Service, TestClient], ending: str
) -> None:
    svc, client = service
    job_id = submit(client, TEXTS[:3])
    if ending == "failed":
        svc.bulk.before_part = explode
    if ending == "canceled":
        assert client.delete(f"/jobs/{job_id}").status_code == 204  # the first DELETE cancels
    svc.run_jobs()
    assert client.get(f"/jobs/{job_id}").json()["status"] == ending
    assert list(svc.job(job_id).args) == [TEXTS[:3]]  # kept until now

    response = client.delete(f"/jobs/{job_id}")
    assert (response.status_code, response.content) == (204, b"")
    assert svc.redis.keys(f"*{job_id}*") == []  # the job, its texts and its result (or error): gone
    queue = svc.app.state.jobs.queue
    for registry in (queue.finished_job_registry, queue.failed_job_registry, queue.canceled_job_registry):
        assert job_id not in registry
    for method in ("GET", "DELETE"):
        assert client.request(method, f"/jobs/{job_id}").status_code == 404


def test_an_ended_job_is_deleted_though_a_killed_worker_s_execution_is_still_indexed(
    service: tuple[Service, TestClient],
) -> None:
    svc, client = service
    job_id = submit(client, TEXTS[:2])
    svc.run_jobs()
    # What a killed run leaves: its execution's hash expired with the heartbeat; RQ's index of the
    # job's executions keeps the id a minute longer.
    svc.redis.zadd(ExecutionRegistry(job_id, svc.redis).key, {"killed": time.time() + 60})
    assert client.delete(f"/jobs/{job_id}").status_code == 204
    assert svc.redis.keys(f"*{job_id}*") == []


def test_a_running_job_canceled_then_deleted_goes_at_once_and_its_worker_drops_it(
    service: tuple[Service, TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    """The worker finds the job gone at its next part boundary: it stops there, writes nothing back
    (a deleted job never returns), and carries on."""
    svc, client = service
    caplog.set_level(logging.INFO, logger="batcher.jobs")
    job_id = submit(client, TEXTS * 2)  # three parts
    answers: list[int] = []

    def cancel_and_delete_during_second_part(_: list[str]) -> None:
        if client.get(f"/jobs/{job_id}").json()["progress"]["done"] > 0 and not answers:
            answers.extend(client.delete(f"/jobs/{job_id}").status_code for _ in range(2))
            assert client.get(f"/jobs/{job_id}").status_code == 404
            left = [key.decode() for key in svc.redis.keys(f"*{job_id}*")]
            assert [key.split(":")[:3] for key in left] == [["rq", "execution", job_id]]  # only the run in hand

    svc.bulk.before_part = cancel_and_delete_during_second_part
    svc.run_jobs()  # returns: the job stopped at the part boundary, as any canceled job does
    assert answers == [204, 204]
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert f"job {job_id} deleted while it ran; dropped" in caplog.messages
    assert client.get(f"/jobs/{job_id}").status_code == 404
    assert svc.redis.keys(f"*{job_id}*") == []  # its execution too
    queue = svc.app.state.jobs.queue
    assert job_id not in queue.failed_job_registry and job_id not in queue.started_job_registry
    job_id = submit(client, TEXTS[:2])
    svc.run_jobs()
    assert client.get(f"/jobs/{job_id}").json()["status"] == "finished"  # the worker carries on


def test_a_job_that_finishes_while_being_canceled_is_deleted_never_turned_canceled(
    service: tuple[Service, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, client = service
    job_id = submit(client, TEXTS[:2])
    store = svc.app.state.jobs
    cancel = store._cancel
    canceled: list[str] = []

    def finish_before_the_cancel_is_written(job: Job, pipe: Pipeline) -> None:
        if not canceled:  # the DELETE's first look found it queued: the job finishes before the cancel acts on it
            svc.run_jobs()
        canceled.append(job.id)
        cancel(job, pipe)

    monkeypatch.setattr(store, "_cancel", finish_before_the_cancel_is_written)
    store.delete(job_id)  # as DELETE does, here on this thread: the jobs worker needs it
    monkeypatch.undo()
    assert canceled == [job_id]  # once: its transaction failed, and the second look found it finished
    assert client.get(f"/jobs/{job_id}").status_code == 404
    assert svc.redis.keys(f"*{job_id}*") == []
    assert job_id not in store.queue.canceled_job_registry


@pytest.mark.parametrize("deletes", [1, 2])
def test_a_job_canceled_or_deleted_once_its_worker_took_it_never_runs(
    service: tuple[Service, TestClient],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    deletes: int,
) -> None:
    """Taken off the queue, a job is only in its worker's memory until it starts: a DELETE then wins."""
    svc, client = service
    caplog.set_level(logging.INFO, logger="batcher.jobs")
    job_id = submit(client, TEXTS)
    prepare = JobsWorker.prepare_execution

    def delete_first(worker: JobsWorker, job: Job) -> Execution:
        for _ in range(deletes):
            assert client.delete(f"/jobs/{job_id}").status_code == 204
        return prepare(worker, job)

    monkeypatch.setattr(JobsWorker, "prepare_execution", delete_first)
    svc.run_jobs()
    assert svc.bulk.computed == 0
    assert f"job {job_id} {ENDINGS[deletes]} before it started; dropped" in caplog.messages
    assert_let_go(svc, client, job_id, deletes)
    view = client.get(f"/jobs/{job_id}").json()
    assert deletes == 2 or (view["status"], view["started_at"]) == ("canceled", None)


@pytest.mark.parametrize("ending", ["finished", "failed"])
@pytest.mark.parametrize("deletes", [1, 2])
def test_a_job_canceled_or_deleted_as_it_ends_is_dropped(
    service: tuple[Service, TestClient],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    ending: str,
    deletes: int,
) -> None:
    """A DELETE landing after the last part's look at the job, before its outcome is written: the
    job stays canceled (never `finished` or `failed`, never retried) or deleted (never back)."""
    svc, client = service
    caplog.set_level(logging.INFO, logger="batcher.jobs")
    job_id = submit(client, TEXTS[:3])  # one part
    runs: list[int] = []

    def run(texts: list[str]) -> None:
        runs.append(1)
        if ending == "failed":
            explode(texts)

    svc.bulk.before_part = run
    handler = "handle_job_success" if ending == "finished" else "handle_job_failure"
    handle = getattr(JobsWorker, handler)

    def delete_first(worker: JobsWorker, job: Job, *args: Any, **kwargs: Any) -> None:
        for _ in range(deletes):
            assert client.delete(f"/jobs/{job_id}").status_code == 204
        handle(worker, job, *args, **kwargs)

    monkeypatch.setattr(JobsWorker, handler, delete_first)
    svc.run_jobs()
    assert runs == [1]  # not retried
    assert f"job {job_id} {ENDINGS[deletes]} as it {ending}; dropped" in caplog.messages
    assert_let_go(svc, client, job_id, deletes)
    if deletes == 1:
        view = client.get(f"/jobs/{job_id}").json()
        assert view["status"] == "canceled" and "predictions" not in view and "error" not in view


@pytest.mark.parametrize("ending", ["finished", "failed"])
def test_a_job_deleted_the_moment_it_ended_leaves_its_worker_running(
    service: tuple[Service, TestClient],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    ending: str,
) -> None:
    """Its worker is done with it: nothing it does next reads the job (RQ's loop would end on a job that went)."""
    svc, client = service
    job_id = submit(client, TEXTS[:3])
    if ending == "failed":
        svc.bulk.before_part = explode
    handler = "handle_job_success" if ending == "finished" else "handle_job_failure"
    handle = getattr(JobsWorker, handler)

    def delete_once_ended(worker: JobsWorker, job: Job, *args: Any, **kwargs: Any) -> None:
        handle(worker, job, *args, **kwargs)
        if client.get(f"/jobs/{job_id}").json()["status"] == ending:  # (not a retry)
            assert client.delete(f"/jobs/{job_id}").status_code == 204

    monkeypatch.setattr(JobsWorker, handler, delete_once_ended)
    svc.run_jobs()
    assert client.get(f"/jobs/{job_id}").status_code == 404
    assert svc.redis.keys(f"*{job_id}*") == []
    assert not [r.getMessage() for r in caplog.records if r.name != "rq.worker" and r.levelno >= logging.WARNING]
    assert not [r.getMessage() for r in caplog.records if "unhandled exception" in r.getMessage()]


def test_a_job_deleted_while_its_result_is_read_is_404(
    service: tuple[Service, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, client = service
    job_id = submit(client, TEXTS[:3])
    svc.run_jobs()
    read = Job.return_value

    def deleted_first(job: Job, refresh: bool = False) -> Any:
        svc.app.state.jobs.delete(job_id)
        return read(job, refresh)

    monkeypatch.setattr(Job, "return_value", deleted_first)
    response = client.get(f"/jobs/{job_id}")
    assert response.status_code == 404, response.text  # not "finished" without its predictions


def test_a_started_job_is_canceled_though_a_killed_worker_s_execution_is_still_indexed(
    service: tuple[Service, TestClient],
) -> None:
    """A killed worker's execution expired with its heartbeat; RQ's index of the job's executions keeps
    the id a minute longer (RQ's `Job.cancel` fails on it), and the job reads `started` until RQ's
    abandoned-job cleanup notices."""
    svc, client = service
    job_id = submit(client, TEXTS[:2])
    svc.redis.hset(svc.job_key(job_id), "status", "started")
    svc.redis.zadd(ExecutionRegistry(job_id, svc.redis).key, {"killed": time.time() + 60})
    assert client.delete(f"/jobs/{job_id}").status_code == 204
    assert client.get(f"/jobs/{job_id}").json()["status"] == "canceled"
    assert client.delete(f"/jobs/{job_id}").status_code == 204
    assert svc.redis.keys(f"*{job_id}*") == []


ENDINGS = {1: "canceled", 2: "deleted"}  # what one DELETE and two DELETEs do to a queued or running job


def assert_let_go(svc: Service, client: TestClient, job_id: str, deletes: int) -> None:
    """The worker dropped the job (canceled: it stays so; deleted: nothing naming it is left)."""
    queue = svc.app.state.jobs.queue
    for registry in (queue.started_job_registry, queue.finished_job_registry, queue.failed_job_registry):
        assert job_id not in registry
    assert queue.count == 0 and not svc.redis.exists(queue.intermediate_queue_key)
    assert not svc.redis.keys(f"rq:execution*{job_id}*")
    if deletes == 2:
        assert client.get(f"/jobs/{job_id}").status_code == 404
        assert svc.redis.keys(f"*{job_id}*") == []


def test_a_job_has_no_expiry_until_it_ends(service: tuple[Service, TestClient]) -> None:
    """Redis evicts keys with a TTL under memory pressure (volatile-lru): a queued job must have none."""
    svc, client = service
    job_id = submit(client, TEXTS)
    keys = svc.redis.keys(f"*{job_id}*")
    assert svc.job(job_id).key.encode() in keys
    assert {key: svc.redis.ttl(key) for key in keys} == {key: -1 for key in keys}  # -1: no expiry
    svc.run_jobs()
    assert 0 < svc.redis.ttl(svc.job(job_id).key) <= svc.settings.job_ttl_s  # ended: kept job_ttl_s, then gone


def runs_exploding(svc: Service) -> list[int]:
    """Make every run of a job fail in its first part; returns the list its runs are counted in."""
    runs: list[int] = []

    def count_and_explode(texts: list[str]) -> None:
        runs.append(1)
        explode(texts)

    svc.bulk.before_part = count_and_explode
    return runs


def test_a_failing_job_is_retried_then_failed_with_a_one_line_error(service: tuple[Service, TestClient]) -> None:
    svc, client = service
    job_id = submit(client, TEXTS)
    runs = runs_exploding(svc)
    svc.run_jobs()
    assert len(runs) == 3  # the first run and two retries
    view = client.get(f"/jobs/{job_id}").json()
    assert view["status"] == "failed"
    assert view["error"] == "RuntimeError: model exploded"
    assert "predictions" not in view


def test_a_failing_job_is_retried_as_often_when_a_heartbeat_lands_as_its_failure_is_written(
    service: tuple[Service, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failure's transaction WATCHes the job: a heartbeat meanwhile means a fresh look, which must
    not count a retry twice."""
    svc, client = service
    job_id = submit(client, TEXTS)
    runs = runs_exploding(svc)
    retry = Job.retry
    calls: list[int] = []

    def beaten_to_it(job: Job, queue: Queue, pipeline: Pipeline) -> None:
        calls.append(1)
        if len(calls) % 2:  # each failure's first try: a heartbeat writes the job meanwhile
            svc.redis.hset(job.key, "last_heartbeat", "now")
        retry(job, queue, pipeline)

    monkeypatch.setattr(Job, "retry", beaten_to_it)
    svc.run_jobs()
    assert len(runs) == 3 and len(calls) == 4  # two retries, each written on its second try
    assert client.get(f"/jobs/{job_id}").json()["status"] == "failed"


def test_a_jobs_worker_without_webhook_secrets_says_that_webhooks_wait_unsent(
    service: tuple[Service, TestClient], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An API with SENTIMENT_WEBHOOK_SECRETS takes callback URLs; a jobs worker without them started no
    sender, and said nothing: the webhooks never went out, and their records never expired."""
    svc, client = service
    secret = "whsec_" + base64.b64encode(b"s" * 32).decode()
    signing = svc.settings.model_copy(update={"webhook_secrets": [secret]})
    JobStore(svc.redis, signing).delete(JobStore(svc.redis, signing).create(["a"], "https://hooks.example/"))
    monkeypatch.setattr("batcher.webhooks.UNSENT_SAID_EVERY_S", 0.01)
    said = lambda: [r.getMessage() for r in caplog.records if r.name == "batcher.webhooks"]  # noqa: E731
    svc.bulk.before_part = lambda texts: wait_for("the warning", said)  # the job runs until it is said
    submit(client, TEXTS[:2])
    with caplog.at_level(logging.WARNING, logger="batcher.webhooks"):
        svc.run_jobs()
    assert said()[0] == (
        "1 webhooks overdue, but this jobs worker sends none: it has no SENTIMENT_WEBHOOK_SECRETS "
        "(set the API's on every jobs worker)"
    ), said()


def test_a_job_with_a_text_refused_as_too_long_fails_at_once_naming_its_place_in_the_job(tmp_path: Path) -> None:
    """SENTIMENT_LONG_TEXTS=reject: /predict's 422 names the refused text; a job of thousands of texts
    failed with "longer than the model's 128 tokens" alone, naming none. And no retry changes the
    texts: the job was run three times, each sending its texts to the model workers again."""
    settings = Settings(redis_url="redis://unused:1/0", max_batch_size=2, jobs_max_texts=20, long_texts="reject")
    svc = Service(Classifier(write_tiny_model(tmp_path / "model"), "cpu", 1, long_texts="reject"), settings)
    runs: list[int] = []
    svc.bulk.before_part = lambda texts: runs.append(1) if texts[0] == TEXTS[0] else None  # a run's first part
    thread = threading.Thread(target=svc.worker.run, daemon=True)
    thread.start()
    long = " ".join(["great"] * 200)
    try:
        with TestClient(svc.app) as client:
            job_id = submit(client, [*TEXTS, long, "fun", long])  # in the job's second part, and again
            svc.run_jobs()
            view = client.get(f"/jobs/{job_id}").json()
    finally:
        svc.worker.stop()
        thread.join(10)
    assert len(runs) == 1
    assert view["status"] == "failed"
    assert view["error"].endswith(
        "TooLong: text 10 (202 tokens): longer than the model's 128 tokens (SENTIMENT_LONG_TEXTS=reject)"
    ), view["error"]


def test_unknown_and_expired_jobs_are_404(service: tuple[Service, TestClient]) -> None:
    svc, client = service
    for path in ("/jobs/" + "0" * 32, "/jobs/not-an-id"):
        for method in ("GET", "DELETE"):
            response = client.request(method, path)
            assert response.status_code == 404
            assert response.json()["error_type"] == "not_found"
    job_id = submit(client, TEXTS[:3])
    svc.run_jobs()
    job = svc.job(job_id)
    result_keys = svc.redis.keys(f"*{job_id}*")
    for key in result_keys:  # the job and its result live job_ttl_s, then go
        assert 0 < svc.redis.ttl(key) <= svc.settings.job_ttl_s, key
    assert job.key.encode() in result_keys
    for key in result_keys:
        svc.redis.expire(key, 0)  # what job_ttl_s seconds do
    assert client.get(f"/jobs/{job_id}").status_code == 404


def test_a_finished_job_whose_result_a_full_redis_evicted_is_404_not_finished_without_predictions(
    service: tuple[Service, TestClient],
) -> None:
    # An ended job is cache (its keys expire): at maxmemory Redis may evict its result before its hash.
    svc, client = service
    job_id = submit(client, TEXTS[:3])
    svc.run_jobs()
    assert client.get(f"/jobs/{job_id}").json()["status"] == "finished"
    for key in svc.redis.keys(f"*{job_id}*"):
        if key != svc.job(job_id).key.encode():
            svc.redis.delete(key)  # evicted: the result, not the hash
    assert client.get(f"/jobs/{job_id}").status_code == 404


def test_a_404_for_a_long_job_id_quotes_it_in_part(service: tuple[Service, TestClient]) -> None:
    """The 404 echoed the id whole: 60 KB of path, 60 KB of answer, where every other error quotes
    about 100 characters of a bad value."""
    _, client = service
    job_id = "a" * 10_000
    for method in ("GET", "DELETE"):
        response = client.request(method, f"/jobs/{job_id}")
        assert response.status_code == 404 and len(response.content) < 1000, len(response.content)
        assert response.json()["error"] == f"no job {job_id[:100]}… (10000 characters) (unknown, or expired)"


@pytest.mark.parametrize(
    "body",
    [{"text": ["x"] * 21}, {"text": ["x" * 101]}, {"text": []}, {"text": "x"}, {"text": ["x"], "extra": 1}, {}],
    ids=["too-many", "too-long", "empty", "not-a-list", "extra-field", "missing"],
)
def test_limits_are_422(service: tuple[Service, TestClient], body: dict) -> None:
    _, client = service
    assert client.post("/jobs", json=body).status_code == 422


def test_a_job_sent_without_content_type_is_read_as_json(service: tuple[Service, TestClient]) -> None:
    _, client = service
    response = client.post("/jobs", content=json.dumps({"text": TEXTS}))  # as k6 and many scripts send it
    assert "content-type" not in response.request.headers
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_job_sent_as_another_media_type_is_a_415_naming_the_header(
    service: tuple[Service, TestClient], content_type: str
) -> None:
    _, client = service
    response = client.post("/jobs", content=json.dumps({"text": TEXTS}), headers={"content-type": content_type})
    assert response.status_code == 415
    assert response.json()["error_type"] == "unsupported_media_type"
    assert "Content-Type" in response.json()["error"] and content_type in response.json()["error"]


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", " GZIP "])
def test_a_compressed_job_is_a_415_as_on_predict(service: tuple[Service, TestClient], coding: str) -> None:
    """FastAPI parsed the body before any check of the route ran: a gzip body was a 422 "not valid
    UTF-8", and an uncompressed one declared gzip was queued, where /predict answers 415 for both."""
    _, client = service
    for content in (gzip.compress(b'{"text": ["ok"]}'), b'{"text": ["ok"]}'):
        response = client.post("/jobs", content=content, headers={"content-encoding": coding})
        assert response.status_code == 415, response.text
        assert response.json()["error"].startswith("the body must not be compressed")
    assert client.post("/jobs", json={"text": ["ok"]}, headers={"content-encoding": "identity"}).status_code == 202


def test_a_422_for_a_job_quotes_the_bad_values_in_part(service: tuple[Service, TestClient]) -> None:
    _, client = service
    long_text = "0123456789" * 1000
    too_long = client.post("/jobs", json={"text": ["ok", long_text]})
    assert too_long.status_code == 422 and len(too_long.content) < 1000
    assert too_long.json()["detail"][0]["input"] == long_text[:100] + "… (10000 characters)"
    too_many = client.post("/jobs", json={"text": [f"text {i}" for i in range(21)]})
    assert too_many.status_code == 422 and len(too_many.content) < 1000
    assert too_many.json()["detail"][0]["input"][:2] == ["text 0", "text 1"]
    assert too_many.json()["detail"][0]["input"][-1] == "… (21 in all)"


def test_openapi_describes_every_response(service: tuple[Service, TestClient]) -> None:
    _, client = service
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/jobs"]["post"]["responses"]) == {"202", "413", "415", "422", "503", "default"}
    assert set(paths["/jobs/{job_id}"]["get"]["responses"]) == {"200", "404", "422", "503", "default"}
    assert set(paths["/jobs/{job_id}"]["delete"]["responses"]) == {"204", "404", "422", "503", "default"}
    assert "content" not in paths["/jobs/{job_id}"]["delete"]["responses"]["204"]
    for operation in (paths["/jobs"]["post"], *paths["/jobs/{job_id}"].values()):
        for status, response in operation["responses"].items():
            assert status == "204" or "schema" in response["content"]["application/json"]


@pytest.mark.slow
@pytest.mark.parametrize("module", ["api.app", "batcher.jobs"])
def test_the_api_and_the_jobs_worker_import_no_torch(module: str) -> None:
    code = f"import sys, {module}; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; sys.exit(str(bad) if bad else 0)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def lone_worker(redis: fakeredis.FakeRedis) -> JobsWorker:
    """A jobs worker on one queue, outside any `serve_jobs` loop."""
    context = Context(Bulk(Settings(), redis))
    return JobsWorker(
        [Queue("q", connection=redis)],
        connection=redis,
        context=context,
        heartbeat_ttl_s=2,
        redis_timeout_s=5,
        keys=Keys("t"),
    )


def test_the_end_of_a_worker_loop_stops_rqs_command_thread_without_a_traceback(
    fake_server: fakeredis.FakeServer,
) -> None:
    # RQ closes the subscription's connection under its thread; what the thread then meets is not an error.
    redis = fakeredis.FakeRedis(server=fake_server)
    worker = lone_worker(redis)
    pubsub = redis.pubsub()
    thread = PubSubWorkerThread(pubsub, sleep_time=1)
    thread._running.set()

    def closed_under_it() -> None:
        try:
            raise TypeError("argument must be an int, or have a fileno() method.")
        except TypeError as exc:
            worker._pubsub_exception_handler(exc, pubsub, thread)

    with pytest.raises(TypeError):  # running: RQ's own handling (not a connection error: raised again)
        closed_under_it()
    thread.stop()
    closed_under_it()  # stopped: quiet


def test_a_stop_swallowed_on_its_way_still_ends_a_wait_through_an_outage(
    fake_server: fakeredis.FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # RQ's stop is the StopRequested its SIGTERM handler raises wherever the main thread is: inside a
    # log call (RQ logs each failed try while Redis is down) logging swallows it, and RQ's wait for a
    # job retried the lost Redis for ever, a jobs worker outliving the `serve` that started it.
    worker = lone_worker(fakeredis.FakeRedis(server=fake_server))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(StopRequested):  # what logging's handleError then swallows
            worker.request_stop(signal.SIGTERM, None)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

    def lost(*_: object, **__: object) -> None:
        raise redis_exceptions.ConnectionError("Connection refused")

    monkeypatch.setattr(Queue, "dequeue_any", lost)
    ended: list[BaseException] = []

    def wait() -> None:
        try:
            worker.dequeue_job_and_maintain_ttl(timeout=1)
        except BaseException as exc:  # (what ended the wait is the result)
            ended.append(exc)

    waiting = threading.Thread(target=wait, daemon=True)
    waiting.start()
    waiting.join(HANG_GUARD_S)
    assert not waiting.is_alive(), "RQ's wait for a job went on retrying a lost Redis after the stop"
    assert [type(exc) for exc in ended] == [StopRequested]


def test_a_stop_asked_for_during_an_outage_is_a_stop_not_a_redis_error(fake_server: fakeredis.FakeServer) -> None:
    # An idle worker's current job is RQ's executions set in Redis: looked up in the SIGTERM handler
    # while Redis was down, its ConnectionError replaced the stop, a traceback of four chained errors.
    worker = lone_worker(fakeredis.FakeRedis(server=fake_server))
    fake_server.connected = False
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(StopRequested):
            worker.request_stop(signal.SIGTERM, None)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert worker.context.stopping.is_set()


# ---------------------------------------------------------------- the abandoned-job cleanup against DELETE


RETRIES = 2  # core.job_spec.RETRY
MEANWHILE = ["nothing", "cancel", "cancel and delete", "another cleanup"]


@contextlib.contextmanager
def meanwhile(job_id: str, fetches_before: int, action: Callable[[], object]) -> Iterator[None]:
    """Run `action` once, right after the cleanup's fetch of `job_id` (the fetch after `fetches_before`
    others of it): where another process's DELETE or cleanup may land, between its look and its write."""
    fetch = Job.fetch
    seen = [0]

    def fetched(*args: Any, **kwargs: Any) -> Job:
        job = fetch(*args, **kwargs)
        if job.id == job_id:
            seen[0] += 1
            if seen[0] == fetches_before + 1:
                action()
        return job

    with mock.patch.object(Job, "fetch", staticmethod(fetched)):
        yield


class AbandonedJobs(RuleBasedStateMachine):
    """Jobs submitted, taken by jobs workers that die, their DELETEs, and the abandoned-job cleanup
    (the API's, on reading a started job; a jobs worker's maintenance) with a DELETE or another cleanup
    landing between its look and its write. The model: what each job is, and its retries left."""

    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.redis = fakeredis.FakeRedis()
        settings = Settings(redis_url="redis://unused:1/0", job_ttl_s=600, heartbeat_ttl_s=5)
        self.store = JobStore(self.redis, settings)
        self.queue = self.store.queue
        self.worker = JobsWorker(
            [self.queue],
            connection=self.redis,
            serializer=SERIALIZER,
            context=Context(Bulk(settings, self.redis)),
            heartbeat_ttl_s=settings.heartbeat_ttl_s,
            redis_timeout_s=settings.redis_timeout_s,
            keys=Keys(settings.key_prefix),
        )
        self.model: dict[str, str] = {}
        self.retries: dict[str, int] = {}

    @rule(target=jobs)
    def submit(self) -> str:
        job_id = self.store.create(["a text"])
        self.model[job_id], self.retries[job_id] = "queued", RETRIES
        return job_id

    @rule(job_id=jobs)
    def taken_by_a_worker_that_dies(self, job_id: str) -> None:
        """A jobs worker took the job, started it and was killed: its heartbeat lapsed."""
        if self.model[job_id] != "queued":
            return
        self.redis.lrem(self.queue.key, 1, job_id)
        self.redis.hset(Job.key_for(job_id), "status", "started")
        self.redis.zadd(self.queue.started_job_registry.key, {f"{job_id}:killed-{time.time()}": time.time() - 1})
        self.model[job_id] = "started"

    @rule(job_id=jobs)
    def delete(self, job_id: str) -> None:
        self._delete(job_id)

    @rule(job_id=jobs, by_the_api=st.booleans(), action=st.sampled_from(MEANWHILE))
    def cleanup(self, job_id: str, by_the_api: bool, action: str) -> None:
        """The cleanup of `job_id` (the API's reading it, or a jobs worker's maintenance), `action`
        landing between its look at the job and its write."""
        if self.model[job_id] != "started":
            return
        actions: dict[str, Callable[[], object]] = {
            "nothing": lambda: None,
            "cancel": lambda: self._delete(job_id),
            "cancel and delete": lambda: (self._delete(job_id), self._delete(job_id)),
            "another cleanup": lambda: self._reaped(self.store.view(job_id)["status"], job_id),
        }
        # The API's read fetches the job once before its cleanup does.
        with meanwhile(job_id, 1 if by_the_api else 0, actions[action]):
            try:
                status = self.store.view(job_id)["status"] if by_the_api else self.worker.clean_registries()
            except ServiceError as gone:
                assert gone.error_type == ErrorType.NOT_FOUND and self.model[job_id] == "deleted"
                status = None
        self._reaped(status, job_id)

    def _reaped(self, status: str | None, job_id: str) -> None:
        """A cleanup ran, which answered `status` for `job_id`: every abandoned job was retried, or
        failed once its retries were spent."""
        for abandoned in [job for job, what in self.model.items() if what == "started"]:
            self.model[abandoned] = "queued" if self.retries[abandoned] else "failed"
            self.retries[abandoned] = max(self.retries[abandoned] - 1, 0)
        assert status in (None, self.model[job_id])

    def _delete(self, job_id: str) -> None:
        if self.model[job_id] == "deleted":
            return
        self.store.delete(job_id)
        self.model[job_id] = "deleted" if self.model[job_id] in ("canceled", "failed") else "canceled"

    @invariant()
    def each_job_is_what_its_calls_made_it(self) -> None:
        for job_id, expected in self.model.items():
            status = self.redis.hget(Job.key_for(job_id), "status")
            assert (status.decode() if status else "deleted") == expected, job_id

    @invariant()
    def the_queue_holds_each_queued_job_once_and_nothing_else(self) -> None:
        queued = [job_id.decode() for job_id in self.redis.lrange(self.queue.key, 0, -1)]
        assert sorted(queued) == sorted(job_id for job_id, what in self.model.items() if what == "queued")

    @invariant()
    def a_queued_job_never_expires(self) -> None:
        for job_id, what in self.model.items():
            if what == "queued":
                assert self.redis.ttl(Job.key_for(job_id)) == -1, job_id


AbandonedJobs.TestCase.settings = hypothesis_settings(max_examples=examples(60), stateful_step_count=12, deadline=None)
test_a_cleanup_of_abandoned_jobs_never_undoes_a_delete_nor_queues_a_job_twice = AbandonedJobs.TestCase


def test_a_job_the_cleanup_fails_says_when_it_ended(redis: fakeredis.FakeRedis) -> None:
    """Its third worker killed, the job read `failed` with `ended_at: null`, in GET's answer and its webhook's body."""
    store = JobStore(redis, Settings(redis_url="redis://unused:1/0", job_ttl_s=600))
    job_id = store.create(["a text"])
    for run in range(RETRIES + 1):
        redis.lrem(store.queue.key, 1, job_id)  # taken, started, and its worker killed: its heartbeat lapsed
        redis.hset(Job.key_for(job_id), "status", "started")
        redis.zadd(store.queue.started_job_registry.key, {f"{job_id}:killed-{run}": time.time() - 1})
        view = store.view(job_id)
    assert view["status"] == "failed" and view["ended_at"] is not None, view


@pytest.mark.parametrize(
    "encoded",
    [
        b"\xef\xbb\xbf" + b'{"text": ["a"]}',  # UTF-8 with a byte order mark
        '{"text": ["a"]}'.encode("utf-16"),
        '{"text": ["a"]}'.encode("utf-16-le"),  # (no mark: told by its NUL bytes)
        '{"text": ["a"]}'.encode("utf-32"),
    ],
)
def test_a_job_not_sent_as_utf8_is_the_422_of_malformed_json_as_on_predict(encoded: bytes) -> None:
    """The standard library's `json.loads`, which FastAPI parses /jobs by, reads these; /predict's
    parser does not (JSON is UTF-8, RFC 8259): both routes refuse them alike."""
    app = create_app(Settings(), redis=fakeredis.FakeAsyncRedis(), jobs_redis=fakeredis.FakeRedis())
    with TestClient(app) as client:
        response = client.post("/jobs", content=encoded, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert [error["type"] for error in response.json()["detail"]] == ["json_invalid"]
