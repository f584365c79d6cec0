"""The loaded model exported to ONNX and run by ONNX Runtime on the CPU.

Same weights, same fp32 arithmetic as torch (probabilities agree to ~1e-6), but ONNX Runtime fuses
layer norm, GELU and the residual adds, and runs the graph without torch's per-op dispatch: on 2 cores a
DistilBERT-base forward of one short sentence takes 13 ms instead of 37, and batches of 16 run
1.4x faster (docs/tuning.md, "Engine").
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import onnxruntime
import torch


def export(model: torch.nn.Module, path: Path, example: dict[str, torch.Tensor]) -> None:
    """Write the model (a `model_store.layout` module) as an ONNX graph whose inputs are named as in
    `example`, every axis free (rows, positions, texts). Done at every start (about
    4 s for DistilBERT-base on 2 cores), so the graph can never drift from the checkpoint it came
    from; to a file, so torch's copy of the weights can go before ONNX Runtime loads its own.

    The TorchScript exporter (fast here; torch.export's takes 6x longer) traces the example, a
    padded batch of two. Transformers' mask code branches in Python on shapes, so
    tests/test_model_store.py holds the graph to torch's scores on SST-2 dev in batches of one,
    of mixed lengths, packed and of texts cut at the model's maximum length.
    """
    axes = {name: {axis: f"{name}_{axis}" for axis in range(tensor.dim())} for name, tensor in example.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on those branches, and its deprecation
        torch.onnx.export(
            model, tuple(example.values()), path, input_names=list(example), output_names=["logits"],
            dynamic_axes={**axes, "logits": {0: "texts"}}, opset_version=17, dynamo=False,
        )


class OnnxEngine:
    """An ONNX Runtime session over an exported model: its named inputs in, logits out."""

    def __init__(self, path: Path, threads: int) -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle pool threads spin like OpenMP's, stealing the cores the API and Redis share on a small
        # box: follow the worker's OMP_WAIT_POLICY (passive unless set otherwise, docs/tuning.md).
        spin = os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.log_severity_level = 3  # errors only: its notes on graph fusions are not ours to act on
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})
        return torch.from_numpy(logits)
