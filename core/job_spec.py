"""What the API and the jobs worker agree on about bulk jobs (RQ), without importing torch.

The API enqueues `JOB_FUNC` by name, so it never imports the model code; both sides build their
queue here so they use the same name and serializer. JSON, not pickle: the API only ever reads
data (texts in, predictions out), and nothing a client sends is unpickled. A job's status document
is made here too: GET /jobs/{id} answers it, and its webhook (`batcher.webhooks`) posts it.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any

from redis import Redis
from redis.exceptions import WatchError
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import record_job_failure
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import as_text, current_timestamp, now, parse_composite_key

from core.settings import Settings

JOB_FUNC = "batcher.jobs.classify"  # resolved by the worker only
SERIALIZER = JSONSerializer
# Runs after the first: a worker killed mid-job (abandoned job) or a failed run is tried again, and
# the retry reads back from the cache whatever the earlier runs computed.
RETRY = Retry(max=2)
JOB_TIMEOUT_S = 3600  # a run past this is stopped (and retried, then failed): a hang, not a big job
BATCHES_PER_PART = 4  # a progress update (and cancel check) every this many full batches
ENDED = {"finished", "failed", "canceled"}
# RQ's finer states, as the five this API promises.
JOB_STATUS = {
    JobStatus.STARTED: "started",
    JobStatus.FINISHED: "finished",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELED: "canceled",
    JobStatus.STOPPED: "canceled",
}  # everything else (created, queued, scheduled, deferred, ...) waits to run: "queued"


def jobs_queue(redis: Redis, settings: Settings) -> Queue:
    """The RQ queue of bulk jobs, as both the API and the jobs worker see it."""
    return Queue(settings.jobs_queue, connection=redis, serializer=SERIALIZER)


def reap_abandoned(queue: Queue) -> None:
    """RQ's abandoned-job cleanup (`StartedJobRegistry.cleanup`): each job whose heartbeat lapsed (its
    worker killed or lost) is retried, or failed once its retries are spent; but each in a transaction
    that WATCHes the job and finds it still `started` and its lapsed entry still there. RQ's looks, then
    writes blindly: a DELETE landing in between was undone (the canceled job queued again, and run),
    and two cleanups at once (the API's, a jobs worker's) queued the job twice."""
    registry, connection = queue.started_job_registry, queue.connection
    lapsed: list[bytes] = connection.zrangebyscore(registry.key, 0, current_timestamp())  # type: ignore[assignment]
    for entry in map(as_text, lapsed):
        job_id, _ = parse_composite_key(entry)
        with connection.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(Job.key_for(job_id))
                    status, still = pipe.hget(Job.key_for(job_id), "status"), pipe.zscore(registry.key, entry)
                    job = None
                    if status is not None and still is not None and as_text(status) == JobStatus.STARTED:
                        with suppress(NoSuchJobError):  # deleted since the look: the WATCH fails, the next look says so
                            job = Job.fetch(job_id, connection=connection, serializer=queue.serializer)
                    pipe.multi()
                    pipe.zrem(registry.key, entry)
                    if job is not None and job.retries_left:
                        job.retry(queue, pipe)
                    elif job is not None:
                        job.ended_at = now()  # (RQ's leaves it unset: a `failed` job that never ended)
                        record_job_failure(
                            job, f"Moved to FailedJobRegistry, due to AbandonedJobError, at {now()}", pipe
                        )
                    pipe.execute()
                    break
                except WatchError:
                    pipe.reset()


def progress(done: int, total: int) -> dict[str, Any]:
    """The job's `meta`: how many of its texts have predictions so far."""
    return {"done": done, "total": total}


def status_document(job: Job) -> dict[str, Any]:
    """The job's status, progress and times; its predictions once finished, its error once failed
    (GET /jobs/{id}'s answer, and the body of its webhook)."""
    status = JOB_STATUS.get(job.get_status(refresh=False), "queued")
    meta = job.get_meta(refresh=False)
    document: dict[str, Any] = {
        "job_id": job.id,
        "status": status,
        "progress": progress(meta.get("done", 0), meta.get("total", 0)),
        "created_at": job.created_at,
        "started_at": job.started_at if status != "queued" else None,
        "ended_at": job.ended_at if status in ENDED else None,
    }
    if status == "finished":
        document["predictions"] = job.return_value()
    elif status == "failed":
        document["error"] = failure_message(job.latest_result())
    return document


def failure_message(result: Result | None) -> str:
    """Why a job failed, in one line: never a traceback."""
    exc = (result.exc_string or "") if result is not None else ""
    if "AbandonedJobError" in exc:
        return "the jobs worker running this job stopped (killed or lost) and no retries were left"
    if result is not None and result.type == Result.Type.MAX_RETRIES_EXCEEDED:
        return "gave up after the maximum number of retries"
    lines = [line.strip() for line in exc.splitlines() if line.strip()]
    return lines[-1] if lines else "the job failed"
