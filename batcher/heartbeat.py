"""The heartbeat thread: says this worker is alive, and requeues the work of workers that are not.

Every third of `heartbeat_ttl_s` it writes the worker's status, saying when it lapses (a TTL from
now), under a key without an expiry that no memory policy evicts, and announces its model where no live worker serves the one announced; every `DEATH_WATCH_S` it
asks the death watch (`liveness.DeathWatch`) which registered workers died, by their lapsed key or
their closed connections, and pushes their processing lists back onto the queue. A stuck pipeline (a
lane in a forward past every deadline of its requests or the request timeout, the take or the reply
stage in one step longer than the TTL: `Worker._healthy`) stops the beats: nobody waits for that work
any more, so it is reclaimed and a liveness probe restarts the worker. A long forward within its
deadlines is work, and keeps beating. A Redis failure skips a tick, and holds the death watch's
reading of lapsed heartbeats back for a TTL once Redis answers (an outage that lapsed this worker's
heartbeat lapsed the others' too, and they beat again meanwhile); any other failure is a bug, and
stops the worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError

from batcher.periodic import Periodic
from batcher.queue import WorkQueue
from batcher.redis_link import Command, Link
from batcher.thread_failure import ThreadFailure
from core.liveness import live_workers
from core.protocol import Keys, ModelInfo, Unreadable, WorkerStatus
from core.redis_errors import describe

log = logging.getLogger(__name__)

DEATH_WATCH_S = 0.5  # how often dead workers are looked for


class Heartbeat:
    """A thread named `heartbeat` that beats while `healthy()` and reclaims dead workers' work."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        queue: WorkQueue,
        ttl_s: float,
        status: Callable[[], WorkerStatus],
        healthy: Callable[[], bool],
        model: ModelInfo,
    ) -> None:
        self.redis = redis
        self.link = Link(redis)
        self.keys = keys
        self.queue = queue
        self.ttl_s = ttl_s
        self.status = status
        self.healthy = healthy
        self.model = model.encode()
        self._next_beat = 0.0
        self._thread: Periodic | None = None
        self._failing = False  # the last tick failed on Redis (said at WARNING once, then at DEBUG until one works)

    def start(self, failure: ThreadFailure) -> None:
        """The thread named `heartbeat`; a bug in it stops the worker (`failure`)."""
        self._next_beat = time.monotonic() + self.ttl_s / 3
        self._thread = Periodic("heartbeat", min(DEATH_WATCH_S, self.ttl_s / 3), self._tick, failure)
        self._thread.start()

    def beat(self) -> None:
        if writes := self.writes():
            self.link.transaction(*writes)
            self.announce()

    def announce(self, anyway: bool = False) -> None:
        """Announce this worker's model (its version names the API's cache) `anyway` (a worker starting:
        the newest model wins a rolling upgrade), or where no live worker serves the one announced
        (`_orphaned`). Called after a beat, so that a worker's own heartbeat is there before its
        announcement; WATCHed, so that one announced meanwhile stands."""

        def claim(pipe: Pipeline) -> None:
            if anyway or self._orphaned(pipe.get(self.keys.model), pipe):
                pipe.multi()
                pipe.set(self.keys.model, self.model)

        self.redis.transaction(claim, self.keys.model)

    def _orphaned(self, announced: bytes | str | None, redis: Redis) -> bool:
        """Whether the `announced` model is served by no live worker: none (a Redis that restarted
        empty), unreadable, or one whose workers all stopped (an upgrade rolled back, the old model's
        workers serving on): the API would name it, and look its cache up, in vain."""
        if announced == self.model:
            return False
        try:
            version = ModelInfo.decode(announced).version if announced else None
        except Unreadable:
            return True
        return version not in {status.model_version for status in live_workers(redis, self.keys.prefix)}

    def writes(self) -> list[Command]:
        """The beat as writes, for a busy worker's result transactions to carry (none while unhealthy)."""
        if not self.healthy():
            return []
        status = replace(self.status(), lapses_at=time.time() + self.ttl_s)
        return [
            ("SET", self.keys.heartbeat(status.id), status.encode()),
            ("SADD", self.keys.workers, status.id),
        ]

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop()

    def _tick(self) -> None:
        try:
            if time.monotonic() >= self._next_beat:
                self.beat()
                self._next_beat = time.monotonic() + self.ttl_s / 3
            self.queue.reclaim_dead()
        except RedisError as exc:  # the next beat may work; the stages deal with Redis failing
            self.queue.deaths.redis_failed(self.ttl_s)
            # Once a run of failures: an idle worker's refused beats (OOM, NOPERM) are otherwise seen only
            # as /ready counting it out when its heartbeat lapses.
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(
                level, "heartbeat failed (%s); it lapses in %g s unless a beat gets through", describe(exc), self.ttl_s
            )
            self._failing = True
        else:
            self._failing = False
