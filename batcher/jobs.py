"""The bulk-jobs worker: an RQ worker that runs jobs through the model workers' pipeline.

`classify` is the job: it sends the texts part by part to the model workers as bulk work
(`batcher.bulk`: no model, no torch in this process), each part sent while the one before it is
computed (so the workers never wait for the next), saving progress in the job's meta and checking
for cancellation between parts, so a canceled job queues no further part, and takes back what it
queued that no model worker took (`Bulk.withdraw`, as an interrupted or failed one does). RQ owns the
rest of the lifecycle (queue, status, result TTL, retries, failed registry).

The API cancels or deletes a job whenever asked (`api.job_store`), also while this worker takes,
starts, runs or ends it. So the worker writes a job's hash only in a transaction that WATCHes it and
finds it neither canceled nor deleted (`_write_running`): at the start, at each part boundary and
with the outcome. A job canceled or deleted before one of those points stops there (`JobCanceled`):
it never starts, or runs no further part, or its outcome is dropped; only its execution is cleaned
up. RQ's own versions of those steps write blindly: a canceled job would turn `started` again and
end `finished`, a deleted one would come back as a hash of a few fields that never expires, and a
read of a hash that went (`InvalidJobOperation`) would end RQ's worker loop.

A `SimpleWorker` never forks, so one reply subscription serves every job; but it has no parent process
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
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from opentelemetry.trace import Span
from redis import Redis
from redis.client import Pipeline, PubSub, PubSubWorkerThread
from redis.exceptions import OutOfMemoryError, RedisError, WatchError
from rq import Queue, SimpleWorker, get_current_job, worker_registration
from rq.exceptions import StopRequested
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.utils import as_text, now
from rq.worker import WorkerStatus as RQWorkerStatus  # (not core.protocol's WorkerStatus, a heartbeat)

from batcher import metrics, webhooks
from batcher.bulk import Bulk, BulkFailed, BulkStopped, Part, TooLong
from batcher.periodic import Periodic
from batcher.thread_failure import ThreadFailure
from core import tracing
from core.job_spec import BATCHES_PER_PART, SERIALIZER, jobs_queue, progress, reap_abandoned
from core.protocol import Keys, Prediction
from core.redis_connect import sync_client
from core.redis_errors import Backoff, describe
from core.settings import Settings
from core.webhooks import look_now

log = logging.getLogger(__name__)

DEQUEUE_WAIT_S = 2  # longest one wait for a job blocks
ROOM_SLACK_B = 64 * 1024  # the room a job's failure needs beside its empty data, and what others write meanwhile
FAILED_STOP_S = 30.0  # a jobs worker whose webhook thread failed may finish its job this long (else it is retried)


@dataclass(frozen=True)
class Context:
    """What a job needs from the process that runs it: its way to the model workers, and the stop
    signal (set, the running job stops at its next part, a wait for a job ends and no fresh worker
    starts). `serve_jobs` makes one a process, and its workers hand it to each job they run
    (`running`): RQ calls a job with its arguments alone."""

    bulk: Bulk
    stopping: threading.Event = field(default_factory=threading.Event)


_running: ContextVar[Context] = ContextVar("jobs_context")


@contextmanager
def running(context: Context) -> Iterator[None]:
    """`context` for the jobs run inside this block (`classify` reads it)."""
    token = _running.set(context)
    try:
        yield
    finally:
        _running.reset(token)


class JobInterrupted(Exception):
    """This worker was told to stop (SIGTERM, serve's Ctrl-C) while the job ran: it stops at its next
    part and goes back to the front of its queue, its retries untouched, for the next jobs worker
    (the parts done are in the cache, so it resumes at about where it stopped)."""


class ResultsTooLarge(Exception):
    """Redis, full of what it may not evict (OOM), refused the job's finish: its predictions do not fit.
    Final: it fails with this reason, its texts given up to make room for the failure (`_make_room`);
    a retry would compute them again to the same end."""


class JobCanceled(Exception):
    """The job was canceled or deleted (DELETE /jobs/{id}) before it started, while it ran, or as it
    ended: it stops there, and its execution is all this worker cleans up."""


def classify(texts: list[str]) -> list[Prediction]:
    """The RQ job: predictions for `texts`, in input order."""
    context = _running.get(None)
    if context is None:
        raise RuntimeError("no way to the model workers in this process: run jobs with `sentiment jobs-worker`")
    try:
        return _classify(context, get_current_job(), texts)
    except (JobCanceled, JobInterrupted, BulkFailed):  # (not a Redis error: a silent peer would hold it up)
        context.bulk.withdraw()
        raise
    finally:
        context.bulk.close()


def _classify(context: Context, job: Job | None, texts: list[str]) -> list[Prediction]:
    """`classify`, part by part, each sent before the last is waited for."""
    bulk = context.bulk
    size = bulk.item_texts * BATCHES_PER_PART
    predictions: list[Prediction] = []
    ahead: Part | None = None  # sent, not yet waited for: the workers compute it while the next one is sent
    for start in range(0, len(texts), size):
        _stop_if_canceled(job)
        if context.stopping.is_set():
            raise JobInterrupted(f"stopped after {len(predictions)} of {len(texts)} texts")
        with _part_span(job, start, len(texts[start : start + size])) if tracing.enabled else tracing.OFF:
            sent = bulk.send(texts[start : start + size])
        if ahead is not None:
            predictions += _received(context, job, ahead, len(predictions), texts)
            _save_progress(job, len(predictions), len(texts))
        ahead = sent
    if ahead is not None:
        _stop_if_canceled(job)  # a cancel meanwhile: the last part is not waited for
        predictions += _received(context, job, ahead, len(predictions), texts)
        _save_progress(job, len(predictions), len(texts))
    _stop_if_canceled(job)  # a cancel during the last part stops it too
    return predictions


def _received(context: Context, job: Job | None, part: Part, done: int, texts: list[str]) -> list[Prediction]:
    """`part`'s predictions; JobInterrupted if this worker is told to stop while it waits for them,
    JobCanceled if the job was canceled or deleted by the time its texts would be queued again (past
    their deadline: a busy service, or none), and BulkFailed naming the job's texts the model refused
    as too long."""
    try:
        return context.bulk.receive(part, context.stopping, lambda: _stop_if_canceled(job))
    except BulkStopped:
        raise JobInterrupted(f"stopped after {done} of {len(texts)} texts") from None
    except TooLong as refused:
        raise refused.named(texts) from None


def _stop_if_canceled(job: Job | None) -> None:
    """A part boundary: JobCanceled when the job was canceled or deleted since the last."""
    if job is not None:
        _raise_if_gone(job.connection.hget(job.key, "status"), "while it ran")


def _save_progress(job: Job | None, done: int, total: int) -> None:
    """The texts done so far, in the job's meta: also a canceled job's (how far it got), never a deleted one's.
    Never fewer than an earlier run of the job saved: a retry reads those parts back from the cache, and
    progress that went back would tell a poller the job lost them."""
    if job is not None:
        job.meta.update(progress(max(done, job.meta.get("done", 0)), total))
        meta = job.serializer.dumps(job.meta)
        _write_running(job, lambda pipe: pipe.hset(job.key, "meta", meta), "while it ran", canceled_too=True)


def _write_running(job: Job, write: Callable[[Pipeline], object], when: str, canceled_too: bool = False) -> None:
    """`write` the job, in one transaction with a look at its hash (WATCHed: a change meanwhile means a
    fresh look), unless it was deleted or (unless `canceled_too`) canceled: then JobCanceled."""
    with job.connection.pipeline() as pipe:
        while True:
            try:
                pipe.watch(job.key)
                _raise_if_gone(pipe.hget(job.key, "status"), when, canceled_too)
                pipe.multi()
                write(pipe)
                pipe.execute()
                return
            except WatchError:
                continue


def _raise_if_gone(status: bytes | str | None, when: str, canceled_too: bool = False) -> None:
    """JobCanceled, saying what happened `when`, for a job whose hash reads `status`."""
    if status is None:  # the hash went (or is a stray field of a heartbeat, about to go)
        raise JobCanceled(f"deleted {when}")
    if not canceled_too and JobStatus(as_text(status)) in (JobStatus.CANCELED, JobStatus.STOPPED):
        raise JobCanceled(f"canceled {when}")


def _part_span(job: Job | None, start: int, texts: int) -> AbstractContextManager[Span]:
    """A part's span (tracing on): which job, from which text, how many."""
    attributes: dict[str, str | int] = {
        "sentiment.job": job.id if job is not None else "",
        "sentiment.start": start,
        "sentiment.texts": texts,
    }
    return tracing.tracer.start_as_current_span("jobs.part", attributes=attributes)


class RoutineMaintenance(logging.Filter):
    """RQ's worker logs its registry cleaning at INFO every maintenance interval (here about a
    heartbeat TTL), two lines every ~10 s of an idle `serve`: routine, so DEBUG here."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and str(record.msg).startswith("Worker %s: cleaning "):
            record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


QUIET_MAINTENANCE = RoutineMaintenance()


class JobsWorker(SimpleWorker):
    """Runs jobs in this process, heartbeating each run from a thread."""

    max_connection_wait_time = 2.0  # RQ's reconnect backoff while waiting for a job stops here, not at a minute

    def __init__(
        self, *args: Any, context: Context, heartbeat_ttl_s: float, redis_timeout_s: float, keys: Keys, **kwargs: Any
    ) -> None:
        self.context = context  # what each job it runs is handed (`running`)
        self.redis_timeout_s = redis_timeout_s  # (before RQ's constructor, which reads `connection_timeout`)
        super().__init__(*args, **kwargs)
        self.log.addFilter(QUIET_MAINTENANCE)  # (once: a logger keeps one copy of a filter)
        self.job_heartbeat_ttl = max(2, math.ceil(heartbeat_ttl_s))
        self.keys = keys
        self.waiting = False  # in RQ's wait for a job (`dequeue_job_and_maintain_ttl`)
        self.drained = False  # the last look at the queue found it empty (how burst mode ends)
        self.dropped: str | None = None  # the last job said to be dropped (canceled or deleted)
        self.interrupted: str | None = None  # the last job stopped by `request_stop`, to requeue
        self.refused: str | None = None  # the last job whose texts the model refused (`TooLong`): no retry
        self.too_large: tuple[str, str] | None = None  # the last job whose results Redis refused, and why

    @property
    def dequeue_timeout(self) -> int:
        """How long one wait for a job blocks (BLPOP): short, so that the read timeout of its connection,
        which RQ sets from it, notices a silent Redis within seconds (RQ's own: the worker TTL - 15 s)."""
        return DEQUEUE_WAIT_S

    @property
    def connection_timeout(self) -> int:
        """The socket timeout RQ gives the worker's connections: a blocking wait plus the Redis timeout."""
        return self.dequeue_timeout + math.ceil(self.redis_timeout_s)

    def work(self, *args: Any, **kwargs: Any) -> bool:
        """RQ's loop; its pubsub thread is stopped however the loop ends (RQ's teardown skips that when
        Redis is down, and every lost worker would leave one behind)."""
        try:
            return super().work(*args, **kwargs)
        finally:
            if self.pubsub_thread is not None:
                self.pubsub_thread.stop()

    def _pubsub_exception_handler(self, exc: Exception, pubsub: PubSub, pubsub_thread: PubSubWorkerThread) -> None:
        """RQ's, but quiet once the thread was told to stop: RQ closes the subscription's connection
        while the thread may still be reading it, and every end of a worker loop printed a traceback."""
        if not pubsub_thread._running.is_set():  # (redis-py's flag; the thread's loop then ends)
            return
        super()._pubsub_exception_handler(exc, pubsub, pubsub_thread)

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """Noted before RQ's own handling, which writes to Redis: a stop asked for during an outage still
        stops. The running job is this process's own (`executions`): RQ's `get_current_job_id` reads
        Redis when idle, and in a signal handler its error would replace the stop."""
        self.context.stopping.set()
        if running := next(iter(self.executions.values()), None):
            log.info("stopping: job %s stops at its next part, back at the front of its queue", running.job_id)
        super().request_stop(signum, frame)

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        self.waiting = True
        try:
            found = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        finally:
            self.waiting = False
        self.drained = found is None
        return found

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        """RQ's, but a stop asked for while waiting for a job ends the wait here. RQ's stop is the
        StopRequested its signal handler raises wherever the main thread is; raised inside a log call,
        logging swallows it, and RQ's wait retries a lost Redis for ever (this heartbeat every turn)."""
        if self.waiting and self.context.stopping.is_set():
            raise StopRequested
        super().heartbeat(timeout, pipeline)

    def _set_ip_address(self, connection: Redis) -> None:
        """RQ records its client address for display only: a server whose CLIENT INFO reply redis-py
        cannot parse (fakeredis, under `sentiment serve` without redis-server) must not stop us."""
        try:
            super()._set_ip_address(connection)
        except ValueError:
            self.ip_address = "unknown"

    def clean_registries(self) -> None:
        """RQ's maintenance, its abandoned-job cleanup `reap_abandoned`'s (RQ's writes blindly: a job
        canceled or deleted as it looked would be queued again, and run)."""
        for queue in self.queues:
            if queue.acquire_maintenance_lock():  # one jobs worker at a time
                self.log.debug("Worker %s: cleaning registries for queue: %s", self.name, queue.name)
                reap_abandoned(queue)
                for registry in (
                    queue.finished_job_registry,
                    queue.failed_job_registry,
                    queue.deferred_job_registry,
                    queue.ready_job_registry,
                ):
                    registry.cleanup()
                worker_registration.clean_worker_registry(queue)
                queue.intermediate_queue.cleanup(self, queue)
                queue.release_maintenance_lock()
        self.last_cleaned_at = now()  # type: ignore[assignment]  # (RQ's annotation: None only)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """Short: a killed worker's job is seen as abandoned this long after its last beat."""
        return self.job_heartbeat_ttl

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)

        def beat() -> None:
            try:
                self.maintain_heartbeats(job, execution)
            except RedisError as exc:  # a missed beat is survivable; the next one may work
                log.warning("job %s heartbeat failed (%s)", job.id, describe(exc))
            except Exception:
                log.warning("job %s heartbeat failed", job.id, exc_info=True)

        with Periodic(f"heartbeat-{job.id}", self.job_heartbeat_ttl / 3, beat), running(self.context):
            self.perform_job(job, queue, execution)
        self.set_state(RQWorkerStatus.IDLE)

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        """RQ's start (status `started`, heartbeats, off the intermediate queue), unless the job was
        canceled or deleted after this worker took it off the queue: then it never runs."""
        ttl = self.get_heartbeat_ttl(job)
        taken = Queue(job.origin, connection=self.connection).intermediate_queue_key

        def start(pipe: Pipeline) -> None:
            self.heartbeat(ttl, pipeline=pipe)
            job.heartbeat(now(), ttl, pipeline=pipe)
            job.prepare_for_execution(self.name, pipeline=pipe)
            pipe.persist(job.key)
            if remove_from_intermediate_queue:
                pipe.lrem(taken, 1, job.id)

        try:
            _write_running(job, start, "before it started")
        except JobCanceled:
            if remove_from_intermediate_queue:
                self.connection.lrem(taken, 1, job.id)
            raise

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        """The run's end, in memory only: the outcome's transaction writes the job whole. (RQ writes
        the job's last heartbeat here on its own, which would leave a deleted job a hash behind.)"""
        job.ended_at = job.last_heartbeat = now()

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: Any, execution: Execution) -> None:
        """RQ's success (status `finished`, the result, the finished registry, the expiry), and the
        job's webhook made due, unless the job was canceled or deleted during its last part:
        then JobCanceled, which RQ hands to `handle_job_failure`."""
        ttl = job.get_result_ttl(self.default_result_ttl)

        def finish(pipe: Pipeline) -> None:
            self.increment_successful_job_count(pipeline=pipe)
            self.increment_total_working_time(job.ended_at - job.started_at, pipe)  # type: ignore[operator]
            job._handle_success(
                ttl,
                pipeline=pipe,
                worker_name=self.name,
                execution_id=execution.id,
                execution_started_at=execution.created_at,
                execution_ended_at=job.ended_at,
            )
            job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
            self.cleanup_execution(job, pipeline=pipe, execution=execution)
            look_now(pipe, self.keys, job.id)

        try:
            _write_running(job, finish, "as it finished")
        except OutOfMemoryError as exc:
            # Redis holds the refused transaction's bytes in the buffer of the connection that sent them
            # until it is idle a while; closed, they are freed now, for the failure to fit.
            self.connection.connection_pool.disconnect(inuse_connections=False)
            texts = job.get_meta(refresh=False).get("total", 0)
            raise ResultsTooLarge(
                f"its {texts:,} predictions did not fit in Redis, which is full ({describe(exc)}; nothing left it may "
                "evict): delete ended jobs or raise its maxmemory, then submit it again, or in smaller jobs"
            ) from None

    def handle_exception(self, job: Job, *exc_info: object) -> None:
        if isinstance(exc_info[1], JobCanceled):
            log.info("job %s %s; dropped", job.id, exc_info[1])
            self.dropped = job.id
            return
        if isinstance(exc_info[1], JobInterrupted):
            log.info("job %s %s; back at the front of the queue", job.id, exc_info[1])
            self.interrupted = job.id
            return
        if isinstance(exc_info[1], ResultsTooLarge):
            log.warning("job %s failed: %s", job.id, exc_info[1])
            self.refused, self.too_large = job.id, (job.id, str(exc_info[1]))
            return
        if isinstance(exc_info[1], RedisError):  # down, or refusing (full): no bug, so no traceback
            then = "retried" if job.should_retry else "it fails"
            log.warning("job %s: redis failed while it ran (%s); %s", job.id, describe(exc_info[1]), then)
            return
        if isinstance(exc_info[1], TooLong):
            self.refused = job.id
        super().handle_exception(job, *exc_info)

    def handle_job_failure(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: Any = None,
        exc_string: str = "",
        execution: Execution | None = None,
    ) -> None:
        """RQ's failure (retried while retries are left, else status `failed` with its error and the
        webhook made due; failed at once when the model refused its texts, which no retry changes),
        unless the job was canceled or deleted: then it is neither retried nor failed, only its execution goes."""
        retries_left = job.retries_left  # `job.retry` counts one off: a fresh look (WatchError) starts here again
        if self.too_large is not None and self.too_large[0] == job.id:
            exc_string = self.too_large[1]  # (the one line, not a traceback: it is all the failure there is)
            self._make_room(job)

        def fail(pipe: Pipeline) -> None:
            job.retries_left = retries_left
            if self.interrupted == job.id:  # not a failure: the next worker runs it, no retry spent
                queue._enqueue_job(job, pipeline=pipe, at_front=True)
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
                return
            if job.should_retry and self.refused != job.id:
                job.retry(queue, pipe)
            else:
                job.set_status(JobStatus.FAILED, pipeline=pipe)
                job._handle_failure(
                    exc_string,
                    pipeline=pipe,
                    worker_name=self.name,
                    execution_id=execution.id if execution else None,
                    execution_started_at=execution.created_at if execution else None,
                    execution_ended_at=job.ended_at,
                )
                look_now(pipe, self.keys, job.id)
            self.increment_failed_job_count(pipe)
            self.cleanup_execution(job, pipeline=pipe, execution=execution)

        try:
            self._written_when_room(job, fail)
        except JobCanceled as why:
            if self.dropped != job.id:  # a failure, not the JobCanceled `handle_exception` told of
                log.info("job %s %s; dropped", job.id, why)
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
                pipe.execute()

    def _written_when_room(self, job: Job, write: Callable[[Pipeline], object]) -> None:
        """`write` the job's outcome; while a full Redis refuses it, again with backoff (nothing is
        computed again meanwhile), until memory frees or the worker stops (the job, left started, is
        then the next worker's to run)."""
        backoff = Backoff(log, self.context.stopping)
        while True:
            try:
                _write_running(job, write, "as it failed")
                return
            except OutOfMemoryError as exc:
                if backoff.wait(exc):
                    return

    def _make_room(self, job: Job) -> None:
        """Give up the texts of a job Redis had no room to finish, so that its failure fits: its hash
        keeps an empty argument list in their place (RQ reads one); it is not retried. Outside a
        transaction, which a full Redis refuses whole: HDEL needs no memory and frees what the HSET
        needs; where it would not free enough (others' state fills Redis) the texts stay, and the
        failure waits for room (`_written_when_room`): a job without its data field would read as none."""
        job.args = ([],)
        small = zlib.compress(job.data)
        memory = self.connection.info("memory")
        held = self.connection.memory_usage(job.key, samples=0) or 0  # its hash, texts and all
        if memory.get("maxmemory") and memory["used_memory"] - held + len(small) + ROOM_SLACK_B >= memory["maxmemory"]:
            return
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hdel(job.key, "data")
            pipe.hset(job.key, "data", small)
            pipe.execute(raise_on_error=False)


def serve_jobs(settings: Settings, bulk: Bulk, redis: Redis, burst: bool = False) -> bool:
    """Run jobs through `bulk` until stopped (or, in burst mode, until the queue is empty); True if any ran.

    A worker whose loop ends otherwise met an error it does not survive, such as Redis failing mid-job
    (RQ logs it): a fresh one takes over, with backoff.
    """
    context = Context(bulk)
    tracing.setup("sentiment-jobs-worker")
    # A bug in the webhook thread stops the process as SIGTERM does (the job in hand finishes), then
    # `ThreadFailed` says which thread and why.
    failure = ThreadFailure(lambda: os.kill(os.getpid(), signal.SIGTERM), FAILED_STOP_S)
    sending = (
        Periodic("webhooks", webhooks.DUE_WEBHOOKS_EVERY_S, webhooks.Sender(settings, redis).tick, failure)
        if settings.webhook_secrets
        else Periodic("webhooks", webhooks.UNSENT_SAID_EVERY_S, webhooks.Unsent(settings, redis).tick, failure)
    )
    try:
        with sending:
            worked = _serve(settings, redis, burst, context)
    finally:
        bulk.close()
    failure.raise_if_failed()
    return worked


def _serve(settings: Settings, redis: Redis, burst: bool, context: Context) -> bool:
    """`serve_jobs`' loop: a fresh RQ worker each time one stops unasked."""
    period = max(1, math.ceil(settings.heartbeat_ttl_s))
    worked, backoff = False, Backoff(log, context.stopping)
    while True:
        worker: JobsWorker | None = None
        why = "RQ logged the error above"
        try:
            worker = JobsWorker(
                [jobs_queue(redis, settings)],
                connection=redis,
                serializer=SERIALIZER,
                context=context,
                heartbeat_ttl_s=settings.heartbeat_ttl_s,
                redis_timeout_s=settings.redis_timeout_s,
                keys=Keys(settings.key_prefix),
                # Look for abandoned jobs about as often as a heartbeat lapses; block on the queue no longer.
                maintenance_interval=period,
                worker_ttl=period + 16,
                log_job_description=False,
            )
            worked = worker.work(burst=burst, logging_level=settings.log_level.upper()) or worked
        except RedisError as exc:  # down, or refusing commands: either way, wait and try again
            why = describe(exc)
        if context.stopping.is_set() or (worker is not None and worker.drained):
            return worked
        log.warning("jobs worker stopped unasked (%s); a fresh one in %.1f s", why, backoff.delay)
        redis.connection_pool.disconnect()  # the fresh one reconnects: a silent peer's connections are no use
        context.bulk.close()  # (its subscription too: the next part subscribes again)
        _stop_on_signal(context.stopping)
        if backoff.pause():
            return worked


def _stop_on_signal(asked: threading.Event) -> None:
    """Set `asked` on SIGTERM or SIGINT while waiting before the next worker. Until the next worker
    installs RQ's handlers there is no job to wind down, so a stop is a stop at once."""
    if threading.current_thread() is threading.main_thread():  # (tests run workers in threads)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: asked.set())


def run(settings: Settings) -> None:
    """`sentiment jobs-worker`: serve jobs."""
    metrics.serve(settings.metrics_host, settings.jobs_metrics_port)
    redis = sync_client(settings.redis_url, settings.redis_timeout_s)
    serve_jobs(settings, Bulk(settings, redis), redis)
