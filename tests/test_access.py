"""Access: optional API keys on every endpoint but the probes, and the per-client rate limit.

The app runs in process (httpx ASGI transport); the rate limit's Lua script runs on the session's
real redis-server (fakeredis here has no Lua: `lupa` is not installed).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import fakeredis
import grpc
import httpx
import pytest
import redis as sync_redis
from fastapi.responses import PlainTextResponse
from prometheus_client import REGISTRY
from pydantic import SecretStr, ValidationError
from redis.asyncio import Redis

import api.access
from api.access import OPEN_PATHS, ApiKeys
from api.app import create_app
from api.docs_page import ASSETS
from api.grpc_v2 import grpc_predict_v2_pb2 as pb
from api.grpc_v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from api.inference_grpc import GrpcServer
from api.rate_limit import RateLimit
from batcher.worker import Worker
from core.protocol import Keys
from core.settings import Settings
from sentiment.embedded import free_port
from tests.conftest import HANG_GUARD_S, RedisServer, Service, answers, start_worker, wait_for
from tests.test_api import stall
from tests.test_k8s import TARGETS, container_of

pytestmark = pytest.mark.anyio

KEY, OTHER_KEY = "k" * 20 + "-first-client", "o" * 20 + "-second-client"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def metrics_app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    """Stands in for a mounted sub-application such as a Prometheus /metrics app."""
    await PlainTextResponse("sentiment_up 1\n")(scope, receive, send)


@asynccontextmanager
async def serve(settings: Settings, redis: Redis, address: str = "10.0.0.1") -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, redis=redis, jobs_redis=fakeredis.FakeRedis())
    app.mount("/metrics", metrics_app)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=(address, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


@pytest.fixture
async def keyed(settings: Settings, fake_server: fakeredis.FakeServer) -> AsyncIterator[httpx.AsyncClient]:
    keyed_settings = settings.model_copy(update={"api_keys": Settings(api_keys=f"{KEY},{OTHER_KEY}").api_keys})
    async with serve(keyed_settings, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        yield client


# ---------------------------------------------------------------- API keys


async def test_without_a_key_everything_but_the_probes_is_401(keyed: httpx.AsyncClient) -> None:
    assert (await keyed.get("/health")).status_code == 200
    assert (await keyed.get("/ready")).json()["reason"] == "no live worker"
    for method, path in [
        ("POST", "/predict"),
        ("POST", "/jobs"),
        ("GET", "/jobs/" + "0" * 32),
        ("DELETE", "/jobs/" + "0" * 32),
        ("GET", "/model"),
        ("GET", "/metrics"),
        ("GET", "/metrics/"),
        ("GET", "/no-such-route"),
    ]:
        response = await keyed.request(method, path, json={"text": ["hi"]} if method == "POST" else None)
        assert response.status_code == 401, (method, path)
        assert response.json()["error_type"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"


def readme_open_paths() -> set[str]:
    """The paths the README's Security section says are open without a key."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    sentence = readme[readme.index("Open without a key:") :].split(".\n", 1)[0]
    return set(re.findall(r"`(/[^`]*)`", sentence))


async def test_the_open_paths_are_exactly_the_ones_the_readme_names(keyed: httpx.AsyncClient) -> None:
    """Every route and mount asked without a key: those that answer are the README's, no more, no fewer."""
    app = keyed._transport.app  # type: ignore[attr-defined]  # (httpx.ASGITransport's)
    documented = (await keyed.get("/openapi.json", headers={"X-API-Key": KEY})).json()["paths"]
    undocumented = {route.path for route in app.routes if hasattr(route, "path")}  # (included routers have none)
    paths = {re.sub(r"\{[^}]+\}", "x", path) for path in {*documented, *undocumented}} | {f"{ASSETS}/swagger-ui.css"}
    opened = set()
    for path in paths:
        for method in ("GET", "POST"):
            if (await keyed.request(method, path)).status_code not in (401, 405):
                opened.add(path)
    assert readme_open_paths() == {p for p in opened if not p.startswith(ASSETS + "/")} == OPEN_PATHS
    assert f"{ASSETS}/swagger-ui.css" in opened  # what /docs loads


async def test_a_wrong_key_is_403_in_either_header(keyed: httpx.AsyncClient) -> None:
    for headers in ({"X-API-Key": KEY + "x"}, {"Authorization": f"Bearer {KEY[:-1]}"}, {"X-API-Key": "short"}):
        response = await keyed.get("/metrics", headers=headers)
        assert response.status_code == 403
        assert response.json() == {"error": "this API key is not valid", "error_type": "forbidden"}
    assert (await keyed.get("/metrics", headers={"Authorization": f"Basic {KEY}"})).status_code == 401


async def test_every_configured_key_opens_every_endpoint(keyed: httpx.AsyncClient, worker: Worker) -> None:
    start_worker(worker)
    for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {OTHER_KEY}"}, {"authorization": f"bearer {KEY}"}):
        assert (await keyed.post("/predict", json={"text": ["fine"]}, headers=headers)).status_code == 200
        assert (await keyed.get("/metrics/", headers=headers)).text == "sentiment_up 1\n"  # a mount
        assert (await keyed.get("/openapi.json", headers=headers)).status_code == 200
        assert (await keyed.get("/jobs/" + "0" * 32, headers=headers)).status_code == 404


async def test_each_key_queues_as_a_client_of_its_own_whose_answered_work_is_no_longer_outstanding(
    keyed: httpx.AsyncClient, worker: Worker, redis: fakeredis.FakeRedis, settings: Settings
) -> None:
    """Fairness (`batcher.plan`) and the overload refusal (`api.predictions`) tell clients by their key."""
    start_worker(worker)
    for key in (KEY, OTHER_KEY):
        assert (
            await keyed.post("/predict", json={"text": [f"from {key}"]}, headers={"X-API-Key": key})
        ).status_code == 200
    keys, names = Keys(settings.key_prefix), ApiKeys([SecretStr(KEY), SecretStr(OTHER_KEY)])
    clients = {c.decode() for c in redis.smembers(keys.clients)}
    assert clients == {names.client(KEY), names.client(OTHER_KEY)}
    assert [redis.zcard(keys.outstanding(c)) for c in clients] == [0, 0]  # answered


async def test_keys_are_compared_against_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = api.access.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(api.access.hmac, "compare_digest", counting)
    keys = ApiKeys(Settings(api_keys=f"{KEY},{OTHER_KEY},{'z' * 40}").api_keys)  # type: ignore[arg-type]
    first = keys.client(KEY)
    assert len(calls) == 3  # no early exit on the first key's match
    assert all(len(a) == len(b) == 32 for a, b in calls)  # digests: the key's length is not compared
    assert first is not None and KEY not in first
    assert keys.client("nope" * 5) is None and len(calls) == 6


async def test_the_openapi_schema_shows_the_key_schemes_and_the_open_probes(keyed: httpx.AsyncClient) -> None:
    schema = (await keyed.get("/openapi.json", headers={"X-API-Key": KEY})).json()
    assert schema["components"]["securitySchemes"] == {
        "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        "Bearer": {"type": "http", "scheme": "bearer"},
    }
    predict = schema["paths"]["/predict"]["post"]
    assert predict["security"] == [{"ApiKey": []}, {"Bearer": []}]
    assert {"401", "403"} <= set(predict["responses"])
    assert schema["paths"]["/health"]["get"]["security"] == []
    assert schema["paths"]["/ready"]["get"]["security"] == []


async def test_without_keys_nothing_asks_for_one(settings: Settings, fake_server: fakeredis.FakeServer) -> None:
    async with serve(settings, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        assert (await client.get("/metrics/")).status_code == 200
        schema = (await client.get("/openapi.json")).json()
        assert "securitySchemes" not in schema.get("components", {})
        assert "401" not in schema["paths"]["/predict"]["post"]["responses"]


def test_keys_come_comma_separated_and_must_be_long(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENTIMENT_API_KEYS", f" {KEY} ,{OTHER_KEY},")
    assert [k.get_secret_value() for k in Settings().api_keys or []] == [KEY, OTHER_KEY]
    assert KEY not in repr(Settings())
    monkeypatch.setenv("SENTIMENT_API_KEYS", "tooshort-secret")
    with pytest.raises(ValidationError) as failure:
        Settings()
    assert "at least 16 characters" in str(failure.value) and "tooshort-secret" not in str(failure.value)
    for odd in ("ключ-ключ-ключ-ключ", "a-long-enough-key\twith-a-tab"):  # a UTF-8 key never matches latin-1 headers
        monkeypatch.setenv("SENTIMENT_API_KEYS", f"{KEY},{odd}")
        with pytest.raises(ValidationError) as failure:
            Settings()
        assert "key 2 of 2 not printable ASCII" in str(failure.value) and odd not in str(failure.value)
    monkeypatch.setenv("SENTIMENT_API_KEYS", "")
    assert Settings().api_keys is None


# ---------------------------------------------------------------- rate limit (real Redis: Lua)


def limited(settings: Settings, redis_url: str, rate: float, burst: int, **update: object) -> Settings:
    prefix = f"rl-{time.monotonic_ns()}"  # a fresh set of buckets per test on the shared server
    return settings.model_copy(
        update={
            "key_prefix": prefix,
            "redis_url": redis_url,
            "rate_limit_per_s": rate,
            "rate_limit_burst": burst,
            **update,
        }
    )


@pytest.mark.parametrize("garbage", [b"-inf", b"-1e300", b"nan", b"not a number"])
async def test_a_rate_limit_bucket_holding_garbage_answers_a_wait_of_a_token_at_most(
    redis_url: str, garbage: bytes
) -> None:
    """A bucket whose count is garbage (a negative one: an endless wait, kept at every try, a 500)
    still answers the 429's wait for one token at most, and is a bucket again after one take."""
    keys = Keys(f"rl-{time.monotonic_ns()}")
    redis = Redis.from_url(redis_url)
    await redis.hset(keys.rate_limit("c"), mapping={"tokens": garbage, "ts": b"0"})
    limit = RateLimit(redis, keys, rate_per_s=10.0, burst=2)
    waits = [await limit.take("c") for _ in range(3)]
    await redis.aclose()
    assert all(wait is None or 0 < wait <= 1 / 10.0 for wait in waits), waits
    assert waits[0] is None, "the garbage is a full bucket's worth of time old: refilled"


async def test_a_client_over_its_rate_gets_429_with_the_bucket_s_retry_after(
    settings: Settings, redis_url: str
) -> None:
    config = limited(settings, redis_url, rate=0.1, burst=3)
    async with serve(config, Redis.from_url(redis_url)) as client:
        statuses = [(await client.get("/jobs/" + "0" * 32)).status_code for _ in range(3)]
        refused = await client.get("/jobs/" + "0" * 32)
        assert statuses == [404] * 3
        assert refused.status_code == 429
        assert refused.json()["error_type"] == "rate_limited"
        assert 9 <= int(refused.headers["retry-after"]) <= 10  # one token at 0.1/s
        assert [(await client.get("/health")).status_code for _ in range(5)] == [200] * 5  # probes never limited
        assert [(await client.get("/metrics")).status_code for _ in range(5)] == [200] * 5  # nor scrapes
    async with serve(config, Redis.from_url(redis_url), address="10.0.0.2") as other:
        assert (await other.get("/jobs/" + "0" * 32)).status_code == 404  # its own bucket


async def test_scrapes_of_metrics_take_nothing_from_the_scraper_s_bucket(settings: Settings, redis_url: str) -> None:
    """Prometheus scraping with a client's key (or from its address) leaves that client its whole burst."""
    keys = Settings(api_keys=f"{KEY},{OTHER_KEY}").api_keys
    async with serve(
        limited(settings, redis_url, rate=0.01, burst=2, api_keys=keys), Redis.from_url(redis_url)
    ) as client:
        scrapes = [(await client.get("/metrics", headers={"X-API-Key": KEY})).status_code for _ in range(10)]
        assert scrapes == [200] * 10
        assert (await client.get("/metrics")).status_code == 401  # a key still needed
        statuses = [(await client.get("/jobs/" + "0" * 32, headers={"X-API-Key": KEY})).status_code for _ in range(3)]
        assert statuses == [404, 404, 429]  # the burst, untouched by the scrapes


async def test_the_bucket_refills_at_the_rate(settings: Settings, redis_url: str) -> None:
    """An empty bucket last refilled 10 s ago (its state set back on Redis' clock) holds 10 tokens at
    1/s, plus what the test's own run time adds: half or twice the rate falls outside."""
    rate, ago = 1.0, 10.0
    config = limited(settings, redis_url, rate=rate, burst=100)
    redis = Redis.from_url(redis_url)
    async with serve(config, redis) as client:
        assert (await client.get("/jobs/" + "0" * 32)).status_code == 404  # (the bucket is made)
        [bucket] = await redis.keys(f"{config.key_prefix}:ratelimit:*")
        start = time.monotonic()
        seconds, micros = await redis.time()
        await redis.hset(bucket, mapping={"tokens": 0, "ts": seconds + micros / 1e6 - ago})
        passed = 0
        while (await client.get("/jobs/" + "0" * 32)).status_code == 404:  # (at most the burst)
            passed += 1
        elapsed = time.monotonic() - start
    assert rate * ago <= passed <= rate * (ago + elapsed)


async def test_concurrent_requests_cannot_overdraw_the_bucket(settings: Settings, redis_url: str) -> None:
    async with serve(limited(settings, redis_url, rate=0.01, burst=5), Redis.from_url(redis_url)) as client:
        responses = await asyncio.gather(*(client.get("/jobs/" + "0" * 32) for _ in range(30)))
        assert sorted(r.status_code for r in responses) == [404] * 5 + [429] * 25


async def test_with_keys_the_bucket_is_per_key_and_named_by_its_digest(settings: Settings, redis_url: str) -> None:
    config = limited(settings, redis_url, rate=0.01, burst=1, api_keys=Settings(api_keys=f"{KEY},{OTHER_KEY}").api_keys)
    redis = Redis.from_url(redis_url)
    async with serve(config, redis) as client:
        assert (await client.get("/jobs/" + "0" * 32, headers={"X-API-Key": KEY})).status_code == 404
        assert (await client.get("/jobs/" + "0" * 32, headers={"X-API-Key": KEY})).status_code == 429
        assert (await client.get("/jobs/" + "0" * 32, headers={"X-API-Key": OTHER_KEY})).status_code == 404
        names = [k.decode() for k in await redis.keys(f"{config.key_prefix}:*")]
    assert len(names) == 2 and all(":ratelimit:key-" in n for n in names)
    assert not [n for n in names for secret in (KEY, OTHER_KEY) if secret in n or secret[:16] in n]


@pytest.mark.parametrize(
    ("http_address", "grpc_host"),
    # (A dual-stack socket's IPv4 client over HTTP; `::2`, in `::1`'s /64, as another address of one host.)
    [("::1", "::1"), ("::ffff:127.0.0.1", "127.0.0.1"), ("::2", "::1")],
)
async def test_a_client_has_one_bucket_over_http_and_grpc(
    settings: Settings, redis_url: str, http_address: str, grpc_host: str
) -> None:
    # The HTTP server names the client by its bare address; gRPC's peer is a URI (`ipv6:%5B::1%5D:port`).
    config = limited(settings, redis_url, rate=0.01, burst=1)
    server = GrpcServer(config, grpc_host, 0)
    app = create_app(config, redis=Redis.from_url(redis_url), jobs_redis=fakeredis.FakeRedis(), grpc=server)
    host = server.address.rsplit(":", 1)[0]
    async with app.router.lifespan_context(app), grpc.aio.insecure_channel(f"{host}:{server.port}") as channel:
        transport = httpx.ASGITransport(app=app, client=(http_address, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            assert (await client.get("/jobs/" + "0" * 32)).status_code == 404  # the bucket's one token
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(pb.ServerMetadataRequest())
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("allowed", "codes", "buckets"),
    [
        (None, ["OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"], ["addr-127.0.0.1"]),  # its own address
        ("127.0.0.1", ["OK", "OK", "RESOURCE_EXHAUSTED"], ["addr-10.9.8.1", "addr-10.9.8.2"]),  # a named proxy
    ],
)
async def test_grpc_names_a_client_behind_a_proxy_as_http_does(
    settings: Settings,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    allowed: str | None,
    codes: list[str],
    buckets: list[str],
) -> None:
    # Over HTTP uvicorn reads X-Forwarded-For from the proxies FORWARDED_ALLOW_IPS names; gRPC named
    # every client behind such a proxy by the proxy's address: one bucket that all of them shared.
    if allowed is None:
        monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    else:
        monkeypatch.setenv("FORWARDED_ALLOW_IPS", allowed)
    config = limited(settings, redis_url, rate=0.01, burst=1)
    server = GrpcServer(config, "127.0.0.1", 0)
    redis = Redis.from_url(redis_url)
    app = create_app(config, redis=redis, jobs_redis=fakeredis.FakeRedis(), grpc=server)
    answered = []
    async with app.router.lifespan_context(app), grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for claimed in ("10.9.8.1", "10.9.8.2", "10.9.8.1"):
            try:
                await stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=(("x-forwarded-for", claimed),))
                answered.append("OK")
            except grpc.aio.AioRpcError as refused:
                answered.append(refused.code().name)
    names = sorted(
        k.decode().removeprefix(f"{config.key_prefix}:ratelimit:") for k in await redis.keys(f"{config.key_prefix}:*")
    )
    assert (answered, names) == (codes, buckets)


async def test_an_ipv6_client_has_one_bucket_for_its_64(settings: Settings, redis_url: str) -> None:
    # A host (or home) gets a /64 and may send from any address in it: one bucket per address let it
    # change address at each request and never meet the limit.
    config = limited(settings, redis_url, rate=0.01, burst=1)
    redis = Redis.from_url(redis_url)
    statuses = []
    for address in ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:fffe", "2001:db8:1:3::1"):
        async with serve(config, redis, address=address) as client:
            statuses.append((await client.get("/jobs/" + "0" * 32)).status_code)
    names = sorted(
        k.decode().removeprefix(f"{config.key_prefix}:ratelimit:") for k in await redis.keys(f"{config.key_prefix}:*")
    )
    assert (statuses, names) == ([404, 429, 404], ["addr-2001:db8:1:2::/64", "addr-2001:db8:1:3::/64"])


@pytest.mark.parametrize(
    ("allowed", "statuses", "buckets"),
    [
        (None, [404, 429, 429], ["addr-127.0.0.1"]),  # its own address, whatever it claims
        ("127.0.0.1", [404, 404, 404], ["addr-10.9.8.0", "addr-10.9.8.1", "addr-10.9.8.2"]),  # a named proxy
    ],
)
def test_x_forwarded_for_names_the_client_only_from_a_proxy_forwarded_allow_ips_names(
    redis_url: str,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    allowed: str | None,
    statuses: list[int],
    buckets: list[str],
) -> None:
    """The real server (uvicorn, which reads proxy headers; the in-process app does not): a local
    caller claiming other addresses in X-Forwarded-For gets no bucket per claim, unless
    FORWARDED_ALLOW_IPS names it as the proxy."""
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    env = {"SENTIMENT_RATE_LIMIT_PER_S": "0.01", "SENTIMENT_RATE_LIMIT_BURST": "1"}
    prefix = f"xff-{time.monotonic_ns()}"
    service = Service(redis_url, tiny_model_dir, prefix, **env, **({"FORWARDED_ALLOW_IPS": allowed} if allowed else {}))
    service.start("api", "--port", str(service.port))
    try:
        wait_for("the API to answer", lambda: answers(f"{service.url}/health"))
        answered = [
            httpx.get(f"{service.url}/jobs/{'0' * 32}", headers={"X-Forwarded-For": f"10.9.8.{i}"}).status_code
            for i in range(3)
        ]
    finally:
        service.stop()
    names = sorted(
        k.decode().removeprefix(f"{prefix}:ratelimit:")
        for k in sync_redis.Redis.from_url(redis_url).keys(f"{prefix}:*")
    )
    assert (answered, names) == (statuses, buckets)


async def test_the_rate_limit_waits_on_redis_no_longer_than_the_requests_deadline(
    settings: Settings, fake_server: fakeredis.FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The deadline runs from the request's arrival, before the rate limit's script: a Redis that never
    # answers it costs the request its deadline, then a 504 naming the stage.
    monkeypatch.setattr(RateLimit, "take", stall)
    config = settings.model_copy(update={"rate_limit_per_s": 1.0})
    async with serve(config, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        response = await asyncio.wait_for(
            client.post("/predict", json={"text": ["x"]}, headers={"X-Request-Timeout": "0.5"}), HANG_GUARD_S
        )
    assert (response.status_code, response.json()) == (
        504,
        {
            "error": "no result within 0.5 s: the deadline was reached at the rate limit stage, waiting on Redis",
            "error_type": "timeout",
        },
    )


async def test_a_deadline_passed_on_arrival_is_reached_at_the_authentication(keyed: httpx.AsyncClient) -> None:
    # (5e-324 s: the smallest number above 0, passed before anything is done.)
    headers = {"X-API-Key": KEY, "X-Request-Timeout": "5e-324"}
    response = await keyed.post("/predict", json={"text": ["x"]}, headers=headers)
    assert (response.status_code, response.json()) == (
        504,
        {
            "error": "no result within 4.94066e-324 s: the deadline was reached at the authentication stage",
            "error_type": "timeout",
        },
    )
    bad = await keyed.post("/predict", json={"text": ["x"]}, headers={"X-API-Key": KEY, "X-Request-Timeout": "0"})
    assert bad.status_code == 422  # the route's to refuse, past the access check


async def test_an_unreachable_redis_does_not_turn_the_limit_into_a_500(settings: Settings) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    config = settings.model_copy(update={"redis_url": down, "rate_limit_per_s": 1.0})
    async with serve(config, Redis.from_url(down, socket_connect_timeout=1)) as client:
        response = await client.post("/predict", json={"text": ["hi"]})
        assert response.status_code == 503 and response.json()["error_type"] == "unavailable"


async def test_a_rate_limit_script_redis_refuses_lets_requests_through_and_says_so_once_a_run(
    settings: Settings, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # An ACL user without the scripting commands (NOPERM at EVALSHA; OOM comes the same way): the limit
    # fails open, as for an outage, but was said at DEBUG alone, as "redis unreachable": nobody learned
    # that it was off. Now a WARNING once a run of failures (again after a take that worked) and a count.
    caplog.set_level(logging.DEBUG, logger="api.rate_limit")

    def warnings() -> int:
        return sum(r.levelno == logging.WARNING for r in caplog.records if r.name == "api.rate_limit")

    def unchecked() -> float:
        return REGISTRY.get_sample_value("sentiment_rate_limit_unchecked_total") or 0.0

    config = limited(settings, redis_server.url, rate=0.01, burst=1)
    with sync_redis.Redis.from_url(redis_server.url) as admin:
        admin.execute_command("ACL", "SETUSER", "api", "on", ">secret", "~*", "&*", "+@all", "-@scripting")
        before = unchecked()
        async with serve(config, Redis.from_url(f"redis://api:secret@127.0.0.1:{redis_server.port}/0")) as client:
            statuses = [(await client.get("/jobs/" + "0" * 32)).status_code for _ in range(3)]
            assert (statuses, warnings(), unchecked() - before) == ([404] * 3, 1, 3)
            assert "NoPermissionError" in caplog.records[-1].getMessage()
            admin.execute_command("ACL", "SETUSER", "api", "+@scripting")
            assert [(await client.get("/jobs/" + "0" * 32)).status_code for _ in range(2)] == [404, 429]
            admin.execute_command("ACL", "SETUSER", "api", "-@scripting")
            assert (await client.get("/jobs/" + "0" * 32)).status_code == 404
    assert warnings() == 2, "a new run of failures is said again"


# ---------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("target", TARGETS)
def test_k8s_reads_keys_from_an_optional_secret_and_probes_need_none(target: str) -> None:
    container = container_of(target, "sentiment-api")
    (keys,) = [e for e in container.get("env", []) if e["name"] == "SENTIMENT_API_KEYS"]
    assert keys["valueFrom"]["secretKeyRef"] == {"name": "sentiment-api-keys", "key": "keys", "optional": True}
    for name in ("sentiment-api", "sentiment-jobs-worker"):  # the API checks callback URLs, the jobs worker signs
        (secrets,) = [e for e in container_of(target, name).get("env", []) if e["name"] == "SENTIMENT_WEBHOOK_SECRETS"]
        reference = {"name": "sentiment-webhooks", "key": "secrets", "optional": True}
        assert secrets["valueFrom"]["secretKeyRef"] == reference
    # kubelet HTTP probes send no secret header: every one must hit an open path.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] in OPEN_PATHS, probe
