"""The app whose POST /predict goes straight to its route, past the layers every other request passes.

Starlette wraps every request in FastAPI's telemetry check, its error and body-limit layers, an exit
stack for uploaded files, and the router's matching: /predict needs none of them, and pays for each
on the hot path (what skipping them bought: docs/tuning.md, "/predict without FastAPI's request
handler"). Its POSTs get the same error handling and the app's own middleware, in the order Starlette
gives them (a bug's 500, the app's middleware, the handlers of known errors, the route), built once.
With FastAPI's telemetry on (`telemetry_on`), every request takes the full stack, where FastAPI makes
the request's span.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from opentelemetry import trace
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import SENT_METHOD
from api.routes import RequestRoute

PATH = "/predict"


class HotPathApp(FastAPI):
    """FastAPI, with POST `PATH` dispatched to its route under the app's middleware alone, and a HEAD
    answered as its GET."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hot: ASGIApp | None = None  # built at the first /predict: the routes and middleware are all in

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            # GET without the body (RFC 9110 9.3.2), which the server leaves out: its own scope says HEAD.
            # FastAPI's routes take GET alone, and a monitor probing with HEAD would read a 405 as down.
            scope = {**scope, "method": "GET", SENT_METHOD: "HEAD"}
        if scope["type"] == "http" and scope["method"] == "POST" and route_path(scope) == PATH and not telemetry_on():
            scope["app"] = self
            if self._hot is None:
                self._hot = self._hot_stack()
            await self._hot(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def _hot_stack(self) -> ASGIApp:
        """Starlette's stack (`Starlette.build_middleware_stack`) around the one route's endpoint, not
        the router: its errors meet the same handlers, which Starlette's per-route wrapper would look
        up again."""
        route = next(r for r in self.router.routes if isinstance(r, APIRoute) and r.path == PATH)
        if not isinstance(route, RequestRoute):  # (else FastAPI's handler would want its exit stacks)
            raise TypeError(
                f"{PATH}: the hot path calls a RequestRoute's endpoint itself, not a {type(route).__name__}"
            )
        endpoint = route.get_route_handler()  # the endpoint: the Request in, its Response out

        async def routed(scope: Scope, receive: Receive, send: Send) -> None:
            scope.update(router=self.router, route=route, endpoint=route.endpoint, path_params={})
            response = await endpoint(Request(scope, receive, send))
            await response(scope, receive, send)

        known = {k: v for k, v in self.exception_handlers.items() if k not in (500, Exception)}
        app: ASGIApp = ExceptionMiddleware(routed, handlers=known, debug=self.debug)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        bug = next((h for k, h in reversed(self.exception_handlers.items()) if k in (500, Exception)), None)
        return ServerErrorMiddleware(app, handler=bug, debug=self.debug)


def route_path(scope: Scope) -> str:
    """The path the router matches: the request's, less the app's `root_path` where the path starts
    with it (as Starlette's router reads it; its helper for it is private)."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and (path == root or path[len(root)] == "/"):
        return path[len(root) :]
    return path


def telemetry_on() -> bool:
    """Whether FastAPI's telemetry spans requests: where a tracer provider is configured (ours,
    `core.tracing`, or a user's own), as FastAPI reads it on each request (the app turns its metrics
    and logs off): OpenTelemetry's deferred provider is the unconfigured one."""
    return type(trace.get_tracer_provider()) is not trace.ProxyTracerProvider
