"""A model ready to classify: its checkpoint (files, version, labels, score function, tokenizer) and the
engine that runs it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from core.protocol import ScoreFunction
from core.settings import Settings
from model_store import scoring
from model_store.checkpoint import Checkpoint
from model_store.cost import ForwardCost
from model_store.engine import Engine, EngineName, Precision, load_engine
from model_store.long_texts import LongTexts, Splitter

log = logging.getLogger(__name__)


class Classifier:
    """`tokenize` texts, then `forward` batches of token ids to label scores."""

    def __init__(
        self,
        model_dir: Path,
        device: str = "auto",
        threads: int | None = None,
        precision: Precision = "auto",
        interop_threads: int | None = None,
        engine: EngineName = "auto",
        lanes: int | None = None,
        long_texts: LongTexts = LongTexts.TRUNCATE,
        int8_dir: Path | None = None,
        int8_allow_failing: bool = False,
    ) -> None:
        self.checkpoint = Checkpoint(model_dir)
        self.long_texts = LongTexts(long_texts)
        # Texts to token ids as the worker computes them: long ones truncated, whole (to reject), or in chunks.
        self.split: Splitter = self.checkpoint.splitter(self.long_texts)
        self.engine: Engine = load_engine(
            self.checkpoint, engine, device, precision, threads, interop_threads, lanes, int8_dir, int8_allow_failing
        )
        self.name = self.checkpoint.name
        self.labels = self.checkpoint.labels
        self.function = self.checkpoint.function
        self.max_length = self.checkpoint.max_length
        # Each handling of long texts answers them differently: its own cache (truncate, the default, none).
        handling = "" if self.long_texts == LongTexts.TRUNCATE else f"-{self.long_texts}"
        self.version = self.checkpoint.version(self.engine.precision) + handling
        # The first call pays allocator and kernel set-up; a text the engine computed, to tell a broken
        # engine from texts it cannot take (`batcher.forward`).
        [self.known_good] = self.tokenize(["warm up"])
        self.forward([self.known_good])
        log.info(
            "model %s version %s on %s (%s, %s, %d threads, %d forward lanes), labels %s, scores by %s, long texts %s",
            self.name,
            self.version,
            self.device,
            self.dtype_name,
            self.engine.name,
            self.engine.threads,
            self.lanes,
            self.labels,
            self.function,
            self.long_texts,
        )

    @classmethod
    def from_settings(cls, settings: Settings, threads: int | None = None) -> Classifier:
        """The model as a worker process is configured to run it (`threads` overrides the setting)."""
        return cls(
            settings.model_dir,
            device=settings.device,
            threads=threads or settings.torch_threads,
            precision=settings.precision,
            interop_threads=settings.torch_interop_threads,
            engine=settings.engine,
            lanes=settings.forward_lanes,
            long_texts=LongTexts(settings.long_texts),
            int8_dir=settings.int8_dir,
            int8_allow_failing=settings.int8_allow_failing,
        )

    @property
    def device(self) -> str:
        return self.engine.device

    @property
    def dtype_name(self) -> str:
        return self.engine.dtype

    @property
    def cost(self) -> ForwardCost:
        return self.engine.cost

    @property
    def lanes(self) -> int:
        return self.engine.lanes

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, truncated to the model's length (benchmarks, the naive baseline)."""
        return self.checkpoint.tokenize(texts)

    def scores(self, logits: np.ndarray, function: ScoreFunction | None = None) -> np.ndarray:
        """The engine's logits as scores: by the model's own function, or `function`."""
        return scoring.apply(function or self.function, logits)

    def forward(self, batch: list[list[int]], packed: bool = False) -> list[list[float]]:
        """Label scores per text, as plain lists (tests, benchmarks)."""
        return self.scores(self.engine.forward(batch, packed)).tolist()
