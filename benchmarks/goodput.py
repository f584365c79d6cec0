"""Benchmark `goodput`: open-loop load past saturation, every request due within `DEADLINE_S`, under
both overload policies side by side.

The saturation rate is measured first (a closed loop of `SATURATION_CLIENTS` clients, one never-seen
text a request). Then, for each policy (`SENTIMENT_OVERLOAD_POLICY`) on fresh processes (one API,
one model worker, one jobs worker): requests at `MULTIPLES` of that rate, sent open loop (at a
constant rate, whatever the answers), each with `X-Request-Timeout: DEADLINE_S` and given up by its
client after as long. Each point reports the goodput (answers within the deadline a second), the p99
of the refusals, and the share of the interactive texts the model computed for requests nobody
collected (abandoned, or answered past their deadline: the API's `sentiment_replies_unclaimed_total`
against the worker's `sentiment_batch_size_sum` less its `sentiment_bulk_texts_total`, the bulk job's
texts; a refused request is never computed). Each point also reports the refusals' p99 as the API
timed them (the bound of its request-duration histogram's bucket: the client's own figure holds its
scheduling delays on shared cores too) and the cores each process used. Last, the lowest
multiple again with a bulk job of `JOB_TEXTS` texts running beside it: the interactive p99 against
the same point alone.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from benchmarks.cancel import counters
from benchmarks.ceiling import cpu_seconds
from benchmarks.loadgen import closed_loop, open_loop
from benchmarks.processes import running
from benchmarks.service import redis_server, service_env
from benchmarks.workload import UniqueTexts
from sentiment.embedded import free_port

MULTIPLES = (0.5, 1.0, 1.5, 2.0, 3.0)
DEADLINE_S = 1.0
POLICIES = ("deadline", "queue-length")
SATURATION_CLIENTS = 64
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
    """The processes of one policy's service: the API's URL, the /metrics of the API and the model
    worker, and each process's pid."""

    url: str
    scraped: tuple[str, str]
    pids: dict[str, int]


def measure(
    texts: UniqueTexts,
    progress: Progress,
    model_dir: Path,
    device: str,
    worker_env: dict[str, str],
    duration_s: float,
    warmup_s: float,
    job_texts: int = JOB_TEXTS,
) -> dict[str, object]:
    """The saturation rate, then each policy's points and its point beside a bulk job."""
    saturation: float | None = None
    policies: dict[str, object] = {}
    for policy in POLICIES:
        with _service(model_dir, device, worker_env, policy) as service:
            if saturation is None:
                saturation = _saturation(service.url, texts, duration_s, warmup_s)
                progress("goodput", {"saturation_texts_per_s": round(saturation, 2)})
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
            policies[policy] = {"points": points, "beside_job": beside, "peak_goodput_per_s": _peak(points)}
    return {
        "deadline_s": DEADLINE_S,
        "saturation_clients": SATURATION_CLIENTS,
        "saturation_texts_per_s": round(saturation or 0.0, 2),
        "multiples": list(MULTIPLES),
        "job_texts": job_texts,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "policies": policies,
    }


@contextlib.contextmanager
def _service(model_dir: Path, device: str, worker_env: dict[str, str], policy: str) -> Iterator[Service]:
    """One API, one model worker and one jobs worker on a fresh Redis, under `policy`."""
    with running() as infra, redis_server(infra) as (redis_url, _), running() as procs:
        env = service_env(redis_url, model_dir, SENTIMENT_DEVICE=device, SENTIMENT_OVERLOAD_POLICY=policy)
        url, worker_port = f"http://127.0.0.1:{free_port()}", free_port()
        api = procs.start(["-m", "sentiment.cli", "api", "--port", url.rsplit(":", 1)[1]], env)
        worker = procs.start(
            ["-m", "sentiment.cli", "worker"], {**env, **worker_env, "SENTIMENT_METRICS_PORT": str(worker_port)}
        )
        jobs = procs.start(["-m", "sentiment.cli", "jobs-worker"], {**env, "SENTIMENT_JOBS_METRICS_PORT": "0"})
        scraped = (f"{url}/metrics", f"http://127.0.0.1:{worker_port}/metrics")
        procs.wait_ok(scraped[1])
        procs.wait_ok(f"{url}/ready")
        yield Service(url, scraped, {"api": api.pid, "model_worker": worker.pid, "jobs_worker": jobs.pid})


def _saturation(url: str, texts: UniqueTexts, duration_s: float, warmup_s: float) -> float:
    """Texts a second answered by a closed loop of `SATURATION_CLIENTS`, at least `MIN_SATURATION_S`
    after a second's warm-up at least (the first forwards are slow)."""
    load = closed_loop(
        f"{url}/predict",
        lambda _: texts.take(1),
        SATURATION_CLIENTS,
        max(duration_s, MIN_SATURATION_S),
        max(warmup_s, 1.0),
    )
    if not load.texts:
        raise RuntimeError(f"no answer while measuring the saturation rate ({load.errors} errors)")
    return load.texts_per_s


def _point(
    service: Service, texts: UniqueTexts, rate_per_s: float, duration_s: float, warmup_s: float
) -> dict[str, object]:
    """One open-loop point and what the model computed meanwhile (counted until the last request's
    deadline has passed, so that work finished for nobody after the load counts too)."""
    before = counters(*service.scraped, names=COUNTERS)
    refusals_before = _refusal_times(service.scraped[0])
    cpu_before, started = {k: cpu_seconds(p) for k, p in service.pids.items()}, time.monotonic()
    load = open_loop(
        f"{service.url}/predict",
        lambda _: texts.take(1),
        rate_per_s,
        duration_s,
        warmup_s,
        DEADLINE_S,
        {"X-Request-Timeout": f"{DEADLINE_S:g}"},
    )
    elapsed = time.monotonic() - started
    cores = {k: round((cpu_seconds(p) - cpu_before[k]) / elapsed, 3) for k, p in service.pids.items()}
    _settle(service.scraped[0])
    moved = {k: v - before[k] for k, v in counters(*service.scraped, names=COUNTERS).items()}
    # Interactive texts only: a job's texts run through the same model worker, and are never for nobody.
    computed = moved["sentiment_batch_size_sum"] - moved["sentiment_bulk_texts_total"]
    wasted = moved["sentiment_replies_unclaimed_total"]
    return {
        **load.as_dict(),
        "refusal_p99_ms_at_api": _p99_bound_ms(refusals_before, _refusal_times(service.scraped[0])),
        "cores": {**cores, "client": round(load.client_cpu_share, 3)},
        "computed_texts": int(computed),
        "texts_for_nobody": int(wasted),
        "share_for_nobody": round(wasted / computed, 3) if computed else None,
        "dropped_late": int(moved["sentiment_work_items_late_total"]),
        "expired": int(moved["sentiment_work_items_expired_total"]),
    }


def _settle(metrics_url: str) -> None:
    """Wait until the next point can start on an idle service: the backlog's deadlines have passed and
    the API has answered every /predict it was sent (two reads of its count `SETTLE_POLL_S` apart
    agree, within `SETTLE_MAX_S`). Past saturation on shared cores an API may still answer a point's
    requests seconds after their clients gave up; read by the next point, its refusals would be that
    point's."""
    time.sleep(2 * DEADLINE_S)
    give_up, answered = time.monotonic() + SETTLE_MAX_S, _answered(metrics_url)
    while time.monotonic() < give_up:
        time.sleep(SETTLE_POLL_S)
        if (now := _answered(metrics_url)) == answered:
            return
        answered = now


def _predict_samples(metrics_url: str) -> Iterator[Sample]:
    """The API's timing of its /predict requests so far: its request-duration histogram's samples."""
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        yield from (sample for sample in family.samples if sample.labels.get("route") == "/predict")


def _answered(metrics_url: str) -> float:
    """The /predict requests the API has answered so far, whatever their status."""
    return sum(sample.value for sample in _predict_samples(metrics_url) if sample.name == REQUESTS_TIMED)


def _refusal_times(metrics_url: str) -> dict[float, float]:
    """The API's timing of its /predict 503s so far: the count at or under each bucket bound (seconds)."""
    found: dict[float, float] = {}
    for sample in _predict_samples(metrics_url):
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
    response = httpx.post(f"{service.url}/jobs", json={"text": texts.take(job_texts)}, timeout=60)
    response.raise_for_status()
    job = response.json()["job_id"]
    point = _point(service, texts, rate_per_s, duration_s, warmup_s)
    status = httpx.get(f"{service.url}/jobs/{job}", timeout=10).json()
    return {**point, "job_status_after": status.get("status"), "job_progress_after": status.get("progress")}


def _peak(points: list[dict[str, object]]) -> float:
    return max(float(p["goodput_per_s"]) for p in points)  # type: ignore[arg-type]


def _ratio(value: object, base: object) -> float | None:
    if not isinstance(value, int | float) or not isinstance(base, int | float) or not base:
        return None
    return round(value / base, 3)
