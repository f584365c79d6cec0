"""Benchmark (1), the limit: raw model forward throughput per batch size, no service around it.

Texts are tokenized up front and sorted by length in windows (as a worker with a deep queue
batches them), so each batch pads only to its own longest text; only the forwards are timed. With
several workers (`--workers`), as many copies of the model run side by side, each with the threads
one worker gets, and each copy's forward lanes (`SENTIMENT_FORWARD_LANES`) forward side by side
too: the limit of the arrangement the service runs.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from model_store.classifier import Classifier
from model_store.engine import EngineName, Precision

SORT_WINDOW = 512


def batches(ids: list[list[int]], size: int, window: int = SORT_WINDOW) -> list[list[list[int]]]:
    """Batches of `size` cut from windows sorted by token length, in a fixed shuffled order: a run
    stopped by the clock after any number of batches has still seen texts of every length."""
    out: list[list[list[int]]] = []
    for start in range(0, len(ids), window):
        chunk = sorted(ids[start : start + window], key=len)
        out.extend(chunk[i : i + size] for i in range(0, len(chunk), size))
    random.Random(0).shuffle(out)
    return out


class Limit:
    """The model alone, loaded once per worker: the curve over batch sizes, and the best size's rate
    again on demand, so the service's saturation point is compared with the limit measured beside it."""

    def __init__(
        self,
        model_dir: Path,
        device: str,
        threads: int | None,
        precision: Precision,
        engine: EngineName,
        texts: list[str],
        copies: int = 1,
        lanes: int | None = None,
        int8_allow_failing: bool = False,
    ) -> None:
        self.copies = [
            Classifier(
                model_dir, device, threads, precision, engine=engine, lanes=lanes, int8_allow_failing=int8_allow_failing
            )
            for _ in range(copies)
        ]
        self.classifier = self.copies[0]
        self.ids = self.classifier.tokenize(texts)

    def point(self, size: int, duration_s: float) -> dict[str, float]:
        """Sentences/s and mean padded width at one batch size, every lane of every copy forwarding
        for about `duration_s` (cycling through the texts if they run out first, as on a fast GPU)."""
        work = batches(self.ids, size)
        self._streams(work, 0.0)  # a new shape's first forward pays set-up costs
        started = time.perf_counter()
        counts = self._streams(work, started + duration_s)
        elapsed = time.perf_counter() - started
        done, padded = sum(c[0] for c in counts), sum(c[1] for c in counts)
        return {
            "batch_size": size,
            "texts": done,
            "seconds": round(elapsed, 3),
            "texts_per_s": round(done / elapsed, 2),
            "mean_padded_tokens": round(padded / done, 1),
        }

    def _streams(self, work: list[list[list[int]]], until: float) -> list[tuple[int, int]]:
        """Every lane of every copy forwarding its share of `work` on a thread of its own, as the
        workers' lanes do, until `until`: (texts, padded tokens) per stream."""
        streams = [copy for copy in self.copies for _ in range(copy.lanes)]
        counts: list[tuple[int, int]] = [(0, 0)] * len(streams)

        def stream(k: int) -> None:
            counts[k] = _forward_until(streams[k], work[k :: len(streams)] or work, until)

        threads = [threading.Thread(target=stream, args=(k,), name=f"limit-{k}") for k in range(len(streams))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return counts

    def measure(
        self, sizes: list[int], duration_s: float, progress: Callable[[str, Mapping[str, object]], None]
    ) -> dict[str, object]:
        """Benchmark (1): one point per batch size."""
        points = []
        for size in sizes:
            points.append(self.point(size, duration_s))
            progress("limit", points[-1])
        c = self.classifier
        return {
            "model": c.name,
            "dtype": c.dtype_name,
            "engine": c.engine.name,
            "copies": len(self.copies),
            "lanes": c.lanes,
            "points": points,
        }


def _forward_until(classifier: Classifier, work: list[list[list[int]]], until: float) -> tuple[int, int]:
    """Forward `work`'s batches in a cycle until the clock passes `until` (at least one), on the
    calling thread as a lane of the engine: (texts, padded tokens)."""
    classifier.engine.start_lane()
    done = padded = 0
    for batch in itertools.cycle(work):
        classifier.engine.forward(batch)
        done += len(batch)
        padded += len(batch) * max(map(len, batch))
        if time.perf_counter() >= until:
            break
    return done, padded
