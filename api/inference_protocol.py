"""The Open Inference Protocol (KServe V2) over REST, on the same app and the same path as /predict.

Server and model metadata, liveness and readiness, and `POST /v2/models/{name}/infer`: one BYTES
input of texts, shape `[n]` or `[n, 1]`, its data as JSON strings (flat or nested) or as the binary
tensor extension (each element a little-endian uint32 length and its UTF-8 bytes after the JSON
header, `Inference-Header-Content-Length`: tritonclient's default). It answers two outputs:

- `label`, BYTES `[n]`: each text's most probable label;
- `scores`, FP32 `[n, num_labels]`: every label's probability, in the model's label order (the
  model metadata's `labels`, as GET /model's).

KServe's Hugging Face runtime answers text classification with one `output_0` (class ids, or with
`return_probabilities` the probabilities); these two outputs carry both, named. A request's
`outputs` picks among them (default both); outputs are always answered as JSON, which clients of
the binary extension read too. The texts go through `Predictor`, as /predict's do: the same cache,
queue, limits, errors (`api.errors`, 404 for another model's name) and access control.
"""

import struct
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints
from starlette.datastructures import Headers

from api.access import client_of
from api.deadline import Stage, request_deadline
from api.errors import RESPONSES, TEXTS_RESPONSES, ErrorType, ServiceError, error_response, responses
from api.limits import BODY_OVERHEAD, body_limit, declared_size
from api.predictions import ModelInfoCache, Predictor
from api.routes import ready
from api.schemas import json_body, parse_json, timeout_parameter
from core.protocol import ModelInfo, Prediction, new_id
from core.settings import Settings

INFER_PATH = "/v2/models/{name}/infer"
HEADER_LENGTH = "inference-header-content-length"  # the binary tensor extension's JSON header size
EXTENSIONS = ["binary_tensor_data"]
OUTPUTS = ("label", "scores")

# A V2 parameter's value; bounded so that a request's envelope fits `ENVELOPE_BYTES`.
Short = Annotated[str, StringConstraints(max_length=64)]
Parameters = Annotated[dict[Short, StrictBool | int | float | Short], Field(max_length=8)]
ENVELOPE_BYTES = 32 * BODY_OVERHEAD  # id, names, shapes and parameters around the texts, escaped


def infer_body_limit(max_texts: int, max_chars: int) -> int:
    """Bytes of the largest infer request: /predict's texts (nested `[n, 1]` fits their overhead) and the envelope."""
    return body_limit(max_texts, max_chars) + ENVELOPE_BYTES


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["label", "scores"]
    parameters: Parameters | None = Field(None, description="Accepted and ignored (outputs are answered as JSON).")


def infer_request(max_texts: int, max_chars: int) -> type[BaseModel]:
    """The V2 inference request with the configured limits (documented in the OpenAPI schema)."""
    Text = Annotated[str, StringConstraints(max_length=max_chars)]
    Texts = Annotated[list[Text], Field(min_length=1, max_length=max_texts)]
    Rows = Annotated[
        list[Annotated[list[Text], Field(min_length=1, max_length=1)]], Field(min_length=1, max_length=max_texts)
    ]

    class InferInput(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Short = Field(description="Any name (KServe's examples say `input-0`); the metadata calls it `text`.")
        shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1, max_length=2)] = Field(
            description="`[n]` or `[n, 1]`, n texts"
        )
        datatype: Literal["BYTES"]
        parameters: Parameters | None = None
        data: Texts | Rows | None = Field(None, description="The texts; absent when sent as binary data.")

    class InferRequest(BaseModel):
        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={
                "examples": [
                    {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["Good.", "Bad."]}]}
                ]
            },
        )
        id: Annotated[str, StringConstraints(max_length=256)] | None = None
        parameters: Parameters | None = None
        inputs: Annotated[list[InferInput], Field(min_length=1, max_length=1)]
        outputs: Annotated[list[RequestedOutput], Field(max_length=2)] | None = None

    return InferRequest


def invalid(where: tuple[str | int, ...], message: str, value: Any) -> RequestValidationError:
    """A 422 from `api.errors`, as a field the schema cannot check (shape against data) fails it."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", *where), "msg": message, "input": value}])


def unpack_bytes(raw: bytes, where: tuple[str | int, ...]) -> list[str]:
    """A BYTES tensor in the binary extension's layout: per element a little-endian uint32 length, then its bytes."""
    texts, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw) or at + 4 + (size := struct.unpack_from("<I", raw, at)[0]) > len(raw):
            raise invalid(where, "binary BYTES data ends inside an element", {})
        try:
            texts.append(raw[at + 4 : at + 4 + size].decode())
        except UnicodeDecodeError:
            raise invalid(where, "a text is not valid UTF-8", {}) from None
        at += 4 + size
    return texts


def request_texts(body: Any, binary: bytes, max_texts: int, max_chars: int) -> list[str]:
    """The input's texts, from JSON or the binary extension, checked (`checked_texts`)."""
    tensor = body.inputs[0]
    where: tuple[str | int, ...] = ("inputs", 0)
    if tensor.data is not None:
        if binary:
            raise invalid(where, "data sent both in JSON and as binary", {})
        texts = [t if isinstance(t, str) else t[0] for t in tensor.data]
    else:
        size = (tensor.parameters or {}).get("binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
            raise invalid(where, "no data: send it in `data`, or as binary data of `binary_data_size` bytes", {})
        texts = unpack_bytes(binary, (*where, "parameters", "binary_data_size"))
    return checked_texts(tensor.shape, texts, max_texts, max_chars)


def checked_texts(shape: list[int], texts: list[str], max_texts: int, max_chars: int) -> list[str]:
    """`texts`, if they fit the input's shape (`[n]` or `[n, 1]`) and the limits, over REST and gRPC alike."""
    where: tuple[str | int, ...] = ("inputs", 0)
    n, *rest = shape or [0]
    if rest not in ([], [1]):
        raise invalid((*where, "shape"), "the shape must be [n] or [n, 1]", shape)
    if not 1 <= n <= max_texts:
        raise invalid((*where, "shape"), f"between 1 and {max_texts} texts per request", shape)
    if too_long := next((t for t in texts if len(t) > max_chars), None):
        raise invalid((*where, "data"), f"a text is longer than {max_chars} characters", too_long)
    if len(texts) != n:
        raise invalid((*where, "data"), f"the shape says {n} texts, the data holds {len(texts)}", shape)
    return texts


def server_metadata_body(app: FastAPI) -> dict[str, Any]:
    return {"name": app.title, "version": app.version, "extensions": EXTENSIONS}


def model_metadata_body(info: ModelInfo) -> dict[str, Any]:
    """The served model's metadata: its version, the input and outputs, and `labels` (the order of `scores`)."""
    return {
        "name": info.name,
        "versions": [info.version],
        "platform": "sentiment-batcher",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "scores", "datatype": "FP32", "shape": [-1, len(info.labels)]},
        ],
        "labels": info.labels,
    }


def output_tensors(predictions: list[Prediction]) -> dict[str, dict[str, Any]]:
    """The outputs by name: `label`, each text's top-scoring label, and `scores`, every label's score
    in the model's order, flat in row order."""
    return {
        "label": {
            "datatype": "BYTES",
            "shape": [len(predictions)],
            "data": [max(p, key=score)["label"] for p in predictions],
        },
        "scores": {
            "datatype": "FP32",
            "shape": [len(predictions), len(predictions[0])],
            "data": [s["score"] for p in predictions for s in p],
        },
    }


async def served(models: ModelInfoCache, name: str, missing: ErrorType = ErrorType.UNAVAILABLE) -> ModelInfo:
    """The served model, if it is `name`: else 404; 503 (`missing`) while no worker has announced one."""
    info = await models.current()
    if info is None:
        raise ServiceError(missing, "no worker has announced a model yet")
    if name != info.name:
        raise ServiceError(ErrorType.NOT_FOUND, f"no model named {name[:100]!r}: this server serves {info.name!r}")
    return info


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
        return server_metadata_body(request.app)

    @router.get("/health/live")
    async def live() -> dict[str, bool]:
        """Liveness, as /health: the process answers."""
        return {"live": True}

    @router.get("/health/ready", responses=responses(ErrorType.NOT_READY))
    async def server_ready(request: Request) -> Response:
        """Readiness, as /ready (its 503 when not ready)."""
        answer = await ready(request)
        return JSONResponse({"ready": True}) if answer.status_code == 200 else answer

    @router.get("/models/{name}", responses=responses(ErrorType.NOT_FOUND, ErrorType.UNAVAILABLE))
    async def model_metadata(request: Request, name: str) -> dict[str, Any]:
        """The served model's metadata: its version, the input and outputs, and `labels` (the order of `scores`)."""
        return model_metadata_body(await served(request.app.state.models, name))

    @router.get("/models/{name}/ready", responses=responses(ErrorType.NOT_FOUND, ErrorType.NOT_READY))
    async def model_ready(request: Request, name: str) -> Response:
        """200 when the service is ready (/ready) and serves this model; 404 for another name."""
        answer = await ready(request)
        if answer.status_code != 200:
            return answer
        try:
            info = await served(request.app.state.models, name, missing=ErrorType.NOT_READY)
        except ServiceError as exc:
            return error_response(exc.error_type, exc.message)
        return JSONResponse({"name": info.name, "ready": True})


def add_infer_route(router: APIRouter, settings: Settings) -> None:
    """`POST /models/{name}/infer`, its request schema made with the configured limits."""
    InferRequest = infer_request(settings.max_texts, settings.max_chars)

    @router.post(
        "/models/{name}/infer",
        openapi_extra={**json_body(InferRequest), **timeout_parameter(settings.request_timeout_s)},
        responses={**RESPONSES, **responses(ErrorType.NOT_FOUND), **TEXTS_RESPONSES},
    )
    async def infer(request: Request, name: str) -> Response:
        """Classify texts: the `label` and `scores` of each, in input order (the module's docstring)."""
        deadline = request_deadline(request.scope, request.headers, settings.request_timeout_s)
        async with deadline.redis_call(Stage.MODEL_LOOKUP):  # next: another model's name is a 404, whatever the body
            info = await served(request.app.state.models, name)
        body, binary = parse_infer(InferRequest, await request.body(), request.headers)
        texts = request_texts(body, binary, settings.max_texts, settings.max_chars)
        predictor: Predictor = request.app.state.predictor
        predictions, cache = await predictor.predict(
            texts, client_of(request.scope), request.receive, deadline=deadline
        )
        answer = infer_answer(info, body, predictions)
        return Response(orjson.dumps(answer), media_type="application/json", headers={"X-Cache": cache})


def parse_infer(request_model: type[BaseModel], raw: bytes, headers: Headers) -> tuple[Any, bytes]:
    """The request (an `InferRequest`) and the binary tensor data after its JSON header, if any
    (`HEADER_LENGTH` says where the header ends)."""
    header = headers.get(HEADER_LENGTH)
    if header is None:
        return parse_json(request_model, raw, headers.get("content-type", "")), b""
    if (size := declared_size(header)) is not None and size <= len(raw):
        return parse_json(request_model, raw[:size], ""), raw[size:]
    raise invalid((), f"{HEADER_LENGTH} must be the size of the JSON header, at most the body's", header)


def infer_answer(info: ModelInfo, body: Any, predictions: list[Prediction]) -> dict[str, Any]:
    """The outputs `body` asks for (default both), in `OUTPUTS` order, for the texts' `predictions`."""
    wanted = [o.name for o in body.outputs] if body.outputs else OUTPUTS
    tensors = output_tensors(predictions)
    return {
        "model_name": info.name,
        "model_version": info.version,
        "id": body.id or new_id(),
        "outputs": [{"name": o, **tensors[o]} for o in OUTPUTS if o in wanted],
    }


def score(label_score: dict[str, Any]) -> float:
    return float(label_score["score"])
