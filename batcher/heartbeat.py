"""The heartbeat thread: says this worker is alive, and requeues the work of workers that are not.

Every third of `heartbeat_ttl_s` it writes the worker's status under a key that lapses after the
TTL (and the served model, should a restarted Redis have lost it); every `DEATH_WATCH_S` it asks the death
watch (`liveness.DeathWatch`) which registered workers died, by their lapsed key or their closed
connections, and pushes their processing lists back onto the queue. A stuck pipeline (a lane in a
forward past every deadline of its requests, the take or the reply stage in one step longer than
the TTL: `Worker._healthy`) stops the beats: nobody waits for that work any more, so it is reclaimed
and a liveness probe restarts the worker. A long forward within its deadlines is work, and keeps
beating. A Redis failure skips a tick; any other failure is a bug, and stops the worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

from redis import Redis
from redis.exceptions import RedisError

from batcher.queue import WorkQueue
from batcher.redis_link import Command, Link
from batcher.thread_failure import ThreadFailure
from core.protocol import Keys, ModelInfo, WorkerStatus
from core.redis_errors import describe

log = logging.getLogger(__name__)

DEATH_WATCH_S = 0.5  # how often dead workers are looked for


class Beating:
    """`tick()` every `period_s` seconds on a daemon thread named `name`, from `start` (or entering the
    `with` block) until `stop` (or leaving it); `stop` waits for a tick under way. `tick` deals with
    the errors it expects; one it does not stops the process (`failure`), or, without one, ends the
    thread with its traceback logged. The one beating thread of both workers: the /predict worker's
    `Heartbeat`, the jobs worker's per-job beat and its webhook sender (`batcher.jobs`)."""

    def __init__(
        self, name: str, period_s: float, tick: Callable[[], None], failure: ThreadFailure | None = None
    ) -> None:
        self.period_s = period_s
        self.tick = tick
        self._stop = threading.Event()
        run = failure.guard(name, self._run) if failure is not None else self._run
        self._thread = threading.Thread(target=run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # (started)
            self._thread.join()

    def __enter__(self) -> Beating:
        self.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.tick()


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
        self.link = Link(redis)
        self.keys = keys
        self.queue = queue
        self.ttl_s = ttl_s
        self.status = status
        self.healthy = healthy
        self.model = model.encode()
        self._next_beat = 0.0
        self._beating: Beating | None = None

    def start(self, failure: ThreadFailure) -> None:
        """The thread named `heartbeat`; a bug in it stops the worker (`failure`)."""
        self._next_beat = time.monotonic() + self.ttl_s / 3
        self._beating = Beating("heartbeat", min(DEATH_WATCH_S, self.ttl_s / 3), self._tick, failure)
        self._beating.start()

    def beat(self) -> None:
        if writes := self.writes():
            self.link.transaction(*writes)

    def writes(self) -> list[Command]:
        """The beat as writes, for a busy worker's result transactions to carry (none while unhealthy)."""
        if not self.healthy():
            return []
        status = self.status()
        return [
            ("SET", self.keys.heartbeat(status.id), status.encode(), "PX", int(self.ttl_s * 1000)),
            ("SADD", self.keys.workers, status.id),
            ("SET", self.keys.model, self.model, "NX"),  # again after a Redis that restarted empty
        ]

    def stop(self) -> None:
        if self._beating is not None:
            self._beating.stop()

    def _tick(self) -> None:
        try:
            if time.monotonic() >= self._next_beat:
                self.beat()
                self._next_beat = time.monotonic() + self.ttl_s / 3
            self.queue.reclaim_dead()
        except RedisError as exc:  # the next beat may work; the stages deal with Redis failing
            log.debug("heartbeat failed (%s)", describe(exc))
