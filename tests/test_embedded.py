"""`sentiment serve`'s embedded Redis: redis-server when installed, else fakeredis' TCP server."""

from __future__ import annotations

import shutil

import pytest
import redis

from sentiment import embedded


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
