"""Bulk jobs (/jobs) lifecycle on fakeredis, with the RQ jobs worker run in burst mode in-process."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import fakeredis
import pytest
from fastapi.testclient import TestClient
from rq.job import Job, JobStatus

from api.app import create_app
from api.errors import ErrorType, ServiceError
from batcher.inference import Inference
from batcher.plan import Policy
from batcher.job_spec import SERIALIZER
from batcher.jobs import serve_jobs
from batcher.protocol import Keys, Prediction
from batcher.worker import Worker
from model_store.classifier import Classifier
from model_store.factory import write_tiny_model
from sentiment.settings import Settings

TEXTS = ["i love this movie", "awful film", "i love this movie", "not very good", "fun", "boring", "great", "bad",
         "i hate it", "this is a very very long text that is not boring at all"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    return Classifier(write_tiny_model(tmp_path_factory.mktemp("model")), "cpu", 1)


class SpyInference(Inference):
    """The real inference, with a hook run before each chunk (to look at or poke the running job)."""

    before_chunk: Callable[[list[str]], None] = staticmethod(lambda texts: None)

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        self.before_chunk(list(texts))
        return super().predict(texts)


class Service:
    """API + /predict worker thread on one fakeredis server; jobs run by `run_jobs` (burst)."""

    def __init__(self, classifier: Classifier, settings: Settings) -> None:
        server = fakeredis.FakeServer()
        self.redis = fakeredis.FakeRedis(server=server)
        self.settings = settings
        # The jobs side caches under its own prefix, so its predictions are computed, not read from /predict's.
        policy = Policy.of(settings, classifier.cost, lanes=1)
        self.inference = SpyInference(classifier, self.redis, Keys("jobs-side"), policy, settings.cache_ttl_s)
        self.app = create_app(settings, redis=fakeredis.FakeAsyncRedis(server=server), jobs_redis=self.redis)
        self.worker = Worker(settings, fakeredis.FakeRedis(server=server), classifier)

    def run_jobs(self) -> None:
        serve_jobs(self.settings, self.inference, self.redis, burst=True)

    def job(self, job_id: str) -> Job:
        return Job.fetch(job_id, connection=self.redis, serializer=SERIALIZER)


@pytest.fixture
def service(classifier: Classifier) -> Iterator[tuple[Service, TestClient]]:
    settings = Settings(
        redis_url="redis://unused:1/0", max_batch_size=2, max_texts=64, jobs_max_texts=20, max_chars=100, job_ttl_s=600,
        heartbeat_ttl_s=5,
    )
    svc = Service(classifier, settings)
    thread = threading.Thread(target=svc.worker.run, daemon=True)
    thread.start()
    with TestClient(svc.app) as client:
        yield svc, client
    svc.worker.stop()
    thread.join(10)


def submit(client: TestClient, texts: list[str]) -> str:
    response = client.post("/jobs", json={"text": texts})
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def test_job_runs_to_the_same_predictions_as_predict(service: tuple[Service, TestClient]) -> None:
    svc, client = service
    response = client.post("/jobs", json={"text": TEXTS})
    assert response.status_code == 202
    body = response.json()
    assert body == {"job_id": body["job_id"], "status": "queued", "status_url": f"/jobs/{body['job_id']}"}
    assert response.headers["location"] == body["status_url"]
    assert len(body["job_id"]) == 32
    queued = client.get(body["status_url"]).json()
    assert queued["status"] == "queued" and queued["progress"] == {"done": 0, "total": len(TEXTS)}
    assert queued["started_at"] is None and queued["ended_at"] is None and "predictions" not in queued

    svc.run_jobs()

    done = client.get(body["status_url"]).json()
    assert done["status"] == "finished"
    assert done["progress"] == {"done": len(TEXTS), "total": len(TEXTS)}
    assert done["created_at"] <= done["started_at"] <= done["ended_at"]
    expected = client.post("/predict", json={"text": TEXTS}).json()["predictions"]
    assert len(done["predictions"]) == len(TEXTS)
    for got, want in zip(done["predictions"], expected, strict=True):
        assert [s["label"] for s in got] == [s["label"] for s in want]
        assert [s["score"] for s in got] == pytest.approx([s["score"] for s in want], abs=1e-5)


def test_a_job_reads_the_cache_instead_of_recomputing(service: tuple[Service, TestClient]) -> None:
    svc, client = service
    first = submit(client, TEXTS)
    svc.run_jobs()
    computed = svc.inference.computed
    assert computed == len(set(TEXTS))
    second = submit(client, list(reversed(TEXTS)))
    svc.run_jobs()
    assert svc.inference.computed == computed  # all from the cache (as a retried job's first chunks are)
    assert client.get(f"/jobs/{second}").json()["predictions"] == client.get(f"/jobs/{first}").json()["predictions"][::-1]


def test_a_deployment_under_another_key_prefix_never_runs_this_ones_jobs(service: tuple[Service, TestClient]) -> None:
    svc, client = service
    job_id = submit(client, TEXTS)
    neighbour = Settings(redis_url=svc.settings.redis_url, key_prefix="neighbour")  # its own model, maybe
    assert (svc.settings.jobs_queue, neighbour.jobs_queue) == ("sentiment-jobs", "neighbour-jobs")
    serve_jobs(neighbour, svc.inference, svc.redis, burst=True)
    assert client.get(f"/jobs/{job_id}").json()["status"] == "queued" and svc.inference.computed == 0
    svc.run_jobs()
    assert client.get(f"/jobs/{job_id}").json()["status"] == "finished"


def test_progress_moves_chunk_by_chunk(service: tuple[Service, TestClient]) -> None:
    svc, client = service
    job_id = submit(client, TEXTS)
    seen: list[tuple[str, int]] = []

    def look(_: list[str]) -> None:
        view = client.get(f"/jobs/{job_id}").json()
        seen.append((view["status"], view["progress"]["done"]))

    svc.inference.before_chunk = look
    svc.run_jobs()
    chunk = svc.settings.max_batch_size * 4  # CHUNKS_PER_BATCH
    assert seen == [("started", 0), ("started", chunk)]
    assert client.get(f"/jobs/{job_id}").json()["progress"] == {"done": len(TEXTS), "total": len(TEXTS)}


def test_cancel_a_queued_job(service: tuple[Service, TestClient]) -> None:
    svc, client = service
    job_id = submit(client, TEXTS)
    response = client.delete(f"/jobs/{job_id}")
    assert response.status_code == 200
    assert response.json()["status"] == "canceled" and response.json()["ended_at"] is not None
    svc.run_jobs()
    assert svc.inference.computed == 0
    view = client.get(f"/jobs/{job_id}").json()
    assert view["status"] == "canceled" and "predictions" not in view
    assert client.delete(f"/jobs/{job_id}").json()["status"] == "canceled"  # again: same answer
    assert 0 < svc.redis.ttl(svc.job(job_id).key) <= svc.settings.job_ttl_s  # expires like any job


def test_cancel_a_started_job_stops_it_at_the_next_chunk(service: tuple[Service, TestClient]) -> None:
    svc, client = service
    job_id = submit(client, TEXTS * 2)  # three chunks
    answers: list[dict] = []

    def cancel_during_second_chunk(_: list[str]) -> None:
        if client.get(f"/jobs/{job_id}").json()["progress"]["done"] > 0 and not answers:
            answers.append(client.delete(f"/jobs/{job_id}").json())

    svc.inference.before_chunk = cancel_during_second_chunk
    svc.run_jobs()  # returns: the job stopped, and was neither retried nor failed
    assert answers[0]["status"] == "canceled"
    chunk = svc.settings.max_batch_size * 4
    view = client.get(f"/jobs/{job_id}").json()
    assert view["status"] == "canceled"
    assert view["progress"] == {"done": 2 * chunk, "total": 2 * len(TEXTS)}  # the chunk in hand finished, no more
    assert "predictions" not in view and "error" not in view
    queue = svc.app.state.jobs.queue
    assert job_id not in queue.failed_job_registry and job_id not in queue.started_job_registry
    assert queue.count == 0


def test_a_finished_job_cannot_be_canceled(service: tuple[Service, TestClient]) -> None:
    svc, client = service
    job_id = submit(client, TEXTS[:2])
    svc.run_jobs()
    response = client.delete(f"/jobs/{job_id}")
    assert response.status_code == 409
    assert response.json()["error_type"] == "conflict"
    assert client.get(f"/jobs/{job_id}").json()["status"] == "finished"


def test_a_job_that_finishes_while_being_canceled_stays_finished(
    service: tuple[Service, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, client = service
    job_id = submit(client, TEXTS[:2])
    read = Job.get_status
    seen: list[JobStatus] = []

    def finish_right_after_the_read(job: Job, refresh: bool = True) -> JobStatus:
        status = read(job, refresh)
        if not seen:  # the cancel's first look: the job finishes before the cancel acts on it
            seen.append(status)
            svc.run_jobs()
        return status

    monkeypatch.setattr(Job, "get_status", finish_right_after_the_read)
    with pytest.raises(ServiceError) as refused:
        svc.app.state.jobs.cancel(job_id)  # as DELETE does, here on this thread: the jobs worker needs it
    monkeypatch.undo()
    assert seen == [JobStatus.QUEUED]
    assert refused.value.error_type == ErrorType.CONFLICT
    view = client.get(f"/jobs/{job_id}").json()
    assert view["status"] == "finished" and len(view["predictions"]) == 2
    assert job_id in svc.app.state.jobs.queue.finished_job_registry


def test_a_job_has_no_expiry_until_it_ends(service: tuple[Service, TestClient]) -> None:
    """Redis evicts keys with a TTL under memory pressure (volatile-lru): a queued job must have none."""
    svc, client = service
    job_id = submit(client, TEXTS)
    keys = svc.redis.keys(f"*{job_id}*")
    assert svc.job(job_id).key.encode() in keys
    assert {key: svc.redis.ttl(key) for key in keys} == {key: -1 for key in keys}  # -1: no expiry
    svc.run_jobs()
    assert 0 < svc.redis.ttl(svc.job(job_id).key) <= svc.settings.job_ttl_s  # ended: kept job_ttl_s, then gone


def test_a_failing_job_is_retried_then_failed_with_a_one_line_error(service: tuple[Service, TestClient]) -> None:
    svc, client = service
    job_id = submit(client, TEXTS)
    runs: list[int] = []

    def explode(_: list[str]) -> None:
        runs.append(1)
        raise RuntimeError("model exploded")

    svc.inference.before_chunk = explode
    svc.run_jobs()
    assert len(runs) == 3  # the first run and two retries
    view = client.get(f"/jobs/{job_id}").json()
    assert view["status"] == "failed"
    assert view["error"] == "RuntimeError: model exploded"
    assert "predictions" not in view


def test_unknown_and_expired_jobs_are_404(service: tuple[Service, TestClient]) -> None:
    svc, client = service
    for path in ("/jobs/" + "0" * 32, "/jobs/not-an-id"):
        for method in ("GET", "DELETE"):
            response = client.request(method, path)
            assert response.status_code == 404
            assert response.json()["error_type"] == "not_found"
    job_id = submit(client, TEXTS[:3])
    svc.run_jobs()
    job = svc.job(job_id)
    result_keys = svc.redis.keys(f"*{job_id}*")
    for key in result_keys:  # the job and its result live job_ttl_s, then go
        assert 0 < svc.redis.ttl(key) <= svc.settings.job_ttl_s, key
    assert job.key.encode() in result_keys
    for key in result_keys:
        svc.redis.expire(key, 0)  # what job_ttl_s seconds do
    assert client.get(f"/jobs/{job_id}").status_code == 404


@pytest.mark.parametrize(
    "body",
    [{"text": ["x"] * 21}, {"text": ["x" * 101]}, {"text": []}, {"text": "x"}, {"text": ["x"], "extra": 1}, {}],
    ids=["too-many", "too-long", "empty", "not-a-list", "extra-field", "missing"],
)
def test_limits_are_422(service: tuple[Service, TestClient], body: dict) -> None:
    _, client = service
    assert client.post("/jobs", json=body).status_code == 422


def test_openapi_describes_every_response(service: tuple[Service, TestClient]) -> None:
    _, client = service
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/jobs"]["post"]["responses"]) == {"202", "413", "422", "503"}
    assert set(paths["/jobs/{job_id}"]["get"]["responses"]) == {"200", "404", "422", "503"}
    assert set(paths["/jobs/{job_id}"]["delete"]["responses"]) == {"200", "404", "409", "422", "503"}
    for operation in (paths["/jobs"]["post"], *paths["/jobs/{job_id}"].values()):
        for response in operation["responses"].values():
            assert "schema" in response["content"]["application/json"]


def test_the_api_still_imports_no_torch() -> None:
    code = "import sys, api.app; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; sys.exit(str(bad) if bad else 0)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
