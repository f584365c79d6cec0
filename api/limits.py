"""Hostile bodies: bounded before they are parsed; unparseable ones are a 422, never a 400 or 500.

`BodyLimit` refuses a Content-Length over the route's limit before a byte is read, and lets a
declared size within it pass untouched (the server never delivers more than Content-Length bytes).
A chunked body (or one whose Content-Length is not a number) is read first, counting bytes as
they arrive and refused as soon as it grows past the limit, so nothing oversized is buffered whole
or parsed (a client gone before its end is the 499 a route gives); it is then handed on as it came (the route would have buffered it whole anyway). The
request's deadline is fixed before (`api.deadline`): its upload counts, as a declared size's does.
A path the router redirects to its route (`/predict/`, 307) has that route's limit.
(FastAPI's own `max_body_size` answers a declared oversize in plain text, outside the JSON error
shape.) Each route's limit is the largest body its configured text limits allow (`body_limit`); other routes take none.
Each route parses its own body (`api.schemas.parse_json`): nesting too deep, invalid UTF-8 or a number
with thousands of digits is the 422 of malformed JSON.
"""

from __future__ import annotations

import contextlib
import re

from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deadline import request_deadline
from api.errors import ErrorType, ServiceError, error_response, failure

# "\uXXXX" is the longest a character of the Basic Multilingual Plane takes in JSON (UTF-8 takes at
# most 4 bytes); only a text of mostly escaped astral characters (12 bytes each) can exceed this.
BYTES_PER_CHAR = 6
TEXT_OVERHEAD = 8  # quotes, comma and a space around each text
BODY_OVERHEAD = 1024  # {"text": [...]} and some whitespace
NO_BODY_BYTES = 1024  # GET, DELETE, /metrics: nothing to send


def body_limit(max_texts: int, max_chars: int) -> int:
    """Bytes of the largest sensibly encoded body with `max_texts` texts of `max_chars` characters."""
    return max_texts * (max_chars * BYTES_PER_CHAR + TEXT_OVERHEAD) + BODY_OVERHEAD


def declared_size(header: str) -> int | None:
    """The byte count a header declares (Content-Length, the binary tensor extension's header size):
    ASCII digits only, else None. `str.isdigit` also passes "²", which `int` refuses, as it refuses
    a number of more than 4,300 digits."""
    if not (header.isascii() and header.isdigit()):
        return None
    try:
        return int(header)
    except ValueError:  # past int's digit limit: no body is that long
        return None


class BodyLimit:
    """ASGI middleware: 413 for a body over its path's limit (`limits`, else `NO_BODY_BYTES`). A
    path may be a route template: `{name}` stands for one path segment. `timeout_s`: the service's
    request timeout, for the deadline of a request whose body it reads."""

    def __init__(self, app: ASGIApp, limits: dict[str, int], timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.limits = {path: limit for path, limit in limits.items() if "{" not in path}
        self.templates = [  # (the rarer case: tried after the exact paths)
            (
                re.compile("/".join("[^/]+" if part.startswith("{") else re.escape(part) for part in path.split("/"))),
                limit,
            )
            for path, limit in limits.items()
            if "{" in path
        ]

    def limit(self, path: str) -> int:
        if (limit := self.limits.get(path)) is not None:
            return limit
        # `/predict/`: the router redirects it to its route (307), where the client sends the body again
        path = path.removesuffix("/")
        if (limit := self.limits.get(path)) is not None:
            return limit
        return next((limit for template, limit in self.templates if template.fullmatch(path)), NO_BODY_BYTES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope["path"])
        headers = Headers(scope=scope)
        declared = declared_size(headers.get("content-length", ""))
        if declared is not None:
            if declared > limit:
                await self._refuse(limit, scope, receive, send)
            else:  # the server delivers no more than Content-Length bytes: nothing to count
                await self.app(scope, receive, send)
            return
        with contextlib.suppress(RequestValidationError):  # (a bad X-Request-Timeout: the route's 422)
            request_deadline(scope, headers, self.timeout_s)  # before the upload, which it bounds
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: its 499, as where a route reads the body
                await _response(failure(ClientDisconnect()))(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await self._refuse(limit, scope, receive, send)
                return
            more = message.get("more_body", False)
        body: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal body
            if body is None:
                return await receive()  # after the body: wait for the disconnect, as the server would
            message, body = body, None
            return message

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(ErrorType.TOO_LARGE, f"request body larger than this route's limit of {limit} bytes")
        await response(scope, receive, send)


def _response(error: ServiceError) -> Response:
    """`error`'s answer (`api.errors.failure`'s, for a client gone)."""
    return error_response(error.error_type, error.message, error.retry_after_s)
