"""Bulk jobs under racing clients: create, cancel, delete and read jobs while the jobs worker takes,
starts, runs and ends them, on a real redis-server with `sentiment api` and `sentiment jobs-worker`
processes (the null engine: a job takes milliseconds, so the races are many).

The promises: no 5xx and no reset connection (an httpx error here), ever; the jobs worker never loses its loop to a job
that changed or went; a job nobody deleted finishes with every prediction; a job whose DELETE was
a cancel never ends `finished` (or `failed`), and a deleted one never comes back.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from core.job_spec import jobs_queue
from core.settings import Settings
from sentiment.embedded import free_port
from tests.conftest import RedisServer, answers, wait_for

PAIRS = 1000
CLIENTS = 12  # scenarios in flight at once
PREFIX = "races"


@dataclass
class Case:
    """One scenario's job: its texts, its id, and what the DELETEs and GETs aimed at it answered."""

    texts: list[str]
    job_id: str = ""
    deletes: list[int] = field(default_factory=list)
    after_delete: list[str] = field(default_factory=list)  # the job as a GET saw it once a DELETE answered
    deleted: bool = False  # a DELETE was sent (the job may be canceled or gone)


@dataclass
class Stack:
    """`sentiment api`, `sentiment jobs-worker` and the model worker it sends texts to, on a redis-server
    of the test's own."""

    api: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]
    logs: Path
    url: str
    redis: redis.Redis

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")


@pytest.fixture
def stack(redis_server: RedisServer, tiny_model_dir: Path, tmp_path: Path) -> Iterator[Stack]:
    port = free_port()
    env = {
        **os.environ,
        "SENTIMENT_REDIS_URL": redis_server.url,
        "SENTIMENT_MODEL_DIR": str(tiny_model_dir),
        "SENTIMENT_KEY_PREFIX": PREFIX,
        "SENTIMENT_ENGINE": "null",
        "SENTIMENT_MAX_BATCH_SIZE": "2",  # parts of 8 texts: a job of 1-20 texts has 1-3 part boundaries
        "SENTIMENT_METRICS_PORT": "0",
        "SENTIMENT_JOBS_METRICS_PORT": "0",
    }
    procs = []
    for name, command in (
        ("api", ["api", "--port", str(port)]),
        ("jobs-worker", ["jobs-worker"]),
        ("worker", ["worker"]),
    ):
        with (tmp_path / f"{name}.log").open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "sentiment.cli", *command], env=env, stdout=out, stderr=subprocess.STDOUT
                )
            )
    stack = Stack(procs[0], procs[1], tmp_path, f"http://127.0.0.1:{port}", redis.Redis.from_url(redis_server.url))
    try:
        yield stack
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


async def create(client: httpx.AsyncClient, job: Case) -> None:
    response = await client.post("/jobs", json={"text": job.texts})
    assert response.status_code == 202, response.text
    job.job_id = response.json()["job_id"]


async def delete(client: httpx.AsyncClient, job: Case) -> None:
    job.deleted = True
    response = await client.delete(f"/jobs/{job.job_id}")
    assert response.status_code in (204, 404), response.text
    job.deletes.append(response.status_code)
    job.after_delete.append(await state(client, job))


async def state(client: httpx.AsyncClient, job: Case) -> str:
    """The job's status, or "gone" (404); a 200 must be a whole status document."""
    response = await client.get(f"/jobs/{job.job_id}")
    assert response.status_code in (200, 404), response.text
    if response.status_code == 404:
        return "gone"
    view = response.json()
    if view["status"] == "finished":
        assert len(view["predictions"] or []) == len(job.texts), view  # never finished without its predictions
    return view["status"]


async def until(client: httpx.AsyncClient, job: Case, states: set[str]) -> str:
    """Poll the job until it reads one of `states` (a hang guard, not a timing claim)."""
    for _ in range(3000):
        if (seen := await state(client, job)) in states:
            return seen
        await asyncio.sleep(0.005)
    raise TimeoutError(f"job {job.job_id} never reached {states}")


async def pause() -> None:
    await asyncio.sleep(random.uniform(0, 0.02))


async def create_then_delete(client: httpx.AsyncClient, job: Case) -> None:
    await create(client, job)
    await pause()
    await delete(client, job)


async def delete_twice_at_once(client: httpx.AsyncClient, job: Case) -> None:
    await create(client, job)
    await pause()
    await asyncio.gather(delete(client, job), delete(client, job))


async def delete_racing_reads(client: httpx.AsyncClient, job: Case) -> None:
    await create(client, job)
    await pause()
    await asyncio.gather(delete(client, job), state(client, job), state(client, job))


async def cancel_once_started(client: httpx.AsyncClient, job: Case) -> None:
    await create(client, job)
    await until(client, job, {"started", "finished"})
    await delete(client, job)


async def delete_once_finished(client: httpx.AsyncClient, job: Case) -> None:
    await create(client, job)
    await until(client, job, {"finished"})
    await delete(client, job)
    assert job.deletes == [204] and job.after_delete == ["gone"]


async def leave_alone(client: httpx.AsyncClient, job: Case) -> None:
    await create(client, job)


Scenario = Callable[[httpx.AsyncClient, Case], Awaitable[None]]
MIX: list[tuple[Scenario, int]] = [
    (create_then_delete, 55),
    (delete_twice_at_once, 10),
    (delete_racing_reads, 10),
    (cancel_once_started, 5),
    (delete_once_finished, 5),
    (leave_alone, 15),
]


async def race(url: str, jobs: list[tuple[Scenario, Case]]) -> None:
    limits = httpx.Limits(max_connections=3 * CLIENTS, max_keepalive_connections=3 * CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        await create(client, warm_up := Case(["warm up"]))
        await until(client, warm_up, {"finished"})  # the jobs worker is up
        turns = iter(jobs)

        async def runner() -> None:
            for scenario, job in turns:
                await scenario(client, job)

        await asyncio.gather(*(runner() for _ in range(CLIENTS)))


def test_create_cancel_and_delete_racing_jobs_start_and_end(stack: Stack) -> None:
    scenarios, weights = zip(*MIX, strict=True)
    jobs = [
        (scenario, Case([f"race {n} text {i}" for i in range(texts(scenario))]))
        for n, scenario in enumerate(random.choices(scenarios, weights, k=PAIRS))
    ]
    wait_for("the API", lambda: answers(f"{stack.url}/health"))
    asyncio.run(race(stack.url, jobs))

    queue = jobs_queue(stack.redis, Settings(key_prefix=PREFIX))

    def settled() -> bool:  # nothing queued, taken or running
        taken = stack.redis.exists(queue.intermediate_queue_key)
        return queue.count == 0 and not taken and not queue.started_job_registry.get_job_ids(cleanup=False)

    wait_for("the jobs worker to let go of every job", settled)
    outcomes: Counter[tuple[str, str]] = Counter()
    for (scenario, job), final in zip(jobs, asyncio.run(finals(stack.url, [job for _, job in jobs])), strict=True):
        if not job.deleted:
            assert final == "finished", (job.job_id, final)
            continue
        # A DELETE answered: the job was canceled (it stays canceled) or deleted (it stays gone).
        assert set(job.after_delete) <= {"canceled", "gone"}, (scenario.__name__, job)
        assert final in {"canceled", "gone"}, (scenario.__name__, job, final)
        assert not (final == "canceled" and "gone" in job.after_delete), job  # deleted, never back
        outcomes[scenario.__name__, final] += 1

    assert stack.worker.poll() is None and stack.api.poll() is None  # the same processes throughout
    worker_log, api_log = stack.log("jobs-worker"), stack.log("api")
    for bad in ("unhandled exception", "stopped unasked", "Traceback"):
        assert bad not in worker_log, worker_log[-6000:]
    assert "Traceback" not in api_log, api_log[-6000:]
    for key in stack.redis.scan_iter(match="rq:job:*"):  # every job ended: each expires (no stray hash)
        assert stack.redis.ttl(key) > 0, (key, stack.redis.hgetall(key))
    dropped = Counter(re.findall(r"job \w+ (\w+ [\w ]+); dropped", worker_log))
    print(f"outcomes {dict(outcomes)}; the jobs worker dropped {dict(dropped)}")  # which races came up (-s)


def texts(scenario: Scenario) -> int:
    """1-20 texts a job (1-3 parts); 200 (25 parts) for one to cancel while it runs."""
    return 200 if scenario is cancel_once_started else random.randint(1, 20)


async def finals(url: str, jobs: list[Case]) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return [await state(client, job) for job in jobs]
