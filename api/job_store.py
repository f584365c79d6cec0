"""Bulk jobs as the API sees them: RQ calls in, plain JSON-ready views out (no torch here).

RQ holds the lifecycle; this module only enqueues (by function name), reads, and cancels. Reading
a started job also runs RQ's abandoned-job cleanup, so a job whose worker died turns `queued`
(retried) or `failed` even when no jobs worker is left to notice.
"""

from __future__ import annotations

import re
from typing import Any

from redis import Redis
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.results import Result
from rq.utils import now, utcformat

from api.errors import ErrorType, ServiceError
from batcher.job_spec import JOB_FUNC, JOB_TIMEOUT_S, RETRY, SERIALIZER, jobs_queue, progress
from batcher.protocol import new_id
from sentiment.settings import Settings

JOB_ID = re.compile(r"[0-9a-f]{32}")  # what `new_id` makes; anything else cannot exist
ENDED = {"finished", "failed", "canceled"}
# RQ's finer states, as the five this API promises.
STATUS = {
    JobStatus.STARTED: "started", JobStatus.FINISHED: "finished", JobStatus.FAILED: "failed",
    JobStatus.CANCELED: "canceled", JobStatus.STOPPED: "canceled",
}  # everything else (created, queued, scheduled, deferred, ...) waits to run: "queued"


class JobStore:
    """Create, read and cancel bulk jobs on the RQ queue named in settings."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.queue = jobs_queue(redis, settings)
        self.ttl_s = settings.job_ttl_s

    def create(self, texts: list[str]) -> str:
        """Queue a job for `texts`; returns its (unguessable) id."""
        job = self.queue.enqueue_call(
            JOB_FUNC, args=(texts,), job_id=new_id(), description=f"classify {len(texts)} texts",
            meta=progress(0, len(texts)), retry=RETRY, timeout=JOB_TIMEOUT_S,
            ttl=self.ttl_s, result_ttl=self.ttl_s, failure_ttl=self.ttl_s,
        )
        return job.id

    def view(self, job_id: str) -> dict[str, Any]:
        """The job's status, progress and times; its predictions once finished, its error once failed."""
        job = self._fetch(job_id)
        if job.get_status() == JobStatus.STARTED:
            self.queue.started_job_registry.cleanup()  # is its worker gone? (cheap: one ZRANGEBYSCORE)
            job = self._fetch(job_id)
        status = STATUS.get(job.get_status(refresh=False), "queued")
        meta = job.get_meta(refresh=False)
        view: dict[str, Any] = {
            "job_id": job.id,
            "status": status,
            "progress": progress(meta.get("done", 0), meta.get("total", 0)),
            "created_at": job.created_at,
            "started_at": job.started_at if status != "queued" else None,
            "ended_at": job.ended_at if status in ENDED else None,
        }
        if status == "finished":
            view["predictions"] = job.return_value()
        elif status == "failed":
            view["error"] = failure_message(job.latest_result())
        return view

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or started job (a started one stops at its next chunk); 409 once it ended otherwise."""
        job = self._fetch(job_id)
        status = STATUS.get(job.get_status(), "queued")
        if status in ("finished", "failed"):
            raise ServiceError(ErrorType.CONFLICT, f"job {job_id} already {status}; there is nothing to cancel")
        if status != "canceled":
            try:
                job.cancel()
            except InvalidJobOperation:
                pass  # canceled by someone else meanwhile
            job.ended_at = now()
            with self.redis.pipeline() as pipe:
                pipe.hset(job.key, "ended_at", utcformat(job.ended_at))
                job.cleanup(ttl=self.ttl_s, pipeline=pipe)  # a canceled job expires like any other
                pipe.execute()
        return self.view(job_id)

    def _fetch(self, job_id: str) -> Job:
        if JOB_ID.fullmatch(job_id):
            try:
                return Job.fetch(job_id, connection=self.redis, serializer=SERIALIZER)
            except NoSuchJobError:
                pass
        raise ServiceError(ErrorType.NOT_FOUND, f"no job {job_id} (unknown, or expired)")


def failure_message(result: Result | None) -> str:
    """Why a job failed, in one line: never a traceback."""
    exc = (result.exc_string or "") if result is not None else ""
    if "AbandonedJobError" in exc:
        return "the jobs worker running this job stopped (killed or lost) and no retries were left"
    if result is not None and result.type == Result.Type.MAX_RETRIES_EXCEEDED:
        return "gave up after the maximum number of retries"
    lines = [line.strip() for line in exc.splitlines() if line.strip()]
    return lines[-1] if lines else "the job failed"
