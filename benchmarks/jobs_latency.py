"""/predict latency with and without a running bulk job (the numbers in docs/jobs.md).

Usage: python benchmarks/jobs_latency.py http://127.0.0.1:8123 ../shared/data/sst2-train.tsv
Every /predict text is unique (a cache miss), so each request costs a model forward.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import httpx

REQUESTS = 200
JOB_TEXTS = 2000


def texts(path: Path) -> list[str]:
    lines = path.read_text().splitlines()[1:]
    return list(dict.fromkeys(line.split("\t")[0] for line in lines))


def latencies(client: httpx.Client, pool: list[str], until_job: str | None = None) -> list[float]:
    out = []
    for text in pool[:REQUESTS]:
        started = time.perf_counter()
        client.post("/predict", json={"text": [text]}).raise_for_status()
        out.append((time.perf_counter() - started) * 1000)
        if until_job and client.get(f"/jobs/{until_job}").json()["status"] != "started":
            break  # only latencies measured while the job ran count
    return out


def summary(name: str, ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=100)
    return f"{name}: n={len(ms)} p50={q[49]:.1f} ms p99={q[98]:.1f} ms"


def main(url: str, data: str) -> None:
    pool = texts(Path(data))
    with httpx.Client(base_url=url, timeout=30) as client:
        print(summary("idle", latencies(client, pool[0:])))
        job = client.post("/jobs", json={"text": pool[10_000 : 10_000 + JOB_TEXTS]}).json()["job_id"]
        while client.get(f"/jobs/{job}").json()["status"] != "started":
            time.sleep(0.05)
        started = time.perf_counter()
        print(summary("during job", latencies(client, pool[1000:], until_job=job)))
        while (view := client.get(f"/jobs/{job}").json())["status"] == "started":
            time.sleep(0.1)
        print(f"job: {view['status']}, {JOB_TEXTS} texts, {time.perf_counter() - started:.1f} s after start")
        t0 = time.perf_counter()
        solo = client.post("/jobs", json={"text": pool[20_000 : 20_000 + JOB_TEXTS]}).json()["job_id"]
        while client.get(f"/jobs/{solo}").json()["status"] not in ("finished", "failed"):
            time.sleep(0.1)
        print(f"job alone: {JOB_TEXTS} texts in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
