"""What runs a model's forward: the interface every engine implements, and which engine `auto` picks.

An engine takes batches of token ids and returns the model's logits; it knows nothing of Redis,
batching or texts, nor of the function that makes them scores (`model_store.scoring`, applied after
every engine alike). Engines: torch (CPU fp32/bf16/int8, CUDA fp16/fp32), ONNX Runtime (CPU fp32),
the int8 artifact `sentiment model quantize` makes (on ONNX Runtime or OpenVINO, by its recipe) and
the null engine (constant answers at almost no cost, to measure the service around the model).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from model_store.checkpoint import Checkpoint
from model_store.cost import ForwardCost
from model_store.int8 import DEFAULT_DIR, Artifact, Refused

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "int8"]
EngineName = Literal["auto", "torch", "onnxruntime", "null"]


class Engine(Protocol):
    """Runs forwards. `lanes` forwards may run side by side, each on a thread that called
    `start_lane` once before its first forward (docs/architecture.md, "A worker's threads")."""

    name: str  # torch, onnxruntime, openvino, null
    device: str  # cpu, cuda
    precision: str  # fp32, bf16, fp16, int8, int8-<artifact>, null: what the cache version says
    dtype: str  # what /model reports: float32, bfloat16, float16, int8
    cost: ForwardCost  # what a forward costs, so batches are cut where they cost least
    threads: int  # CPU threads it computes on
    lanes: int

    def start_lane(self) -> None:
        """Make the calling thread one of the `lanes` forward threads."""

    def forward(self, batch: Sequence[list[int]], packed: bool = False) -> np.ndarray:
        """Logits, (texts, labels) float32, for one batch of token ids: padded to its longest text,
        or (`packed`, where `cost.packs`) concatenated into one row."""
        ...


def pick_device(device: str) -> torch.device:
    """`auto` means CUDA when this machine has it, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere oneDNN
    emulates it, far slower than fp32 (docs/tuning.md, "Precision")."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(precision: Precision, device: torch.device, int8: bool = False) -> str:
    """What `auto` means on this machine: float16 on CUDA; on the CPU int8 where an artifact that
    passes the accuracy rule is present (`int8`), else bf16 where the hardware has it (it keeps the
    SST-2 labels), else fp32. Other values are taken as given."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    if int8:
        return "int8"
    return "bf16" if native_bf16() else "fp32"


def resolve_engine(engine: EngineName, device: torch.device, precision: str) -> str:
    """What `auto` means: ONNX Runtime for fp32 (the same arithmetic, faster there, docs/tuning.md,
    "Engine") and int8 (the artifact) on the CPU; torch for CUDA and bf16 autocast."""
    if engine != "auto":
        return engine
    return "onnxruntime" if device.type == "cpu" and precision in ("fp32", "int8") else "torch"


def int8_artifact(
    checkpoint: Checkpoint, directory: Path | None, precision: Precision, allow_failing: bool = False
) -> Artifact | None:
    """The int8 artifact to serve. Asked for (`int8`): the one in `directory` (default: `int8/` in
    the model directory), refused in one line (`Refused`) where there is none, it cannot be trusted, or
    it fails the accuracy rule and `allow_failing` is off. Under `auto`: one that passes, measured on
    this CPU kind and faster there than the float engine it would replace (`Artifact.not_for_here`),
    else None, and the log says which and why."""
    directory = directory or checkpoint.dir / DEFAULT_DIR
    if precision == "int8":
        artifact = Artifact.find(directory, checkpoint.fingerprint)
        if artifact is None:
            raise Refused(
                f"no int8 artifact in {directory}: make one with `sentiment model quantize`, or set "
                "SENTIMENT_ENGINE=torch for torch's dynamic quantization (which fails the accuracy rule)"
            )
        artifact.check(allow_failing)
        return artifact
    try:
        artifact = Artifact.find(directory, checkpoint.fingerprint)
    except Refused as exc:
        log.warning("precision auto: not serving int8: %s", exc)
        return None
    if artifact is None:
        return None
    if not artifact.report.passes:
        log.warning(
            "precision auto: the int8 artifact in %s fails the accuracy rule (%s)", directory, artifact.report.summary()
        )
        return None
    if why := artifact.not_for_here():
        log.warning("precision auto: not serving the int8 artifact in %s: %s", directory, why)
        return None
    log.info("precision auto: serving the int8 artifact in %s (%s)", directory, artifact.report.summary())
    return artifact


def cpu_lanes(lanes: int | None, threads: int, default: int = 2) -> int:
    """The forward lanes of a CPU engine: as asked, else `default` where there are threads for them;
    each lane needs a thread of its own."""
    lanes = lanes or min(default, threads)
    if lanes > threads:
        raise ValueError(f"{lanes} forward lanes need a thread each, and the model has {threads}")
    return lanes


def one_lane(lanes: int | None) -> int:
    """The lanes of an engine that runs one forward at a time: forward lanes are the CPU's engines'
    (torch, ONNX Runtime, OpenVINO), not CUDA's or the null engine's."""
    if lanes and lanes > 1:
        raise ValueError(
            "forward lanes run the model on the CPU (torch, ONNX Runtime or OpenVINO), not on this engine; "
            "set SENTIMENT_FORWARD_LANES=1 or unset"
        )
    return 1


def load_engine(
    checkpoint: Checkpoint,
    engine: EngineName = "auto",
    device: str = "auto",
    precision: Precision = "auto",
    threads: int | None = None,
    interop_threads: int | None = None,
    lanes: int | None = None,
    int8_dir: Path | None = None,
    int8_allow_failing: bool = False,
) -> Engine:
    """The engine that runs `checkpoint` as asked. `auto` ONNX Runtime that cannot take the fp32
    model falls back to torch; an explicit choice fails instead, as does an int8 artifact."""
    if engine == "null":
        from model_store.null_engine import NullEngine

        one_lane(lanes)
        return NullEngine(len(checkpoint.labels))
    target = pick_device(device)
    if target.type == "cuda" and precision == "int8":
        raise ValueError("int8 runs on the CPU only; use precision auto (fp16) on CUDA")
    artifact = None
    if target.type == "cpu" and engine in ("auto", "onnxruntime") and precision in ("auto", "int8"):
        artifact = int8_artifact(checkpoint, int8_dir, precision, int8_allow_failing)
    if artifact is not None and engine == "onnxruntime" and artifact.report.runtime != engine:
        why = f"the int8 artifact runs on {artifact.report.runtime} (recipe {artifact.report.recipe}), not {engine}"
        if precision == "int8":
            raise Refused(
                f"{why}: set SENTIMENT_ENGINE=auto, or make one with `sentiment model quantize --recipe dynamic`"
            )
        log.warning("precision auto: not serving int8: %s", why)
        artifact = None
    resolved = resolve_precision(precision, target, int8=artifact is not None)
    kind = resolve_engine(engine, target, resolved)
    if kind == "onnxruntime" and (target.type == "cuda" or resolved not in ("fp32", "int8")):
        raise ValueError("the onnxruntime engine runs fp32 and int8 on the CPU; use engine torch for other precisions")
    from model_store import torch_engine

    if target.type == "cpu":
        torch_engine.set_threads(threads, interop_threads)
    if kind == "onnxruntime":
        from model_store import onnx_engine

        if artifact is not None and artifact.report.runtime == "openvino":
            from model_store.openvino_engine import OpenVinoEngine

            return OpenVinoEngine.int8(checkpoint, artifact, threads or torch.get_num_threads(), lanes)
        if artifact is not None:
            return onnx_engine.OnnxEngine.int8(checkpoint, artifact, threads or torch.get_num_threads(), lanes)

        try:
            return onnx_engine.OnnxEngine.export(checkpoint, threads or torch.get_num_threads(), lanes)
        except Exception:
            if engine == "onnxruntime":
                raise
            torch_engine.log.warning(
                "ONNX Runtime cannot serve %s; serving it with torch", checkpoint.config.model_type, exc_info=True
            )
    return torch_engine.TorchEngine(checkpoint, target, resolved, lanes)
