"""A sequence-classification checkpoint loaded from a local directory, ready to score token ids."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import logging
import tempfile
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal, TypeVar

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from model_store import layout
from model_store.cost import ForwardCost

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin")
# What both engines' graphs are traced on: a padded batch of two (token id 1 is in every vocabulary).
TRACE_EXAMPLE = [[1, 1, 1, 1], [1, 1]]
Precision = Literal["auto", "fp32", "bf16", "int8"]
Engine = Literal["auto", "torch", "onnxruntime"]
T = TypeVar("T")


def fingerprint(model_dir: Path) -> str:
    """A version that changes whenever any checkpoint file (config, tokenizer, weights) changes.

    It is part of every cache key, so a new model never serves an old model's results.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def cache_version(model_dir: Path, precision: str) -> str:
    """The model's version, part of every cache key: the checkpoint's fingerprint, suffixed by any
    precision but fp32 (`-fp16`, `-bf16`, `-int8`), whose slightly different scores are cached apart."""
    return fingerprint(model_dir) + ("" if precision == "fp32" else f"-{precision}")


def pick_device(device: str) -> torch.device:
    """`auto` means CUDA when this machine has it, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere oneDNN
    emulates it, about 9x slower than fp32 (docs/tuning.md)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """What `auto` means on this machine: float16 on CUDA; on the CPU bf16 where the hardware has
    it (it keeps the SST-2 labels, docs/tuning.md), else fp32. Other values are taken as given."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    return "bf16" if native_bf16() else "fp32"


def resolve_engine(engine: Engine, device: torch.device, precision: str) -> str:
    """What `auto` means: ONNX Runtime for fp32 on the CPU (the same arithmetic, 1.4-2.8x faster
    than torch there, docs/tuning.md); torch for CUDA, bf16 autocast and int8, which it runs itself."""
    if engine != "auto":
        return engine
    return "onnxruntime" if device.type == "cpu" and precision == "fp32" else "torch"


def set_threads(threads: int | None, interop_threads: int | None = None) -> None:
    """Size torch's CPU thread pools; call before the first forward (interop can be set only once)."""
    if threads:
        torch.set_num_threads(threads)
    if interop_threads:
        with contextlib.suppress(RuntimeError):  # already set, or already used, in this process
            torch.set_num_interop_threads(interop_threads)


class Classifier:
    """Tokenizer plus model. `forward` pads each batch only to its own longest text.

    Every forward runs on the classifier's own thread, whichever thread calls it: torch's OpenMP
    keeps a thread team per calling thread, and with more team threads than cores libgomp stops
    spinning between ops (docs/tuning.md measures what that costs a saturated worker).

    Precision: CUDA runs float16 weights (`auto`); the CPU runs `fp32`, `bf16` (autocast: bfloat16
    matmuls, float32 weights; `auto` where the CPU has it natively) or `int8` (dynamic quantization
    of the Linear layers). Engine: torch (on the CPU a frozen TorchScript graph traced at load), or
    (`auto` for fp32 on the CPU) the model exported to ONNX Runtime at load; then `model` is None
    and torch keeps no copy of the weights. Either runs a `model_store.layout` module, so a
    DistilBERT batch can go padded or packed (`forward`), as `cost` prices them. Torch's engine on
    the CPU also has `lanes`: forwards that run side by side on a share of the threads each.
    """

    def __init__(
        self, model_dir: Path, device: str = "auto", threads: int | None = None, precision: Precision = "auto",
        interop_threads: int | None = None, engine: Engine = "auto", lanes: int | None = None,
    ) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file() or not any(
            p.suffix in WEIGHT_SUFFIXES for p in model_dir.iterdir()
        ):
            raise FileNotFoundError(
                f"no Hugging Face checkpoint (config.json + weights) in {model_dir.resolve()}; "
                "set SENTIMENT_MODEL_DIR or fetch one with `sentiment model pull`"
            )
        hf_logging.disable_progress_bar()
        self.device = pick_device(device)
        if self.device.type == "cpu":
            set_threads(threads, interop_threads)
        cuda = self.device.type == "cuda"
        self.precision = resolve_precision(precision, self.device)
        if cuda and self.precision == "int8":
            raise ValueError("int8 dynamic quantization runs on the CPU only; use precision auto (fp16) on CUDA")
        self.engine = resolve_engine(engine, self.device, self.precision)
        if self.engine == "onnxruntime" and (cuda or self.precision != "fp32"):
            raise ValueError("the onnxruntime engine runs fp32 on the CPU; use engine torch for other precisions")
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)
        weights_dtype = self.dtype if cuda else torch.float32  # the CPU's bf16 is autocast over fp32 weights

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        if not self.tokenizer.is_fast:
            raise ValueError(f"{model_dir} has no fast (tokenizers) tokenizer")
        self.pad_id = self.tokenizer.pad_token_id or 0
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="torch")
        self.model: torch.nn.Module | None = self._compute.submit(self._load, model_dir, weights_dtype).result()
        self.config = self.model.config
        # What the forward calls: the model behind the inputs of `model_store.layout`.
        self._module: torch.nn.Module | None = layout.wrap(self.model)
        self.segments = isinstance(self._module, layout.Segments)  # DistilBERT: it can run packed forwards
        self._run: Callable[..., torch.Tensor] = self._torch_logits
        self.traced = False  # torch's forward as a frozen TorchScript graph (`_trace`)
        if self.engine == "onnxruntime":
            self._compute.submit(self._to_onnx, model_dir, threads, explicit=engine == "onnxruntime").result()
        self._autocast = not cuda and self.precision == "bf16"
        if self.engine == "torch" and not cuda:
            self._compute.submit(self._trace).result()
        self._here = threading.local()  # `lane`: the forward lane whose thread reads it
        self.lanes, self._lane_pool = self._open_lanes(lanes)
        # What a forward costs, in token positions: the worker cuts each batch into the forwards, and
        # picks for each the layout (padded or packed), that cost least. Fitted to DistilBERT-base's
        # forwards on 2 CPU cores: a call of torch's traced graph costs 3-9 ms, 12-32 token positions
        # (16-48 measured alike; 32 used); ~7 ms with ONNX Runtime on AVX2 (16); ~3.5 ms on an H100,
        # where a token costs ~1000x less and padding next to nothing (never packed there). Attention
        # over a packed row of T positions adds T * T / attention_tokens (docs/tuning.md, "Packing",
        # "The forward's cost, refitted").
        self.cost = ForwardCost(
            overhead_tokens=1024 if cuda else 16 if self.engine == "onnxruntime" else 32,
            attention_tokens=2048, packs=self.segments and not cuda,
        )

        config = self.config
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        self.max_length = min(self.tokenizer.model_max_length, config.max_position_embeddings)
        self.name = model_dir.resolve().name
        self.version = cache_version(model_dir, self.precision)
        self.forward([self.tokenize(["warm up"])[0]])  # first call pays allocator and kernel set-up
        log.info(
            "model %s version %s on %s (%s, %s, %d threads, %d forward lanes), labels %s",
            self.name, self.version, self.device, self.dtype_name, self.engine + (", traced" if self.traced else ""),
            torch.get_num_threads(), self.lanes, self.labels,
        )

    def _open_lanes(self, lanes: int | None) -> tuple[int, ThreadPoolExecutor | None]:
        """Threads for forwards that run side by side, each on an equal share of the model's threads
        (`on_lane`). A forward on 2 threads splits every op in two, and the halves meet at a barrier
        after each op; whenever another process takes one core, the other thread waits. Two 1-thread
        forwards never wait for each other (docs/tuning.md, "Forward lanes"). Torch's engine on the CPU
        only: `auto` is 2 lanes where the model has 2 or more threads, else 1."""
        threads = self._compute.submit(torch.get_num_threads).result()
        if self.device.type == "cuda" or self.engine != "torch":
            if lanes and lanes > 1:
                raise ValueError("forward lanes run torch's engine on the CPU; set SENTIMENT_FORWARD_LANES=1 or unset")
            return 1, None
        lanes = lanes or min(2, threads)
        if lanes > threads:
            raise ValueError(f"{lanes} forward lanes need a thread each, and the model has {threads}")
        if lanes == 1:
            return 1, None
        ids, one_at_a_time = itertools.count(), threading.Lock()

        def become_lane() -> None:
            with one_at_a_time:  # a new thread takes torch's process-wide count at its first op
                self._here.lane = next(ids)
                _own_threads(threads // lanes)

        pool = ThreadPoolExecutor(lanes, thread_name_prefix="torch-lane", initializer=become_lane)
        _on_each_thread(pool, lanes, lambda: None)  # every lane's thread started now
        self._compute.submit(torch.set_num_threads, threads).result()  # the process-wide count back
        return lanes, pool

    def _load(self, model_dir: Path, weights_dtype: torch.dtype) -> torch.nn.Module:
        """The model, built on the compute thread as well: loading and quantizing run parallel ops too."""
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True, dtype=weights_dtype)
        model = model.to(self.device).eval().requires_grad_(False)
        if self.precision == "int8":
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        return model

    def _to_onnx(self, model_dir: Path, threads: int | None, explicit: bool) -> None:
        """Switch to the ONNX Runtime engine. For `auto`, any failure (onnxruntime missing, no
        writable temporary directory, a model the exporter or ONNX Runtime cannot take) serves torch."""
        try:
            from model_store import onnx_engine

            with tempfile.TemporaryDirectory(prefix="sentiment-onnx-") as tmp:
                graph = Path(tmp) / "model.onnx"
                onnx_engine.export(self._module, graph, self._inputs(TRACE_EXAMPLE, packed=False))
                # Torch's copy of the weights goes before ONNX Runtime loads its own: DistilBERT-base
                # then peaks at 1.1 GB instead of 1.4 (docs/tuning.md, "Engine").
                self.model = self._module = None
                gc.collect()
                # Torch's own default thread count honours OMP_NUM_THREADS; ONNX Runtime's would not.
                self._run = onnx_engine.OnnxEngine(graph, threads or torch.get_num_threads())
        except Exception:
            if explicit:
                raise
            log.warning("ONNX Runtime cannot serve %s; serving it with torch", self.config.model_type, exc_info=True)
            self.engine = "torch"
            if self.model is None:  # ONNX Runtime failed after torch's weights were let go
                self.model = self._load(model_dir, torch.float32)
                self._module = layout.wrap(self.model)

    def _trace(self) -> None:
        """Run torch's forwards as a TorchScript graph traced from the model and frozen: no Python
        between ops, so a short forward costs less and holds no GIL the worker's loop wants, and
        bf16's weight casts are folded in once (docs/tuning.md, "Traced graph"). Traced under the
        forward's arithmetic on a padded example; a packed row runs the same ops. Any failure keeps
        the eager forward."""
        example = tuple(self._inputs(TRACE_EXAMPLE, packed=False).values())
        try:
            with torch.no_grad(), self.arithmetic(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notes on shape branches, and its deprecation
                graph = torch.jit.freeze(torch.jit.trace(self._module, example, check_trace=False))
        except Exception:
            log.warning("cannot trace %s; running it eagerly", self.config.model_type, exc_info=True)
            return
        self._run = lambda **inputs: graph(*inputs.values())  # `layout.inputs` keeps the forward's argument order
        self.traced = True

    def _torch_logits(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self._module(**{name: tensor.to(self.device) for name, tensor in inputs.items()})

    @property
    def dtype_name(self) -> str:
        """What `/model` reports: the compute type (`int8` for quantized Linear layers)."""
        return "int8" if self.precision == "int8" else str(self.dtype).removeprefix("torch.")

    def arithmetic(self) -> torch.autocast:
        """The context every forward of this model runs in: bf16 autocast on the CPU when asked for."""
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._autocast)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, truncated to the model's maximum length, unpadded."""
        return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

    @property
    def lane(self) -> int | None:
        """The forward lane the calling thread is (inside `on_lane`), else None."""
        return getattr(self._here, "lane", None)

    def on_lane(self, fn: Callable[..., T], *args: object) -> Future[T]:
        """Call `fn` on the first forward lane that is free (lanes take calls from one queue, so none
        waits while calls are queued); the forwards it makes run right there, on that lane's threads."""
        return self._lanes().submit(fn, *args)

    def on_each_lane(self, fn: Callable[[], T]) -> list[T]:
        """`fn` on every forward lane at once (the limit benchmark's streams, one per lane)."""
        return _on_each_thread(self._lanes(), self.lanes, fn)

    def _lanes(self) -> ThreadPoolExecutor:
        if self._lane_pool is None:
            raise RuntimeError("this model has no forward lanes")
        return self._lane_pool

    def forward(self, batch: list[list[int]], packed: bool = False) -> list[list[float]]:
        """Label probabilities per text for one batch of token ids, padded here to its longest text
        or (`packed`, where `cost.packs`) concatenated into one row (`model_store.layout`). Called
        from a forward lane (`on_lane`), on that lane's share of the threads while the other lanes
        compute too; from any other thread, on all the model's threads."""
        if self.lane is not None:
            return self._forward(batch, packed)
        return self._compute.submit(self._forward, batch, packed).result()

    def _inputs(self, batch: list[list[int]], packed: bool) -> dict[str, torch.Tensor]:
        return layout.inputs(batch, self.pad_id, segments=self.segments, packed=packed)

    def _forward(self, batch: list[list[int]], packed: bool) -> list[list[float]]:
        with torch.inference_mode(), self.arithmetic():
            return self._run(**self._inputs(batch, packed)).float().softmax(dim=-1).cpu().tolist()


def _on_each_thread(pool: ThreadPoolExecutor, threads: int, fn: Callable[[], T]) -> list[T]:
    """`fn` on each of the `threads` threads of `pool` at once: no thread takes two calls, since
    each waits for the others to start theirs."""
    met = threading.Barrier(threads, timeout=60)

    def together() -> T:
        met.wait()
        return fn()

    return [call.result() for call in [pool.submit(together) for _ in range(threads)]]


def _own_threads(threads: int) -> None:
    """Give the calling thread `threads` OpenMP threads of its own: torch's count is per calling
    thread, taken from the process-wide count at the thread's first parallel op."""
    torch.set_num_threads(threads)
    if torch.get_num_threads() != threads:  # the first op's lazy set-up read another thread's count
        raise RuntimeError(f"a forward lane got {torch.get_num_threads()} threads, not {threads}")
