"""How long a forward takes, measured: the seconds one unit of the engine's cost model takes
(`model_store.cost`), timed on every forward and smoothed.

Per unit of cost rather than per text or per forward, so that every forward measures the same
quantity whatever its size: a lightly loaded worker's forwards of one text predict a full forward
as well as a busy one's do. A forward slowed by something else (a preempted thread on a loaded box)
counts at most `OUTLIER` times the estimate, so one stall does not make the worker refuse work for
seconds. Until the first forward is timed there is no estimate (None): nothing is predicted late,
and the API admits (a cold start admits).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from model_store.cost import ForwardCost

SMOOTHING = 0.2  # weight of the newest forward in the estimate: about the last ten forwards count
OUTLIER = 4.0  # a forward counts at most this many times the estimate, or a fraction as much


class ForwardTime:
    """Seconds per unit of forward cost, and the mean text length, from timed forwards (any lane's)."""

    def __init__(self, cost: ForwardCost) -> None:
        self.cost = cost
        self._per_unit: float | None = None
        self._text_tokens: float | None = None  # mean tokens a text, for the throughput of full forwards
        self._lock = threading.Lock()

    def units(self, lengths: Sequence[int], packed: bool) -> float:
        """The cost of one forward of texts of these token lengths."""
        return self.cost.packed(sum(lengths)) if packed else self.cost.padded(len(lengths), max(lengths))

    def record(self, lengths: Sequence[int], packed: bool, seconds: float) -> None:
        """A forward of texts of these lengths took `seconds` (wall time, as a deadline sees it)."""
        sample = seconds / self.units(lengths, packed)
        mean = sum(lengths) / len(lengths)
        with self._lock:
            if self._per_unit is None or self._text_tokens is None:
                self._per_unit, self._text_tokens = sample, mean
                return
            sample = min(max(sample, self._per_unit / OUTLIER), self._per_unit * OUTLIER)
            self._per_unit += SMOOTHING * (sample - self._per_unit)
            self._text_tokens += SMOOTHING * (mean - self._text_tokens)

    def predict(self, lengths: Sequence[int], packed: bool) -> float | None:
        """Seconds a forward of texts of these lengths would take; None before any forward was timed."""
        per_unit = self._per_unit
        return None if per_unit is None else per_unit * self.units(lengths, packed)

    def full_forward(self, max_texts: int, max_tokens: int) -> tuple[int, float] | None:
        """(texts, seconds) of a full forward of texts of the mean length, within the caps: what a
        lane does under load. None before any forward was timed."""
        per_unit, tokens = self._per_unit, self._text_tokens
        if per_unit is None or tokens is None:
            return None
        length = max(1, round(tokens))
        texts = max(1, min(max_texts, max_tokens // length))
        return texts, per_unit * self.cost.padded(texts, length)
