"""`sentiment serve`: the whole service on one machine with nothing else installed.

Starts a Redis-compatible server on a free local port (redis-server when it is on PATH, else
fakeredis' TCP server in this process), `workers` worker processes, a bulk-jobs worker process,
and the API in this process. Ctrl-C stops the API, then the workers (which finish their batch),
then the server.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import redis

import api.server
from sentiment.settings import Settings

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def embedded_redis() -> Iterator[str]:
    """A throwaway, memory-only Redis on 127.0.0.1; yields its URL."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    if shutil.which("redis-server"):
        proc = start_redis_server(port)
        try:
            log.info("embedded redis-server on %s", url)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)
    else:
        from fakeredis import TcpFakeServer

        server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
        threading.Thread(target=server.serve_forever, daemon=True, name="fakeredis").start()
        log.info("embedded fakeredis server on %s (install redis-server for more speed)", url)
        try:
            yield url
        finally:
            server.shutdown()
            server.server_close()


def start_redis_server(port: int) -> subprocess.Popen[bytes]:
    """A memory-only redis-server on 127.0.0.1:`port`, answering PING when this returns."""
    exe = shutil.which("redis-server") or "redis-server"
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_redis(f"redis://127.0.0.1:{port}/0", proc)
    except RuntimeError:
        proc.kill()
        raise
    return proc


def _wait_for_redis(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    client = redis.Redis.from_url(url)
    give_up = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > give_up:
                raise RuntimeError(f"embedded redis-server did not start on {url}") from None
            time.sleep(0.05)


def worker_threads(settings: Settings) -> int | None:
    """Model threads for each of `settings.workers` workers on this machine: SENTIMENT_TORCH_THREADS
    when set, else the cores shared out evenly, at least one each (None for a lone worker: its own
    default, one per core). More model threads than cores collapses every forward (docs/tuning.md)."""
    if settings.torch_threads or settings.workers == 1:
        return settings.torch_threads
    return max(1, (os.cpu_count() or 1) // settings.workers)


def worker_env(settings: Settings) -> dict[str, str]:
    """What each micro-batching worker's environment adds: its share of the cores."""
    threads = worker_threads(settings)
    return {"SENTIMENT_TORCH_THREADS": str(threads)} if threads else {}


def worker_metrics_ports(settings: Settings) -> list[int]:
    """Each worker's metrics port, so that none is left unscraped: SENTIMENT_METRICS_PORT and the
    ports after it, passing over the jobs worker's (9100, 9102, 9103, ... by default); 0 (off) for all
    when it is 0."""
    if not settings.metrics_port:
        return [0] * settings.workers
    free = (p for p in itertools.count(settings.metrics_port) if p != settings.jobs_metrics_port)
    return list(itertools.islice(free, settings.workers))


def serve(settings: Settings, host: str, port: int) -> None:
    """Redis (embedded unless SENTIMENT_REDIS_URL is set), the worker processes, the API here."""
    given = settings.redis_url if settings.redis_url_given else None
    with contextlib.nullcontext(given) if given else embedded_redis() as url:
        env = {**os.environ, "SENTIMENT_REDIS_URL": url}
        commands = [
            ("worker", {**worker_env(settings), "SENTIMENT_METRICS_PORT": str(metrics)})
            for metrics in worker_metrics_ports(settings)
        ] + [("jobs-worker", {})]
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "sentiment.cli", command], env={**env, **extra}, start_new_session=True
            )
            for command, extra in commands
        ]
        try:
            api.server.run(settings.model_copy(update={"redis_url": url}), host, port)
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            for worker in workers:
                try:
                    worker.wait(30)
                except subprocess.TimeoutExpired:
                    worker.kill()

