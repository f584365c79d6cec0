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


def export(model: torch.nn.Module, path: Path) -> None:
    """Write the model as an ONNX graph with free batch and sequence axes. Done at every start (about
    4 s for DistilBERT-base on 2 cores), so the graph can never drift from the checkpoint it came
    from; to a file, so torch's copy of the weights can go before ONNX Runtime loads its own.

    The TorchScript exporter (fast here; torch.export's takes 6x longer) traces one example, a
    padded batch of two. Transformers' mask code branches in Python on shapes, so
    tests/test_model_store.py holds the graph to torch's scores on SST-2 dev in batches of one,
    of mixed lengths and of texts cut at the model's maximum length.
    """
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    example = (attention_mask.clone(), attention_mask)  # token id 1 exists in every vocabulary
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on those branches, and its deprecation
        torch.onnx.export(
            model, example, path, input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}},
            opset_version=17, dynamo=False,
        )


class OnnxEngine:
    """An ONNX Runtime session over an exported model: token ids and mask in, logits out."""

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

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
        return torch.from_numpy(logits)
