"""Hostile bodies: bounded before they are parsed; unparseable ones are a 422, never a 400 or 500.

`BodyLimit` refuses a Content-Length over the route's limit before a byte is read. A chunked body
(or one whose Content-Length is not a number) is read first, counting bytes as they arrive and
refused as soon as it grows past the limit, so nothing oversized is buffered whole or parsed (a
client gone before its end is the 499 a route gives); so is every body of a route that answers by
the request's deadline (`timed`), within that deadline, fixed before (`api.deadline`): a body not
all arrived by then is the 504 naming the upload, never a request held as long as its client
pleases. A body read here is handed on as it came (the route would have buffered it whole anyway);
elsewhere a declared size within the limit passes untouched.
A path the router redirects to its route (`/predict/`, 307) has that route's limit. A body in a
transfer coding other than chunked alone is a 501 (`unknown_codings`), unread.
(FastAPI's own `max_body_size` answers a declared oversize in plain text, outside the JSON error
shape.) Each route's limit is the largest body its configured text limits allow (`body_limit`); other routes take none.
Each route parses its own body (`api.schemas.parse_json`): nesting too deep, invalid UTF-8 or a number
with thousands of digits is the 422 of malformed JSON.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deadline import Deadline, Stage, request_deadline
from api.errors import ErrorType, ServiceError, error_response, failure, quote

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


def unknown_codings(transfer_encodings: list[str]) -> str:
    """The transfer codings of a request's `Transfer-Encoding` headers other than chunked, the one
    httptools decodes (it requires it last, else a 400), joined; "" if none. Under chunked, httptools
    hands on the bytes of the others as the body: gzip's read as JSON, a 422 that misleads."""
    codings = (coding.strip() for value in transfer_encodings for coding in value.split(","))
    return ", ".join(coding for coding in codings if coding and coding.lower() != "chunked")


class BodyLimit:
    """ASGI middleware: 413 for a body over its path's limit (`limits`, else `NO_BODY_BYTES`). A
    path may be a route template: `{name}` stands for one path segment. `timeout_s`: the service's
    request timeout, for the deadline of a request whose body it reads; `timed`, the paths (of
    `limits`) whose POSTs answer by that deadline, which cuts their upload."""

    def __init__(self, app: ASGIApp, limits: dict[str, int], timeout_s: float, timed: Collection[str] = ()) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.limits = limits
        self.timed = frozenset(timed)
        self.templates = [  # (the rarer case: tried after the exact paths)
            (
                re.compile("/".join("[^/]+" if part.startswith("{") else re.escape(part) for part in path.split("/"))),
                path,
            )
            for path in limits
            if "{" in path
        ]

    def route(self, path: str) -> str | None:
        """The path of `limits` that `path` is, if any."""
        if path in self.limits:
            return path
        # `/predict/`: the router redirects it to its route (307), where the client sends the body again
        path = path.removesuffix("/")
        if path in self.limits:
            return path
        return next((route for template, route in self.templates if template.fullmatch(path)), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.route(scope["path"])
        limit = NO_BODY_BYTES if route is None else self.limits[route]
        headers = Headers(scope=scope)
        declared = declared_size(headers.get("content-length", ""))
        if declared is not None and declared > limit:
            await _response(self._too_large(limit))(scope, receive, send)
            return
        if declared is None and (codings := unknown_codings(headers.getlist("transfer-encoding"))):
            await _response(_not_implemented(codings))(scope, receive, send)
            return
        if route in self.timed and scope["method"] == "POST":
            body = await self._upload(scope, headers, limit, receive)
        elif declared is None:
            body = await self._read(limit, receive)
        else:  # the server delivers no more than Content-Length bytes: nothing to count
            await self.app(scope, receive, send)
            return
        if isinstance(body, ServiceError):
            await _response(body)(scope, receive, send)
            return
        message: Message | None = {"type": "http.request", "body": body, "more_body": False}

        async def replay() -> Message:
            nonlocal message
            if message is None:
                return await receive()  # after the body: wait for the disconnect, as the server would
            sent, message = message, None
            return sent

        await self.app(scope, replay, send)

    async def _upload(self, scope: Scope, headers: Headers, limit: int, receive: Receive) -> bytes | ServiceError:
        """`_read` within the request's deadline, which it fixes first if no layer did: the 504 at the
        deadline, naming the upload, for a body that has not all arrived."""
        try:
            deadline = request_deadline(scope, headers, self.timeout_s)
        except RequestValidationError:  # (a bad X-Request-Timeout: the route's 422; the default meanwhile)
            deadline = Deadline(self.timeout_s)
        try:
            async with deadline.cut(Stage.UPLOAD):
                return await self._read(limit, receive)
        except ServiceError as error:
            return error

    async def _read(self, limit: int, receive: Receive) -> bytes | ServiceError:
        """The body, counted as it arrives: or the 413 once it passes `limit`, the 499 when its client
        leaves (as where a route reads it)."""
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return failure(ClientDisconnect())
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return self._too_large(limit)
            more = message.get("more_body", False)
        return b"".join(chunks)

    @staticmethod
    def _too_large(limit: int) -> ServiceError:
        return ServiceError(ErrorType.TOO_LARGE, f"request body larger than this route's limit of {limit} bytes")


def _not_implemented(codings: str) -> ServiceError:
    """The 501 for a transfer coding not decoded (RFC 9112 6.1, as nginx answers any but chunked); the
    chunked framing still ends the body, so the connection goes on."""
    return ServiceError(
        ErrorType.NOT_IMPLEMENTED,
        f"the body's transfer coding {quote(codings)!r} is not implemented: send it with Transfer-Encoding: "
        "chunked alone, or with a Content-Length",
    )


def _response(error: ServiceError) -> Response:
    """`error`'s answer, as the app's handlers give it."""
    return error_response(error.error_type, error.message, error.retry_after_s)
