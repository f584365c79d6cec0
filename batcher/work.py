"""What a worker holds: the work items it took (until answered), and the distinct texts they wait on."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from core.protocol import Result, ScoreFunction, WorkItem, encode_result


@dataclass(eq=False, slots=True)
class Held:
    """A work item in this worker's processing list, until every text of it has a prediction or it failed.
    Filled by the reply stage alone."""

    raw: bytes  # exactly as queued: acknowledging removes this value from the processing list
    item: WorkItem
    predictions: list[bytes | None] = field(init=False)  # each text's, encoded
    missing: int = field(init=False)
    error: str | None = None  # the model failed on one of its texts
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
            return Result(error=self.error).encode()
        return encode_result(cast("list[bytes]", self.predictions))  # complete: no None left


@dataclass(eq=False, slots=True)
class Text:
    """One distinct text taken from the queue: its cache key, token ids, and every (item, index) that
    asked for it, so a text in several requests goes through the model once. A text asked for with
    another score function than the model's is cached apart (its key), so it is another `Text`."""

    text: str
    key: str  # its cache key
    waiters: list[tuple[Held, int]]
    arrived: float  # unix s: its first request's enqueue time (the API's clock)
    ids: list[int] = field(default_factory=list)
    turn: float = 0.0  # its place in the fair order between clients (`plan.Window.add`)
    function: ScoreFunction | None = None  # the score function its requests named; None: the model's

    @property
    def deadline(self) -> float:
        """Unix s past which no request waits for this text."""
        return max(held.item.deadline for held, _ in self.waiters)


def traceparents(texts: Iterable[Text]) -> set[str]:
    """The trace contexts of the requests waiting on `texts`, each once (tracing: their spans' links)."""
    return {held.item.traceparent for text in texts for held, _ in text.waiters if held.item.traceparent}
