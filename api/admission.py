"""Admission by predicted completion (the `deadline` overload policy): a request that the workers
could not answer by its deadline is refused at once, 503 with `Retry-After`, instead of being queued
to time out. It decides for the texts no cache answered (`api.predictions`): a cache hit costs the
model nothing and is never refused; the decision itself waits on no Redis round trip.

The prediction (`Fleet.wait_s`): the texts ahead of a new request (the queued items' texts, plus the
texts the workers hold) over the fleet's throughput, counted `QUEUE_MARGIN` times, plus one full
forward for its own texts. The margin is for the throughput, which swings forward to forward on
cores the model shares: admitted up to the deadline by the prediction itself, a request is late as
often as the throughput reads high. The workers publish their throughput and held texts in their
heartbeats (`core.protocol.WorkerStatus`: throughput measured per forward and smoothed,
`batcher.forward_time`); `Load` reads them and the queue's length in one round trip at most every
`REFRESH_S` (two when a worker came or went), shared by all of the process's requests, and counts
the texts this process admitted since. The queue is first in, first out, so the items in it are the
newest queued: `Load` counts their texts as those of the newest items this process queued (exact
behind one API process; behind several, a sample of the same traffic). A stale view is read again in
the background (`api.refreshed`), so a refusal under load never waits on Redis; only a view older
than `MAX_AGE_S` (the process's first, or one from before a quiet spell) is waited for. Until a
worker has timed a forward there is no prediction, and every request is admitted (a cold start
admits); so is a request with nothing ahead of it (an idle fleet admits).
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.errors import ErrorType, ServiceError
from api.refreshed import Refreshed
from core.liveness import beating
from core.protocol import Keys, WorkerStatus
from core.redis_replies import text

REFRESH_S = 0.1  # how stale the view of the fleet's load may be
MAX_AGE_S = 0.5  # older than this (after a quiet spell, or a slow read), a request waits for a fresh one
ITEMS_KEPT = 1024  # the newest work items this process queued whose texts it keeps (past them, their mean)
QUEUE_MARGIN = 2.0  # the queue's predicted wait counts this many times (docs/tuning.md, "Overload")


@dataclass(frozen=True)
class Fleet:
    """The live workers' load, as their heartbeats and the queue said it at one read."""

    texts_per_s: float  # all the workers' together
    forward_s: float  # the slowest worker's full forward
    texts_ahead: float  # queued and held texts

    def wait_s(self, admitted_since: int) -> float:
        """Seconds until a request queued now would be answered, `admitted_since` more texts queued
        since this view was read."""
        return QUEUE_MARGIN * (self.texts_ahead + admitted_since) / self.texts_per_s + self.forward_s


def fleet(statuses: list[WorkerStatus], queued_texts: float) -> Fleet | None:
    """The load of the workers with a measured throughput; None while none has one. A heartbeat whose
    throughput or forward time is not above 0 (written by something else) measures nothing."""
    timed = [s for s in statuses if (s.texts_per_s or 0.0) > 0 and (s.forward_s or 0.0) > 0]
    if not timed:
        return None
    return Fleet(
        texts_per_s=sum(s.texts_per_s or 0.0 for s in timed),
        forward_s=max(s.forward_s or 0.0 for s in timed),
        texts_ahead=queued_texts + sum(s.texts_ahead for s in statuses),
    )


class Load:
    """This API process's view of the fleet's load, read again when older than `REFRESH_S`."""

    def __init__(self, redis: Redis, keys: Keys, clock: Callable[[], float] = time.monotonic) -> None:
        self._redis = redis
        self._keys = keys
        self._workers: list[str] = []  # the registered workers at the last read: whose heartbeats the next reads
        # The texts of the work items this process queued, newest last.
        self._items: deque[int] = deque(maxlen=ITEMS_KEPT)
        self._admitted = 0  # texts admitted since the last read was asked for
        self._reading = 0  # those admitted before the read on its way was asked for (0: none on its way)
        self.view: Refreshed[Fleet | None] = Refreshed(self._ask, None, REFRESH_S, MAX_AGE_S, clock)

    @property
    def admitted(self) -> int:
        """Texts this process admitted that the last read did not see queued."""
        return self._admitted + self._reading

    def admit(self, texts: int) -> None:
        """`texts` counted as queued, one work item's, until a read asked for from now on sees them."""
        self._admitted += texts
        self._items.append(texts)

    async def current(self) -> Fleet | None:
        """The fleet's load as last read (`Refreshed`: one round trip, whatever the requests); None
        before any worker timed a forward, or while Redis fails (the request meets that itself)."""
        return await self.view.current()

    def _ask(self) -> Coroutine[Any, Any, Fleet | None]:
        """A read, asked for now: the queue's length it reads holds what was admitted until now."""
        self._reading, self._admitted = self._admitted, 0
        return self._read()

    def _queued_texts(self, items: int) -> float:
        """The texts of the newest `items` work items queued, as this process queued its own newest
        (past the `ITEMS_KEPT` it keeps, their mean; one text an item before it queued any)."""
        newest = list(itertools.islice(reversed(self._items), items))
        mean = sum(newest) / len(newest) if newest else 1.0
        return sum(newest) + (items - len(newest)) * mean

    async def _read(self) -> Fleet | None:
        """Read the view again. What this process admits while the read is on its way still counts
        after it (their work items may be queued after the length was read)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.smembers(self._keys.workers)
        pipe.llen(self._keys.queue)
        workers = self._workers
        if workers:
            pipe.mget([self._keys.heartbeat(w) for w in workers])
        try:
            members, queued, *beats = await pipe.execute()
            self._workers = sorted(text(m) for m in members)
            if self._workers != workers:  # a worker came or went: a second round trip, rarely
                beats = [await self._redis.mget([self._keys.heartbeat(w) for w in self._workers])]
        except RedisError:
            found = None
        else:
            statuses = beating(self._workers, beats[0]) if self._workers else []
            found = fleet(statuses, self._queued_texts(queued))
        self._reading = 0
        return found


class Admission:
    """Refuses what the fleet could not answer in time, by `Load`'s prediction."""

    def __init__(self, load: Load) -> None:
        self.load = load

    async def admit(self, texts: int, timeout_s: float) -> None:
        """Admit one work item of `texts` texts due within `timeout_s`, counted as queued from now on;
        else `ServiceError` OVERLOADED, with `Retry-After` the seconds until
        the work ahead would have shrunk enough (at least 1). With nothing ahead a request is always
        admitted: its forward is the only measure of a forward time that is wrong (a first, slow
        one), and the plan still drops it if it cannot make it."""
        fleet = await self.load.current()
        ahead = fleet is not None and (fleet.texts_ahead or self.load.admitted)
        wait_s = fleet.wait_s(self.load.admitted) if fleet is not None and ahead else 0.0
        if timeout_s < wait_s < math.inf:  # (an endless wait, from a heartbeat's nonsense, is no prediction)
            raise ServiceError(
                ErrorType.OVERLOADED,
                f"the service would answer in about {wait_s:.2g} s, past this request's deadline "
                f"({timeout_s:.2g} s from now); retry later",
                retry_after_s=max(1, math.ceil(wait_s - timeout_s)),
            )
        self.load.admit(texts)
