"""Hugging Face's text-classification task at `POST /`, where `huggingface_hub.InferenceClient(base_url)`
sends `text_classification(text, top_k=..., function_to_apply=...)`: the client posts to the base URL
itself, as to an Inference Endpoint.

The Hub's task (huggingface.js, tasks/text-classification): `{"inputs": text, "parameters": {"top_k":
k, "function_to_apply": "softmax" | "sigmoid" | "none"}}` answered `[[{"label", "score"}, ...]]`, the
labels highest score first, the first `top_k` (every label when absent). `inputs` may also be a list
of texts, answered a list each, as the Inference API takes them.

Scores are /predict's (the same `Predictor`: cache, queue, limits, errors, keys, and a sooner
deadline by `X-Request-Timeout`). A `function_to_apply` other than the model's own (GET /model's
`function`) is worked out by the worker from the model's logits, as transformers' pipeline does when
asked for it, and cached apart from the model's own scores.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag

from api.access import client_of
from api.deadline import request_deadline
from api.errors import RESPONSES, TEXTS_RESPONSES
from api.limits import body_limit
from api.predictions import Predictor
from api.routes import RequestRoute
from api.schemas import JSON_INTEGER, Score, content_encoding, json_body, parse_json, timeout_parameter
from core.protocol import Prediction, ScoreFunction

PATH = "/"


class ClassificationParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: Annotated[int, Field(ge=1), JSON_INTEGER] | None = Field(
        None, description="Only the top k labels (default: every label)."
    )
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="The function from the model's logits to the scores (default: the model's own, GET /model)."
    )


def classification_request(max_texts: int, max_chars: int) -> type[BaseModel]:
    """The task's request with the configured limits (documented in the OpenAPI schema)."""
    Text = Annotated[str, StringConstraints(max_length=max_chars)]

    class TextClassificationRequest(BaseModel):
        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={"examples": [{"inputs": "I love you.", "parameters": {"top_k": 1}}]},
        )
        inputs: Annotated[
            Annotated[Text, Tag("text")]
            | Annotated[list[Text], Field(min_length=1, max_length=max_texts), Tag("texts")],
            Discriminator(
                text_or_texts,
                custom_error_type="invalid_inputs",
                custom_error_message="Input should be a text, or a list of texts",
            ),
        ] = Field(description="A text, or a list of texts (a list of labels each).")
        parameters: ClassificationParameters | None = None

    return TextClassificationRequest


def text_or_texts(inputs: Any) -> str | None:
    """Which form `inputs` takes, so that a 422 says what is wrong with it, not what the other form needs."""
    return "text" if isinstance(inputs, str) else "texts" if isinstance(inputs, list) else None


def body_limit_of(max_texts: int, max_chars: int) -> int:
    """Bytes of the largest request: /predict's texts and room for the parameters."""
    return body_limit(max_texts, max_chars) + 256


def ranked(prediction: Prediction, top_k: int | None) -> Prediction:
    """The labels highest score first (the model's order on a tie), the first `top_k` of them."""
    return sorted(prediction, key=lambda s: -s["score"])[:top_k]


def add_text_classification_route(app: FastAPI, max_texts: int, max_chars: int, timeout_s: float) -> None:
    """The route, its request within the text limits; `timeout_s`: the service's request timeout, the
    longest `X-Request-Timeout` it takes."""
    Request_ = classification_request(max_texts, max_chars)

    async def text_classification(request: Request) -> Response:
        """Hugging Face's text-classification task, for `InferenceClient(base_url).text_classification`:
        each text's labels, highest score first."""
        deadline = request_deadline(request.scope, request.headers, timeout_s)
        headers = request.headers
        body: Any = parse_json(
            Request_, await request.body(), headers.get("content-type", ""), content_encoding(headers)
        )
        parameters = body.parameters or ClassificationParameters()
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        function = ScoreFunction(parameters.function_to_apply) if parameters.function_to_apply else None
        predictor: Predictor = request.app.state.predictor
        predictions, cache = await predictor.predict(
            texts, client_of(request.scope), request.receive, function, deadline
        )
        answer = [ranked(p, parameters.top_k) for p in predictions]
        return Response(orjson.dumps(answer), media_type="application/json", headers={"X-Cache": cache})

    app.router.add_api_route(
        PATH,
        text_classification,
        methods=["POST"],
        tags=["predict"],
        route_class_override=RequestRoute,
        response_model=list[list[Score]],
        openapi_extra={**json_body(Request_), **timeout_parameter(timeout_s)},
        responses={**RESPONSES, **TEXTS_RESPONSES},
    )
