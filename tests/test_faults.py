"""Faults with real processes (or, where a forward must be held, workers in this process) and a real
redis-server: the promises of docs/reliability.md.

The tiny model here has a tokenizer that knows a word its embedding table does not (`POISON`):
any text holding it fails inside the model, the poison-input test's reject. Heartbeats are short so
a dead worker's work is reclaimed quickly. Every wait is a generous hang guard, not a timing
assert, except the 5 s recovery that the Redis-outage promise states.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
import redis
import rq

from batcher.worker import Worker
from benchmarks.cache_writes import CacheWrites
from benchmarks.checkpoints import write_tiny_model
from core.liveness import live_workers, worker_client
from core.protocol import (
    Keys,
    ModelInfo,
    Result,
    WorkerStatus,
    WorkItem,
    new_id,
    parse_replies,
    prediction,
    text_digest,
)
from core.settings import Settings
from model_store.classifier import Classifier
from model_store.torch_engine import TorchEngine
from tests.conftest import HANG_GUARD_S, SCORE_ABS, RedisServer, Service, answers, hold_forwards, start_worker, wait_for

pytestmark = pytest.mark.faults

POISON = "nightshade"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"a key of 24 bytes or more").decode()
ENV = {
    "SENTIMENT_HEARTBEAT_TTL_S": "2",
    "SENTIMENT_REQUEST_TIMEOUT_S": "30",
    "SENTIMENT_MAX_WAIT_MS": "20",
    "SENTIMENT_TORCH_THREADS": "1",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return poisoned(write_tiny_model(tmp_path_factory.mktemp("poison-model")), POISON)


def poisoned(model_dir: Path, word: str) -> Path:
    """`model_dir` with `word` (lower case) in its tokenizer's vocabulary under the first token id past
    the model's embedding table: the tokenizer takes any text holding it, the model fails on it."""
    path = model_dir / "tokenizer.json"
    tokenizer = orjson.loads(path.read_bytes())
    vocab = tokenizer["model"]["vocab"]
    vocab[word] = max(vocab.values()) + 1
    path.write_bytes(orjson.dumps(tokenizer))
    return model_dir


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Classifier:
    return Classifier(model_dir, "cpu", 1)


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """Services a test starts; every process still running is stopped afterwards."""
    started: list[Service] = []
    yield started
    for service in started:
        for proc in service.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def service(services: list[Service], redis_url: str, model_dir: Path, prefix: str, **env: str) -> Service:
    svc = Service(redis_url, model_dir, prefix, **{**ENV, **env})
    services.append(svc)
    return svc


def worker_id(client: redis.Redis, prefix: str, pid: int) -> str:
    def find() -> str | None:
        return next((s.id for s in live_workers(client, prefix) if s.pid == pid), None)

    return str(wait_for(f"worker {pid}'s heartbeat", find))


@dataclass
class Outcome:
    url: str
    text: str
    started: float
    ended: float
    status: int | None = None  # None: no HTTP answer (see `error`)
    body: dict | None = None
    retry_after: str | None = None
    error: str | None = None


class Load:
    """Concurrent clients, each posting one new text after another to the APIs in `urls` until stopped.

    A refused connection (an API that stopped listening) was never accepted: the client sends the
    same text to the next API, as a load balancer would. New connection per request, so a draining
    API never sees a request on a kept-alive connection.
    """

    def __init__(self, urls: list[str], tag: str, clients: int = 6, timeout_s: float = HANG_GUARD_S) -> None:
        self.urls = urls  # the test may change it while the load runs (rolling restart)
        self.tag = tag
        self.clients = clients
        self.timeout_s = timeout_s
        self.outcomes: list[Outcome] = []
        self._count = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self._stop.set()
        self._thread.join(self.timeout_s + 10)
        assert not self._thread.is_alive(), "load clients hung"
        return self.outcomes

    def answered(self) -> int:
        return sum(o.status == 200 for o in self.outcomes)

    def wait_answered(self, more: int) -> None:
        target = self.answered() + more
        wait_for(f"{more} more answers", lambda: self.answered() >= target)

    async def _run(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits) as client:
            await asyncio.gather(*(self._client(client) for _ in range(self.clients)))

    async def _client(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            n = next(self._count)
            text = f"{self.tag} {n} was a good movie"
            for attempt in range(len(self.urls) + 1):
                outcome = Outcome(
                    url=self.urls[(n + attempt) % len(self.urls)], text=text, started=time.time(), ended=0
                )
                try:
                    r = await client.post(f"{outcome.url}/predict", json={"text": [text]})
                    outcome.status, outcome.retry_after = r.status_code, r.headers.get("retry-after")
                    outcome.body = r.json() if r.headers.get("content-type") == "application/json" else None
                except httpx.ConnectError:
                    await asyncio.sleep(0.01)
                    continue  # not accepted: try the next API
                except httpx.HTTPError as exc:
                    outcome.error = repr(exc)
                break
            else:
                outcome.error = "no API accepted the connection"
            outcome.ended = time.time()
            self.outcomes.append(outcome)


def assert_correct(outcomes: list[Outcome], reference: Classifier) -> None:
    """Each answered text got its own prediction (the classifier's own output), nothing else."""
    answered = [o for o in outcomes if o.status == 200]
    assert answered
    texts = [o.text for o in answered]
    want = [prediction(reference.labels, p) for p in reference.forward(reference.tokenize(texts))]
    for outcome, expected in zip(answered, want, strict=True):
        [got] = outcome.body["predictions"]
        assert [s["label"] for s in got] == [s["label"] for s in expected]
        assert [s["score"] for s in got] == pytest.approx([s["score"] for s in expected], abs=SCORE_ABS), outcome.text


@pytest.fixture(scope="module")
def crew(redis_url: str, model_dir: Path) -> Iterator[Service]:
    """One API and three workers, shared by the worker-fault tests: each takes one worker down."""
    svc = Service(redis_url, model_dir, "faults-crew", **ENV)
    svc.start("api", "--port", str(svc.port))
    for _ in range(3):
        svc.start("worker")
    svc.wait_ready()
    client = redis.Redis.from_url(redis_url)
    for proc in svc.procs[1:]:
        worker_id(client, "faults-crew", proc.pid)
    yield svc
    for proc in svc.procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def caught_holding_work(
    svc: Service, client: redis.Redis, prefix: str = "faults-crew"
) -> tuple[subprocess.Popen[bytes], str]:
    """A live worker, frozen (SIGSTOP) at a moment its processing list holds work; another stays live."""
    workers = [p for p in svc.procs[1:] if p.poll() is None]
    assert len(workers) >= 2
    proc = workers[0]
    worker = worker_id(client, prefix, proc.pid)
    while True:
        proc.send_signal(signal.SIGSTOP)
        if client.llen(Keys(prefix).processing(worker)):
            return proc, worker
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.002)


def kill_a_worker_under_load(svc: Service, redis_url: str, prefix: str, reference: Classifier, clients: int) -> str:
    """SIGKILL one of `svc`'s workers while it holds work and `clients` post new texts; every request
    must be answered 200 with its own prediction, once, and no text computed twice but those the
    dead worker held. Returns the dead worker's id."""
    client = redis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    replies = client.pubsub()
    replies.psubscribe(keys.reply_channel("*"))
    with CacheWrites(redis_url, prefix) as writes, Load([svc.url], f"kill-{prefix}", clients=clients) as load:
        load.wait_answered(20)
        victim, victim_id = caught_holding_work(svc, client, prefix)
        held = {
            text_digest(t)
            for raw in client.lrange(keys.processing(victim_id), 0, -1)
            for t in WorkItem.decode(raw).texts
        }
        victim.kill()
        assert victim.wait(10) == -signal.SIGKILL
        wait_for("the dead worker's work to be reclaimed", lambda: not client.sismember(keys.workers, victim_id))
        load.wait_answered(20)
        outcomes = load.stop()
        time.sleep(0.5)  # the last writes reach MONITOR
    assert set(writes.computed_more_than_once()) <= held
    assert [o for o in outcomes if o.status != 200] == []
    assert_correct(outcomes, reference)
    assert not client.exists(keys.processing(victim_id))  # no stale processing list
    answered = []
    while message := replies.get_message(timeout=0.5):
        if message["type"] == "pmessage":
            answered += [request_id for request_id, _ in parse_replies(message["data"])]
    assert answered and len(answered) == len(set(answered))  # no request answered twice
    return victim_id


def test_worker_killed_mid_batch_loses_nothing(crew: Service, redis_url: str, reference: Classifier) -> None:
    kill_a_worker_under_load(crew, redis_url, "faults-crew", reference, clients=6)


def test_a_killed_worker_costs_no_request_an_error_with_default_settings(
    services: list[Service], redis_url: str, model_dir: Path, reference: Classifier
) -> None:
    # Default heartbeat TTL and deadline (10 s each): the dead worker's closed connections, not its
    # lapsed heartbeat, get its work reclaimed, in time for every request it held.
    svc = Service(redis_url, model_dir, "faults-default", SENTIMENT_TORCH_THREADS="1")
    services.append(svc)
    svc.start("api", "--port", str(svc.port))
    svc.start("worker")
    svc.start("worker")
    svc.wait_ready()
    kill_a_worker_under_load(svc, redis_url, "faults-default", reference, clients=16)


def start_with_a_bug(svc: Service, tmp_path: Path, module: str, method: str, *command: str) -> subprocess.Popen[str]:
    """`sentiment <command>` of `svc` with `module`'s `method` raising RuntimeError('injected bug'), put
    in from outside (Python runs any `sitecustomize` on its path at start); its stderr piped."""
    bug = tmp_path / "bug"
    bug.mkdir(exist_ok=True)
    owner, name = method.split(".")
    (bug / "sitecustomize.py").write_text(
        f"import {module}\n\n\ndef bug(*args, **kwargs):\n    raise RuntimeError('injected bug')\n\n\n"
        f"{module}.{owner}.{name} = bug\n"
    )
    return subprocess.Popen(
        [sys.executable, "-m", "sentiment.cli", *command],
        env={**svc.env, "PYTHONPATH": os.pathsep.join([str(bug), os.environ.get("PYTHONPATH", "")])},
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_worker_whose_thread_dies_exits_with_its_cause_in_one_line_and_another_answers_its_work(
    services: list[Service], redis_url: str, model_dir: Path, reference: Classifier, tmp_path: Path
) -> None:
    # A bug that kills the reply thread, put into the process from outside (Python runs any
    # `sitecustomize` on its path at start): the worker must not live on with its work stuck.
    # (a deadline past the hang guards: on a loaded box the successor's start-up alone may take 30 s)
    svc = service(services, redis_url, model_dir, "faults-thread", SENTIMENT_REQUEST_TIMEOUT_S="120")
    svc.start("api", "--port", str(svc.port))
    wait_for("the API", lambda: answers(f"{svc.url}/health"))
    buggy = start_with_a_bug(svc, tmp_path, "batcher.reply", "Replies._write", "worker")
    answer: list[httpx.Response] = []
    asking = threading.Thread(
        target=lambda: answer.append(
            httpx.post(f"{svc.url}/predict", json={"text": ["computed, then lost?"]}, timeout=HANG_GUARD_S)
        )
    )
    asking.start()
    _, stderr = buggy.communicate(timeout=HANG_GUARD_S)
    assert buggy.returncode == 1
    assert stderr.strip().splitlines()[-1] == "sentiment worker: the reply thread failed (RuntimeError: injected bug)"
    svc.start("worker")
    asking.join(HANG_GUARD_S)
    [response] = answer
    assert response.status_code == 200
    outcome = Outcome(svc.url, "computed, then lost?", 0, 0, 200, response.json())
    assert_correct([outcome], reference)


def test_a_jobs_worker_whose_webhook_thread_dies_exits_with_its_cause_in_one_line(
    redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    svc = Service(redis_url, model_dir, "faults-webhooks", SENTIMENT_WEBHOOK_SECRETS=WEBHOOK_SECRET, **ENV)
    buggy = start_with_a_bug(svc, tmp_path, "batcher.webhooks", "Sender.tick", "jobs-worker")
    try:
        _, stderr = buggy.communicate(timeout=HANG_GUARD_S)
    finally:
        buggy.kill()
    assert buggy.returncode == 1
    assert stderr.strip().splitlines()[-1] == (
        "sentiment jobs-worker: the webhooks thread failed (RuntimeError: injected bug)"
    )


def test_worker_sigterm_finishes_its_batch_and_hands_back_the_rest(
    crew: Service, redis_url: str, reference: Classifier
) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = Keys("faults-crew")
    with Load([crew.url], "term") as load:
        load.wait_answered(20)
        leaving, leaving_id = caught_holding_work(crew, client)
        leaving.send_signal(signal.SIGTERM)
        leaving.send_signal(signal.SIGCONT)
        assert leaving.wait(30) == 0
        # It deregistered and handed everything back itself: nothing is left to reclaim.
        assert not client.sismember(keys.workers, leaving_id)
        assert not client.exists(keys.processing(leaving_id))
        load.wait_answered(20)
        outcomes = load.stop()
    assert [o for o in outcomes if o.status != 200] == []
    assert_correct(outcomes, reference)


def test_api_sigterm_drains_and_a_rolling_restart_drops_nothing(
    services: list[Service], redis_url: str, model_dir: Path, reference: Classifier
) -> None:
    prefix = "faults-roll"
    old = service(services, redis_url, model_dir, prefix)
    old_api, old_worker = old.start("api", "--port", str(old.port)), old.start("worker")
    old.wait_ready()
    urls = [old.url]
    with Load(urls, "roll") as load:
        load.wait_answered(10)
        new = service(services, redis_url, model_dir, prefix)
        new.start("api", "--port", str(new.port))
        new_worker = new.start("worker")
        new.wait_ready()
        urls.append(new.url)
        load.wait_answered(10)
        # Hold both workers so requests are in flight on the old API when it is told to stop.
        for w in (old_worker, new_worker):
            w.send_signal(signal.SIGSTOP)
        time.sleep(0.3)
        urls.remove(old.url)
        terminated_at = time.time()
        old_api.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        for w in (old_worker, new_worker):
            w.send_signal(signal.SIGCONT)
        assert old_api.wait(HANG_GUARD_S) == 0
        old_worker.send_signal(signal.SIGTERM)
        assert old_worker.wait(HANG_GUARD_S) == 0
        load.wait_answered(10)
        outcomes = load.stop()
    assert [o for o in outcomes if o.status != 200] == []
    assert_correct(outcomes, reference)
    drained = [o for o in outcomes if o.url == old.url and o.started < terminated_at < o.ended]
    assert drained  # requests in flight at SIGTERM were answered, not cut off
    assert new_worker.poll() is None


def test_poison_text_fails_only_its_own_request(
    services: list[Service], redis_url: str, model_dir: Path, reference: Classifier
) -> None:
    prefix = "faults-poison"
    # A long batching window: the poison text shares a model batch with the others.
    svc = service(services, redis_url, model_dir, prefix, SENTIMENT_MAX_WAIT_MS="300")
    svc.start("api", "--port", str(svc.port))
    worker = svc.start("worker")
    svc.wait_ready()
    texts = [f"good movie {i}" for i in range(7)]
    bodies = [{"text": [t]} for t in texts] + [{"text": ["fine", f"a {POISON} movie"]}]

    async def post_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=svc.url, timeout=HANG_GUARD_S) as c:
            return await asyncio.gather(*(c.post("/predict", json=b) for b in bodies))

    *good, bad = asyncio.run(post_all())
    assert bad.status_code == 424
    error = f"the model failed on this request's texts ({model_error(reference)})"
    assert bad.json() == {"error": error, "error_type": "inference"}
    outcomes = [
        Outcome(svc.url, t, 0, 0, status=r.status_code, body=r.json()) for t, r in zip(texts, good, strict=True)
    ]
    assert [o.status for o in outcomes] == [200] * len(texts)
    assert_correct(outcomes, reference)
    [status] = live_workers(redis.Redis.from_url(redis_url), prefix)
    assert status.largest_batch_requests > 1  # the poison went through a shared batch, then alone
    after = httpx.post(f"{svc.url}/predict", json={"text": ["still serving"]}, timeout=HANG_GUARD_S)
    assert after.status_code == 200
    assert worker.poll() is None


@pytest.mark.alone  # (its 5 s recovery bound is the promise's: other tests' load on the cores would be timed too)
def test_redis_outage_gives_503s_and_everything_reconnects_by_itself(
    services: list[Service], redis_server: RedisServer, model_dir: Path, reference: Classifier
) -> None:
    svc = service(services, redis_server.url, model_dir, "faults-outage", SENTIMENT_REQUEST_TIMEOUT_S="15")
    procs = [
        svc.start("api", "--port", str(svc.port)),
        svc.start("worker"),
        svc.start("jobs-worker"),
    ]
    svc.wait_ready()
    wait_for("the jobs worker to register", lambda: rq.Worker.count(connection=redis.Redis.from_url(redis_server.url)))
    with Load([svc.url], "outage", clients=4, timeout_s=30) as load:
        load.wait_answered(10)
        redis_server.stop()
        down_at = time.monotonic()
        wait_for("requests to see the outage", lambda: any(o.status == 503 for o in load.outcomes))
        ready = httpx.get(f"{svc.url}/ready", timeout=10)
        assert ready.status_code == 503
        time.sleep(max(0.0, down_at + 2.5 - time.monotonic()))  # longer than the waiters' result poll
        redis_server.start()
        up_at = time.monotonic()
        probe = itertools.count()
        wait_for(
            "a /predict answer after Redis returned",
            lambda: (
                httpx.post(f"{svc.url}/predict", json={"text": [f"probe {next(probe)}"]}, timeout=10).status_code == 200
            ),
        )
        assert time.monotonic() - up_at < 5.0  # the promise: serving again within 5 s, no restart
        load.wait_answered(10)
        outcomes = load.stop()
    assert [o for o in outcomes if o.status not in (200, 503)] == []  # no 500, 504 or client timeout
    refused = [o for o in outcomes if o.status == 503]
    assert refused and all(o.retry_after for o in refused)
    assert_correct(outcomes, reference)
    # The jobs worker reconnected too: a job submitted now runs to the end.
    job = httpx.post(f"{svc.url}/jobs", json={"text": ["after the outage"]}, timeout=10).json()["job_id"]
    view = wait_for(
        "the job to finish",
        lambda: (v := httpx.get(f"{svc.url}/jobs/{job}", timeout=10).json())["status"] in ("finished", "failed") and v,
    )
    assert view["status"] == "finished"
    assert [p.poll() for p in procs] == [None, None, None]  # the same processes, alive: none restarted


def test_an_outage_longer_than_the_heartbeat_ttl_reclaims_only_the_workers_that_do_not_come_back(
    tmp_path: Path, settings: Settings, classifier: Classifier, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every heartbeat lapses in an outage longer than its TTL (Redis, append-only as deployed, restores
    # the keys' expiry times, which ran on). A live worker holding an item in a forward, back a little
    # after the other (a reconnect's backoff), must keep its item; a registered worker that never comes
    # back is still reclaimed.
    server = RedisServer(tmp_path)
    server.start()
    settings = settings.model_copy(update={"heartbeat_ttl_s": 1.0})
    keys = Keys(settings.key_prefix)
    client = redis.Redis.from_url(server.url)
    forwarding, release = hold_forwards(monkeypatch, classifier)
    now = time.time()
    held, lost = (WorkItem(new_id(), [text], now, now + 600, keys.reply_channel("api")) for text in ("held", "lost"))
    client.lpush(keys.queue, held.encode())
    holder = Worker(settings, worker_client(server.url, settings.redis_timeout_s, keys), classifier)
    watcher = Worker(
        settings, worker_client(server.url, settings.redis_timeout_s, keys), Classifier(tiny_model_dir, "cpu", 1)
    )
    down, watched = threading.Event(), threading.Event()
    real_dead, real_beat = watcher.queue.deaths.dead, holder.heartbeat.beat

    def watcher_dead() -> dict[str, bytes | None]:
        dead = real_dead()
        if down.is_set():
            watched.set()
        return dead

    def holder_beat() -> None:
        if down.is_set():
            watched.wait(HANG_GUARD_S)  # back after the watcher's first look once Redis is
        real_beat()

    monkeypatch.setattr(watcher.queue.deaths, "dead", watcher_dead)
    monkeypatch.setattr(holder.heartbeat, "beat", holder_beat)
    threads = [start_worker(holder)]
    try:
        wait_for("the holder's forward to start", forwarding.is_set)
        threads.append(start_worker(watcher))
        status = WorkerStatus(id="gone", host="h", pid=1, model_version="v", started_at=0)
        with client.pipeline() as registered:  # a worker that dies in the outage, holding `lost`
            registered.lpush(keys.processing("gone"), lost.encode())
            registered.set(keys.heartbeat("gone"), status.encode(), px=int(settings.heartbeat_ttl_s * 1000))
            registered.sadd(keys.workers, "gone")
            registered.execute()
        server.stop()
        down.set()
        time.sleep(2 * settings.heartbeat_ttl_s)  # down for longer than every heartbeat's TTL
        server.start()
        pubsub = client.pubsub()
        pubsub.subscribe(keys.reply_channel("api"))
        pubsub.get_message(timeout=1)
        wait_for("the gone worker's work to be reclaimed", lambda: not client.sismember(keys.workers, "gone"))
        assert client.lrange(keys.processing(holder.id), -1, -1) == [held.encode()]  # its oldest: still its own
        release.set()
        results = [wait_for(f"{i.id}'s result", lambda i=i: client.get(keys.result(i.id))) for i in (held, lost)]
        assert all(Result.decode(r).predictions for r in results)
        assert holder.lanes.computed + watcher.lanes.computed == 2  # nothing computed twice
        answered = []
        while message := pubsub.get_message(timeout=0.5):
            if message["type"] == "message":
                answered += [request_id for request_id, _ in parse_replies(message["data"])]
        assert sorted(answered) == sorted([held.id, lost.id])  # each answered once
        assert {s.id for s in live_workers(client, settings.key_prefix)} == {holder.id, watcher.id}
    finally:
        release.set()
        for worker in (holder, watcher):
            worker.stop()
        for thread in threads:
            thread.join(10)
        server.stop()


def test_redis_refusing_writes_is_survived_like_an_outage(
    services: list[Service], redis_server: RedisServer, model_dir: Path, reference: Classifier
) -> None:
    # A Redis turned replica by a failover answers every write with an error reply (READONLY), not a
    # lost connection; NOPERM comes the same way. The worker holds on to its work, backs off, and
    # serves it once writes are accepted again: the same process, one answer. (A full Redis, OOM, is
    # another case: its answers go without their result keys, tests/test_redis_full.py.)
    prefix = "faults-readonly"
    keys = Keys(prefix)
    client = redis.Redis.from_url(redis_server.url)
    pubsub = client.pubsub()
    pubsub.subscribe(keys.reply_channel("api"))
    worker = service(services, redis_server.url, model_dir, prefix).start("worker")
    held_by = keys.processing(worker_id(client, prefix, worker.pid))
    wait_for("the worker to wait for work", lambda: client.info("clients")["blocked_clients"])
    worker.send_signal(signal.SIGSTOP)  # so the work below cannot be answered before writes are refused
    now = time.time()
    item = WorkItem(new_id(), ["a good movie"], now, now + 600, keys.reply_channel("api"))
    client.lpush(keys.queue, item.encode())  # Redis hands it to the waiting take at once
    assert client.lrange(held_by, 0, -1) == [item.encode()]
    client.replicaof("127.0.0.1", "1")  # a master that never answers: this Redis keeps its data
    try:
        worker.send_signal(signal.SIGCONT)
        wait_for("the worker's heartbeat to lapse (its writes are refused)", lambda: not live_workers(client, prefix))
        assert worker.poll() is None and client.lrange(held_by, 0, -1) == [item.encode()]
    finally:
        client.replicaof("NO", "ONE")
    result = Result.decode(wait_for("the answer once Redis takes writes", lambda: client.get(keys.result(item.id))))
    [want] = reference.forward(reference.tokenize(item.texts))
    assert [s["score"] for s in result.predictions[0]] == pytest.approx(want, abs=SCORE_ABS)
    messages = []
    while message := pubsub.get_message(timeout=0.5):
        messages.append(message)
    answered = [request_id for m in messages if m["type"] == "message" for request_id, _ in parse_replies(m["data"])]
    assert answered == [item.id]  # answered once
    assert (client.llen(keys.queue), client.llen(held_by)) == (0, 0)
    # The same process beats again, at its heartbeat thread's next try (it backed off meanwhile).
    wait_for("the worker to beat again", lambda: [s.pid for s in live_workers(client, prefix)] == [worker.pid])


def test_overload_is_refused_at_once_and_cache_hits_are_still_served(
    services: list[Service], redis_url: str, model_dir: Path, reference: Classifier
) -> None:
    prefix = "faults-overload"
    keys = Keys(prefix)
    client = redis.Redis.from_url(redis_url)
    # No worker: the queue only grows. A short request timeout tells accepted (504) from refused (503).
    svc = service(
        services, redis_url, model_dir, prefix, SENTIMENT_MAX_QUEUE_DEPTH="3", SENTIMENT_REQUEST_TIMEOUT_S="2"
    )
    info = ModelInfo("tiny", reference.version, reference.labels, "cpu", "float32")
    client.set(keys.model, info.encode())
    cached = prediction(reference.labels, reference.forward(reference.tokenize(["cached"]))[0])
    client.set(keys.cache(info.version, "cached"), orjson.dumps(cached))
    svc.start("api", "--port", str(svc.port))
    wait_for("the API", lambda: _up(svc.url))

    accepted = httpx.post(f"{svc.url}/predict", json={"text": ["queued, never served"]}, timeout=HANG_GUARD_S)
    assert accepted.status_code == 504  # below the limit: queued
    for _ in range(3):
        now = time.time()
        client.lpush(keys.queue, WorkItem(new_id(), ["backlog"], now, now + 600, keys.reply_channel("x")).encode())
    depth = client.llen(keys.queue)
    refused = httpx.post(f"{svc.url}/predict", json={"text": ["one more"]}, timeout=HANG_GUARD_S)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error_type"] == "overloaded"
    assert client.llen(keys.queue) == depth  # refused work is not left in the queue
    hit = httpx.post(f"{svc.url}/predict", json={"text": ["cached"]}, timeout=HANG_GUARD_S)
    assert (hit.status_code, hit.headers["x-cache"], hit.json()) == (200, "hit", {"predictions": [cached]})


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.TransportError:
        return False


def model_error(reference: Classifier) -> str:
    """What the model raises on the poison word: the only detail of a failure clients are told."""
    with pytest.raises(Exception) as failure:
        reference.forward(reference.tokenize([POISON]))
    return type(failure.value).__name__


def test_poison_word_is_outside_the_embedding_table(reference: Classifier) -> None:
    [ids] = reference.tokenize([POISON])
    assert max(ids) >= reference.checkpoint.config.vocab_size
    # torch's eager embedding lookup, its traced graph (TorchScript re-raises as RuntimeError), or
    # ONNX Runtime's Gather (the default engine for fp32 on the CPU)
    engine = reference.engine
    expected = (
        ("RuntimeError" if engine.traced else "IndexError") if isinstance(engine, TorchEngine) else "InvalidArgument"
    )
    assert engine.name in ("torch", "onnxruntime") and model_error(reference) == expected
