"""`sentiment serve`'s embedded Redis (redis-server when installed, else fakeredis' TCP server), and
its workers' share of the cores."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import redis

from core.settings import Settings
from sentiment import embedded
from tests.conftest import wait_for


@pytest.mark.slow
@pytest.mark.parametrize("has_redis_server", [True, False])
def test_embedded_redis_serves_the_commands_the_service_uses(
    has_redis_server: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not has_redis_server:
        monkeypatch.setattr(shutil, "which", lambda name: None)
    with embedded.embedded_redis() as url:
        client = redis.Redis.from_url(url)
        client.lpush("q", b"item")
        assert client.brpoplpush("q", "processing", 1) == b"item"
        assert client.lmove("processing", "q", "LEFT", "RIGHT") == b"item"
        client.set("result", b"r", ex=60)
        assert client.getdel("result") == b"r"
        pubsub = client.pubsub()
        pubsub.subscribe("done")
        assert pubsub.get_message(timeout=1)["type"] == "subscribe"
        client.publish("done", b"id")
        assert pubsub.get_message(timeout=1)["data"] == b"id"
        pubsub.close()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()  # gone with its context


@pytest.mark.slow
def test_a_redis_server_loading_a_large_append_only_file_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, keys = tmp_path / "data", 300
    with embedded.embedded_redis(data) as url:
        client = redis.Redis.from_url(url)
        for n in range(keys):  # incompressible values: the load answers LOADING between them
            client.set(f"key:{n}", os.urandom(2000))
        client.bgrewriteaof()
        wait_for("the rewritten append-only file", lambda: client.info("persistence")["aof_rewrite_in_progress"] == 0)
    # redis-server as it loads a large file: slowly, each key delayed (a debugging option of its own),
    # answering LOADING meanwhile; longer than any bound a start could put on a server that answers.
    slow = tmp_path / "redis-server"
    real = shutil.which("redis-server")
    slow.write_text(
        f'#!/bin/sh\nexec {real} "$@" --key-load-delay 50000 --loading-process-events-interval-bytes 1024\n'
    )
    slow.chmod(0o755)
    monkeypatch.setattr(embedded.shutil, "which", lambda name: str(slow))
    with embedded.embedded_redis(data) as url:
        assert redis.Redis.from_url(url).dbsize() == keys


@pytest.mark.parametrize(
    ("workers", "torch_threads", "cores", "each"),
    [(1, None, 8, None), (2, None, 8, 4), (3, None, 8, 2), (4, None, 2, 1), (2, 3, 8, 3), (1, 2, 8, 2)],
)
def test_workers_share_the_cores_unless_torch_threads_are_set(
    workers: int,
    torch_threads: int | None,
    cores: int,
    each: int | None,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """N workers never run more model threads than the machine has cores (a lone worker keeps its own default)."""
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    settings = settings.model_copy(update={"workers": workers, "torch_threads": torch_threads})
    assert embedded.worker_threads(settings) == each
    assert embedded.worker_env(settings) == ({} if each is None else {"SENTIMENT_TORCH_THREADS": str(each)})


@pytest.mark.parametrize(
    ("workers", "metrics_port", "jobs_metrics_port", "ports"),
    [
        (1, 9100, 9101, [9100]),
        (3, 9100, 9101, [9100, 9102, 9103]),
        (2, 9200, 9101, [9200, 9201]),
        (2, 0, 9101, [0, 0]),
        (4, 7999, 9101, [7999, 8002, 8003, 8004]),  # (not the API's 8000 nor its gRPC's 8001: no metrics there)
    ],
)
def test_each_worker_gets_a_metrics_port_of_its_own(
    workers: int, metrics_port: int, jobs_metrics_port: int, ports: list[int], settings: Settings
) -> None:
    settings = settings.model_copy(
        update={
            "workers": workers,
            "metrics_port": metrics_port,
            "jobs_metrics_port": jobs_metrics_port,
            "grpc_port": 8001,
        }
    )
    assert embedded.worker_metrics_ports(settings, 8000) == ports
