"""A wrong SENTIMENT_REDIS_URL met at start, as a person meets it, by every command run as a real
process: a URL that is not one, or a Redis that turns the service away (a wrong password, an unknown
user, a database it lacks) ends the command with one line naming the URL, its password masked, and
what failed. A Redis that cannot be reached ends `serve` so too; `api`, `worker` and `jobs-worker`
say once what they wait for and serve once it comes (Kubernetes starts them beside Redis)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from core.liveness import jobs_worker_alive_on_this_host, worker_alive_on_this_host
from core.settings import SettingsError, from_environment
from sentiment.embedded import free_port
from tests.conftest import HANG_GUARD_S, RedisServer, wait_for

PASSWORD = "correct-horse-battery-staple"
PREFIX = "at-start"


def command_line(command: str) -> list[str]:
    """`sentiment COMMAND`, on a free port where it listens."""
    ports = ["--port", str(free_port())] if command in ("serve", "api") else []
    return [sys.executable, "-m", "sentiment.cli", command, *ports]


def environment(url: str, model_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "SENTIMENT_REDIS_URL": url,
        "SENTIMENT_MODEL_DIR": str(model_dir),
        "SENTIMENT_KEY_PREFIX": PREFIX,
        "SENTIMENT_TORCH_THREADS": "1",
        "SENTIMENT_METRICS_PORT": "0",
        "SENTIMENT_JOBS_METRICS_PORT": "0",
    }


def ended(command: str, url: str, model_dir: Path) -> subprocess.CompletedProcess[str]:
    """`sentiment COMMAND` run to its end against `url` (a hang trips the guard)."""
    return subprocess.run(
        command_line(command),
        env=environment(url, model_dir),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )


def readiness(url: str) -> str | None:
    """/ready's reason for not being ready; None while it does not answer."""
    try:
        return httpx.get(url, timeout=5).json().get("reason")
    except httpx.TransportError:
        return None


@pytest.fixture
def locked(redis_server: RedisServer) -> RedisServer:
    """A test's own redis-server that demands `PASSWORD`."""
    redis.Redis.from_url(redis_server.url).config_set("requirepass", PASSWORD)
    return redis_server


@pytest.mark.parametrize("command", ["serve", "api", "worker", "jobs-worker"])
def test_a_wrong_password_ends_every_command_with_one_line_naming_the_url_masked(
    command: str, locked: RedisServer, tiny_model_dir: Path
) -> None:
    done = ended(command, f"redis://:wrong-{PASSWORD}@127.0.0.1:{locked.port}/0", tiny_model_dir)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"sentiment {command}: Redis at redis://:***@127.0.0.1:{locked.port}/0 refused this service "
        "(AuthenticationError: invalid username-password pair or user is disabled.): check SENTIMENT_REDIS_URL"
    )
    assert PASSWORD not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["serve", "api", "worker", "jobs-worker"])
def test_a_redis_that_would_evict_state_ends_every_command_with_the_policy_it_needs(
    command: str, redis_server: RedisServer, tiny_model_dir: Path
) -> None:
    # Queues, processing lists, heartbeats and jobs have no expiry: `allkeys-*` would evict them at
    # maxmemory as readily as cache entries. `volatile-lru` evicts only what expires: the cache.
    redis.Redis.from_url(redis_server.url).config_set("maxmemory-policy", "allkeys-lru")
    done = ended(command, redis_server.url, tiny_model_dir)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"sentiment {command}: Redis at {redis_server.url} evicts any key at its maxmemory (maxmemory-policy "
        "allkeys-lru), this service's queues and jobs too: set maxmemory-policy to volatile-lru or noeviction "
        "(docs/reliability.md)"
    )


@pytest.mark.parametrize(
    ("userinfo", "db", "why"),
    [
        ("intruder:" + PASSWORD, 0, "AuthenticationError: invalid username-password pair or user is disabled."),
        ("", 0, "AuthenticationError: "),  # (the server's words for it vary with its version)
        (":" + PASSWORD, 99, "ResponseError: DB index is out of range"),
    ],
    ids=["unknown user", "no password", "no such database"],
)
def test_a_redis_that_turns_the_api_away_ends_it_with_the_reason(
    userinfo: str, db: int, why: str, locked: RedisServer, tiny_model_dir: Path
) -> None:
    login = f"{userinfo}@" if userinfo else ""
    done = ended("api", f"redis://{login}127.0.0.1:{locked.port}/{db}", tiny_model_dir)
    assert done.returncode == 1, done.stderr
    shown = {"": "", ":" + PASSWORD: ":***@"}.get(userinfo, "intruder:***@")
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(
        f"sentiment api: Redis at redis://{shown}127.0.0.1:{locked.port}/{db} refused this service ({why}"
    )
    assert line.endswith("): check SENTIMENT_REDIS_URL") and PASSWORD not in line


@pytest.mark.slow
def test_an_unreachable_redis_ends_serve_with_one_line(tiny_model_dir: Path) -> None:
    port = free_port()  # nothing listens there
    done = ended("serve", f"redis://:{PASSWORD}@127.0.0.1:{port}/0", tiny_model_dir)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"sentiment serve: Redis at redis://:***@127.0.0.1:{port}/0 is unreachable (ConnectionError: Error 111 "
        f"connecting to 127.0.0.1:{port}. Connection refused.): start it, or unset SENTIMENT_REDIS_URL for an "
        "embedded one"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("url", ["localhost:6390", f"redis://:{PASSWORD}@localhost:63q0/0"])
@pytest.mark.parametrize("command", ["serve", "api", "worker", "jobs-worker"])
def test_a_malformed_url_is_a_refused_setting_shown_without_its_password(
    command: str, url: str, tiny_model_dir: Path
) -> None:
    done = ended(command, url, tiny_model_dir)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    shown = url.replace(PASSWORD, "***")
    assert line.startswith(f"sentiment: SENTIMENT_REDIS_URL={shown!r} is refused: a redis://, rediss://, ")
    assert PASSWORD not in line


@pytest.mark.slow
@pytest.mark.parametrize("command", ["api", "worker", "jobs-worker"])
def test_a_process_started_before_its_redis_says_once_what_it_waits_for_and_serves_once_it_comes(
    command: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    server = RedisServer()  # its port, nothing listening there yet
    url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
    log, args = tmp_path / f"{command}.log", command_line(command)
    with log.open("w") as stderr:
        proc = subprocess.Popen(args, env=environment(url, tiny_model_dir), stderr=stderr)
    try:
        waiting = f"WARNING sentiment [{proc.pid}] Redis at redis://:***@127.0.0.1:{server.port}/0 is unreachable ("
        wait_for("the line saying what it waits for", lambda: proc.poll() is not None or waiting in log.read_text())
        assert proc.poll() is None, log.read_text()
        server.start()
        redis.Redis.from_url(server.url).config_set("requirepass", PASSWORD)
        client = redis.Redis.from_url(url)
        if command == "worker":
            wait_for("the worker to serve", lambda: worker_alive_on_this_host(client, PREFIX, proc.pid))
        elif command == "jobs-worker":
            wait_for(
                "the jobs worker to serve", lambda: jobs_worker_alive_on_this_host(client, f"{PREFIX}-jobs", proc.pid)
            )
        else:  # (its port is the last of its arguments)
            ready = f"http://127.0.0.1:{args[-1]}/ready"
            wait_for("the API to reach Redis", lambda: readiness(ready) == "no live worker")
        assert log.read_text().count("is unreachable") == 1
        assert PASSWORD not in log.read_text()
    finally:
        proc.kill()  # (its stop is another test's: a worker at low priority may wait long for a core)
        proc.wait()
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
@pytest.mark.parametrize("command", ["api", "worker", "jobs-worker"])
def test_ctrl_c_while_a_process_starts_stops_it_cleanly_as_sigterm_does(
    command: str, sig: signal.Signals, tiny_model_dir: Path
) -> None:
    # A person who gives up waiting (the worker loads its model first): exit 0, as `serve` and as a
    # process that serves, not a KeyboardInterrupt traceback. Here a Redis that takes the connection
    # and never answers holds the process in its start for as long as the test likes.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        env = environment(url, tiny_model_dir) | {"SENTIMENT_REDIS_TIMEOUT_S": "600"}
        proc = subprocess.Popen(command_line(command), env=env, stderr=subprocess.PIPE, text=True)
        silent.settimeout(HANG_GUARD_S)
        connection, _ = silent.accept()  # its start-up PING, never answered
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=HANG_GUARD_S)
        connection.close()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis://:hunter2@localhost:0/0", "the port must be a number from 1 to 65535"),
        ("redis://:hunter2@localhost/x", "the path must be /db, a number"),
        ("rediss://:hunter2@localhost/1/2", "the path must be /db, a number"),
    ],
)
def test_a_url_redis_py_would_read_as_another_port_or_database_is_a_refused_setting(
    url: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py reads port 0 as 6379, a path that is no number as database 0 and `/1/2` as database 12:
    a silent connection to another Redis or database, where the URL should be refused in one line."""
    monkeypatch.setenv("SENTIMENT_REDIS_URL", url)
    with pytest.raises(SettingsError) as raised:
        from_environment()
    [line] = str(raised.value).splitlines()
    assert line.endswith(f"({why})") and "hunter2" not in line


@pytest.mark.slow
@pytest.mark.parametrize("command", ["api", "worker"])
def test_a_unix_socket_url_serves_like_a_tcp_one(command: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The settings take a unix:// URL, so every client of the process must connect by it: redis-py
    refuses TCP keepalive options for a unix socket's connection (a TypeError, then a traceback)."""
    socket_path = tmp_path / "redis.sock"
    exe = shutil.which("redis-server") or "redis-server"
    args = [exe, "--port", "0", "--unixsocket", str(socket_path), "--save", "", "--appendonly", "no"]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    client = redis.Redis(unix_socket_path=str(socket_path))
    try:
        wait_for("redis-server to listen on its socket", lambda: socket_path.exists() and client.ping())
        log, args = tmp_path / f"{command}.log", command_line(command)
        with log.open("w") as stderr:
            proc = subprocess.Popen(args, env=environment(f"unix://{socket_path}", tiny_model_dir), stderr=stderr)
        try:
            if command == "worker":
                serving = lambda: worker_alive_on_this_host(client, PREFIX, proc.pid)  # noqa: E731
            else:  # (its port is the last of its arguments)
                serving = lambda: readiness(f"http://127.0.0.1:{args[-1]}/ready") == "no live worker"  # noqa: E731
            wait_for(f"the {command} to serve", lambda: proc.poll() is not None or serving())
            assert proc.poll() is None, log.read_text()
        finally:
            proc.kill()
            proc.wait()
    finally:
        server.kill()
        server.wait()
