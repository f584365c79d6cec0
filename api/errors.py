"""The one map from what went wrong to an HTTP status (as in text-embeddings-inference), and beside it
the gRPC status of each (`GRPC_STATUS`, for the Open Inference Protocol over gRPC).

Every refusal is answered from `ERRORS`, one `ErrorType` -> status, headers and body map, which also
writes the routes' OpenAPI (`responses`): handlers answer `{"error": message, "error_type": type}`
(/ready's 503 `{"status": "not ready", "reason": ...}`); 503 and 429 carry `Retry-After`.
Request validation keeps FastAPI's standard 422 body, which names the offending field (ASCII-escaped:
the input it echoes may hold lone surrogates that UTF-8 cannot encode). It quotes the bad value
only in part (`quote`): a 100,000-character text or 10,001 texts must not come back whole.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import grpc
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from redis.exceptions import RedisError

from api.metrics import REQUESTS_REFUSED
from core.redis_errors import describe

log = logging.getLogger(__name__)


class ErrorType(StrEnum):
    UNAVAILABLE = "unavailable"  # Redis unreachable or refusing commands, no model registered
    OVERLOADED = "overloaded"  # queue too deep to answer within the timeout
    TIMEOUT = "timeout"  # no result before the request's deadline
    INFERENCE = "inference"  # the model failed on this request's texts
    BAD_RESULT = "bad_result"  # the worker's result could not be read (garbage in Redis, a worker of another protocol)
    NOT_FOUND = "not_found"  # no such job (never was, expired, or deleted); a V2 model name not served
    TOO_LARGE = "too_large"  # request body over the route's limit, refused before parsing
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # a body declared as something other than JSON
    UNAUTHORIZED = "unauthorized"  # API keys are on and the request sent none
    FORBIDDEN = "forbidden"  # the request sent a key that is not configured
    RATE_LIMITED = "rate_limited"  # this client's token bucket is empty
    NOT_READY = "not_ready"  # /ready: Redis down, no live worker, or a worker of `sentiment serve` down
    CLIENT_GONE = "client_gone"  # the client disconnected while its request waited: nobody reads the answer


class ErrorBody(BaseModel):
    error: str
    error_type: ErrorType

    @classmethod
    def of(cls, error_type: ErrorType, message: str) -> BaseModel:
        return cls(error=message, error_type=error_type)


class NotReadyBody(BaseModel):
    """/ready's answer when not ready: the shape of its 200 (`status`), with the reason."""

    status: Literal["not ready"]
    reason: str

    @classmethod
    def of(cls, error_type: ErrorType, message: str) -> BaseModel:
        return cls(status="not ready", reason=message)


@dataclass(frozen=True)
class ErrorSpec:
    """How one `ErrorType` is answered."""

    status: int
    retry_after_s: int | None = None  # the `Retry-After` header, unless the answer names its own
    refusal: bool = False  # turned away before any work: counted in `sentiment_requests_refused_total{reason}`
    headers: Mapping[str, str] = field(default_factory=dict)  # sent with every such answer
    body: type[ErrorBody | NotReadyBody] = ErrorBody


ERRORS: dict[ErrorType, ErrorSpec] = {
    ErrorType.UNAVAILABLE: ErrorSpec(503, retry_after_s=1),
    ErrorType.OVERLOADED: ErrorSpec(503, retry_after_s=1, refusal=True),
    ErrorType.TIMEOUT: ErrorSpec(504),
    ErrorType.INFERENCE: ErrorSpec(424),
    ErrorType.BAD_RESULT: ErrorSpec(502),
    ErrorType.NOT_FOUND: ErrorSpec(404),
    ErrorType.TOO_LARGE: ErrorSpec(413, refusal=True),
    ErrorType.UNSUPPORTED_MEDIA_TYPE: ErrorSpec(415),
    ErrorType.UNAUTHORIZED: ErrorSpec(401, refusal=True, headers={"WWW-Authenticate": "Bearer"}),
    ErrorType.FORBIDDEN: ErrorSpec(403, refusal=True),
    ErrorType.RATE_LIMITED: ErrorSpec(429, retry_after_s=1, refusal=True),  # the bucket says how long, mostly
    ErrorType.NOT_READY: ErrorSpec(503, body=NotReadyBody),
    ErrorType.CLIENT_GONE: ErrorSpec(499),  # nginx's "client closed request": what the request metrics record
}
# The same errors over gRPC (`api.inference_grpc`); bad input, FastAPI's 422, is INVALID_ARGUMENT there.
GRPC_STATUS: dict[ErrorType, grpc.StatusCode] = {
    ErrorType.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorType.OVERLOADED: grpc.StatusCode.UNAVAILABLE,
    ErrorType.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorType.INFERENCE: grpc.StatusCode.INTERNAL,
    ErrorType.BAD_RESULT: grpc.StatusCode.INTERNAL,
    ErrorType.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorType.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorType.UNSUPPORTED_MEDIA_TYPE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorType.UNAUTHORIZED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorType.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    ErrorType.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorType.NOT_READY: grpc.StatusCode.UNAVAILABLE,
    ErrorType.CLIENT_GONE: grpc.StatusCode.CANCELLED,
}
for _type, _spec in ERRORS.items():
    if _spec.refusal:
        REQUESTS_REFUSED.labels(_type.value)  # every reason shows from the start, at 0


class ServiceError(Exception):
    def __init__(self, error_type: ErrorType, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.retry_after_s = retry_after_s  # the `Retry-After` header, where the refusal knows better than `ERRORS`


def counted(error_type: ErrorType) -> ErrorSpec:
    """`ERRORS`' spec of `error_type`, a refusal counted (over HTTP and gRPC alike)."""
    spec = ERRORS[error_type]
    if spec.refusal:
        REQUESTS_REFUSED.labels(error_type.value).inc()
    return spec


def error_response(error_type: ErrorType, message: str, retry_after_s: int | None = None) -> JSONResponse:
    """The answer for `error_type` as `ERRORS` says (`retry_after_s` overrides its `Retry-After`);
    a refusal is counted."""
    spec = counted(error_type)
    headers = dict(spec.headers)
    if retry := retry_after_s or spec.retry_after_s:
        headers["Retry-After"] = str(retry)
    return JSONResponse(
        spec.body.of(error_type, message).model_dump(mode="json"), status_code=spec.status, headers=headers or None
    )


def responses(*types: ErrorType) -> dict[int | str, dict[str, Any]]:
    """OpenAPI descriptions of the errors a route can answer with (beyond FastAPI's 422), from `ERRORS`."""
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
# What a route that takes a JSON body may answer before reading it.
BODY_RESPONSES = responses(ErrorType.TOO_LARGE, ErrorType.UNSUPPORTED_MEDIA_TYPE)
# The 422 of a route that validates its body itself (`api.schemas.parse_json`), as FastAPI documents
# its own: the schema is FastAPI's component, there as long as any route takes parameters.
VALIDATION_ERROR = {
    "description": "Validation Error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
}


def json_invalid(ctx: dict[str, Any]) -> dict[str, Any]:
    """The validation error of a body that is not JSON (or not parseable), as FastAPI words it: the
    body itself is never echoed."""
    return {"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error", "input": {}, "ctx": ctx}


def validation_response(errors: Sequence[Any]) -> Response:
    """The 422 of request validation: FastAPI's body, with each bad value quoted (`quoted`) and
    ASCII-escaped JSON (the input it echoes may hold lone surrogates that UTF-8 cannot encode)."""
    detail = jsonable_encoder([quoted(error) for error in errors])
    return Response(json.dumps({"detail": detail}), status_code=422, media_type="application/json")


QUOTE_CHARS = 100  # of a bad value a 422 (or 415) echoes, about
_LONG_NUMBER = 10**QUOTE_CHARS


def quote(value: Any, budget: int = QUOTE_CHARS) -> Any:
    """`value` cut to about `budget` characters, for an error to echo: enough to find the bad value,
    never the whole body. A string keeps its first `budget` characters, a list or object the items
    that fit (each level down costs its brackets, which also bounds the depth), each with a count of
    what it held; a number of more than `QUOTE_CHARS` digits is named by its size (`str` refuses
    past 4,300 digits)."""
    if isinstance(value, str):
        return value if len(value) <= budget else f"{value[:budget]}… ({len(value)} characters)"
    if isinstance(value, int) and abs(value) >= _LONG_NUMBER:
        return f"a number of more than {QUOTE_CHARS} digits"
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
    async def on_service_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return error_response(exc.error_type, exc.message, exc.retry_after_s)

    async def on_redis_error(_: Request, exc: Exception) -> JSONResponse:
        """Down or refusing (OOM under maxmemory, READONLY after a failover, MISCONF, NOPERM): the
        client's remedy is the same, retry later. The log names the class; an error reply's message
        only at DEBUG, since redis-py quotes a failed pipeline's commands in it (a job's texts too)."""
        log.warning("redis unavailable (%s)", describe(exc))
        log.debug("redis failed with", exc_info=exc)
        return error_response(ErrorType.UNAVAILABLE, f"the queue backend (Redis) is unavailable ({type(exc).__name__})")

    async def on_invalid_request(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return validation_response(exc.errors())

    app.add_exception_handler(RequestValidationError, on_invalid_request)
    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RedisError, on_redis_error)
