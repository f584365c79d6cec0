"""Quiet logs: an idle jobs worker logs nothing at INFO (RQ's routine maintenance is DEBUG), work
whose deadline passed in the queue is a summary line now and then (each item at DEBUG), and a
start-up failure, of `serve` or a command given bad input, is one line."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import fakeredis
import pytest

from batcher import intake as intake_module
from batcher.bulk import Bulk
from batcher.jobs import serve_jobs
from batcher.plan import Window
from core.settings import Settings
from sentiment.embedded import free_port
from tests.test_plan import KEYS, make_intake, policy, work_item

CLEANING = "cleaning registries"


def maintenance_records(caplog: pytest.LogCaptureFixture, settings: Settings) -> list:
    """The records of one burst run of the jobs worker on an empty queue, which runs RQ's maintenance once."""
    redis = fakeredis.FakeRedis()
    caplog.clear()
    serve_jobs(settings, Bulk(settings, redis), redis, burst=True)
    return [r for r in caplog.records if r.name.startswith("rq")]


def test_rqs_routine_maintenance_logs_at_debug_not_info(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    seen = maintenance_records(caplog, settings.model_copy(update={"log_level": "DEBUG"}))
    cleaning = [r for r in seen if CLEANING in r.getMessage()]
    assert cleaning and {r.levelno for r in cleaning} == {logging.DEBUG}  # it ran, at DEBUG
    seen = maintenance_records(caplog, settings.model_copy(update={"log_level": "INFO"}))
    assert seen and not [r for r in seen if "cleaning" in r.getMessage()]  # at INFO: RQ's other lines only


def test_work_expired_in_the_queue_is_a_summary_now_and_then_each_item_at_debug(
    redis: fakeredis.FakeRedis, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a restart with persisted data meets: a backlog whose deadlines passed. Routine, not an error.
    caplog.set_level(logging.DEBUG, logger="batcher.intake")
    intake = make_intake(redis, Window(policy()))

    def expired(items: int) -> None:
        redis.lpush(KEYS.queue, *(work_item("too late", ttl=-1).encode() for _ in range(items)))
        while redis.llen(KEYS.queue):
            intake.take()

    def said(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "batcher.intake" and r.levelno == level]

    expired(3)
    expired(2)  # (in takes of a few items each: the first said at once, the rest held back)
    assert len(said(logging.DEBUG)) == 5
    assert all(line.endswith(": its deadline passed in the queue") for line in said(logging.DEBUG))
    [first] = said(logging.INFO)
    monkeypatch.setattr(intake_module, "EXPIRED_SAID_EVERY_S", 0.0)  # the interval over
    monkeypatch.setattr(intake_module, "BULK_IDLE_WAIT_S", 0.05)
    intake.take()  # an idle take says what was held back
    summary = "work items whose deadline passed before a worker took them (queued before a restart?)"
    counts = [
        int(m.group(1))
        for line in said(logging.INFO)
        if (m := re.fullmatch(rf"dropped (\d+) {re.escape(summary)}", line))
    ]
    assert said(logging.INFO)[0] == first and len(counts) == 2 and sum(counts) == 5, said(logging.INFO)
    assert intake.expired == 5


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`sentiment COMMAND` with `env`, and no Redis URL but one `env` gives (`serve`: its own)."""
    base = {k: v for k, v in os.environ.items() if k != "SENTIMENT_REDIS_URL"}
    return subprocess.run(
        [sys.executable, "-m", "sentiment.cli", *command],
        env={**base, "SENTIMENT_METRICS_PORT": "0", "SENTIMENT_JOBS_METRICS_PORT": "0", **env},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.mark.slow
def test_a_worker_that_cannot_start_ends_serve_in_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A checkpoint whose weights are garbage: the model worker fails as it loads it, and all serve
    prints is its own line with that cause (not the worker's lines too, nor the jobs worker's, which
    loads no model and was up, nor serve's progress lines)."""
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    env = {"SENTIMENT_MODEL_DIR": str(broken), "SENTIMENT_TORCH_THREADS": "1"}
    done = run(["serve", "--port", str(free_port()), "--grpc-port", "0"], env)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("sentiment serve: ") and "exited while starting (exit 1: sentiment " in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "says"),
    [
        (["api", "--host", "no-such-host.invalid", "--grpc-port", "0"], "(no such host): choose an address"),
        (["api", "--host", "192.0.2.1", "--grpc-port", "0"], "choose an address of this machine with --host"),
        (["worker"], "no Hugging Face checkpoint"),
    ],
)
def test_a_command_given_bad_input_says_why_in_one_line(command: list[str], says: str, tmp_path: Path) -> None:
    done = run(command, {"SENTIMENT_MODEL_DIR": str(tmp_path / "none"), "SENTIMENT_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and says in done.stderr, done.stderr
