"""The one map from what went wrong to an HTTP status (as in text-embeddings-inference).

Handlers answer `{"error": message, "error_type": type}`; 503 and 429 carry `Retry-After`.
Request validation keeps FastAPI's standard 422 body, which names the offending field (ASCII-escaped:
the input it echoes may hold lone surrogates that UTF-8 cannot encode). It quotes the bad value
only in part (`quote`): a 100,000-character text or 10,001 texts must not come back whole.
"""

from __future__ import annotations

import json
import logging
from enum import StrEnum
from typing import Any

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
    NOT_FOUND = "not_found"  # no such job (never was, expired, or deleted)
    TOO_LARGE = "too_large"  # request body over the route's limit, refused before parsing
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # a body declared as something other than JSON
    UNAUTHORIZED = "unauthorized"  # API keys are on and the request sent none
    FORBIDDEN = "forbidden"  # the request sent a key that is not configured
    RATE_LIMITED = "rate_limited"  # this client's token bucket is empty


STATUS = {
    ErrorType.UNAVAILABLE: 503,
    ErrorType.OVERLOADED: 503,
    ErrorType.TIMEOUT: 504,
    ErrorType.INFERENCE: 424,
    ErrorType.NOT_FOUND: 404,
    ErrorType.TOO_LARGE: 413,
    ErrorType.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorType.UNAUTHORIZED: 401,
    ErrorType.FORBIDDEN: 403,
    ErrorType.RATE_LIMITED: 429,
}
RETRY_AFTER_S = {ErrorType.UNAVAILABLE: 1, ErrorType.OVERLOADED: 1}
# Requests turned away before any work: each answer counts in `sentiment_requests_refused_total{reason}`.
REFUSED = (ErrorType.OVERLOADED, ErrorType.RATE_LIMITED, ErrorType.UNAUTHORIZED, ErrorType.FORBIDDEN, ErrorType.TOO_LARGE)
for _refusal in REFUSED:
    REQUESTS_REFUSED.labels(_refusal.value)  # every reason shows from the start, at 0


class ErrorBody(BaseModel):
    error: str
    error_type: ErrorType


class ServiceError(Exception):
    def __init__(self, error_type: ErrorType, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


def error_response(error_type: ErrorType, message: str) -> JSONResponse:
    if error_type in REFUSED:
        REQUESTS_REFUSED.labels(error_type.value).inc()
    retry = RETRY_AFTER_S.get(error_type)
    return JSONResponse(
        ErrorBody(error=message, error_type=error_type).model_dump(mode="json"),
        status_code=STATUS[error_type],
        headers={"Retry-After": str(retry)} if retry else None,
    )


def responses(*types: ErrorType) -> dict[int | str, dict]:
    """OpenAPI descriptions of the errors a route can answer with (beyond FastAPI's 422)."""
    return {
        status: {"model": ErrorBody, "description": ", ".join(t.value for t in types if STATUS[t] == status)}
        for status in sorted({STATUS[t] for t in types})
    }


RESPONSES = responses(ErrorType.UNAVAILABLE, ErrorType.OVERLOADED, ErrorType.TIMEOUT, ErrorType.INFERENCE)
# What a route that takes a JSON body may answer before reading it.
BODY_RESPONSES = responses(ErrorType.TOO_LARGE, ErrorType.UNSUPPORTED_MEDIA_TYPE)
# The 422 of a route that validates its body itself (`api.schemas.parse_json`), as FastAPI documents
# its own: the schema is FastAPI's component, there as long as any route takes parameters.
VALIDATION_ERROR = {
    "description": "Validation Error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
}


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
        return error_response(exc.error_type, exc.message)

    async def on_redis_error(_: Request, exc: Exception) -> JSONResponse:
        """Down or refusing (OOM under maxmemory, READONLY after a failover, MISCONF, NOPERM): the
        client's remedy is the same, retry later. The log names the class; an error reply's message
        only at DEBUG, since redis-py quotes a failed pipeline's commands in it (a job's texts too)."""
        log.warning("redis unavailable (%s)", describe(exc))
        log.debug("redis failed with", exc_info=exc)
        return error_response(ErrorType.UNAVAILABLE, f"the queue backend (Redis) is unavailable ({type(exc).__name__})")

    async def on_invalid_request(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        detail = jsonable_encoder([quoted(error) for error in exc.errors()])
        body = json.dumps({"detail": detail})  # ensure_ascii: always encodable
        return Response(body, status_code=422, media_type="application/json")

    app.add_exception_handler(RequestValidationError, on_invalid_request)
    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RedisError, on_redis_error)
