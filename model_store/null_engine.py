"""The null engine: constant logits of the right shape at almost no cost.

Not a model: `sentiment serve` and `sentiment bench` select it (SENTIMENT_ENGINE=null) to measure
the service's own ceiling, everything around the forward, on any machine. Its answers are cached
under their own version (`-null`), never mixed with a real model's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model_store.cost import ForwardCost


class NullEngine:
    """Every text gets the same logits: 0, 1, 2, ... over the labels."""

    name = "null"
    device = "cpu"
    precision = "null"
    dtype = "float32"
    threads = 1
    lanes = 1
    # A call costs as much as a few texts, so batches are cut as for a fast accelerator: few, large.
    cost = ForwardCost(overhead_tokens=1024, attention_tokens=2048, packs=False)

    def __init__(self, labels: int) -> None:
        self._row = np.arange(labels, dtype=np.float32)

    def start_lane(self) -> None:
        """Nothing runs on the calling thread but this copy."""

    def forward(self, batch: Sequence[list[int]], packed: bool = False) -> np.ndarray:
        return np.broadcast_to(self._row, (len(batch), len(self._row)))
