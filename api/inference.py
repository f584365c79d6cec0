"""The Open Inference Protocol (KServe V2) call, whatever carries it: the request as plain data in,
checked in one place, its texts through `Predictor`, the response as plain data out; metadata and
readiness beside it.

REST (`api.inference_protocol`) and gRPC (`api.inference_grpc`) are adapters: each decodes its wire
format into an `InferRequest`, validated by the one model (so a bad request is the same
`INVALID_REQUEST`, with the same message, over either, located on its wire: REST's in `body`), asks
`Inference.infer`, and encodes the `InferResponse`; what goes wrong maps through `api.errors`
(`failure`, `ERRORS`).

- The input is one BYTES tensor of texts, shape `[n]` or `[n, 1]`: its data as strings (flat, or
  rows of one), or binary (per element a little-endian uint32 length, then its UTF-8 bytes: REST's
  binary tensor extension, gRPC's `raw_input_contents`).
- It answers two outputs: `label`, BYTES `[n]`, each text's most probable label; `scores`, FP32
  `[n, num_labels]`, every label's probability in the model's label order (the model metadata's
  `labels`, as GET /model's). KServe's Hugging Face runtime answers text classification with one
  `output_0` (class ids, or with `return_probabilities` the probabilities); these two carry both,
  named. The request's `outputs` picks among them by name, each at most once in effect (at most two;
  another name is invalid); the default, and the order of the answer, is `OUTPUTS`.
- Ready (`ready`): the service is, as /ready says (Redis answers, a worker's heartbeat is fresh,
  nothing else is wrong), and, for a model's readiness, the model the workers announced is the one
  named (else `NOT_FOUND`); a Redis failure on the way is not ready, not an error.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StringConstraints,
    Tag,
    ValidationError,
    create_model,
)
from redis.exceptions import RedisError
from starlette.datastructures import State
from starlette.types import Receive

from api.deadline import Deadline, Stage
from api.errors import ErrorType, ServiceError
from api.limits import BODY_OVERHEAD, body_limit
from api.predictions import CacheStatus, ModelInfoCache, Predictor
from api.routes import readiness
from api.schemas import JSON_INTEGER
from core.protocol import ModelInfo, Prediction, new_id
from core.redis_errors import describe

log = logging.getLogger(__name__)

OUTPUTS = ("label", "scores")
EXTENSIONS = ["binary_tensor_data"]

# A V2 parameter's value; bounded so that a request's envelope fits `ENVELOPE_BYTES`.
Short = Annotated[str, StringConstraints(max_length=64)]
Long = Annotated[str, StringConstraints(max_length=256)]  # an id; a model's name, its directory's (255 bytes)
InferParameters = Annotated[dict[Short, StrictBool | int | float | Short], Field(max_length=8)]
ENVELOPE_BYTES = 32 * BODY_OVERHEAD  # id, names, shapes and parameters around the texts, escaped
Location = tuple[str | int, ...]


def infer_body_limit(max_texts: int, max_chars: int) -> int:
    """Bytes of the largest infer request (REST's body, gRPC's message): /predict's texts (nested
    `[n, 1]` fits their overhead) and the envelope."""
    return body_limit(max_texts, max_chars) + ENVELOPE_BYTES


def unclassified(parameters: dict[str, Any] | None) -> dict[str, Any] | None:
    """Triton's classification extension (tritonclient's `class_count`) answers an output as its top
    classes, another type and shape: not served, so refused, never answered as the plain output."""
    if parameters and parameters.get("classification"):
        raise ValueError("the classification extension is not supported: ask for `label`, or `scores` for every label")
    return parameters


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["label", "scores"]
    parameters: Annotated[InferParameters | None, AfterValidator(unclassified)] = Field(
        None,
        description="`binary_data` (REST; gRPC answers raw): this output as binary data, overriding the request's "
        "`binary_data_output`. Others are accepted and ignored, but for `classification`.",
    )


class InferInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Short = Field(description="Any name (KServe's examples say `input-0`); the metadata calls it `text`.")
    shape: Annotated[list[Annotated[int, Field(ge=1), JSON_INTEGER]], Field(min_length=1, max_length=2)] = Field(
        description="`[n]` or `[n, 1]`, n texts"
    )
    datatype: Literal["BYTES"]
    parameters: InferParameters | None = None
    data: list[str] | list[list[str]] | None = Field(None, description="The texts; absent when sent as binary data.")


class InferRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["Good.", "Bad."]}]}]
        },
    )
    id: Long | None = None
    model_name: Long | None = Field(None, description="KServe's REST client sends it: the path's name, if any.")
    parameters: InferParameters | None = None
    inputs: Annotated[list[InferInput], Field(min_length=1, max_length=1)]
    outputs: Annotated[list[RequestedOutput], Field(max_length=2)] | None = None


def infer_request(max_texts: int, max_chars: int) -> type[InferRequest]:
    """The V2 inference request with the configured limits (documented in REST's OpenAPI schema)."""
    Text = Annotated[str, StringConstraints(max_length=max_chars)]
    Texts = Annotated[list[Text], Field(min_length=1, max_length=max_texts)]
    Rows = Annotated[
        list[Annotated[list[Text], Field(min_length=1, max_length=1)]], Field(min_length=1, max_length=max_texts)
    ]
    Data: Any = (
        Annotated[
            Annotated[Texts, Tag("texts")] | Annotated[Rows, Tag("rows")],
            Discriminator(
                texts_or_rows,
                custom_error_type="invalid_data",
                custom_error_message="Input should be a list of texts, or of rows of one text",
            ),
        ]
        | None
    )
    Input = create_model("InferInput", __base__=InferInput, data=(Data, InferInput.model_fields["data"]))
    return create_model(
        "InferRequest", __base__=InferRequest, inputs=(Annotated[list[Input], Field(min_length=1, max_length=1)], ...)
    )


def texts_or_rows(data: Any) -> str | None:
    """Which form `data` takes, rows if its first item is a list, so that a 422 says what is wrong
    with it, not what the other form needs (a number among texts is no "valid array" error)."""
    if not isinstance(data, list):
        return None
    return "rows" if data and isinstance(data[0], list) else "texts"


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: list[str] | list[float]


@dataclass(frozen=True)
class InferResponse:
    """The answer, its fields named and ordered as REST's JSON has them."""

    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]


class Inference:
    """The V2 inference call within the configured limits; `located`: where its transport's request
    fields are (REST's `body`), for the locations its 422s name."""

    def __init__(self, max_texts: int, max_chars: int, located: Location = ()) -> None:
        self.max_texts = max_texts
        self.max_chars = max_chars
        self.located = located
        self.request_model = infer_request(max_texts, max_chars)

    def validated(self, fields: Mapping[str, Any]) -> InferRequest:
        """A request decoded into plain fields (gRPC's), validated as REST's JSON is."""
        try:
            return self.request_model.model_validate(fields)
        except ValidationError as exc:
            raise RequestValidationError(
                [{**error, "loc": (*self.located, *error["loc"])} for error in exc.errors(include_url=False)]
            ) from None

    def invalid(self, where: Location, message: str, value: Any) -> RequestValidationError:
        """The 422 of a field the model cannot check (the shape against the data)."""
        loc = (*self.located, *where)
        return RequestValidationError([{"type": "value_error", "loc": loc, "msg": message, "input": value}])

    async def model_named(self, state: State, name: str, deadline: Deadline, version: str = "") -> ModelInfo:
        """The served model, if it is `name` (and `version`, where named: `served`), looked up within
        the call's deadline: first, so that another model's name is NOT_FOUND whatever the request."""
        async with deadline.redis_call(Stage.MODEL_LOOKUP):
            return await served(state.models, name, version=version)

    async def infer(
        self,
        state: State,
        info: ModelInfo,
        request: InferRequest,
        binary: bytes | None,
        client: str,
        deadline: Deadline,
        receive: Receive | None = None,
    ) -> tuple[InferResponse, CacheStatus]:
        """The outputs `request` asks for, of its texts (in `data`, or `binary`: the input's binary
        contents), through the app's `Predictor`; `receive` says when the client goes away."""
        texts = self.texts(request, binary)
        predictor: Predictor = state.predictor
        predictions, cache = await predictor.predict(texts, client, receive, deadline=deadline)
        if any([s["label"] for s in p] != info.labels for p in predictions):
            # A worker of another model answered (a rolling upgrade): its scores are no tensor of the
            # metadata's shape and label order.
            raise ServiceError(
                ErrorType.UNAVAILABLE, "the model is changing: a worker of another model's labels answered; retry"
            )
        wanted: set[str] = {o.name for o in request.outputs or ()} or set(OUTPUTS)
        tensors = output_tensors(predictions)
        outputs = [tensors[name] for name in OUTPUTS if name in wanted]
        return InferResponse(info.name, info.version, request.id or new_id(), outputs), cache

    def texts(self, request: InferRequest, binary: bytes | None) -> list[str]:
        """The input's texts, from its data or its binary contents, if they fit its shape and the limits."""
        tensor, where = request.inputs[0], ("inputs", 0)
        if tensor.data is not None and binary is not None:
            raise self.invalid(where, "the texts sent both as data and as binary data", {})
        if tensor.data is not None:
            texts = [t if isinstance(t, str) else t[0] for t in tensor.data]
        elif binary is not None:
            texts = self.unpacked(binary, where)
        else:
            raise self.invalid(where, "no data: send the texts as data or as binary data", {})
        n, *rest = tensor.shape
        if rest not in ([], [1]):
            raise self.invalid((*where, "shape"), "the shape must be [n] or [n, 1]", tensor.shape)
        if n > self.max_texts:
            raise self.invalid((*where, "shape"), f"between 1 and {self.max_texts} texts per request", tensor.shape)
        if too_long := next((t for t in texts if len(t) > self.max_chars), None):
            raise self.invalid((*where, "data"), f"a text is longer than {self.max_chars} characters", too_long)
        if len(texts) != n:
            raise self.invalid((*where, "data"), f"the shape says {n} texts, the data holds {len(texts)}", tensor.shape)
        return texts

    def unpacked(self, raw: bytes, where: Location) -> list[str]:
        """Binary BYTES data: per element a little-endian uint32 length, then its UTF-8 bytes."""
        elements, at = [], 0
        while at < len(raw):
            if at + 4 > len(raw) or at + 4 + (size := struct.unpack_from("<I", raw, at)[0]) > len(raw):
                raise self.invalid(where, "binary BYTES data ends inside an element", {})
            elements.append(raw[at + 4 : at + 4 + size])
            at += 4 + size
        return self.decoded(elements, where)

    def decoded(self, elements: list[bytes], where: Location) -> list[str]:
        """BYTES elements as texts (gRPC's `bytes_contents`, binary data's elements): UTF-8, else invalid."""
        try:
            return [element.decode() for element in elements]
        except UnicodeDecodeError:
            raise self.invalid(where, "a text is not valid UTF-8", {}) from None


def packed(tensor: OutputTensor) -> bytes:
    """A tensor's binary contents: FP32 little-endian, or BYTES as a uint32 length and the UTF-8 bytes each."""
    if tensor.datatype == "FP32":
        return struct.pack(f"<{len(tensor.data)}f", *tensor.data)
    encoded = [str(value).encode() for value in tensor.data]
    return b"".join(struct.pack("<I", len(value)) + value for value in encoded)


def output_tensors(predictions: list[Prediction]) -> dict[str, OutputTensor]:
    """The outputs by name: `label`, each text's top-scoring label, and `scores`, every label's score
    in the model's order, flat in row order."""
    labels = [max(p, key=score)["label"] for p in predictions]
    scores = [float(s["score"]) for p in predictions for s in p]
    return {
        "label": OutputTensor("label", "BYTES", [len(predictions)], labels),
        "scores": OutputTensor("scores", "FP32", [len(predictions), len(predictions[0])], scores),
    }


def score(label_score: dict[str, Any]) -> float:
    return float(label_score["score"])


async def served(
    models: ModelInfoCache, name: str, missing: ErrorType = ErrorType.UNAVAILABLE, version: str = ""
) -> ModelInfo:
    """The served model, if it is `name` and, where a `version` is named (gRPC's optional field), its
    version: else NOT_FOUND, never another version's answer; `missing` while no worker has announced one."""
    info = await models.current()
    if info is None:
        raise ServiceError(missing, "no worker has announced a model yet")
    if name != info.name:
        raise ServiceError(ErrorType.NOT_FOUND, f"no model named {name[:100]!r}: this server serves {info.name!r}")
    if version and version != info.version:
        raise ServiceError(
            ErrorType.NOT_FOUND,
            f"no version {version[:100]!r} of {name!r}: this server serves its version {info.version!r}",
        )
    return info


async def ready(state: State, name: str | None = None, version: str = "") -> None:
    """Nothing when the service is ready (/ready's `readiness`) and, given a model's `name` (and
    `version`), serves it; else the error saying why not: NOT_READY, or NOT_FOUND for another model's."""
    alive = await readiness(state)
    if isinstance(alive, str):
        raise ServiceError(ErrorType.NOT_READY, alive)
    if name is not None:
        try:
            await served(state.models, name, missing=ErrorType.NOT_READY, version=version)
        except RedisError as exc:  # (as `readiness` logs it)
            log.warning("not ready: redis unavailable (%s)", describe(exc))
            raise ServiceError(ErrorType.NOT_READY, f"redis unavailable ({type(exc).__name__})") from None


def server_metadata(app: FastAPI) -> dict[str, Any]:
    return {"name": app.title, "version": app.version, "extensions": EXTENSIONS}


def model_metadata(info: ModelInfo) -> dict[str, Any]:
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
