"""End to end: a real redis-server, `sentiment api` and `sentiment worker` as separate processes.

With the tiny model: concurrent requests, batching across requests, the cache. With the small real
checkpoint from ../shared: labels, scores against plain transformers, SST-2 dev accuracy over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from api.admission import MAX_AGE_S
from core.liveness import live_workers
from core.protocol import Keys, WorkItem, prediction
from model_store.classifier import Classifier
from sentiment.embedded import free_port
from tests.conftest import HANG_GUARD_S, SCORE_ABS, RedisServer, Service, shared_path, start_service, wait_for

pytestmark = pytest.mark.slow  # (every test here runs the service's processes on a real Redis)


@pytest.fixture(scope="module")
def tiny_service(redis_url: str, tiny_model_dir: Path) -> Iterator[Service]:
    service = start_service(
        redis_url, tiny_model_dir, "e2e-tiny", SENTIMENT_MAX_WAIT_MS="50", SENTIMENT_REQUEST_TIMEOUT_S="120"
    )
    yield service
    assert service.stop() == [0, 0]  # both exit cleanly on SIGTERM


@pytest.fixture(scope="module")
def small_service(redis_url: str, small_model_dir: Path) -> Iterator[Service]:
    service = start_service(
        # All of SST-2 dev at once queues ~10 s of work on 2 cores: a long deadline, this test is not about 504s.
        # fp32 (not `auto`, bf16 on some CPUs) so scores can equal a plain transformers forward;
        # tests/test_precision.py holds bf16 to its accuracy rule.
        redis_url,
        small_model_dir,
        "e2e-small",
        SENTIMENT_MAX_BATCH_SIZE="64",
        SENTIMENT_REQUEST_TIMEOUT_S="120",
        SENTIMENT_PRECISION="fp32",
    )
    yield service
    service.stop()


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=180) as client:
        return await asyncio.gather(*(client.post("/predict", json=body) for body in bodies))


def test_concurrent_requests_are_answered_correctly_in_shared_batches(
    tiny_service: Service, classifier: Classifier, redis_url: str
) -> None:
    bodies = [{"text": [f"movie {i} was good", "the same for all", f"{i} bad"]} for i in range(60)]
    responses = asyncio.run(post_all(tiny_service.url, bodies))
    for body, response in zip(bodies, responses, strict=True):
        assert response.status_code == 200
        want = [prediction(classifier.labels, p) for p in classifier.forward(classifier.tokenize(body["text"]))]
        for got, expected in zip(response.json()["predictions"], want, strict=True):
            assert [s["label"] for s in got] == [s["label"] for s in expected]
            assert [s["score"] for s in got] == pytest.approx([s["score"] for s in expected], abs=SCORE_ABS)
    [worker] = live_workers(redis.Redis.from_url(redis_url), "e2e-tiny")
    assert worker.requests == 60
    assert worker.largest_batch_requests > 1  # requests shared model batches
    assert worker.batches < 60

    again = httpx.post(f"{tiny_service.url}/predict", json=bodies[0])
    assert again.headers["x-cache"] == "hit"
    assert again.json() == responses[0].json()


@pytest.mark.parametrize("path", ["/health", "/ready", "/model", "/v2", "/docs", "/openapi.json", "/metrics"])
def test_head_is_get_without_the_body_wherever_get_is_answered(tiny_service: Service, path: str) -> None:
    """HTTP's HEAD is GET without the body (RFC 9110 9.3.2; every general-purpose server takes both):
    uptime monitors and `curl -I` probe with it, and a 405 reads as the service being down."""
    got = httpx.get(f"{tiny_service.url}{path}")
    head = httpx.head(f"{tiny_service.url}{path}")
    assert (head.status_code, head.headers["content-type"]) == (got.status_code, got.headers["content-type"])
    assert head.content == b"" and int(head.headers["content-length"]) > 0


def test_love_and_hate_through_the_service(small_service: Service) -> None:
    response = httpx.post(f"{small_service.url}/predict", json={"text": ["I love you.", "I hate you."]})
    love, hate = response.json()["predictions"]
    assert [s["label"] for s in love] == ["NEGATIVE", "POSITIVE"]
    assert love[1]["score"] > 0.9
    assert hate[0]["score"] > hate[1]["score"]


def sst2_dev() -> list[tuple[str, int]]:
    with shared_path("data/sst2-dev.tsv").open(newline="") as f:
        return [(row["text"], int(row["label"])) for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def test_sst2_dev_through_http_equals_plain_transformers(small_service: Service, small_model_dir: Path) -> None:
    dev = sst2_dev()
    assert len(dev) == 872
    texts = [t for t, _ in dev]
    chunks = [texts[i : i + 16] for i in range(0, len(texts), 16)]
    responses = asyncio.run(post_all(small_service.url, [{"text": c} for c in chunks]))
    served = [[s["score"] for s in p] for r in responses for p in r.json()["predictions"]]

    tokenizer = AutoTokenizer.from_pretrained(small_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(small_model_dir).eval()
    offline: list[list[float]] = []
    with torch.inference_mode():
        for chunk in chunks:
            batch = tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
            offline += model(**batch).logits.softmax(-1).tolist()

    for got, want in zip(served, offline, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    accuracy = sum((s[1] > s[0]) == bool(label) for s, (_, label) in zip(served, dev, strict=True)) / len(dev)
    offline_accuracy = sum((o[1] > o[0]) == bool(label) for o, (_, label) in zip(offline, dev, strict=True)) / len(dev)
    assert accuracy == offline_accuracy
    assert accuracy > 0.85  # a trained model, not noise


def free_port_block(count: int) -> int:
    """The first of `count` consecutive free ports, below Linux's ephemeral range (32768-): ports
    after one the kernel handed out may be taken by any outgoing connection, the service's own
    included, between this pick and the service's bind."""
    for base in random.sample(range(20000, 32000, count), 100):
        with contextlib.suppress(OSError), contextlib.ExitStack() as held:
            for port in range(base, base + count):
                held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            return base
    raise RuntimeError(f"no {count} consecutive free ports in 20000-32000")


def test_serve_runs_everything_and_stops_cleanly_on_ctrl_c(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With `--workers 2`, two workers serve, each with half the cores' model threads (at least one)
    and metrics of its own (on the ports after SENTIMENT_METRICS_PORT, passing over the jobs worker's)."""
    port, metrics = free_port(), free_port_block(3)  # a worker, the jobs worker, the second worker
    env = {k: v for k, v in os.environ.items() if k not in ("SENTIMENT_REDIS_URL", "SENTIMENT_TORCH_THREADS")}
    env |= {
        "SENTIMENT_MODEL_DIR": str(tiny_model_dir),
        "SENTIMENT_LOG_LEVEL": "INFO",
        "SENTIMENT_METRICS_PORT": str(metrics),
        "SENTIMENT_JOBS_METRICS_PORT": str(metrics + 1),
    }
    log = tmp_path / "serve.log"
    with log.open("w") as stderr:
        command = [sys.executable, "-m", "sentiment.cli", "serve", "--port", str(port), "--workers", "2"]
        proc = subprocess.Popen(command, env=env, stderr=stderr)
    service = Service("unused", tiny_model_dir, "unused")
    service.port, service.url, service.procs = port, f"http://127.0.0.1:{port}", [proc]
    try:
        service.wait_ready()
        wait_for("both workers live", lambda: httpx.get(f"{service.url}/ready").json()["workers"] == 2)
        response = httpx.post(f"{service.url}/predict", json={"text": ["I love you.", "I hate you."]})
        assert response.status_code == 200
        assert len(response.json()["predictions"]) == 2
        for worker_metrics in (metrics, metrics + 2):
            assert "sentiment_batch_size_count" in httpx.get(f"http://127.0.0.1:{worker_metrics}/metrics").text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    assert "metrics not served" not in log.read_text()
    each = max(1, (os.cpu_count() or 1) // 2)
    loaded = [
        line for line in log.read_text().splitlines() if "model_store.classifier" in line and " threads, " in line
    ]
    # The two workers (the jobs worker loads no model).
    assert sum(f", {each} threads, " in line for line in loaded) >= 2, loaded


def test_the_model_worker_sets_the_openmp_wait_policy_before_torch_loads(tmp_path: Path) -> None:
    """torch's OpenMP runtime reads OMP_WAIT_POLICY once, at load: set later, the setting does nothing.

    libgomp prints what it read when asked to (`OMP_DISPLAY_ENV`); `passive` is a spin count of 0,
    the runtime's default 300000. The missing checkpoint stops the process right after torch loads.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    env |= {
        "OMP_DISPLAY_ENV": "VERBOSE",
        "SENTIMENT_OMP_WAIT_POLICY": "passive",
        "SENTIMENT_MODEL_DIR": str(tmp_path / "no-model"),
        "SENTIMENT_REDIS_URL": f"redis://127.0.0.1:{free_port()}",
    }
    run = subprocess.run(
        [sys.executable, "-m", "sentiment.cli", "worker"], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0 and "no Hugging Face checkpoint" in run.stderr, run.stderr[-2000:]
    assert "GOMP_SPINCOUNT = '0'" in run.stderr, run.stderr[-2000:]


def test_a_stopped_worker_leaves_its_start_up_heap_out_of_the_collections_at_exit(
    redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The interpreter's last collections walk every object it still tracks: with torch and the model
    loaded, over a second of CPU at the worker's lowered priority once its work is handed back, so a
    supervisor waiting for it may kill it. What start-up made must be frozen out of their reach by then.

    A hook registered first at start runs last at exit, after logging's and tracing's own."""
    counts = tmp_path / "at-exit"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import atexit, gc\n"
        "if b'sentiment.cli\\0worker\\0' in open('/proc/self/cmdline', 'rb').read():\n"
        f"    atexit.register(lambda: open({str(counts)!r}, 'w').write("
        "f'{len(gc.get_objects())} {gc.get_freeze_count()}'))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
        "SENTIMENT_REDIS_URL": redis_url,
        "SENTIMENT_MODEL_DIR": str(tiny_model_dir),
        "SENTIMENT_KEY_PREFIX": "e2e-exit",
        "SENTIMENT_METRICS_PORT": "0",
        "SENTIMENT_LOG_LEVEL": "INFO",
    }
    client = redis.Redis.from_url(redis_url)
    log = tmp_path / "worker.log"
    with log.open("w") as stderr:
        worker = subprocess.Popen([sys.executable, "-m", "sentiment.cli", "worker"], env=env, stderr=stderr)
    try:
        wait_for("the worker to serve", lambda: live_workers(client, "e2e-exit"))
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, log.read_text()[-2000:]
    assert log.read_text().splitlines()[-1].endswith("stopped; handed back 0 unfinished items")
    tracked, frozen = map(int, counts.read_text().split())
    assert tracked < frozen, (tracked, frozen)


def test_a_request_due_sooner_than_the_workers_can_answer_is_refused_at_once_by_its_own_deadline(
    redis_url: str, tiny_model_dir: Path
) -> None:
    # Real processes: the deadline a request asks for (X-Request-Timeout) is what admission judges it
    # by, from the throughput the worker publishes once it has timed a forward.
    prefix = "e2e-goodput"
    service = start_service(redis_url, tiny_model_dir, prefix, SENTIMENT_MAX_QUEUE_DEPTH="0")  # no depth limit
    client, keys = redis.Redis.from_url(redis_url), Keys(prefix)
    worker = service.procs[1]
    try:
        bad = httpx.post(f"{service.url}/predict", json={"text": ["x"]}, headers={"X-Request-Timeout": "0"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["header", "X-Request-Timeout"]
        timed = httpx.post(f"{service.url}/predict", json={"text": ["a timed forward"]}, timeout=60)
        assert timed.status_code == 200
        [status] = wait_for(
            "the worker's measured throughput", lambda: [s for s in live_workers(client, prefix) if s.texts_per_s]
        )
        assert status.texts_per_s is not None
        worker.send_signal(signal.SIGSTOP)  # its heartbeat stays fresh for a while; it takes nothing meanwhile
        backlog = int(2 * status.texts_per_s) + 1  # over two seconds of work, already past its own deadline
        gone = WorkItem("gone", ["x"], 0.0, 0.0, keys.reply_channel("nobody")).encode()
        client.lpush(keys.queue, *[gone] * backlog)  # (its blocked take may still move one: Redis serves it)
        depth = client.llen(keys.queue)
        time.sleep(MAX_AGE_S)  # the API's view of the load (read with the timed request's) is too old to go by now
        hurried = httpx.post(
            f"{service.url}/predict", json={"text": ["in a hurry"]}, headers={"X-Request-Timeout": "1"}, timeout=60
        )
        assert hurried.status_code == 503 and int(hurried.headers["Retry-After"]) >= 1
        assert client.llen(keys.queue) == depth  # refused without being queued
        worker.send_signal(signal.SIGCONT)  # it drops the expired backlog, and the next request gets in
        wait_for("the backlog to go", lambda: client.llen(keys.queue) == 0)
        later = wait_for(
            "an admitted request",
            lambda: (
                (r := httpx.post(f"{service.url}/predict", json={"text": ["later"]}, timeout=60)).status_code == 200
                and r
            ),
        )
        assert later.json()["predictions"]
    finally:
        worker.send_signal(signal.SIGCONT)
        service.stop()


def test_ctrl_c_again_while_the_api_drains_stops_it_now_without_a_traceback(
    redis_server: RedisServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Ctrl-C waits for requests in flight (here one no worker will answer, for up to its 120 s
    # deadline); Ctrl-C again is a person's "now": the API exits 0 at once, cutting that request,
    # its app closed as after a drain, and nothing logged as an error.
    port = free_port()
    env = {
        **os.environ,
        "SENTIMENT_REDIS_URL": redis_server.url,
        "SENTIMENT_MODEL_DIR": str(tiny_model_dir),
        "SENTIMENT_KEY_PREFIX": "again",
        "SENTIMENT_METRICS_PORT": "0",
        "SENTIMENT_GRPC_PORT": str(free_port()),
        "SENTIMENT_REQUEST_TIMEOUT_S": "120",
    }
    log = tmp_path / "api.log"
    with log.open("w") as stderr:
        api = subprocess.Popen(
            [sys.executable, "-m", "sentiment.cli", "api", "--port", str(port)], env=env, stderr=stderr
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for("the API", lambda: api.poll() is not None or "Application startup complete" in log.read_text())
        cut: list[BaseException] = []

        def predict() -> None:
            try:
                httpx.post(f"{url}/predict", json={"text": ["hi"]}, timeout=HANG_GUARD_S)
            except httpx.TransportError as exc:
                cut.append(exc)

        client = threading.Thread(target=predict)
        client.start()
        queued = redis.Redis.from_url(redis_server.url)
        wait_for("the request to be queued", lambda: queued.llen(Keys("again").queue))
        api.send_signal(signal.SIGINT)
        wait_for("the drain", lambda: "Waiting for connections to close" in log.read_text())
        api.send_signal(signal.SIGINT)
        assert api.wait(HANG_GUARD_S) == 0
        client.join(HANG_GUARD_S)
    finally:
        api.kill()
    said = log.read_text()
    assert "Traceback" not in said and " ERROR " not in said, said
    assert cut, "the request in flight was answered, not cut"
