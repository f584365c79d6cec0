"""/docs and /redoc render in a real browser that reaches nothing but loopback, as on an air-gapped
cluster: the app serves Swagger UI's and ReDoc's JavaScript and CSS itself (api/docs_page.py). With
API keys on, a person in that browser authorizes in Swagger UI and calls /predict (driven over the
Chrome DevTools Protocol)."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr
from websockets.sync.client import ClientConnection, connect

from api.app import create_app
from batcher.worker import Worker
from core.settings import Settings
from sentiment.embedded import free_port
from tests.conftest import HANG_GUARD_S, start_worker, wait_for

# Every host name but the loopback address fails to resolve, whatever network the test machine has.
OFFLINE = "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


def chromium(profile: Path, *args: str) -> list[str]:
    """A headless chromium's command line, with `profile` and `args`, that reaches only loopback."""
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("chromium is not installed (.ci/run installs it)")
    return [
        found,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={profile}",
        f"--host-resolver-rules={OFFLINE}",
        *args,
    ]


def render(url: str, profile: Path) -> str:
    """The page's DOM once its scripts have run (the budget is the browser's virtual clock)."""
    done = subprocess.run(
        chromium(profile, "--virtual-time-budget=5000", "--dump-dom", url),
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


@pytest.mark.slow
def test_swagger_ui_renders_the_predict_operation_offline(api_url: str, tmp_path: Path) -> None:
    dom = render(f"{api_url}/docs", tmp_path)
    assert re.search(r'class="opblock opblock-post[^"]*".*?data-path="/predict"', dom, flags=re.DOTALL), dom[-2000:]


@pytest.mark.slow
def test_redoc_renders_the_predict_operation_offline(api_url: str, tmp_path: Path) -> None:
    operation = httpx.get(f"{api_url}/openapi.json").json()["paths"]["/predict"]["post"]["operationId"]
    dom = render(f"{api_url}/redoc", tmp_path)
    assert f'data-section-id="operation/{operation}"' in dom and ">/predict<" in dom, dom[-2000:]


@pytest.mark.slow
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


class Page:
    """A page of a headless chromium, driven over the Chrome DevTools Protocol: `run` evaluates
    JavaScript in it, as a person's clicks and typing would act."""

    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        sent = next(self.ids)
        self.socket.send(json.dumps({"id": sent, "method": method, "params": params}))
        while True:  # (events arrive in between: skipped)
            message = json.loads(self.socket.recv(HANG_GUARD_S))
            if message.get("id") == sent:
                assert "error" not in message, message
                return message["result"]

    def run(self, script: str) -> Any:
        answer = self.call("Runtime.evaluate", expression=script, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in answer, answer["exceptionDetails"]
        return answer["result"].get("value")

    def when(self, what: str, script: str) -> Any:
        """`script`'s value once it is truthy (the page's scripts render as they please)."""
        return wait_for(what, lambda: self.run(script))


@contextmanager
def browser(profile: Path) -> Iterator[Page]:
    """A headless chromium that reaches nothing but loopback, and its one page."""
    process = subprocess.Popen(
        chromium(profile, "--remote-debugging-port=0", "about:blank"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port = wait_for("chromium's DevTools port", lambda: devtools_port(profile / "DevToolsActivePort"))
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list").json()
        page = next(t for t in targets if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None) as socket:
            yield Page(socket)
    finally:
        process.kill()
        process.wait(HANG_GUARD_S)


def devtools_port(port_file: Path) -> str | None:
    """The port on the first line of chromium's DevToolsActivePort, once that line is whole: the file
    may be seen empty, or half written, before."""
    written = port_file.read_text() if port_file.exists() else ""
    return written.split("\n", 1)[0] if "\n" in written else None


# Swagger UI's inputs are React's: a value typed in is set through the element's own setter, then announced.
TYPE = """(selector, text) => {
    const input = document.querySelector(selector);
    Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, "value").set.call(input, text);
    input.dispatchEvent(new Event("input", {bubbles: true}));
}"""
PREDICT = '.opblock-post:has([data-path="/predict"])'


@pytest.mark.slow
def test_with_keys_on_swagger_ui_authorizes_and_calls_predict(
    settings: Settings, fake_server: fakeredis.FakeServer, worker: Worker, tmp_path: Path
) -> None:
    key = "a-key-typed-into-swagger-ui"
    keyed = settings.model_copy(update={"api_keys": [SecretStr(key)]})
    app = create_app(keyed, fakeredis.FakeAsyncRedis(server=fake_server), fakeredis.FakeRedis(server=fake_server))
    start_worker(worker)
    with serving(app) as url, browser(tmp_path) as page:
        page.call("Page.navigate", url=f"{url}/docs")
        page.when("the Authorize button", "!!document.querySelector('.auth-wrapper .authorize')")
        page.run("document.querySelector('.auth-wrapper .authorize').click()")
        page.when("the Authorize dialog", "!!document.querySelector('.auth-container input')")
        page.run(f"({TYPE})('.auth-container input', {json.dumps(key)})")  # the first scheme: ApiKey
        page.run("document.querySelector('.auth-container .auth-btn-wrapper .authorize').click()")
        page.when("the key taken", "!!document.querySelector('.auth-container .auth-btn-wrapper .btn-done')")
        page.run("document.querySelector('.auth-container .auth-btn-wrapper .btn-done').click()")
        page.run(f"document.querySelector('{PREDICT} .opblock-summary-control').click()")
        page.when("Try it out", f"!!document.querySelector('{PREDICT} .try-out__btn')")
        page.run(f"document.querySelector('{PREDICT} .try-out__btn').click()")
        page.when("Execute", f"!!document.querySelector('{PREDICT} .execute')")
        page.run(f"document.querySelector('{PREDICT} .execute').click()")
        status = page.when(
            "the response",
            f"document.querySelector('{PREDICT} .live-responses-table .response .response-col_status')?.innerText",
        )
        body = page.run(
            f"document.querySelector('{PREDICT} .live-responses-table .response-col_description .microlight')?.innerText"
        )
    assert status.strip() == "200", body
    assert json.loads(body)["predictions"][0][0]["label"] == "NEGATIVE"  # the example's first text, every label


@pytest.mark.parametrize("asked", ["bytes=0-3", "bytes=abc", "bytes=999999999-", "items=0-3"])
def test_an_asset_is_sent_whole_whatever_range_a_request_asks(api_url: str, asked: str) -> None:
    """No plain-text 400 or empty 416 (Starlette's answers to a bad or unsatisfiable Range), outside
    the one error shape: the assets ignore Range, as RFC 9110 lets any server, and say so."""
    whole = httpx.get(f"{api_url}/docs/assets/favicon.png")
    response = httpx.get(f"{api_url}/docs/assets/favicon.png", headers={"range": asked})
    assert (response.status_code, response.content) == (200, whole.content)
    assert whole.headers["accept-ranges"] == response.headers["accept-ranges"] == "none"
