"""The forward stage: the engine's lanes, each a thread that takes its next forward and runs it.

A lane asks `Window` for a forward when it is free, runs it on the engine, and hands the
logits to the reply stage. A forward that fails, or answers another shape than a row of
finite label logits per text, is run again one text at a time, so a text the model cannot take fails
only the requests that hold it. When every text fails alone too, and so does the text the engine
computed at start, the engine is broken (a CUDA error fails every call after it), not the texts:
`EngineFailed` stops the worker, whose work goes back to the queue for another.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from contextlib import AbstractContextManager

import numpy as np
from opentelemetry.trace import Span, SpanKind

from batcher import metrics
from batcher.batches import Forward
from batcher.plan import Window
from batcher.reply import Replies
from batcher.thread_failure import ThreadFailure, stops
from batcher.work import Text, traceparents
from core import tracing
from model_store.engine import Engine

log = logging.getLogger(__name__)


class EngineFailed(Exception):
    """The engine fails even the text it computed at start: it is broken, whatever it is given."""


class Lanes:
    """`engine.lanes` threads named `forward-N`; `running` holds each busy lane's forward and start."""

    def __init__(self, engine: Engine, labels: int, window: Window, replies: Replies, known_good: list[int]) -> None:
        self.engine = engine
        self.labels = labels
        self.known_good = known_good  # token ids the engine computed at start (`Classifier.known_good`)
        self.window = window
        self.replies = replies
        self.running: dict[int, tuple[Forward, float]] = {}  # lane -> (forward, unix start)
        self.forwards = self.computed = self.largest_forward_requests = 0
        self._tally = threading.Lock()
        self.threads: list[threading.Thread] = []

    def start(self, failure: ThreadFailure) -> None:
        """One thread per lane; a bug in one (not a model failure) stops the worker (`failure`)."""
        for lane in range(self.engine.lanes):
            run = failure.guard(f"forward-{lane}", functools.partial(self._run, lane))
            self.threads.append(threading.Thread(target=run, name=f"forward-{lane}", daemon=True))
            self.threads[-1].start()

    def join(self) -> None:
        for thread in self.threads:
            if thread.ident is not None:  # (started)
                thread.join()

    def _run(self, lane: int) -> None:
        self.engine.start_lane()
        cpu = time.thread_time()
        while (forward := self.window.next_forward()) is not None:
            self.running[lane] = (forward, time.time())
            self._count(forward)  # before any reply it leads to: their transactions carry the heartbeat
            metrics.forward_started(forward.texts)
            started, wall = time.thread_time(), time.monotonic()
            metrics.STAGE_CPU_SECONDS.labels("plan").inc(started - cpu)
            try:
                with metrics.busy(), self._span(forward, lane) if tracing.enabled else tracing.OFF:
                    logits = self._forward(forward)
            finally:
                del self.running[lane]
                cpu = time.thread_time()
                metrics.STAGE_CPU_SECONDS.labels("forward").inc(cpu - started)
            if logits is not None:
                self.window.forward_took(forward, time.monotonic() - wall)
                metrics.bulk_computed(forward.texts)
                self.replies.computed(forward.texts, logits)

    def _span(self, forward: Forward, lane: int) -> AbstractContextManager[Span]:
        """The forward's span (tracing on), linked to every request it serves."""
        texts = forward.texts
        return tracing.linked_span(
            "worker.forward",
            traceparents(texts),
            SpanKind.CONSUMER,
            requests=len({id(held) for text in texts for held, _ in text.waiters}),
            texts=len(texts),
            tokens=sum(len(t.ids) for t in texts),
            queue_wait_s=time.time() - min(t.arrived for t in texts),  # its oldest text's, since the API queued it
            packed=forward.packed,
            lane=lane,
        )

    def _forward(self, forward: Forward) -> np.ndarray | None:
        try:
            return self._checked(
                metrics.timed_forward(self.engine.forward, [t.ids for t in forward.texts], forward.packed),
                len(forward.texts),
            )
        except BaseException as exc:  # (a Rust panic too: `stops`)
            if stops(exc):
                raise
            self._one_by_one(forward.texts, exc)
            return None

    def _checked(self, logits: np.ndarray, texts: int) -> np.ndarray:
        """The engine's answer, if it is one row of finite label logits per text (else ValueError: a
        model failure; a NaN or an infinity has no score, and JSON would cache it as null)."""
        if not isinstance(logits, np.ndarray) or logits.shape != (texts, self.labels):
            shape = getattr(logits, "shape", type(logits).__name__)
            raise ValueError(f"the engine answered {shape} for {texts} texts and {self.labels} labels")
        if not np.isfinite(logits).all():
            raise ValueError("the engine answered logits that are not finite numbers")
        return logits

    def _one_by_one(self, texts: list[Text], failure: BaseException) -> None:
        # Exception messages may quote the input: their text and traceback only at DEBUG.
        log.warning("a forward of %d texts failed (%s); running them one by one", len(texts), type(failure).__name__)
        log.debug("the forward failed with", exc_info=failure)
        failed: list[tuple[Text, BaseException]] = []
        for text in texts:
            try:
                self.replies.computed([text], self._checked(self.engine.forward([text.ids]), 1))
            except BaseException as exc:
                if stops(exc):
                    raise
                failed.append((text, exc))
        if len(failed) == len(texts):
            self._check_engine()
        for text, error in failed:
            log.warning("a text failed in the model (%s)", type(error).__name__)
            log.debug("the text failed with", exc_info=error)
            self.replies.failed([text], f"the model failed on this request's texts ({type(error).__name__})")

    def _check_engine(self) -> None:
        """Raise `EngineFailed` unless the engine still computes the text it computed at start."""
        try:
            self._checked(self.engine.forward([self.known_good]), 1)
        except BaseException as exc:
            if stops(exc):
                raise
            raise EngineFailed(f"the engine fails even the text it computed at start ({type(exc).__name__})") from exc

    def _count(self, forward: Forward) -> None:
        requests = len({id(held) for text in forward.texts for held, _ in text.waiters})
        with self._tally:
            self.forwards += 1
            self.computed += len(forward.texts)
            self.largest_forward_requests = max(self.largest_forward_requests, requests)
