"""The micro-batching worker: queue -> batch -> model -> results, until told to stop.

Each loop takes one batch (see `batching`), runs it through the shared cache-aware inference,
and in one Redis transaction writes the finished requests' results, publishes them to the
waiting API processes, and acknowledges them. A heartbeat key (TTL) says the worker is alive; a
worker whose heartbeat lapses has its work requeued by the others. A forward can outlast the TTL
(a full batch takes seconds on a small CPU), so the heartbeat is also refreshed while one runs.

With `overlap`, the model runs in a thread of its own (torch releases the GIL): while it computes
batch N, this thread writes the results of batch N-1 and then, late in N's forward, takes, tokenizes
and looks up batch N+1, which is queued behind N at once. Taken late, N+1 can hold the requests
that N-1's answers set off. With forward lanes, N+1 is taken at once and computes beside N: a lane
that has finished its share of N takes a share of N+1. Work stays in the processing list
until its results are written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError

from batcher import metrics
from batcher.batching import Batcher, Held, Slot
from batcher.inference import Inference
from batcher.protocol import Keys, ModelInfo, Prediction, Result, WorkerStatus, new_id, reply
from batcher.queue import WorkQueue
from batcher.redis_errors import describe
from model_store.classifier import Classifier
from sentiment.settings import Settings

log = logging.getLogger(__name__)

IDLE_POLL_S = 1.0  # longest a blocking take waits, so heartbeats and stop requests are seen
TAKE_LATE = 0.8  # (overlap) take the next batch this far into the running forward (see `_tick`)
SUMMARY_EVERY_S = 30.0


@dataclass(eq=False)
class Running:
    """A batch whose model forward has been started: its cached predictions and the texts computing."""

    slots: list[Slot]
    found: dict[str, Prediction]  # from the cache
    todo: list[str]  # distinct texts in the forward
    probabilities: Future[list[list[float]]]
    started: float  # perf_counter


def _call(compute: Callable[[], list[list[float]]]) -> Future[list[list[float]]]:
    """Run `compute` here and now, as a finished future (no overlap)."""
    future: Future[list[list[float]]] = Future()
    try:
        future.set_result(compute())
    except Exception as exc:
        future.set_exception(exc)
    return future


class Worker:
    """One model, one loop; run it in the process's main thread and call `stop` from a signal handler."""

    def __init__(self, settings: Settings, redis: Redis, classifier: Classifier) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.key_prefix)
        self.classifier = classifier
        self.status = WorkerStatus(
            id=new_id(), host=socket.gethostname(), pid=os.getpid(), model_version=classifier.version,
            started_at=time.time(),
        )
        self.queue = WorkQueue(redis, self.keys, self.status.id)
        self.inference = Inference(
            classifier, redis, self.keys, settings.max_batch_size, settings.max_batch_tokens, settings.cache_ttl_s
        )
        self.batcher = Batcher(
            self.queue, classifier.tokenize, settings.max_batch_size, settings.max_batch_tokens,
            settings.max_wait_ms / 1000, settings.batch_window,
        )
        # With forward lanes the next batch computes beside this one: a lane that is done with this
        # batch takes a share of the next (`Inference`), so no lane waits for the slower one.
        self._model_thread = (
            ThreadPoolExecutor(2 if classifier.lanes > 1 else 1, thread_name_prefix="model") if settings.overlap else None
        )
        self._running: Running | None = None  # (overlap) the batch in the model thread
        self._forward_s = 0.0  # how long the last batch's forwards took
        self._prepare_s = 0.0  # how long taking and starting the last batch took
        self._stopping = threading.Event()
        self._next_beat = self._next_reclaim = self._next_summary = 0.0

    def stop(self) -> None:
        """Finish the batch in hand, hand back anything else held, and leave `run`."""
        self._stopping.set()

    def run(self) -> None:
        """Serve until `stop`. Any Redis error is handled as an outage (drop what is in hand, back off,
        retry): an error reply such as OOM at maxmemory, READONLY after a failover or NOPERM passes like
        a lost connection, and dying of it would leave our work to the reclaim. Whatever ends the
        loop, `_leave` hands back what we hold."""
        log.info("worker %s serving model %s (%s)", self.status.id, self.classifier.name, self.classifier.version)
        backoff = 0.1
        try:
            while not self._stopping.is_set():
                try:
                    self._tick()
                    backoff = 0.1
                except RedisError as exc:
                    # What we held stays in our processing list; forget it here and requeue it on return.
                    self._forget_running()
                    self.batcher.drop_held()
                    self._next_beat = 0.0
                    log.warning("redis failed (%s); retrying in %.1f s", describe(exc), backoff)
                    log.debug("redis failed with", exc_info=True)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, 2.0)
        finally:
            self._leave()

    def _tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_beat:
            self._beat(first=self._next_beat == 0.0)
        if now >= self._next_reclaim:
            self.queue.reclaim_dead()
            self._next_reclaim = now + self.settings.heartbeat_ttl_s
        running = self._running
        if running and self.classifier.lanes == 1:
            # Take the next batch late in this one's forward, leaving time to prepare it: meanwhile
            # the clients that the last batch answered send their next requests, so the batch is
            # chosen from a wider window (less padding, fuller forwards) at no cost in latency,
            # since nothing taken could start before this forward ends. With lanes, each lane
            # starts the next batch as soon as it is free, before the batch as a whole ends: take
            # it at once, or the first lane to finish waits for it.
            wait([running.probabilities], max(0.0, TAKE_LATE * self._forward_s - 2 * self._prepare_s))
        # While a batch computes, take only what is queued now: its results are due soon.
        prepare = time.perf_counter()
        batch = self.batcher.next_batch(0 if running else IDLE_POLL_S, company=running is None)
        self._running = self._start(batch) if batch else None  # queued behind `running` in the model thread
        if running and self._running:  # (without `running` the take may have waited for work)
            self._prepare_s = time.perf_counter() - prepare
        if running:
            self._finish(running)
        if self._running and self._model_thread is None:
            self._finish(self._running)
            self._running = None
        if now >= self._next_summary:
            self._log_summary()
            self._next_summary = now + SUMMARY_EVERY_S

    def _start(self, batch: list[Slot]) -> Running | None:
        """Look the batch up in the cache and start the model on the rest."""
        started = time.perf_counter()
        batch = [s for s in batch if s.held.error is None]  # the rest of an item that already failed
        if not batch:
            return None
        metrics.batch_started(batch)
        found, todo = self.inference.lookup([s.text for s in batch])
        ids_of = {s.text: s.ids for s in batch}
        ids = [ids_of[t] for t in todo]
        deadline = max(s.held.item.deadline for s in batch)

        def compute() -> list[list[float]]:
            began = time.perf_counter()
            with metrics.busy(), self._beating(deadline) if ids else nullcontext():
                probabilities = self.inference.run(ids) if ids else []
            self._forward_s = time.perf_counter() - began
            return probabilities

        probabilities = self._model_thread.submit(compute) if self._model_thread else _call(compute)
        return Running(batch, found, todo, probabilities, started)

    def _finish(self, running: Running) -> None:
        """Wait for the batch's forward, then write its finished requests' results in one transaction."""
        batch = running.slots
        writes = self.redis.pipeline(transaction=True)
        try:
            found = running.found | self.inference.store(running.todo, running.probabilities.result(), writes)
            for slot in batch:
                slot.held.fill(slot.index, found[slot.text])
        except Exception as failure:
            # Exception messages may quote the input: their text and traceback only at DEBUG.
            log.warning(
                "a batch of %d texts failed (%s); retrying its requests one by one", len(batch), type(failure).__name__
            )
            log.debug("the batch failed with", exc_info=True)
            for held, slots in _by_item(batch).items():
                if held.error or held.answered:
                    continue
                try:
                    self._predict(slots, writes)
                except Exception as exc:  # only this request fails; the worker carries on
                    held.error = f"the model failed on this request's texts ({type(exc).__name__})"
                    log.warning("request %s failed in the model (%s)", held.item.id, type(exc).__name__)
                    log.debug("request %s failed with", held.item.id, exc_info=True)
        finished = [h for h in _by_item(batch) if (h.missing == 0 or h.error) and not h.answered]
        for held in finished:
            result = Result(error=held.error) if held.error else Result(predictions=held.predictions)  # type: ignore[arg-type]
            encoded = result.encode()
            # Read only by a waiter the reply missed, and nobody waits past the deadline: a second more at most.
            ttl_s = min(self.settings.result_ttl_s, max(held.item.deadline - time.time(), 0.0) + 1.0)
            writes.set(self.keys.result(held.item.id), encoded, px=int(ttl_s * 1000))
            writes.publish(held.item.reply_to, reply(held.item.id, encoded))
            self.queue.ack(held.raw, writes)
            held.answered = True
        requests = len(_by_item(batch))
        self.status = dataclasses.replace(
            self.status,
            batches=self.status.batches + 1,
            requests=self.status.requests + len(finished),
            texts=self.status.texts + len(batch),
            expired=self.batcher.expired,
            largest_batch_requests=max(self.status.largest_batch_requests, requests),
        )
        self._beat_into(writes)  # a busy worker's heartbeat rides on its result writes
        writes.execute()
        self._next_beat = time.monotonic() + self.settings.heartbeat_ttl_s / 3
        log.debug(
            "batch %d: %d texts from %d requests, %d finished, %.1f ms",
            self.status.batches, len(batch), requests, len(finished), (time.perf_counter() - running.started) * 1000,
        )

    def _forget_running(self) -> None:
        """Drop the batch in the model thread (its items stay in the processing list for `give_back`)."""
        if self._running:
            self._running.probabilities.exception()  # let the forward end; its outcome no longer matters
            self._running = None

    def _predict(self, slots: list[Slot], writes: Pipeline) -> None:
        predictions = self.inference.predict([s.text for s in slots], [s.ids for s in slots], writes)
        for slot, pred in zip(slots, predictions, strict=True):
            slot.held.fill(slot.index, pred)

    def _beat(self, first: bool) -> None:
        """Refresh the heartbeat; the first one also announces the model and requeues what we held."""
        if first:
            self.queue.give_back()
            c = self.classifier
            info = ModelInfo(c.name, c.version, c.labels, str(c.device), c.dtype_name)
            self.redis.set(self.keys.model, info.encode())
            metrics.describe_model(c)
        pipe = self.redis.pipeline(transaction=True)
        self._beat_into(pipe)
        pipe.execute()
        self._next_beat = time.monotonic() + self.settings.heartbeat_ttl_s / 3

    def _beat_into(self, pipe: Pipeline) -> None:
        pipe.set(self.keys.heartbeat(self.status.id), self.status.encode(), px=int(self.settings.heartbeat_ttl_s * 1000))
        pipe.sadd(self.keys.workers, self.status.id)

    @contextmanager
    def _beating(self, deadline: float) -> Iterator[None]:
        """Refresh the heartbeat from a thread while a forward runs, as the loop cannot meanwhile: a
        forward longer than the TTL is work, not death, and must not have its work reclaimed and run
        twice. Only during the forward and only until its requests' last `deadline` (unix s), after
        which nobody waits for its answers: a worker stuck anywhere else, or in a forward that never
        returns, still falls silent: its work is reclaimed, and a liveness probe restarts it."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.settings.heartbeat_ttl_s / 3) and time.time() < deadline:
                try:
                    pipe = self.redis.pipeline(transaction=True)
                    self._beat_into(pipe)
                    pipe.execute()
                except RedisError as exc:  # the loop deals with Redis failing; the next beat may work
                    log.debug("heartbeat during a forward failed (%s)", type(exc).__name__)

        thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()  # no beat after the forward: the loop owns the heartbeat again

    def _leave(self) -> None:
        """Answer the batch in the model, hand back other work and deregister; a Redis outage leaves it to reclaim."""
        try:
            if self._running:
                self._finish(self._running)
        except RedisError:
            pass  # its items are still in our processing list: handed back or reclaimed below
        self._forget_running()
        if self._model_thread:
            self._model_thread.shutdown()
        self.batcher.drop_held()
        try:
            returned = self.queue.give_back()
            self.redis.delete(self.keys.heartbeat(self.status.id))
            self.redis.srem(self.keys.workers, self.status.id)
            log.info("worker %s stopped; handed back %d unfinished items", self.status.id, returned)
        except RedisError as exc:
            log.warning(
                "worker %s stopped without deregistering (%s): its work will be reclaimed",
                self.status.id, describe(exc),
            )
        self._log_summary()

    def _log_summary(self) -> None:
        s = self.status
        if s.batches:
            log.info(
                "%d batches, %d requests, %d texts (mean %.1f texts/batch, largest %d requests), %d expired",
                s.batches, s.requests, s.texts, s.texts / s.batches, s.largest_batch_requests, s.expired,
            )


def _by_item(slots: list[Slot]) -> dict[Held, list[Slot]]:
    """The batch's slots grouped by the work item they belong to, in batch order."""
    groups: dict[Held, list[Slot]] = {}
    for slot in slots:
        groups.setdefault(slot.held, []).append(slot)
    return groups
