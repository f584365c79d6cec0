"""`sentiment chaos`: the production topology under mixed load while faults run, and the promises of
docs/reliability.md checked on everything that happened.

Topology: a redis-server with an append-only file synced on every write, two `sentiment api`
processes, two `sentiment worker`s and a `sentiment jobs-worker`, each behind a fault proxy of its
own (`benchmarks/fault_proxy.py`) and restarted when it dies (`sentiment.supervisor`, as Kubernetes
would). Load: clients posting 1-4 texts to /predict (a hot pool that hits the cache, and new texts),
and such requests sent open loop a few a second (`Traffic._probing`), round robin over the APIs (a
refused connection goes to the other, as a load balancer does), and a bulk job every few seconds,
polled to its end. Faults, spaced evenly over the run (twice each in the full run): SIGKILL of a
worker, an API process or the jobs worker (always the second of each: the first lives the whole run,
for the memory check); Redis SIGKILL and restart; a 5 s blackhole; 200 ms of added latency;
connection resets; every open connection gone silent; a garbage heartbeat and garbage work items
written into Redis; Redis full (`Faults.full_redis`).

Checked (`check`): every 200 carries the right predictions (the model run here, in process); every
other answer is a 503 with Retry-After or a 504, within the deadline + 1 s; a connection error only
for requests the killed API process held; every accepted job ends finished with the right
predictions, or failed with a reason (or, run while Redis was full, answers 404: an ended job is
cache); a fault's own promise (a full Redis's job larger than its room
fails saying its predictions did not fit); after each fault heals, a request is answered 200 within 3 s;
no process left behind; the never-killed API and worker use at most 10% more memory at the end than
at the end of the warm-up (minute 2, or a third of a shorter run); no text computed more often than
the run put it back: once, plus once for each further request or job that asked for it before its
first result was written, and for each fault during a request or job that asks for it
(`computed_past_put_back`; computations counted off Redis, `benchmarks/cache_writes.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from api.results import HEALTH_CHECK_S
from benchmarks import machine
from benchmarks.cache_writes import CacheWrites
from benchmarks.fault_proxy import FaultProxy
from benchmarks.report import replace_block, results_dir, writable_file
from benchmarks.workload import UniqueTexts, load_texts
from core.liveness import jobs_worker_alive_on_this_host, live_workers, worker_alive_on_this_host
from core.protocol import Keys, WorkItem, new_id, prediction, text_digest
from core.settings import Settings
from sentiment.embedded import free_port, start_redis_server
from sentiment.supervisor import Child, Supervisor

logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request of the load

DEADLINE_S = 10.0  # SENTIMENT_REQUEST_TIMEOUT_S, the default
REDIS_TIMEOUT_S = 5.0  # SENTIMENT_REDIS_TIMEOUT_S, the default
RECOVERY_S = 3.0  # after a fault heals, a request is answered 200 within this
SETTLE_S = 1.0  # the next fault comes this long after the last was seen to heal, at the earliest
KILL_TAKES_S = 0.5  # a SIGKILLed process may still hold its sockets this long after the signal
MEMORY_GROWTH = 0.10  # most growth of the never-killed processes' memory from the warm-up's end to the end
MEMORY_BASE_S = 120.0  # the warm-up: this long, or a third of a shorter run
SCORE_TOLERANCE = 1e-4  # the service's fp32 forwards against the same model run here
JOB_END_WAIT_S = 180.0  # for the jobs accepted during the run to end once the load stops
CLIENTS = 4
PROBE_EVERY_S = 0.25  # besides the clients, a request this often whatever the answers (`Traffic._probing`)
JOB_EVERY_S = 5.0
POOL_TEXTS = 5000  # SST-2 sentences; new texts are these again with trailing whitespace (`UniqueTexts`)
HOT_TEXTS = 200  # of them, those that come back again and again: cache hits
FULL_ROOM_B = 64 * 1024  # a full Redis's room above what it held once its job larger than that was queued
FULL_BIG_TEXTS = 2000  # that job: its predictions (about 90 bytes each) do not fit in the room
FULL_FILLER_TEXTS = 200  # each job queued to fill the room, until refused
FULL_S = 5.0  # how long Redis stays full of queued jobs


@dataclass
class Answer:
    """One /predict request and what came of it."""

    api: str
    texts: list[str]
    started: float
    ended: float = 0.0
    status: int | None = None
    retry_after: str | None = None
    predictions: list[Any] | None = None
    error: str | None = None


@dataclass
class JobRun:
    """One bulk job: created (or refused), then polled to its end."""

    texts: list[str]
    created: float
    status: int | None = None  # POST /jobs
    id: str | None = None
    ended: str | None = None  # finished, failed, canceled, or "gone" (404: lost)
    ended_at: float | None = None  # when the poll saw it end
    error: str | None = None
    predictions: list[Any] | None = None


@dataclass
class Fault:
    name: str
    at: float
    healed: float
    detail: str = ""
    broken: str = ""  # the fault's own promise, where it was broken
    evicts: bool = False  # it emptied the cache: every text cached by its end may be computed once more


@dataclass
class Topology:
    """Redis, a proxy per process, and the processes under a supervisor that restarts what dies."""

    model_dir: Path
    data_dir: Path
    prefix: str = field(default_factory=lambda: f"chaos-{new_id()[:8]}")
    redis_port: int = field(default_factory=free_port)
    redis_proc: subprocess.Popen[bytes] | None = None
    proxies: dict[str, FaultProxy] = field(default_factory=dict)
    api_ports: list[int] = field(default_factory=list)
    supervisor: Supervisor | None = None

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def api_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.api_ports]

    def start(self) -> None:
        self.start_redis()
        self.api_ports = [free_port(), free_port()]
        base = {
            **os.environ,
            "SENTIMENT_MODEL_DIR": str(self.model_dir),
            "SENTIMENT_KEY_PREFIX": self.prefix,
            "SENTIMENT_PRECISION": "fp32",
            "SENTIMENT_TORCH_THREADS": "1",
            "SENTIMENT_LOG_LEVEL": "WARNING",
            "SENTIMENT_METRICS_PORT": "0",
            "SENTIMENT_JOBS_METRICS_PORT": "0",
            "SENTIMENT_GRPC_PORT": "0",  # (two APIs on one machine)
        }
        commands = {
            "api-1": ("api", ("--port", str(self.api_ports[0]))),
            "api-2": ("api", ("--port", str(self.api_ports[1]))),
            "worker-1": ("worker", ()),
            "worker-2": ("worker", ()),
            "jobs-worker": ("jobs-worker", ()),
        }
        children = []
        for name, (command, args) in commands.items():
            self.proxies[name] = FaultProxy(self.redis_port).start()
            env = {**base, "SENTIMENT_REDIS_URL": self.proxies[name].url()}
            children.append(Child(name, command, env, args))
        self.supervisor = Supervisor(children, self._up)
        self.supervisor.start()

    def start_redis(self) -> None:
        self.redis_proc = start_redis_server(self.redis_port, self.data_dir, fsync="always")

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        for proxy in self.proxies.values():
            proxy.close()
        if self.redis_proc is not None:
            self.redis_proc.terminate()
            self.redis_proc.wait(30)

    def child(self, name: str) -> Child:
        assert self.supervisor is not None
        return next(c for c in self.supervisor.children if c.name == name)

    def pid(self, name: str) -> int | None:
        proc = self.child(name).proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def _up(self, child: Child) -> bool:
        assert child.proc is not None
        direct = redis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            if child.command == "api":
                return httpx.get(f"http://127.0.0.1:{child.args[-1]}/health", timeout=2).status_code == 200
            if child.command == "worker":
                return worker_alive_on_this_host(direct, self.prefix, child.proc.pid)
            return jobs_worker_alive_on_this_host(direct, f"{self.prefix}-jobs", child.proc.pid)
        except (httpx.HTTPError, redis.RedisError):
            return False
        finally:
            direct.close()


class Traffic:
    """The load, on an event loop of its own: /predict clients and a job every `JOB_EVERY_S`."""

    def __init__(self, apis: list[str], hot: list[str], fresh: UniqueTexts) -> None:
        self.apis = apis
        self.hot = hot
        self.fresh = fresh
        self.answers: list[Answer] = []
        self.jobs: list[JobRun] = []
        self._stop = threading.Event()
        self._abandon = threading.Event()  # the jobs still running are no longer polled to their end
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="chaos-load", daemon=True)
        self._rng = random.Random(7)

    def start(self) -> None:
        self._thread.start()

    def stop(self, wait_for_jobs: bool = True) -> None:
        """Stop the load, then wait for every accepted job to end (unless told not to: a Ctrl-C)."""
        if not wait_for_jobs:
            self._abandon.set()
        self._stop.set()
        self._thread.join(JOB_END_WAIT_S + 60)

    def recovered_at(self, healed: float) -> float | None:
        """When the first request sent at or after `healed` (unix s) was answered 200; None: none yet."""
        first = None
        for answer in reversed(self.answers):  # (in the order they ended)
            if answer.ended < healed:
                break
            if answer.status == 200 and answer.started >= healed:
                first = answer.ended
        return first

    def settled(self, fault: Fault) -> bool:
        """Whether `fault` was seen to heal `SETTLE_S` ago (`recovered_at`), or had twice its
        `RECOVERY_S` to (the check then finds it late): the next may come."""
        seen, now = self.recovered_at(fault.healed), time.time()
        return (seen is not None and now >= seen + SETTLE_S) or now >= fault.healed + 2 * RECOVERY_S

    def texts(self, low: int, high: int) -> list[str]:
        count = self._rng.randint(low, high)
        return [self._rng.choice(self.hot) if self._rng.random() < 0.5 else self.fresh.take()[0] for _ in range(count)]

    async def _main(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)  # a killed API's clients reconnect elsewhere
        async with httpx.AsyncClient(timeout=DEADLINE_S + 5, limits=limits) as client:
            await asyncio.gather(
                *(self._predicting(client, n) for n in range(CLIENTS)), self._probing(client), self._jobs(client)
            )

    async def _predicting(self, client: httpx.AsyncClient, number: int) -> None:
        """A client of its own: each request once the last is answered."""
        for turn in itertools.count(number):
            if self._stop.is_set():
                return
            await self._ask(client, turn)

    async def _probing(self, client: httpx.AsyncClient) -> None:
        """A request every `PROBE_EVERY_S`, whatever the answers: when a fault holds every client's
        request (a killed worker's batch, until its death is seen), requests are still sent after it
        heals, and its recovery is timed on them."""
        sent: set[asyncio.Task[None]] = set()
        for turn in itertools.count():
            if self._stop.is_set():
                break
            task = asyncio.create_task(self._ask(client, turn))
            sent.add(task)
            task.add_done_callback(sent.discard)
            await asyncio.sleep(PROBE_EVERY_S)
        await asyncio.gather(*sent)

    async def _ask(self, client: httpx.AsyncClient, turn: int) -> None:
        """One /predict of 1-4 texts, to the API whose `turn` it is, or the other if that one refuses
        the connection."""
        texts = self.texts(1, 4)
        for api in (self.apis[turn % 2], self.apis[(turn + 1) % 2]):
            answer = Answer(api, texts, time.time())
            try:
                response = await client.post(f"{api}/predict", json={"text": texts})
            except httpx.ConnectError:
                continue  # never accepted: the other API, as a load balancer would
            except httpx.HTTPError as exc:
                answer.error = f"{type(exc).__name__}: {exc}"
            else:
                answer.status, answer.retry_after = response.status_code, response.headers.get("retry-after")
                if response.status_code == 200:
                    answer.predictions = response.json()["predictions"]
            answer.ended = time.time()
            self.answers.append(answer)
            return
        await asyncio.sleep(0.05)  # both APIs down at once: not a request

    async def _jobs(self, client: httpx.AsyncClient) -> None:
        polling: list[JobRun] = []
        next_job = time.monotonic()
        give_up = float("inf")
        while not self._stop.is_set() or (polling and not self._abandon.is_set() and time.monotonic() < give_up):
            if self._stop.is_set() and give_up == float("inf"):
                give_up = time.monotonic() + JOB_END_WAIT_S
            if not self._stop.is_set() and time.monotonic() >= next_job:
                next_job += JOB_EVERY_S
                polling += await self._create(client)
            for job in list(polling):
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.get(f"{self.apis[0]}/jobs/{job.id}")
                    if response.status_code == 404:
                        job.ended = "gone"
                    elif response.status_code == 200 and (view := response.json())["status"] in (
                        "finished",
                        "failed",
                        "canceled",
                    ):
                        job.ended, job.error, job.predictions = (
                            view["status"],
                            view.get("error"),
                            view.get("predictions"),
                        )
                    if job.ended is not None:
                        job.ended_at = time.time()
                        polling.remove(job)
            await asyncio.sleep(0.5)

    async def _create(self, client: httpx.AsyncClient) -> list[JobRun]:
        job = JobRun(self.texts(10, 60), time.time())
        self.jobs.append(job)
        for api in self.apis:
            try:
                response = await client.post(f"{api}/jobs", json={"text": job.texts})
            except httpx.HTTPError as exc:
                job.error = f"{type(exc).__name__}: {exc}"
                continue
            job.status, job.error = response.status_code, None
            if response.status_code == 202:
                job.id = response.json()["job_id"]
                return [job]
            return []
        return []


class Faults:
    """The faults, each a method that returns once it has healed (its `Fault` says when)."""

    def __init__(self, topology: Topology) -> None:
        self.t = topology
        self.direct = redis.Redis.from_url(topology.redis_url, socket_timeout=5)
        self.keys = Keys(topology.prefix)

    def schedule(self) -> list[Callable[[], Fault]]:
        return [
            self.kill_worker,
            self.garbage_work_items,
            self.kill_api,
            self.reset_connections,
            self.kill_redis,
            self.garbage_heartbeat,
            self.blackhole,
            self.kill_jobs_worker,
            self.latency,
            self.silence,
            self.full_redis,
        ]

    def kill_worker(self) -> Fault:
        return self._kill("worker-2", "worker SIGKILL")

    def kill_api(self) -> Fault:
        return self._kill("api-2", "API process SIGKILL")

    def kill_jobs_worker(self) -> Fault:
        return self._kill("jobs-worker", "jobs worker SIGKILL")

    def kill_redis(self) -> Fault:
        at = time.time()
        assert self.t.redis_proc is not None
        self.t.redis_proc.kill()
        self.t.redis_proc.wait(10)
        time.sleep(2.0)
        self.t.start_redis()  # (returns once it answers PING: the append-only file is loaded)
        return Fault("Redis SIGKILL, restart after 2 s", at, time.time())

    def blackhole(self) -> Fault:
        at = time.time()
        self._all(lambda p: p.blackhole(True))
        time.sleep(5.0)
        self._all(lambda p: p.blackhole(False))
        return Fault("5 s blackhole", at, time.time())

    def latency(self) -> Fault:
        at = time.time()
        self._all(lambda p: p.delay(0.2))
        time.sleep(10.0)
        self._all(lambda p: p.delay(0.0))
        return Fault("200 ms latency for 10 s", at, time.time())

    def reset_connections(self) -> Fault:
        at = time.time()
        self._all(FaultProxy.reset)
        return Fault("every connection reset", at, time.time())

    def silence(self) -> Fault:
        """Every open connection goes silent; the processes are to notice within the Redis timeout."""
        at = time.time()
        self._all(FaultProxy.silence)
        noticed = REDIS_TIMEOUT_S + HEALTH_CHECK_S  # (a quiet subscription is PINGed once a HEALTH_CHECK_S)
        return Fault("every open connection silent", at, at + noticed, f"healed: {noticed:g} s later")

    def garbage_heartbeat(self) -> Fault:
        at = time.time()
        ttl_ms = int(Settings().heartbeat_ttl_s * 1000)
        pipe = self.direct.pipeline()
        for status in live_workers(self.direct, self.t.prefix)[:1]:  # a live worker's, until its next beat
            pipe.set(self.keys.heartbeat(status.id), b"\x00 not a heartbeat", px=ttl_ms)
        pipe.sadd(self.keys.workers, "no-such-worker")
        pipe.set(self.keys.heartbeat("no-such-worker"), b'{"id": 1}', px=ttl_ms)
        pipe.execute()
        return Fault("garbage heartbeats", at, time.time())

    def garbage_work_items(self) -> Fault:
        at = time.time()
        item = WorkItem(new_id(), ["fine"], at, at + DEADLINE_S, "nobody").encode()
        wrong = item.replace(b'"texts":["fine"]', b'"texts":[1,2]')
        self.direct.lpush(self.keys.queue, b"\xff not json", wrong)
        return Fault("garbage work items", at, time.time())

    def full_redis(self) -> Fault:
        """Redis at its maxmemory (`volatile-lru`, as shipped), full of state: the cache evicted (what
        the limit evicts first, gone at once), the room left a little above what it held once a job
        larger than that room was queued. The load's cache misses fill it (evicting each other), the
        big job fails saying its predictions did not fit, then queued jobs fill it until refused (503)
        for `FULL_S`; then the limit is lifted and the fault's jobs deleted."""
        at = time.time()
        api, refused = self.t.api_urls[0], 0
        fillers: list[str] = []
        big = self._job(api, FULL_BIG_TEXTS)
        if cached := list(self.direct.scan_iter(f"{self.keys.prefix}:cache:*", count=1000)):
            self.direct.unlink(*cached)
        self.direct.config_set("maxmemory-policy", "volatile-lru")
        self.direct.config_set("maxmemory", self.direct.info("memory")["used_memory"] + FULL_ROOM_B)
        try:
            ended = self._ended(api, big) if big else {"status": "refused"}
            while refused < 3 and len(fillers) < 100:
                if job_id := self._job(api, FULL_FILLER_TEXTS):
                    fillers.append(job_id)
                else:
                    refused += 1
            time.sleep(FULL_S)
        finally:
            self.direct.config_set("maxmemory", 0)
        for job_id in [*fillers, *([big] if big else [])]:
            for _ in range(2):  # cancel, then delete
                with contextlib.suppress(httpx.HTTPError):
                    httpx.delete(f"{api}/jobs/{job_id}", timeout=DEADLINE_S)
        fits = ended.get("status") == "failed" and "did not fit" in ended.get("error", "")
        detail = (
            f"{len(fillers)} jobs queued, then {refused} refused; the job larger than the room: {ended.get('status')}"
        )
        return Fault(
            "Redis full", at, time.time(), detail, "" if fits else f"the job larger than the room: {ended}", evicts=True
        )

    def _job(self, api: str, texts: int) -> str | None:
        """A job of `texts` new texts (that compress little) queued; its id, or None where refused."""
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.post(
                f"{api}/jobs", json={"text": [f"a review {new_id()}" for _ in range(texts)]}, timeout=DEADLINE_S
            )
            if response.status_code == 202:
                return str(response.json()["job_id"])
        return None

    def _ended(self, api: str, job_id: str, wait_s: float = 60.0) -> dict[str, Any]:
        """The job's view once it ended (or as it stood after `wait_s`)."""
        view: dict[str, Any] = {}
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                view = httpx.get(f"{api}/jobs/{job_id}", timeout=DEADLINE_S).json()
                if view.get("status") in ("finished", "failed", "canceled"):
                    return view
            time.sleep(0.5)
        return view

    def _kill(self, name: str, what: str) -> Fault:
        at = time.time()
        pid = self.t.pid(name)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        return Fault(what, at, at, f"pid {pid}")

    def _all(self, action: Callable[[FaultProxy], None]) -> None:
        for proxy in self.t.proxies.values():
            action(proxy)


def rss_kib(pid: int | None) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, TypeError):
        return None
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))


def left_behind(prefix: str) -> list[int]:
    """Processes still running with this run's key prefix in their environment."""
    marker = f"SENTIMENT_KEY_PREFIX={prefix}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def expected_scores(model_dir: Path, texts: list[str]) -> dict[str, list[float]]:
    """Each pool text's label probabilities from the model run here, as the workers run it (fp32);
    a text with trailing whitespace (`UniqueTexts`' later rounds) tokenizes, so scores, the same.
    Batched in order of length, so that little of each batch is padding."""
    from model_store.classifier import Classifier

    classifier = Classifier(model_dir, "cpu", precision="fp32")
    scores: dict[str, list[float]] = {}
    by_length = sorted(texts, key=len)
    for start in range(0, len(by_length), 64):
        chunk = by_length[start : start + 64]
        for text, p in zip(chunk, classifier.forward(classifier.tokenize(chunk)), strict=True):
            scores[text] = [s["score"] for s in prediction(classifier.labels, p)]
    return scores


def run(
    model_dir: Path, data: Path, duration_s: float, out: Path | None = None, doc: Path | None = None
) -> dict[str, Any]:
    """Run the chaos for `duration_s` and check everything; the results (also written to `out`). A
    Ctrl-C ends the run there: what happened so far is checked and written, no doc ("interrupted")."""
    if out is not None:
        results_dir(out, "chaos")
    if doc is not None:
        writable_file(doc, "--doc", "sentiment chaos")
    pool = load_texts(data, HOT_TEXTS + 1)  # the hot texts, and new ones
    random.Random(11).shuffle(pool)
    pool = pool[:POOL_TEXTS]
    expected = expected_scores(model_dir, pool)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="chaos-redis-") as data_dir:
        topology = Topology(model_dir, Path(data_dir))
        faults: list[Fault] = []
        memory: dict[str, dict[str, int | None]] = {}
        interrupted = False
        try:
            topology.start()
            with CacheWrites(topology.redis_url, topology.prefix) as writes:
                traffic = Traffic(topology.api_urls, pool[:HOT_TEXTS], UniqueTexts(pool[HOT_TEXTS:]))
                traffic.start()
                chaos = Faults(topology)
                schedule = chaos.schedule() * (2 if duration_s >= 300 else 1)
                gap_s = duration_s / (len(schedule) + 1)
                begun = time.monotonic()
                base_at = min(MEMORY_BASE_S, duration_s / 3)
                try:
                    for n, fault in enumerate(schedule, 1):
                        due = begun + n * gap_s  # on schedule, but never before the last fault has settled
                        while time.monotonic() < due or (faults and not traffic.settled(faults[-1])):
                            if "base" not in memory and time.monotonic() - begun >= base_at:
                                memory["base"] = {name: rss_kib(topology.pid(name)) for name in ("api-1", "worker-1")}
                            time.sleep(0.1)
                        faults.append(fault())
                        print(f"chaos: {faults[-1].name} at {faults[-1].at - started:.0f} s", file=sys.stderr)
                    while time.monotonic() < begun + duration_s or not traffic.settled(faults[-1]):
                        time.sleep(0.1)
                except KeyboardInterrupt:  # the run so far is checked and kept
                    interrupted = True
                memory["end"] = {name: rss_kib(topology.pid(name)) for name in ("api-1", "worker-1")}
                traffic.stop(wait_for_jobs=not interrupted)
                time.sleep(1.0)  # the last cache writes reach MONITOR
        finally:
            topology.stop()
        behind = left_behind(topology.prefix)
        for pid in behind:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    results = check(traffic, faults, expected, writes, behind, memory)
    results |= {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": duration_s,
        "interrupted": interrupted,
        "machine": machine.describe("cpu"),
    }
    if out is not None:
        path = out / f"chaos-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(started))}.json"
        path.write_text(json.dumps(results, indent=1) + "\n")
        results["results_file"] = str(path)
        if doc is not None and not interrupted:
            replace_block(doc, "chaos", markdown(results, path.name))
    return results


def check(
    traffic: Traffic,
    faults: list[Fault],
    expected: dict[str, list[float]],
    writes: CacheWrites,
    behind: list[int],
    memory: dict[str, dict[str, int | None]],
) -> dict[str, Any]:
    """Every invariant of the module's docstring, on what happened: its violations, counted, and a few shown."""
    answers, jobs = traffic.answers, [j for j in traffic.jobs if j.status == 202]
    api_kills = [f for f in faults if f.name.startswith("API")]

    def wrong(predictions: list[Any] | None, texts: list[str]) -> bool:
        if predictions is None or len(predictions) != len(texts):
            return True
        return not all(
            [s["label"] for s in p] == ["NEGATIVE", "POSITIVE"]
            and all(abs(s["score"] - e) <= SCORE_TOLERANCE for s, e in zip(p, expected[t.rstrip()], strict=True))
            for p, t in zip(predictions, texts, strict=True)
        )

    def held_by_killed_api(a: Answer) -> bool:
        """Sent to the API process killed while it was in flight (the process dies a moment after its SIGKILL)."""
        return a.api == traffic.apis[1] and any(a.started <= f.at + KILL_TAKES_S and a.ended >= f.at for f in api_kills)

    def asked(digest: str) -> list[tuple[float, float | None]]:
        """When the requests and jobs that asked for a text began and ended (unix s, as the faults')."""
        return [(start, end) for start, end, texts in _spans(answers, jobs) if digest in map(text_digest, texts)]

    def evicted_meanwhile(j: JobRun) -> bool:
        """It ran while a fault emptied the cache: a full Redis evicts ended jobs too (404 early)."""
        return any(f.evicts and j.created <= f.healed and (j.ended_at or f.at) >= f.at for f in faults)

    recovery = [None if (at := traffic.recovered_at(f.healed)) is None else round(at - f.healed, 2) for f in faults]
    growth = {
        name: round(end / base - 1, 3)
        if (base := memory.get("base", {}).get(name)) and (end := memory.get("end", {}).get(name))
        else None
        for name in ("api-1", "worker-1")
    }
    violations: dict[str, list[Any]] = {
        "200 with a wrong answer": [a for a in answers if a.status == 200 and wrong(a.predictions, a.texts)],
        "refusal that is not 503 + Retry-After or 504": [
            a for a in answers if a.status not in (None, 200, 504) and not (a.status == 503 and a.retry_after)
        ],
        "answer later than the deadline + 1 s": [a for a in answers if a.ended - a.started > DEADLINE_S + 1],
        "no answer, not held by a killed API": [a for a in answers if a.status is None and not held_by_killed_api(a)],
        "accepted job not finished right nor failed with a reason": [
            j
            for j in jobs
            if not (
                (j.ended == "finished" and not wrong(j.predictions, j.texts))
                or (j.ended == "failed" and j.error)
                or (j.ended == "gone" and evicted_meanwhile(j))
            )
        ],
        "fault not followed by a 200 within 3 s": [
            f for f, r in zip(faults, recovery, strict=True) if r is None or r > RECOVERY_S
        ],
        "fault's own promise broken": [f for f in faults if f.broken],
        "process left behind": behind,
        "memory grown more than 10% since the warm-up, or not measured": [
            n for n, g in growth.items() if g is None or g > MEMORY_GROWTH
        ],
        "text computed more often than raced for or put back by a fault": [
            found | {"written": writes.written[found["text"]], "asked": asked(found["text"])}
            for found in computed_past_put_back(writes.counts, writes.first_written, answers, traffic.jobs, faults)
        ],
    }
    invariants = {name: len(found) for name, found in violations.items()}
    return {
        "invariants": invariants,
        "passed": not any(invariants.values()),
        "requests": len(answers),
        "statuses": _statuses(answers),
        "jobs": {
            "accepted": len(jobs),
            "finished": sum(j.ended == "finished" for j in jobs),
            "refused": sum(j.status != 202 for j in traffic.jobs),
        },
        "texts_computed_more_than_once": len(writes.computed_more_than_once()),
        "faults": [
            {
                **asdict(f),
                "recovery_s": r,
                "answers_meanwhile": _statuses(a for a in answers if f.at <= a.ended <= f.healed + RECOVERY_S),
            }
            for f, r in zip(faults, recovery, strict=True)
        ],
        "memory_kib": memory,
        "memory_growth": growth,
        "examples": {name: [_brief(v) for v in found[:3]] for name, found in violations.items() if found},
    }


def computed_past_put_back(
    computed: dict[str, int],
    first_written: dict[str, float],
    answers: list[Answer],
    jobs: list[JobRun],
    faults: list[Fault],
) -> list[dict[str, Any]]:
    """The texts computed (`CacheWrites`) more often than the run put them back: once each, once more
    for each further request or job that asked for one before its first cache write (racing for a
    text not cached yet, each queues it, and two workers may each take one), and once more for each
    fault during a request or job that asks for it (a push whose reply the fault lost is sent once
    more, `core.redis_connect.link_options`, so the item is queued twice; a job a fault cut runs
    again, RQ's retry; bulk work a fault held past its deadline is queued again; and the two copies
    may meet in two workers), and once more for each fault that emptied the cache after it was first
    written. A killed worker adds none: the worker that reclaims its work finds what it wrote in the
    cache, and computes what it computed without writing, the one write of those texts."""
    raced: Counter[str] = Counter()
    for at, texts in [*((a.started, a.texts) for a in answers), *((j.created, j.texts) for j in jobs)]:
        raced.update(d for d in map(text_digest, texts) if at < first_written.get(d, float("-inf")))
    spans = _spans(answers, jobs)
    cut: Counter[str] = Counter()
    for fault in faults:
        for started, ended, texts in spans:
            if started <= fault.healed and (ended is None or ended >= fault.at):
                cut.update(map(text_digest, texts))
    for fault in faults:
        if fault.evicts:
            cut.update(d for d, at in first_written.items() if at <= fault.healed)
    return [
        {"text": digest, "computed": n, "bound": bound}
        for digest, n in computed.items()
        if n > (bound := max(raced[digest], 1) + cut[digest])
    ]


def _spans(answers: list[Answer], jobs: list[JobRun]) -> list[tuple[float, float | None, list[str]]]:
    """(began, ended: None while unknown, texts) of each request, and of each job that may have been
    accepted (202, or None: its POST got no answer)."""
    return [(a.started, a.ended, a.texts) for a in answers] + [
        (j.created, j.ended_at, j.texts) for j in jobs if j.status in (202, None)
    ]


def _statuses(answers: Iterable[Answer]) -> dict[str, int]:
    """How many answers of each status ("no answer": the connection failed)."""
    counts: dict[str, int] = {}
    for a in answers:
        key = str(a.status) if a.status is not None else "no answer"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _brief(violation: Any) -> Any:
    """A violation as the results file shows it: without the predictions."""
    if isinstance(violation, Answer | JobRun | Fault):
        return {k: v for k, v in asdict(violation).items() if k != "predictions"}
    return violation


def markdown(results: dict[str, Any], results_file: str) -> str:
    """The table docs/reliability.md shows."""
    first = results["faults"][0]["at"] if results["faults"] else 0
    memory = ", ".join(
        f"{name} {base / 1024:.0f} -> {end / 1024:.0f} MB"
        for name in ("api-1", "worker-1")
        if (base := results["memory_kib"].get("base", {}).get(name)) and (end := results["memory_kib"]["end"].get(name))
    )
    machine = results.get("machine", {})
    lines = [
        f"Run of {results['started']}, {results['duration_s'] / 60:g} minutes on {machine.get('cores', '?')} cores "
        f"({machine.get('cpu', '?')}) ([results](../benchmarks/results/{results_file})): "
        f"{results['requests']:,} /predict requests ({_counts(results['statuses'])}); "
        f"{results['jobs']['accepted']} jobs accepted, {results['jobs']['finished']} finished; "
        f"{results['texts_computed_more_than_once']} distinct texts computed more than once; memory from the "
        f"warm-up's end to the end: {memory}.",
        "",
        "| fault | at | healed -> first 200 | answers from the fault to 3 s after it healed |",
        "| --- | --- | --- | --- |",
        *(
            f"| {f['name']} | {f['at'] - first:.0f} s | {f['recovery_s']} s | {_counts(f['answers_meanwhile'])} |"
            for f in results["faults"]
        ),
        "",
        "| invariant | violations |",
        "| --- | --- |",
        *(f"| {name} | {count} |" for name, count in results["invariants"].items()),
    ]
    return "\n".join(lines)


def _counts(statuses: dict[str, int]) -> str:
    return ", ".join(f"{n:,} x {status}" for status, n in statuses.items())
