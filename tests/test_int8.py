"""The int8 artifact: `sentiment model quantize` makes it with its accuracy report.

Random tiny checkpoints (DistilBERT and BERT, each head) stand in for the real one: the accuracy the
artifact keeps on SST-2 is what its report measures (`sentiment model quantize` on the small
checkpoint, docs/tuning.md "Precision"), too slow for a test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from model_store import int8, layout, quantize
from model_store.checkpoint import Checkpoint, fingerprint
from model_store.classifier import Classifier
from model_store.factory import write_tiny_model
from model_store.onnx_engine import OnnxEngine, export
from model_store.torch_engine import TRACE_EXAMPLE, load_module
from sentiment.cli import main
from tests.test_long_texts import review

# How far an int8 score may lie from fp32's on the random checkpoints (their largest difference is
# 1.4e-3, a regression head's raw value); the real checkpoint's is in its report.
INT8_ABS = 5e-3
TEXTS = [review(3 + i % 37, seed=i) for i in range(160)]  # the tiny vocabulary's words, 3 to 40 of them


def copy_checkpoint(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns(int8.DEFAULT_DIR))
    return dest


def make_artifact(model_dir: Path, dest: Path | None = None) -> int8.Report:
    """An artifact of `model_dir` in `dest` (default: its `int8/`), evaluated against fp32's own labels."""
    checkpoint = Checkpoint(model_dir)
    fp32 = Classifier(model_dir, device="cpu", threads=1, precision="fp32")
    labels = [int(np.argmax(scores)) for scores in fp32.forward(fp32.tokenize(TEXTS[80:]))]
    return quantize.quantize(
        checkpoint,
        dest or model_dir / int8.DEFAULT_DIR,
        (Path("calibration.txt"), TEXTS[:80]),
        (Path("eval.tsv"), TEXTS[80:], labels),
        threads=1,
    )


def test_quantize_writes_the_artifact_and_its_report_beside_the_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = copy_checkpoint(tiny_model_dir, tmp_path / "model")
    before = fingerprint(model_dir)
    calibration = tmp_path / "train.tsv"
    calibration.write_text("text\tlabel\n" + "".join(f"{t}\t1\n" for t in TEXTS[:80]))
    evaluation = tmp_path / "dev.tsv"
    evaluation.write_text("text\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(TEXTS[80:])))
    main(["model", "quantize", str(model_dir), "--calibration", str(calibration), "--eval", str(evaluation)])

    artifact = model_dir / "int8"
    report = json.loads((artifact / "report.json").read_text())
    assert (artifact / "model.onnx").is_file()
    assert fingerprint(model_dir) == before  # a folder of its own: the model's version is unchanged
    assert report["checkpoint"] == before and report["artifact"] == int8.file_digest(artifact / "model.onnx")
    assert report["tool"].startswith("onnxruntime ") and report["method"].startswith("dynamic")
    assert (report["calibration"]["data"], report["calibration"]["sentences"]) == ("train.tsv", 80)
    assert (report["evaluation"]["data"], report["evaluation"]["sentences"]) == ("dev.tsv", 80)
    for figure in ("fp32_accuracy", "int8_accuracy", "agreement"):
        assert 0.0 <= report[figure] <= 1.0
    assert 0.0 < report["largest_score_difference"] < INT8_ABS
    assert report["passes"] == int8.Report.read(artifact).passes == (report["agreement"] >= 0.99)
    assert "passes the accuracy rule" in capsys.readouterr().out
    assert not list(model_dir.glob(".int8-*"))  # no staging folder left behind


def outlier_model(dest: Path) -> Path:
    """A tiny DistilBERT whose attention output has one channel 50 times the others' range, as trained
    transformers' activations have (the real checkpoint's FFN inputs: one channel 8-16 times the median)."""
    model_dir = write_tiny_model(dest, seed=3)
    weights = load_file(model_dir / "model.safetensors")
    for layer in range(2):
        for part in ("weight", "bias"):
            weights[f"distilbert.transformer.layer.{layer}.sa_layer_norm.{part}"][5] *= 50.0
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    return model_dir


def test_outlier_channels_run_in_float_beside_the_int8_product_of_the_rest(tmp_path: Path) -> None:
    """The `split` rewrite finds the channel on calibration sentences and keeps fp32's arithmetic
    exactly; quantized, the outlier channels' products stay float MatMuls beside the int8 ones."""
    checkpoint = Checkpoint(outlier_model(tmp_path / "model"))
    module = load_module(checkpoint, torch.device("cpu"), "fp32")
    graph_path = tmp_path / "fp32.onnx"
    export(module, graph_path, layout.inputs(TRACE_EXAMPLE, checkpoint.pad_id, segments=True, packed=False))
    graph = onnx.load(graph_path)
    outliers = quantize._outlier_channels(graph, graph_path, checkpoint, TEXTS[:80], threads=1)
    assert [5] in [channels.tolist() for channels in outliers.values()], outliers  # each layer's lin1 input
    quantize._split(graph, outliers)
    onnx.save(graph, tmp_path / "split.onnx")
    ids = checkpoint.tokenize(TEXTS[80:])
    plain = OnnxEngine(graph_path, 1, checkpoint.pad_id).forward(ids)
    split = OnnxEngine(tmp_path / "split.onnx", 1, checkpoint.pad_id).forward(ids)
    assert split == pytest.approx(plain, abs=1e-5)

    reports = {}
    for recipe in quantize.RECIPES:
        (tmp_path / recipe).mkdir()
        reports[recipe] = quantize._make(
            recipe,
            checkpoint,
            graph_path,
            tmp_path / recipe,
            (Path("calibration.txt"), TEXTS[:80]),
            (Path("eval.tsv"), TEXTS[80:], [0] * 80),
            quantize._scores(OnnxEngine(graph_path, 1, checkpoint.pad_id), checkpoint, TEXTS[80:]),
            threads=1,
        )
    nodes = {node.name: node.op_type for node in onnx.load(tmp_path / "split" / int8.MODEL_FILE).graph.node}
    in_float = [name for name in reports["split"].kept_float if name.endswith(quantize.OUTLIER_SUFFIX)]
    assert in_float and all(nodes[name] == "MatMul" for name in in_float)
    # and beside each, the product of the other channels in int8
    assert all(nodes[name.removesuffix(quantize.OUTLIER_SUFFIX) + "_quant"] == "MatMulInteger" for name in in_float)
    assert not any(name.endswith(quantize.OUTLIER_SUFFIX) for name in reports["dynamic"].kept_float)
    assert reports["split"].artifact != reports["dynamic"].artifact  # another graph, another cache version


def test_where_no_recipe_passes_the_most_accurate_is_written_with_a_failing_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(int8, "MIN_AGREEMENT", 1.01)  # a rule no recipe can keep
    report = make_artifact(outlier_model(tmp_path / "model"))
    assert not report.passes and report.method.startswith(quantize.RECIPES[-1])
    assert int8.Report.read(tmp_path / "model" / "int8") == report
