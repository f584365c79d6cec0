"""The Open Inference Protocol (KServe V2) over REST, on the same app and the same path as /predict:
`api.inference`'s calls at /v2, their requests decoded from JSON and their answers encoded as JSON.

Server and model metadata, liveness and readiness, and `POST /v2/models/{name}/infer`; each model
route also at `/v2/models/{name}/versions/{version}` (tritonclient's `model_version`): the served
version answers there, another is a 404 naming it, as over gRPC. The texts' data as JSON strings
(flat or nested) or as the binary tensor extension (the input's `binary_data_size` bytes after the
JSON header, `Inference-Header-Content-Length`: tritonclient's default). Outputs are always answered
as JSON, which clients of the binary extension read too. The texts go through `Predictor`, as
/predict's do: the same cache, queue, limits, errors (`api.errors`: 404 for another model's name, a
422 located in `body`) and access control."""

from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request, Response
from starlette.datastructures import Headers

from api import inference
from api.access import client_of
from api.deadline import request_deadline
from api.errors import RESPONSES, TEXTS_RESPONSES, ErrorType, responses
from api.inference import Inference, InferRequest
from api.limits import declared_size
from api.schemas import json_body, parse_json, require_uncompressed, timeout_parameter
from core.settings import Settings

MODEL_PATHS = ("/models/{name}", "/models/{name}/versions/{version}")  # (under /v2)
INFER_PATHS = tuple(f"/v2{path}/infer" for path in MODEL_PATHS)
HEADER_LENGTH = "inference-header-content-length"  # the binary tensor extension's JSON header size
VERSION_PARAMETER = {
    "name": "version",
    "in": "path",
    "required": True,
    "description": "The served version (GET /model's `version`); another is 404.",
    "schema": {"type": "string"},
}
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def inference_protocol_router(settings: Settings) -> APIRouter:
    """The `/v2` routes: the server's and the model's metadata, health and readiness, and `infer`."""
    router = APIRouter(prefix="/v2", tags=["open inference protocol"])
    add_metadata_routes(router)
    add_infer_route(router, settings)
    return router


def add_metadata_routes(router: APIRouter) -> None:
    """Server and model metadata, liveness and readiness."""

    @router.get("")
    async def server_metadata(request: Request) -> dict[str, Any]:
        """Server metadata: name, version, and the protocol extensions supported."""
        return inference.server_metadata(request.app)

    @router.get("/health/live")
    async def live() -> dict[str, bool]:
        """Liveness, as /health: the process answers."""
        return {"live": True}

    @router.get("/health/ready", responses=responses(ErrorType.NOT_READY))
    async def server_ready(request: Request) -> dict[str, bool]:
        """Readiness, as /ready (its 503 when not ready)."""
        await inference.ready(request.app.state)
        return {"ready": True}

    @model_route(router, "GET", "", responses=responses(ErrorType.NOT_FOUND, ErrorType.UNAVAILABLE))
    async def model_metadata(request: Request, name: str) -> dict[str, Any]:
        """The served model's metadata: its version, the input and outputs, and `labels` (the order of `scores`)."""
        return inference.model_metadata(
            await inference.served(request.app.state.models, name, version=version_of(request))
        )

    @model_route(router, "GET", "/ready", responses=responses(ErrorType.NOT_FOUND, ErrorType.NOT_READY))
    async def model_ready(request: Request, name: str) -> dict[str, Any]:
        """200 when the service is ready (/ready) and serves this model; 404 for another name or version."""
        await inference.ready(request.app.state, name, version_of(request))
        return {"name": name, "ready": True}


def model_route(router: APIRouter, method: str, path: str, **options: Any) -> Callable[[Endpoint], Endpoint]:
    """Add the endpoint under each of `MODEL_PATHS`, the model's and its version's: one route body,
    the version read from the path where it has one (`version_of`)."""

    def add(endpoint: Endpoint) -> Endpoint:
        model, version = MODEL_PATHS
        router.add_api_route(model + path, endpoint, methods=[method], **options)
        extra = options.get("openapi_extra", {})
        parameters = [*extra.get("parameters", ()), VERSION_PARAMETER]
        versioned = {**options, "openapi_extra": {**extra, "parameters": parameters}}
        router.add_api_route(version + path, endpoint, methods=[method], **versioned)
        return endpoint

    return add


def version_of(request: Request) -> str:
    """The version the path names, or "" (any: the served one)."""
    version: str = request.path_params.get("version", "")
    return version


def add_infer_route(router: APIRouter, settings: Settings) -> None:
    """`POST /models/{name}/infer`, its request schema made with the configured limits."""
    v2 = Inference(settings.max_texts, settings.max_chars, located=("body",))

    @model_route(
        router,
        "POST",
        "/infer",
        openapi_extra={**json_body(v2.request_model), **timeout_parameter(settings.request_timeout_s)},
        responses={**RESPONSES, **responses(ErrorType.NOT_FOUND), **TEXTS_RESPONSES},
    )
    async def infer(request: Request, name: str) -> Response:
        """Classify texts: the `label` and `scores` of each, in input order (`api.inference`)."""
        deadline = request_deadline(request.scope, request.headers, settings.request_timeout_s)
        state = request.app.state
        info = await v2.model_named(state, name, deadline, version_of(request))
        body, binary = parse_infer(v2, await request.body(), request.headers)
        if body.model_name not in (None, name):  # (KServe's client repeats the path's name in the body)
            raise v2.invalid(("model_name",), f"the path names the model {name[:100]!r}", body.model_name)
        answer, cache = await v2.infer(state, info, body, binary, client_of(request.scope), deadline, request.receive)
        return Response(orjson.dumps(answer), media_type="application/json", headers={"X-Cache": cache})


def parse_infer(v2: Inference, raw: bytes, headers: Headers) -> tuple[InferRequest, bytes | None]:
    """The request and its input's binary data after the JSON header, if any (`HEADER_LENGTH` says
    where the header ends; the input's `binary_data_size`, how long its data is); a compressed body
    is a 415, as one not JSON is."""
    require_uncompressed(headers.get("content-encoding", ""))  # (tritonclient's `request_compression_algorithm`)
    header = headers.get(HEADER_LENGTH)
    if header is None:
        return parse_json(v2.request_model, raw, headers.get("content-type", "")), None
    size = declared_size(header)
    if size is None or size > len(raw):
        raise v2.invalid((), f"{HEADER_LENGTH} must be the size of the JSON header, at most the body's", header)
    body, binary = parse_json(v2.request_model, raw[:size], ""), raw[size:]
    if not binary:
        return body, None
    declared = (body.inputs[0].parameters or {}).get("binary_data_size")
    if not isinstance(declared, int) or isinstance(declared, bool) or declared != len(binary):
        where = ("inputs", 0, "parameters", "binary_data_size")
        raise v2.invalid(where, f"the size of the binary data after the JSON header: {len(binary)}", declared)
    return body, binary
