"""Request and response bodies. Limits come from settings, so the request model is built per app
(and the OpenAPI schema states the real limits)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model


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
