"""The README's commands run as written: every `bash` block not fenced `bash not-run`, in order, against
the service its restart command starts, checking what they print where the README shows it, and the
line it shows that service printing once up.

Two things differ from a reader's shell, both environmental: the test runs inside the activated
environment (a leading `. .venv/bin/activate && ` is dropped), and the ports the README names
(8000, 8001, 6380) are free ones here. A block this test does not know fails it: run it here, or
fence it `bash not-run` in the README. (The Python client snippets run in the client tests:
test_hugging_face.py, test_inference_protocol.py, test_inference_grpc.py.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from pathlib import Path

import httpx
import pytest
import redis

from sentiment.embedded import free_port
from tests.conftest import REPO, answers, shared_path, wait_for

README = (REPO / "README.md").read_text()
ACTIVATE = ". .venv/bin/activate && "
LOADTEST_HOLD = "1s"  # the test's own hold for `sentiment loadtest --duration` (the README's is 20 s)


def bash_blocks() -> list[tuple[bool, str]]:
    """(whether it runs, its text) for each `bash` block of the README, in order."""
    return [(info.strip() != "not-run", body) for info, body in re.findall(r"```bash([^\n]*)\n(.*?)```", README, re.S)]


def commands(block: str) -> list[tuple[str, list[str]]]:
    """Each command of `block` (continuation lines joined) and the lines the README shows it printing."""
    found: list[tuple[str, list[str]]] = []
    lines = iter(block.splitlines())
    for line in lines:
        if line.startswith(("{", " ", "#")) and found:  # the README showing the output of the command before
            found[-1][1].append(line)
            continue
        while line.endswith("\\"):
            line = line[:-1] + next(lines).strip()
        found.append((line, []))
    return found


def env(**extra: str) -> dict[str, str]:
    """The reader's shell: this environment (the venv's bin first on PATH), no Redis URL."""
    base = {k: v for k, v in os.environ.items() if k != "SENTIMENT_REDIS_URL"}
    return base | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{base['PATH']}", **extra}


def here(command: str, ports: dict[str, int]) -> str:
    """`command` with the README's ports made this test's."""
    for readme_port, port in ports.items():
        command = re.sub(rf"\b{readme_port}\b", str(port), command)
    return command.removeprefix(ACTIVATE)


def run(command: str) -> str:
    done = subprocess.run(["bash", "-c", command], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{command}\n{done.stderr}"
    return done.stdout


@contextmanager
def background(script: str, ready_url: str, log: Path | None = None, **extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """`script` running in its own process group until the test is done, once `ready_url` answers;
    what it writes to stderr goes to `log` where one is given."""
    with open(log, "wb") if log else nullcontext() as stderr:
        proc = subprocess.Popen(
            ["bash", "-c", script], cwd=REPO, env=env(**extra), start_new_session=True, stderr=stderr
        )
    try:
        wait_for(ready_url, lambda: proc.poll() is not None or answers(ready_url), 180)
        assert proc.poll() is None, f"{script} exited {proc.returncode}"
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # (SIGINT: a script's `cmd &` ignores it)
        proc.wait(90)
        end_group(proc.pid)


def end_group(group: int, grace_s: float = 60.0) -> None:
    """Wait for the rest of the group to go (the jobs worker runs at idle priority: on a busy machine
    it may wait long for the CPU to exit), then kill what is left: a test leaves nothing running."""
    give_up = time.monotonic() + grace_s
    with suppress(ProcessLookupError):
        while time.monotonic() < give_up:
            os.killpg(group, 0)
            time.sleep(0.2)
        os.killpg(group, signal.SIGKILL)


@pytest.mark.slow
def test_the_readmes_bash_blocks_run_as_written(tmp_path: Path) -> None:
    shared_path("models/distilbert-sst2-small")  # what the README's commands name
    ports = {"8000": free_port(), "8001": free_port()}
    api = f"http://127.0.0.1:{ports['8000']}"
    blocks = [body for runs, body in bash_blocks() if runs]
    serve_log = tmp_path / "serve.log"
    with ExitStack() as stack:
        for block in blocks:
            first = block.splitlines()[0]
            if first.startswith(ACTIVATE) and first.endswith(" sentiment serve"):  # the restart: the live service
                stack.enter_context(
                    background(
                        here(first, ports),
                        f"{api}/ready",
                        serve_log,
                        SENTIMENT_PORT=str(ports["8000"]),
                        SENTIMENT_GRPC_PORT=str(ports["8001"]),
                        SENTIMENT_METRICS_PORT="0",
                        SENTIMENT_JOBS_METRICS_PORT="0",
                    )
                )
                up_line(serve_log.read_text(), ports)
            elif first.startswith("curl -s localhost:8000/predict"):
                predict(block, ports)
            elif first.startswith("curl -s localhost:8000/jobs "):
                job(block, ports)
            elif first.startswith("curl -s localhost:8000/metrics"):
                metrics(block, ports)
            elif first.startswith("curl -si localhost:8000/jobs"):
                jobs(block, ports)
            elif first.startswith("redis-server --port 6380"):
                production_topology(block)
            elif first.startswith("sentiment loadtest"):
                run(here(first.split("#")[0], ports) + f" --duration {LOADTEST_HOLD}")
            else:
                pytest.fail(f"a README block this test does not run: run it here, or fence it `bash not-run`:\n{block}")


def up_line(said: str, ports: dict[str, int]) -> None:
    """The "up" line the README shows is serve's, as it prints it: the same words, its numbers (time,
    pid, ports) and data directory aside."""
    shown = re.search(r"^.* INFO sentiment\.embedded \[\d+\] up: .*$", README, re.M)
    assert shown, "the README shows no line of `sentiment serve` saying it is up"
    [real] = [line for line in said.splitlines() if " INFO sentiment.embedded [" in line and "] up: " in line]
    assert f"up: http://127.0.0.1:{ports['8000']} (gRPC 127.0.0.1:{ports['8001']}); " in real

    def shape(line: str) -> str:
        return re.sub(r"\d+", "N", re.sub(r" cache in \S+\)$", " cache in DIR)", line))

    assert shape(shown.group()) == shape(real)


def job(block: str, ports: dict[str, int]) -> None:
    """The README's first /jobs example: the submission answers as shown, and the poll, once the job
    has finished, answers as shown: the same fields, the same labels, scores within bf16's few thousandths."""
    (submit, shown_submitted), (poll, shown_finished) = commands(block)
    submitted = json.loads(run(here(submit, ports)))
    job_id = submitted["job_id"]
    assert submitted == json.loads("".join(shown_submitted).replace("<id>", job_id))
    poll = here(poll, ports).replace("<id>", job_id)
    finished = wait_for("the job", lambda: (doc := json.loads(run(poll)))["status"] == "finished" and doc)
    expected = json.loads("".join(shown_finished).replace("<id>", job_id))
    assert finished.keys() == expected.keys()
    assert [finished[k] for k in ("job_id", "status", "progress")] == [
        expected[k] for k in ("job_id", "status", "progress")
    ]
    same_predictions(finished["predictions"], expected["predictions"])


def metrics(block: str, ports: dict[str, int]) -> None:
    """The README's metrics example prints the series it shows, in its order; one live worker."""
    command, *shown = block.splitlines()
    got = run(here(command, ports)).splitlines()
    assert [line.rsplit(" ", 1)[0] for line in got] == [line.rsplit(" ", 1)[0] for line in shown]
    assert "sentiment_workers_live 1.0" in got and "sentiment_workers_live 1.0" in shown


def predict(block: str, ports: dict[str, int]) -> None:
    """The README's /predict example prints what it shows: the same labels, scores within bf16's few
    thousandths."""
    [(command, shown)] = commands(block)
    same_predictions(json.loads(run(here(command, ports)))["predictions"], json.loads("".join(shown))["predictions"])


def same_predictions(got: list[list[dict]], shown: list[list[dict]]) -> None:
    """The predictions the README shows: the same labels, scores within bf16's few thousandths."""
    assert len(got) == len(shown)
    for text_got, text_shown in zip(got, shown, strict=True):
        assert [p["label"] for p in text_got] == [p["label"] for p in text_shown]
        assert [p["score"] for p in text_got] == pytest.approx([p["score"] for p in text_shown], abs=0.01)


def jobs(block: str, ports: dict[str, int]) -> None:
    """Submit (202 and a Location, as the comment says), poll, delete: `<id>` is the Location's."""
    (submit, shown), (poll, _), (delete, _) = commands(block)
    assert shown == ["# 202, Location: /jobs/<id>"]
    headers = run(here(submit, ports))
    assert headers.startswith("HTTP/1.1 202")
    job_id = re.search(r"^location: /jobs/(\w+)\r?$", headers, re.M | re.I)
    assert job_id, headers

    def with_id(command: str) -> str:
        return here(command.split("  #")[0], ports).replace("<id>", job_id.group(1))

    status = wait_for("the job", lambda: (doc := json.loads(run(with_id(poll))))["status"] == "finished" and doc)
    assert [max(p, key=lambda s: s["score"])["label"] for p in status["predictions"]] == ["POSITIVE", "NEGATIVE"]
    assert run(with_id(delete)) == ""
    assert httpx.get(f"http://127.0.0.1:{ports['8000']}/jobs/{job_id.group(1)}").status_code == 404


def production_topology(block: str) -> None:
    """The block as one script (its own Redis, workers and API), then a prediction through it."""
    ports = {"8000": free_port(), "6380": free_port()}
    try:
        with background(here(block, ports), f"http://127.0.0.1:{ports['8000']}/ready"):
            out = run(
                f"curl -s localhost:{ports['8000']}/predict -H 'content-type: application/json' -d '{{\"text\": [\"Great.\"]}}'"
            )
            assert len(json.loads(out)["predictions"]) == 1
            # It has no password: this machine alone may reach it.
            assert redis.Redis(port=ports["6380"]).config_get("bind") == {"bind": "127.0.0.1"}
    finally:
        with suppress(redis.ConnectionError):  # (daemonized: outside the script's group)
            redis.Redis(port=ports["6380"]).shutdown(nosave=True)


def test_every_block_is_fenced_run_or_not_run() -> None:
    """`bash` and `bash not-run` are the two kinds; the install and test commands never run here."""
    infos = re.findall(r"```bash([^\n]*)\n", README)
    assert set(infos) <= {"", " not-run"}
    install, tests = bash_blocks()[:2]
    assert (install[0], tests[0]) == (False, False)
