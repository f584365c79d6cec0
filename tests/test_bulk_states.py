"""A job's parts on their way through the model workers, as a state machine (Hypothesis's stateful
testing) over the real job (`batcher.jobs.classify`: parts sent ahead, progress saved, cancel checks)
and its `batcher.bulk.Bulk` (send, the wait, the requeue past the deadline, withdraw), on fakeredis.

The job runs in a thread of its own in lockstep with the test: it goes on only when a step lets it
(`look`), as far as its next look at whether to stop (each pass of a part's wait, each part
boundary), so every other step lands between two of its looks. Meanwhile model workers take its
bulk work (dropping what expired, as `Intake.hold` does), answer it (cache, result key and reply, as
`Replies` does; the reply lost sometimes, so the result key is read; or the model's error), answer
late what they were reclaimed of, or die (their work reclaimed onto the bulk list); the cache
forgets; the clock moves (past a part's deadline, its unanswered texts are queued again); the job is
canceled (DELETE) or its jobs worker told to stop, and a stopped job runs again as RQ would retry
it. After every step:

- the bulk list holds no item twice, nor one the job no longer waits for (left behind by a requeue,
  a withdraw, its end: but what a dead worker's reclaim put back), nor of a part's, a text twice;
- the job's saved progress never goes back;
- a finished job has every text's prediction, the right one.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import Counter
from types import SimpleNamespace
from typing import Any
from unittest import mock

import fakeredis
from fakeredis._socket import _base as fakeredis_socket
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from rq.job import Job

from api.job_store import JobStore
from batcher import bulk as bulk_module
from batcher import jobs as jobs_module
from batcher.bulk import Bulk, BulkFailed
from batcher.jobs import Context, JobCanceled, JobInterrupted, classify, running
from batcher.queue import WorkQueue
from core.job_spec import SERIALIZER
from core.protocol import (
    Keys,
    ModelInfo,
    Result,
    WorkItem,
    encode_prediction,
    encode_result,
    prediction,
    replies,
)
from core.settings import Settings
from tests.conftest import HANG_GUARD_S, examples

SETTINGS = Settings(
    redis_url="redis://unused:1/0", key_prefix="bulk", max_batch_size=2, request_timeout_s=10, job_ttl_s=600
)
KEYS = Keys(SETTINGS.key_prefix)
LABELS = ["NEGATIVE", "POSITIVE"]
MODEL = ModelInfo(name="m", version="v", labels=LABELS, device="cpu", dtype="fp32")
TEXTS = st.lists(st.sampled_from([f"t{i}" for i in range(8)]), min_size=1, max_size=14)
WORKERS = ("w0", "w1")


def score(text: str) -> list[float]:
    positive = zlib.crc32(text.encode()) % 100 / 100
    return [1 - positive, positive]


class Lockstep:
    """The job's `stopping`: each look at it (by the job's thread) hands the turn back to the test,
    and waits for the test to hand it over again (`resume`); set, the job stops at that look."""

    def __init__(self) -> None:
        self.turn = threading.Semaphore(0)
        self.back = threading.Semaphore(0)
        self.stop = False

    def is_set(self) -> bool:
        self.back.release()
        if not self.turn.acquire(timeout=HANG_GUARD_S):
            raise TimeoutError("the test never handed the job its turn again")
        return self.stop

    def resume(self) -> None:
        self.turn.release()
        assert self.back.acquire(timeout=HANG_GUARD_S), "the job never came back to a look"


class BulkMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1_000_000.0
        clock = SimpleNamespace(time=lambda: self.now, monotonic=lambda: self.now, sleep=time.sleep)
        self._patches = [
            mock.patch.object(fakeredis_socket, "time", clock),
            mock.patch.object(bulk_module, "time", clock),
            mock.patch.object(bulk_module, "RESULTS_READ_EVERY_S", 0.0),
        ]
        for patch in self._patches:
            patch.start()
        self.redis = fakeredis.FakeRedis()
        self.redis.set(KEYS.model, MODEL.encode())
        self.store = JobStore(self.redis, SETTINGS)
        self.bulk = Bulk(SETTINGS, self.redis)
        self.job: Job | None = None
        self.texts: list[str] = []
        self.thread: threading.Thread | None = None
        self.stepper = Lockstep()
        self.outcome: object = None  # the job's return value or exception, once it ended
        self.ended = True
        self.canceled = False
        self.failed = False  # a worker answered an item it waits for with an error
        self.progress = 0
        self.queued_ids: set[str] = set()  # every item a job queued
        self.returned: set[str] = set()  # items a reclaim put back that no job waits for (or will, once answered)

    def teardown(self) -> None:
        if not self.ended:
            self.stepper.stop = True
            while not self.ended:
                self.stepper.resume()
        for patch in reversed(self._patches):
            patch.stop()
        self.bulk.close()

    # --- the job ---------------------------------------------------------------------------------

    @precondition(lambda self: self.ended)
    @rule(texts=TEXTS)
    def submit(self, texts: list[str]) -> None:
        self.job = Job.fetch(self.store.create(texts), connection=self.redis, serializer=SERIALIZER)
        self.texts, self.progress, self.canceled, self.failed = texts, 0, False, False
        self._run()

    @precondition(lambda self: self.ended and isinstance(self.outcome, JobInterrupted))
    @rule()
    def run_again(self) -> None:
        """The job a stop interrupted, run again by the next jobs worker (RQ requeued it)."""
        assert self.job is not None
        self.job = Job.fetch(self.job.id, connection=self.redis, serializer=SERIALIZER)
        self._run()

    def _run(self) -> None:
        self.stepper, self.outcome, self.ended = Lockstep(), None, False
        job, context = self.job, Context(self.bulk, stopping=self.stepper)  # type: ignore[arg-type]
        real_queue = self.bulk._queue

        def queue(part: Any, texts: list[str]) -> None:
            real_queue(part, texts)
            self.queued_ids |= set(part.queued)

        def run() -> None:
            try:
                with running(context), mock.patch.object(jobs_module, "get_current_job", lambda: job):
                    self.outcome = classify(self.texts)
            except Exception as exc:
                self.outcome = exc
            finally:
                self.ended = True
                self.stepper.back.release()

        self._queue_patch = mock.patch.object(self.bulk, "_queue", queue)
        self._queue_patch.start()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.stepper.back.acquire(timeout=HANG_GUARD_S)
        self._after_a_turn()

    @precondition(lambda self: not self.ended)
    @rule()
    def look(self) -> None:
        """The job goes on to its next look (reads replies and result keys, queues a late part again,
        sends the next part)."""
        self.stepper.resume()
        self._after_a_turn()

    def _after_a_turn(self) -> None:
        if not self.ended:
            return
        assert self.thread is not None
        self.thread.join(HANG_GUARD_S)
        self._queue_patch.stop()
        outcome = self.outcome
        if isinstance(outcome, JobCanceled):
            assert self.canceled, outcome
        elif isinstance(outcome, JobInterrupted):
            assert self.stepper.stop, outcome
        elif isinstance(outcome, BulkFailed):
            assert self.failed, outcome
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            assert not self.canceled, "a job canceled before its last look finished"
            assert outcome == [prediction(LABELS, score(t)) for t in self.texts]

    @precondition(lambda self: not self.ended and not self.canceled)
    @rule()
    def cancel(self) -> None:
        """DELETE /jobs/{id} while it runs."""
        assert self.job is not None
        self.store.delete(self.job.id)
        self.canceled = True

    @precondition(lambda self: not self.ended)
    @rule()
    def stop(self) -> None:
        """The jobs worker is told to stop (SIGTERM)."""
        self.stepper.stop = True

    @rule(seconds=st.sampled_from([0.5, 4.0, 11.5]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    # --- the model workers ---------------------------------------------------------------------------

    @rule(worker=st.sampled_from(WORKERS), most=st.integers(1, 3))
    def take(self, worker: str, most: int) -> None:
        """LMOVEs from the bulk list; an item past its deadline is dropped unanswered (`Intake.hold`)."""
        for raw in WorkQueue(self.redis, KEYS, worker).take_queued(most, bulk=True):
            if WorkItem.decode(raw).deadline < self.now:
                self.redis.lrem(KEYS.bulk_processing(worker), 1, raw)

    @rule(
        worker=st.sampled_from(WORKERS),
        which=st.integers(0, 3),
        published=st.booleans(),
        keep=st.booleans(),
        fails=st.booleans(),
    )
    def answer(self, worker: str, which: int, published: bool, keep: bool, fails: bool) -> None:
        """The reply stage's transaction for one held item: cache, result, LREM, reply (or, not
        `published`, the reply lost: its result key waits to be read). `keep`: the worker hung holding
        it and was reclaimed (the item is on the bulk list again, or soon, `dies`), and answers it late.
        `fails`: the model failed on it (the job fails)."""
        held = self.redis.lrange(KEYS.bulk_processing(worker), 0, -1)
        if not held:
            return
        raw = held[which % len(held)]
        item = WorkItem.decode(raw)
        if keep:
            self.returned.add(item.id)
        predictions = [encode_prediction(LABELS, score(t)) for t in item.texts]
        result = Result(error="the model failed").encode() if fails else encode_result(predictions)
        self.failed |= fails and item.id in self.bulk._waiting
        with self.redis.pipeline() as pipe:
            for text, encoded in zip(item.texts, predictions, strict=True):
                pipe.set(KEYS.cache(MODEL.version, text), encoded)
            pipe.set(KEYS.result(item.id), result, px=int((max(item.deadline - self.now, 0) + 1) * 1000))
            if not keep:
                pipe.lrem(KEYS.bulk_processing(worker), 1, raw)
            if published:
                pipe.publish(item.reply_to, replies([(item.id, result)]))
            pipe.execute()

    @rule(worker=st.sampled_from(WORKERS))
    def dies(self, worker: str) -> None:
        """Killed: another worker reclaims its bulk work onto the bulk list (a copy no job waits for
        any more too: the next worker drops it as expired, or answers it from the cache)."""
        held = {WorkItem.decode(raw).id for raw in self.redis.lrange(KEYS.bulk_processing(worker), 0, -1)}
        self.returned |= held - set(self.bulk._waiting)
        WorkQueue(self.redis, KEYS, worker).give_back()

    @rule()
    def cache_expires(self) -> None:
        """The cache forgets every prediction (its TTL, or eviction)."""
        for key in self.redis.scan_iter(f"{KEYS.prefix}:cache:*"):
            self.redis.delete(key)

    # --- what it promises ----------------------------------------------------------------------------

    @invariant()
    def the_bulk_list_holds_what_a_job_waits_for_each_text_once(self) -> None:
        """No copy left behind by a requeue, a withdraw or a job's end (but what a reclaim put back)."""
        listed = self.redis.lrange(KEYS.bulk, 0, -1)
        assert len(set(listed)) == len(listed), "an item twice on the bulk list"
        ids = {WorkItem.decode(raw).id for raw in listed}
        left = ids & self.queued_ids - set(self.bulk._waiting) - self.returned
        assert not left, f"items no job waits for on the bulk list: {left}"
        for part in {id(p): p for p, _ in self.bulk._waiting.values()}.values():
            texts = Counter(t for raw in listed if (item := WorkItem.decode(raw)).id in part.queued for t in item.texts)
            assert all(count == 1 for count in texts.values()), f"a text queued twice for a part: {texts}"

    @invariant()
    def progress_never_goes_back(self) -> None:
        if self.job is None or not self.redis.exists(self.job.key):
            return
        done = Job.fetch(self.job.id, connection=self.redis, serializer=SERIALIZER).meta.get("done", 0)
        assert done >= self.progress, f"progress went back from {self.progress} to {done}"
        self.progress = done


BulkMachine.TestCase.settings = settings(
    max_examples=examples(300), stateful_step_count=80, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_a_jobs_parts_are_answered_queued_once_and_withdrawn_in_any_sequence = BulkMachine.TestCase
