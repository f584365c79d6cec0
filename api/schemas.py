"""Request and response bodies. Limits come from settings, so the request model is built per app
(and the OpenAPI schema states the real limits)."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationError, create_model
from starlette.datastructures import Headers

from api.errors import ErrorType, ServiceError, json_invalid, quote

M = TypeVar("M", bound=BaseModel)


def _json_integer(value: object) -> object:
    """JSON Schema's integer, `2` or `2.0`; pydantic's lax `int` would also read `"2"` and `true` (as 1)."""
    if isinstance(value, bool | str):
        raise ValueError("a JSON integer, not a string or a boolean")
    return value


# A count as the OpenAPI schema's `integer` says: `Annotated[int, Field(ge=1), JSON_INTEGER]` (after the
# constraints, which the schema then shows as `minimum`).
JSON_INTEGER = BeforeValidator(_json_integer)


def text_list(max_texts: int, max_chars: int) -> Any:
    """The `text` field: 1..max_texts strings of at most max_chars characters (empty allowed)."""
    text = Annotated[str, StringConstraints(max_length=max_chars)]
    return Annotated[
        list[text],
        Field(min_length=1, max_length=max_texts, description="Texts to classify, answered in this order."),
    ]


class TextsRequest(BaseModel):
    """`{"text": [...]}`; `texts_request` makes it with the configured limits."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"text": ["I love you.", "I hate you."]}]}
    )

    text: list[str]


def texts_request(name: str, max_texts: int, max_chars: int, **fields: Any) -> type[TextsRequest]:
    """A request body `{"text": [...]}` within these limits, with any further `fields` (as `create_model`
    takes them): /predict's `PredictRequest`, /jobs' `JobRequest`."""
    return create_model(name, __base__=TextsRequest, text=(text_list(max_texts, max_chars), ...), **fields)


def is_json(content_type: str) -> bool:
    """Whether a body with this Content-Type header is read as JSON: with none (as curl scripts and
    k6 send), or `application/json` or `application/<anything>+json`, parameters such as charset
    aside: the rule of FastAPI's own body parameters (with `strict_content_type` off)."""
    if not content_type or content_type == "application/json":
        return True
    kind, _, subtype = content_type.partition(";")[0].strip().lower().partition("/")
    return kind == "application" and "/" not in subtype and (subtype == "json" or subtype.endswith("+json"))


def content_encoding(headers: Headers) -> str:
    """Every Content-Encoding header's codings as one list: a list sent on two lines is the same list
    joined (RFC 9110 5.3), `identity` then `gzip` a gzipped body."""
    return ", ".join(headers.getlist("content-encoding"))


def require_uncompressed(content_encoding: str) -> None:
    """415 for a compressed body (Content-Encoding: gzip, deflate, br; any coding but `identity` in
    the list), before it is parsed: it would read as malformed JSON, a 422 that misleads."""
    coding = content_encoding.strip().lower()
    if any(c.strip() not in ("", "identity") for c in coding.split(",")):
        raise ServiceError(
            ErrorType.UNSUPPORTED_MEDIA_TYPE,
            f"the body must not be compressed: send it with no Content-Encoding, not {quote(coding)!r}",
        )


def require_json(content_type: str, content_encoding: str = "") -> None:
    """415 for a body declared as something else (a form, plain text), or compressed
    (`require_uncompressed`), before it is parsed."""
    require_uncompressed(content_encoding)
    if not is_json(content_type):
        raise ServiceError(
            ErrorType.UNSUPPORTED_MEDIA_TYPE,
            f"the body must be JSON: send it with the header Content-Type: application/json, or with no "
            f"Content-Type header, not {quote(content_type)!r}",
        )


def parse_json(model: type[M], body: bytes, content_type: str, content_encoding: str = "") -> M:
    """`body` validated as `model` in one pass over the JSON bytes, else FastAPI's 422 for it.

    For the hot path: a FastAPI body parameter parses with the stdlib, then validates the objects, a
    second pass over every request (its cost: docs/tuning.md, "The API's CPU").
    A body declared as anything but JSON, or compressed, is refused (`require_json`), and a malformed
    one is "JSON decode error" without the body echoed back.
    """
    require_json(content_type, content_encoding)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError([_in_body(e) for e in exc.errors(include_url=False)]) from None


def _in_body(error: Any) -> dict[str, Any]:
    if error["type"] == "json_invalid":
        return json_invalid(error["ctx"])
    return {**error, "loc": ("body", *error["loc"])}


TIMEOUT_HEADER = "X-Request-Timeout"
SECONDS = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def requested_timeout(headers: Headers, most_s: float) -> float | None:
    """The request's own deadline, `X-Request-Timeout` seconds from now (None: the default, `most_s`).
    A client that needs its answer sooner says so, so that the service refuses at once what it could
    not answer in time, and never computes for a client that has given up. A value that is not a
    number of seconds above 0 and at most `most_s` is a 422: a longer wait than the service's own
    deadline is not on offer. Sent twice, it is the two values joined, as a proxy may join them (RFC
    9110 5.3): no number, whichever came first."""
    if not (values := headers.getlist(TIMEOUT_HEADER)):
        return None
    raw = ", ".join(values)
    # ASCII digits, as `1.5`, `.5` or `5e-3`: `float` also takes `1_0`, `inf`, `nan` and non-ASCII spaces.
    # Around them, HTTP's optional whitespace, no part of the value (httptools leaves the trailing one).
    seconds = float(raw) if SECONDS.fullmatch(raw.strip(" \t")) else math.nan
    if not 0 < seconds <= most_s:  # (NaN fails too)
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("header", TIMEOUT_HEADER),
                    "msg": f"a number of seconds above 0 and at most {most_s:g}",
                    "input": quote(raw),
                }
            ]
        )
    return seconds


def timeout_parameter(most_s: float) -> dict[str, Any]:
    """The OpenAPI of `X-Request-Timeout` (`requested_timeout`), for a route's `openapi_extra`."""
    return {
        "parameters": [
            {
                "name": TIMEOUT_HEADER,
                "in": "header",
                "required": False,
                "description": "Seconds this request may take (its deadline): sooner than the service's "
                f"{most_s:g} s. A request that cannot be answered in time is refused at once (503 with Retry-After).",
                "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": most_s},
            }
        ]
    }


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for the body of a route that reads it with `parse_json` (FastAPI sees no parameter).
    Nested models are written in place: pydantic's `#/$defs/...` references would point into the
    OpenAPI document, where nothing (schemathesis, code generators) finds them."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, list):
            return [inline(item) for item in node]
        if not isinstance(node, dict):
            return node
        if (ref := node.get("$ref", "")).startswith("#/$defs/"):
            return inline(
                {**definitions[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}}
            )
        return {key: inline(value) for key, value in node.items()}

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


class Score(BaseModel):
    label: str
    score: float = Field(
        description="By the model's score function (GET /model's `function`): a probability for softmax "
        "(single-label) and sigmoid (multi-label), the raw value for none (regression)."
    )


class PredictResponse(BaseModel):
    predictions: list[list[Score]] = Field(description="One list per input text, in input order; every label.")


class ModelResponse(BaseModel):
    name: str
    version: str = Field(
        description="Fingerprint of the checkpoint files and of what its scores mean; part of every cache key."
    )
    labels: list[str]
    device: str
    dtype: str
    function: str = Field(
        description="What turns the model's logits into its scores, as transformers' text-classification pipeline "
        "decides it from the checkpoint's config: softmax (single-label), sigmoid (multi-label, or one output) or "
        "none (regression)."
    )
    engine: str = Field(
        description="The runtime that computes the forwards: torch, onnxruntime or openvino (int8 artifacts), null; "
        "empty from a worker that does not say."
    )


class ReadyResponse(BaseModel):
    status: str
    workers: int = Field(description="Workers with a fresh heartbeat.")
