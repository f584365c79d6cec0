"""/docs (Swagger UI) and /redoc (ReDoc) that work without internet.

FastAPI's own pages load their JavaScript and CSS from a CDN, so they stay blank on an air-gapped
cluster. The `fastapi-offline` package ships the same bundles (Swagger UI 5, ReDoc 2); this is
FastAPI's "self-hosting JavaScript and CSS for docs" recipe, with that package's files served by
the app itself. With API keys on they stay open (`api.access.OPEN_PATHS`): Swagger UI's Authorize
button then sends the key with each call it makes. The assets are sent whole (`Assets`).
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

DOCS, REDOC, ASSETS, OPENAPI = "/docs", "/redoc", "/docs/assets", "/openapi.json"


class Assets(StaticFiles):
    """The bundles, always whole (`Accept-Ranges: none`): Starlette answers a Range it cannot read
    with a plain-text 400 and one past the file's end with an empty 416, outside the one error shape
    (`api.errors`), and a browser loading the pages never asks for part of a bundle. RFC 9110
    (section 14.2) lets any server ignore Range."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"range"]}
        await super().__call__(scope, receive, send)

    def file_response(
        self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["accept-ranges"] = "none"
        return response


def install(app: FastAPI) -> None:
    """Add the two pages and their assets to `app`, created with `docs_url=None, redoc_url=None`
    (FastAPI's CDN pages) and the default `openapi_url`."""
    assert app.docs_url is None and app.redoc_url is None and app.openapi_url == OPENAPI, "FastAPI's CDN pages are on"
    openapi_url = app.openapi_url
    app.mount(ASSETS, Assets(packages=[("fastapi_offline", "static")]), name="docs-assets")

    @app.get(DOCS, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")  # behind a path-prefixing proxy
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(REDOC, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
            with_google_fonts=False,  # fonts from Google's servers: the page falls back to the browser's
        )
