"""`sentiment serve` keeps its data across a restart: its redis-server writes an append-only file in
the data directory it names at start (one serve at a time), so jobs, results and the cache outlive
it. Ctrl-C says what it waits for, and a running bulk job stops at its next chunk and goes back to
the front of its queue, its retries untouched: the next serve finishes it. `--ephemeral` and
fakeredis keep nothing, and say so."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from rq.job import Job

from api.job_store import JobStore
from core.job_spec import RETRY, SERIALIZER
from core.protocol import Keys
from core.settings import Settings
from sentiment import embedded
from sentiment.embedded import free_port
from tests.conftest import HANG_GUARD_S, answers, wait_for

BIG_JOB = [f"review {n}: " + "the plot wanders but the actors carry it along " * 6 for n in range(10_000)]


def serve_env(model_dir: Path) -> dict[str, str]:
    """Serve's environment here: the model, one thread, no metrics ports, its own Redis and data directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("SENTIMENT_REDIS_URL", "SENTIMENT_DATA_DIR")}
    return env | {
        "SENTIMENT_MODEL_DIR": str(model_dir),
        "SENTIMENT_TORCH_THREADS": "1",
        "SENTIMENT_METRICS_PORT": "0",
        "SENTIMENT_JOBS_METRICS_PORT": "0",
        "SENTIMENT_LOG_LEVEL": "INFO",
    }


@contextlib.contextmanager
def serving(model_dir: Path, log: Path, *args: str, **env: str) -> Iterator[str]:
    """`sentiment serve ARGS` (its environment `serve_env` and `env`) on a free port until Ctrl-C
    (SIGINT), which must end it with exit 0; yields its URL once ready. Its stderr goes to `log`."""
    port = free_port()
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sentiment.cli", "serve", "--port", str(port), *args],
            env=serve_env(model_dir) | env,
            stderr=stderr,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("serve to be ready", lambda: proc.poll() is not None or answers(f"{url}/ready"), 180)
        assert proc.poll() is None, log.read_text()
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0, log.read_text()


def finished(url: str, job_id: str) -> dict:
    return wait_for(
        f"job {job_id} to finish",
        lambda: (doc := httpx.get(f"{url}/jobs/{job_id}").json())["status"] == "finished" and doc,
        180,
    )


@pytest.mark.slow
def test_serve_keeps_jobs_results_and_cache_across_a_restart_and_ctrl_c_requeues_a_running_job(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    data, log = tmp_path / "data", tmp_path / "serve.log"
    texts = ["I love you.", "I hate you."]
    with serving(tiny_model_dir, log, "--data-dir", str(data)) as url:
        assert f"keeping jobs, results and the cache in {data}" in log.read_text()
        # A second serve on the same directory would corrupt its file: refused in one line.
        second = subprocess.run(
            [sys.executable, "-m", "sentiment.cli", "serve", "--port", str(free_port()), "--data-dir", str(data)],
            env=serve_env(tiny_model_dir),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1
        assert second.stderr.splitlines()[-1] == (
            f"sentiment serve: {data} is in use by another sentiment serve: name another --data-dir, or run --ephemeral"
        )
        first = httpx.post(f"{url}/predict", json={"text": texts})
        assert (first.status_code, first.headers["x-cache"]) == (200, "miss")
        small = httpx.post(f"{url}/jobs", json={"text": texts}).json()["job_id"]
        small_done = finished(url, small)
        big = httpx.post(f"{url}/jobs", json={"text": BIG_JOB}).json()["job_id"]
        wait_for("the big job's first chunk", lambda: httpx.get(f"{url}/jobs/{big}").json()["progress"]["done"] > 0)
    # Ctrl-C came while the big job ran: serve said what it waited for, and the job stopped at a chunk.
    said = log.read_text()
    assert "stopping: waiting (at most 30 s) for worker-1 to finish its forwards under way, jobs-worker to " in said
    stopped = re.search(rf"job {big} stopped after (\d+) of 10000 texts; back at the front of the queue", said)
    assert stopped and int(stopped.group(1)) < len(BIG_JOB), said
    assert "jobs-worker stopped (exit 0)" in said and "killed" not in said

    with serving(tiny_model_dir, log, "--data-dir", str(data)) as url:
        assert httpx.get(f"{url}/jobs/{small}").json() == small_done
        again = httpx.post(f"{url}/predict", json={"text": texts})
        assert (again.json(), again.headers["x-cache"]) == (first.json(), "hit")
        redis_url = re.search(r"Redis on (\S+) \(embedded redis-server", log.read_text())
        assert redis_url
        job = Job.fetch(big, connection=redis.Redis.from_url(redis_url.group(1)), serializer=SERIALIZER)
        assert job.retries_left == RETRY.max, "a stop is not a failure: no retry spent"
        assert len(finished(url, big)["predictions"]) == len(BIG_JOB)

    with serving(tiny_model_dir, log, "--ephemeral", SENTIMENT_DATA_DIR=str(data)) as url:  # (the option wins)
        assert "memory only (--ephemeral)" in log.read_text()
        assert httpx.get(f"{url}/jobs/{small}").status_code == 404


@pytest.mark.slow
def test_serves_redis_is_bounded_and_the_cache_yields_never_queued_work_or_a_job(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Keys of a deployment of their own beside serve's (its workers take none of them): what a busy
    # serve's Redis holds, as the API and the workers write it; cache entries of 4 times its bound.
    settings = Settings(key_prefix="bounded")
    keys, item, entries = Keys(settings.key_prefix), b"an item queued by the API", 40_000
    log = tmp_path / "serve.log"
    with serving(tiny_model_dir, log, "--data-dir", str(tmp_path / "data"), SENTIMENT_EMBEDDED_REDIS_MAX_MB="4"):
        found = re.search(r"Redis on (\S+) \(embedded redis-server", log.read_text())
        assert found
        client = redis.Redis.from_url(found.group(1))
        client.lpush(keys.queue, item)
        client.lpush(keys.processing("a-worker"), item)
        jobs = JobStore(client, settings)
        job = jobs.create(["a text of a queued job"])
        for start in range(0, entries, 1000):
            with client.pipeline(transaction=False) as pipe:
                for n in range(start, start + 1000):
                    pipe.set(keys.cache("v1", f"text {n}"), b"s" * 300, ex=settings.cache_ttl_s)
                pipe.execute()
        assert client.info("stats")["evicted_keys"] > 0
        assert sum(1 for _ in client.scan_iter(f"{keys.prefix}:cache:*", count=1000)) < entries
        assert client.lrange(keys.queue, 0, -1) == [item]
        assert client.lrange(keys.processing("a-worker"), 0, -1) == [item]
        assert jobs.view(job)["status"] == "queued"


def test_without_redis_server_serve_says_nothing_persists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded.shutil, "which", lambda name: None)
    with embedded.embedded_redis(Path("unused")) as url:
        assert redis.Redis.from_url(url).ping()
        said = embedded.embedded_kind(url, Path("unused"))  # what serve's "up" line says of its Redis
    assert "nothing persists, jobs, results and the cache end with serve" in said


def refused_data_dir(model_dir: Path, data: Path, **env: str) -> list[str]:
    """What `sentiment serve --data-dir DATA` (its environment `serve_env` and `env`) wrote, line by
    line, having exited 1."""
    done = subprocess.run(
        [sys.executable, "-m", "sentiment.cli", "serve", "--port", str(free_port()), "--data-dir", str(data)],
        env=serve_env(model_dir) | env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert done.returncode == 1, done.stderr
    return done.stderr.strip().splitlines()


@pytest.mark.slow
def test_a_data_directory_that_cannot_be_made_ends_serve_with_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    data = tmp_path / "a-file" / "data"  # under a regular file: nobody can make it, root included
    assert refused_data_dir(tiny_model_dir, data) == [
        f"sentiment serve: cannot keep data in {data} (Not a directory): name another --data-dir, or run --ephemeral"
    ]


@pytest.mark.slow
def test_a_data_directory_in_a_symlink_loop_ends_serve_with_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)  # (a link to itself: in the way of a directory, as a file would be)
    assert refused_data_dir(tiny_model_dir, loop) == [
        f"sentiment serve: cannot keep data in {loop} (File exists): name another --data-dir, or run --ephemeral"
    ]


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on a file system with no space left: a tmpfs of its own, filled (root alone may mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        with (disk / "filler").open("wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"x" * 4096)
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_a_full_disk_ends_serve_saying_so(tiny_model_dir: Path, full_disk: Path) -> None:
    # redis-server says why it gave up in its log, which the full disk refuses too.
    data = full_disk / "data"
    assert refused_data_dir(tiny_model_dir, data) == [
        f"sentiment serve: cannot keep data in {data} (No space left on device): "
        "free some space, name another --data-dir, or run --ephemeral"
    ]


@pytest.mark.slow
def test_a_redis_server_that_will_not_start_ends_serve_with_its_own_reason(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "appendonlydir").write_text("")  # where redis-server keeps its append-only files: a file instead
    assert refused_data_dir(tiny_model_dir, data) == [
        f"sentiment serve: redis-server would not start in {data} (exit 1): "
        "Can't open or create append-only dir appendonlydir: Not a directory"
    ]


@pytest.mark.slow
def test_a_redis_server_the_system_cannot_run_ends_serve_with_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    # On PATH and executable, but no program for this machine (another architecture's build).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "redis-server").write_bytes(b"\x7fELF\x02\x01\x01not a program")
    (bin_dir / "redis-server").chmod(0o755)
    data = tmp_path / "data"
    assert refused_data_dir(tiny_model_dir, data, PATH=f"{bin_dir}:{os.environ['PATH']}") == [
        f"sentiment serve: redis-server would not start in {data}: {bin_dir / 'redis-server'}: Exec format error"
    ]


@pytest.mark.slow
def test_a_corrupt_append_only_file_ends_serve_with_redis_servers_reason_not_its_check(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # A base file whose checksum no longer matches (a disk's bit flip): redis-server logs why it gives
    # up, then runs its RDB check, whose first line (`[offset 0] Checking RDB file ...`) is its last.
    data = tmp_path / "data"
    data.mkdir()
    first = embedded.start_redis_server(free_port(), data)  # (it makes the files)
    first.terminate()
    first.wait()
    [base] = (data / "appendonlydir").glob("*.base.rdb")
    kept = base.read_bytes()
    base.write_bytes(kept[:-1] + bytes([kept[-1] ^ 0xFF]))
    [line] = refused_data_dir(tiny_model_dir, data)
    assert re.fullmatch(
        rf"sentiment serve: redis-server would not start in {re.escape(str(data))} \(exit 1\): "
        r"Internal error in RDB reading offset 0, function at rdb\.c:\d+ -> RDB CRC error",
        line,
    ), line
