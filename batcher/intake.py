"""The take stage: queued work items into held texts, on the worker's main thread.

One take moves what is queued into this worker's processing list in one round trip
(`Policy.take_count` says how many items to ask for), or, when the queue is empty, blocks for the
next item. Malformed and
expired items are dropped; the rest become distinct texts, answered from the cache where another
request or worker computed them already, else tokenized in one call and held for the lanes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from batcher import metrics
from batcher.plan import Pending
from batcher.queue import WorkQueue
from batcher.reply import Replies
from batcher.work import Held, Text, traceparents
from core import tracing
from core.protocol import WorkItem
from core.redis_errors import describe

log = logging.getLogger(__name__)

IDLE_POLL_S = 1.0  # longest a blocking take waits, so a stop request is seen


class Intake:
    """Takes work into `pending`; cache hits and dropped items go straight to `replies`."""

    def __init__(
        self,
        queue: WorkQueue,
        pending: Pending,
        replies: Replies,
        tokenize: Callable[[list[str]], list[list[int]]],
        cache_key: Callable[[str], str],
    ) -> None:
        self.queue = queue
        self.pending = pending
        self.replies = replies
        self.tokenize = tokenize
        self.cache_key = cache_key
        self.expired = 0  # items dropped because their deadline had passed
        self._asked = self._got = 1  # items the last take asked for, and got
        self._texts_per_item = 1.0

    def take(self) -> bool:
        """One take; False when no work came within `IDLE_POLL_S`."""
        room = self.pending.wait_for_room(IDLE_POLL_S)
        if room <= 0:
            return False
        cpu, raws = time.thread_time(), []
        items = max(1, int(room / self._texts_per_item))  # what the window has room for
        try:
            if self._got:  # the queue had work at the last take: take what is queued, one round trip
                asked = self.pending.policy.take_count(room, self._texts_per_item, self._asked, self._got)
                raws = self.queue.take_queued(asked)
                self._asked, self._got = asked, len(raws)
            if not raws and (first := self.queue.take(IDLE_POLL_S)) is not None:  # idle: block for the next
                raws = [first]
                raws += self.queue.take_queued(min(self.queue.depth(), items - 1))  # and what came with it
                self._asked = self._got = len(raws)
        finally:
            if raws:  # taken, so held, even where the rest of the take failed
                self.admit(raws)
            metrics.STAGE_CPU_SECONDS.labels("take").inc(time.thread_time() - cpu)
        return bool(raws)

    def admit(self, raws: list[bytes]) -> None:
        """Decode taken items, drop malformed and expired ones, answer cached texts, hold the rest.
        Never fails on Redis: what was taken is held (a failed cache check computes the texts; a
        failed drop leaves the item for the next worker to drop)."""
        now, items, dropped = time.time(), [], []
        for raw in raws:
            try:
                item = WorkItem.decode(raw)
                if not (
                    isinstance(item.texts, list)
                    and all(isinstance(t, str) for t in item.texts)
                    and isinstance(item.deadline, int | float)
                    and isinstance(item.enqueued_at, int | float)
                    and isinstance(item.reply_to, str)
                    and (item.traceparent is None or isinstance(item.traceparent, str))
                ):
                    raise TypeError("a field of the wrong type")
            # Not our protocol (AttributeError: JSON, but not an object): nobody can be answered, never retry it.
            except (ValueError, TypeError, AttributeError):
                log.error("dropped a malformed work item (%d bytes)", len(raw))
                dropped.append(raw)
                continue
            if item.deadline < now:
                self.expired += 1
                metrics.WORK_ITEMS_EXPIRED.inc()
                log.info("skipped work item %s: its deadline passed in the queue", item.id)
                dropped.append(raw)
                continue
            items.append(Held(raw, item))
        self.queue.held.update(held.raw for held in items)
        if dropped:
            with contextlib.suppress(RedisError):
                self.queue.ack_all(dropped)
        if not items:
            return
        texts: dict[str, Text] = {}
        for held in items:
            for index, sentence in enumerate(held.item.texts):
                if (known := texts.get(sentence)) is None:
                    known = texts[sentence] = Text(sentence, self.cache_key(sentence), [], held.item.enqueued_at)
                known.waiters.append((held, index))
        self._texts_per_item = len(texts) / len(items)
        try:
            [cached] = self.queue.link.call(("MGET", *(t.key for t in texts.values())))
        except RedisError as exc:
            log.warning("cache check failed (%s); computing the texts", describe(exc))
            cached = [None] * len(texts)
        hits = [(t, c) for t, c in zip(texts.values(), cached, strict=True) if c is not None]
        if hits:
            self.replies.cached(hits)
        todo = [t for t, c in zip(texts.values(), cached, strict=True) if c is None]
        if todo:
            tokenizing = (
                tracing.linked_span("worker.tokenize", traceparents(todo), texts=len(todo))
                if tracing.enabled
                else tracing.OFF
            )
            with tokenizing as span:
                for text, ids in zip(todo, self.tokenize([t.text for t in todo]), strict=True):
                    text.ids = ids
                if span.is_recording():
                    span.set_attribute("sentiment.tokens", sum(len(t.ids) for t in todo))
            self.pending.add(todo, len(items))
