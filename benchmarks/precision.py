"""Speed and accuracy per CPU precision (the trade-off table in docs/tuning.md).

Usage: python -m benchmarks.precision [--shared ../shared] [--out precision.json] [--threads 2]
Speed: the full-size DistilBERT-base shape (random weights: same cost as the real model) on
SST-2 train sentences, sorted by length in windows of 512 as the worker batches them; median
sentences/s over `--repeats` runs, plus the median batch-1 forward time.
Accuracy: the small real checkpoint on the SST-2 dev set, and how often its labels agree with fp32.
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
from benchmarks.limit import batches
from benchmarks.workload import default_shared_dir
from model_store.classifier import Classifier
from model_store.engine import EngineName, Precision
from model_store.factory import write_full_size_model

PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "int8")
ENGINE: EngineName = "torch"  # the one engine that runs every precision: compares precisions, not engines


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    return [r[0] for r in rows], [int(r[1]) for r in rows]


def throughput(classifier: Classifier, ids: list[list[int]], batch: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for chunk in batches(ids, batch):
            classifier.forward(chunk)
        rates.append(len(ids) / (time.perf_counter() - started))
    return statistics.median(rates)


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
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: cores)")
    parser.add_argument("--precisions", nargs="+", default=PRECISIONS, choices=PRECISIONS)
    parser.add_argument("--texts", type=int, default=256, help="SST-2 train sentences per speed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()

    train, _ = read_tsv(args.shared / "data/sst2-train.tsv")
    dev, truth = read_tsv(args.shared / "data/sst2-dev.tsv")
    precisions: dict[str, dict[str, float]] = {}
    results = {"machine": machine.describe("cpu"), "threads": args.threads, "precisions": precisions}
    reference: list[int] | None = None
    small_dir = args.shared / "models/distilbert-sst2-small"

    def load(model_dir: Path, precision: Precision) -> Classifier:
        return Classifier(model_dir, device="cpu", threads=args.threads, precision=precision, engine=ENGINE)

    with tempfile.TemporaryDirectory() as tmp:
        full_dir = write_full_size_model(args.shared / "models/distilbert-base-sst2-config", Path(tmp) / "full")
        for precision in args.precisions:
            full = load(full_dir, precision)
            ids = full.tokenize(train[: args.texts])
            row: dict[str, float] = {
                "batch1_ms": batch1_ms(full, full.tokenize(train[:30])),
                "batch16_per_s": throughput(full, ids, 16, args.repeats),
                "batch32_per_s": throughput(full, ids, 32, args.repeats),
            }
            del full
            if not args.skip_accuracy:
                predicted = labels(load(small_dir, precision), dev)
                reference = reference or (predicted if precision == "fp32" else labels(load(small_dir, "fp32"), dev))
                row["dev_accuracy"] = sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
                row["agreement_with_fp32"] = sum(p == r for p, r in zip(predicted, reference, strict=True)) / len(dev)
            precisions[precision] = row
            print(precision, json.dumps(row), flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
