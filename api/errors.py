"""The one map from what went wrong to an HTTP status (as in text-embeddings-inference).

Handlers answer `{"error": message, "error_type": type}`; 503 and 429 carry `Retry-After`.
Request validation keeps FastAPI's standard 422 body, which names the offending field (ASCII-escaped:
the input it echoes may hold lone surrogates that UTF-8 cannot encode).
"""

from __future__ import annotations

import json
import logging
from enum import StrEnum

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from redis.exceptions import RedisError

from api.metrics import REQUESTS_REFUSED
from batcher.redis_errors import describe

log = logging.getLogger(__name__)


class ErrorType(StrEnum):
    UNAVAILABLE = "unavailable"  # Redis unreachable or refusing commands, no model registered
    OVERLOADED = "overloaded"  # queue too deep to answer within the timeout
    TIMEOUT = "timeout"  # no result before the request's deadline
    INFERENCE = "inference"  # the model failed on this request's texts
    NOT_FOUND = "not_found"  # no such job (never was, or expired)
    CONFLICT = "conflict"  # the job's state forbids the operation (cancel after it ended)
    TOO_LARGE = "too_large"  # request body over the route's limit, refused before parsing
    UNAUTHORIZED = "unauthorized"  # API keys are on and the request sent none
    FORBIDDEN = "forbidden"  # the request sent a key that is not configured
    RATE_LIMITED = "rate_limited"  # this client's token bucket is empty


STATUS = {
    ErrorType.UNAVAILABLE: 503,
    ErrorType.OVERLOADED: 503,
    ErrorType.TIMEOUT: 504,
    ErrorType.INFERENCE: 424,
    ErrorType.NOT_FOUND: 404,
    ErrorType.CONFLICT: 409,
    ErrorType.TOO_LARGE: 413,
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
# The 422 of a route that validates its body itself (`api.schemas.parse_json`), as FastAPI documents
# its own: the schema is FastAPI's component, there as long as any route takes parameters.
VALIDATION_ERROR = {
    "description": "Validation Error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
}


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
        body = json.dumps({"detail": jsonable_encoder(exc.errors())})  # ensure_ascii: always encodable
        return Response(body, status_code=422, media_type="application/json")

    app.add_exception_handler(RequestValidationError, on_invalid_request)
    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RedisError, on_redis_error)
