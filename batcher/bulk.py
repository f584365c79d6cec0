"""A part of a /jobs job's texts on its way to the model: through the model workers' own pipeline, as bulk work.

The jobs worker loads no model. For each part it reads the cache (one MGET, once a model worker has
announced the model's version), queues the texts not found there, deduplicated, onto `Keys.bulk` as
`WorkItem`s of at most a forward's texts, and waits for their results as the API does: on a reply
channel of its own, with the result keys read for a reply the subscription missed. A model worker
takes bulk work for the room interactive work leaves, with a floor under load (`batcher.plan`); a
worker that dies holding it has it reclaimed onto the bulk list (`batcher.queue`). Work unanswered a second past its
deadline is queued again here, the copies no worker took taken back first, so the bulk list holds
each unanswered text once; a job on a busy service (or one with no model worker up) waits, up to
the job's timeout (`core.job_spec.JOB_TIMEOUT_S`). A copy a worker took is left to it: it drops it
as expired, or computes it into the cache, where the new copy finds it (its own answer goes to an
id no part waits for any more). A job that stops short (canceled, interrupted, failed) takes back
what it queued and no worker took (`withdraw`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from redis import Redis
from redis.client import PubSub
from redis.exceptions import RedisError

from core import tracing
from core.protocol import (
    Keys,
    ModelInfo,
    Prediction,
    Result,
    Unreadable,
    WorkItem,
    new_id,
    parse_replies,
    read_prediction,
)
from core.redis_replies import raws
from core.settings import Settings

log = logging.getLogger(__name__)

RESULTS_READ_EVERY_S = 1.0  # how often a wait reads the result keys of what is still unanswered (a missed reply)


class BulkFailed(Exception):
    """The model failed on a text of the part (the worker's error, as /predict would answer it)."""


class TooLong(BulkFailed):
    """The model refused texts as longer than it takes (`SENTIMENT_LONG_TEXTS=reject`): each with its
    tokens. Final: a job that meets it fails at once, as no retry changes its texts."""

    def __init__(self, why: str, texts: dict[str, int]) -> None:
        super().__init__(why)
        self.texts = texts

    def named(self, job: Sequence[str]) -> TooLong:
        """The failure naming each refused text by its first place in `job` and its tokens, as /predict's
        422 does (never the text): the one line a job of thousands of texts fails with."""
        places: dict[str, int] = {}
        for index, text in enumerate(job):
            places.setdefault(text, index)
        refused = sorted((places[text], tokens) for text, tokens in self.texts.items() if text in places)
        named = ", ".join(f"text {place} ({tokens:,} tokens)" for place, tokens in refused)
        return TooLong(f"{named}: {self}", self.texts)


class BulkStopped(Exception):
    """The process was told to stop while it waited for a part (`receive`'s `stopping`)."""


@dataclass
class Part:
    """One part on its way: its texts, the predictions found so far, and its queued items' texts by id."""

    texts: list[str]
    found: dict[str, Prediction]
    queued: dict[str, list[str]] = field(default_factory=dict)
    deadline: float = 0.0  # unix s: past it (and a second), what is still unanswered is queued again


class Bulk:
    """Predictions for lists of texts from the model workers, as bulk work."""

    def __init__(self, settings: Settings, redis: Redis, keys: Keys | None = None) -> None:
        self.redis = redis
        self.keys = keys or Keys(settings.key_prefix)
        self.item_texts = settings.max_batch_size  # texts per work item: at most a forward's
        self.deadline_s = settings.request_timeout_s
        self.channel = self.keys.reply_channel(new_id())
        self._pubsub: PubSub | None = None
        # By work item id, each unanswered item: the part its answer fills (parts overlap), and the
        # item as queued (`withdraw`).
        self._waiting: dict[str, tuple[Part, bytes]] = {}

    def send(self, texts: Sequence[str]) -> Part:
        """Read what is cached, queue the rest; `receive` waits for it."""
        unique = list(dict.fromkeys(texts))
        part = Part(list(texts), {})
        if (version := self._version()) is not None:
            cached = self.redis.mget([self.keys.cache(version, t) for t in unique])
            part.found = {
                t: p
                for t, c in zip(unique, cached, strict=True)
                if c is not None and (p := read_prediction(c)) is not None
            }
        self._queue(part, [t for t in unique if t not in part.found])
        return part

    def _version(self) -> str | None:
        """The announced model's version, which names the cache; None while none is announced or the
        announcement is unreadable (until a model worker's beat announces it again): the part's texts
        are then queued, and the model workers read their cache as they take them."""
        raw = self.redis.get(self.keys.model)
        try:
            return ModelInfo.decode(raw).version if raw is not None else None
        except Unreadable as exc:
            log.warning("the announced model is unreadable (%s): a part queued without a cache lookup", exc)
            return None

    def receive(
        self, part: Part, stopping: threading.Event | None = None, again: Callable[[], object] | None = None
    ) -> list[Prediction]:
        """A sent part's predictions in input order; BulkFailed if the model failed on one of its texts,
        BulkStopped within `RESULTS_READ_EVERY_S` of `stopping` being set (the model workers stop too, and may never
        answer). `again` runs before texts past their deadline are queued again: what it raises ends the
        wait (a job canceled meanwhile queues nothing more, nor waits up to its timeout for a busy service)."""
        self._wait(part, stopping, again)
        return [part.found[t] for t in part.texts]

    def withdraw(self) -> None:
        """Take the unanswered items that no model worker took yet back off the bulk list, in one round
        trip: a job that stops short leaves nothing queued for nobody (a worker would compute it
        otherwise, until its deadline). When Redis fails they stay, and expire as before."""
        if not self._waiting:
            return
        try:
            withdrawn = self._take_back([raw for _, raw in self._waiting.values()])
        except RedisError as exc:
            log.warning(
                "could not take back %d bulk work items (%s): they expire at their deadline", len(self._waiting), exc
            )
            return
        log.info(
            "took back %d of %d unanswered bulk work items (a worker holds the rest)", withdrawn, len(self._waiting)
        )
        self._waiting.clear()

    def _take_back(self, items: list[bytes]) -> int:
        """Remove `items` from the bulk list in one round trip; how many were there (no worker took them)."""
        pipe = self.redis.pipeline(transaction=False)
        for raw in items:
            # (`type: ignore`: redis-py's LREM wants the value as str; bytes are sent as they are.)
            pipe.lrem(self.keys.bulk, 1, raw)  # type: ignore[arg-type]
        return sum(pipe.execute())

    def close(self) -> None:
        """Forget the parts sent and drop the reply subscription (the next part subscribes again):
        at a job's end, after a Redis error."""
        self._waiting.clear()
        if self._pubsub is not None:
            with contextlib.suppress(RedisError):
                self._pubsub.close()
            self._pubsub = None

    def _subscribed(self) -> PubSub:
        """This process's reply subscription, confirmed before any item is queued (a reply sent
        earlier would be missed, and found only by reading its result key)."""
        if self._pubsub is None:
            pubsub = self.redis.pubsub()
            pubsub.subscribe(self.channel)
            while pubsub.get_message(timeout=RESULTS_READ_EVERY_S) is None:  # the subscription's confirmation
                pass
            self._pubsub = pubsub
        return self._pubsub

    def _queue(self, part: Part, texts: list[str]) -> None:
        """`texts` onto the bulk list, a forward's worth an item, in one round trip."""
        if not texts:
            return
        self._subscribed()
        now = time.time()
        part.deadline = now + self.deadline_s
        traceparent = tracing.traceparent() if tracing.enabled else None
        items = []
        for start in range(0, len(texts), self.item_texts):
            item_texts = texts[start : start + self.item_texts]
            item = WorkItem(new_id(), item_texts, now, part.deadline, self.channel, traceparent=traceparent)
            part.queued[item.id] = item_texts
            raw = item.encode()
            self._waiting[item.id] = (part, raw)
            items.append(raw)
        self.redis.lpush(self.keys.bulk, *items)

    def _wait(self, part: Part, stopping: threading.Event | None, again: Callable[[], object] | None) -> None:
        """Until every queued item is answered: replies as they come, the result keys every `RESULTS_READ_EVERY_S`;
        what passed its deadline unanswered (dropped by the workers) is queued again."""
        pubsub = self._subscribed()
        looked = time.monotonic()
        while part.queued:
            if stopping is not None and stopping.is_set():
                raise BulkStopped(f"{len(part.queued)} work items unanswered")
            message = pubsub.get_message(ignore_subscribe_messages=True, timeout=RESULTS_READ_EVERY_S)
            if message is not None and message["type"] == "message":
                for request_id, result in parse_replies(message["data"]):
                    if result is not None:
                        self._answer(request_id, result)
            if time.monotonic() - looked >= RESULTS_READ_EVERY_S:
                looked = time.monotonic()
                self._read_results(part, again)

    def _read_results(self, part: Part, again: Callable[[], object] | None) -> None:
        """Read the result keys of the unanswered items; queue again the texts of those past their
        deadline, taking back first their copies still on the bulk list."""
        ids = list(part.queued)
        for request_id, result in zip(ids, raws(self.redis.mget([self.keys.result(i) for i in ids])), strict=True):
            if result is not None:
                self._answer(request_id, result)
        if part.queued and time.time() > part.deadline + 1.0:
            if again is not None:
                again()
            late = [t for texts in part.queued.values() for t in texts]
            taken_back = self._take_back([self._waiting[request_id][1] for request_id in part.queued])
            log.info(
                "%d bulk texts unanswered by their deadline (a busy service); queued again, %d of their %d items"
                " taken back off the bulk list (a worker took the rest)",
                len(late),
                taken_back,
                len(part.queued),
            )
            for request_id in part.queued:
                del self._waiting[request_id]
            part.queued.clear()
            self._queue(part, late)

    def _answer(self, request_id: str, raw: bytes) -> None:
        """Fill the part that waits for `request_id` with its result (a part sent earlier or later
        than the one waited for, too)."""
        waiting = self._waiting.pop(request_id, None)
        if waiting is None:  # answered already, or a job's that ended
            return
        part, _ = waiting
        texts = part.queued.pop(request_id)
        try:
            result = Result.decode(raw)
        except Unreadable as exc:
            raise BulkFailed(f"an unreadable result ({exc})") from None
        if result.too_long:
            raise TooLong(result.error or "too long", {texts[at]: tokens for at, tokens in result.too_long})
        if result.error is not None or result.predictions is None:
            raise BulkFailed(result.error or "no predictions")
        part.found.update(zip(texts, result.predictions, strict=True))
