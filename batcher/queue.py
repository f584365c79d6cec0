"""The worker's side of the Redis work list.

Work moves atomically from the shared queue into this worker's processing list and leaves it only
once its result is written, so a worker that dies holds nothing that cannot be reclaimed. Bulk work
(`Keys.bulk`) does the same through a processing list of its own, and goes back onto the bulk list.
"""

from __future__ import annotations

import logging

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import ResponseError

from batcher.redis_link import Link
from core.liveness import DeathWatch
from core.protocol import Keys
from core.settings import HEARTBEAT_TTL_S

log = logging.getLogger(__name__)


class WorkQueue:
    """Take, acknowledge and reclaim work items for one worker. Taking and acknowledging go through
    `link`, the take stage's connection (its cache check too): call them from that one thread."""

    def __init__(self, redis: Redis, keys: Keys, worker_id: str, heartbeat_ttl_s: float = HEARTBEAT_TTL_S) -> None:
        self.redis = redis
        self.keys = keys
        self.worker_id = worker_id
        self.processing = keys.processing(worker_id)
        self.bulk_processing = keys.bulk_processing(worker_id)
        self.link = Link(redis)
        self.held_raws: set[bytes] = set()  # the items this process holds (`Held.raw`), until acknowledged
        self.deaths = DeathWatch(redis, keys, worker_id, heartbeat_ttl_s)

    def take(self, timeout: float) -> bytes | None:
        """The oldest queued item, moved into our processing list, waiting up to `timeout` s for one
        (BRPOPLPUSH is BLMOVE RIGHT LEFT; fakeredis 2.40's BLMOVE does not block, this one does)."""
        [raw] = self.link.call(("BRPOPLPUSH", self.keys.queue, self.processing, timeout))
        return raw

    def depth(self) -> int:
        """Items waiting in the queue."""
        [depth] = self.link.call(("LLEN", self.keys.queue))
        return depth

    def take_queued(self, most: int, bulk: bool = False) -> list[bytes]:
        """Up to `most` queued items (of the bulk class: from `Keys.bulk`), oldest first, moved into our
        processing list in one round trip (a pipeline of LMOVEs: each move is atomic, so a crash
        mid-way leaves nothing unreclaimable)."""
        if not most:
            return []
        source, held_in = self._lists(self.worker_id)[bulk]
        replies = self.link.call(*[("LMOVE", source, held_in, "RIGHT", "LEFT")] * most, raise_errors=False)
        moved = [raw for raw in replies if isinstance(raw, bytes)]
        if not moved and (errors := [r for r in replies if isinstance(r, ResponseError)]):
            raise errors[0]  # (moves a refusal cut short are kept: they are ours now)
        return moved

    def ack_all(self, raws: list[bytes], bulk: bool = False) -> None:
        """Drop several items from our processing list (the bulk one) in one round trip."""
        self.link.call(*(("LREM", self.processing_list(bulk), 1, raw) for raw in raws))

    def processing_list(self, bulk: bool) -> str:
        """Where our taken items of a class wait for their answer."""
        return self.bulk_processing if bulk else self.processing

    def _lists(self, worker_id: str) -> tuple[tuple[str, str], tuple[str, str]]:
        """(queue, processing list) of the interactive class and of the bulk class, for a worker."""
        keys = self.keys
        return (keys.queue, keys.processing(worker_id)), (keys.bulk, keys.bulk_processing(worker_id))

    def requeue_unheld(self) -> int:
        """Requeue the items in our processing list that this process does not hold: taken by a round
        trip whose replies a broken connection lost. Atomic against the reply stage's acknowledgements
        (WATCH, retried)."""

        lists = self._lists(self.worker_id)

        def move(pipe: Pipeline) -> int:
            held = set(self.held_raws)
            orphans = [(q, p, raw) for q, p in lists for raw in pipe.lrange(p, 0, -1) if raw not in held]
            pipe.multi()
            for queue, processing, raw in orphans:
                pipe.execute_command("LREM", processing, 1, raw)
                pipe.rpush(queue, raw)
            return len(orphans)

        # (`type: ignore`: redis-py types `transaction`'s callable as returning None, and its result as
        # the pipeline's replies; with `value_from_callable` it is what the callable returns.)
        moved: int = self.redis.transaction(move, *(p for _, p in lists), value_from_callable=True)  # type: ignore[arg-type,assignment]
        return moved

    def give_back(self) -> int:
        """Return everything this worker holds to the front of the queue (shutdown, lost state)."""
        return self._requeue(self.worker_id)

    def reclaim_dead(self) -> int:
        """Requeue the work of the registered workers `deaths` says died and deregister them; returns
        items moved."""
        moved = 0
        for worker_id, heartbeat in self.deaths.dead().items():
            count = self._reclaim(worker_id, heartbeat)
            if count is None:
                log.info("worker %s beat again since it was found dead: its work stays its own", worker_id)
                continue
            log.warning("reclaimed %d work items from dead worker %s", count, worker_id)
            moved += count
        return moved

    def _reclaim(self, worker_id: str, heartbeat: bytes | None) -> int | None:
        """Requeue a dead worker's work and deregister it in one transaction, unless its heartbeat is no
        longer what the look that found it dead read (None then): it beat since, so it lives, and may
        have taken work since, which must stay its own, as must its registration."""
        key, lists = self.keys.heartbeat(worker_id), self._lists(worker_id)

        def move(pipe: Pipeline) -> int | None:
            if pipe.get(key) != heartbeat:
                return None
            lengths = [pipe.llen(processing) for _, processing in lists]
            pipe.multi()
            for (queue, processing), length in zip(lists, lengths, strict=True):
                for _ in range(length):  # newest first onto the consuming end: the oldest first in line again
                    pipe.lmove(processing, queue, "LEFT", "RIGHT")
            pipe.srem(self.keys.workers, worker_id)
            pipe.delete(key)  # (it has no expiry)
            return sum(lengths)

        # (`type: ignore`: as in `requeue_unheld`.)
        moved: int | None = self.redis.transaction(move, key, *(p for _, p in lists), value_from_callable=True)  # type: ignore[arg-type,assignment]
        return moved

    def _requeue(self, worker_id: str) -> int:
        # Newest first onto the consuming end: the oldest item ends up first in line again, in its class's queue.
        count = 0
        for queue, processing in self._lists(worker_id):
            while self.redis.lmove(processing, queue, "LEFT", "RIGHT") is not None:
                count += 1
        return count
