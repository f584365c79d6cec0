"""Hugging Face's text-classification task at `POST /`: `huggingface_hub.InferenceClient` unchanged.

End to end: `sentiment api` and `sentiment worker` against a real redis-server, called by
InferenceClient (and the README's snippet), answering /predict's labels and scores, ranked.
In process on fakeredis with a worker thread: `top_k`, `function_to_apply` as transformers applies
it to the model's logits (cached apart from the model's own scores), and bad parameters as 422.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import fakeredis
import httpx
import numpy as np
import pytest
from huggingface_hub import InferenceClient

from api.app import create_app
from batcher.worker import Worker
from benchmarks.checkpoints import write_tiny_model
from core.protocol import Keys, ModelInfo, WorkerStatus
from core.settings import Settings
from model_store.classifier import Classifier
from tests.conftest import HANG_GUARD_S, REPO, Service, start_service, start_worker

README = (REPO / "README.md").read_text()
TEXTS = ["a good movie", "bad", "", "ünïcödé ✓"]


@pytest.fixture(scope="module")
def service(redis_url: str, tiny_model_dir: Path) -> Iterator[Service]:
    service = start_service(redis_url, tiny_model_dir, "hf", SENTIMENT_REQUEST_TIMEOUT_S="120")
    yield service
    assert service.stop() == [0, 0]


def predicted(url: str, texts: list[str]) -> list[list[dict]]:
    return httpx.post(f"{url}/predict", json={"text": texts}, timeout=60).json()["predictions"]


def test_inference_client_classifies_as_predict_ranked(service: Service) -> None:
    client = InferenceClient(service.url)
    for text, want in zip(TEXTS, predicted(service.url, TEXTS), strict=True):
        answer = client.text_classification(text)
        ranked = sorted(want, key=lambda s: -s["score"])
        assert [(a.label, a.score) for a in answer] == [(s["label"], pytest.approx(s["score"])) for s in ranked]
        [top] = client.text_classification(text, top_k=1)
        assert top.label == ranked[0]["label"]
    # The model's own function by name is the model's scores (SST-2's: softmax), the others its logits'.
    [softmax] = client.text_classification(TEXTS[0], top_k=1, function_to_apply="softmax")
    assert softmax.score == pytest.approx(max(s["score"] for s in predicted(service.url, TEXTS[:1])[0]))
    raw = {a.label: a.score for a in client.text_classification(TEXTS[0], function_to_apply="none")}
    sigmoid = {a.label: a.score for a in client.text_classification(TEXTS[0], function_to_apply="sigmoid")}
    assert sigmoid == pytest.approx({label: 1 / (1 + math.exp(-logit)) for label, logit in raw.items()}, abs=1e-6)


def test_the_readmes_inference_client_snippet_classifies_through_the_service(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    snippet = README.split("Hugging Face's client")[1].split("```python\n")[1].split("```")[0]
    exec(snippet.replace("http://localhost:8000", service.url), {})
    every, top = capsys.readouterr().out.strip().splitlines()
    assert every.count("TextClassificationOutputElement(") == 2 and top.count("TextClassificationOutputElement(") == 1


# In process, on fakeredis, with a worker thread.


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client(settings: Settings, fake_server: fakeredis.FakeServer) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, redis=fakeredis.FakeAsyncRedis(server=fake_server), jobs_redis=fakeredis.FakeRedis())
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            yield client


@pytest.mark.anyio
async def test_function_to_apply_is_the_pipelines_on_the_models_logits_cached_apart(
    client: httpx.AsyncClient, worker: Worker, classifier: Classifier
) -> None:
    start_worker(worker)
    logits = classifier.engine.forward(classifier.tokenize(TEXTS))
    predict = await client.post("/predict", json={"text": TEXTS})
    assert predict.headers["x-cache"] == "miss"
    for function, want in (
        ("softmax", classifier.scores(logits)),  # the model's own: /predict's cache
        ("sigmoid", 1 / (1 + np.exp(-logits))),
        ("none", logits),
    ):
        first = await client.post("/", json={"inputs": TEXTS, "parameters": {"function_to_apply": function}})
        again = await client.post("/", json={"inputs": TEXTS, "parameters": {"function_to_apply": function}})
        assert (first.headers["x-cache"], again.headers["x-cache"]) == (
            "hit" if function == "softmax" else "miss",
            "hit",
        )
        assert first.json() == again.json()
        for answer, row in zip(first.json(), want.tolist(), strict=True):
            assert {s["label"]: s["score"] for s in answer} == pytest.approx(
                dict(zip(classifier.labels, row, strict=True)), abs=1e-5
            )
            assert [s["score"] for s in answer] == sorted((s["score"] for s in answer), reverse=True)
    assert worker.lanes.computed == 3 * len(TEXTS)  # for the model's own function, and for each other once
    for count in (1, 1.0):  # (JSON Schema's integer: 1.0 is one, "1" and true are not)
        one = await client.post("/", json={"inputs": "a good movie", "parameters": {"top_k": count}})
        assert len(one.json()) == 1 and len(one.json()[0]) == 1


@pytest.mark.anyio
async def test_a_function_asked_for_by_name_is_applied_by_a_worker_of_another_model(
    client: httpx.AsyncClient, settings: Settings, fake_server: fakeredis.FakeServer, tmp_path: Path
) -> None:
    # A rolling upgrade from a multi-label checkpoint (its own function sigmoid) to a single-label one
    # (softmax): the new model is announced, its worker busy (a live heartbeat, nothing taken), and
    # the old one takes the work. A request naming softmax is answered softmax's probabilities; it got
    # the old model's own sigmoid scores (NEGATIVE 0.5023 + POSITIVE 0.4969), asked for as the new one's own.
    old = Classifier(write_tiny_model(tmp_path, problem_type="multi_label_classification"), "cpu", 1)
    redis, keys = fakeredis.FakeRedis(server=fake_server), Keys(settings.key_prefix)
    worker = Worker(settings, redis, old)
    thread = start_worker(worker)
    try:
        new = WorkerStatus(id="new", host="h", pid=1, model_version="new", started_at=0.0)
        redis.sadd(keys.workers, new.id)
        redis.set(keys.heartbeat(new.id), new.encode(), px=int(HANG_GUARD_S * 1000))
        redis.set(keys.model, ModelInfo(old.name, "new", old.labels, "cpu", "float32", "softmax").encode())
        answer = await client.post("/", json={"inputs": "a good movie", "parameters": {"function_to_apply": "softmax"}})
    finally:
        worker.stop()
        thread.join(10)
    logits = old.engine.forward(old.tokenize(["a good movie"]))[0]
    softmax = np.exp(logits) / np.exp(logits).sum()
    assert {s["label"]: s["score"] for s in answer.json()[0]} == pytest.approx(
        dict(zip(old.labels, softmax.tolist(), strict=True)), abs=1e-5
    )


@pytest.mark.anyio
async def test_bad_parameters_are_a_422(client: httpx.AsyncClient) -> None:
    for body in (
        {"inputs": "x", "parameters": {"top_k": 0}},
        *({"inputs": "x", "parameters": {"top_k": count}} for count in ("1", True, 1.5)),  # (`true` is no 1)
        {"inputs": "x", "parameters": {"function_to_apply": "tanh"}},
        {"inputs": "x", "parameters": {"temperature": 1}},
        {"inputs": []},
        {"inputs": ["x"] * 65},  # over SENTIMENT_MAX_TEXTS
        {"inputs": "x" * 2001},  # over SENTIMENT_MAX_CHARS
        {"text": ["x"]},
    ):
        response = await client.post("/", json=body)
        assert response.status_code == 422, (body, response.text)


@pytest.mark.anyio
async def test_a_compressed_body_is_a_415_not_malformed_json(client: httpx.AsyncClient) -> None:
    response = await client.post("/", content=gzip.compress(b'{"inputs": "x"}'), headers={"content-encoding": "gzip"})
    assert response.status_code == 415, response.text
    assert response.json()["error_type"] == "unsupported_media_type"
    assert response.json()["error"].startswith("the body must not be compressed")


@pytest.mark.anyio
async def test_a_bad_text_is_named_where_it_is_in_a_text_or_a_list(client: httpx.AsyncClient) -> None:
    """`inputs` is a text or a list of texts: the 422's line names what is wrong with the one sent,
    not what the other form would have needed (a list's long text is no "valid string" error)."""
    for inputs, error in (
        ("x" * 2001, "body.inputs.text: String should have at most 2000 characters"),
        (["ok", "x" * 2001], "body.inputs.texts.1: String should have at most 2000 characters"),
        (["ok", 5], "body.inputs.texts.1: Input should be a valid string"),
        ([], "body.inputs.texts: List should have at least 1 item after validation, not 0"),
        (5, "body.inputs: Input should be a text, or a list of texts"),
    ):
        response = await client.post("/", json={"inputs": inputs})
        assert (response.status_code, response.json()["error"]) == (422, error), error
