"""Bulk jobs end to end: a real redis-server, `sentiment api` and `sentiment jobs-worker` processes.

Includes the crash cases: a jobs worker SIGKILLed mid-job, or one that loses Redis mid-job, leaves
the job to RQ's abandoned-job handling, which retries it; it ends finished, never stuck in "started".
The Redis here keeps an append-only file, as deployed, so what it held survives a restart.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from rq.job import Job

from api.job_store import ENDED, JobStore
from benchmarks.checkpoints import write_tiny_model
from core.job_spec import BATCHES_PER_PART, SERIALIZER
from core.protocol import Keys, Prediction, WorkerStatus, prediction
from core.settings import Settings
from model_store.classifier import Classifier
from sentiment.embedded import free_port
from tests.conftest import SCORE_ABS, RedisServer, evicting_cache, wait_for

pytestmark = pytest.mark.slow  # (every test here runs the service's processes on a real Redis)

TEXTS = [f"text {i} is {'good' if i % 3 else 'bad'} or {'fun' if i % 7 else 'boring'}" for i in range(2000)]
WAIT_S = 180.0  # a hang guard, not a timing assert: a busy box is slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> list[Prediction]:
    classifier = Classifier(model_dir, "cpu", 1)
    pairs = (classifier.forward(classifier.tokenize(TEXTS[i : i + 2])) for i in range(0, len(TEXTS), 2))
    return [prediction(classifier.labels, p) for scores in pairs for p in scores]


class Stack:
    """An API, a model worker and jobs workers, as processes, on a redis-server of their own with an append-only file."""

    def __init__(self, model_dir: Path, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.server = RedisServer(tmp_path)
        self.redis = redis.Redis(port=self.server.port)
        self.env = {
            **os.environ,
            "SENTIMENT_REDIS_URL": self.server.url,
            "SENTIMENT_MODEL_DIR": str(model_dir),
            "SENTIMENT_MAX_BATCH_SIZE": "2",
            "SENTIMENT_JOBS_MAX_TEXTS": "2000",
            "SENTIMENT_HEARTBEAT_TTL_S": "2",
            "SENTIMENT_JOBS_METRICS_PORT": "0",  # tests run side by side: no fixed port
        }
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[int, Path] = {}
        self.api_port = free_port()
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=10)

    def start(self) -> None:
        """Redis, the API and the model worker that computes the jobs' texts (jobs workers are each test's own)."""
        self.server.start()
        self._start("api", "--port", str(self.api_port))
        self.start_model_worker()

        wait_for("the API and a model worker", lambda: self.live_workers() >= 1, WAIT_S)

    def live_workers(self) -> int:
        """The model workers the API sees live (0 while it does not answer)."""
        try:
            return int(self.client.get("/ready").json().get("workers", 0))
        except httpx.TransportError:
            return 0

    def start_worker(self, *args: str) -> subprocess.Popen:
        return self._start("jobs-worker", *args)

    def start_model_worker(self) -> subprocess.Popen:
        return self._start("worker")

    def output(self, proc: subprocess.Popen) -> str:
        return self.logs[proc.pid].read_text(errors="replace")

    def _start(self, *command: str) -> subprocess.Popen:
        log = self.tmp_path / f"{command[0]}-{len(self.procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sentiment.cli", *command], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    def stop(self) -> None:
        self.client.close()
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.server.stop()


@pytest.fixture
def stack(model_dir: Path, tmp_path: Path) -> Iterator[Stack]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    stack = Stack(model_dir, tmp_path)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def assert_predictions(got: list[Prediction], want: list[Prediction]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert [s["label"] for s in g] == [s["label"] for s in w]
        assert [s["score"] for s in g] == pytest.approx([s["score"] for s in w], abs=SCORE_ABS)


def test_a_2000_text_job_finishes_with_correct_predictions(stack: Stack, expected: list[Prediction]) -> None:
    client = stack.client
    stack.start_worker()
    job_id = client.post("/jobs", json={"text": TEXTS}).json()["job_id"]
    view = wait_for(
        "the job", lambda: (v := client.get(f"/jobs/{job_id}").json())["status"] == "finished" and v, WAIT_S
    )
    assert view["progress"] == {"done": 2000, "total": 2000}
    assert_predictions(view["predictions"], expected)


def test_a_job_whose_worker_is_killed_is_retried_and_finishes(stack: Stack, expected: list[Prediction]) -> None:
    client = stack.client
    doomed = stack.start_worker()
    job_id = client.post("/jobs", json={"text": TEXTS}).json()["job_id"]
    wait_for("the job to start", lambda: client.get(f"/jobs/{job_id}").json()["status"] == "started", WAIT_S)
    doomed.send_signal(signal.SIGSTOP)  # frozen mid-job: it can neither finish nor clean up
    view = client.get(f"/jobs/{job_id}").json()
    assert view["status"] == "started" and view["progress"]["done"] < 2000
    doomed.kill()
    doomed.wait()

    stack.start_worker()

    view = wait_for("the job to end", lambda: ended(client, job_id), WAIT_S)
    assert view["status"] == "finished", view.get("error")
    assert_predictions(view["predictions"], expected)
    job = Job.fetch(job_id, connection=stack.redis, serializer=SERIALIZER)
    assert job.retries_left == 1  # RQ's abandoned-job handling retried it once


def test_a_model_worker_killed_mid_job_has_its_bulk_work_reclaimed_and_the_job_finishes_unretried(
    stack: Stack, expected: list[Prediction]
) -> None:
    client = stack.client
    stack.start_model_worker()  # the one left
    wait_for("both model workers", lambda: stack.live_workers() == 2, WAIT_S)
    jobs_worker = stack.start_worker()
    job_id = client.post("/jobs", json={"text": TEXTS}).json()["job_id"]
    keys = Keys(Settings().key_prefix)

    def holding_bulk() -> int | None:
        for worker_id in stack.redis.smembers(keys.workers):
            if stack.redis.llen(keys.bulk_processing(worker_id.decode())):
                return WorkerStatus.decode(stack.redis.get(keys.heartbeat(worker_id.decode())) or b"{}").pid
        return None

    os.kill(wait_for("a model worker to hold bulk work", holding_bulk, WAIT_S), signal.SIGKILL)
    view = wait_for("the job to end", lambda: ended(client, job_id), WAIT_S)
    assert view["status"] == "finished", view.get("error")
    assert_predictions(view["predictions"], expected)
    assert Job.fetch(job_id, connection=stack.redis, serializer=SERIALIZER).retries_left == 2  # never retried
    assert "queued again" not in stack.output(jobs_worker)  # the dead worker's items came back, reclaimed


def test_a_jobs_worker_stopped_mid_job_takes_its_queued_bulk_work_back_and_the_job_waits_for_the_next(
    stack: Stack, expected: list[Prediction]
) -> None:
    client = stack.client
    (model_worker,) = [p for p in stack.procs if p.args[-1] == "worker"]
    model_worker.send_signal(signal.SIGSTOP)  # frozen: nothing takes the job's parts off the bulk list
    jobs_worker = stack.start_worker()
    job_id = client.post("/jobs", json={"text": TEXTS}).json()["job_id"]
    keys = Keys(Settings().key_prefix)
    wait_for("two parts queued", lambda: stack.redis.llen(keys.bulk) >= 2 * BATCHES_PER_PART, WAIT_S)
    jobs_worker.terminate()
    assert jobs_worker.wait(WAIT_S) == 0
    assert stack.redis.llen(keys.bulk) == 0  # taken back: no worker computes them for nobody
    assert client.get(f"/jobs/{job_id}").json()["status"] == "queued"  # back at the front of its queue
    model_worker.send_signal(signal.SIGCONT)
    stack.start_worker()
    view = wait_for("the job to end", lambda: ended(client, job_id), WAIT_S)
    assert view["status"] == "finished", view.get("error")
    assert_predictions(view["predictions"], expected)


def test_a_redis_outage_mid_job_keeps_the_worker_and_the_job(stack: Stack, expected: list[Prediction]) -> None:
    client = stack.client
    worker = stack.start_worker()
    job_id = client.post("/jobs", json={"text": TEXTS}).json()["job_id"]
    wait_for("the job to start", lambda: client.get(f"/jobs/{job_id}").json()["status"] == "started", WAIT_S)
    worker.send_signal(signal.SIGSTOP)  # frozen mid-job, so that the outage certainly finds it running one
    view = client.get(f"/jobs/{job_id}").json()
    assert view["status"] == "started" and view["progress"]["done"] < len(TEXTS)
    stack.server.stop()
    worker.send_signal(signal.SIGCONT)

    def alive() -> None:
        assert worker.poll() is None, f"the jobs worker exited:\n{stack.output(worker)[-4000:]}"

    def noticed() -> bool:
        alive()
        return "jobs worker stopped unasked" in stack.output(worker)

    wait_for("the jobs worker to meet the outage", noticed, WAIT_S)
    stack.server.start()  # the same port; the append-only file brings back the job, still "started"

    def ended_and_alive() -> dict | None:
        alive()
        return ended(client, job_id)

    view = wait_for("the job to end", ended_and_alive, WAIT_S)
    assert view["status"] == "finished", view.get("error")
    assert_predictions(view["predictions"], expected)
    job = Job.fetch(job_id, connection=stack.redis, serializer=SERIALIZER)
    assert job.retries_left == 1  # lost with its worker's Redis: RQ's abandoned-job handling ran it again
    alive()  # the same process, never restarted


def test_delete_cancels_a_running_job_then_deletes_it_and_the_worker_carries_on(stack: Stack) -> None:
    client = stack.client
    worker = stack.start_worker()
    job_id = client.post("/jobs", json={"text": TEXTS}).json()["job_id"]
    wait_for("the job to start", lambda: client.get(f"/jobs/{job_id}").json()["status"] == "started", WAIT_S)
    worker.send_signal(signal.SIGSTOP)  # frozen mid-part: both DELETEs land before its next part boundary
    assert client.delete(f"/jobs/{job_id}").status_code == 204
    assert client.get(f"/jobs/{job_id}").json()["status"] == "canceled"
    assert client.delete(f"/jobs/{job_id}").status_code == 204
    assert client.get(f"/jobs/{job_id}").status_code == 404
    held = [key.decode().split(":")[:3] for key in stack.redis.keys(f"*{job_id}*")]
    assert held == [["rq", "execution", job_id]]  # deleted at once: only the worker's record of its run is left
    worker.send_signal(signal.SIGCONT)

    wait_for("the worker to let go of the job", lambda: not stack.redis.keys(f"*{job_id}*"))
    next_id = client.post("/jobs", json={"text": TEXTS[:10]}).json()["job_id"]
    view = wait_for("the next job to end", lambda: ended(client, next_id), WAIT_S)
    assert view["status"] == "finished"  # the same worker, which took the deletion in its stride
    assert worker.poll() is None and "Traceback" not in stack.output(worker), stack.output(worker)[-4000:]
    assert client.delete(f"/jobs/{next_id}").status_code == 204
    assert client.get(f"/jobs/{next_id}").status_code == 404
    assert stack.redis.keys(f"*{next_id}*") == []  # ended, then deleted: nothing of it is left


def test_memory_pressure_never_evicts_a_queued_job(redis_server: RedisServer) -> None:
    """Under volatile-lru (k8s/base/redis.yaml) Redis evicts only keys with a TTL: a queued job has none."""
    client = redis.Redis.from_url(redis_server.url)
    client.config_set("maxmemory-policy", "volatile-lru")
    client.config_set("maxmemory", client.info("memory")["used_memory"] + 8 * 2**20)
    store = JobStore(client, Settings(redis_url=redis_server.url))
    job_id = store.create(["still here"])
    evicting_cache(client)
    assert store.view(job_id)["status"] == "queued"
    assert store.queue.job_ids == [job_id]


def ended(client: httpx.Client, job_id: str) -> dict | None:
    """The job's view once it ended; None before, or while the API answers 503 (Redis just came back)."""
    response = client.get(f"/jobs/{job_id}")
    if response.status_code == 503:
        return None
    view = response.json()
    return view if view["status"] in ENDED else None
