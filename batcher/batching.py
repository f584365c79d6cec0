"""Batch forming: the first work item blocks, then the batch fills from what is queued.

As in Ray Serve's `serve/batching.py`: a batch goes as soon as it is full (texts or padded
tokens); when the queue had work waiting it goes as soon as the queue is drained; a lone request
waits at most `max_wait` for company. Items larger than a batch are split across batches.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from batcher import metrics
from batcher.protocol import Prediction, WorkItem
from batcher.queue import WorkQueue

log = logging.getLogger(__name__)


def batch_cut(lengths: Sequence[int], max_size: int, max_tokens: int) -> int:
    """How many leading texts (by token length) make one batch within both caps; at least one."""
    longest = 0
    for count, length in enumerate(lengths, start=1):
        longest = max(longest, length)
        if count > max_size or count * longest > max_tokens:
            return max(count - 1, 1)
    return len(lengths)


@dataclass(eq=False)
class Held:
    """A work item this worker holds in its processing list until every text has a prediction."""

    raw: bytes  # exactly as queued: acknowledging removes this value from the processing list
    item: WorkItem
    predictions: list[Prediction | None] = field(init=False)
    missing: int = field(init=False)
    error: str | None = None  # set when the model failed on this item's texts

    def __post_init__(self) -> None:
        self.predictions = [None] * len(self.item.texts)
        self.missing = len(self.item.texts)

    def fill(self, index: int, prediction: Prediction) -> None:
        self.predictions[index] = prediction
        self.missing -= 1


@dataclass(eq=False)
class Slot:
    """One text of a held item, tokenized, waiting for a batch."""

    held: Held
    index: int
    ids: list[int]

    @property
    def text(self) -> str:
        return self.held.item.texts[self.index]


class Batcher:
    """Turns the work queue into model batches of at most `max_size` texts and `max_tokens` padded tokens."""

    def __init__(
        self,
        queue: WorkQueue,
        tokenize: Callable[[list[str]], list[list[int]]],
        max_size: int,
        max_tokens: int,
        max_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue = queue
        self.tokenize = tokenize
        self.max_size = max_size
        self.max_tokens = max_tokens
        self.max_wait_s = max_wait_s
        self.clock = clock
        self.expired = 0  # items skipped because their deadline had passed
        self._slots: deque[Slot] = deque()  # taken texts not yet in a batch (FIFO)

    def next_batch(self, idle_timeout: float) -> list[Slot]:
        """The next batch, or [] when no work came within `idle_timeout` seconds."""
        backlog = bool(self._slots)  # the rest of a split item: plenty of work, no waiting
        give_up = self.clock() + idle_timeout
        while not self._slots:  # (expired items are dropped on the way)
            if not self._take(max(give_up - self.clock(), 0)):
                return []
        window_ends = self.clock() + self.max_wait_s
        while not self._full():
            if self._take(0):
                backlog = True
                continue
            if backlog:
                break
            remaining = window_ends - self.clock()
            if remaining <= 0 or not self._take(remaining):
                break
        return self._cut()

    def drop_held(self) -> None:
        """Forget texts in hand (their items stay in the processing list for `give_back`)."""
        self._slots.clear()

    def _take(self, timeout: float) -> bool:
        """Take one item from the queue into the slots; False when none came in time."""
        raw = self.queue.take(timeout)
        if raw is None:
            return False
        try:
            item = WorkItem.decode(raw)
        except (ValueError, TypeError):  # not our protocol: nobody can be answered, never retry it
            log.error("dropped a malformed work item (%d bytes)", len(raw))
            self.queue.ack(raw)
            return True
        if item.deadline < time.time():
            self.queue.ack(raw)
            self.expired += 1
            metrics.WORK_ITEMS_EXPIRED.inc()
            log.info("skipped work item %s: its deadline passed in the queue", item.id)
            return True
        held = Held(raw, item)
        self._slots.extend(Slot(held, i, ids) for i, ids in enumerate(self.tokenize(item.texts)))
        return True

    def _fits(self) -> int:
        return batch_cut([len(s.ids) for s in self._slots], self.max_size, self.max_tokens)

    def _full(self) -> bool:
        return len(self._slots) >= self.max_size or self._fits() < len(self._slots)

    def _cut(self) -> list[Slot]:
        return [self._slots.popleft() for _ in range(self._fits())]
