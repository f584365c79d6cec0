"""OpenVINO's engine: the int8 artifact of the `openvino` recipe (`model_store.quantize`), on the CPU.

NNCF quantizes the same ONNX export the fp32 engine serves, activations included (ranges fixed on
calibration sentences), and OpenVINO runs the int8 products on AMX or VNNI where the CPU has them,
with the float operations between them fused; where the CPU multiplies bfloat16, those float
operations run in bfloat16, as OpenVINO does by default, and the report is measured that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import openvino

from model_store import layout
from model_store.checkpoint import Checkpoint
from model_store.cost import ForwardCost
from model_store.int8 import Artifact


class OpenVinoEngine:
    """A compiled OpenVINO model: one forward at a time, on all its threads."""

    name = "openvino"
    device = "cpu"
    lanes = 1
    dtype = "int8"
    # A packed row is padded up to a multiple of this many positions: OpenVINO compiles its kernels
    # for each new input shape, and a packed row of any total length is nearly always new (docs/tuning.md,
    # "Precision"). Padded rows keep their width: short texts would compute mostly padding.
    granule = 32

    def __init__(self, path: Path, threads: int, pad_id: int, precision: str) -> None:
        core = openvino.Core()
        model = core.read_model(path)
        self._segments = "segments" in {port.get_any_name() for port in model.inputs}  # `layout.Segments`
        # One stream on `threads` threads: a forward is a batch, the worker runs one at a time.
        config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        self._request = core.compile_model(model, "CPU", config).create_infer_request()
        self.threads = threads
        self.precision = precision
        self._pad_id = pad_id
        # A call's fixed cost in token positions, fitted to OpenVINO's curve over batch sizes on the
        # full-size shape (docs/tuning.md, "Precision").
        self.cost = ForwardCost(overhead_tokens=48, attention_tokens=2048, packs=self._segments)

    @classmethod
    def int8(cls, checkpoint: Checkpoint, artifact: Artifact, threads: int) -> OpenVinoEngine:
        """The artifact's quantized model, its scores cached under the artifact's own version."""
        return cls(artifact.model, threads, checkpoint.pad_id, precision=artifact.tag)

    def start_lane(self) -> None:
        """One lane on all the model's threads: nothing to set per thread."""

    def forward(self, batch: Sequence[list[int]], packed: bool = False) -> np.ndarray:
        inputs = layout.inputs(batch, self._pad_id, segments=self._segments, packed=packed, granule=self.granule)
        result = self._request.infer({name: tensor.numpy() for name, tensor in inputs.items()})
        return np.asarray(result.to_tuple()[0], dtype=np.float32)
