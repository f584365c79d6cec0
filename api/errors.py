"""The one map from what went wrong to a status (as in text-embeddings-inference): each `ErrorType`'s
HTTP status and gRPC status code (the Open Inference Protocol over gRPC, `api.inference_grpc`) in one
`ErrorSpec`.

Every answer that is not a success comes from `ERRORS`, one `ErrorType` -> status, headers and body
map, which also writes the OpenAPI document (`responses`, `document`): `{"error": message,
"error_type": type}` on every route, for every status, the router's 404 and 405 and FastAPI's 422
included (`install`); some add fields (/ready's 503 its `status` and `reason`, a 422 FastAPI's
`detail` list naming each offending field); 503 and 429 carry `Retry-After`. A 422 is
ASCII-escaped JSON (the input it echoes may hold lone surrogates that UTF-8 cannot encode) and quotes
the bad value only in part (`quote`): a 100,000-character text or 10,001 texts must not come back whole.
What an exception answers, `failure` says, for the HTTP handlers (`install`) and the gRPC server alike.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from grpc import StatusCode
from pydantic import BaseModel, ConfigDict
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Mount

from api.metrics import METHODS, REQUESTS_REFUSED
from core.redis_errors import describe

log = logging.getLogger(__name__)


class ErrorType(StrEnum):
    UNAVAILABLE = "unavailable"  # Redis unreachable or refusing commands, no model registered
    OVERLOADED = "overloaded"  # queue too deep to answer within the timeout
    TIMEOUT = "timeout"  # no result before the request's deadline
    INFERENCE = "inference"  # the model failed on this request's texts
    BAD_RESULT = "bad_result"  # the worker's result could not be read (garbage in Redis, a worker of another protocol)
    NOT_FOUND = "not_found"  # no such path; no such job (never was, expired, or deleted); a V2 model name not served
    TOO_LARGE = "too_large"  # request body over the route's limit, refused before parsing
    HEADERS_TOO_LARGE = "headers_too_large"  # a request's line and headers over their limit (`api.server`)
    UPLOAD_STALLED = "upload_stalled"  # no byte of a request's body for the keep-alive timeout (`api.server`)
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # a body declared as something other than JSON
    NOT_IMPLEMENTED = "not_implemented"  # a body in a transfer coding other than chunked (`api.limits`)
    UNAUTHORIZED = "unauthorized"  # API keys are on and the request sent none
    FORBIDDEN = "forbidden"  # the request sent a key that is not configured
    RATE_LIMITED = "rate_limited"  # this client's token bucket is empty
    NOT_READY = "not_ready"  # /ready: Redis down, no live worker, or a worker of `sentiment serve` down
    CLIENT_GONE = "client_gone"  # the client left while its request was sent or waited: nobody reads the answer
    INVALID_REQUEST = "invalid_request"  # a body or parameter that does not validate (FastAPI's 422)
    BAD_REQUEST = "bad_request"  # a body FastAPI could not read at all (its 400); a head not HTTP (`api.server`)
    METHOD_NOT_ALLOWED = "method_not_allowed"  # the path has no such method (the router's 405, with `Allow`)
    INTERNAL = "internal"  # a bug: an exception nothing handles
    TEXT_TOO_LONG = "text_too_long"  # texts of more tokens than the model takes (SENTIMENT_LONG_TEXTS=reject)


class ErrorBody(BaseModel):
    """What every error answers (`ERRORS`); some add fields of their own."""

    error: str
    error_type: ErrorType

    @classmethod
    def of(cls, error_type: ErrorType, message: str, **fields: Any) -> BaseModel:
        """The body of `error_type`, with the fields of its own (`InvalidRequestBody`'s `detail`)."""
        return cls(error=message, error_type=error_type, **fields)


class NotReadyBody(ErrorBody):
    """/ready's answer when not ready: the error, and the shape of its 200 (`status`) with the reason."""

    status: Literal["not ready"]
    reason: str

    @classmethod
    def of(cls, error_type: ErrorType, message: str, **fields: Any) -> BaseModel:
        return cls(error=message, error_type=error_type, status="not ready", reason=message)


class FieldError(BaseModel):
    """One offending field, as FastAPI (pydantic) reports it."""

    model_config = ConfigDict(extra="allow")
    loc: list[str | int]
    msg: str
    type: str
    input: Any = None


class InvalidRequestBody(ErrorBody):
    """A 422: the error (its first field, in one line) and FastAPI's `detail` list of every field; or,
    the texts being longer than the model takes (`TEXT_TOO_LONG`), one entry per such text."""

    detail: list[FieldError]


@dataclass(frozen=True)
class ErrorSpec:
    """How one `ErrorType` is answered, over HTTP and over gRPC."""

    status: int
    grpc_status: StatusCode  # (bad input, HTTP's 4xx of the body, is INVALID_ARGUMENT)
    retry_after_s: int | None = None  # `Retry-After` (gRPC: its retry pushback), unless the answer names its own
    refusal: bool = False  # turned away before any work: counted in `sentiment_requests_refused_total{reason}`
    headers: Mapping[str, str] = field(default_factory=dict)  # sent with every such answer
    body: type[ErrorBody | NotReadyBody] = ErrorBody


ERRORS: dict[ErrorType, ErrorSpec] = {
    ErrorType.UNAVAILABLE: ErrorSpec(503, StatusCode.UNAVAILABLE, retry_after_s=1),
    ErrorType.OVERLOADED: ErrorSpec(503, StatusCode.UNAVAILABLE, retry_after_s=1, refusal=True),
    ErrorType.TIMEOUT: ErrorSpec(504, StatusCode.DEADLINE_EXCEEDED),
    ErrorType.INFERENCE: ErrorSpec(424, StatusCode.INTERNAL),
    ErrorType.BAD_RESULT: ErrorSpec(502, StatusCode.INTERNAL),
    ErrorType.NOT_FOUND: ErrorSpec(404, StatusCode.NOT_FOUND),
    ErrorType.TOO_LARGE: ErrorSpec(413, StatusCode.RESOURCE_EXHAUSTED, refusal=True),
    ErrorType.HEADERS_TOO_LARGE: ErrorSpec(431, StatusCode.RESOURCE_EXHAUSTED, refusal=True),
    ErrorType.UPLOAD_STALLED: ErrorSpec(408, StatusCode.DEADLINE_EXCEEDED, refusal=True),
    ErrorType.UNSUPPORTED_MEDIA_TYPE: ErrorSpec(415, StatusCode.INVALID_ARGUMENT),
    ErrorType.NOT_IMPLEMENTED: ErrorSpec(501, StatusCode.UNIMPLEMENTED),
    ErrorType.UNAUTHORIZED: ErrorSpec(
        401, StatusCode.UNAUTHENTICATED, refusal=True, headers={"WWW-Authenticate": "Bearer"}
    ),
    ErrorType.FORBIDDEN: ErrorSpec(403, StatusCode.PERMISSION_DENIED, refusal=True),
    # the bucket says how long, mostly
    ErrorType.RATE_LIMITED: ErrorSpec(429, StatusCode.RESOURCE_EXHAUSTED, retry_after_s=1, refusal=True),
    ErrorType.NOT_READY: ErrorSpec(503, StatusCode.UNAVAILABLE, body=NotReadyBody),
    # nginx's "client closed request": what the request metrics record
    ErrorType.CLIENT_GONE: ErrorSpec(499, StatusCode.CANCELLED),
    ErrorType.INVALID_REQUEST: ErrorSpec(422, StatusCode.INVALID_ARGUMENT, body=InvalidRequestBody),
    ErrorType.BAD_REQUEST: ErrorSpec(400, StatusCode.INVALID_ARGUMENT),
    ErrorType.METHOD_NOT_ALLOWED: ErrorSpec(405, StatusCode.UNIMPLEMENTED),
    ErrorType.INTERNAL: ErrorSpec(500, StatusCode.INTERNAL),
    ErrorType.TEXT_TOO_LONG: ErrorSpec(422, StatusCode.INVALID_ARGUMENT, refusal=True, body=InvalidRequestBody),
}
# The scope's key for the method a client sent, where the app serves it as another (`api.hot_path`:
# HEAD as GET): what an error names.
SENT_METHOD = "sentiment.sent_method"
# The router's and FastAPI's own HTTP errors (`HTTPException`), by status.
HTTP_ERRORS = {
    400: ErrorType.BAD_REQUEST,
    404: ErrorType.NOT_FOUND,
    405: ErrorType.METHOD_NOT_ALLOWED,
}
# Every reason shows from the start, at 0; resolved once, as `labels` takes a lock each call.
_REFUSED = {t: REQUESTS_REFUSED.labels(t.value) for t, spec in ERRORS.items() if spec.refusal}


class ServiceError(Exception):
    """An error answered from `ERRORS`; `retry_after_s`: its `Retry-After`, where the refusal knows
    better than `ERRORS`; `fields`: its body's own beyond the message (a 422's `detail`)."""

    def __init__(self, error_type: ErrorType, message: str, retry_after_s: int | None = None, **fields: Any) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.retry_after_s = retry_after_s
        self.fields = fields


def counted(error_type: ErrorType) -> ErrorSpec:
    """`ERRORS`' spec of `error_type`, a refusal counted (over HTTP and gRPC alike)."""
    spec = ERRORS[error_type]
    if spec.refusal:
        _REFUSED[error_type].inc()
    return spec


def error_response(
    error_type: ErrorType,
    message: str,
    retry_after_s: int | None = None,
    headers: Mapping[str, str] | None = None,
    fields: Mapping[str, Any] | None = None,
) -> Response:
    """The answer for `error_type` as `ERRORS` says (`retry_after_s` overrides its `Retry-After`;
    `headers` adds to its own; `fields`, its body's own); a refusal is counted."""
    spec = counted(error_type)
    headers = {**spec.headers, **(headers or {})}
    if retry := retry_after_s or spec.retry_after_s:
        headers["Retry-After"] = str(retry)
    return Response(
        spec.body.of(error_type, message, **(fields or {})).model_dump_json(),
        status_code=spec.status,
        headers=headers or None,
        media_type="application/json",
    )


def responses(*types: ErrorType) -> dict[int | str, dict[str, Any]]:
    """OpenAPI descriptions of the errors a route can answer with, from `ERRORS`."""
    answers: dict[int | str, dict[str, Any]] = {}
    for status in sorted({ERRORS[t].status for t in types}):
        same = [t for t in types if ERRORS[t].status == status]
        bodies = {ERRORS[t].body for t in same}
        if len(bodies) != 1:
            raise ValueError(f"{status}: one route's {same} answer different bodies")
        answers[status] = {"model": bodies.pop(), "description": ", ".join(t.value for t in same)}
    return answers


RESPONSES = responses(
    ErrorType.UNAVAILABLE, ErrorType.OVERLOADED, ErrorType.TIMEOUT, ErrorType.INFERENCE, ErrorType.BAD_RESULT
)
# What a route that takes a JSON body may answer about it: too large, not JSON, not valid.
BODY_RESPONSES = responses(ErrorType.TOO_LARGE, ErrorType.UNSUPPORTED_MEDIA_TYPE, ErrorType.INVALID_REQUEST)
# What a route that answers a JSON body's texts with the model may answer about them: the same, and
# texts longer than the model takes (SENTIMENT_LONG_TEXTS=reject), a 422 of the same shape.
TEXTS_RESPONSES = responses(
    ErrorType.TOO_LARGE, ErrorType.UNSUPPORTED_MEDIA_TYPE, ErrorType.INVALID_REQUEST, ErrorType.TEXT_TOO_LONG
)
# What any operation may answer beyond those it lists: a bug's 500, and what another method or path
# on its server gets (405, 404), all in the one shape.
OTHER_ERRORS = {
    "description": "Any other error, in the same shape: "
    + ", ".join(
        f"{ERRORS[t].status} {t.value}" for t in (ErrorType.NOT_FOUND, ErrorType.METHOD_NOT_ALLOWED, ErrorType.INTERNAL)
    ),
    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ErrorBody.__name__}"}}},
}


def json_invalid(ctx: dict[str, Any]) -> dict[str, Any]:
    """The validation error of a body that is not JSON (or not parseable), as FastAPI words it: the
    body itself is never echoed."""
    return {"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error", "input": {}, "ctx": ctx}


def failure(exc: Exception) -> ServiceError:
    """What any exception answers, over HTTP (`install`) and gRPC (`api.inference_grpc`) alike: its own
    error; a request that does not validate, `invalid_request`; Redis down or refusing (OOM under
    maxmemory, READONLY after a failover, MISCONF, NOPERM), unavailable, since the client's remedy is
    the same, retry later; a client that hung up mid-body, gone; else a bug. The log names Redis's
    error (`describe`); the whole message only at DEBUG, since redis-py quotes a failed pipeline's
    commands in it (a job's texts too)."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, RequestValidationError):
        return invalid_request(exc.errors())
    if isinstance(exc, ClientDisconnect):  # (reading the body: no bug, nobody to answer)
        return ServiceError(ErrorType.CLIENT_GONE, "the client went away while it sent its request")
    if isinstance(exc, RedisError):
        log.warning("redis unavailable (%s)", describe(exc))
        log.debug("redis failed with", exc_info=exc)
        return ServiceError(ErrorType.UNAVAILABLE, f"the queue backend (Redis) is unavailable ({type(exc).__name__})")
    return ServiceError(ErrorType.INTERNAL, f"the server failed ({type(exc).__name__}); this is a bug")


def invalid_request(errors: Sequence[Any]) -> ServiceError:
    """The error of request validation (`InvalidRequestBody`): the first offending field in one line,
    and FastAPI's `detail` list with each bad value quoted (`quoted`)."""
    detail = jsonable_encoder([quoted(error) for error in errors])
    first = detail[0]
    message = f"{'.'.join(str(part) for part in first['loc'])}: {first['msg']}"
    if len(detail) > 1:
        message += f" (and {len(detail) - 1} more)"
    return ServiceError(ErrorType.INVALID_REQUEST, message, detail=detail)


def validation_response(errors: Sequence[Any]) -> Response:
    """The 422 of request validation (`invalid_request`), as ASCII-escaped JSON (the input it echoes
    may hold lone surrogates that UTF-8 cannot encode)."""
    error = invalid_request(errors)
    body = {"error": error.message, "error_type": error.error_type.value, **error.fields}
    return Response(json.dumps(body), status_code=ERRORS[error.error_type].status, media_type="application/json")


QUOTE_CHARS = 100  # of a bad value a 422 (or 415) echoes, about
_LONG_NUMBER = 10**QUOTE_CHARS


def quote(value: Any, budget: int = QUOTE_CHARS) -> Any:
    """`value` cut to about `budget` characters, for an error to echo: enough to find the bad value,
    never the whole body. A string keeps its first `budget` characters, a list or object the items
    that fit (each level down costs its brackets, which also bounds the depth), each with a count of
    what it held; a number of more than `QUOTE_CHARS` digits is named by its size (`str` refuses
    past 4,300 digits); NaN and Infinity, which the parsers take but JSON has not, as the strings the
    client wrote (bare, they would make the 422 a body strict parsers refuse)."""
    if isinstance(value, str):
        return value if len(value) <= budget else f"{value[:budget]}… ({len(value)} characters)"
    if isinstance(value, int) and abs(value) >= _LONG_NUMBER:
        return f"a number of more than {QUOTE_CHARS} digits"
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)
    if isinstance(value, dict):
        fields: dict[Any, Any] = {}
        for key, item in value.items():
            if budget <= 2:
                fields["…"] = f"({len(value)} in all)"
                break
            short_key, short_item = quote(key, budget - 2), quote(item, budget - 2)
            fields[short_key] = short_item
            budget -= len(repr(short_key)) + len(repr(short_item)) + 2
        return fields
    if isinstance(value, list | tuple):
        items: list[Any] = []
        for item in value:
            if budget <= 2:
                items.append(f"… ({len(value)} in all)")
                break
            items.append(quote(item, budget - 2))
            budget -= len(repr(items[-1])) + 2
        return items
    return value


def quoted(error: dict[str, Any]) -> dict[str, Any]:
    """A validation error whose input, and location (an object's key can be long), are quoted."""
    return {**error, "loc": [quote(part) for part in error["loc"]], "input": quote(error["input"])}


def install(app: FastAPI) -> None:
    async def on_error(request: Request, exc: Exception) -> Response:
        """Every error a route raises, as `failure` answers it, and the router's (`http_error_response`);
        after a bug's answer Starlette logs its traceback and re-raises it."""
        if isinstance(exc, RequestValidationError):
            return validation_response(exc.errors())
        if isinstance(exc, HTTPException):
            return http_error_response(request, exc)
        error = failure(exc)
        return error_response(error.error_type, error.message, error.retry_after_s, fields=error.fields)

    # (each but `Exception` answered where the route is: Starlette logs and re-raises only a bug)
    for raised in (RequestValidationError, HTTPException, ServiceError, RedisError, ClientDisconnect, Exception):
        app.add_exception_handler(raised, on_error)


def http_error_response(request: Request, exc: HTTPException) -> Response:
    """The router's 404 and 405 (and FastAPI's 400), in the one shape, their headers kept (`Allow` as
    `allowed` says), naming the method the client sent; any other status (nothing raises one) is a
    bug's 500."""
    error_type = HTTP_ERRORS.get(exc.status_code, ErrorType.INTERNAL)
    headers = dict(exc.headers or {})
    if "Allow" in headers:
        headers["Allow"] = allowed(request, headers["Allow"])
    where = f"{request.scope.get(SENT_METHOD, request.method)} {quote(request.url.path)}"
    message = {
        ErrorType.NOT_FOUND: f"{where}: no such path (GET /docs lists the routes)",
        ErrorType.METHOD_NOT_ALLOWED: f"{where}: this path takes {headers.get('Allow', 'other methods')}",
    }.get(error_type, f"{where}: {exc.detail}")
    return error_response(error_type, message, headers=headers)


def allowed(request: Request, allow: str) -> str:
    """A 405's `Allow`, every method the path takes: the router names those of the first route of the
    path alone (GET of /jobs/{id}, not its DELETE), so each route's too, matched from the app's root
    (past a mount, the scope's root path is the mount's), but a mount's, which takes every method
    and whose app names its own; and HEAD wherever GET (`api.hot_path`); sorted, as Starlette sorts its own."""
    scope = {**request.scope, "root_path": request.scope.get("app_root_path", request.scope.get("root_path", ""))}
    routes = [route for route in request.app.router.routes if not isinstance(route, Mount)]
    methods = {method.strip() for method in allow.split(",")} | {
        method
        for method in METHODS
        if any(route.matches({**scope, "method": method})[0] is Match.FULL for route in routes)
    }
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


def document(app: FastAPI) -> None:
    """Make the OpenAPI document say what `install` answers: every 422 an `InvalidRequestBody` (FastAPI's
    own, on routes with path parameters, too; a route's own, `responses`, keeps its description: the
    types it names) and, on every operation, `OTHER_ERRORS` as its default."""
    build = app.openapi
    invalid = {
        "description": ErrorType.INVALID_REQUEST.value,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{InvalidRequestBody.__name__}"}}},
    }
    types = {t.value for t in ErrorType}

    def openapi() -> dict[str, Any]:
        if (schema := app.openapi_schema) is None:
            schema = build()  # (and kept as `app.openapi_schema`)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    answers = operation.setdefault("responses", {})
                    if "422" in answers:
                        described = answers["422"].get("description", "")
                        ours = set(described.split(", ")) <= types  # (FastAPI's own: "Validation Error")
                        answers["422"] = {**invalid, "description": described} if ours else invalid
                    answers["default"] = OTHER_ERRORS
            components = schema.get("components", {}).get("schemas", {})
            for fastapi_own in ("HTTPValidationError", "ValidationError"):
                components.pop(fastapi_own, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend its schema
