"""Waiting for results without a Redis connection per waiting request.

Each API process subscribes once to its own reply channel; the worker publishes the ids and results
of the requests it finished there, in the transaction that writes their result keys, which hands
each result to its request and wakes it: one message per worker round, no round trip to fetch it. The result key stays the source of truth: a
waiter not answered by a message reads it every `poll_s` seconds, so a message lost while the
subscription reconnects costs at most that much latency, never the answer.

Behind Sentinel (`requeue`), a wait outlives an outage up to its deadline: once the subscription is
back, each waiter whose result has not come pushes its work item again, as the promoted replica may
not have received it (asynchronous replication). A worker may then compute it twice; the request is
answered once. Against a plain Redis a wait spanning an outage ends in its 503, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.metrics import REPLIES_UNCLAIMED
from core.protocol import Keys, new_id, parse_replies
from core.redis_errors import OUTAGE, Backoff, describe
from core.redis_replies import raw

log = logging.getLogger(__name__)


class Pending:
    """One request's wait for its result key."""

    def __init__(self, redis: Redis, key: str, poll_s: float, queue: str = "", item: bytes | None = None) -> None:
        self._redis = redis
        self._key = key
        self._poll_s = poll_s
        self._queue = queue
        self._item = item  # the queued work item, pushed again after an outage (None: never)
        self._resend = False
        self.arrived = asyncio.Event()
        self.delivered: bytes | None = None  # the result, when its message carried it
        self.error: Exception | None = None  # why the wait ends without a result (`abort`)

    def reconnected(self) -> None:
        """Redis is back after an outage: push the item again unless its result is there."""
        self._resend = self._item is not None
        self.arrived.set()

    def deliver(self, result: bytes | None) -> None:
        """The reply arrived: keep its result, if it carried one, and wake the waiter."""
        self.delivered = self.delivered or result
        self.arrived.set()

    def abort(self, error: Exception) -> None:
        """Nobody wants the result any more (the client went away): the wait raises `error`, unless
        the result came first."""
        self.error = error
        self.arrived.set()

    async def result(self) -> bytes:
        """The result as delivered, or taken from its key (once woken without one, or at each poll);
        the caller bounds the wait. A delivered result's key is left to expire (a second past the
        deadline, as the worker sets it): deleting it would cost the round trip the message saves.

        A wait with an item to push again rides out an outage at its polls (the caller's deadline
        ends it); one without ends in the outage's error.

        `asyncio.timeout`, not `wait_for`: on 3.11 `wait_for` can swallow the caller's cancellation
        when the event fires at the same moment, which would outlive the caller's deadline.
        """
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_s):
                    await self.arrived.wait()
            if self.delivered is not None:
                return self.delivered
            if self.error is not None:
                raise self.error
            self.arrived.clear()
            try:
                if (result := raw(await self._redis.getdel(self._key))) is not None:
                    return result
                if self._resend and self._item is not None:
                    self._resend = False
                    await self._redis.lpush(self._queue, self._item)
            except OUTAGE as exc:
                if self._item is None:
                    raise
                log.debug("result poll failed (%s); waiting on", describe(exc))


class ResultWaiter:
    """Per-process reply channel and the events of the requests waiting on it."""

    def __init__(self, redis: Redis, keys: Keys, poll_s: float = 1.0, requeue: bool = False) -> None:
        self._redis = redis
        self._keys = keys
        self._poll_s = poll_s
        self._requeue = requeue  # waits ride out outages, pushing their item again (module docstring)
        self.channel = keys.reply_channel(new_id())
        self._pending: dict[str, Pending] = {}
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def expect(self, request_id: str, item: bytes | None = None) -> Iterator[Pending]:
        """Register before queueing the work, so a fast answer cannot be missed; `item`: the work
        item as queued, pushed again (`requeue`) if an outage may have lost it."""
        pending = self._pending[request_id] = Pending(
            self._redis, self._keys.result(request_id), self._poll_s, self._keys.queue, item if self._requeue else None
        )
        try:
            yield pending
        finally:
            del self._pending[request_id]

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="result-listener")

    async def stop(self) -> None:
        """Cancel the listener; shutdown never waits more than a second on it."""
        if self._task:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=1.0)

    async def _listen(self) -> None:
        """Subscribe for good: any Redis error resubscribes with backoff. A refusal (NOPERM on the
        channel, say) is logged as an error, not a warning: it will not heal by itself, and until
        it does every request waits for the poll instead of its reply."""
        backoff = Backoff(log)
        lost = False  # the subscription failed since it was last confirmed: Redis may have lost work
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    async for message in pubsub.listen():
                        if message["type"] == "subscribe":
                            backoff.reset()  # confirmed: a refused SUBSCRIBE fails only here, at its reply
                            if lost:
                                lost = False
                                for waiting in list(self._pending.values()):
                                    waiting.reconnected()
                        elif message["type"] == "message":
                            for request_id, result in parse_replies(message["data"]):
                                if pending := self._pending.get(request_id):
                                    pending.deliver(result)
                                else:  # cut at its deadline or its client gone, yet computed
                                    REPLIES_UNCLAIMED.inc()
            except (RedisError, OSError) as exc:
                lost = True
                log.log(
                    logging.WARNING if isinstance(exc, OUTAGE) else logging.ERROR,
                    "result subscription lost (%s); resubscribing in %.1f s",
                    describe(exc),
                    backoff.delay,
                )
                await asyncio.sleep(backoff.next())
