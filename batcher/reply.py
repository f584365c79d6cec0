"""The reply stage: finished work back to Redis, on a thread of its own.

Everything finished since the last write goes in one transaction: each computed text's cache entry;
for each request whose texts all have a prediction (or that failed), its result key and its
acknowledgement (LREM from the processing list); and one message per API process, on its reply
channel, with the results of all its requests finished here.
A refused or lost write is retried with backoff, the same transaction again, until it goes or the
worker stops; its work stays in the processing list meanwhile, so it is never lost. A Redis full of
what it may not evict refuses every transaction (OOM): the answers then go without their cache
entries and result keys, in commands that need no memory (`_deliver`). Any other failure is a bug,
and stops the worker (`thread_failure`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from queue import SimpleQueue

import numpy as np
from redis import Redis
from redis.exceptions import OutOfMemoryError, RedisError

from batcher import metrics
from batcher.queue import WorkQueue
from batcher.redis_link import Command, Link
from batcher.thread_failure import ThreadFailure
from batcher.work import Held, Text
from core import tracing
from core.protocol import Keys, ScoreFunction, encode_prediction, replies
from core.redis_errors import Backoff, describe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """Texts with their cached predictions, their computed logits (to score, encode and cache), or an
    error for all."""

    texts: list[Text]
    predictions: list[bytes] | None = None
    logits: np.ndarray | None = None
    error: str | None = None
    tokens: list[int] | None = None  # refused as too long: each text's tokens (the error says the limit)
    late: bool = False  # their requests could not be answered by their deadlines: answered as late


class Replies:
    """Collects outcomes from the lanes and the intake; its thread writes them back."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        queue: WorkQueue,
        labels: list[str],
        score: Callable[[np.ndarray, ScoreFunction | None], np.ndarray],
        cache_ttl_s: int,
        result_ttl_s: int,
        stopping: threading.Event,
        heartbeat: Callable[[], list[Command]] = list,
    ) -> None:
        self.link = Link(redis)
        self.keys = keys
        self.queue = queue
        self.labels = labels
        self.score = score  # logits -> scores: by the model's function (None), or another (`Classifier.scores`)
        self.cache_ttl_s = cache_ttl_s
        self.result_ttl_s = result_ttl_s
        self.stopping = stopping
        self.heartbeat = heartbeat  # writes that say the worker is alive: a busy worker's beat rides along
        self.answered = 0  # requests
        self.full = False  # the last write found Redis full (said once a spell at WARNING)
        self.busy_since: float | None = None  # monotonic start of the round being written; None while idle
        self._inbox: SimpleQueue[Outcome | None] = SimpleQueue()
        self.thread: threading.Thread | None = None

    def start(self, failure: ThreadFailure) -> None:
        """The thread named `reply`; a bug in it stops the worker (`failure`)."""
        self.thread = threading.Thread(target=failure.guard("reply", self._run), name="reply", daemon=True)
        self.thread.start()

    def computed(self, texts: list[Text], logits: np.ndarray) -> None:
        self._inbox.put(Outcome(texts, logits=logits))

    def cached(self, hits: list[tuple[Text, bytes]]) -> None:
        self._inbox.put(Outcome([t for t, _ in hits], predictions=[p for _, p in hits]))

    def failed(self, texts: list[Text], error: str) -> None:
        self._inbox.put(Outcome(texts, error=error))

    def refused(self, texts: list[tuple[Text, int]], max_tokens: int) -> None:
        """Texts longer than the model's `max_tokens` (`reject`): their requests fail, each naming
        its texts' places and token counts (`Result.too_long`), which the API answers as a 422."""
        error = f"longer than the model's {max_tokens} tokens (SENTIMENT_LONG_TEXTS=reject)"
        self._inbox.put(Outcome([t for t, _ in texts], error=error, tokens=[n for _, n in texts]))

    def late(self, texts: list[Text]) -> None:
        """Every request waiting on `texts` is answered as late (`plan.Window._in_time` dropped them)."""
        metrics.WORK_ITEMS_LATE.inc(len({id(held) for text in texts for held, _ in text.waiters}))
        self._inbox.put(Outcome(texts, late=True))

    def close(self) -> None:
        """Write what was put so far, then end the thread."""
        self._inbox.put(None)
        if self.thread is not None:
            self.thread.join()

    def _run(self) -> None:
        closing = False
        while not closing:
            outcomes = [self._inbox.get()]
            while not self._inbox.empty():
                outcomes.append(self._inbox.get_nowait())
            closing = None in outcomes
            cpu, self.busy_since = time.thread_time(), time.monotonic()
            self._write([o for o in outcomes if o is not None])
            self.busy_since = None
            metrics.STAGE_CPU_SECONDS.labels("reply").inc(time.thread_time() - cpu)

    @staticmethod
    def _pooled(outcome: Outcome) -> Outcome:
        """A forward's outcome with chunked texts' chunks kept aside (`Chunks`): each text whose last
        chunk came is in it with its pooled logits, the other chunks are not."""
        if outcome.logits is None or all(t.chunks is None for t in outcome.texts):
            return outcome
        texts, rows = [], []
        for text, row in zip(outcome.texts, outcome.logits, strict=True):
            if text.chunks is None:
                texts.append(text)
                rows.append(row)
            elif pooled := text.chunks.computed(text.chunk, row):
                whole, logits = pooled
                texts.append(whole)
                rows.append(logits)
        labels = outcome.logits.shape[1]
        return Outcome(texts, logits=np.stack(rows) if rows else np.empty((0, labels), dtype=np.float32))

    def _scores(self, outcome: Outcome) -> list[list[float]]:
        """Each computed text's scores: by the model's own function, or by the one its requests named
        (a text asked for under another function is a text of its own, `Text.function`)."""
        assert outcome.logits is not None
        scores = self.score(outcome.logits, None)
        for row, text in enumerate(outcome.texts):
            if text.function is not None:
                scores[row] = self.score(outcome.logits[row : row + 1], text.function)[0]
        return scores.tolist()

    def _write(self, outcomes: list[Outcome]) -> None:
        writes: list[Command] = []
        finished: list[Held] = []
        for outcome in map(self._pooled, outcomes):
            predictions = outcome.predictions
            if outcome.logits is not None:
                predictions = [encode_prediction(self.labels, row) for row in self._scores(outcome)]
                writes += [
                    ("SET", t.key, p, "EX", self.cache_ttl_s) for t, p in zip(outcome.texts, predictions, strict=True)
                ]
            for text, tokens in zip(outcome.texts, outcome.tokens or [], strict=False):  # every refused text named
                for held, at in text.waiters:
                    if not held.answered:
                        held.too_long.append([at, tokens])
            for index, text in enumerate(outcome.texts):
                for held, at in text.waiters:
                    if held.answered:
                        continue
                    if outcome.late:
                        held.late = True
                    elif predictions is None:
                        held.error = outcome.error
                    else:
                        held.fill(at, predictions[index])
                    if held.complete:
                        held.answered = True
                        finished.append(held)
        now = time.time()
        answers: dict[str, list[tuple[str, bytes]]] = {}  # by reply channel
        done: dict[str, list[str]] = {}  # answered ids by client: no longer its outstanding work
        acknowledged: list[Command] = []
        for held in finished:
            result = held.result()
            # Read only by a waiter the reply missed, and nobody waits past the deadline: a second more at most.
            ttl_s = min(self.result_ttl_s, max(held.item.deadline - now, 0.0) + 1.0)
            writes.append(("SET", self.keys.result(held.item.id), result, "PX", int(ttl_s * 1000)))
            acknowledged.append(("LREM", self.queue.processing_list(held.bulk), 1, held.raw))
            answers.setdefault(held.item.reply_to, []).append((held.item.id, result))
            done.setdefault(held.item.client, []).append(held.item.id)
        # What answers the requests, and needs no memory: each PUBLISH before any LREM (`_deliver`).
        delivery: list[Command] = [("PUBLISH", channel, replies(pairs)) for channel, pairs in answers.items()]
        delivery += [("ZREM", self.keys.outstanding(client), *ids) for client, ids in done.items()]
        delivery += acknowledged
        self.answered += len(finished)
        if writes:
            with (
                tracing.linked_span("worker.reply", (h.item.traceparent for h in finished), requests=len(finished))
                if tracing.enabled
                else tracing.OFF
            ):
                self._execute(writes, delivery)
        self.queue.held_raws.difference_update(held.raw for held in finished)

    def _execute(self, writes: list[Command], delivery: list[Command]) -> None:
        """The cache and result `writes`, the `delivery` and the beat in one transaction (nothing
        applies if Redis refuses any of it), sent again until it goes; a stopping worker gives up,
        leaving the work in its processing list for another worker. A Redis full (OOM) takes the
        `delivery` alone (`_deliver`)."""
        backoff = Backoff(log, self.stopping)
        while True:
            try:
                self.link.transaction(*writes, *delivery, *self.heartbeat())
                self.full = False
                return
            except OutOfMemoryError as exc:
                if self._deliver(delivery, len(writes), exc):
                    return
                error: RedisError = exc
            except RedisError as exc:
                error = exc
            if self.stopping.is_set() or backoff.wait(error):
                log.warning("results not written (%s); their work stays queued for another worker", describe(error))
                return

    def _deliver(self, delivery: list[Command], dropped: int, full: OutOfMemoryError) -> bool:
        """Redis is at its maxmemory with nothing it may evict, and refuses every transaction: send the
        answers' PUBLISHes, then the ZREMs and LREMs, outside one (Redis takes them full: they need no
        memory; a worker dying between them leaves an answered item to be computed again, never an
        item lost), without the `dropped` cache entries, result keys and beat. Whether it went."""
        try:
            if delivery:
                self.link.call(*delivery)
        except RedisError:
            return False
        level = logging.DEBUG if self.full else logging.WARNING
        log.log(level, "redis is full (%s): answers sent without %d cache and result writes", describe(full), dropped)
        self.full = True
        return True
