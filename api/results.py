"""Waiting for results without a Redis connection per waiting request.

Each API process subscribes once to its own reply channel; the worker publishes the ids and results
of the requests it finished there, in the transaction that writes their result keys, which hands
each result to its request and wakes it: one message per worker round, no round trip to fetch it.
The result key stays the source of truth: a waiter not answered by a message reads it every
`poll_s` seconds, so a message lost while the subscription reconnects costs at most that much
latency, never the answer.

The subscription is watched: a quiet one is PINGed every `HEALTH_CHECK_S`, and one that stays silent
for the Redis timeout (a peer gone without a reset) is dropped and made again, as is one that fails
in any other way; a silent one also sends the client's other connections to the same peer to be
opened again before their next command. Each time it comes back, every waiter looks at its result key at once.

Behind Sentinel (`requeue`), a wait outlives an outage up to its deadline, and when the subscription
is back each waiter whose result has not come pushes its work item again if it is nowhere else: not
queued, not held by a worker, not answered (`PUSH_IF_LOST`, one atomic script), as the promoted
replica may not have received it (asynchronous replication). Against a plain Redis a wait spanning
an outage ends in its 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from api.metrics import REPLIES_UNCLAIMED
from core.protocol import Keys, new_id, parse_replies
from core.redis_connect import peer_went_silent
from core.redis_errors import OUTAGE, Backoff, describe
from core.redis_replies import raw

log = logging.getLogger(__name__)

HEALTH_CHECK_S = 1.0  # a subscription this long without a message is PINGed

# KEYS: the queue, the item's result key, the set of workers; ARGV: the item, the prefix of processing
# lists. Not Lua-less like the hot path: it runs only behind Sentinel, after an outage, on a real Redis.
PUSH_IF_LOST = """
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('LPOS', KEYS[1], ARGV[1]) then
  return 0
end
for _, worker in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if redis.call('LPOS', ARGV[2] .. worker, ARGV[1]) then
    return 0
  end
end
redis.call('LPUSH', KEYS[1], ARGV[1])
return 1
"""


class ResultWait:
    """One request's wait for its result key."""

    def __init__(
        self,
        redis: Redis,
        key: str,
        poll_s: float,
        item: bytes | None = None,
        push_if_lost: Callable[[bytes], Awaitable[object]] | None = None,
    ) -> None:
        self._redis = redis
        self._key = key
        self._poll_s = poll_s
        self._item = item  # the queued work item, pushed again after an outage if lost (None: never)
        self._push_if_lost = push_if_lost
        self._comebacks = 0  # times the subscription came back
        self._pushed_for = 0  # the comebacks before the latest push of the item that succeeded
        self.arrived = asyncio.Event()
        self.delivered: bytes | None = None  # the result, when its message carried it
        self.error: Exception | None = None  # why the wait ends without a result (`abort`)

    def reconnected(self) -> None:
        """The subscription is back after a failure: look at the result key now, and push the item
        again if it was lost (at each look that finds no result, until a push sent since succeeds)."""
        self._comebacks += 1
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
        ends it); one without ends in the outage's error, unless its result was delivered meanwhile.

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
                if self._pushed_for < self._comebacks and self._item is not None and self._push_if_lost is not None:
                    comebacks = self._comebacks
                    await self._push_if_lost(self._item)
                    self._pushed_for = comebacks
            except OUTAGE as exc:
                if self._item is None and self.delivered is None:  # (a result delivered meanwhile is answered)
                    raise
                log.debug("result poll failed (%s); waiting on", describe(exc))


class ResultWaiter:
    """Per-process reply channel and the events of the requests waiting on it."""

    def __init__(
        self, redis: Redis, keys: Keys, poll_s: float = 1.0, requeue: bool = False, silence_s: float = 5.0
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._poll_s = poll_s
        self._requeue = requeue  # waits ride out outages, pushing their item again if lost (module docstring)
        self._silence_s = silence_s  # a subscription silent this long (PINGs unanswered) is made again
        self._push_script = redis.register_script(PUSH_IF_LOST) if requeue else None
        self.channel = keys.reply_channel(new_id())
        self._waits: dict[str, ResultWait] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @contextlib.contextmanager
    def expect(self, request_id: str, item: bytes | None = None) -> Iterator[ResultWait]:
        """Register before queueing the work, so a fast answer cannot be missed; `item`: the work
        item as queued, pushed again (`requeue`) if an outage lost it."""
        wait = self._waits[request_id] = ResultWait(
            self._redis,
            self._keys.result(request_id),
            self._poll_s,
            item if self._requeue else None,
            lambda item: self._push_if_lost(request_id, item),
        )
        try:
            yield wait
        finally:
            del self._waits[request_id]

    async def _push_if_lost(self, request_id: str, item: bytes) -> None:
        assert self._push_script is not None
        keys = self._keys
        args: list[bytes | str] = [item, keys.processing("")]
        if await self._push_script(keys=[keys.queue, keys.result(request_id), keys.workers], args=args):
            log.info("request %s: its work item was lost with Redis; queued again", request_id)

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="result-listener")

    async def stop(self) -> None:
        """Cancel the listener; shutdown never waits more than a second on it. (A cancel that lands in
        a Redis call may surface as a Redis error, which the loop survives: the flag ends it.)"""
        self._stopping = True
        if self._task:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=1.0)

    async def _listen(self) -> None:
        """Subscribe for good: any failure (Redis down, silent or refusing; a bug) resubscribes with
        backoff. A refusal (NOPERM on the channel, say) and a bug are logged as errors: they will not
        heal by themselves, and until they do every request waits for the poll instead of its reply."""
        backoff = Backoff(log)
        lost = False  # the subscription failed since it was last confirmed: replies, or work, may be lost
        while not self._stopping:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    async for kind, data in self._messages(pubsub):
                        if kind == "subscribe":
                            backoff.reset()  # confirmed: a refused SUBSCRIBE fails only here, at its reply
                            if lost:
                                lost = False
                                for waiting in list(self._waits.values()):
                                    waiting.reconnected()
                        elif kind == "message":
                            self._deliver(data)
            except Exception as exc:
                if self._stopping:
                    return
                lost = True
                expected = isinstance(exc, OUTAGE)
                log.log(
                    logging.WARNING if expected else logging.ERROR,
                    "result subscription lost (%s); resubscribing in %.1f s",
                    describe(exc),
                    backoff.delay,
                    exc_info=None if expected or isinstance(exc, RedisError) else exc,  # a bug: its traceback
                )
                await asyncio.sleep(backoff.next())

    async def _messages(self, pubsub: PubSub) -> AsyncIterator[tuple[str, bytes]]:
        """The subscription's messages, (type, data); a quiet one is PINGed every `HEALTH_CHECK_S`
        (its PONG is a message too), and one silent for `silence_s` raises TimeoutError."""
        loop = asyncio.get_running_loop()
        heard = loop.time()
        while not self._stopping:  # (a cancel that lands in get_message may be swallowed by it)
            left_s = heard + self._silence_s - loop.time()
            message = await pubsub.get_message(timeout=max(0.0, min(HEALTH_CHECK_S, left_s)))
            if message is not None:
                heard = loop.time()
                yield message["type"], message["data"]
            elif loop.time() - heard >= self._silence_s:
                peer_went_silent(self._redis)  # (the client's other connections lead to the same peer)
                raise TimeoutError(f"the subscription was silent for {self._silence_s:g} s")
            else:
                await pubsub.ping()

    def _deliver(self, message: bytes) -> None:
        """Hand each result of a `replies` message to its waiting request."""
        for request_id, result in parse_replies(message):
            if wait := self._waits.get(request_id):
                wait.deliver(result)
            else:  # cut at its deadline or its client gone, yet computed (or a line that names nobody)
                REPLIES_UNCLAIMED.inc()
