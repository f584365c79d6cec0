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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.settings import Settings

if TYPE_CHECKING:
    from benchmarks.limit import Limit
    from benchmarks.service import Reference

PARTS = ("limit", "naive", "service", "cache", "ceiling", "fairness", "cancel", "goodput")
DEFAULT_PARTS = PARTS[:6]  # a run of these writes its device's block of the doc; any other run, a block of its own
BATCH_SIZES = [1, 8, 16, 32, 64]
SERVICE_CLIENTS = [1, 8, 32, 128]
NAIVE_CLIENTS = [1, 32]
CACHE_CLIENTS = 32
LIMIT_TEXTS = 4096  # texts the limit tokenizes once and cycles through (it has no cache to defeat)
SATURATION_ROUNDS = 3  # limit / service / limit rounds for the saturation target (1 with --quick)
SECRET = re.compile(r"url|password|secret|api_key", flags=re.IGNORECASE)
READ_BY = {  # the options only some parts read: named with none of those, a run would ignore them
    "api_processes": ("service", "cache", "goodput"),
    "texts_per_request": ("naive", "service", "cancel"),
}


def run(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """The parts `--only` names, their targets, the results file and plots, and the doc's section."""
    from benchmarks import machine, targets

    bench = Bench.of(settings, args)
    results: dict[str, Any] = {"machine": machine.describe(bench.device), "settings": bench.recorded()}  # the JSON
    print(bench.headline(), flush=True)
    results["failed"] = _measure(bench, results)
    results["targets"] = targets.evaluate(results, clients=32)
    _write(results, bench)
    return results


INTERRUPTED = "interrupted (Ctrl-C)"  # a part's `failed` reason: it and the parts after it did not finish


@dataclass(frozen=True)
class Bench:
    """One run's inputs: the flags and settings, resolved on this machine."""

    args: argparse.Namespace
    settings: Settings  # the service's, with the model and the worker count of the flags
    only: list[str]
    shared: Path
    data: Path
    out: Path  # the results' directory, found writable before the run
    config_dir: Path
    duration: float
    warmup: float
    device: str
    precision: str  # the limit's, naive's and worker's
    engine: str  # the limit's and worker's
    threads: int | None  # each worker's (and each limit copy's) share of the cores
    pool: list[str]

    @classmethod
    def of(cls, settings: Settings, args: argparse.Namespace) -> Bench:
        from benchmarks.checkpoints import full_size_config
        from benchmarks.loadtest import k6_binary
        from benchmarks.report import results_dir, writable_file
        from benchmarks.workload import CHECKOUT, default_shared_dir, load_texts
        from model_store.engine import pick_device, resolve_engine, resolve_precision
        from sentiment.embedded import worker_threads

        only = [p.strip() for p in (DEFAULT_PARTS if args.only is None else args.only.split(",")) if p.strip()]
        if not only:  # (an empty --only, a script's unset variable, is no request for the default parts)
            raise SystemExit(f"--only: no part named; choose from {', '.join(PARTS)}")
        if unknown := set(only) - set(PARTS):
            raise SystemExit(f"--only: unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
        for option, parts in READ_BY.items():
            if getattr(args, option) is not None and not set(parts) & set(only):
                flag = "--" + option.replace("_", "-")
                raise SystemExit(f"{flag}: no part of this run reads it (only {', '.join(parts)} do)")
        args.api_processes = args.api_processes or 1
        args.texts_per_request = 1 if args.texts_per_request is None else args.texts_per_request
        if args.texts_per_request < 1:
            raise SystemExit("--texts-per-request: at least 1")
        if "goodput" in only:  # its k6 points come last: a missing k6 is refused before the run
            k6_binary()
        out = results_dir(args.out or CHECKOUT / "benchmarks" / "results", "bench")
        if args.doc:
            writable_file(args.doc, "--doc", "sentiment bench")
        shared = default_shared_dir()
        data = args.data or shared / "data" / "sst2-train.tsv"
        target = pick_device(args.device)
        precision = resolve_precision(settings.precision, target)
        model_dir = args.model_dir or shared / "models" / "distilbert-sst2-small"
        config_dir = args.config_dir or shared / "models" / "distilbert-base-sst2-config"
        if args.model == "full":  # refused before the run, not once its parts begin
            full_size_config(config_dir)
        # The full-size shape's int8 artifact is made for its speed, its report failing (random weights).
        random_int8 = (args.model == "full" and precision == "int8") or settings.int8_allow_failing
        update = {"model_dir": model_dir, "workers": args.workers, "int8_allow_failing": random_int8}
        settings = settings.model_copy(update=update)
        return cls(
            args,
            settings,
            only,
            shared,
            data,
            out,
            config_dir,
            args.duration or (2.0 if args.quick else 30.0),
            0.5 if args.quick else 2.0,
            target.type,
            precision,
            resolve_engine(settings.engine, target, precision),
            worker_threads(settings),
            load_texts(data),
        )

    @property
    def tag(self) -> str:
        return self.device + ("-quick" if self.args.quick else "")

    def portable(self, path: Path) -> str:
        """A path as results may record it: under the shared dir or the checkout, never this machine's."""
        from benchmarks.workload import CHECKOUT

        for base, name in ((self.shared, "$SENTIMENT_SHARED_DIR"), (CHECKOUT, ".")):
            if Path(path).resolve().is_relative_to(base.resolve()):
                return f"{name}/{Path(path).resolve().relative_to(base.resolve())}"
        return Path(path).name

    def recorded(self) -> dict[str, object]:
        """The results file's `settings`: what was run, and how (no secrets, no paths of this machine)."""
        args = self.args
        command = " ".join(["sentiment", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else "sentiment bench"
        model_dir, config_dir = self.portable(self.settings.model_dir), self.portable(self.config_dir)
        return {
            "command": command,
            "parts": self.only,
            "model": args.model,
            "model_source": model_dir if args.model == "small" else f"{config_dir} (random weights)",
            "precision": self.precision,
            "engine": self.engine,
            "data": self.portable(self.data),
            "texts_in_pool": len(self.pool),
            "texts_per_request": args.texts_per_request,
            "duration_s": self.duration,
            "warmup_s": self.warmup,
            "quick": args.quick,
            "api_processes": args.api_processes,
            "workers": args.workers,
            "worker_threads": self.threads,
            # How the model processes' OpenMP threads wait (the limit's and the worker's alike).
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "runtime default"),
            "service": {
                k: self.portable(v) if k == "model_dir" else v
                for k, v in self.settings.model_dump(mode="json").items()
                if not SECRET.search(k)
            },
        }

    def block(self) -> str:
        """The doc block this run writes: its device's for the default parts, else one named after its parts
        too, so that a run of a few parts (`--only goodput`) leaves the full run's rows as they are."""
        if set(self.only) == set(DEFAULT_PARTS):
            return f"bench:{self.device}"
        return f"bench:{self.device}:{'+'.join(p for p in PARTS if p in self.only)}"

    def headline(self) -> str:
        workers, threads = self.args.workers, self.threads
        plural = "s" if threads != 1 else ""
        arrangement = "1 worker" if workers == 1 else f"{workers} workers, {threads} thread{plural} each"
        return (
            f"bench: {', '.join(self.only)} on {self.device} ({self.precision}, {self.engine}, {arrangement}), "
            f"model {self.args.model}, {self.duration:g} s a point"
        )


def _worker_env(settings: Settings) -> dict[str, str]:
    """What each worker's environment adds: its share of the cores, and leave to serve the random-weight
    checkpoint's int8 artifact, whose report fails (`workload.int8_for_speed`)."""
    from sentiment.embedded import worker_env

    allow = {"SENTIMENT_INT8_ALLOW_FAILING": "true"} if settings.int8_allow_failing else {}
    return {**worker_env(settings), **allow}


def _measure(bench: Bench, results: dict[str, Any]) -> dict[str, str]:
    """Run the parts `--only` asks for into `results`; the parts that broke, and why (the others still run)."""
    from benchmarks.workload import model_dir

    only, failed = bench.only, {}
    wanted = {
        "limit": "limit" in only,
        "naive": "naive" in only,
        "service": bool({"service", "cache"} & set(only)),
        "bare": "cache" in only,
        "ceiling": "ceiling" in only,
        "fairness": "fairness" in only,
        "cancel": "cancel" in only,
        "goodput": "goodput" in only,
    }  # (4): the cache path, then the bare endpoint
    with model_dir(bench.args.model, bench.settings, bench.config_dir) as model:
        parts = _parts(bench, model, results)
        for part in [p for p, wanted in wanted.items() if wanted]:
            try:
                results[part] = parts[part]()
            except Exception as exc:
                failed[part] = f"{type(exc).__name__}: {exc}"
                print(f"  {part} FAILED: {failed[part]}", flush=True)
            except KeyboardInterrupt:  # the parts measured so far are kept: a results file, no doc block
                failed[part] = INTERRUPTED
                print(f"  {part} {INTERRUPTED}: writing the parts measured before it", flush=True)
                break
    return failed


def _parts(bench: Bench, model: Path, results: dict[str, Any]) -> dict[str, Callable[[], object]]:
    """Each part's measurement, on `model`."""
    from benchmarks import cancel, ceiling, fairness, goodput, service
    from benchmarks.workload import UniqueTexts

    args, settings, duration, warmup, device = bench.args, bench.settings, bench.duration, bench.warmup, bench.device
    texts = UniqueTexts(bench.pool)
    env = {"SENTIMENT_MODEL_DIR": str(model), "SENTIMENT_DEVICE": device}
    alone = ModelAlone(bench, model)
    service_clients = SERVICE_CLIENTS if "service" in bench.only else []
    cache_clients = CACHE_CLIENTS if "cache" in bench.only else None
    return {
        "limit": alone.measure,
        "naive": lambda: service.measure_app(
            "benchmarks.naive_app:app", env, texts, NAIVE_CLIENTS, duration, warmup, _progress, args.texts_per_request
        ),
        "service": lambda: service.measure(
            model,
            device,
            texts,
            service_clients,
            cache_clients,
            duration,
            warmup,
            _progress,
            alone.reference(results),
            args.api_processes,
            args.workers,
            _worker_env(settings),
            args.texts_per_request,
        ),
        "bare": lambda: service.measure_app(
            "benchmarks.bare_app:app", {}, texts, [CACHE_CLIENTS], duration, warmup, _progress
        ),
        "ceiling": lambda: ceiling.measure(model, texts, duration, warmup, _progress),
        "fairness": lambda: fairness.measure(
            model, device, texts, duration, warmup, _progress, _worker_env(settings), settings.max_batch_size
        ),
        "cancel": lambda: cancel.measure(
            model, device, texts, duration, warmup, _progress, _worker_env(settings), args.texts_per_request
        ),
        "goodput": lambda: goodput.measure(
            texts,
            _progress,
            model,
            device,
            _worker_env(settings),
            duration,
            warmup,
            goodput.JOB_TEXTS if not args.quick else goodput.QUICK_JOB_TEXTS,
            bench.data,
            args.api_processes,
        ),
    }


class ModelAlone:
    """The limit part's model, measured again beside the service's saturation point."""

    def __init__(self, bench: Bench, model: Path) -> None:
        self.bench = bench
        self.model = model
        self.limit: Limit | None = None

    def measure(self) -> dict[str, object]:
        from benchmarks.limit import Limit

        bench, settings = self.bench, self.bench.settings
        self.limit = Limit(
            self.model,
            bench.device,
            bench.threads,
            settings.precision,
            settings.engine,
            bench.pool[:LIMIT_TEXTS],
            bench.args.workers,
            settings.forward_lanes,
            settings.int8_allow_failing,
        )
        return self.limit.measure(BATCH_SIZES, bench.duration / 2, _progress)

    def reference(self, results: dict[str, Any]) -> Reference | None:
        """The model's best rate, measured as needed between the saturation rounds (None without the limit)."""
        from benchmarks.service import Reference

        alone, bench = self.limit, self.bench
        if alone is None or "limit" not in results or "service" not in bench.only:
            return None
        best = max(results["limit"]["points"], key=lambda p: p["texts_per_s"])["batch_size"]
        rate = lambda: alone.point(best, bench.duration / 2)["texts_per_s"]  # noqa: E731
        return Reference(rate, best, 1 if bench.args.quick else SATURATION_ROUNDS)


def _write(results: dict[str, Any], bench: Bench) -> None:
    """The results file and plots; the doc's section for this device (printed instead for --quick or a
    run cut short, whose block would stand for a run that did not happen)."""
    from benchmarks import report, targets
    from benchmarks.workload import CHECKOUT

    args = bench.args
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    results_file = bench.out / f"bench-{stamp}-{bench.tag}.json"
    plot_files = report.plots(results, bench.out, bench.tag)
    results["plots"] = [p.name for p in plot_files]
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    doc = args.doc or (None if args.quick else CHECKOUT / "docs" / "performance.md")
    if INTERRUPTED in results["failed"].values():
        doc = None
    block = report.markdown(results, results_file, plot_files, (doc or CHECKOUT / "docs" / "performance.md").parent)
    for t in targets.shown(results):
        print(f"{t['status']:>4}  {t['name']}: {t['value']} (goal {t['goal']})")
    if doc:
        name = bench.block()
        report.replace_block(doc, name, block)
        print(f"wrote {results_file}, {len(plot_files)} plots, and the block <!-- {name} --> of {doc}")
    else:
        print(block)
        why = "the run was interrupted" if INTERRUPTED in results["failed"].values() else "a --quick run"
        print(f"wrote {results_file} and {len(plot_files)} plots (no doc: {why})")


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
            "saturation_texts_per_s",
            "policy",
            "multiple",
            "goodput_per_s",
            "refused",
            "late",
            "refusal_p99_ms",
            "p99_ratio_to_alone",
        )
    }
    print(f"  {part}: {shown}", flush=True)
