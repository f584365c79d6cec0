"""Redis Sentinel: the redis+sentinel:// URL form, and a primary killed under load on real binaries
(a primary, a replica and three sentinels on loopback)."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio
import rq
import yaml
from redis.asyncio.connection import BlockingConnectionPool as AsyncBlockingPool
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelPool
from redis.sentinel import SentinelConnectionPool

from api.results import ResultWaiter
from core.protocol import Keys, new_id, prediction
from core.redis_connect import (
    RedisRefused,
    RedisUnreachable,
    SentinelUrl,
    async_client,
    link_options,
    reach,
    sync_client,
)
from core.settings import SettingsError, from_environment
from model_store.classifier import Classifier
from sentiment.embedded import free_port, start_redis_server
from tests.conftest import SCORE_ABS, RedisServer, Service, answers, wait_for
from tests.test_faults import Load, assert_correct
from tests.test_k8s import tool

SERVICE = "mymaster"


def test_the_sentinel_url_names_the_sentinels_the_primary_and_its_credentials() -> None:
    url = SentinelUrl.parse("redis+sentinel://app:s%40cret@h1:26380,h2,[::1]:26381/mymaster/3?sentinel_password=x")
    assert url == SentinelUrl(
        sentinels=[("h1", 26380), ("h2", 26379), ("::1", 26381)],
        service="mymaster",
        db=3,
        username="app",
        password="s@cret",
        sentinel_password="x",
    )
    bare = SentinelUrl.parse("redis+sentinel://h1/mymaster")
    assert bare is not None and (bare.db, bare.password, bare.sentinel_password) == (0, None, None)
    assert SentinelUrl.parse("redis://:pw@h1:6379/0") is None
    assert SentinelUrl.parse("rediss://h1:6379/0") is None


@pytest.mark.parametrize(
    "url", ["redis+sentinel://:hunter2@h1/", "redis+sentinel://:hunter2@h1/m/x", "redis+sentinel://:hunter2@h1/m?db=1"]
)
def test_a_malformed_sentinel_url_is_refused_without_quoting_it(url: str) -> None:
    with pytest.raises(ValueError) as raised:
        SentinelUrl.parse(url)
    assert "hunter2" not in str(raised.value)


def test_both_forms_keep_the_apis_blocking_pool_and_every_client_notices_a_silent_peer() -> None:
    plain = async_client("redis://127.0.0.1:1/2", 4.0, max_connections=7, pool_wait_s=3.5)
    sentinel = async_client("redis+sentinel://127.0.0.1:1/m/2", 4.0, max_connections=7, pool_wait_s=3.5)
    for client in (plain, sentinel):
        pool = client.connection_pool
        assert isinstance(pool, AsyncBlockingPool)
        assert (pool.max_connections, pool.timeout) == (7, 3.5)
        assert pool.connection_kwargs["db"] == 2
        assert pool.connection_kwargs | link_options(4.0) == pool.connection_kwargs  # timeouts and keepalive
    assert type(plain.connection_pool) is AsyncBlockingPool  # a plain URL: exactly as before
    assert isinstance(sentinel.connection_pool, AsyncSentinelPool)
    named = sync_client("redis+sentinel://:pw@127.0.0.1:1/m", 4.0, client_name="w", max_connections=3)
    assert isinstance(named.connection_pool, SentinelConnectionPool)
    assert named.connection_pool.max_connections == 3
    kwargs = named.connection_pool.connection_kwargs
    assert (kwargs["client_name"], kwargs["password"], kwargs["db"]) == ("w", "pw", 0)
    assert kwargs["socket_timeout"] == 4.0 and kwargs["socket_keepalive"]
    sentinels = named.connection_pool.sentinel_manager.sentinels
    assert all(s.connection_pool.connection_kwargs["socket_keepalive"] for s in sentinels)
    plain_sync = sync_client("redis://127.0.0.1:1/0", 4.0, socket_timeout=2.0)
    assert type(plain_sync.connection_pool) is redis.ConnectionPool
    assert plain_sync.connection_pool.connection_kwargs["socket_timeout"] == 2.0  # the caller's option wins
    keepalive = plain_sync.connection_pool.connection_kwargs["socket_keepalive_options"]
    assert keepalive[socket.TCP_KEEPIDLE] == 4 and keepalive[socket.TCP_USER_TIMEOUT] == 4000


class Sentinels:
    """A primary, its replica and three sentinels (quorum 2) on loopback, memory only."""

    def __init__(self, tmp_path: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.primary_port, self.replica_port = free_port(), free_port()
        self.primary = self._track(start_redis_server(self.primary_port))
        replica = [*self._server(self.replica_port), "--replicaof", "127.0.0.1", str(self.primary_port)]
        replica += ["--dir", str(tmp_path), "--replica-read-only", "no"]  # (its snapshot; a test's loss)
        self._track(subprocess.Popen(replica, stdout=subprocess.DEVNULL, start_new_session=True))
        self.ports = [free_port() for _ in range(3)]
        for port in self.ports:
            conf = tmp_path / f"sentinel-{port}.conf"  # a sentinel rewrites its own file: one each
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndaemonize no\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
            )
            exe = shutil.which("redis-server") or "redis-server"
            self._track(
                subprocess.Popen([exe, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, start_new_session=True)
            )
        self.url = f"redis+sentinel://{','.join(f'127.0.0.1:{p}' for p in self.ports)}/{SERVICE}/0"
        self.clients = [redis.Redis(port=p, socket_timeout=2, decode_responses=True) for p in self.ports]
        wait_for("the replica to sync", lambda: self._replica_synced())
        wait_for("each sentinel to know the replica and the other two", lambda: all(map(self._sees_all, self.clients)))

    @staticmethod
    def _server(port: int) -> list[str]:
        exe = shutil.which("redis-server") or "redis-server"
        return [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

    def _track(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.procs.append(proc)
        return proc

    def _replica_synced(self) -> bool:
        try:
            info = redis.Redis(port=self.replica_port, socket_timeout=2).info("replication")
        except redis.ConnectionError:
            return False
        return info.get("master_link_status") == "up"

    @staticmethod
    def _sees_all(sentinel: redis.Redis) -> bool:
        try:
            return len(sentinel.sentinel_slaves(SERVICE)) == 1 and len(sentinel.sentinel_sentinels(SERVICE)) == 2
        except redis.ConnectionError:
            return False

    def primary_addr(self) -> tuple[str, int]:
        host, port = self.clients[0].sentinel_get_master_addr_by_name(SERVICE)
        return host, int(port)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[Sentinels]:
    assert shutil.which("redis-server"), "redis-server is not installed (.ci/run installs it)"
    cluster = Sentinels(tmp_path)
    yield cluster
    cluster.stop()


@pytest.mark.slow
def test_a_killed_primary_costs_no_500_and_no_accepted_request_once_its_replica_is_promoted(
    sentinels: Sentinels, tiny_model_dir: Path, classifier: Classifier
) -> None:
    env = {
        "SENTIMENT_HEARTBEAT_TTL_S": "2",
        "SENTIMENT_REQUEST_TIMEOUT_S": "20",  # the deadline an accepted request waits out a failover within
        "SENTIMENT_MAX_WAIT_MS": "20",
        "SENTIMENT_TORCH_THREADS": "1",
    }
    svc = Service(sentinels.url, tiny_model_dir, "sentinel", **env)
    try:
        svc.start("api", "--port", str(svc.port))
        svc.start("worker")
        svc.start("jobs-worker")
        svc.wait_ready()
        wait_for("the jobs worker to register", lambda: rq.Worker.count(connection=sync_client(sentinels.url, 2.0)))
        with Load([svc.url], "sentinel", clients=4, timeout_s=30) as load:
            load.wait_answered(10)
            sentinels.primary.send_signal(signal.SIGKILL)
            killed_at = time.time()
            wait_for(
                "the sentinels to promote the replica", lambda: sentinels.primary_addr()[1] == sentinels.replica_port
            )
            probe = itertools.count()
            wait_for(
                "a /predict answer from the promoted replica",
                lambda: (
                    httpx.post(f"{svc.url}/predict", json={"text": [f"probe {next(probe)}"]}, timeout=30).status_code
                    == 200
                ),
            )
            load.wait_answered(10)
            outcomes = load.stop()
        # RQ reconnected through Sentinel too: a job submitted now runs to the end.
        job = httpx.post(f"{svc.url}/jobs", json={"text": ["after the failover"]}, timeout=10).json()["job_id"]
        view = wait_for(
            "the job to finish",
            lambda: (
                (v := httpx.get(f"{svc.url}/jobs/{job}", timeout=10).json())["status"] in ("finished", "failed") and v
            ),
        )
        assert view["status"] == "finished"
        assert [p.poll() for p in svc.procs] == [None, None, None]  # recovered by itself: nothing restarted
    finally:
        svc.stop()
    # The kill met requests in flight: each got a 503 if its push failed, else (accepted) its answer
    # once the replica served. No 500, no client timeout, and no 504: an accepted request waits out
    # the failover within its deadline, never loses to it.
    assert [o for o in outcomes if o.started < killed_at < o.ended]
    failed = [o for o in outcomes if o.status != 200]
    assert [(o.status, o.error) for o in failed if o.status != 503] == []
    assert all(o.retry_after for o in failed)
    assert_correct(outcomes, classifier)
    # So the answers stop for less than a request's deadline: the outage ends within it.
    answered = sorted(o.ended for o in outcomes if o.status == 200)
    assert max(b - a for a, b in itertools.pairwise(answered)) < float(env["SENTIMENT_REQUEST_TIMEOUT_S"])


@pytest.mark.slow
def test_work_the_failover_lost_is_pushed_again_by_the_waiting_api(
    sentinels: Sentinels, tiny_model_dir: Path, classifier: Classifier
) -> None:
    """Asynchronous replication's loss, made sure of: the queued item is taken off the replica
    (writable here) before the primary dies, and no worker runs to take it first."""
    svc = Service(sentinels.url, tiny_model_dir, "requeue", SENTIMENT_REQUEST_TIMEOUT_S="40")
    try:
        svc.start("api", "--port", str(svc.port))
        wait_for("the API to listen", lambda: answers(f"{svc.url}/health"))
        replica, queue = redis.Redis(port=sentinels.replica_port), Keys("requeue").queue
        answer: list[httpx.Response] = []
        text = "a request accepted before the failover"
        asking = threading.Thread(
            target=lambda: answer.append(httpx.post(f"{svc.url}/predict", json={"text": [text]}, timeout=60))
        )
        asking.start()
        wait_for("the work item to reach the replica", lambda: replica.llen(queue) == 1)
        replica.delete(queue)  # (not replicated: the replica never got it)
        sentinels.primary.send_signal(signal.SIGKILL)
        wait_for("the sentinels to promote the replica", lambda: sentinels.primary_addr()[1] == sentinels.replica_port)
        svc.start("worker")
        asking.join(60)
        assert not asking.is_alive()
        [response] = answer
        assert response.status_code == 200
        [got] = response.json()["predictions"]
        [want] = [prediction(classifier.labels, p) for p in classifier.forward(classifier.tokenize([text]))]
        assert [s["label"] for s in got] == [s["label"] for s in want]
        assert [s["score"] for s in got] == pytest.approx([s["score"] for s in want], abs=SCORE_ABS)
    finally:
        svc.stop()


def test_after_a_blip_only_work_that_is_nowhere_is_pushed_again(redis_url: str) -> None:
    """A waiter pushes its item again only if it is not queued, not held by a worker and not answered:
    a subscription blip must not queue again the work every waiting request already has in hand."""
    keys = Keys(f"push-{new_id()[:8]}")
    direct = redis.Redis.from_url(redis_url)

    async def push(request: str, item: bytes) -> int:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            await ResultWaiter(client, keys, requeue=True)._push_if_lost(request, item)
        finally:
            await client.aclose()
        return direct.lrange(keys.queue, 0, -1).count(item)

    queued, held, answered, lost = (new_id() for _ in range(4))
    direct.lpush(keys.queue, queued)
    direct.sadd(keys.workers, "w1")
    direct.lpush(keys.processing("w1"), held)
    direct.set(keys.result(answered), b"{}")
    assert asyncio.run(push(queued, queued.encode())) == 1  # still once
    assert asyncio.run(push(held, held.encode())) == 0
    assert asyncio.run(push(answered, answered.encode())) == 0
    assert asyncio.run(push(lost, lost.encode())) == 1
    assert asyncio.run(push(lost, lost.encode())) == 1  # a second blip: queued now, not again


@pytest.mark.slow
def test_the_k8s_sentinel_component_points_the_service_and_keda_at_the_sentinels(tmp_path: Path) -> None:
    """The prod overlay with its commented-out Sentinel component switched on."""
    k8s = shutil.copytree(Path(__file__).resolve().parent.parent / "k8s", tmp_path / "k8s")
    prod = k8s / "overlays/prod/kustomization.yaml"
    switched = prod.read_text().replace("# components:\n#   - ", "components:\n  - ")
    assert switched != prod.read_text()
    prod.write_text(switched)
    out = subprocess.run([tool("kubectl"), "kustomize", str(prod.parent)], capture_output=True, text=True, check=True)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    [config] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "sentiment-config"]
    url = SentinelUrl.parse(config["data"]["SENTIMENT_REDIS_URL"])
    assert url is not None and url.sentinels[0][1] == 26379
    for scaled in (d for d in docs if d["kind"] == "ScaledObject"):
        triggers = [t for t in scaled["spec"]["triggers"] if t["type"].startswith("redis")]
        assert triggers, scaled["metadata"]["name"]
        for trigger in triggers:
            assert trigger["type"] == "redis-sentinel"
            assert trigger["metadata"]["sentinelMaster"] == url.service
            assert trigger["metadata"]["addresses"] == ",".join(f"{h}:{p}" for h, p in url.sentinels)


@pytest.mark.parametrize(
    ("sentinels", "why"),
    [
        ("h1:0", "a sentinel's port must be a number from 1 to 65535"),
        ("h1:70000,h2", "a sentinel's port must be a number from 1 to 65535"),
        ("h1:2637x", "a sentinel's port must be a number from 1 to 65535"),
        ("::1", "an IPv6 sentinel must be in brackets, [address]:port"),
        ("[::1]x", "an IPv6 sentinel must be [address] or [address]:port"),
    ],
)
def test_a_sentinel_that_would_be_another_host_or_port_is_a_refused_setting(
    sentinels: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read leniently, `h1:2637x` was host `h1:2637x` and `::1` host `:` port 1: a process that waits
    for a Redis it can never reach, where the URL should be refused at start, in one line."""
    monkeypatch.setenv("SENTIMENT_REDIS_URL", f"redis+sentinel://:hunter2@{sentinels}/mymaster")
    with pytest.raises(SettingsError) as raised:
        from_environment()
    [line] = str(raised.value).splitlines()
    assert line.endswith(f"(redis+sentinel URL: {why})") and "hunter2" not in line


def start_sentinel(tmp_path: Path, primary_port: int | None, *conf: str) -> tuple[int, subprocess.Popen[bytes]]:
    """One real sentinel on a free port, monitoring `primary_port` as SERVICE (None: its own port), with
    `conf`'s lines."""
    port = free_port()
    monitored = port if primary_port is None else primary_port
    path = tmp_path / f"sentinel-{port}.conf"
    lines = [f"port {port}", "bind 127.0.0.1", "daemonize no", f"sentinel monitor {SERVICE} 127.0.0.1 {monitored} 1"]
    path.write_text("".join(f"{line}\n" for line in [*lines, *conf]))
    exe = shutil.which("redis-server") or "redis-server"
    proc = subprocess.Popen([exe, str(path), "--sentinel"], stdout=subprocess.DEVNULL)
    wait_for("the sentinel to answer", lambda: _answers(port))
    return port, proc


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=2).ping())
    except redis.AuthenticationError:
        return True
    except redis.ConnectionError:
        return False


@pytest.mark.parametrize(
    ("path", "query", "why"),
    [
        (f"/{SERVICE}/0", "", "(AuthenticationError: "),
        (f"/{SERVICE}/0", "?sentinel_password=wrong", "(AuthenticationError: "),
        ("/no-such-service/0", "?sentinel_password=s3cret", "(no sentinel monitors 'no-such-service')"),
        (f"/{SERVICE}/0", "?sentinel_password=s3cret", None),
    ],
    ids=["no sentinel password", "a wrong one", "an unknown service", "all right"],
)
def test_sentinels_that_turn_the_service_away_are_a_refusal_not_an_outage(
    path: str, query: str, why: str | None, redis_server: RedisServer, tmp_path: Path
) -> None:
    """redis-py reads a sentinel's refused password and a service no sentinel monitors as "no master
    found", an outage: `api` and the workers would wait for ever for what no wait brings."""
    port, proc = start_sentinel(tmp_path, redis_server.port, "requirepass s3cret")
    url = f"redis+sentinel://127.0.0.1:{port}{path}{query}"
    try:
        if why is None:
            reach(url, 5)
            return
        with pytest.raises(RedisRefused) as refused:
            reach(url, 5)
        [line] = str(refused.value).splitlines()
        assert why in line and line.endswith(": check SENTIMENT_REDIS_URL")
        assert "s3cret" not in line and "wrong" not in line
    finally:
        proc.kill()
        proc.wait()


def test_sentinels_that_all_refuse_are_an_outage_said_in_one_short_line() -> None:
    """Not up yet (Kubernetes starts them together): waited for, and said once, without redis-py's
    description of each sentinel's client (a kilobyte each)."""
    ports = [free_port(), free_port()]
    url = f"redis+sentinel://{','.join(f'127.0.0.1:{p}' for p in ports)}/{SERVICE}/0"
    with pytest.raises(RedisUnreachable) as unreachable:
        reach(url, 5)
    [line] = str(unreachable.value).splitlines()
    assert "redis.client.Redis" not in line and len(line) < 300, line
    assert line.startswith(f"Redis at {url} is unreachable (no sentinel answers: ConnectionError: ")


@pytest.mark.slow
@pytest.mark.parametrize("form", ["redis:// at a sentinel", "a sentinel naming itself"])
def test_a_sentinel_taken_for_the_primary_is_a_refusal(form: str, tmp_path: Path) -> None:
    """A sentinel answers PING, so a URL that leads to one (its port in a redis:// URL, or a sentinel
    monitoring its own address) passed the start, and then every command failed "unknown command"."""
    port, proc = start_sentinel(tmp_path, None)
    try:
        at_sentinel = f"redis://127.0.0.1:{port}/0"
        url = at_sentinel if form == "redis:// at a sentinel" else f"redis+sentinel://127.0.0.1:{port}/{SERVICE}/0"
        with pytest.raises(RedisRefused) as refused:
            reach(url, 5)
        assert str(refused.value) == (
            f"Redis at {url} refused this service (it is a Sentinel, which holds no data): check SENTIMENT_REDIS_URL"
        )
    finally:
        proc.kill()
        proc.wait()
