"""HTTP routes: /predict, and the probes and model info operators need."""

import logging
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from redis.exceptions import RedisError
from starlette.datastructures import State

from api.access import client_of
from api.deadline import request_deadline
from api.errors import RESPONSES, TEXTS_RESPONSES, ErrorType, ServiceError, error_response, responses
from api.predictions import ModelInfoCache, Predictor
from api.schemas import (
    ModelResponse,
    PredictResponse,
    ReadyResponse,
    content_encoding,
    json_body,
    parse_json,
    texts_request,
    timeout_parameter,
)
from core.liveness import beating
from core.protocol import Keys
from core.redis_errors import describe
from core.redis_replies import text
from core.settings import Settings

log = logging.getLogger(__name__)


class RequestRoute(APIRoute):
    """A documented route whose endpoint takes the `Request` and returns its `Response` itself.

    FastAPI's per-request handler, which solves the endpoint's parameters (parsing the query string
    even where none is declared), is skipped (what it cost a cached /predict: docs/tuning.md,
    "/predict without FastAPI's request handler"). The OpenAPI entry
    still comes from the route's arguments (`response_model`, `openapi_extra`), and errors raised
    by the endpoint reach the app's handlers as from any route. Nothing is injected, so the
    endpoint may declare no other parameter and the route no dependencies; this is refused when
    the route is made.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        d = self.dependant
        if d.path_params or d.query_params or d.header_params or d.cookie_params or d.body_params or d.dependencies:
            raise TypeError(f"{path}: a RequestRoute's endpoint takes only the Request, and the route no dependencies")

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return self.endpoint


def add_predict_route(app: FastAPI, settings: Settings) -> None:
    """/predict, on the app's own router: FastAPI matches an included router's routes through a
    wrapper of its own, a cost on every request (docs/tuning.md, "The API's CPU")."""
    PredictRequest = texts_request("PredictRequest", settings.max_texts, settings.max_chars)

    async def predict(request: Request) -> Response:
        """Classify texts: every label's probability per text, in input order.

        The `X-Cache` header says whether the answer came from the cache (`hit`), the model
        (`miss`) or both (`partial`).
        """
        deadline = request_deadline(request.scope, request.headers, settings.request_timeout_s)
        headers = request.headers
        body = parse_json(
            PredictRequest, await request.body(), headers.get("content-type", ""), content_encoding(headers)
        )
        predictor: Predictor = request.app.state.predictor
        # With the body read, `receive` says when the client goes away: a wait for the worker then stops.
        predictions, cache = await predictor.predict(
            body.text, client_of(request.scope), request.receive, deadline=deadline
        )
        # Built here rather than validated through the response model: the worker wrote this shape.
        return Response(
            orjson.dumps({"predictions": predictions}), media_type="application/json", headers={"X-Cache": cache}
        )

    app.router.add_api_route(
        "/predict",
        predict,
        methods=["POST"],
        tags=["predict"],
        route_class_override=RequestRoute,
        response_model=PredictResponse,
        openapi_extra={**json_body(PredictRequest), **timeout_parameter(settings.request_timeout_s)},
        responses={**RESPONSES, **TEXTS_RESPONSES},
    )


router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers. Says nothing about Redis or workers (see /ready)."""
    return {"status": "healthy"}


@router.get("/ready", response_model=ReadyResponse, responses=responses(ErrorType.NOT_READY))
async def ready(request: Request) -> Response:
    """Readiness: Redis answers, at least one worker has a fresh heartbeat, and nothing else is wrong
    (`sentiment serve`: none of its workers is down). Open to anyone, it says what is wrong in
    general terms; the details (Redis's address and words, a worker's last line) are in the log."""
    alive = await readiness(request.app.state)
    if isinstance(alive, str):
        return error_response(ErrorType.NOT_READY, alive)
    return JSONResponse({"status": "ready", "workers": alive})


async def readiness(state: State) -> int | str:
    """The live workers, or why the service is not ready (/ready's, and the gRPC probes')."""
    redis = state.redis
    keys: Keys = state.keys
    try:
        await redis.ping()
        worker_ids = [text(w) for w in await redis.smembers(keys.workers)]
        alive = len(beating(worker_ids, await redis.mget([keys.heartbeat(w) for w in worker_ids]))) if worker_ids else 0
    except RedisError as exc:  # where Redis is, and its words, are the operator's: the log's, not the probe's
        log.warning("not ready: redis unavailable (%s)", describe(exc))
        return f"redis unavailable ({type(exc).__name__})"
    if not alive:
        return "no live worker"
    if (problem := state.problem) and (reason := problem()):
        return str(reason)
    return alive


@router.get("/model", response_model=ModelResponse, responses=RESPONSES)
async def model(request: Request) -> ModelResponse:
    """The model the workers serve: name, version (checkpoint fingerprint), labels, device."""
    models: ModelInfoCache = request.app.state.models
    info = await models.current()
    if info is None:
        raise ServiceError(ErrorType.UNAVAILABLE, "no worker has announced a model yet")
    return ModelResponse(**asdict(info))
