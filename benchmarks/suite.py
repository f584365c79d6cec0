"""`sentiment bench`: the benchmarks in one run, the targets, the results file, plots and docs.

Runtime is fixed by the flags, not by the machine: about (5 batch sizes x duration/2)
+ (2 naive + 4 service + cache + bare + 3 ceiling + 3 fairness points) x (duration + warm-up)
+ 3 saturation rounds x (2 x duration/2 + duration + warm-up) + process starts;
the default 30 s per point is about 12 minutes, `--quick` about 1 minute.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.settings import Settings

PARTS = ("limit", "naive", "service", "cache", "ceiling", "fairness", "cancel")  # cancel: not in the default --only
BATCH_SIZES = [1, 8, 16, 32, 64]
SERVICE_CLIENTS = [1, 8, 32, 128]
NAIVE_CLIENTS = [1, 32]
CACHE_CLIENTS = 32
LIMIT_TEXTS = 4096  # texts the limit tokenizes once and cycles through (it has no cache to defeat)
SATURATION_ROUNDS = 3  # limit / service / limit rounds for the saturation target (1 with --quick)
SECRET = re.compile(r"url|password|secret|api_key", flags=re.IGNORECASE)


def run(settings: Settings, args: argparse.Namespace) -> dict[str, object]:
    from benchmarks import cancel, ceiling, fairness, limit, machine, report, service, targets
    from benchmarks.workload import CHECKOUT, UniqueTexts, default_shared_dir, load_texts, model_dir
    from model_store.engine import pick_device, resolve_engine, resolve_precision
    from sentiment.embedded import worker_env, worker_threads

    only = [p.strip() for p in args.only.split(",") if p.strip()]
    if unknown := set(only) - set(PARTS):
        raise SystemExit(f"--only: unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if args.texts_per_request < 1:
        raise SystemExit("--texts-per-request: at least 1")
    shared = default_shared_dir()
    data = args.data or shared / "data" / "sst2-train.tsv"
    duration = args.duration or (2.0 if args.quick else 30.0)
    warmup = 0.5 if args.quick else 2.0
    target = pick_device(args.device)
    device = target.type
    precision = resolve_precision(settings.precision, target)  # the limit's, naive's and worker's
    engine = resolve_engine(settings.engine, target, precision)  # the limit's and worker's
    tag = device + ("-quick" if args.quick else "")
    settings = settings.model_copy(
        update={
            "model_dir": args.model_dir or shared / "models" / "distilbert-sst2-small",
            "workers": args.workers,
        }
    )
    threads = worker_threads(settings)  # each worker's (and each limit copy's) share of the cores
    config_dir = args.config_dir or shared / "models" / "distilbert-base-sst2-config"
    pool = load_texts(data)
    texts = UniqueTexts(pool)
    command = " ".join(["sentiment", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else "sentiment bench"

    def portable(path: Path) -> str:
        """A path as results may record it: under the shared dir or the checkout, never this machine's."""
        for base, name in ((shared, "$SENTIMENT_SHARED_DIR"), (CHECKOUT, ".")):
            if Path(path).resolve().is_relative_to(base.resolve()):
                return f"{name}/{Path(path).resolve().relative_to(base.resolve())}"
        return Path(path).name

    model_source = portable(settings.model_dir) if args.model == "small" else f"{portable(config_dir)} (random weights)"
    results: dict[str, Any] = {  # the JSON document
        "machine": machine.describe(device),
        "settings": {
            "command": command,
            "parts": only,
            "model": args.model,
            "model_source": model_source,
            "precision": precision,
            "engine": engine,
            "data": portable(data),
            "texts_in_pool": len(pool),
            "texts_per_request": args.texts_per_request,
            "duration_s": duration,
            "warmup_s": warmup,
            "quick": args.quick,
            "api_processes": args.api_processes,
            "workers": args.workers,
            "worker_threads": threads,
            # How the model processes' OpenMP threads wait (the limit's and the worker's alike).
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "runtime default"),
            "service": {
                k: portable(v) if k == "model_dir" else v
                for k, v in settings.model_dump(mode="json").items()
                if not SECRET.search(k)
            },
        },
    }
    plural = "s" if threads != 1 else ""
    arrangement = "1 worker" if args.workers == 1 else f"{args.workers} workers, {threads} thread{plural} each"
    print(
        f"bench: {', '.join(only)} on {device} ({precision}, {engine}, {arrangement}), model {args.model}, "
        f"{duration:g} s a point",
        flush=True,
    )
    failed: dict[str, str] = {}
    with model_dir(args.model, settings, config_dir) as model:
        env = {"SENTIMENT_MODEL_DIR": str(model), "SENTIMENT_DEVICE": device}
        model_alone: limit.Limit | None = None  # the limit part's model, used again beside the saturation point

        def measure_limit() -> dict[str, object]:
            nonlocal model_alone
            model_alone = limit.Limit(
                model,
                device,
                threads,
                settings.precision,
                settings.engine,
                pool[:LIMIT_TEXTS],
                args.workers,
                settings.forward_lanes,
            )
            return model_alone.measure(BATCH_SIZES, duration / 2, _progress)

        def reference() -> service.Reference | None:
            if model_alone is None or "limit" not in results or "service" not in only:
                return None
            alone = model_alone
            best = max(results["limit"]["points"], key=lambda p: p["texts_per_s"])["batch_size"]
            rate = lambda: alone.point(best, duration / 2)["texts_per_s"]  # noqa: E731
            return service.Reference(rate, best, 1 if args.quick else SATURATION_ROUNDS)

        parts = {
            "limit": measure_limit,
            "naive": lambda: service.measure_app(
                "benchmarks.naive_app:app",
                env,
                texts,
                NAIVE_CLIENTS,
                duration,
                warmup,
                _progress,
                args.texts_per_request,
            ),
            "service": lambda: service.measure(
                model,
                device,
                texts,
                SERVICE_CLIENTS if "service" in only else [],
                CACHE_CLIENTS if "cache" in only else None,
                duration,
                warmup,
                _progress,
                reference(),
                args.api_processes,
                args.workers,
                worker_env(settings),
                args.texts_per_request,
            ),
            "bare": lambda: service.measure_app(
                "benchmarks.bare_app:app", {}, texts, [CACHE_CLIENTS], duration, warmup, _progress
            ),
            "ceiling": lambda: ceiling.measure(model, texts, duration, warmup, _progress),
            "fairness": lambda: fairness.measure(
                model, device, texts, duration, warmup, _progress, worker_env(settings), settings.max_batch_size
            ),
            "cancel": lambda: cancel.measure(
                model, device, texts, duration, warmup, _progress, worker_env(settings), args.texts_per_request
            ),
        }
        runs = {
            "limit": "limit" in only,
            "naive": "naive" in only,
            "service": bool({"service", "cache"} & set(only)),
            "bare": "cache" in only,
            "ceiling": "ceiling" in only,
            "fairness": "fairness" in only,
            "cancel": "cancel" in only,
        }  # (4): the cache path, then the bare endpoint
        for part in [p for p, wanted in runs.items() if wanted]:
            try:  # a part that breaks is reported, and the others still run
                results[part] = parts[part]()
            except Exception as exc:
                failed[part] = f"{type(exc).__name__}: {exc}"
                print(f"  {part} FAILED: {failed[part]}", flush=True)
    results["failed"] = failed
    results["targets"] = targets.evaluate(results, clients=32)

    out = args.out or CHECKOUT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    results_file = out / f"bench-{stamp}-{tag}.json"
    plot_files = report.plots(results, out, tag)
    results["plots"] = [p.name for p in plot_files]
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    doc = args.doc or (None if args.quick else CHECKOUT / "docs" / "performance.md")
    block = report.markdown(results, results_file, plot_files, (doc or CHECKOUT / "docs" / "performance.md").parent)
    for t in results["targets"]:
        print(f"{t['status']:>4}  {t['name']}: {t['value']} (goal {t['goal']})")
    if doc:
        report.replace_block(doc, f"bench:{device}", block)
        print(f"wrote {results_file}, {len(plot_files)} plots, and the {device} section of {doc}")
    else:
        print(block)
        print(f"wrote {results_file} and {len(plot_files)} plots (no doc: a --quick run)")
    return results


def _progress(part: str, point: Mapping[str, object]) -> None:
    shown = {
        k: v
        for k, v in point.items()
        if k
        in (
            "batch_size",
            "concurrency",
            "texts_per_s",
            "requests_per_s",
            "p50_ms",
            "p99_ms",
            "mean_batch_size",
            "mean_queue_wait_ms",
            "errors",
            "client_cpu_share",
            "limit_before",
            "service",
            "limit_after",
            "ratio",
            "texts_per_request",
            "api_cpu_us_per_request",
            "worker_outside_forward_us_per_text",
            "cores",
            "drop_abandoned",
            "gave_up",
            "computed_texts",
            "share_for_nobody",
        )
    }
    print(f"  {part}: {shown}", flush=True)
