"""What a worker holds: the work items it took (until answered), and the distinct texts they wait on."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import cast

import numpy as np

from core.protocol import Result, ScoreFunction, WorkItem, encode_result
from model_store.long_texts import pool


@dataclass(eq=False, slots=True)
class Held:
    """A work item in this worker's processing list, until every text of it has a prediction or it failed.
    Filled by the reply stage alone."""

    raw: bytes  # exactly as queued: acknowledging removes this value from the processing list
    item: WorkItem
    predictions: list[bytes | None] = field(init=False)  # each text's, encoded
    missing: int = field(init=False)
    error: str | None = None  # the model failed on one of its texts, or refused it
    too_long: list[list[int]] = field(default_factory=list)  # refused texts: [index, tokens] (`Result.too_long`)
    late: bool = False  # dropped at the plan: it could not be answered by its deadline
    answered: bool = False
    started: bool = False  # a text of it has gone into a forward (its queue wait is recorded)
    bulk: bool = False  # of the bulk class (a /jobs chunk, `Keys.bulk`): held in the bulk processing list

    def __post_init__(self) -> None:
        self.predictions = [None] * len(self.item.texts)
        self.missing = len(self.item.texts)

    def fill(self, index: int, prediction: bytes) -> None:
        if self.predictions[index] is None:
            self.missing -= 1
        self.predictions[index] = prediction

    @property
    def complete(self) -> bool:
        return self.missing == 0 or self.error is not None or self.late

    def result(self) -> bytes:
        if self.late:
            return Result(late=True).encode()
        if self.error is not None:
            return Result(error=self.error, too_long=self.too_long or None).encode()
        return encode_result(cast("list[bytes]", self.predictions))  # complete: no None left


@dataclass(eq=False, slots=True)
class Text:
    """One distinct text taken from the queue: its cache key, token ids, and every (item, index) that
    asked for it, so a text in several requests goes through the model once. A text asked for with
    another score function than the model's is cached apart (its key), so it is another `Text`."""

    text: str
    key: str  # its cache key
    waiters: list[tuple[Held, int]]
    arrived: float  # unix s: its first request's enqueue time (the API's clock), at most the time it was held
    ids: list[int] = field(default_factory=list)
    turn: float = 0.0  # its place in the fair order between clients (`turns.Turns.take`)
    function: ScoreFunction | None = None  # the score function its requests named; None: the model's
    chunks: Chunks | None = None  # a chunked text's chunk: the chunks of the text it is part of
    chunk: int = 0  # which chunk of it

    @property
    def deadline(self) -> float:
        """Unix s past which no request waits for this text."""
        return max(held.item.deadline for held, _ in self.waiters)


@dataclass(eq=False, slots=True)
class Chunks:
    """A chunked text on its way through the lanes: its chunks, each a `Text` of its own in the
    batches, and their logits as the reply stage gets them. Each chunk has its own list of the
    text's waiters, so the plan takes a request off the chunks it still holds (dropped, or late)
    without touching those a lane or the reply stage has."""

    text: Text  # the whole text: its cache key, waiters and score function
    texts: list[Text]
    weights: list[int]  # each chunk's text tokens (`model_store.long_texts.pool`)
    logits: list[np.ndarray | None]

    @classmethod
    def of(cls, text: Text, chunks: list[list[int]], weights: list[int]) -> Chunks:
        whole = cls(text, [], weights, [None] * len(chunks))
        whole.texts = [
            # A key per chunk of this take: the same text taken again (another take) is computed again.
            replace(text, key=f"{text.key}#{id(whole)}.{n}", waiters=list(text.waiters), ids=ids)
            for n, ids in enumerate(chunks)
        ]
        for n, chunk in enumerate(whole.texts):
            chunk.chunks, chunk.chunk = whole, n
        return whole

    def computed(self, chunk: int, logits: np.ndarray) -> tuple[Text, np.ndarray] | None:
        """Keep one chunk's logits. Once every chunk has come: the whole text, waited for by the
        requests that waited for every chunk (one taken off a chunk was answered otherwise), and
        its pooled logits; else None."""
        self.logits[chunk] = logits
        if any(row is None for row in self.logits):
            return None
        waiters = [pair for pair in self.text.waiters if all(pair in t.waiters for t in self.texts)]
        return replace(self.text, waiters=waiters), pool(np.stack(cast("list[np.ndarray]", self.logits)), self.weights)


def traceparents(texts: Iterable[Text]) -> set[str]:
    """The trace contexts of the requests waiting on `texts`, each once (tracing: their spans' links)."""
    return {held.item.traceparent for text in texts for held, _ in text.waiters if held.item.traceparent}
