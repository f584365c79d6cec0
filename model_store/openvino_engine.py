"""OpenVINO's engine: the int8 artifact of the `openvino` recipe (`model_store.quantize`), on the CPU.

NNCF quantizes the same ONNX export the fp32 engine serves, activations included (ranges fixed on
calibration sentences), and OpenVINO runs the int8 products on AMX or VNNI where the CPU has them,
with the float operations between them fused; where the CPU multiplies bfloat16, those float
operations run in bfloat16, as OpenVINO does by default, and the report is measured that way.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import openvino

from model_store import layout
from model_store.checkpoint import Checkpoint
from model_store.cost import ForwardCost
from model_store.engine import cpu_lanes
from model_store.int8 import Artifact


def takes_segments(model: openvino.Model) -> bool:
    """Whether the model is `layout.Segments` (packs), by its inputs' names."""
    return "segments" in {port.get_any_name() for port in model.inputs}


class OpenVinoEngine:
    """A compiled OpenVINO model: `lanes` forwards side by side (`auto`: 2 where there are 2 threads
    or more), each on its share of the threads."""

    name = "openvino"
    device = "cpu"
    dtype = "int8"
    # A packed row is padded up to a multiple of this many positions: OpenVINO compiles its kernels
    # for each new input shape, and a packed row of any total length is nearly always new (docs/tuning.md,
    # "Precision"). Padded rows keep their width: short texts would compute mostly padding.
    granule = 32

    def __init__(self, path: Path, threads: int, pad_id: int, precision: str, lanes: int | None = None) -> None:
        core = openvino.Core()
        model = core.read_model(path)
        self._segments = takes_segments(model)
        self.lanes = cpu_lanes(lanes, threads)
        # A stream a lane, the threads shared out: each lane's forwards run on threads of their own,
        # so a core taken by the API stalls one lane, not both (docs/tuning.md, "Forward lanes").
        config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": self.lanes}
        self._model = core.compile_model(model, "CPU", config)
        self._requests = threading.local()  # a lane's own infer request
        self.threads = threads
        self.precision = precision
        self._pad_id = pad_id
        # A call's fixed cost in token positions, fitted to OpenVINO's curve over batch sizes on the
        # full-size shape (docs/tuning.md, "Precision").
        self.cost = ForwardCost(overhead_tokens=48, attention_tokens=2048, packs=self._segments)

    @classmethod
    def int8(cls, checkpoint: Checkpoint, artifact: Artifact, threads: int, lanes: int | None = None) -> OpenVinoEngine:
        """The artifact's quantized model, its scores cached under the artifact's own version."""
        return cls(artifact.model, threads, checkpoint.pad_id, artifact.tag, lanes)

    def start_lane(self) -> None:
        """Give the calling thread an infer request of its own (OpenVINO runs it on a free stream)."""
        self._requests.request = self._model.create_infer_request()

    def forward(self, batch: Sequence[list[int]], packed: bool = False) -> np.ndarray:
        inputs = layout.inputs(batch, self._pad_id, segments=self._segments, packed=packed, granule=self.granule)
        if not hasattr(self._requests, "request"):  # a caller that is no lane (quantize, tests)
            self.start_lane()
        result = self._requests.request.infer({name: tensor.numpy() for name, tensor in inputs.items()})
        return np.asarray(result.to_tuple()[0], dtype=np.float32)
