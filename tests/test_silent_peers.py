"""A Redis that goes silent without closing its connections (a host gone, a partition, a failover
behind a proxy), staged with the project's fault proxy between every process and a real redis-server:
every process notices within seconds, opens new connections and carries on, and nothing is computed
twice. A killed process cannot stage this: its kernel resets its connections at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import redis
import rq
import uvloop

from api.results import ResultWaiter
from batcher.redis_link import Link
from benchmarks.cache_writes import CacheWrites
from benchmarks.fault_proxy import FaultProxy
from core.liveness import live_workers
from core.protocol import Keys, new_id, prediction
from core.redis_connect import async_client, sync_client
from model_store.classifier import Classifier
from tests.conftest import HANG_GUARD_S, RedisServer, Service, answers, wait_for

pytestmark = pytest.mark.faults

ENV = {
    "SENTIMENT_REDIS_TIMEOUT_S": "2",
    "SENTIMENT_PRECISION": "fp32",
    "SENTIMENT_ENGINE": "torch",
    "SENTIMENT_TORCH_THREADS": "1",
}


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(redis_server.port).start()
    yield proxy
    proxy.close()


def test_a_pooled_connection_reset_while_idle_is_a_lost_connection_under_uvloop_too(redis_server: RedisServer) -> None:
    # Under uvloop (uvicorn's loop) a write to a connection the peer reset while it sat in the pool
    # raised RuntimeError out of redis-py, which the API answered 500; it is a lost connection, retried.
    proxy = FaultProxy(redis_server.port).start()

    async def reset_then_get() -> bytes | None:
        client = async_client(proxy.url(), 2.0, max_connections=4, pool_wait_s=2.0)
        try:
            await client.set("pooled", "still here")
            proxy.reset()
            await asyncio.sleep(0.2)  # the loop sees the reset and closes the transport
            return await client.get("pooled")
        finally:
            await client.aclose()

    try:
        assert uvloop.run(reset_then_get()) == b"still here"
    finally:
        proxy.close()


def test_a_timeout_reopens_the_pools_other_connections_to_the_silent_peer(redis_server: RedisServer) -> None:
    # Eight pooled connections go silent. The first command pays the timeout (and is retried on a new
    # connection); the next eight, side by side, must not pay it again on the seven others.
    proxy = FaultProxy(redis_server.port).start()

    async def run() -> list[bytes | None]:
        client = async_client(proxy.url(), 1.0, max_connections=8, pool_wait_s=10.0)
        try:
            await client.set("pooled", "here")
            await asyncio.gather(*(client.get("pooled") for _ in range(8)))  # eight connections in the pool
            proxy.silence()
            assert await client.get("pooled") == b"here"
            return await asyncio.gather(*(client.get("pooled") for _ in range(8)))
        finally:
            await client.aclose()

    try:
        assert asyncio.run(run()) == [b"here"] * 8
        assert len(proxy.swallowed) == 1  # only the first command went into the silence
    finally:
        proxy.close()


def test_a_silent_subscription_reopens_the_pools_other_connections_to_the_silent_peer(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The result subscription's watch is often the first to find the peer silent (an API whose
    # requests all wait on it): the requests after it must not each pay a timeout on an idle
    # connection, nor the new subscription go back into the silence.
    proxy = FaultProxy(redis_server.port).start()

    async def run() -> list[bytes | None]:
        client = async_client(proxy.url(), 1.0, max_connections=8, pool_wait_s=10.0)
        waiter = ResultWaiter(client, Keys("silent-subscription"), silence_s=2.0)
        try:
            await client.set("pooled", "here")
            await asyncio.gather(*(client.get("pooled") for _ in range(4)))  # idle connections in the pool
            waiter.start()
            await asyncio.sleep(0.5)  # subscribed
            proxy.silence()
            guard = time.monotonic() + HANG_GUARD_S
            while "result subscription lost" not in caplog.text and time.monotonic() < guard:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # subscribed again
            return await asyncio.gather(*(client.get("pooled") for _ in range(4)))
        finally:
            await waiter.stop()
            await client.aclose()

    try:
        assert asyncio.run(run()) == [b"here"] * 4
        assert len(proxy.swallowed) == 1  # the subscription's PING, and nothing after it
    finally:
        proxy.close()


def test_a_stages_timeout_moves_the_pools_other_connections_off_the_silent_peer(redis_server: RedisServer) -> None:
    # The worker's threads share one pool: once a stage's call times out, the next calls of any thread
    # must not each go into the silence on another connection (5 s each, by default): neither an idle
    # one of the pool nor the one another stage held through the silence (the reply thread between
    # two batches, the heartbeat between two beats).
    proxy = FaultProxy(redis_server.port).start()
    try:
        client = sync_client(proxy.url(), 1.0)
        idle = [client.connection_pool.get_connection() for _ in range(4)]
        for connection in idle:
            connection.connect()
            client.connection_pool.release(connection)
        link, held = Link(client), Link(client)
        assert link.call(("PING",)) == held.call(("PING",)) == [b"PONG"]
        proxy.silence()
        with pytest.raises(redis.TimeoutError):
            link.call(("PING",))
        assert link.call(("PING",)) == held.call(("PING",)) == [b"PONG"] and client.ping()
        assert len(proxy.swallowed) == 1  # only the first call went into the silence
    finally:
        proxy.close()


def test_a_request_through_a_silent_redis_answers_504_at_its_own_deadline(
    redis_server: RedisServer, proxy: FaultProxy, tiny_model_dir: Path
) -> None:
    # Redis goes silent for every connection, open or new, while the API's rate limit waits on its
    # script: a request due within 1 s gets its 504 then, naming the stage, not after the service's
    # own timeout (120 s) or Redis's (30 s, retried once); the hang guard (60 s) is shorter than both.
    svc = Service(
        proxy.url(),
        tiny_model_dir,
        f"silent-deadline-{new_id()[:8]}",
        **{**ENV, "SENTIMENT_REDIS_TIMEOUT_S": "30"},
        SENTIMENT_REQUEST_TIMEOUT_S="120",
        SENTIMENT_RATE_LIMIT_PER_S="1000",
    )
    try:
        svc.start("api", "--port", str(svc.port))
        wait_for("the API", lambda: answers(f"{svc.url}/health"))
        proxy.blackhole(True)
        answer = httpx.post(
            f"{svc.url}/predict", json={"text": ["x"]}, headers={"X-Request-Timeout": "1"}, timeout=HANG_GUARD_S
        )
        assert (answer.status_code, answer.json()) == (
            504,
            {
                "error": "no result within 1 s: the deadline was reached at the rate limit stage, waiting on Redis",
                "error_type": "timeout",
            },
        )
    finally:
        proxy.blackhole(False)
        svc.stop()


def expected(model_dir: Path, texts: list[str]) -> list[list[float]]:
    classifier = Classifier(model_dir, "cpu", 1, precision="fp32", engine="torch")
    return [
        [s["score"] for s in prediction(classifier.labels, p)] for p in classifier.forward(classifier.tokenize(texts))
    ]


def scores(predictions: list[list[dict]]) -> list[list[float]]:
    return [[s["score"] for s in p] for p in predictions]


def finished_job(url: str, texts: list[str]) -> dict:
    created = httpx.post(f"{url}/jobs", json={"text": texts}, timeout=HANG_GUARD_S)
    assert created.status_code == 202, created.text
    job = created.json()["job_id"]

    def ended() -> dict | None:
        view = httpx.get(f"{url}/jobs/{job}", timeout=HANG_GUARD_S).json()
        return view if view["status"] in ("finished", "failed", "canceled") else None

    view = wait_for(f"job {job} to end", ended, 2 * HANG_GUARD_S)
    assert view["status"] == "finished", view
    return view


def test_every_process_notices_a_silent_redis_and_carries_on_without_computing_twice(
    redis_server: RedisServer, proxy: FaultProxy, tiny_model_dir: Path
) -> None:
    prefix = f"silent-{new_id()[:8]}"
    keys = Keys(prefix)
    direct = redis.Redis.from_url(redis_server.url)
    svc = Service(proxy.url(), tiny_model_dir, prefix, **ENV)
    try:
        svc.start("api", "--port", str(svc.port))
        svc.start("worker")
        svc.start("jobs-worker")
        svc.wait_ready()
        queue = rq.Queue(f"{prefix}-jobs", connection=direct)
        wait_for("the jobs worker", lambda: rq.Worker.all(queue=queue))
        with CacheWrites(redis_server.url, prefix) as writes:
            before = [f"before the silence {i}" for i in range(3)]
            answer = httpx.post(f"{svc.url}/predict", json={"text": before}, timeout=HANG_GUARD_S)
            assert answer.status_code == 200
            finished_job(svc.url, [f"a job before the silence {i}" for i in range(5)])
            [worker] = live_workers(direct, prefix)

            proxy.silence()  # every connection open now: the API's pools and subscription, the workers', RQ's
            silenced_at = datetime.now(UTC)
            direct.delete(keys.heartbeat(worker.id))  # so that its coming back shows the heartbeat resumed

            texts = [f"after the silence {i}" for i in range(4)]
            answer = httpx.post(f"{svc.url}/predict", json={"text": texts}, timeout=HANG_GUARD_S)
            assert answer.status_code == 200, answer.text
            assert scores(answer.json()["predictions"]) == [
                pytest.approx(e, abs=1e-4) for e in expected(tiny_model_dir, texts)
            ]
            job_texts = [f"a job after the silence {i}" for i in range(6)]
            view = finished_job(svc.url, job_texts)
            assert scores(view["predictions"]) == [
                pytest.approx(e, abs=1e-4) for e in expected(tiny_model_dir, job_texts)
            ]
            wait_for("the worker's heartbeat again", lambda: direct.exists(keys.heartbeat(worker.id)))

            def jobs_worker_beats() -> bool:
                return any(w.last_heartbeat and w.last_heartbeat > silenced_at for w in rq.Worker.all(queue=queue))

            wait_for("the jobs worker's heartbeat again", jobs_worker_beats)
            assert httpx.get(f"{svc.url}/ready", timeout=HANG_GUARD_S).status_code == 200
            time.sleep(1)  # the last writes reach MONITOR
        assert writes.counts, "no cache write seen: the count below would prove nothing"
        assert writes.computed_more_than_once() == {}  # nobody was taken for dead, nothing was done twice
        assert [proc.poll() for proc in svc.procs] == [None, None, None]  # noticed, not restarted
    finally:
        svc.stop()
