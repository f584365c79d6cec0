"""Every k6 script parses and runs: a few seconds of each against a tiny-model service, with every
check and threshold holding (a broken script fails here, not on the day of a load test)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks.loadtest import K6_DIR, k6_binary, k6_command
from sentiment.embedded import free_port
from tests.conftest import start_service

SCRIPTS = ("load", "unique", "jobs", "grpc", "goodput")


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_passes_k6_inspect(script: str) -> None:
    out = subprocess.run([k6_binary(), "inspect", str(K6_DIR / f"{script}.js")], capture_output=True, check=True)
    options = json.loads(out.stdout)
    assert options["stages"] or options["scenarios"]


def test_every_script_runs_against_the_service_with_its_thresholds_holding(
    tmp_path: Path, redis_url: str, tiny_model_dir: Path
) -> None:
    grpc_port = free_port()
    service = start_service(redis_url, tiny_model_dir, "k6", SENTIMENT_GRPC_PORT=str(grpc_port))
    service.start("jobs-worker")
    try:
        for script in SCRIPTS:
            summary = tmp_path / f"{script}.json"
            k6 = k6_command(script, service.url, summary, "2s", ramp="1s", grpc_address=f"127.0.0.1:{grpc_port}")
            command = [*k6, "-e", "VUS=2", "-e", "JOB_TEXTS=3"]
            assert subprocess.run(command, capture_output=True, timeout=120).returncode == 0, script
            metrics = json.loads(summary.read_text())["metrics"]
            assert metrics["checks"]["fails"] == 0 and metrics["checks"]["passes"] > 0, script
            if script == "goodput":  # every answer classified: in time (texts), refused or late
                answered = metrics["goodput"]["count"] + sum(
                    metrics.get(m, {}).get("count", 0) for m in ("refused", "late")
                )
                assert metrics["goodput"]["count"] > 0 and answered == metrics["iterations"]["count"]
    finally:
        service.stop()
