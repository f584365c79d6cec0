"""Scores as transformers gives them: the function on the logits follows each checkpoint's config as
`pipeline("text-classification", top_k=None)` decides it, on every engine, and end to end.

Random-weight checkpoints of each head (single-label, multi-label, regression, one output) and two
architectures (DistilBERT, BERT) are scored by our engines and by the pipeline; the answers agree to
1e-4 in fp32 (bf16 to its own precision). Then a multi-label and a regression checkpoint go through
`sentiment serve` as a new user sends them: /predict, /jobs and the Open Inference Protocol.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import orjson
import pytest
from fastapi.testclient import TestClient
from transformers import pipeline

from api.app import create_app
from batcher.worker import Worker
from benchmarks.checkpoints import write_tiny_model
from core.protocol import Keys, ScoreFunction
from core.settings import Settings
from model_store.checkpoint import Checkpoint, fingerprint
from model_store.classifier import Classifier
from tests.conftest import SCORE_ABS, start_worker, wait_for
from tests.test_serve import Serve

TEXTS = ["a good movie", "bad", "", "i love this film, it was not boring at all", "ünïcödé ✓ 42"]
KINDS: dict[str, dict[str, Any]] = {
    # kind -> the head's labels and config.problem_type, and the function the pipeline applies
    "single_label": {"labels": ("NEGATIVE", "NEUTRAL", "POSITIVE"), "problem_type": "single_label_classification"},
    "multi_label": {"labels": ("toxic", "insult", "threat", "obscene"), "problem_type": "multi_label_classification"},
    "regression": {"labels": ("rating",), "problem_type": "regression"},
    "one_output": {"labels": ("relevant",), "problem_type": None},  # no problem_type: one output is a sigmoid
}
FUNCTIONS = {"single_label": "softmax", "multi_label": "sigmoid", "regression": "none", "one_output": "sigmoid"}
ENGINES = {  # name -> Classifier arguments, and the tolerance against the pipeline's fp32 scores
    "torch fp32": ({"engine": "torch", "precision": "fp32"}, 1e-4),
    "onnxruntime fp32": ({"engine": "onnxruntime", "precision": "fp32"}, 1e-4),
    "torch bf16": ({"engine": "torch", "precision": "bf16"}, 3e-2),
}


@functools.cache
def checkpoint_dir(root: Path, architecture: str, kind: str) -> Path:
    return write_tiny_model(root / f"{architecture}-{kind}", seed=3, architecture=architecture, **KINDS[kind])


@functools.cache
def transformers_scores(model_dir: Path) -> list[dict[str, float]]:
    """What the pipeline answers per text, every label (its order is by score: kept by label)."""
    classify = pipeline("text-classification", model=str(model_dir), top_k=None, device="cpu")
    return [{s["label"]: s["score"] for s in answer} for answer in classify(TEXTS)]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("heads")


def by_label(labels: list[str], rows: list[list[float]]) -> list[dict[str, float]]:
    return [dict(zip(labels, row, strict=True)) for row in rows]


def assert_close(got: list[dict[str, float]], want: list[dict[str, float]], tolerance: float) -> None:
    assert len(got) == len(want)
    for ours, theirs in zip(got, want, strict=True):
        assert ours.keys() == theirs.keys()
        assert ours == pytest.approx(theirs, abs=tolerance)


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("architecture", ["distilbert", "bert"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_head_is_scored_as_the_pipeline_scores_it_on_every_engine(
    root: Path, architecture: str, kind: str, engine: str
) -> None:
    model_dir = checkpoint_dir(root, architecture, kind)
    want = transformers_scores(model_dir)
    assert Checkpoint(model_dir).function == FUNCTIONS[kind]
    arguments, tolerance = ENGINES[engine]
    classifier = Classifier(model_dir, device="cpu", threads=1, **arguments)
    ids = classifier.tokenize(TEXTS)
    for packed in [False, True] if classifier.cost.packs else [False]:  # DistilBERT packs too
        assert_close(by_label(classifier.labels, classifier.forward(ids, packed)), want, tolerance)
    singles = [classifier.forward([one])[0] for one in ids]  # batches of one: no padding at all
    assert_close(by_label(classifier.labels, singles), want, tolerance)


def test_a_regression_head_answers_values_beyond_zero_to_one_and_its_label(root: Path) -> None:
    """The raw value, whatever its range: a head scaled up scores far outside [0, 1]."""
    model_dir = checkpoint_dir(root, "distilbert", "regression")
    classifier = Classifier(model_dir, device="cpu", threads=1, engine="torch", precision="fp32")
    logits = classifier.engine.forward(classifier.tokenize(TEXTS)) * 1000
    assert classifier.scores(logits).tolist() == logits.tolist()
    assert classifier.labels == ["rating"]


def test_the_function_a_caller_names_is_applied_to_the_same_logits(root: Path) -> None:
    """`function_to_apply` as the pipeline takes it: softmax, sigmoid or the raw logits, whatever the head."""
    model_dir = checkpoint_dir(root, "bert", "single_label")
    classifier = Classifier(model_dir, device="cpu", threads=1, engine="torch", precision="fp32")
    logits = classifier.engine.forward(classifier.tokenize(TEXTS))
    classify = pipeline("text-classification", model=str(model_dir), top_k=None, device="cpu")
    for function in ScoreFunction:
        want = [
            {s["label"]: s["score"] for s in answer} for answer in classify(TEXTS, function_to_apply=function.value)
        ]
        assert_close(by_label(classifier.labels, classifier.scores(logits, function).tolist()), want, 1e-4)


def test_a_changed_problem_type_is_a_new_model_version(tmp_path: Path) -> None:
    """The same weights and labels under another head type score differently: they must not share a cache."""
    labels = ("toxic", "insult")
    single = write_tiny_model(tmp_path / "single", labels=labels, problem_type="single_label_classification")
    multi = write_tiny_model(tmp_path / "multi", labels=labels, problem_type="multi_label_classification")
    assert (single / "model.safetensors").read_bytes() == (multi / "model.safetensors").read_bytes()
    assert fingerprint(single) != fingerprint(multi)
    assert (Checkpoint(single).function, Checkpoint(multi).function) == ("softmax", "sigmoid")


def files_fingerprint(model_dir: Path) -> str:
    """The cache version an fp32 checkpoint had while every cached score was a softmax, whatever its
    head: the SHA-256 of its files alone."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def test_scores_cached_when_every_head_was_a_softmax_are_never_served(root: Path) -> None:
    """A regression checkpoint's softmax was 1.0 for every text: an entry of that cache, left in Redis
    across an upgrade, is under another version than the one the worker now announces, and missed."""
    model_dir = checkpoint_dir(root, "distilbert", "regression")
    classifier = Classifier(model_dir, device="cpu", threads=1, engine="torch", precision="fp32")
    old_version = files_fingerprint(model_dir)
    assert classifier.version != old_version
    settings = Settings(key_prefix="scores", model_dir=model_dir, max_wait_ms=20, request_timeout_s=10)
    server = fakeredis.FakeServer()
    redis = fakeredis.FakeRedis(server=server)
    keys = Keys(settings.key_prefix)
    redis.set(keys.cache(old_version, TEXTS[0]), orjson.dumps([{"label": "rating", "score": 1.0}]))
    worker = Worker(settings, redis, classifier)
    start_worker(worker)
    app = create_app(settings, redis=fakeredis.FakeAsyncRedis(server=server), jobs_redis=redis)
    try:
        with TestClient(app) as client:
            answer = client.post("/predict", json={"text": [TEXTS[0]]})
    finally:
        worker.stop()
    assert (answer.status_code, answer.headers["X-Cache"]) == (200, "miss")
    [[score]] = answer.json()["predictions"]
    assert score["score"] == pytest.approx(classifier.forward(classifier.tokenize([TEXTS[0]]))[0][0], abs=SCORE_ABS)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["multi_label", "regression"])
def test_a_head_through_sentiment_serve_answers_what_transformers_answers(root: Path, kind: str) -> None:
    """As a new user runs it: `sentiment serve` on the checkpoint (fp32, as the pipeline computes), and
    the texts through /predict, /jobs and the Open Inference Protocol."""
    model_dir = checkpoint_dir(root, "distilbert", kind)
    want = transformers_scores(model_dir)
    serve = Serve(model_dir, env={"SENTIMENT_PRECISION": "fp32", "SENTIMENT_LOG_LEVEL": "WARNING"})
    try:
        serve.wait_ready()
        with httpx.Client(base_url=serve.url, timeout=60) as http:
            model = http.get("/model").json()
            assert (model["labels"], model["function"]) == (list(KINDS[kind]["labels"]), FUNCTIONS[kind])
            predicted = http.post("/predict", json={"text": TEXTS}).json()["predictions"]
            assert_close([{s["label"]: s["score"] for s in p} for p in predicted], want, 1e-4)

            body = {"inputs": [{"name": "text", "shape": [len(TEXTS)], "datatype": "BYTES", "data": TEXTS}]}
            outputs = http.post(f"/v2/models/{model['name']}/infer", json=body).json()["outputs"]
            scores = next(o for o in outputs if o["name"] == "scores")
            rows = [
                scores["data"][i : i + len(model["labels"])]
                for i in range(0, len(scores["data"]), len(model["labels"]))
            ]
            assert_close(by_label(model["labels"], rows), want, 1e-4)

            job = http.post("/jobs", json={"text": [*TEXTS, "a text only this job has"]}).json()["job_id"]
            done = wait_for("the job", lambda: (v := http.get(f"/jobs/{job}").json())["status"] == "finished" and v)
            assert_close([{s["label"]: s["score"] for s in p} for p in done["predictions"][:-1]], want, 1e-4)
    finally:
        serve.kill()
