"""Benchmark `goodput`: open-loop load past saturation, every request due within `DEADLINE_S`, under
both overload policies side by side.

First the in-time capacity C: closed loops of `CAPACITY_CLIENTS` clients (one never-seen text a
request, no deadline), the best rate whose p99 is within `DEADLINE_S`: what the box can answer in
time. The saturation rate is the best of them, whatever its p99 (on a GPU the rate still grows past
64 clients, latency-bound, where a CPU's is flat from 32). Then, for each policy
(`SENTIMENT_OVERLOAD_POLICY`) on fresh processes (`api_processes` APIs side by side, one model
worker, one jobs worker):
requests at `MULTIPLES` of that rate, sent open loop (at a constant rate, whatever the answers),
each with `X-Request-Timeout: DEADLINE_S` and given up by its client after as long. Each point
reports the goodput (answers within the deadline a second), the p99 of the refusals, and the share
of the interactive texts the model computed for requests nobody collected (abandoned, or answered
past their deadline: the API's `sentiment_replies_unclaimed_total` against the worker's
`sentiment_batch_size_sum` less its `sentiment_bulk_texts_total`, the bulk job's texts; a refused
request is never computed). Each point also reports the refusals' p99 as the API timed them (the
bound of its request-duration histogram's bucket: the client's own figure holds its scheduling
delays on shared cores too), the cores each process used, and the API's CPU and answers by status
(`_api_cost`, as for each closed loop and k6 point). Then the lowest multiple again with a bulk job
of `JOB_TEXTS` texts running beside it: the interactive p99 against the same point alone. For the
`deadline` policy, k6's `constant-arrival-rate` (k6/goodput.js) at `HELD_MULTIPLES`, those held to
C: the same question asked by an independent load generator. Last, the API's CPU a refusal alone
(`_refusals`): at the 3x rate, an API that refuses every request.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from benchmarks.cancel import counters
from benchmarks.ceiling import cpu_seconds
from benchmarks.loadgen import OpenLoopResult, closed_loop, open_loop
from benchmarks.loadtest import k6_command
from benchmarks.processes import Processes, running
from benchmarks.service import KEY_PREFIX, redis_server, service_env
from benchmarks.targets import HELD_MULTIPLES
from benchmarks.workload import UniqueTexts
from core.protocol import Keys, WorkerStatus, WorkItem
from sentiment.embedded import free_port

MULTIPLES = (0.5, 1.0, 1.5, 2.0, 3.0)
DEADLINE_S = 1.0
POLICIES = ("deadline", "queue-length")
CAPACITY_CLIENTS = (8, 16, 32, 64, 128)
REFUSAL_BACKLOG = 1000  # the queued items `_refusals`' API sees: over 1,000 s at a text a second
K6_MIN_S = 1.0  # k6's shortest scenario
MIN_SATURATION_S = 2.0
JOB_TEXTS = 10_000
QUICK_JOB_TEXTS = 200  # `--quick`: the structure, not the measure
REQUEST_BUCKETS = "sentiment_http_request_duration_seconds_bucket"  # the API's timing of each request
REQUESTS_TIMED = "sentiment_http_request_duration_seconds_count"  # the requests it answered
SETTLE_POLL_S = 0.5
SETTLE_MAX_S = 60.0
COUNTERS = (
    "sentiment_replies_unclaimed_total",  # API: results nobody collected
    "sentiment_batch_size_sum",  # worker: texts computed
    "sentiment_bulk_texts_total",  # worker: of them, for bulk work alone (a job's, not interactive)
    "sentiment_work_items_late_total",  # worker: dropped at the plan, late
    "sentiment_work_items_expired_total",  # worker: past their deadline when taken
)
Progress = Callable[[str, Mapping[str, object]], None]


@dataclass(frozen=True)
class Service:
    """The processes of one policy's service: the APIs' URLs and /metrics, the model worker's
    /metrics, and the pids of each kind of process (the APIs', the model worker's, the jobs worker's)."""

    urls: list[str]
    api_metrics: list[str]
    worker_metrics: str
    pids: dict[str, list[int]]

    @property
    def scraped(self) -> list[str]:
        """Every /metrics whose counters the points read."""
        return [*self.api_metrics, self.worker_metrics]


def measure(
    texts: UniqueTexts,
    progress: Progress,
    model_dir: Path,
    device: str,
    worker_env: dict[str, str],
    duration_s: float,
    warmup_s: float,
    job_texts: int = JOB_TEXTS,
    k6_data: Path | None = None,
    api_processes: int = 1,
) -> dict[str, object]:
    """The in-time capacity and the saturation rate, then each policy's points, its point beside a
    bulk job, and (the `deadline` policy's) k6's points; `k6_data`: the sentences k6 sends;
    `api_processes`: API replicas sharing the model worker (a GPU worker outruns one)."""
    capacity: dict[str, Any] | None = None
    saturation = 0.0
    policies: dict[str, object] = {}
    for policy in POLICIES:
        with _service(model_dir, device, worker_env, policy, api_processes) as service:
            if capacity is None:
                capacity = _capacity(service, texts, duration_s, warmup_s)
                saturation = capacity["saturation_texts_per_s"]
                progress("goodput", capacity)
            points = [
                _point(service, texts, multiple * saturation, duration_s, warmup_s)
                | {"multiple": multiple, "policy": policy}
                for multiple in MULTIPLES
            ]
            for point in points:
                progress("goodput", point)
            beside = _beside_job(service, texts, MULTIPLES[0] * saturation, duration_s, warmup_s, job_texts)
            beside["p99_ratio_to_alone"] = _ratio(beside["p99_ms"], points[0]["p99_ms"])
            progress("goodput", {"policy": policy, "beside_job": True, **beside})
            run: dict[str, object] = {
                "points": points,
                "beside_job": beside,
                "peak_goodput_per_s": _peak(points),
            }
            if policy == "deadline":
                run["k6"] = [
                    _k6_point(service, multiple * saturation, duration_s, k6_data) | {"multiple": multiple}
                    for multiple in HELD_MULTIPLES
                ]
                progress("goodput", {"policy": policy, "k6": run["k6"]})
            policies[policy] = run
    refusals = _refusals(model_dir, MULTIPLES[-1] * saturation, duration_s, warmup_s)
    progress("goodput", refusals)
    return {
        "deadline_s": DEADLINE_S,
        "api_processes": api_processes,
        "capacity": capacity,
        "refusals": refusals,
        "saturation_clients": capacity["saturation_clients"] if capacity else None,
        "saturation_texts_per_s": round(saturation, 2),
        "multiples": list(MULTIPLES),
        "job_texts": job_texts,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "policies": policies,
    }


@contextlib.contextmanager
def _service(
    model_dir: Path, device: str, worker_env: dict[str, str], policy: str, api_processes: int
) -> Iterator[Service]:
    """`api_processes` APIs, one model worker and one jobs worker on a fresh Redis, under `policy`."""
    with running() as infra, redis_server(infra) as (redis_url, _), running() as procs:
        env = service_env(redis_url, model_dir, SENTIMENT_DEVICE=device, SENTIMENT_OVERLOAD_POLICY=policy)
        apis, worker_port = [_start_api(procs, env) for _ in range(api_processes)], free_port()
        worker = procs.start(
            ["-m", "sentiment.cli", "worker"], {**env, **worker_env, "SENTIMENT_METRICS_PORT": str(worker_port)}
        )
        jobs = procs.start(["-m", "sentiment.cli", "jobs-worker"], {**env, "SENTIMENT_JOBS_METRICS_PORT": "0"})
        urls = [url for url, _ in apis]
        service = Service(
            urls,
            [f"{url}/metrics" for url in urls],
            f"http://127.0.0.1:{worker_port}/metrics",
            {"api": [api.pid for _, api in apis], "model_worker": [worker.pid], "jobs_worker": [jobs.pid]},
        )
        procs.wait_ok(service.worker_metrics)
        for url in urls:
            procs.wait_ok(f"{url}/ready")
        yield service


def _start_api(procs: Processes, env: dict[str, str]) -> tuple[str, subprocess.Popen[bytes]]:
    """A `sentiment api` on a free port: its URL and process."""
    port = free_port()
    return f"http://127.0.0.1:{port}", procs.start(["-m", "sentiment.cli", "api", "--port", str(port)], env)


def _refusals(model_dir: Path, rate_per_s: float, duration_s: float, warmup_s: float) -> dict[str, object]:
    """What a refusal costs the API, apart from any other request: an API alone on a Redis of its own,
    whose one (absent) worker's heartbeat says it computes a text a second behind `REFUSAL_BACKLOG`
    queued items, sent `rate_per_s` requests a second open loop, each due within the deadline: every
    one is refused, or given up by its client where the rate is past what the API refuses in time (a
    tiny model's). The model idles meanwhile, so its cores leave the API's caches warm."""
    with running() as infra, redis_server(infra) as (redis_url, _), running() as procs:
        env = service_env(redis_url, model_dir, SENTIMENT_OVERLOAD_POLICY="deadline")
        keys, fake = Keys(KEY_PREFIX), redis.Redis.from_url(redis_url)
        worker = WorkerStatus(
            id="absent", host="-", pid=0, model_version="-", started_at=0.0, texts_per_s=1.0, forward_s=0.1
        )
        fake.sadd(keys.workers, worker.id)
        fake.set(keys.heartbeat(worker.id), worker.encode())
        item = WorkItem(id="-", texts=["-"], enqueued_at=0.0, deadline=0.0, reply_to="-").encode()
        fake.lpush(keys.queue, *[item] * REFUSAL_BACKLOG)
        url, api = _start_api(procs, env)
        procs.wait_ok(f"{url}/health")
        with _api_cost([api.pid], [f"{url}/metrics"]) as cost:
            load = _due_open_loop([url], UniqueTexts(["a sentence nobody computes"]), rate_per_s, duration_s, warmup_s)
        return {**load.as_dict(), **cost}


def _capacity(service: Service, texts: UniqueTexts, duration_s: float, warmup_s: float) -> dict[str, Any]:
    """Closed loops of each of `CAPACITY_CLIENTS` clients, at least `MIN_SATURATION_S` after a
    second's warm-up at least (the first forwards are slow): the saturation rate (the best of them)
    and the in-time capacity C (the best rate whose p99 is within the deadline;
    None when none is)."""
    points: list[dict[str, Any]] = []
    for clients in CAPACITY_CLIENTS:
        with _api_cost(service.pids["api"], service.api_metrics) as cost:
            load = closed_loop(
                [f"{url}/predict" for url in service.urls],
                lambda _: texts.take(1),
                clients,
                max(duration_s, MIN_SATURATION_S),
                max(warmup_s, 1.0),
            )
        if not load.texts:
            raise RuntimeError(f"no answer from a closed loop of {clients} clients ({load.errors} errors)")
        points.append({**load.as_dict(), **cost})
    in_time = [p["texts_per_s"] for p in points if (p["p99_ms"] or 0.0) <= DEADLINE_S * 1000]
    saturation = max(points, key=lambda p: p["texts_per_s"])
    return {
        "points": points,
        "saturation_clients": saturation["concurrency"],
        "saturation_texts_per_s": saturation["texts_per_s"],
        "in_time_texts_per_s": max(in_time) if in_time else None,
    }


def _point(
    service: Service, texts: UniqueTexts, rate_per_s: float, duration_s: float, warmup_s: float
) -> dict[str, object]:
    """One open-loop point and what the model computed meanwhile (counted until the last request's
    deadline has passed, so that work finished for nobody after the load counts too)."""
    before, refusals_before = counters(*service.scraped, names=COUNTERS), _refusal_times(service.api_metrics)
    with _api_cost(service.pids["api"], service.api_metrics) as cost:  # the point and its settling, warm-up included
        cpu_before, started = {k: _cpu(pids) for k, pids in service.pids.items()}, time.monotonic()
        load = _due_open_loop(service.urls, texts, rate_per_s, duration_s, warmup_s)
        elapsed = time.monotonic() - started
        cores = {k: round((_cpu(pids) - cpu_before[k]) / elapsed, 3) for k, pids in service.pids.items()}
        _settle(service.api_metrics)
    moved = {k: v - before[k] for k, v in counters(*service.scraped, names=COUNTERS).items()}
    # Interactive texts only: a job's texts run through the same model worker, and are never for nobody.
    computed = moved["sentiment_batch_size_sum"] - moved["sentiment_bulk_texts_total"]
    wasted = moved["sentiment_replies_unclaimed_total"]
    return {
        **load.as_dict(),
        "refusal_p99_ms_at_api": _p99_bound_ms(refusals_before, _refusal_times(service.api_metrics)),
        "cores": {**cores, "client": round(load.client_cpu_share, 3)},
        **cost,
        "computed_texts": int(computed),
        "texts_for_nobody": int(wasted),
        "share_for_nobody": round(wasted / computed, 3) if computed else None,
        "dropped_late": int(moved["sentiment_work_items_late_total"]),
        "expired": int(moved["sentiment_work_items_expired_total"]),
    }


def _due_open_loop(
    urls: list[str], texts: UniqueTexts, rate_per_s: float, duration_s: float, warmup_s: float
) -> OpenLoopResult:
    """/predict at `rate_per_s` open loop over the APIs at `urls`, one never-seen text a request, each
    due within the deadline (`X-Request-Timeout`) and given up by its client once it has passed."""
    headers = {"X-Request-Timeout": f"{DEADLINE_S:g}"}
    predict = [f"{url}/predict" for url in urls]
    return open_loop(predict, lambda _: texts.take(1), rate_per_s, duration_s, warmup_s, DEADLINE_S, headers)


def _cpu(pids: list[int]) -> float:
    """The CPU seconds the processes `pids` have used."""
    return sum(cpu_seconds(pid) for pid in pids)


def _settle(metrics_urls: list[str]) -> None:
    """Wait until the next point can start on an idle service: the backlog's deadlines have passed and
    the APIs (/metrics at `metrics_urls`) have answered every /predict they were sent (two reads of their
    count `SETTLE_POLL_S` apart agree, within `SETTLE_MAX_S`). Past saturation on shared cores an API may still answer a point's
    requests seconds after their clients gave up; read by the next point, its refusals would be that
    point's."""
    time.sleep(2 * DEADLINE_S)
    give_up, answered = time.monotonic() + SETTLE_MAX_S, sum(_answered(metrics_urls).values())
    while time.monotonic() < give_up:
        time.sleep(SETTLE_POLL_S)
        if (now := sum(_answered(metrics_urls).values())) == answered:
            return
        answered = now


def _predict_samples(metrics_urls: list[str]) -> Iterator[Sample]:
    """The APIs' timing of their /predict requests so far: their request-duration histograms' samples."""
    for url in metrics_urls:
        for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
            yield from (sample for sample in family.samples if sample.labels.get("route") == "/predict")


def _answered(metrics_urls: list[str]) -> dict[str, float]:
    """The /predict requests the APIs have answered so far, by status."""
    found: dict[str, float] = {}
    for sample in _predict_samples(metrics_urls):
        if sample.name == REQUESTS_TIMED:
            found[sample.labels["status"]] = found.get(sample.labels["status"], 0.0) + sample.value
    return found


@contextlib.contextmanager
def _api_cost(pids: list[int], metrics_urls: list[str]) -> Iterator[dict[str, object]]:
    """The APIs' (processes `pids`, /metrics at `metrics_urls`) CPU seconds over the block, their
    /predict answers by status, and their CPU an answer (us), filled in as the block ends."""
    cpu, answered = _cpu(pids), _answered(metrics_urls)
    found: dict[str, object] = {}
    yield found
    spent = _cpu(pids) - cpu
    moved = {k: int(v - answered.get(k, 0.0)) for k, v in _answered(metrics_urls).items()}
    total = sum(moved.values())
    found["api_cpu_s"] = round(spent, 3)
    found["api_answered"] = {status: n for status, n in moved.items() if n}
    found["api_cpu_us_per_answer"] = round(spent / total * 1e6, 1) if total else None


def _refusal_times(metrics_urls: list[str]) -> dict[float, float]:
    """The APIs' timing of their /predict 503s so far: the count at or under each bucket bound (seconds)."""
    found: dict[float, float] = {}
    for sample in _predict_samples(metrics_urls):
        if sample.name == REQUEST_BUCKETS and sample.labels.get("status") == "503":
            bound = float(sample.labels["le"])
            found[bound] = found.get(bound, 0.0) + sample.value
    return found


def _p99_bound_ms(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The bound (ms) of the bucket that holds the 99th percentile of what was counted between two
    reads of a histogram's buckets; None when nothing was."""
    moved = sorted((bound, count - before.get(bound, 0.0)) for bound, count in after.items())
    total = moved[-1][1] if moved else 0.0
    return next((round(bound * 1000, 3) for bound, count in moved if count >= 0.99 * total), None) if total else None


def _beside_job(
    service: Service, texts: UniqueTexts, rate_per_s: float, duration_s: float, warmup_s: float, job_texts: int
) -> dict[str, object]:
    """The point at `rate_per_s` with a bulk job of `job_texts` never-seen texts submitted as it starts."""
    response = httpx.post(f"{service.urls[0]}/jobs", json={"text": texts.take(job_texts)}, timeout=60)
    response.raise_for_status()
    job = response.json()["job_id"]
    point = _point(service, texts, rate_per_s, duration_s, warmup_s)
    status = httpx.get(f"{service.urls[0]}/jobs/{job}", timeout=10).json()
    return {**point, "job_status_after": status.get("status"), "job_progress_after": status.get("progress")}


def _peak(points: list[dict[str, object]]) -> float:
    return max(float(p["goodput_per_s"]) for p in points)  # type: ignore[arg-type]


def _ratio(value: object, base: object) -> float | None:
    if not isinstance(value, int | float) or not isinstance(base, int | float) or not base:
        return None
    return round(value / base, 3)


def _k6_point(service: Service, rate_per_s: float, duration_s: float, data: Path | None) -> dict[str, object]:
    """k6/goodput.js at `rate_per_s` for `duration_s` (at least k6's 1 s; no warm-up of k6's own), as
    its summary counts the answers: in time, refused, late; then the service settles as after `_point`."""
    duration_s = max(duration_s, K6_MIN_S)
    with tempfile.TemporaryDirectory(prefix="k6-") as tmp:
        summary = Path(tmp) / "summary.json"
        command = k6_command(
            "goodput", ",".join(service.urls), summary, f"{duration_s:g}s", rate=max(1, round(rate_per_s))
        )
        env = {**os.environ, "DEADLINE_S": f"{DEADLINE_S:g}", **({"DATA": str(data)} if data else {})}
        with _api_cost(service.pids["api"], service.api_metrics) as cost:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            ran = subprocess.run(
                command, env=env, check=False, capture_output=True, text=True, timeout=duration_s + 120
            )
            after = resource.getrusage(resource.RUSAGE_CHILDREN)  # (k6 is the only child waited for meanwhile)
            _settle(service.api_metrics)
        if not summary.is_file():
            raise RuntimeError(f"k6 wrote no summary (exit status {ran.returncode}): {ran.stderr.strip()[-300:]}")
        metrics = json.loads(summary.read_text())["metrics"]
    in_time = int(metrics.get("goodput", {}).get("count", 0))
    return {
        "rate_per_s": round(rate_per_s),
        "duration_s": duration_s,
        "sent": int(metrics.get("iterations", {}).get("count", 0)),
        "in_time": in_time,
        "goodput_per_s": round(in_time / duration_s, 2),
        "refused": int(metrics.get("refused", {}).get("count", 0)),
        "late": int(metrics.get("late", {}).get("count", 0)),
        "dropped": int(metrics.get("dropped_iterations", {}).get("count", 0)),  # k6 found no VU free
        "refusal_p99_ms": _rounded(metrics.get("refusal_duration", {}).get("p(99)")),
        "client_cores": round((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / duration_s, 3),
        **cost,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
