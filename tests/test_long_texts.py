"""Texts longer than the model's length (`SENTIMENT_LONG_TEXTS`): chunked as transformers cuts them and
pooled, rejected by name, or truncated and counted; and the limits that keep a request within its deadline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fakeredis
import httpx
import jsonschema
import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from batcher.bulk import Bulk, BulkFailed
from batcher.worker import Worker
from benchmarks.checkpoints import write_tiny_model
from core.protocol import Keys, Prediction, new_id
from core.settings import Settings
from model_store.classifier import Classifier
from model_store.long_texts import LongTexts
from sentiment.embedded import free_port
from tests.conftest import HANG_GUARD_S, shared_path, start_service, start_worker
from tests.test_worker import push, wait_result

WORDS = [
    "the",
    "movie",
    "was",
    "not",
    "very",
    "good",
    "but",
    "i",
    "love",
    "this",
    "film",
    "and",
    "that",
    "is",
    "great",
    "fun",
]


def review(words: int, seed: int = 0) -> str:
    """A text of `words` words from the tiny model's vocabulary (one token each)."""
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, words))


def sst2_review(sentences: int, start: int = 0) -> str:
    """Real SST-2 dev sentences joined into one long review."""
    lines = shared_path("data/sst2-dev.tsv").read_text().splitlines()[1:]
    return " ".join(line.split("\t")[0] for line in lines[start : start + sentences])


def transformers_chunked(model_dir: Path, text: str, function: str) -> list[float]:
    """What the service should answer for a chunked `text`, computed with transformers alone: its
    overflowing chunks (stride: an eighth of the length), each chunk's logits, their mean weighted
    by each chunk's non-special tokens, then the score function."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    chunks = tokenizer(
        text,
        truncation=True,
        max_length=length,
        stride=length // 8,
        return_overflowing_tokens=True,
        return_special_tokens_mask=True,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(input_ids=chunks["input_ids"], attention_mask=chunks["attention_mask"]).logits.double()
    weights = ((1 - chunks["special_tokens_mask"]) * chunks["attention_mask"]).sum(1).double()
    assert len(weights) > 2, "the text is not long enough to make several chunks"
    pooled = (logits * weights[:, None]).sum(0) / weights.sum()
    scores = {"softmax": pooled.softmax(0), "sigmoid": pooled.sigmoid(), "none": pooled}[function]
    return scores.tolist()


def test_under_chunk_one_text_may_fill_a_request() -> None:
    assert Settings().max_chars == 2000
    assert (
        Settings(long_texts="chunk", request_timeout_s=20).max_chars
        == 20_000
        == Settings(long_texts="chunk", request_timeout_s=20).max_request_chars
    )


@pytest.mark.parametrize("handling", list(LongTexts))
def test_the_windows_are_transformers_overflowing_windows(tiny_model_dir: Path, handling: LongTexts) -> None:
    classifier = Classifier(tiny_model_dir, device="cpu", threads=1, long_texts=handling)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text, short = review(400), review(20)
    full = tokenizer(text)["input_ids"]
    long, fits = classifier.split([text, short])
    assert long.tokens == len(full) > classifier.max_length  # the whole text's count, whichever the handling
    assert fits.chunks == [tokenizer(short)["input_ids"]] and fits.tokens == len(fits.ids)
    if handling == LongTexts.CHUNK:
        want = tokenizer(text, truncation=True, max_length=128, stride=16, return_overflowing_tokens=True)["input_ids"]
        assert long.chunks == want and len(want) > 2
        assert long.weights == [len(ids) - 2 for ids in want]
    elif handling == LongTexts.TRUNCATE:
        assert long.chunks == [tokenizer(text, truncation=True, max_length=128)["input_ids"]]
    else:
        assert long.chunks == [full]


@pytest.mark.parametrize("problem_type", ["single_label_classification", "multi_label_classification", "regression"])
def test_a_chunked_text_is_its_chunks_run_through_transformers_in_the_batches_of_other_texts(
    tmp_path: Path, redis: fakeredis.FakeRedis, problem_type: str
) -> None:
    labels = ["ONLY"] if problem_type == "regression" else ["NEGATIVE", "POSITIVE"]
    model_dir = write_tiny_model(tmp_path / "model", labels=labels, problem_type=problem_type)  # type: ignore[arg-type]
    classifier = Classifier(model_dir, device="cpu", threads=1, long_texts=LongTexts.CHUNK)
    settings = Settings(key_prefix="test", model_dir=model_dir, long_texts="chunk", max_wait_ms=50)
    keys = Keys(settings.key_prefix)
    forwards: list[list[list[int]]] = []
    real_forward = classifier.engine.forward

    def recorded(batch: list[list[int]], packed: bool = False) -> np.ndarray:
        forwards.append(batch)
        return real_forward(batch, packed)

    classifier.engine.forward = recorded  # type: ignore[method-assign]
    worker = Worker(settings, redis, classifier)
    long, short = review(400, seed=1), review(12, seed=2)
    items = [push(redis, keys, short, long), push(redis, keys, long)]  # queued together: one take, one batch
    start_worker(worker)
    try:
        first, second = (wait_result(redis, keys, item) for item in items)
    finally:
        worker.stop()
    assert first.error is None and second.error is None
    function = classifier.function.value
    want = transformers_chunked(model_dir, long, function)
    assert [s["score"] for s in first.predictions[1]] == pytest.approx(want, abs=1e-4)
    assert first.predictions[1] == second.predictions[0]  # one text, computed once for both
    [short_ids] = classifier.tokenize([short])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chunks = tokenizer(long, truncation=True, max_length=128, stride=16, return_overflowing_tokens=True)["input_ids"]
    ran = [ids for batch in forwards for ids in batch]
    assert sorted(map(tuple, ran)) == sorted(map(tuple, [*chunks, short_ids]))  # each chunk once, nothing else
    # Chunks are texts to the batches: one forward held several, and one held a chunk and the short text.
    assert any(sum(w in batch for w in chunks) > 1 for batch in forwards)
    assert any(short_ids in batch and any(w in batch for w in chunks) for batch in forwards)
    cached = redis.get(keys.cache(classifier.version, long))
    assert cached is not None and classifier.version.endswith("-chunk")


def test_the_real_checkpoint_answers_a_long_review_as_transformers_does_from_its_chunks(
    small_model_dir: Path, redis: fakeredis.FakeRedis
) -> None:
    text = sst2_review(60)  # about 1,500 tokens: 4 chunks of 512
    classifier = Classifier(small_model_dir, device="cpu", threads=1, precision="fp32", long_texts=LongTexts.CHUNK)
    settings = Settings(key_prefix="test", model_dir=small_model_dir, long_texts="chunk")
    keys = Keys(settings.key_prefix)
    worker = Worker(settings, redis, classifier)
    start_worker(worker)
    try:
        result = wait_result(redis, keys, push(redis, keys, text))
    finally:
        worker.stop()
    assert result.predictions is not None
    want = transformers_chunked(small_model_dir, text, "softmax")
    assert [s["score"] for s in result.predictions[0]] == pytest.approx(want, abs=1e-4)


def test_a_bulk_jobs_texts_are_chunked_and_rejected_by_the_model_worker(
    small_model_dir: Path, tiny_model_dir: Path, redis: fakeredis.FakeRedis
) -> None:
    # A job's chunks go through the model workers' pipeline as bulk work (`batcher.bulk`), long texts too.
    long, short = sst2_review(60, start=100), "a gorgeous, witty film."
    chunking = Classifier(small_model_dir, device="cpu", threads=1, precision="fp32", long_texts=LongTexts.CHUNK)
    settings = Settings(key_prefix="jobs", model_dir=small_model_dir, long_texts="chunk")
    got_long, got_short = bulk_predictions(settings, redis, chunking, [long, short])
    want_long = transformers_chunked(small_model_dir, long, "softmax")
    assert [s["score"] for s in got_long] == pytest.approx(want_long, abs=1e-4)
    [want_short] = chunking.forward(chunking.tokenize([short]))
    assert [s["score"] for s in got_short] == pytest.approx(want_short, abs=1e-5)
    rejecting = Classifier(tiny_model_dir, device="cpu", threads=1, long_texts=LongTexts.REJECT)
    settings = Settings(key_prefix="jobs-reject", model_dir=tiny_model_dir, long_texts="reject")
    with pytest.raises(BulkFailed, match="longer than the model's 128 tokens"):
        bulk_predictions(settings, redis, rejecting, [review(9), review(400)])


def bulk_predictions(
    settings: Settings, redis: fakeredis.FakeRedis, classifier: Classifier, texts: list[str]
) -> list[Prediction]:
    """`texts` as a bulk job's chunk, through a model worker of `classifier`."""
    worker, bulk = Worker(settings, redis, classifier), Bulk(settings, redis)
    start_worker(worker)
    try:
        return bulk.receive(bulk.send(texts))
    finally:
        bulk.close()
        worker.stop()


@pytest.fixture(scope="module")
def rejecting(redis_url: str, tiny_model_dir: Path) -> Iterator[str]:
    service = start_service(redis_url, tiny_model_dir, f"reject-{new_id()[:8]}", SENTIMENT_LONG_TEXTS="reject")
    yield service.url
    service.stop()


def test_reject_names_each_long_text_by_its_place_and_its_tokens(rejecting: str, tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    long, longer, fine = review(200, seed=3), review(300, seed=4), review(10, seed=5)
    response = httpx.post(f"{rejecting}/predict", json={"text": [fine, long, fine, longer, long]}, timeout=HANG_GUARD_S)
    assert response.status_code == 422
    body = response.json()
    assert body["error_type"] == "text_too_long"
    tokens = [len(tokenizer(t)["input_ids"]) for t in (long, longer)]
    assert f"text 1 ({tokens[0]} tokens), text 3 ({tokens[1]} tokens)" in body["error"]
    assert "longer than the model's 128 tokens" in body["error"]
    # The one 422 shape: a `detail` entry per text, as the OpenAPI document says /predict's 422 is.
    assert [(d["loc"], d["type"], d["tokens"]) for d in body["detail"]] == [
        (["text", 1], "text_too_long", tokens[0]),
        (["text", 3], "text_too_long", tokens[1]),
    ]
    document = httpx.get(f"{rejecting}/openapi.json", timeout=HANG_GUARD_S).json()
    answer = document["paths"]["/predict"]["post"]["responses"]["422"]
    assert "text_too_long" in answer["description"].split(", ")
    jsonschema.validate(body, {**answer["content"]["application/json"]["schema"], "components": document["components"]})
    ok = httpx.post(f"{rejecting}/predict", json={"text": [fine]}, timeout=HANG_GUARD_S)
    assert ok.status_code == 200  # a text within the length is answered


def test_truncate_answers_the_first_tokens_and_counts_each_truncated_text(
    redis_url: str, tiny_model_dir: Path, classifier: Classifier
) -> None:
    metrics_port = free_port()
    service = start_service(
        redis_url, tiny_model_dir, f"truncate-{new_id()[:8]}", SENTIMENT_METRICS_PORT=str(metrics_port)
    )
    try:
        long, short = review(300, seed=6), review(5, seed=7)
        response = httpx.post(f"{service.url}/predict", json={"text": [long, short]}, timeout=HANG_GUARD_S)
        assert response.status_code == 200
        [want] = classifier.forward(classifier.tokenize([long]))  # its first 128 tokens
        assert [s["score"] for s in response.json()["predictions"][0]] == pytest.approx(want, abs=1e-4)
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=HANG_GUARD_S).text
        assert 'sentiment_long_texts_total{handling="truncated"} 1.0' in scraped
        assert 'sentiment_long_texts_total{handling="chunked"} 0.0' in scraped
    finally:
        service.stop()
