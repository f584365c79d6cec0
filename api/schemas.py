"""Request and response bodies. Limits come from settings, so the request model is built per app
(and the OpenAPI schema states the real limits)."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, create_model

M = TypeVar("M", bound=BaseModel)


def text_list(max_texts: int, max_chars: int) -> object:
    """The `text` field: 1..max_texts strings of at most max_chars characters (empty allowed)."""
    text = Annotated[str, StringConstraints(max_length=max_chars)]
    return Annotated[
        list[text],  # type: ignore[valid-type]
        Field(min_length=1, max_length=max_texts, description="Texts to classify, answered in this order."),
    ]


def predict_request(max_texts: int, max_chars: int) -> type[BaseModel]:
    return create_model(
        "PredictRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": ["I love you.", "I hate you."]}]}),
        text=(text_list(max_texts, max_chars), ...),
    )


def parse_json(model: type[M], body: bytes, content_type: str) -> M:
    """`body` validated as `model` in one pass over the JSON bytes, else FastAPI's 422 for it.

    For the hot path: a FastAPI body parameter parses with the stdlib, then validates the objects,
    about 12 µs more per request, a tenth of a cache hit's CPU (docs/tuning.md, "The API's CPU").
    As FastAPI does, a body not declared JSON (`application/json` or `+json`) is refused, and a
    malformed one is "JSON decode error" without the body echoed back.
    """
    media = content_type.partition(";")[0].strip().lower()
    if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
        raise RequestValidationError([{
            "type": "content_type", "loc": ("header", "content-type"), "input": content_type or None,
            "msg": "the body must be JSON, sent as Content-Type: application/json",
        }])
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError([_in_body(e) for e in exc.errors(include_url=False)]) from None


def _in_body(error: Any) -> dict[str, Any]:
    if error["type"] == "json_invalid":
        return {"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error", "input": {}, "ctx": error["ctx"]}
    return {**error, "loc": ("body", *error["loc"])}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for the body of a route that reads it with `parse_json` (FastAPI sees no parameter)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


class Score(BaseModel):
    label: str
    score: float


class PredictResponse(BaseModel):
    predictions: list[list[Score]] = Field(description="One list per input text, in input order; every label.")


class ModelResponse(BaseModel):
    name: str
    version: str = Field(description="Fingerprint of the checkpoint files; part of every cache key.")
    labels: list[str]
    device: str
    dtype: str


class ReadyResponse(BaseModel):
    status: str
    workers: int = Field(description="Workers with a fresh heartbeat.")
