"""Fairness end to end: real redis-server, `sentiment api` and `sentiment worker`, API keys on. Past
the queue limit the client holding the most work is refused while another still gets in, and every
accepted request is answered with its right prediction. (The order in which the worker serves
clients is `tests/test_plan.py`'s; the benchmark measures what it does to latency.)"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from core.protocol import Keys, WorkItem, prediction
from model_store.classifier import Classifier
from tests.conftest import HANG_GUARD_S, SCORE_ABS, Service, answers, wait_for

FLOOD_KEY, QUIET_KEY = "flood-client-key-0000000001", "quiet-client-key-0000000002"


def post(url: str, key: str, text: str) -> httpx.Response:
    return httpx.post(f"{url}/predict", json={"text": [text]}, headers={"X-API-Key": key}, timeout=HANG_GUARD_S)


def queued_texts(redis_url: str, prefix: str) -> list[str]:
    """The texts of the work items in the queue."""
    with redis.Redis.from_url(redis_url) as client:
        return [text for raw in client.lrange(Keys(prefix).queue, 0, -1) for text in WorkItem.decode(raw).texts]


def test_past_the_limit_the_flood_is_refused_a_quiet_client_gets_in_and_all_accepted_are_answered(
    redis_url: str, tiny_model_dir: Path
) -> None:
    service = Service(
        redis_url,
        tiny_model_dir,
        "fair",
        SENTIMENT_API_KEYS=f"{FLOOD_KEY},{QUIET_KEY}",
        SENTIMENT_MAX_QUEUE_DEPTH="4",
        SENTIMENT_REQUEST_TIMEOUT_S="60",
    )
    try:
        service.start("api", "--port", str(service.port))  # no worker yet: the queue only grows
        wait_for("the API", lambda: answers(f"{service.url}/health"))
        with ThreadPoolExecutor(16) as pool:
            flood = [pool.submit(post, service.url, FLOOD_KEY, f"flood {i}") for i in range(8)]
            wait_for("half the flood refused", lambda: sum(f.done() for f in flood) == 4)
            refused = [f for f in flood if f.done()]
            quiet = pool.submit(post, service.url, QUIET_KEY, "a quiet one")
            queued = lambda: "a quiet one" in queued_texts(redis_url, "fair")  # noqa: E731
            wait_for("the quiet one answered or queued", lambda: quiet.done() or queued())
            assert queued() and not quiet.done()  # queued, though past the limit: no worker to answer it
            again = post(service.url, FLOOD_KEY, "flood again")  # the flood still holds the most
            service.start("worker")
            accepted = [f.result() for f in flood if f not in refused] + [quiet.result()]
        for response in [*(f.result() for f in refused), again]:
            assert (response.status_code, response.headers["retry-after"]) == (503, "1")
            assert response.json()["error_type"] == "overloaded"
        assert [r.status_code for r in accepted] == [200] * 5
        classifier = Classifier(tiny_model_dir, "cpu", 1)
        texts = [json.loads(r.request.content)["text"][0] for r in accepted]
        want = [prediction(classifier.labels, p) for p in classifier.forward(classifier.tokenize(texts))]
        for response, expected in zip(accepted, want, strict=True):
            [got] = response.json()["predictions"]
            assert [s["score"] for s in got] == pytest.approx([s["score"] for s in expected], abs=SCORE_ABS)
    finally:
        service.stop()
