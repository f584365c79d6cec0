"""What the API and the jobs worker agree on about bulk jobs (RQ), without importing torch.

The API enqueues `JOB_FUNC` by name, so it never imports the model code; both sides build their
queue here so they use the same name and serializer. JSON, not pickle: the API only ever reads
data (texts in, predictions out), and nothing a client sends is unpickled. A job's status document
is made here too: GET /jobs/{id} answers it, and its webhook (`batcher.webhooks`) posts it.
"""

from __future__ import annotations

from typing import Any

from redis import Redis
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer

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
