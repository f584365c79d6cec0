"""Batch forming: the first work item blocks, then the batch fills from what is queued.

As in Ray Serve's `serve/batching.py`: a batch goes as soon as it is full (texts or padded
tokens); when the queue had work waiting it goes as soon as the queue is drained; a lone request
waits at most `max_wait` for company, and only when recent arrivals say company is likely within
that time. Items larger than a batch are split across batches.

Length-aware: a deep queue is read ahead into a window of up to `window` texts, and each batch is
the oldest waiting text plus the texts closest to it in token length. Padding each batch to its
longest text then wastes little, and the oldest text always goes next, so nothing starves.
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
from model_store.cost import ForwardCost

log = logging.getLogger(__name__)

TAKE_AT_ONCE = 64  # most items one round trip to Redis takes


def batch_cut(lengths: Sequence[int], max_size: int, max_tokens: int) -> int:
    """How many leading texts (by token length) make one batch within both caps; at least one."""
    longest = 0
    for count, length in enumerate(lengths, start=1):
        longest = max(longest, length)
        if count > max_size or count * longest > max_tokens:
            return max(count - 1, 1)
    return len(lengths)


def split_by_length(lengths: Sequence[int], max_size: int, max_tokens: int, cost: ForwardCost) -> list[tuple[int, bool]]:
    """Where to cut length-sorted texts into forwards, and which layout each takes, so the model
    does the least work.

    A padded forward computes texts x longest positions, a packed one (where the model packs)
    exactly the texts' tokens plus attention across them; each call also has a fixed cost
    (`model_store.cost.ForwardCost`). Dynamic programming over the sorted lengths finds the
    cheapest cuts within the caps (at most `max_size` texts, `max_tokens` positions). A batch of
    32 texts in arrival order pads to its longest text; cut here into length-homogeneous forwards,
    DistilBERT-base on 2 CPU cores goes from 45 to ~90 texts/s, and packed from there to about
    the model's speed on length-sorted batches (docs/tuning.md). Returns (end index, packed) per forward.
    """
    count = len(lengths)
    before = [0]  # tokens before each index
    for length in lengths:
        before.append(before[-1] + length)
    best = [0.0] + [float("inf")] * count
    choice = [(0, False)] * (count + 1)  # (start, packed) of the cheapest last forward ending here
    for end in range(1, count + 1):
        for start in range(max(0, end - max_size), end):
            size = end - start
            if size == 1 or size * lengths[end - 1] <= max_tokens:
                if (c := best[start] + cost.padded(size, lengths[end - 1])) < best[end]:
                    best[end], choice[end] = c, (start, False)
            total = before[end] - before[start]
            if cost.packs and size > 1 and total <= max_tokens:
                if (c := best[start] + cost.packed(total)) < best[end]:
                    best[end], choice[end] = c, (start, True)
    forwards = []
    end = count
    while end > 0:
        start, packed = choice[end]
        forwards.append((end, packed))
        end = start
    return forwards[::-1]


@dataclass(eq=False)
class Held:
    """A work item this worker holds in its processing list until every text has a prediction."""

    raw: bytes  # exactly as queued: acknowledging removes this value from the processing list
    item: WorkItem
    predictions: list[Prediction | None] = field(init=False)
    missing: int = field(init=False)
    error: str | None = None  # set when the model failed on this item's texts
    answered: bool = False  # its result is written (a later batch may still hold its other texts)

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


def nearest_in_length(lengths: Sequence[int], max_size: int, max_tokens: int) -> list[int]:
    """Indices of one batch within both caps: text 0 (the oldest) plus texts close to it in length.

    Of the runs of texts in length order that contain text 0, the one with the fewest padded
    tokens per real token; a batch short of `max_size` counts double while there are texts enough
    to fill one (fewer, larger forwards), and one that runs out of longer texts counts only where
    no full run qualifies: the oldest text, however long, never makes a small batch of its own
    while there are texts enough to fill one (the forwards cut the batch by length anyway,
    `split_by_length`). Returned in ascending index (arrival) order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    anchor = order.index(0)
    full = min(max_size, len(order))
    best: tuple[tuple[bool, float], int, int] | None = None
    for start in range(max(0, anchor - max_size + 1), anchor + 1):
        run = [lengths[i] for i in order[start : start + max_size]]
        count = batch_cut(run, max_size, max_tokens)
        if start + count <= anchor:  # the caps cut the run before the oldest text
            continue
        waste = count * max(run[count - 1], 1) / max(sum(run[:count]), 1)
        if count < full:
            waste *= 2
        rank = (len(run) < full, waste)  # runs cut short by the end of the order last
        if best is None or rank < best[0]:
            best = (rank, start, count)
    assert best is not None  # the run that starts at the oldest text always qualifies
    _, start, count = best
    return sorted(order[start : start + count])


class Arrivals:
    """When recent work items were taken: is company for a lone request likely within the wait?"""

    def __init__(self, keep: int = 8) -> None:
        self._times: deque[float] = deque(maxlen=keep)

    def add(self, when: float) -> None:
        self._times.append(when)

    def mean_gap(self) -> float:
        """Mean seconds between the recent arrivals; infinite until there are two."""
        if len(self._times) < 2:
            return float("inf")
        return (self._times[-1] - self._times[0]) / (len(self._times) - 1)


class Batcher:
    """Turns the work queue into model batches of at most `max_size` texts and `max_tokens` padded tokens."""

    def __init__(
        self,
        queue: WorkQueue,
        tokenize: Callable[[list[str]], list[list[int]]],
        max_size: int,
        max_tokens: int,
        max_wait_s: float,
        window: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue = queue
        self.tokenize = tokenize
        self.max_size = max_size
        self.max_tokens = max_tokens
        self.max_wait_s = max_wait_s
        self.window = max(window or max_size, max_size)  # texts read ahead to sort by length
        self.clock = clock
        self.expired = 0  # items skipped because their deadline had passed
        self.arrivals = Arrivals()
        self._slots: deque[Slot] = deque()  # taken texts not yet in a batch (oldest first)
        self._burst = 1  # items the next `_take_queued` asks for
        self._texts_per_item = 1

    def next_batch(self, idle_timeout: float, company: bool = True) -> list[Slot]:
        """The next batch, or [] when no work came within `idle_timeout` seconds.

        `company=False` never waits for more work once some is in hand (the caller has a batch
        running and results to write).
        """
        backlog = bool(self._slots)  # the rest of a split item or of the window: no waiting
        give_up = self.clock() + idle_timeout
        while not self._slots:  # (expired items are dropped on the way)
            if not self._take(max(give_up - self.clock(), 0)):
                return []
        company = company and self.arrivals.mean_gap() <= self.max_wait_s
        window_ends = self.clock() + self.max_wait_s
        while len(self._slots) < self.window:
            if self._take_queued():
                backlog = True
                continue
            if backlog or not company or self._full():
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
        self._admit([raw])
        return True

    def _take_queued(self) -> bool:
        """Take what is queued, up to the window, in one round trip; False when nothing was.

        How many items to ask for grows while the queue keeps up and falls to what it had, so an
        emptying queue costs few empty moves; items are counted at the texts per item last seen.
        """
        room = max(1, (self.window - len(self._slots)) // self._texts_per_item)
        raws = self.queue.take_queued(min(room, self._burst))
        self._burst = min(self._burst * 2, TAKE_AT_ONCE) if len(raws) == self._burst else max(len(raws), 1)
        self._admit(raws)
        return bool(raws)

    def _admit(self, raws: list[bytes]) -> None:
        """Decode taken items, drop malformed and expired ones, and tokenize the rest in one call."""
        now, held = self.clock(), []
        for raw in raws:
            try:
                item = WorkItem.decode(raw)
            except (ValueError, TypeError):  # not our protocol: nobody can be answered, never retry it
                log.error("dropped a malformed work item (%d bytes)", len(raw))
                self.queue.ack(raw)
                continue
            self.arrivals.add(now)
            if item.deadline < time.time():
                self.queue.ack(raw)
                self.expired += 1
                metrics.WORK_ITEMS_EXPIRED.inc()
                log.info("skipped work item %s: its deadline passed in the queue", item.id)
                continue
            held.append(Held(raw, item))
        if not held:
            return
        ids = iter(self.tokenize([t for h in held for t in h.item.texts]))
        for h in held:
            self._slots.extend(Slot(h, i, next(ids)) for i in range(len(h.item.texts)))
        self._texts_per_item = max(1, round(sum(len(h.item.texts) for h in held) / len(held)))

    def _fits(self) -> int:
        return batch_cut([len(s.ids) for s in self._slots], self.max_size, self.max_tokens)

    def _full(self) -> bool:
        return len(self._slots) >= self.max_size or self._fits() < len(self._slots)

    def _cut(self) -> list[Slot]:
        if self._fits() == len(self._slots):  # it all fits: one batch, in arrival order
            batch = list(self._slots)
            self._slots.clear()
            return batch
        chosen = nearest_in_length([len(s.ids) for s in self._slots], self.max_size, self.max_tokens)
        batch = [self._slots[i] for i in chosen]
        taken = set(chosen)
        self._slots = deque(s for i, s in enumerate(self._slots) if i not in taken)
        return batch
