"""bf16, the CPU default where the hardware has it, keeps the real checkpoint's SST-2 dev accuracy,
measured through the worker (fp32 through the whole service is checked in tests/test_e2e.py).

The adoption rule for a faster precision (docs/tuning.md): dev accuracy within 0.5 point of a
plain fp32 transformers forward, and the same label on at least 99% of the sentences. bf16 is held
to it on every CPU: oneDNN emulates it where the hardware lacks it (slower, same arithmetic).
"""

from __future__ import annotations

import time
from pathlib import Path

import fakeredis
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from batcher.worker import Worker
from core.protocol import Keys, Result, WorkItem, new_id
from core.settings import Settings
from model_store.classifier import Classifier
from tests.conftest import shared_path, start_worker

CHUNK = 32  # texts per work item


def reference_labels(model_dir: Path, texts: list[str]) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    labels: list[int] = []
    with torch.inference_mode():
        for start in range(0, len(texts), CHUNK):
            batch = tokenizer(texts[start : start + CHUNK], padding=True, truncation=True, return_tensors="pt")
            labels += model(**batch).logits.argmax(-1).tolist()
    return labels


def test_bf16_keeps_dev_accuracy_and_labels(small_model_dir: Path) -> None:
    rows = [line.split("\t") for line in shared_path("data/sst2-dev.tsv").read_text().splitlines()[1:]]
    texts, truth = [r[0] for r in rows], [int(r[1]) for r in rows]
    # Two threads: two forward lanes of one thread each, as the worker runs on 2 cores by default.
    settings = Settings(key_prefix="precision", model_dir=small_model_dir, torch_threads=2, precision="bf16")
    classifier = Classifier(small_model_dir, "cpu", settings.torch_threads, settings.precision)
    assert classifier.lanes == 2
    redis = fakeredis.FakeRedis()
    keys = Keys(settings.key_prefix)
    now = time.time()
    items = [
        WorkItem(new_id(), texts[start : start + CHUNK], now, now + 600, keys.reply_channel("api"))
        for start in range(0, len(texts), CHUNK)
    ]
    for item in items:
        redis.lpush(keys.queue, item.encode())
    worker = Worker(settings, redis, classifier)
    thread = start_worker(worker)
    try:
        served: list[int] = []
        for item in items:
            for _ in range(6000):
                if raw := redis.get(keys.result(item.id)):
                    break
                time.sleep(0.01)
            result = Result.decode(raw)
            assert result.predictions is not None
            served += [max(range(2), key=lambda i, p=p: p[i]["score"]) for p in result.predictions]
    finally:
        worker.stop()
        thread.join(30)
    reference = reference_labels(small_model_dir, texts)
    accuracy = sum(s == t for s, t in zip(served, truth, strict=True)) / len(truth)
    fp32_accuracy = sum(r == t for r, t in zip(reference, truth, strict=True)) / len(truth)
    agreement = sum(s == r for s, r in zip(served, reference, strict=True)) / len(texts)
    assert len(served) == len(texts) == 872
    assert abs(accuracy - fp32_accuracy) <= 0.005, (classifier.precision, accuracy, fp32_accuracy)
    assert agreement >= 0.99, (classifier.precision, agreement)
    assert fp32_accuracy > 0.85  # the checkpoint is the trained one, not noise
