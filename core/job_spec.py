"""What the API and the jobs worker agree on about bulk jobs (RQ), without importing torch.

The API enqueues `JOB_FUNC` by name, so it never imports the model code; both sides build their
queue here so they use the same name and serializer. JSON, not pickle: the API only ever reads
data (texts in, predictions out), and nothing a client sends is unpickled.
"""

from __future__ import annotations

from typing import Any

from redis import Redis
from rq import Queue, Retry
from rq.serializers import JSONSerializer

from core.settings import Settings

JOB_FUNC = "batcher.jobs.classify"  # resolved by the worker only
SERIALIZER = JSONSerializer
# Runs after the first: a worker killed mid-job (abandoned job) or a failed run is tried again, and
# the retry reads back from the cache whatever the earlier runs computed.
RETRY = Retry(max=2)
JOB_TIMEOUT_S = 3600  # a run past this is stopped (and retried, then failed): a hang, not a big job
CHUNKS_PER_BATCH = 4  # a progress update (and cancel check) every this many full batches


def jobs_queue(redis: Redis, settings: Settings) -> Queue:
    """The RQ queue of bulk jobs, as both the API and the jobs worker see it."""
    return Queue(settings.jobs_queue, connection=redis, serializer=SERIALIZER)


def progress(done: int, total: int) -> dict[str, Any]:
    """The job's `meta`: how many of its texts have predictions so far."""
    return {"done": done, "total": total}
