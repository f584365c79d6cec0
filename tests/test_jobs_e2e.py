"""Bulk jobs end to end: a real redis-server, `sentiment api` and `sentiment jobs-worker` processes.

Includes the crash case: a jobs worker SIGKILLed mid-job leaves the job to RQ's abandoned-job
handling, which retries it on the next worker; it ends finished, never stuck in "started".
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import fakeredis
import httpx
import pytest
import redis
from rq.job import Job

from batcher.inference import Inference
from batcher.job_spec import SERIALIZER
from batcher.protocol import Keys, Prediction
from model_store.classifier import Classifier
from model_store.factory import write_tiny_model
from sentiment.embedded import free_port
from tests.conftest import wait_for

TEXTS = [f"text {i} is {'good' if i % 3 else 'bad'} or {'fun' if i % 7 else 'boring'}" for i in range(2000)]
WAIT_S = 180.0  # a hang guard, not a timing assert: the idle-priority jobs worker starves on a busy box


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> list[Prediction]:
    classifier = Classifier(model_dir, "cpu", 1)
    return Inference(classifier, fakeredis.FakeRedis(), Keys("expected"), 2, 8192, 60).predict(TEXTS)


@pytest.fixture
def stack(model_dir: Path, tmp_path: Path) -> Iterator[tuple[httpx.Client, Callable[[], subprocess.Popen], redis.Redis]]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not on PATH")
    port = free_port()
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = (tmp_path / f"{name}-{len(procs)}.log").open("wb")
        procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
        return procs[-1]

    env = {
        **os.environ, "SENTIMENT_REDIS_URL": f"redis://127.0.0.1:{port}/0", "SENTIMENT_MODEL_DIR": str(model_dir),
        "SENTIMENT_MAX_BATCH_SIZE": "2", "SENTIMENT_JOBS_MAX_TEXTS": "2000", "SENTIMENT_HEARTBEAT_TTL_S": "2",
    }
    start("redis", exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
    api_port = free_port()
    start("api", sys.executable, "-m", "sentiment.cli", "api", "--port", str(api_port))
    client = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10)

    def up() -> bool:
        try:
            return client.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    wait_for("the API", up, WAIT_S)
    try:
        yield client, lambda: start("jobs-worker", sys.executable, "-m", "sentiment.cli", "jobs-worker"), \
            redis.Redis(port=port)
    finally:
        client.close()
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def assert_predictions(got: list[Prediction], want: list[Prediction]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert [s["label"] for s in g] == [s["label"] for s in w]
        assert [s["score"] for s in g] == pytest.approx([s["score"] for s in w], abs=1e-5)


def test_a_2000_text_job_finishes_with_correct_predictions(stack, expected) -> None:  # type: ignore[no-untyped-def]
    client, start_worker, _ = stack
    start_worker()
    job_id = client.post("/jobs", json={"text": TEXTS}).json()["job_id"]
    view = wait_for(
        "the job", lambda: (v := client.get(f"/jobs/{job_id}").json())["status"] == "finished" and v, WAIT_S
    )
    assert view["progress"] == {"done": 2000, "total": 2000}
    assert_predictions(view["predictions"], expected)


def test_a_job_whose_worker_is_killed_is_retried_and_finishes(stack, expected) -> None:  # type: ignore[no-untyped-def]
    client, start_worker, rds = stack
    doomed = start_worker()
    job_id = client.post("/jobs", json={"text": TEXTS}).json()["job_id"]
    wait_for("the job to start", lambda: client.get(f"/jobs/{job_id}").json()["status"] == "started", WAIT_S)
    doomed.send_signal(signal.SIGSTOP)  # frozen mid-job: it can neither finish nor clean up
    view = client.get(f"/jobs/{job_id}").json()
    assert view["status"] == "started" and view["progress"]["done"] < 2000
    doomed.kill()
    doomed.wait()

    start_worker()

    def ended() -> dict | None:
        v = client.get(f"/jobs/{job_id}").json()
        return v if v["status"] in ("finished", "failed", "canceled") else None

    view = wait_for("the job to end", ended, WAIT_S)
    assert view["status"] == "finished", view.get("error")
    assert_predictions(view["predictions"], expected)
    job = Job.fetch(job_id, connection=rds, serializer=SERIALIZER)
    assert job.retries_left == 1  # RQ's abandoned-job handling retried it once
