"""The micro-batching worker: queue -> take -> plan -> forward -> reply, as a few named threads.

    main thread    take (`intake`): queued items into held texts; cache hits straight to reply
    forward-N      one per engine lane: the next forward by the policy (`plan`), then the engine
    reply          finished work back to Redis, one transaction per round (`reply`)
    heartbeat      liveness and the reclaim of dead workers' work (`heartbeat`)

Stages hand work on through `plan.Window` (take -> forward) and the reply stage's inbox (forward ->
reply), so the next forward is chosen while this one computes and results are written meanwhile
(docs/architecture.md). Work stays in this worker's processing list until its result is written.
A thread that dies of a bug stops the worker, which exits non-zero (`thread_failure`); a stage that
is stuck stops the heartbeat, so the other workers reclaim the work (`Worker._healthy`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from redis import Redis
from redis.exceptions import RedisError

from batcher import metrics
from batcher.forward import Lanes
from batcher.heartbeat import Heartbeat
from batcher.intake import IDLE_POLL_S, Intake
from batcher.plan import Window
from batcher.policy import Policy
from batcher.queue import WorkQueue
from batcher.reply import Replies
from batcher.thread_failure import ThreadFailure
from core import tracing
from core.protocol import Keys, ModelInfo, ScoreFunction, WorkerStatus, new_id, scored_version
from core.redis_errors import Backoff, describe
from core.settings import Settings
from model_store.classifier import Classifier
from model_store.long_texts import LongTexts

log = logging.getLogger(__name__)

FAILED_STOP_S = 10.0  # how long a worker whose thread failed may take to hand back its work before it exits anyway


class Worker:
    """One model, one pipeline; run it in the process's main thread and call `stop` from a signal handler."""

    def __init__(self, settings: Settings, redis: Redis, classifier: Classifier) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.key_prefix)
        self.classifier = classifier
        self.id = new_id()
        self._host = socket.gethostname()
        self._connection = redis.get_connection_kwargs().get("client_name")  # see `liveness.worker_client`
        self._started_at = time.time()
        self._stopping = threading.Event()
        self.queue = WorkQueue(redis, self.keys, self.id, settings.heartbeat_ttl_s)
        self.window = Window(
            Policy.of(settings, classifier.cost, classifier.lanes),
            deadlines=settings.overload_policy == "deadline",
            late=lambda texts: self.replies.late(texts),
        )
        self.failure = ThreadFailure(self.stop, FAILED_STOP_S)
        c = classifier
        model = ModelInfo(c.name, c.version, c.labels, c.device, c.dtype_name, c.function.value, c.engine.name)
        self.heartbeat = Heartbeat(
            redis, self.keys, self.queue, settings.heartbeat_ttl_s, lambda: self.status, self._healthy, model
        )
        self.replies = Replies(
            redis,
            self.keys,
            self.queue,
            classifier.labels,
            classifier.scores,
            settings.cache_ttl_s,
            settings.result_ttl_s,
            self._stopping,
            self.heartbeat.writes,
        )
        self.lanes = Lanes(classifier.engine, len(classifier.labels), self.window, self.replies, classifier.known_good)
        self.intake = Intake(
            self.queue,
            self.window,
            self.replies,
            classifier.split,
            self._cache_key,
            settings.drop_abandoned,
            classifier.max_length if classifier.long_texts == LongTexts.REJECT else None,
        )

    def _cache_key(self, text: str, function: ScoreFunction | None) -> str:
        """A text's cache key: under the model's version for its own scores, apart for another function's."""
        own = function is None or function == self.classifier.function
        return self.keys.cache(scored_version(self.classifier.version, None if own else function), text)

    @property
    def status(self) -> WorkerStatus:
        """What the heartbeat says: who this worker is, and its counters."""
        lanes, policy = self.lanes, self.window.policy
        full = self.window.forward_time.full_forward(policy.max_texts, policy.max_tokens)
        return WorkerStatus(
            id=self.id,
            host=self._host,
            pid=os.getpid(),
            model_version=self.classifier.version,
            started_at=self._started_at,
            batches=lanes.forwards,
            requests=self.replies.answered,
            texts=lanes.computed,
            expired=self.intake.expired,
            largest_batch_requests=lanes.largest_forward_requests,
            connection=self._connection,
            texts_per_s=None if full is None else self.classifier.lanes * full[0] / full[1],
            forward_s=None if full is None else full[1],
            texts_ahead=self.window.count() + sum(len(forward.texts) for forward, _ in list(lanes.running.values())),
        )

    def stop(self) -> None:
        """Finish the forwards under way, write their results, hand back the rest, and leave `run`."""
        self._stopping.set()

    def run(self) -> None:
        """Serve until `stop`. A Redis error in the take (an outage, or an error reply such as OOM or
        READONLY) backs off and tries again: dying of it would leave our work to the reclaim. Raises
        `ThreadFailed` once stopped when a thread (this one, the take, included) died of a bug."""
        log.info("worker %s serving model %s (%s)", self.id, self.classifier.name, self.classifier.version)
        tracing.setup("sentiment-worker")
        self.replies.start(self.failure)
        self.lanes.start(self.failure)
        self.heartbeat.start(self.failure)
        self._announce()
        backoff, lost, away = Backoff(log, self._stopping), False, False
        try:
            while not self._stopping.is_set():
                try:
                    if lost and (orphans := self.queue.requeue_unheld()):
                        log.warning("requeued %d items whose take a Redis failure cut short", orphans)
                    lost = False
                    if not self._healthy():  # a hung lane or stuck reply: take nothing it would hold up
                        away = True
                        self._stopping.wait(IDLE_POLL_S)
                        continue
                    if away:
                        self._rejoin()
                        away = False
                    if self.intake.take():
                        backoff.reset()
                except RedisError as exc:
                    lost = away = True
                    backoff.wait(exc)
        except Exception as exc:
            self.failure.report("take", exc)
        finally:
            self._leave()
        self.failure.raise_if_failed()

    def _announce(self) -> None:
        """The model this worker serves (its version names the cache) and a first heartbeat, before any
        work is taken: an API that looked the model up earlier would miss the cache."""
        backoff = Backoff(log, self._stopping)
        while True:
            try:
                self.heartbeat.beat()
                self.heartbeat.announce(anyway=True)
                metrics.describe_model(self.classifier)
                return
            except RedisError as exc:
                if backoff.wait(exc):
                    return

    def _rejoin(self) -> None:
        """Beat from the take stage, before it takes again after it was held up (unhealthy, or Redis
        failing): meanwhile the heartbeat may have lapsed and another worker deregistered this one, and
        work taken before the heartbeat thread's next beat would sit where no death watch looks, lost
        if this worker died then."""
        if writes := self.heartbeat.writes():
            self.queue.link.transaction(*writes)

    def _healthy(self) -> bool:
        """Whether the pipeline moves, as the heartbeat says: no thread failed, the take and reply
        stages are not in one step for longer than the heartbeat TTL, and no lane is hung
        (`_lanes_on_time`). A stuck worker stops beating, so the others reclaim its work."""
        now, stuck_s = time.monotonic(), self.settings.heartbeat_ttl_s
        stages = (self.intake.busy_since, self.replies.busy_since)
        if self.failure.failed.is_set() or any(now - since > stuck_s for since in stages if since is not None):
            return False
        return self._lanes_on_time()

    def _lanes_on_time(self) -> bool:
        """False while a lane is hung: in a forward past every deadline of its requests, or longer than
        the request timeout (nobody waits longer, whatever a work item says), and longer than the
        heartbeat TTL (bulk work is never late: its forward may start past its items' deadlines)."""
        now, ttl_s, timeout_s = time.time(), self.settings.heartbeat_ttl_s, self.settings.request_timeout_s
        return all(
            now < max(min(max(t.deadline for t in forward.texts), started + timeout_s), started + ttl_s)
            for forward, started in list(self.lanes.running.values())
        )

    def _leave(self) -> None:
        """Let the lanes finish their forwards, write every result, hand back the rest and deregister;
        with Redis down, the work is left to the reclaim."""
        self._stopping.set()
        self.window.close()
        self.lanes.join()
        self.replies.close()
        self.heartbeat.stop()
        try:
            returned = self.queue.give_back()
            self.redis.delete(self.keys.heartbeat(self.id))
            self.redis.srem(self.keys.workers, self.id)
            log.info("worker %s stopped; handed back %d unfinished items", self.id, returned)
        except RedisError as exc:
            log.warning(
                "worker %s stopped without deregistering (%s): its work will be reclaimed", self.id, describe(exc)
            )
        status = self.status
        if status.batches:
            log.info(
                "%d forwards, %d requests, %d texts (mean %.1f texts a forward, largest %d requests), %d expired",
                status.batches,
                status.requests,
                status.texts,
                status.texts / status.batches,
                status.largest_batch_requests,
                status.expired,
            )
