"""Torch's engine: CUDA in float16 (or fp32), the CPU in fp32, bf16 autocast or int8, with forward lanes.

On the CPU the model runs as a frozen TorchScript graph traced at load: no Python between ops, so a
short forward holds the GIL less, and bf16's weight casts are folded in once. Any model runs padded
forwards; DistilBERT also packed ones (`model_store.layout`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from model_store import layout
from model_store.checkpoint import Checkpoint
from model_store.cost import ForwardCost
from model_store.engine import cpu_lanes, one_lane

log = logging.getLogger(__name__)

# What graphs are traced (and exported) on: a padded batch of two (token id 1 is in every vocabulary).
TRACE_EXAMPLE = [[1, 1, 1, 1], [1, 1]]


def set_threads(threads: int | None, interop_threads: int | None = None) -> None:
    """Size torch's CPU thread pools; call before the first forward (interop can be set only once)."""
    if threads:
        torch.set_num_threads(threads)
    if interop_threads:
        with contextlib.suppress(RuntimeError):  # already set, or already used, in this process
            torch.set_num_interop_threads(interop_threads)


def load_model(checkpoint: Checkpoint, device: torch.device, precision: str) -> torch.nn.Module:
    """The checkpoint's transformers model in eval mode on `device`: float16 weights for fp16 on CUDA,
    int8 Linear layers for int8, else float32 (the CPU's bf16 is autocast over them, `arithmetic`).

    Refused in one line that names the directory when the weights cannot be read, or lack any of the
    model's tensors: transformers would initialize those at random and the model serve noise."""
    dtype = {"fp16": torch.float16}.get(precision, torch.float32) if device.type == "cuda" else torch.float32
    try:
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            checkpoint.dir, local_files_only=True, dtype=dtype, output_loading_info=True
        )
    except Exception as exc:
        raise ValueError(f"cannot load the weights in {checkpoint.dir} ({type(exc).__name__}: {exc})") from exc
    if missing := sorted(loading["missing_keys"]):
        raise ValueError(
            f"the weights in {checkpoint.dir} lack {len(missing)} of the model's tensors ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}): a checkpoint of another architecture, or without its head"
        )
    model = model.to(device).eval().requires_grad_(False)
    if precision == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model


def arithmetic(device: torch.device, precision: str) -> torch.autocast:
    """The context every forward runs in: bf16 autocast on the CPU when asked for."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=device.type == "cpu" and precision == "bf16")


def load_module(checkpoint: Checkpoint, device: torch.device, precision: str) -> layout.Segments | layout.Padded:
    """The checkpoint's model behind `model_store.layout`'s inputs."""
    return layout.wrap(load_model(checkpoint, device, precision))


class TorchEngine:
    """The model on torch. `lanes` (CPU only): forwards that run side by side, each on an equal share
    of the threads, so no forward waits at every op's barrier for a thread another process preempted
    (docs/tuning.md, "Forward lanes"). `auto`: 2 where there are 2 threads or more."""

    name = "torch"

    def __init__(self, checkpoint: Checkpoint, device: torch.device, precision: str, lanes: int | None = None) -> None:
        cuda = device.type == "cuda"
        self._device = device
        self.device = device.type
        self.precision = precision
        self.dtype = (
            "int8" if precision == "int8" else {"fp16": "float16", "bf16": "bfloat16"}.get(precision, "float32")
        )
        self._pad_id = checkpoint.pad_id
        self._module = load_module(checkpoint, device, precision)
        self._segments = isinstance(self._module, layout.Segments)
        self._run: Callable[..., torch.Tensor] = self._eager
        if not cuda:
            self._trace()
        # A call's fixed cost in token positions: 32 for the traced graph on 2 CPU cores, ~1024 on
        # a GPU, where a token costs next to nothing and padding is never worth a packed row
        # (docs/tuning.md, "The forward's cost").
        self.cost = ForwardCost(
            overhead_tokens=1024 if cuda else 32, attention_tokens=2048, packs=self._segments and not cuda
        )
        threads = self.threads = torch.get_num_threads()
        self.lanes = self._lanes(lanes, threads, cuda)
        self._lane_threads = threads // self.lanes
        self._one_at_a_time = threading.Lock()

    @staticmethod
    def _lanes(lanes: int | None, threads: int, cuda: bool) -> int:
        if cuda:
            return one_lane(lanes)
        return cpu_lanes(lanes, threads)

    def start_lane(self) -> None:
        """Give the calling thread its share of the OpenMP threads: torch's count is per calling thread,
        taken from the process-wide count at the thread's first parallel op, so lanes start one at a time."""
        if self.device != "cpu":
            return
        with self._one_at_a_time:
            torch.set_num_threads(self._lane_threads)
            if (got := torch.get_num_threads()) != self._lane_threads:
                raise RuntimeError(f"a forward lane got {got} threads, not {self._lane_threads}")

    def inputs(self, batch: Sequence[list[int]], packed: bool) -> dict[str, torch.Tensor]:
        return layout.inputs(batch, self._pad_id, segments=self._segments, packed=packed)

    def forward(self, batch: Sequence[list[int]], packed: bool = False) -> np.ndarray:
        with torch.inference_mode(), arithmetic(self._device, self.precision):
            return self._run(**self.inputs(batch, packed)).float().cpu().numpy()

    def _eager(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self._module(**{name: tensor.to(self._device) for name, tensor in inputs.items()})

    def _trace(self) -> None:
        """Run forwards as a TorchScript graph traced from the model and frozen, under the forward's
        arithmetic, on a padded example (a packed row runs the same ops). Any failure stays eager."""
        example = tuple(self.inputs(TRACE_EXAMPLE, packed=False).values())
        try:
            with torch.no_grad(), arithmetic(self._device, self.precision), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notes on shape branches, and its deprecation
                graph = torch.jit.freeze(torch.jit.trace(self._module, example, check_trace=False))
        except Exception:
            log.warning("cannot trace %s; running it eagerly", type(self._module.model).__name__, exc_info=True)
            return
        self._run = lambda **inputs: graph(*inputs.values())  # `layout.inputs` keeps the forward's argument order

    @property
    def traced(self) -> bool:
        """Whether forwards run the traced graph: not on CUDA, nor where tracing failed."""
        return self._run != self._eager
