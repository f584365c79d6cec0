"""Every k6 script parses and runs: a few seconds of each against a tiny-model service, with every
check and threshold holding (a broken script fails here, not on the day of a load test)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from benchmarks.loadtest import K6_DIR, k6_binary, k6_command
from core.settings import Settings
from sentiment.cli import _parser
from sentiment.embedded import free_port
from tests.conftest import HANG_GUARD_S, REPO, as_background_job, children_of, killed_with, start_service, wait_for

SCRIPTS = ("load", "unique", "jobs", "grpc", "goodput")


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_unique_text_is_new_to_the_cache_yet_costs_the_model_what_its_sentence_costs(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    # What k6's unique and goodput scripts send must cost what the bench's texts cost, so that their
    # goodput compares with the bench's in-time capacity: the tag that makes each new is whitespace.
    script = tmp_path / "texts.js"
    script.write_text(
        f"import {{ uniqueText }} from '{K6_DIR / 'lib.js'}';\n"
        "export const options = { iterations: 1, vus: 1 };\n"
        "const SENTENCES = ['a quietly moving film', 'the plot never comes together'];\n"
        "export default function () {\n"
        "  for (let vu = 1; vu <= 3; vu++) {\n"
        "    for (let k = 0; k < 40; k++) { console.log(JSON.stringify(uniqueText(SENTENCES, k, vu))); }\n"
        "  }\n"
        "}\n"
    )
    out = subprocess.run(
        [k6_binary(), "run", "--quiet", "--log-format", "raw", str(script)], capture_output=True, text=True
    )
    texts = [json.loads(line) for line in out.stderr.splitlines() if line.startswith('"')]
    assert len(texts) == len(set(texts)) == 120
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in texts:
        sentence = text.rstrip()
        assert sentence in ("a quietly moving film", "the plot never comes together")
        assert tokenizer(text)["input_ids"] == tokenizer(sentence)["input_ids"]


@pytest.mark.slow
def test_k6_ends_when_the_loadtest_is_killed(tiny_model_dir: Path) -> None:
    # (SIGKILL of a loadtest, or of its terminal, left k6 sending its load for the rest of its stages)
    command = ["loadtest", "--duration", "60s", "--model-dir", str(tiny_model_dir)]
    loadtest = subprocess.Popen(
        [sys.executable, "-m", "sentiment.cli", *command],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed_with(loadtest, wait_for("the loadtest's k6", lambda: _k6_of(loadtest.pid)), "the loadtest's k6")


def _k6_of(parent: int) -> int | None:
    """The k6 process `parent` started, if it runs yet."""
    return next((pid for pid, name in children_of(parent).items() if name == "k6"), None)


@pytest.mark.slow
def test_ctrl_c_prints_what_k6_measured_and_leaves_the_doc(tmp_path: Path, tiny_model_dir: Path) -> None:
    # (a KeyboardInterrupt traceback before: k6's summary was never read, no table printed)
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n")
    command = ["loadtest", "--duration", "60s", "--model-dir", str(tiny_model_dir), "--doc", str(doc)]
    loadtest = as_background_job(  # (its own process group, as a terminal's Ctrl-C reaches)
        [sys.executable, "-m", "sentiment.cli", *command], start_new_session=True
    )
    k6 = wait_for("the loadtest's k6", lambda: _k6_of(loadtest.pid))
    wait_for("k6 to send its load", lambda: _holds_a_socket(k6))
    os.killpg(loadtest.pid, signal.SIGINT)
    stdout, stderr = loadtest.communicate(timeout=HANG_GUARD_S)
    assert (loadtest.returncode, "Traceback" in stderr) == (130, False), stdout + stderr
    assert "(interrupted: Ctrl-C)" in stdout and "| http_reqs |" in stdout, stdout
    assert doc.read_text() == "# Performance\n"


def _holds_a_socket(pid: int) -> bool:
    """Whether `pid` has a socket open (k6: once its run has begun)."""
    with contextlib.suppress(OSError):
        return any(os.readlink(fd).startswith("socket:") for fd in Path(f"/proc/{pid}/fd").iterdir())
    return False


@pytest.mark.parametrize(("given", "hold"), [("20", "20s"), ("1.5", "1.5s"), ("20s", "20s"), ("1m30s", "1m30s")])
def test_a_duration_in_bare_seconds_holds_that_many_seconds(given: str, hold: str) -> None:
    # (k6 reads a bare number as milliseconds; every other command's --duration is seconds)
    assert _parser(Settings()).parse_args(["loadtest", "--duration", given]).duration == hold


@pytest.mark.parametrize("given", ["abc", "0", "0s", "-5", "5x", "inf"])
def test_a_duration_k6_cannot_hold_is_refused_before_the_service_starts(
    given: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # (k6 refused it only once the service was up, and no summary was then a FileNotFoundError traceback)
    with pytest.raises(SystemExit):
        _parser(Settings()).parse_args(["loadtest", "--duration", given])
    assert f"expected seconds or a k6 duration above 0 (20s, 1m30s), got {given!r}" in capsys.readouterr().err


@pytest.mark.slow
def test_a_service_that_cannot_start_ends_the_loadtest_with_its_reason(tmp_path: Path) -> None:
    # (serve's one line was followed by loadtest's RuntimeError traceback)
    (tmp_path / "config.json").write_text("{bad")
    done = subprocess.run(
        [sys.executable, "-m", "sentiment.cli", "loadtest", "--model-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert (done.returncode, done.stdout, "Traceback" in done.stderr) == (1, "", False), done.stderr
    assert done.stderr.endswith(
        f"sentiment serve: no Hugging Face checkpoint (config.json + weights) in {tmp_path}; set SENTIMENT_MODEL_DIR "
        "or fetch one with `sentiment model pull`\n"
        "sentiment loadtest: the service exited before it was ready (exit status 1; its reason above)\n"
    ), done.stderr
