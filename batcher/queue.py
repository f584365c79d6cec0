"""The worker's side of the Redis work list.

Work moves atomically from the shared queue into this worker's processing list and leaves it only
once its result is written, so a worker that dies holds nothing that cannot be reclaimed.
"""

from __future__ import annotations

import logging
import time

from redis import Redis
from redis.client import Pipeline

from batcher.protocol import Keys

log = logging.getLogger(__name__)

BLOCKING_MIN_S = 0.5  # shorter waits poll (see `take`)
POLL_S = 0.0005


class WorkQueue:
    """Take, acknowledge and reclaim work items for one worker."""

    def __init__(self, redis: Redis, keys: Keys, worker_id: str) -> None:
        self.redis = redis
        self.keys = keys
        self.worker_id = worker_id
        self.processing = keys.processing(worker_id)

    def take(self, timeout: float) -> bytes | None:
        """The oldest queued item, moved into our processing list; wait up to `timeout` s (0: no wait)."""
        if timeout >= BLOCKING_MIN_S:
            # BRPOPLPUSH is BLMOVE RIGHT LEFT; fakeredis 2.40's BLMOVE does not block, this one does.
            return self.redis.brpoplpush(self.keys.queue, self.processing, timeout)
        # Redis expires blocking timeouts from its event loop (hz=10: up to 100 ms late), far too
        # coarse for a batching window of a few ms: poll instead, only for such short waits.
        give_up = time.monotonic() + timeout
        while (raw := self.redis.lmove(self.keys.queue, self.processing, "RIGHT", "LEFT")) is None:
            if (remaining := give_up - time.monotonic()) <= 0:
                return None
            time.sleep(min(POLL_S, remaining))
        return raw

    def take_queued(self, most: int) -> list[bytes]:
        """Up to `most` queued items, oldest first, moved into our processing list in one round trip
        (a pipeline of LMOVEs: each move is atomic, so a crash mid-way leaves nothing unreclaimable)."""
        pipe = self.redis.pipeline(transaction=False)
        for _ in range(most):
            pipe.lmove(self.keys.queue, self.processing, "RIGHT", "LEFT")
        return [raw for raw in pipe.execute() if raw is not None]

    def ack(self, raw: bytes, redis: Redis | Pipeline | None = None) -> None:
        """Drop a finished (or expired) item from our processing list; pass a pipeline to batch it."""
        (redis or self.redis).lrem(self.processing, 1, raw)

    def give_back(self) -> int:
        """Return everything this worker holds to the front of the queue (shutdown, lost state)."""
        return self._requeue(self.worker_id)

    def reclaim_dead(self) -> int:
        """Requeue the work of registered workers whose heartbeat has expired; returns items moved."""
        moved = 0
        for raw in self.redis.smembers(self.keys.workers):
            worker_id = raw.decode()
            if worker_id != self.worker_id and not self.redis.exists(self.keys.heartbeat(worker_id)):
                count = self._requeue(worker_id)
                self.redis.srem(self.keys.workers, worker_id)
                log.warning("reclaimed %d work items from dead worker %s", count, worker_id)
                moved += count
        return moved

    def _requeue(self, worker_id: str) -> int:
        # Newest first onto the consuming end: the oldest item ends up first in line again.
        count = 0
        while self.redis.lmove(self.keys.processing(worker_id), self.keys.queue, "LEFT", "RIGHT") is not None:
            count += 1
        return count
