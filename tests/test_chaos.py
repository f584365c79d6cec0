"""The chaos run's short version (`sentiment chaos --quick`): the production topology behind the
project's fault proxies, mixed /predict and /jobs load, every fault once, every invariant of
docs/reliability.md's chaos section holding. About two minutes, with start-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.chaos import run
from tests.conftest import shared_path

pytestmark = pytest.mark.faults


def test_every_promise_holds_while_faults_run_under_mixed_load(small_model_dir: Path, tmp_path: Path) -> None:
    results = run(small_model_dir, shared_path("data/sst2-train.tsv"), 60.0, out=tmp_path)
    recovery = {f["name"]: (f["recovery_s"], f["answers_meanwhile"]) for f in results["faults"]}
    shown = json.dumps(
        {k: results[k] for k in ("invariants", "statuses", "jobs", "examples")} | {"recovery": recovery}, indent=1
    )
    assert results["passed"], shown
    assert len(results["faults"]) == 10 and all(f["recovery_s"] is not None for f in results["faults"])
    assert results["statuses"].get("200", 0) > 1000 and results["jobs"]["finished"] >= 5, shown
    assert (tmp_path / Path(results["results_file"]).name).is_file()
