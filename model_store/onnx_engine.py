"""ONNX Runtime's engine: the checkpoint exported to ONNX at load and run on the CPU in fp32, or the
int8 artifact `sentiment model quantize` made from that same export (`model_store.quantize`).

Same weights and arithmetic as torch in fp32 (scores agree to ~1e-6), but ONNX Runtime fuses layer
norm, GELU and the residual adds and runs the graph without torch's per-op dispatch, so short
forwards cost much less (docs/tuning.md, "Engine").
"""

from __future__ import annotations

import gc
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from model_store import layout
from model_store.checkpoint import Checkpoint
from model_store.cost import ForwardCost
from model_store.engine import cpu_lanes
from model_store.int8 import Artifact
from model_store.torch_engine import TRACE_EXAMPLE, load_module


def export(model: torch.nn.Module, path: Path, example: dict[str, torch.Tensor]) -> None:
    """Write the model (a `model_store.layout` module) as an ONNX graph whose inputs are named as in
    `example`, every axis free (rows, positions, texts). Done at every start, so the graph can never
    drift from the checkpoint it came from. The TorchScript exporter traces the example; transformers'
    mask code branches in Python on shapes, so tests/test_model_store.py holds the graph to torch's
    scores on SST-2 dev in every batch shape."""
    axes = {name: {axis: f"{name}_{axis}" for axis in range(tensor.dim())} for name, tensor in example.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on those branches, and its deprecation
        torch.onnx.export(
            model,
            tuple(example.values()),
            path,
            input_names=list(example),
            output_names=["logits"],
            dynamic_axes={**axes, "logits": {0: "texts"}},
            opset_version=17,
            dynamo=False,
        )


class OnnxEngine:
    """An ONNX Runtime session over an exported model: `lanes` forwards side by side, each a `run`
    of the one session (one copy of the weights) on its share of the threads."""

    name = "onnxruntime"
    device = "cpu"

    def __init__(self, path: Path, threads: int, pad_id: int, precision: str = "fp32", lanes: int = 1) -> None:
        lanes = cpu_lanes(lanes, threads)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads // lanes  # 1: a run computes on its caller's thread alone
        options.inter_op_num_threads = 1
        # Idle pool threads spin like OpenMP's, stealing the cores the API and Redis share on a small
        # box: follow the worker's OMP_WAIT_POLICY (passive unless set otherwise, docs/tuning.md).
        spin = os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.log_severity_level = 3  # errors only: its notes on graph fusions are not ours to act on
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.threads = threads
        self.lanes = lanes
        self.precision = precision
        self.dtype = "float32" if precision == "fp32" else "int8"
        self._pad_id = pad_id
        segments = self._segments = "segments" in {i.name for i in self.session.get_inputs()}  # `layout.Segments`
        # A call's fixed cost in token positions (AVX2, 2 cores; docs/tuning.md, "The forward's cost").
        self.cost = ForwardCost(overhead_tokens=16, attention_tokens=2048, packs=segments)

    @classmethod
    def export(cls, checkpoint: Checkpoint, threads: int, lanes: int | None = None) -> OnnxEngine:
        """Export the checkpoint to a temporary file, drop torch's copy of the weights, and load it
        into ONNX Runtime (DistilBERT-base then peaks at 1.1 GB instead of 1.4). One lane unless
        asked: a lone text on one thread of two takes 1.6x as long in fp32 (docs/tuning.md, "Forward lanes")."""
        module = load_module(checkpoint, torch.device("cpu"), "fp32")
        segments = isinstance(module, layout.Segments)
        with tempfile.TemporaryDirectory(prefix="sentiment-onnx-") as tmp:
            graph = Path(tmp) / "model.onnx"
            export(module, graph, layout.inputs(TRACE_EXAMPLE, checkpoint.pad_id, segments=segments, packed=False))
            del module
            gc.collect()
            return cls(graph, threads, checkpoint.pad_id, lanes=cpu_lanes(lanes, threads, default=1))

    @classmethod
    def int8(cls, checkpoint: Checkpoint, artifact: Artifact, threads: int, lanes: int | None = None) -> OnnxEngine:
        """The artifact's quantized graph, its scores cached under the artifact's own version; `auto`
        lanes: 2 where there are 2 threads or more (a lone int8 text on one thread is still faster than fp32)."""
        return cls(artifact.model, threads, checkpoint.pad_id, precision=artifact.tag, lanes=cpu_lanes(lanes, threads))

    def start_lane(self) -> None:
        """Nothing to set per thread: concurrent runs of one session are ONNX Runtime's own."""

    def forward(self, batch: Sequence[list[int]], packed: bool = False) -> np.ndarray:
        logits, *_ = self.outputs(batch, packed)
        return np.asarray(logits, dtype=np.float32)

    def outputs(self, batch: Sequence[list[int]], packed: bool = False) -> list[np.ndarray]:
        """Every output of the graph for one batch: the logits, then any other (`model_store.quantize`'s taps)."""
        inputs = layout.inputs(batch, self._pad_id, segments=self._segments, packed=packed)
        return list(self.session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()}))
