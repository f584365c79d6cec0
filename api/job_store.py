"""Bulk jobs as the API sees them: RQ calls in, plain JSON-ready views out (no torch here).

RQ holds the lifecycle; this module only enqueues (by function name), reads, cancels and deletes.
Reading a started job also runs the abandoned-job cleanup (`reap_abandoned`), so a job whose worker died turns
`queued` (retried) or `failed` even when no jobs worker is left to notice.

Only ended jobs expire. Redis evicts keys that have a TTL under memory pressure (`volatile-lru`,
k8s/base/redis.yaml), and a queued job whose hash was evicted would be skipped by the worker and
answer 404: so a job carries no TTL until it finishes, fails or is canceled.

A job created with a callback URL gets its webhook record in the same transaction (`core.webhooks`);
a cancel makes it due at once, and deleting the job drops it with everything else of the job.
"""

from __future__ import annotations

import re
import time
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.results import Result
from rq.utils import as_text, now, utcformat

from api.errors import ErrorType, ServiceError, quote
from core import webhooks
from core.job_spec import (
    ENDED,
    JOB_FUNC,
    JOB_STATUS,
    JOB_TIMEOUT_S,
    RETRY,
    SERIALIZER,
    jobs_queue,
    progress,
    reap_abandoned,
    status_document,
)
from core.protocol import Keys, new_id
from core.settings import Settings

JOB_ID = re.compile(r"[0-9a-f]{32}")  # what `new_id` makes; anything else cannot exist


class JobStore:
    """Create, read, cancel and delete bulk jobs on the RQ queue named in settings."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.queue = jobs_queue(redis, settings)
        self.ttl_s = settings.job_ttl_s
        self.keys = Keys(settings.key_prefix)
        self.webhook_look_s = settings.heartbeat_ttl_s  # how often a job with a webhook is looked at before it ends

    def create(self, texts: list[str], callback_url: str | None = None) -> str:
        """Queue a job for `texts`, and with it its webhook to `callback_url` (checked already); returns
        its (unguessable) id."""
        with self.redis.pipeline() as pipe:
            job = self.queue.enqueue_call(
                JOB_FUNC,
                args=(texts,),
                job_id=new_id(),
                description=f"classify {len(texts)} texts",
                meta=progress(0, len(texts)),
                retry=RETRY,
                timeout=JOB_TIMEOUT_S,
                result_ttl=self.ttl_s,
                failure_ttl=self.ttl_s,  # no `ttl`: see the module's docstring
                pipeline=pipe,
            )
            if callback_url is not None:
                webhooks.watch(pipe, self.keys, job.id, callback_url, time.time() + self.webhook_look_s)
            pipe.execute()
        return job.id

    def view(self, job_id: str) -> dict[str, Any]:
        """The job's status, progress and times; its predictions once finished, its error once failed."""
        job = self._fetch(job_id)
        if job.get_status(refresh=False) == JobStatus.STARTED:
            reap_abandoned(self.queue)  # is its worker gone? (cheap: one ZRANGEBYSCORE)
            job = self._fetch(job_id)
        document = status_document(job)
        # An ended job's result is a second read: a job deleted in between is gone, not finished without
        # predictions; so is one whose result a full Redis evicted (an ended job is cache, as its hash).
        gone = not self.redis.exists(job.key) or (document["status"] == "finished" and document["predictions"] is None)
        if document["status"] in ("finished", "failed") and gone:
            raise _not_found(job_id)
        return document

    def delete(self, job_id: str) -> None:
        """Cancel a queued or started job (a started one stops at its next part boundary); delete an
        ended one with its texts and results.

        The status check and the change are one transaction, WATCHing the job: a job that changes
        meanwhile (it starts or ends, another DELETE lands) makes it fail, and we look again, so a job
        that finishes meanwhile is deleted, never turned `canceled` with its result. The jobs worker
        writes a job only in transactions that look at it the same way (`batcher.jobs`), so a
        canceled job stays canceled and a deleted one stays deleted, whatever its worker was doing.
        """
        job = self._fetch(job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(job.key)
                    status = pipe.hget(job.key, "status")
                    if status is None:  # deleted meanwhile (by another DELETE)
                        raise _not_found(job_id)
                    pipe.multi()
                    if JOB_STATUS.get(JobStatus(as_text(status)), "queued") in ENDED:
                        self._delete(job, pipe)
                    else:
                        self._cancel(job, pipe)
                    pipe.execute()
                    return
                except WatchError:
                    pipe.reset()

    def _cancel(self, job: Job, pipe: Pipeline) -> None:
        """Mark the job canceled, take it off the queue, and let it expire like any ended job.

        RQ's `Job.cancel` also drops a started job's entries in the started registry, fetching each of
        its executions to do so; one whose hash just went (its worker ending it, or a killed worker's,
        expired while RQ's index keeps it a minute longer) fails the cancel (ValueError). Those
        entries go anyway: the worker drops its execution where it stops, and a killed worker's
        entries lapse (RQ's cleanup skips a job that is not `started`).
        """
        job.set_status(JobStatus.CANCELED, pipeline=pipe)
        job.ended_at = now()
        pipe.hset(job.key, "ended_at", utcformat(job.ended_at))
        self.queue.remove(job, pipeline=pipe)
        self.queue.canceled_job_registry.add(job, pipeline=pipe)
        job.cleanup(ttl=self.ttl_s, pipeline=pipe)  # a canceled job expires like any other
        webhooks.look_now(pipe, self.keys, job.id)  # it ended: its webhook goes now

    def _delete(self, job: Job, pipe: Pipeline) -> None:
        """An ended job's keys and registry entries. Not RQ's `Job.delete`: it fetches every execution
        the job's index still names, and fails (ValueError) on one that expired with a killed worker
        while the index keeps it a minute longer."""
        queue = self.queue
        for registry in (queue.finished_job_registry, queue.failed_job_registry, queue.canceled_job_registry):
            registry.remove(job, pipeline=pipe)
        pipe.delete(job.key, Result.get_key(job.id), job.execution_registry.key)
        webhooks.forget(pipe, self.keys, job.id)  # an undelivered webhook holds its document

    def _fetch(self, job_id: str) -> Job:
        if JOB_ID.fullmatch(job_id):
            try:
                return Job.fetch(job_id, connection=self.redis, serializer=SERIALIZER)
            except NoSuchJobError:
                pass
        raise _not_found(job_id)


def _not_found(job_id: str) -> ServiceError:
    """The 404, quoting the id in part: it is any path segment a client sent, up to the server's limit."""
    return ServiceError(ErrorType.NOT_FOUND, f"no job {quote(job_id)} (unknown, or expired)")
