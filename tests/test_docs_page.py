"""/docs and /redoc render in a real browser that reaches nothing but loopback, as on an air-gapped
cluster: the app serves Swagger UI's and ReDoc's JavaScript and CSS itself (api/docs_page.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fakeredis
import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from api.app import create_app
from core.settings import Settings
from sentiment.embedded import free_port
from tests.conftest import HANG_GUARD_S, wait_for

# Every host name but the loopback address fails to resolve, whatever network the test machine has.
OFFLINE = "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("chromium is not installed (.ci/run installs it)")
    return found


def render(url: str, profile: Path) -> str:
    """The page's DOM once its scripts have run (the budget is the browser's virtual clock)."""
    done = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={profile}",
            f"--host-resolver-rules={OFFLINE}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """`app` under uvicorn on a free loopback port, in a thread, for as long as the block runs."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def started() -> bool:
        assert thread.is_alive(), "uvicorn exited before it started"
        return server.started

    try:
        wait_for("uvicorn to start", started)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(HANG_GUARD_S)


@pytest.fixture
def api_url(settings: Settings, fake_server: fakeredis.FakeServer) -> Iterator[str]:
    """The real app (the docs pages need no Redis; fakeredis keeps its lifespan happy)."""
    app = create_app(settings, fakeredis.FakeAsyncRedis(server=fake_server), fakeredis.FakeRedis(server=fake_server))
    with serving(app) as url:
        yield url


def test_the_docs_pages_load_every_asset_from_the_app(api_url: str) -> None:
    for page in ("/docs", "/redoc"):
        html = httpx.get(api_url + page).text
        assets = re.findall(r"""(?:src|href)=["']([^"']+)""", html)
        assert assets, page
        for asset in assets:
            assert asset.startswith("/") and not asset.startswith("//"), f"{page} loads {asset} from elsewhere"
            assert httpx.get(api_url + asset).status_code == 200, asset


def test_swagger_ui_renders_the_predict_operation_offline(api_url: str, tmp_path: Path) -> None:
    dom = render(f"{api_url}/docs", tmp_path)
    assert re.search(r'class="opblock opblock-post[^"]*".*?data-path="/predict"', dom, flags=re.DOTALL), dom[-2000:]


def test_redoc_renders_the_predict_operation_offline(api_url: str, tmp_path: Path) -> None:
    operation = httpx.get(f"{api_url}/openapi.json").json()["paths"]["/predict"]["post"]["operationId"]
    dom = render(f"{api_url}/redoc", tmp_path)
    assert f'data-section-id="operation/{operation}"' in dom and ">/predict<" in dom, dom[-2000:]


def test_the_browser_reaches_no_cdn(tmp_path: Path) -> None:
    """The control: FastAPI's own page, whose assets come from a CDN, stays blank in this browser
    (else the tests above would pass on a machine with internet whatever the app served)."""
    app = FastAPI()

    @app.post("/predict")
    def predict() -> None:
        """An operation the page would show, had it loaded."""

    with serving(app) as url:
        assert "cdn.jsdelivr.net" in httpx.get(f"{url}/docs").text
        dom = render(f"{url}/docs", tmp_path)
    assert '<div id="swagger-ui">' in dom and "opblock" not in dom
