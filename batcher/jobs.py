"""The bulk-jobs worker: an RQ worker that loads the model once and runs jobs in its own process.

`classify` is the job: it runs the texts through the shared cache-aware `Inference.predict` chunk
by chunk, saving progress in the job's meta and checking for cancellation between chunks. RQ owns
the rest of the lifecycle (queue, status, result TTL, retries, failed registry).

A `SimpleWorker` never forks, so the loaded model serves every job; but it has no parent process
to heartbeat the running job, so `JobsWorker` does that from a thread. The heartbeat keeps the
job's entry in RQ's started registry alive for `heartbeat_ttl_s`: when the process is killed the
entry lapses, and the next registry cleanup (any jobs worker's maintenance, or the API reading the
job) retries the job, or fails it once its retries are spent.

Webhooks (`batcher.webhooks`) go out from a thread of this process: a job that ends here makes its
webhook due at once.

RQ's worker rides out a Redis outage only while it waits for a job; one met while it runs a job (or
between jobs) ends its loop. `serve_jobs` then starts a fresh worker, backing off until Redis answers;
the job that was running is left to the abandoned-job handling above, like a killed worker's.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from contextlib import AbstractContextManager, nullcontext
from types import FrameType
from typing import Any

from opentelemetry.trace import Span
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker, get_current_job
from rq.job import Job, JobStatus
from rq.worker import WorkerStatus as RQWorkerStatus  # (not core.protocol's WorkerStatus, a heartbeat)

from batcher import metrics, webhooks
from batcher.heartbeat import Beating
from batcher.inference import Inference
from core import tracing
from core.job_spec import CHUNKS_PER_BATCH, SERIALIZER, jobs_queue, progress
from core.protocol import Keys, Prediction
from core.redis_connect import sync_client
from core.redis_errors import Backoff, describe
from core.settings import Settings
from core.webhooks import look_now
from model_store.classifier import Classifier

log = logging.getLogger(__name__)

_inference: Inference | None = None  # set once per process by `serve_jobs`, used by every job


class JobCanceled(Exception):
    """The job was canceled (DELETE /jobs/{id}) while it ran; it stops at a chunk boundary."""


def classify(texts: list[str]) -> list[Prediction]:
    """The RQ job: predictions for `texts`, in input order."""
    if _inference is None:
        raise RuntimeError("no model loaded in this process: run jobs with `sentiment jobs-worker`")
    job = get_current_job()
    chunk = _inference.policy.max_texts * CHUNKS_PER_BATCH
    predictions: list[Prediction] = []
    for start in range(0, len(texts), chunk):
        _stop_if_canceled(job)
        with (
            metrics.busy(),
            _chunk_span(job, start, len(texts[start : start + chunk])) if tracing.enabled else tracing.OFF,
        ):
            predictions += _inference.predict(texts[start : start + chunk])
        if job is not None:
            job.meta.update(progress(len(predictions), len(texts)))
            job.save_meta()
    _stop_if_canceled(job)  # a cancel during the last chunk must not turn into "finished"
    return predictions


def _chunk_span(job: Job | None, start: int, texts: int) -> AbstractContextManager[Span]:
    """A chunk's span (tracing on): which job, from which text, how many."""
    attributes: dict[str, str | int] = {
        "sentiment.job": job.id if job is not None else "",
        "sentiment.start": start,
        "sentiment.texts": texts,
    }
    return tracing.tracer.start_as_current_span("jobs.chunk", attributes=attributes)


def _stop_if_canceled(job: Job | None) -> None:
    if job is not None and job.get_status(refresh=True) == JobStatus.CANCELED:
        raise JobCanceled(job.id)


class JobsWorker(SimpleWorker):
    """Runs jobs in this process (model loaded once), heartbeating each run from a thread."""

    max_connection_wait_time = 2.0  # RQ's reconnect backoff while waiting for a job stops here, not at a minute

    def __init__(self, *args: Any, heartbeat_ttl_s: float, keys: Keys, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.job_heartbeat_ttl = max(2, math.ceil(heartbeat_ttl_s))
        self.keys = keys
        self.told_to_stop = False  # by SIGTERM or SIGINT: `serve_jobs` starts no fresh worker after this one
        self.drained = False  # the last look at the queue found it empty (how burst mode ends)

    def work(self, *args: Any, **kwargs: Any) -> bool:
        """RQ's loop; its pubsub thread is stopped however the loop ends (RQ's teardown skips that when
        Redis is down, and every lost worker would leave one behind)."""
        try:
            return super().work(*args, **kwargs)
        finally:
            if self.pubsub_thread is not None:
                self.pubsub_thread.stop()

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """Noted before RQ's own handling, which writes to Redis: a stop asked for during an outage still stops."""
        self.told_to_stop = True
        super().request_stop(signum, frame)

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        found = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        self.drained = found is None
        return found

    def _set_ip_address(self, connection: Redis) -> None:
        """RQ records its client address for display only: a server whose CLIENT INFO reply redis-py
        cannot parse (fakeredis, under `sentiment serve` without redis-server) must not stop us."""
        try:
            super()._set_ip_address(connection)
        except ValueError:
            self.ip_address = "unknown"

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """Short: a killed worker's job is seen as abandoned this long after its last beat."""
        return self.job_heartbeat_ttl

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)

        def beat() -> None:
            try:
                self.maintain_heartbeats(job, execution)
            except Exception:  # a missed beat is survivable; the next one may work
                log.warning("job %s heartbeat failed", job.id, exc_info=True)

        with Beating(f"heartbeat-{job.id}", self.job_heartbeat_ttl / 3, beat):
            self.perform_job(job, queue, execution)
        self.set_state(RQWorkerStatus.IDLE)
        try:
            # Ended here (not retried): its webhook goes now. (A canceled job's went when the API canceled it.)
            if job.get_status(refresh=True) in (JobStatus.FINISHED, JobStatus.FAILED):
                look_now(self.connection, self.keys, job.id)
        except RedisError as exc:  # its webhook's periodic look finds the job ended
            log.warning("job %s ended, its webhook not told (%s)", job.id, describe(exc))

    def handle_exception(self, job: Job, *exc_info: object) -> None:
        if isinstance(exc_info[1], JobCanceled):
            log.info("job %s canceled; stopped at a chunk boundary", job.id)
            return
        super().handle_exception(job, *exc_info)

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry=None, exc_string="", execution=None):
        """A canceled job stays canceled: no retry, no failed registry; only its execution is dropped."""
        if job.get_status(refresh=True) != JobStatus.CANCELED:
            return super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)
        with self.connection.pipeline() as pipeline:
            self.cleanup_execution(job, pipeline=pipeline, execution=execution)
            pipeline.execute()
        return None


def serve_jobs(settings: Settings, inference: Inference, redis: Redis, burst: bool = False) -> bool:
    """Run jobs with `inference` until stopped (or, in burst mode, until the queue is empty); True if any ran.

    A worker whose loop ends otherwise met an error it does not survive, such as Redis failing mid-job
    (RQ logs it): a fresh one takes over, with backoff.
    """
    global _inference
    _inference = inference
    tracing.setup("sentiment-jobs-worker")
    sending = (
        Beating("webhooks", webhooks.LOOK_S, webhooks.Sender(settings, redis).tick)
        if settings.webhook_secrets
        else nullcontext()
    )
    with sending:
        return _serve(settings, redis, burst)


def _serve(settings: Settings, redis: Redis, burst: bool) -> bool:
    """`serve_jobs`' loop: a fresh RQ worker each time one stops unasked."""
    period = max(1, math.ceil(settings.heartbeat_ttl_s))
    stop_asked = threading.Event()
    worked, backoff = False, Backoff(log, stop_asked)
    while True:
        worker: JobsWorker | None = None
        why = "RQ logged the error above"
        try:
            worker = JobsWorker(
                [jobs_queue(redis, settings)],
                connection=redis,
                serializer=SERIALIZER,
                heartbeat_ttl_s=settings.heartbeat_ttl_s,
                keys=Keys(settings.key_prefix),
                # Look for abandoned jobs about as often as a heartbeat lapses; block on the queue no longer.
                maintenance_interval=period,
                worker_ttl=period + 16,
                log_job_description=False,
            )
            worked = worker.work(burst=burst, logging_level=settings.log_level.upper()) or worked
        except RedisError as exc:  # down, or refusing commands: either way, wait and try again
            why = describe(exc)
        if worker is not None and (worker.told_to_stop or worker.drained):
            return worked
        log.warning("jobs worker stopped unasked (%s); a fresh one in %.1f s", why, backoff.delay)
        _stop_on_signal(stop_asked)
        if backoff.pause():
            return worked


def _stop_on_signal(asked: threading.Event) -> None:
    """Set `asked` on SIGTERM or SIGINT while waiting before the next worker. Until the next worker
    installs RQ's handlers there is no job to wind down, so a stop is a stop at once."""
    if threading.current_thread() is threading.main_thread():  # (tests run workers in threads)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: asked.set())


PRIORITIES = ("idle", "low", "normal")


def lower_priority(priority: str) -> None:
    """Let /predict's worker have the CPU first.

    `idle`: Linux's SCHED_IDLE class, which runs only on CPU time nobody else wants and is preempted
    at once when the /predict worker wakes; `low`: nice 19; `normal`: compete as equals.
    """
    if priority == "idle" and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif priority in ("idle", "low"):
        os.nice(19)


def run(settings: Settings, classifier: Classifier) -> None:
    """`sentiment jobs-worker`, once `lower_priority` ran and the model loaded: serve jobs."""
    metrics.describe_model(classifier)
    metrics.serve(settings.jobs_metrics_port)
    redis = sync_client(settings.redis_url, socket_connect_timeout=2)
    serve_jobs(settings, Inference.for_jobs(settings, classifier, redis), redis)
