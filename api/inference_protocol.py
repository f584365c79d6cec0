"""The Open Inference Protocol (KServe V2) over REST, on the same app and the same path as /predict:
`api.inference`'s calls at /v2, their requests decoded from JSON and their answers encoded as JSON.

Server and model metadata, liveness and readiness, and `POST /v2/models/{name}/infer`; each model
route also at `/v2/models/{name}/versions/{version}` (tritonclient's `model_version`): the served
version answers there, another is a 404 naming it, as over gRPC. The texts' data as JSON strings
(flat or nested) or as the binary tensor extension (the input's `binary_data_size` bytes after the
JSON header, `Inference-Header-Content-Length`: tritonclient's default). Outputs are answered as
JSON, or as binary data where asked (`binary_outputs`; tritonclient's default too), as Triton answers
them: the same client code reads the same types as from gRPC's raw outputs. The texts go through
`Predictor`, as /predict's do: the same cache, queue, limits, errors (`api.errors`: 404 for another
model's name, a 422 located in `body`) and access control.
"""

from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request, Response
from starlette.datastructures import Headers

from api import inference
from api.access import client_of
from api.deadline import request_deadline
from api.errors import RESPONSES, TEXTS_RESPONSES, ErrorType, responses
from api.inference import OUTPUTS, Inference, InferRequest, InferResponse, Location, packed
from api.limits import declared_size
from api.schemas import content_encoding, json_body, parse_json, require_uncompressed, timeout_parameter
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
BINARY_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "Outputs asked as binary data: the JSON answer, then their data "
                    f"(the answer's size in the {HEADER_LENGTH} header).",
                }
            }
        }
    }
}


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
        responses={**RESPONSES, **responses(ErrorType.NOT_FOUND), **TEXTS_RESPONSES, **BINARY_RESPONSE},
    )
    async def infer(request: Request, name: str) -> Response:
        """Classify texts: the `label` and `scores` of each, in input order (`api.inference`)."""
        deadline = request_deadline(request.scope, request.headers, settings.request_timeout_s)
        state = request.app.state
        info = await v2.model_named(state, name, deadline, version_of(request))
        body, binary = parse_infer(v2, await request.body(), request.headers)
        if body.model_name not in (None, name):  # (KServe's client repeats the path's name in the body)
            raise v2.invalid(("model_name",), f"the path names the model {name[:100]!r}", body.model_name)
        as_binary = binary_outputs(v2, body)
        answer, cache = await v2.infer(state, info, body, binary, client_of(request.scope), deadline, request.receive)
        return encoded(answer, as_binary, {"X-Cache": cache})


def parse_infer(v2: Inference, raw: bytes, headers: Headers) -> tuple[InferRequest, bytes | None]:
    """The request and its input's binary data after the JSON header, if any (`HEADER_LENGTH` says
    where the header ends; the input's `binary_data_size`, how long its data is); a compressed body
    is a 415, as one not JSON is."""
    require_uncompressed(content_encoding(headers))  # (tritonclient's `request_compression_algorithm`)
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


def binary_outputs(v2: Inference, body: InferRequest) -> set[str]:
    """The outputs to answer as binary data, as Triton decides: each requested output's `binary_data`
    where it says, else the request's `binary_data_output` (false when absent); a flag not a boolean
    is a 422."""
    default = flag(v2, body.parameters, ("parameters",), "binary_data_output") or False
    if not body.outputs:
        return set(OUTPUTS) if default else set()
    wanted = {
        o.name: flag(v2, o.parameters, ("outputs", i, "parameters"), "binary_data") for i, o in enumerate(body.outputs)
    }
    return {name for name, own in wanted.items() if (default if own is None else own)}


def flag(v2: Inference, parameters: dict[str, Any] | None, where: Location, key: str) -> bool | None:
    """A boolean parameter (`binary_data_output`, an output's `binary_data`): None when absent, a 422
    naming where it is for anything but a JSON boolean (a string "false" is not read as true)."""
    value = (parameters or {}).get(key)
    if value is None or isinstance(value, bool):
        return value
    raise v2.invalid((*where, key), "a boolean: true or false", value)


def encoded(answer: InferResponse, binary: set[str], headers: dict[str, str]) -> Response:
    """The answer as JSON; the outputs in `binary` as their contents after it instead (each its
    `binary_data_size`, the JSON's size in `HEADER_LENGTH`), laid out as gRPC's `raw_output_contents`."""
    outputs: list[dict[str, Any]] = []
    raw: list[bytes] = []
    for tensor in answer.outputs:
        outputs.append({"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape})
        if tensor.name in binary:
            raw.append(packed(tensor))
            outputs[-1]["parameters"] = {"binary_data_size": len(raw[-1])}
        else:
            outputs[-1]["data"] = tensor.data
    header = orjson.dumps({**vars(answer), "outputs": outputs})
    if not raw:
        return Response(header, media_type="application/json", headers=headers)
    headers = {**headers, HEADER_LENGTH: str(len(header))}
    return Response(header + b"".join(raw), media_type="application/octet-stream", headers=headers)
