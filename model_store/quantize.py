"""`sentiment model quantize`: a checkpoint's int8 artifact, and its report of accuracy and speed.

Every recipe starts from the graph the fp32 engine serves (`onnx_engine.export`); the head is kept
in float (one row per text: it costs nothing). For ONNX Runtime, `dynamic` quantizes it dynamically
(int8 weights per output channel, each activation quantized at every forward over its own range).
A transformer's activations have a few outlier channels, tens of times the others' range, that take
most of an activation's int8 steps; `split` runs those channels (found on calibration sentences) in
float beside the int8 product of the rest, as LLM.int8() does. `openvino` is NNCF's static
quantization for OpenVINO, which runs int8 on AMX and VNNI. Which is fastest depends on the CPU
(docs/tuning.md, "Precision"), so each is made and timed here: the fastest whose scores on the
labelled sentences keep the accuracy rule is kept; where none does, the most accurate, its report
failing.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import nncf
import numpy as np
import onnx
import onnxruntime
import openvino
import torch
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from model_store import layout, scoring
from model_store.checkpoint import Checkpoint
from model_store.engine import Engine
from model_store.int8 import MODEL_FILES, RECIPES, RUNTIMES, Report, cpu_instructions, file_digest, multiplies_bf16
from model_store.onnx_engine import OnnxEngine, export
from model_store.openvino_engine import OpenVinoEngine, takes_segments
from model_store.torch_engine import TRACE_EXAMPLE, TorchEngine, load_module

log = logging.getLogger(__name__)

OUTLIER_RANGE = 3.0  # a channel whose calibration range is this many times the median channel's runs in float
BATCH = 32  # sentences per forward, sorted by length as the worker batches them


def _lines(path: Path) -> list[str]:
    """`path`'s lines. Raises ValueError naming it where it cannot be read as UTF-8 text: the codec's
    own error named no file, and --calibration and --eval are two."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read {path} ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"cannot read {path} (not UTF-8 text: {exc.reason} at byte {exc.start})") from None


def read_sentences(path: Path) -> list[str]:
    """One sentence a line; of a TSV (a tab in its first line, its header, as SST-2's `text` or GLUE's
    `sentence`), the first column. Raises ValueError where there is none to calibrate on."""
    lines = _lines(path)
    if lines and ("\t" in lines[0] or lines[0].strip() == "text"):
        lines = [line.split("\t")[0] for line in lines[1:]]
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        raise ValueError(f"{path}: no sentences to calibrate on (one a line, or a TSV's first column under its header)")
    return sentences


def read_labelled(path: Path, classes: int) -> tuple[list[str], list[int]]:
    """A TSV of `text<TAB>label` under a header, the label a class index below `classes`, the
    model's labels (SST-2's format). Raises ValueError on anything else, rather than measure it."""
    rows = [line.split("\t") for line in _lines(path)[1:] if line.strip()]
    if not rows or any(len(row) < 2 or not row[1].strip().isdigit() for row in rows):
        raise ValueError(f"{path}: expected a header, then text<TAB>label rows with a class index as the label")
    labels = [int(row[1]) for row in rows]
    if (most := max(labels)) >= classes:
        raise ValueError(f"{path}: a label {most}, and the model has {classes} labels (class indexes 0-{classes - 1})")
    return [row[0] for row in rows], labels


def check_destination(dest: Path) -> None:
    """Make `dest`'s parent, and raise ValueError now, before the work, where the artifact (a folder,
    staged beside it) could not be written there at its end."""
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest} is a file; the int8 artifact is a folder: name another with --dest")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(prefix=f".{dest.name}-", dir=dest.parent).cleanup()  # as the staging needs
    except OSError as exc:  # (mkdir's own word for a parent that is a file is "File exists")
        why = os.strerror(errno.ENOTDIR) if isinstance(exc, FileExistsError) else exc.strerror
        raise ValueError(f"cannot write the int8 artifact at {dest} ({why}: {exc.filename})") from exc


def quantize(
    checkpoint: Checkpoint,
    dest: Path,
    calibration: tuple[Path, Sequence[str]],
    evaluation: tuple[Path, Sequence[str], Sequence[int]],
    threads: int | None = None,
    recipes: Sequence[str] = RECIPES,
) -> Report:
    """Write the artifact and `report.json` into `dest` (replacing any artifact there) and return the report.
    `calibration`: sentences like the traffic's, whose activations set the ranges and find the outlier
    channels; `evaluation`: labelled sentences, the report's figures and speed; `recipes`: those to
    make, each measured on this CPU: the fastest that passes the rule is kept, else the most accurate."""
    threads = threads or torch.get_num_threads()
    texts = evaluation[1]
    check_destination(dest)
    stagings: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="sentiment-quantize-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        module = load_module(checkpoint, torch.device("cpu"), "fp32")
        segments = isinstance(module, layout.Segments)
        export(module, fp32, layout.inputs(TRACE_EXAMPLE, checkpoint.pad_id, segments=segments, packed=False))
        del module
        reference, fp32_seconds = _timed_scores(OnnxEngine(fp32, threads, checkpoint.pad_id), checkpoint, texts)
        bf16_seconds = None
        if multiplies_bf16(cpu_instructions()):  # `auto`'s float engine on this CPU: what int8 must beat
            bf16 = TorchEngine(checkpoint, torch.device("cpu"), "bf16", lanes=1)
            bf16_seconds = _timed_scores(bf16, checkpoint, texts)[1]
            del bf16
        made: dict[str, Report] = {}
        try:
            for recipe in recipes:
                stagings[recipe] = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
                try:
                    made[recipe] = _make(
                        recipe,
                        checkpoint,
                        fp32,
                        stagings[recipe],
                        calibration,
                        evaluation,
                        reference,
                        (fp32_seconds, bf16_seconds),
                        threads,
                    )
                except Exception:  # a tool that cannot take this model costs its recipe, not the others
                    if len(recipes) == 1:
                        raise
                    log.warning(
                        "recipe %s could not be made; the others are measured without it", recipe, exc_info=True
                    )
                    continue
                log.info("%s", made[recipe].summary())
            if not made:
                raise RuntimeError(f"no int8 recipe could be made of {checkpoint.dir} (the log above says why)")
            passing = [report for report in made.values() if report.passes]
            best = (
                max(passing, key=lambda r: r.speedup)
                if passing
                else max(made.values(), key=lambda r: (r.agreement, r.int8_accuracy))
            )
            report = dataclasses.replace(best, tried={recipe: _figures(r) for recipe, r in made.items()})
            report.write(stagings[best.recipe])
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(stagings[best.recipe], dest)
        finally:
            for staging in stagings.values():
                shutil.rmtree(staging, ignore_errors=True)
    return report


def _make(
    recipe: str,
    checkpoint: Checkpoint,
    fp32: Path,
    dest: Path,
    calibration: tuple[Path, Sequence[str]],
    evaluation: tuple[Path, Sequence[str], Sequence[int]],
    reference: np.ndarray,
    float_seconds: tuple[float, float | None],
    threads: int,
) -> Report:
    """One recipe's graph and report in `dest`; `float_seconds`: fp32's time on the evaluation
    sentences, and bf16's where this CPU multiplies bf16 natively."""
    files = [dest / name for name in MODEL_FILES[RUNTIMES[recipe]]]
    engine: OnnxEngine | OpenVinoEngine
    if RUNTIMES[recipe] == "openvino":
        tool, method, kept_float = _nncf_int8(fp32, files[0], checkpoint, calibration[1])
        engine = OpenVinoEngine(files[0], threads, checkpoint.pad_id, "int8", lanes=1)  # timed as ONNX Runtime runs
    else:
        tool, method, kept_float = _onnxruntime_int8(recipe, fp32, files[0], checkpoint, calibration[1], threads)
        engine = OnnxEngine(files[0], threads, checkpoint.pad_id)
    scores, seconds = _timed_scores(engine, checkpoint, evaluation[1])
    del engine
    truth = np.asarray(evaluation[2])
    report = Report(
        checkpoint=checkpoint.fingerprint,
        artifact=file_digest(*files),
        tool=tool,
        cpu=cpu_instructions(),
        recipe=recipe,
        method=method,
        kept_float=kept_float,
        calibration=_described(calibration[0], calibration[1]),
        evaluation=_described(evaluation[0], evaluation[1]),
        fp32_accuracy=float((reference.argmax(-1) == truth).mean()),
        int8_accuracy=float((scores.argmax(-1) == truth).mean()),
        agreement=float((reference.argmax(-1) == scores.argmax(-1)).mean()),
        largest_score_difference=float(np.abs(reference - scores).max()),
        speedup=float_seconds[0] / seconds,
        tried={},
        bf16_speedup=None if float_seconds[1] is None else float_seconds[1] / seconds,
    )
    report.write(dest)
    return report


def _onnxruntime_int8(
    recipe: str, fp32: Path, int8: Path, checkpoint: Checkpoint, sentences: Sequence[str], threads: int
) -> tuple[str, str, list[str]]:
    """`dynamic` or `split`: the graph for ONNX Runtime in `int8`; the tool, the method, the nodes kept in float."""
    graph = onnx.load(fp32)
    outliers = _outlier_channels(graph, fp32, checkpoint, sentences, threads) if recipe == "split" else {}
    channels = sum(len(c) for c in outliers.values())
    _split(graph, outliers)
    float_nodes = [n.name for n in graph.graph.node if n.op_type == "Gemm" or n.name.endswith(OUTLIER_SUFFIX)]
    rewritten = int8.parent / "fp32-split.onnx"
    onnx.save(graph, rewritten)
    del graph
    root = logging.getLogger()
    was, root.disabled = root.disabled, True  # its advice to pre-process the graph, once per call
    try:
        quantize_dynamic(
            rewritten,
            int8,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=float_nodes,
        )
    finally:
        root.disabled = was
    rewritten.unlink()
    split = f", {channels} outlier channels of {len(outliers)} activations in float" if recipe == "split" else ""
    method = f"dynamic int8, weights per output channel, every MatMul with a weight{split}; the head (Gemm) in float"
    return f"onnxruntime {onnxruntime.__version__}", method, float_nodes


def _nncf_int8(fp32: Path, int8: Path, checkpoint: Checkpoint, sentences: Sequence[str]) -> tuple[str, str, list[str]]:
    """`openvino`: NNCF's post-training quantization of the export (its transformer preset), activation
    ranges from the calibration sentences in batches as the worker makes them; the model in `int8`."""
    model = openvino.Core().read_model(fp32)
    segments = takes_segments(model)
    ids = sorted(checkpoint.tokenize(list(sentences)), key=len)
    feeds = [
        {
            name: tensor.numpy()
            for name, tensor in layout.inputs(
                ids[i : i + BATCH], checkpoint.pad_id, segments=segments, packed=False
            ).items()
        }
        for i in range(0, len(ids), BATCH)
    ]
    logging.getLogger("nncf").setLevel(logging.ERROR)  # its notes on each step; its handlers are not only its own
    quantized = nncf.quantize(
        model,
        nncf.Dataset(feeds),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(feeds),
        fast_bias_correction=True,
    )
    openvino.save_model(quantized, int8, compress_to_fp16=False)  # the float weights as they were
    tool = f"openvino {openvino.__version__}, nncf {nncf.__version__}"
    return tool, "static int8 (NNCF, transformer preset: activations' ranges from calibration), OpenVINO", []


def _timed_scores(engine: Engine, checkpoint: Checkpoint, texts: Sequence[str]) -> tuple[np.ndarray, float]:
    """`_scores`, and the seconds a second pass takes (the first warms the runtime's shapes up)."""
    scores = _scores(engine, checkpoint, texts)
    start = time.perf_counter()
    _scores(engine, checkpoint, texts)
    return scores, time.perf_counter() - start


def _figures(report: Report) -> dict[str, object]:
    """What the report's `tried` keeps of each recipe made."""
    return {
        "passes": report.passes,
        "agreement": report.agreement,
        "int8_accuracy": report.int8_accuracy,
        "speedup": round(report.speedup, 3),
        "bf16_speedup": None if report.bf16_speedup is None else round(report.bf16_speedup, 3),
    }


OUTLIER_SUFFIX = "/outlier_channels"


def _weighted_products(graph: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """The MatMuls whose second input is a weight, by the activation they multiply."""
    weights = {init.name for init in graph.graph.initializer}
    products: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            products.setdefault(node.input[0], []).append(node)
    return products


def _outlier_channels(
    graph: onnx.ModelProto, path: Path, checkpoint: Checkpoint, sentences: Sequence[str], threads: int
) -> dict[str, np.ndarray]:
    """Per activation into a weighted product, the channels whose largest magnitude over the
    calibration sentences is `OUTLIER_RANGE` times the median channel's, or more."""
    activations = list(_weighted_products(graph))
    tapped = onnx.load(path)
    tapped.graph.output.extend(
        helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in activations
    )
    with tempfile.TemporaryDirectory(prefix="sentiment-calibrate-") as tmp:
        onnx.save(tapped, Path(tmp) / "tapped.onnx")
        del tapped
        engine = OnnxEngine(Path(tmp) / "tapped.onnx", threads, checkpoint.pad_id)
        largest = {name: np.zeros(0, dtype=np.float32) for name in activations}
        ids = sorted(checkpoint.tokenize(list(sentences)), key=len)
        for start in range(0, len(ids), BATCH):
            _, *values = engine.outputs(ids[start : start + BATCH])
            for name, value in zip(activations, values, strict=True):
                peak = np.abs(value.reshape(-1, value.shape[-1])).max(0)
                largest[name] = peak if not largest[name].size else np.maximum(largest[name], peak)
    return {
        name: channels
        for name, peak in largest.items()
        if (channels := np.flatnonzero(peak > OUTLIER_RANGE * np.median(peak))).size
    }


def _split(graph: onnx.ModelProto, outliers: dict[str, np.ndarray]) -> None:
    """Rewrite each product `x @ w` whose activation has outlier channels `o` as
    `(x * mask) @ w + x[..., o] @ w[o]`: the first quantized over the other channels' range alone,
    the second (named `...OUTLIER_SUFFIX`) in float."""
    weights = {init.name: init for init in graph.graph.initializer}
    before: dict[str, list[onnx.NodeProto]] = {}  # by the name of the node they go before, or after
    after: dict[str, list[onnx.NodeProto]] = {}
    for activation, products in _weighted_products(graph).items():
        if activation not in outliers:
            continue
        channels = outliers[activation]
        mask = np.ones(numpy_helper.to_array(weights[products[0].input[1]]).shape[0], dtype=np.float32)
        mask[channels] = 0.0
        inliers, picked = f"{activation}/inliers", f"{activation}/outliers"
        graph.graph.initializer.extend(
            [
                numpy_helper.from_array(mask, f"{inliers}_mask"),
                numpy_helper.from_array(channels.astype(np.int64), f"{picked}_index"),
            ]
        )
        before[products[0].name] = [
            helper.make_node("Mul", [activation, f"{inliers}_mask"], [inliers], name=f"{inliers}_mul"),
            helper.make_node("Gather", [activation, f"{picked}_index"], [picked], name=f"{picked}_gather", axis=-1),
        ]
        for product in products:
            weight = f"{product.name}{OUTLIER_SUFFIX}_weight"
            graph.graph.initializer.append(
                numpy_helper.from_array(numpy_helper.to_array(weights[product.input[1]])[channels], weight)
            )
            out = product.output[0]
            product.input[0], product.output[0] = inliers, f"{out}/inliers"
            after[product.name] = [
                helper.make_node("MatMul", [picked, weight], [f"{out}/outliers"], name=product.name + OUTLIER_SUFFIX),
                helper.make_node("Add", [f"{out}/inliers", f"{out}/outliers"], [out], name=f"{product.name}/sum"),
            ]
    nodes = [new for node in graph.graph.node for new in [*before.get(node.name, []), node, *after.get(node.name, [])]]
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)


def _scores(engine: Engine, checkpoint: Checkpoint, texts: Sequence[str]) -> np.ndarray:
    """The model's scores per text, forwards of `BATCH` sentences of similar length."""
    ids = checkpoint.tokenize(list(texts))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    logits = np.zeros((len(ids), len(checkpoint.labels)), dtype=np.float32)
    for start in range(0, len(order), BATCH):
        chunk = order[start : start + BATCH]
        logits[chunk] = engine.forward([ids[i] for i in chunk])
    return scoring.apply(checkpoint.function, logits)


def _described(path: Path, texts: Sequence[str]) -> dict[str, object]:
    """Which sentences: the file's name, how many, and a digest of them (the same file name may hold others)."""
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    return {"data": path.name, "sentences": len(texts), "sha256": digest}
