"""The chaos run's short version (`sentiment chaos --quick`): the production topology behind the
project's fault proxies, mixed /predict and /jobs load, every fault once, every invariant of
docs/reliability.md's chaos section holding (about two minutes, with start-up); and the invariants'
checks failing on counts that break them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import pytest

from benchmarks.cache_writes import CacheWrites
from benchmarks.chaos import Answer, Fault, JobRun, Traffic, check, computed_past_put_back, run
from benchmarks.workload import UniqueTexts
from core.protocol import text_digest
from tests.conftest import HANG_GUARD_S, REPO, as_background_job, interrupted_at, shared_path


@pytest.mark.faults
@pytest.mark.alone  # (it asks over 1,000 answers in its 60 s of load: other tests on the cores would take them)
@pytest.mark.timeout(600)  # (its turn alone waits for the tests running on the other workers to end)
def test_every_promise_holds_while_faults_run_under_mixed_load(small_model_dir: Path, tmp_path: Path) -> None:
    results = run(small_model_dir, shared_path("data/sst2-train.tsv"), 60.0, out=tmp_path)
    recovery = {f["name"]: (f["at"], f["recovery_s"], f["answers_meanwhile"]) for f in results["faults"]}
    shown = json.dumps(
        {k: results[k] for k in ("invariants", "statuses", "jobs", "examples")} | {"recovery": recovery}, indent=1
    )
    assert results["passed"], shown
    assert len(results["faults"]) == 11 and all(f["recovery_s"] is not None for f in results["faults"])
    assert results["statuses"].get("200", 0) > 1000 and results["jobs"]["finished"] >= 5, shown
    assert (tmp_path / Path(results["results_file"]).name).is_file()


def test_a_text_computed_more_often_than_raced_for_or_put_back_by_a_fault_breaks_the_invariant() -> None:
    """Texts first written at 10 s: one asked once (and again once cached), one asked by two requests
    before it was written, one in a request and one in a job that a fault ran across, one in a job
    after the fault."""
    answers = [
        Answer("http://api-1", ["asked once"], 9.0, 9.1),
        Answer("http://api-2", ["asked once", "raced"], 11.0, 11.1),  # after the first write: a cache hit
        Answer("http://api-1", ["raced"], 9.0, 9.1),
        Answer("http://api-2", ["raced"], 9.5, 9.55),
        Answer("http://api-1", ["in a cut request"], 9.55, 10.2),
    ]
    jobs = [
        JobRun(["in a cut job"], 8.0, status=202, ended_at=12.0),
        JobRun(["in a later job"], 9.8, status=202, ended_at=10.5),
    ]
    faults = [Fault("every connection reset", 9.6, 9.6)]
    texts = ("asked once", "raced", "in a cut request", "in a cut job", "in a later job")
    first_written = {text_digest(text): 10.0 for text in texts}
    bounds = dict(zip(texts, (1, 2, 2, 2, 1), strict=True))

    within = {text_digest(text): bound for text, bound in bounds.items()}
    assert computed_past_put_back(within, first_written, answers, jobs, faults) == []
    beyond = {text_digest(text): bound + 1 for text, bound in bounds.items()}
    assert computed_past_put_back(beyond, first_written, answers, jobs, faults) == [
        {"text": text_digest(text), "computed": bound + 1, "bound": bound} for text, bound in bounds.items()
    ]


@pytest.mark.parametrize(
    ("end", "broken"),
    [
        ({"api-1": 84_000, "worker-1": 549_000}, []),  # 5% and 9.8%
        ({"api-1": 88_800, "worker-1": 500_000}, ["api-1"]),  # 11%
        ({"api-1": 80_000, "worker-1": None}, ["worker-1"]),  # not measured
    ],
)
def test_memory_grown_past_its_bound_or_not_measured_fails_the_run(
    end: dict[str, int | None], broken: list[str]
) -> None:
    """A quiet run (no requests, no faults) with the never-killed processes' memory at the end of the
    warm-up and at the end (KiB): only the memory check can fail it."""
    memory: dict[str, dict[str, int | None]] = {"base": {"api-1": 80_000, "worker-1": 500_000}, "end": end}
    traffic = Traffic(["http://127.0.0.1:1", "http://127.0.0.1:2"], [], UniqueTexts(["unsent"]))
    writes = CacheWrites("redis://127.0.0.1:1/0", "unwatched")  # (never entered: nothing watched, nothing counted)
    results = check(traffic, [], {}, writes, [], memory)
    assert results["passed"] == (not broken), results["invariants"]
    assert sorted(n for found in results["examples"].values() for n in found) == broken


def test_a_fault_heals_at_the_first_200_to_a_request_sent_after_it_and_settles_a_second_later() -> None:
    traffic = Traffic(["http://127.0.0.1:1", "http://127.0.0.1:2"], [], UniqueTexts(["unsent"]))
    fault = Fault("every connection reset", 9.0, 10.0)
    traffic.answers += [
        Answer("http://api-1", ["sent before it healed"], 9.5, 10.2, status=200),
        Answer("http://api-2", ["refused after"], 10.1, 10.3, status=503),
    ]
    assert traffic.recovered_at(fault.healed) is None
    traffic.answers += [
        Answer("http://api-1", ["the first after"], 10.2, 10.5, status=200),
        Answer("http://api-2", ["a later one"], 10.4, 10.6, status=200),
    ]
    assert traffic.recovered_at(fault.healed) == 10.5
    with patch("benchmarks.chaos.time.time", return_value=11.4):
        assert not traffic.settled(fault)  # seen 0.9 s ago
    with patch("benchmarks.chaos.time.time", return_value=11.5):
        assert traffic.settled(fault)
    unseen = Fault("200 ms latency for 10 s", 10.0, 20.0)
    with patch("benchmarks.chaos.time.time", return_value=25.9):
        assert not traffic.settled(unseen)
    with patch("benchmarks.chaos.time.time", return_value=26.0):
        assert traffic.settled(unseen)  # twice its bound gone by: the check finds it late


@pytest.mark.slow
@pytest.mark.parametrize("option", [["--duration", "300"], ["--doc", "reliability.md"]], ids=lambda o: o[0])
def test_an_option_quick_overrides_is_refused(tmp_path: Path, option: list[str]) -> None:
    # (`--quick --duration 300` ran a minute, `--quick --doc` wrote no doc: each in silence. The --data
    # that is not there stops such a run before it starts.)
    command = ["chaos", "--quick", *option, "--data", str(tmp_path / "none.tsv")]
    done = subprocess.run(
        [sys.executable, "-m", "sentiment.cli", *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert (done.returncode, done.stdout, done.stderr) == (
        1,
        "",
        f"sentiment chaos: --quick runs a minute and updates no doc: {option[0]} or --quick, not both\n",
    )


@pytest.mark.slow
def test_ctrl_c_keeps_what_happened_so_far_checked_and_leaves_the_doc(tmp_path: Path, tiny_model_dir: Path) -> None:
    # (a KeyboardInterrupt traceback before, and no results file: the faults run so far lost)
    data, out, doc = tmp_path / "sentences.txt", tmp_path / "results", tmp_path / "reliability.md"
    data.write_text("\n".join(f"sentence number {n}" for n in range(300)) + "\n")
    doc.write_text("# Reliability\n")
    paths = ["--model-dir", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--doc", str(doc)]
    chaos = as_background_job([sys.executable, "-m", "sentiment.cli", "chaos", "--duration", "60", *paths])
    assert chaos.stderr is not None  # (the first fault: the load runs)
    stdout, stderr = interrupted_at(chaos, chaos.stderr, "chaos: ")
    assert (chaos.returncode, "Traceback" in stderr) == (130, False), stdout + stderr
    [results_file] = out.glob("chaos-*.json")
    results = json.loads(results_file.read_text())
    assert results["interrupted"] and results["faults"] and results["requests"] > 0
    assert json.loads(stdout)["results_file"] == str(results_file)
    assert doc.read_text() == "# Reliability\n"
