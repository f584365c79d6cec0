"""Long texts: what each `SENTIMENT_LONG_TEXTS` answers, and whether a request at the limits meets its deadline.

    python -m benchmarks.long_texts [--shared ../shared] [--out benchmarks/results]

1. Answers: real SST-2 dev sentences joined into long reviews (about 1,000-2,000 tokens), scored by
   the trained small checkpoint under `truncate`, `chunk` and `reject`, as a bulk job's chunks get
   them (`batcher.bulk` to a model worker run in this process on fakeredis: its tokenizer, batches
   and pooling). Two sets: reviews whose sentences all
   share one label, and reviews whose first 512 tokens are of one label and the rest, the larger
   part, of the other ("the verdict comes later"; the truth is the majority's label).
2. Deadline: the service as deployed (`sentiment api` and `sentiment worker`, a real Redis), with the
   full-size DistilBERT-base (random weights: the real model's cost) on this machine's cores, under
   `chunk` at the default limits: requests of never-seen 2,000-character texts up to
   `SENTIMENT_MAX_REQUEST_CHARS`, one text of that many characters (chunked), and 64 texts of 2,000
   characters (the largest request the per-text limits allow), which must be refused at once. Each answer's status and seconds.

Writes `long-texts-<UTC time>-cpu.json`; docs/tuning.md ("Long texts") quotes it. The machine is
shared: times are rough (the load average at start is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fakeredis
import httpx

from batcher.bulk import Bulk, BulkFailed
from batcher.worker import Worker
from benchmarks.checkpoints import write_full_size_model
from benchmarks.processes import running
from benchmarks.service import redis_server, service_env
from core.settings import Settings
from model_store.classifier import Classifier
from model_store.long_texts import LongTexts
from sentiment.embedded import free_port

REVIEWS = 20  # per label and set
SENTENCES = 45  # per homogeneous review: about 1,000 tokens
TEXT_CHARS = 2000  # the default SENTIMENT_MAX_CHARS
TRIES = 4  # requests per size


def sentences(path: Path) -> dict[int, list[str]]:
    by_label: dict[int, list[str]] = {0: [], 1: []}
    for line in path.read_text().splitlines()[1:]:
        text, label = line.rsplit("\t", 1)
        by_label[int(label)].append(text)
    return by_label


def reviews(by_label: dict[int, list[str]], tokens: Callable[[str], int]) -> list[dict[str, Any]]:
    """The two sets of long reviews, each with its truth."""
    out = []
    for label in (0, 1):
        pool = by_label[label]
        for n in range(REVIEWS):
            start = (n * SENTENCES) % (len(pool) - SENTENCES)
            out.append({"set": "one label", "truth": label, "text": " ".join(pool[start : start + SENTENCES])})
    for label in (0, 1):
        first, later = by_label[1 - label], by_label[label]
        for n in range(REVIEWS):
            head: list[str] = []
            at = n * 7
            while tokens(" ".join(head)) < 520:  # past the first window: all of it the other label
                head.append(first[at % len(first)])
                at += 1
            tail: list[str] = []
            at = n * 11
            while tokens(" ".join(tail)) < 900:  # the larger part
                tail.append(later[at % len(later)])
                at += 1
            out.append({"set": "verdict later", "truth": label, "text": " ".join(head + tail)})
    return out


def answers(shared: Path) -> dict[str, Any]:
    model_dir = shared / "models/distilbert-sst2-small"
    by_label = sentences(shared / "data/sst2-dev.tsv")
    results: dict[str, Any] = {}
    untruncated = Classifier(model_dir, device="cpu", precision="fp32", long_texts=LongTexts.REJECT)

    def tokens(text: str) -> int:
        return untruncated.split([text])[0].tokens

    texts = reviews(by_label, tokens)
    for review in texts:
        review["tokens"] = tokens(review["text"])
    for handling in LongTexts:
        classifier = Classifier(model_dir, device="cpu", precision="fp32", long_texts=handling)
        settings = Settings(model_dir=model_dir, long_texts=handling.value, key_prefix=f"long-{handling}")
        redis = fakeredis.FakeRedis()
        worker, bulk = Worker(settings, redis, classifier), Bulk(settings, redis)
        running_worker = threading.Thread(target=worker.run, daemon=True)
        running_worker.start()
        for set_name in ("one label", "verdict later"):
            rows = [r for r in texts if r["set"] == set_name]
            right = refused = 0
            truth_scores = []
            started = time.perf_counter()
            for review in rows:
                try:
                    [prediction] = bulk.receive(bulk.send([review["text"]]))
                except BulkFailed:
                    refused += 1
                    bulk.close()
                    continue
                scores = [s["score"] for s in prediction]
                right += scores.index(max(scores)) == review["truth"]
                truth_scores.append(scores[review["truth"]])
            results.setdefault(handling.value, {})[set_name] = {
                "reviews": len(rows),
                "accuracy": right / len(rows),
                "refused": refused,
                "mean_score_of_the_truth": sum(truth_scores) / len(truth_scores) if truth_scores else None,
                "seconds": round(time.perf_counter() - started, 2),
            }
        bulk.close()
        worker.stop()
        running_worker.join()
    for set_name in ("one label", "verdict later"):
        lengths = [r["tokens"] for r in texts if r["set"] == set_name]
        results.setdefault("reviews", {})[set_name] = {"tokens_min": min(lengths), "tokens_max": max(lengths)}
    return results


def never_seen(chars: int, serial: int, pool: list[str]) -> str:
    """A text of `chars` characters no earlier request sent (its sentences from a place of its own)."""
    out, at = [f"review {serial}:"], serial * 131
    while len(" ".join(out)) < chars:
        out.append(pool[at % len(pool)])
        at += 1
    return " ".join(out)[:chars]


def deadline(shared: Path) -> dict[str, Any]:
    pool = [line.rsplit("\t", 1)[0] for line in (shared / "data/sst2-train.tsv").read_text().splitlines()[1:]]
    settings = Settings(long_texts="chunk")
    limit, timeout_s = settings.max_request_chars, settings.request_timeout_s
    out: dict[str, Any] = {"max_request_chars": limit, "request_timeout_s": timeout_s, "requests": []}
    serial = 0
    with tempfile.TemporaryDirectory() as tmp, running() as procs, redis_server(procs) as (redis_url, _):
        model_dir = write_full_size_model(shared / "models/distilbert-base-sst2-config", Path(tmp) / "full")
        port = free_port()
        env = service_env(redis_url, model_dir, SENTIMENT_LONG_TEXTS="chunk", SENTIMENT_METRICS_PORT="0")
        procs.start(["-m", "sentiment.cli", "worker"], env)
        procs.start(["-m", "sentiment.cli", "api", "--port", str(port)], env)
        procs.wait_ok(f"http://127.0.0.1:{port}/ready")
        cases = [(n, TEXT_CHARS) for n in range(1, limit // TEXT_CHARS + 1)]
        cases += [(1, limit), (64, TEXT_CHARS)]
        for texts, chars in cases:
            for _ in range(TRIES if texts * chars <= limit else 1):
                body = [never_seen(chars, serial + i, pool) for i in range(texts)]
                serial += texts
                started = time.perf_counter()
                response = httpx.post(f"http://127.0.0.1:{port}/predict", json={"text": body}, timeout=60)
                out["requests"].append(
                    {
                        "texts": texts,
                        "chars_each": chars,
                        "status": response.status_code,
                        "seconds": round(time.perf_counter() - started, 3),
                        "error": response.json().get("error") if response.status_code != 200 else None,
                    }
                )
                print(out["requests"][-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("SENTIMENT_SHARED_DIR", "../shared")))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    record: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "answers": answers(args.shared),
    }
    print(json.dumps(record["answers"], indent=2), flush=True)
    record["deadline"] = deadline(args.shared)
    path = args.out / f"long-texts-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-cpu.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
