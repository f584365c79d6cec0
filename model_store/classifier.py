"""A model ready to classify: its checkpoint (files, version, labels, tokenizer) and the engine that runs it."""

from __future__ import annotations

import logging
from pathlib import Path

from core.settings import Settings
from model_store.checkpoint import Checkpoint
from model_store.cost import ForwardCost
from model_store.engine import Engine, EngineName, Precision, load_engine

log = logging.getLogger(__name__)


class Classifier:
    """`tokenize` texts, then `forward` batches of token ids to label probabilities."""

    def __init__(
        self,
        model_dir: Path,
        device: str = "auto",
        threads: int | None = None,
        precision: Precision = "auto",
        interop_threads: int | None = None,
        engine: EngineName = "auto",
        lanes: int | None = None,
    ) -> None:
        self.checkpoint = Checkpoint(model_dir)
        self.engine: Engine = load_engine(self.checkpoint, engine, device, precision, threads, interop_threads, lanes)
        self.name = self.checkpoint.name
        self.labels = self.checkpoint.labels
        self.max_length = self.checkpoint.max_length
        self.version = self.checkpoint.version(self.engine.precision)
        self.forward(self.tokenize(["warm up"]))  # the first call pays allocator and kernel set-up
        log.info(
            "model %s version %s on %s (%s, %s, %d threads, %d forward lanes), labels %s",
            self.name,
            self.version,
            self.device,
            self.dtype_name,
            self.engine.name,
            self.engine.threads,
            self.lanes,
            self.labels,
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
        return self.checkpoint.tokenize(texts)

    def forward(self, batch: list[list[int]], packed: bool = False) -> list[list[float]]:
        """Label probabilities per text, as plain lists (tests, benchmarks, bulk jobs)."""
        return self.engine.forward(batch, packed).tolist()
