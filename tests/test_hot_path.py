"""POST /predict past the layers around every other route (`api.hot_path`): the router never sees it,
and what those layers gave it still holds: the app's middleware, the handlers of known errors, a
bug's 500 in the one shape, a root path. (With FastAPI's telemetry on, every request takes the full
stack: `tests/test_tracing.py` finds FastAPI's span of POST /predict.)"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import fakeredis
import httpx
import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr
from starlette.routing import Router
from starlette.types import Receive, Scope, Send

from api.app import create_app
from api.hot_path import HotPathApp
from api.predictions import Predictor
from core.protocol import Keys
from core.settings import Settings
from tests.test_api import behind

KEY = "k" * 20 + "-hot-path-test"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def routed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the requests the app's router was called for."""
    seen: list[str] = []
    real = Router.__call__

    async def spy(self: Router, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            seen.append(scope["path"])
        await real(self, scope, receive, send)

    monkeypatch.setattr(Router, "__call__", spy)
    return seen


@asynccontextmanager
async def served(
    settings: Settings, fake_server: fakeredis.FakeServer, raise_app_exceptions: bool = False, root_path: str = ""
) -> AsyncIterator[httpx.AsyncClient]:
    """The app on `fake_server`, with one worker far behind (100 items queued at 10 texts a second):
    every /predict of a text not cached is refused, 503."""
    behind(fakeredis.FakeRedis(server=fake_server), Keys(settings.key_prefix), 100)
    app = create_app(settings, fakeredis.FakeAsyncRedis(server=fake_server), fakeredis.FakeRedis(server=fake_server))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


def timed(status: int) -> Callable[[], float]:
    """How many POST /predict answers of `status` the request metrics have timed so far."""
    labels = {"route": "/predict", "method": "POST", "status": str(status)}
    return lambda: REGISTRY.get_sample_value("sentiment_http_request_duration_seconds_count", labels) or 0.0


@pytest.mark.anyio
async def test_predict_never_reaches_the_router_and_every_other_request_does(
    settings: Settings, fake_server: fakeredis.FakeServer, routed: list[str]
) -> None:
    refused = timed(503)
    before = refused()
    async with served(settings, fake_server) as client:
        answer = await client.post("/predict", json={"text": ["a text nobody computes in time"]})
        assert answer.status_code == 503 and answer.json()["error_type"] == "overloaded", answer.text
        assert int(answer.headers["retry-after"]) >= 1
        assert refused() == before + 1  # timed under its route, as through the router
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/predict")).status_code == 405  # not a POST: the router's answer
    assert routed == ["/health", "/predict"]


@pytest.mark.anyio
async def test_predict_keeps_the_apps_middleware_and_its_error_handlers(
    settings: Settings, fake_server: fakeredis.FakeServer, routed: list[str]
) -> None:
    keyed = settings.model_copy(update={"api_keys": [SecretStr(KEY)], "max_texts": 2})
    headers = {"Authorization": f"Bearer {KEY}"}
    async with served(keyed, fake_server, raise_app_exceptions=True) as client:  # handled: none reaches the server
        assert (await client.post("/predict", json={"text": ["hi"]})).status_code == 401  # the key checked
        too_large = await client.post("/predict", content=b"x" * 10_000_000, headers=headers)
        assert too_large.status_code == 413 and too_large.json()["error_type"] == "too_large"  # the body limit
        invalid = await client.post("/predict", json={"text": ["a", "b", "c"]}, headers=headers)
        assert invalid.status_code == 422 and invalid.json()["detail"][0]["loc"] == ["body", "text"]
        not_json = await client.post("/predict", content=b"{", headers={**headers, "Content-Type": "application/json"})
        assert not_json.status_code == 422 and not_json.json()["error_type"] == "invalid_request"
    assert routed == []


@pytest.mark.anyio
async def test_a_bug_under_predict_is_the_one_shaped_500_and_still_raised(
    settings: Settings, fake_server: fakeredis.FakeServer, monkeypatch: pytest.MonkeyPatch, routed: list[str]
) -> None:
    async def bug(*_: Any, **__: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Predictor, "predict", bug)
    async with served(settings, fake_server) as client:
        answer = await client.post("/predict", json={"text": ["hi"]})
        assert answer.status_code == 500 and answer.json()["error_type"] == "internal", answer.text
    async with served(settings, fake_server, raise_app_exceptions=True) as client:
        with pytest.raises(RuntimeError, match="a bug"):  # on to the server, which logs its traceback
            await client.post("/predict", json={"text": ["hi"]})
    assert routed == []


@pytest.mark.anyio
async def test_predict_behind_a_root_path_takes_the_hot_path(
    settings: Settings, fake_server: fakeredis.FakeServer, routed: list[str]
) -> None:
    async with served(settings, fake_server, root_path="/api") as client:
        answer = await client.post("/api/predict", json={"text": ["a text nobody computes in time"]})
        assert answer.status_code == 503 and answer.json()["error_type"] == "overloaded", answer.text
        assert (await client.get("/api/health")).status_code == 200
    assert routed == ["/api/health"]


@pytest.mark.anyio
async def test_the_hot_path_calls_a_request_routes_endpoint_and_no_other() -> None:
    # A plain APIRoute's handler solves dependencies in exit stacks the hot path does not open.
    app = HotPathApp()

    @app.post("/predict")
    async def predict() -> dict[str, str]:
        return {}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        with pytest.raises(TypeError, match="calls a RequestRoute's endpoint itself, not a APIRoute"):
            await client.post("/predict")
