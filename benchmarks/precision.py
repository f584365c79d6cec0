"""Speed and accuracy per CPU precision and engine (the trade-off table in docs/tuning.md).

Usage: python -m benchmarks.precision [--shared ../shared] [--out precision.json] [--threads 2]
Speed: the full-size DistilBERT-base shape (random weights: same cost as the real model) on
SST-2 train sentences, sorted by length in windows of 512 as the worker batches them; median
sentences/s over `--repeats` rounds, the variants alternated within each round, plus the median
batch-1 forward time.
Accuracy: the small real checkpoint on the SST-2 dev set, and how often its labels agree with fp32.
The int8 artifact's are its report's (`sentiment model quantize` on the small checkpoint); its speed
is the artifact made the same way from the full-size shape, with the outlier channels a trained
model has planted (`factory.plant_outliers`: random weights have none, and the float path they
take costs time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import machine
from benchmarks.checkpoints import write_full_size_model
from benchmarks.limit import batches
from benchmarks.workload import default_shared_dir, int8_for_speed
from model_store.checkpoint import Checkpoint
from model_store.classifier import Classifier
from model_store.engine import EngineName, Precision
from model_store.int8 import Report
from model_store.quantize import quantize

# name -> precision and engine: torch runs every precision but the artifact (precisions compared on
# one engine), ONNX Runtime fp32, and the int8 artifact on its recipe's runtime (what `auto` serves
# where one passes).
VARIANTS: dict[str, tuple[Precision, EngineName]] = {
    "fp32": ("fp32", "torch"),
    "bf16": ("bf16", "torch"),
    "int8": ("int8", "torch"),
    "fp32-onnxruntime": ("fp32", "onnxruntime"),
    "int8-artifact": ("int8", "auto"),
}
CALIBRATION = 512  # SST-2 train sentences, as `sentiment model quantize` takes by default


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    return [r[0] for r in rows], [int(r[1]) for r in rows]


def throughputs(models: dict[str, Classifier], ids: list[list[int]], batch: int, repeats: int) -> dict[str, float]:
    """Median sentences/s of each variant over `repeats` rounds; within a round each batch is run by
    every variant in turn, the order reversed every other batch, so a slower minute of a shared box
    falls on all of them alike. An untimed round first: oneDNN and OpenVINO compile kernels for each
    new shape, which a worker pays once."""
    rates: dict[str, list[float]] = {name: [] for name in models}
    chunks = batches(ids, batch)
    for chunk in chunks:
        for model in models.values():
            model.forward(chunk)
    for _ in range(repeats):
        spent = dict.fromkeys(models, 0.0)
        for i, chunk in enumerate(chunks):
            for name in list(models)[:: 1 if i % 2 == 0 else -1]:
                started = time.perf_counter()
                models[name].forward(chunk)
                spent[name] += time.perf_counter() - started
        for name in models:
            rates[name].append(len(ids) / spent[name])
    return {name: statistics.median(r) for name, r in rates.items()}


def batch1_ms(classifier: Classifier, ids: list[list[int]]) -> float:
    times = []
    for one in ids:
        started = time.perf_counter()
        classifier.forward([one])
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def labels(classifier: Classifier, texts: list[str]) -> list[int]:
    ids = classifier.tokenize(texts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [0] * len(ids)
    for start in range(0, len(order), 32):
        chunk = order[start : start + 32]
        for i, probs in zip(chunk, classifier.forward([ids[i] for i in chunk]), strict=True):
            out[i] = max(range(len(probs)), key=probs.__getitem__)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=default_shared_dir(), help="shared data directory")
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="model threads (default: cores)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--texts", type=int, default=256, help="SST-2 train sentences per speed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()

    train, _ = read_tsv(args.shared / "data/sst2-train.tsv")
    dev, truth = read_tsv(args.shared / "data/sst2-dev.tsv")
    rows: dict[str, dict[str, float | str]] = {name: {} for name in args.variants}
    results = {"machine": machine.describe("cpu"), "threads": args.threads, "variants": rows}
    small_dir = args.shared / "models/distilbert-sst2-small"

    def load(model_dir: Path, name: str) -> Classifier:
        precision, engine = VARIANTS[name]
        # The full-size shape's artifact fails the rule (random weights): served for its speed alone.
        # One lane: each forward on all the threads, as this bench calls them one at a time.
        return Classifier(
            model_dir,
            device="cpu",
            threads=args.threads,
            precision=precision,
            engine=engine,
            lanes=1,
            int8_allow_failing=True,
        )

    with tempfile.TemporaryDirectory() as tmp:
        calibration = (Path("sst2-train.tsv"), train[:CALIBRATION])
        evaluation = (Path("sst2-dev.tsv"), dev, truth)
        recipe: str | None = None  # the full-size artifact's: the one the small checkpoint's report picks
        if not args.skip_accuracy:
            reference = labels(Classifier(small_dir, device="cpu", threads=args.threads, precision="fp32"), dev)
            for name in rows:
                if name == "int8-artifact":
                    report = quantize(
                        Checkpoint(small_dir), Path(tmp) / "small-int8", calibration, evaluation, args.threads
                    )
                    recipe = report.recipe
                    rows[name].update(
                        dev_accuracy=report.int8_accuracy,
                        agreement_with_fp32=report.agreement,
                        largest_score_difference=report.largest_score_difference,
                    )
                    continue
                predicted = labels(load(small_dir, name), dev)
                rows[name]["dev_accuracy"] = sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
                rows[name]["agreement_with_fp32"] = sum(
                    p == r for p, r in zip(predicted, reference, strict=True)
                ) / len(dev)
        full_dir = write_full_size_model(args.shared / "models/distilbert-base-sst2-config", Path(tmp) / "full")
        if "int8-artifact" in rows:
            int8_for_speed(full_dir, args.shared, recipe)
            made = Report.read(full_dir / "int8")
            rows["int8-artifact"]["method"] = f"{made.recipe}: {made.method}"
        full = {name: load(full_dir, name) for name in rows}
        ids = full[args.variants[0]].tokenize(train[: args.texts])
        singles = full[args.variants[0]].tokenize(train[:30])
        for batch in (16, 32):
            for name, rate in throughputs(full, ids, batch, args.repeats).items():
                rows[name][f"batch{batch}_per_s"] = rate
        for name, classifier in full.items():
            rows[name]["batch1_ms"] = batch1_ms(classifier, singles)
            rows[name]["engine"] = classifier.engine.name
    for name, row in rows.items():
        print(name, json.dumps(row), flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
