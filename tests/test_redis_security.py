"""SENTIMENT_REDIS_URL with a password, an ACL user and TLS: `sentiment api` and `sentiment worker`
as real processes against a redis-server started here (on a free port) that demands them.

CA certificates travel in the URL as redis-py query arguments (`?ssl_ca_certs=/path/ca.pem`), so
one setting holds the whole connection for the API, both workers, the probes and RQ alike.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
import trustme

from core.redis_connect import RedisRefused, reach
from sentiment.embedded import free_port
from tests.conftest import Service

pytestmark = pytest.mark.slow  # (every test here runs the service's processes on a real Redis)

PASSWORD = "correct-horse-battery-staple"
PREFIX = "secured"


@contextmanager
def redis_server(*args: str) -> Iterator[None]:
    """A memory-only redis-server with `args`; the caller knows how to reach it."""
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed (.ci/run installs it)"
    proc = subprocess.Popen(
        [exe, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *args],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        time.sleep(0.3)
        assert proc.poll() is None, "redis-server refused its arguments"
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def wait_for(client: redis.Redis) -> None:
    for _ in range(50):
        try:
            client.ping()
            return
        except redis.ConnectionError:
            time.sleep(0.1)
    client.ping()


def test_a_password_an_acl_user_and_tls(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One server, two doors: TLS for the ACL user "sentiment" (the API's URL), plain TCP with the
    default user's password (the worker's URL). One request proves both URLs work end to end."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    server.cert_chain_pems[0].write_to_path(tmp_path / "server.pem")
    server.private_key_pem.write_to_path(tmp_path / "server.key")
    port, tls_port = free_port(), free_port()
    # "sentiment" may touch only its prefix's keys and channels, and no dangerous command (KEYS,
    # FLUSHALL, CONFIG, ...); the default user needs the password.
    acl = [
        "--requirepass",
        PASSWORD,
        "--user",
        "sentiment",
        "on",
        f">{PASSWORD}",
        f"~{PREFIX}:*",
        f"&{PREFIX}:*",
        "+@all",
        "-@dangerous",
    ]
    tls = [
        "--port",
        str(port),
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        str(tmp_path / "server.pem"),
        "--tls-key-file",
        str(tmp_path / "server.key"),
        "--tls-ca-cert-file",
        str(tmp_path / "ca.pem"),
        "--tls-auth-clients",
        "no",
    ]
    tls_url = f"rediss://sentiment:{PASSWORD}@127.0.0.1:{tls_port}/0?ssl_ca_certs={tmp_path / 'ca.pem'}"
    password_url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    with redis_server(*tls, *acl):
        wait_for(redis.Redis.from_url(tls_url))
        assert redis.Redis.from_url(tls_url).acl_whoami() == "sentiment"
        assert redis.Redis.from_url(password_url).acl_whoami() == "default"
        with pytest.raises(redis.AuthenticationError):  # no password, no service
            redis.Redis.from_url(f"redis://127.0.0.1:{port}/0").set("x", 1)
        with pytest.raises(redis.ConnectionError):  # the server's certificate is verified: no CA, no connection
            redis.Redis.from_url(f"rediss://sentiment:{PASSWORD}@127.0.0.1:{tls_port}/0").ping()
        with pytest.raises(redis.exceptions.NoPermissionError):  # the ACL user is fenced into its prefix
            redis.Redis.from_url(tls_url).set("elsewhere", 1)

        service = Service(tls_url, tiny_model_dir, PREFIX)
        service.start("api", "--port", str(service.port))
        service.env = {**service.env, "SENTIMENT_REDIS_URL": password_url}
        service.start("worker")
        try:
            service.wait_ready()
            response = httpx.post(f"{service.url}/predict", json={"text": ["locked down", "and fine"]}, timeout=60)
            assert response.status_code == 200
            assert len(response.json()["predictions"]) == 2
        finally:
            assert service.stop() == [0, 0]


def test_a_tls_server_whose_certificate_fails_verification_is_a_refusal_not_an_outage(tmp_path: Path) -> None:
    """A rediss:// URL without the CA that signed the server's certificate (or naming another host):
    redis-py raises it as a ConnectionError, which `api` and the workers took for a Redis not up
    yet and waited on for ever, where no wait fixes it."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(tmp_path / "server.pem")
    server.private_key_pem.write_to_path(tmp_path / "server.key")
    tls_port = free_port()
    tls = ["--port", "0", "--tls-port", str(tls_port), "--tls-auth-clients", "no"]
    tls += ["--tls-cert-file", str(tmp_path / "server.pem"), "--tls-key-file", str(tmp_path / "server.key")]
    url = f"rediss://:{PASSWORD}@127.0.0.1:{tls_port}/0"  # (no ssl_ca_certs: the system's, which never signed it)
    with redis_server(*tls):
        for _ in range(50):  # (until it listens)
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", tls_port), timeout=1):
                break
            time.sleep(0.1)
        with pytest.raises(RedisRefused) as refused:
            reach(url, 5)
        [line] = str(refused.value).splitlines()
        assert line.startswith(f"Redis at rediss://:***@127.0.0.1:{tls_port}/0 refused this service (ConnectionError: ")
        assert "CERTIFICATE_VERIFY_FAILED" in line and PASSWORD not in line
