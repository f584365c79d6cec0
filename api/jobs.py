"""HTTP routes of bulk jobs: POST /jobs, GET /jobs/{id}, DELETE /jobs/{id}.

Fire and poll: a submission answers at once (202 + Location); the jobs worker does the work.
The routes are plain `def`: RQ is synchronous, and FastAPI runs such routes in its threadpool.
"""

# No `from __future__ import annotations`: FastAPI must see the per-app body dependency itself.

from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Request, Response
from pydantic import AfterValidator, BaseModel, Field, StringConstraints, WithJsonSchema

from api.errors import BODY_RESPONSES, ErrorType, responses
from api.job_store import JobStore
from api.schemas import Score, TextsRequest, content_encoding, json_body, parse_json, texts_request
from core.settings import Settings
from core.webhooks import MAX_URL_CHARS, check_url

Status = Literal["queued", "started", "finished", "failed", "canceled"]


class JobCreated(BaseModel):
    job_id: str = Field(description="Unguessable id; anyone holding it can read, cancel and delete the job.")
    status: Literal["queued"]
    status_url: str = Field(description="Where to poll: GET it (also in the Location header).")


class Progress(BaseModel):
    done: int = Field(description="Texts with a prediction so far (moves a part, a few batches of texts, at a time).")
    total: int


class JobResponse(BaseModel):
    job_id: str
    status: Status
    progress: Progress
    created_at: datetime
    started_at: datetime | None = Field(description="Start of the latest run (a retried job ran more than once).")
    ended_at: datetime | None
    predictions: list[list[Score]] | None = Field(
        None, description="When finished: one list per input text, in input order, as /predict answers."
    )
    error: str | None = Field(None, description="When failed: why, in one line.")


def jobs_router(settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/jobs", tags=["jobs"])
    JobRequest = texts_request(
        "JobRequest", settings.jobs_max_texts, settings.max_chars, callback_url=callback_url_field(settings)
    )

    async def job_request(request: Request) -> TextsRequest:
        """The body, read as /predict reads its own (`api.schemas.parse_json`): a compressed one or one
        declared other than JSON is refused before it is parsed, which a body parameter, parsed by
        FastAPI before any check of the route runs, cannot do (`async`: run inline, not in the threadpool)."""
        headers = request.headers
        return parse_json(JobRequest, await request.body(), headers.get("content-type", ""), content_encoding(headers))

    @router.post(
        "",
        status_code=202,
        response_model=JobCreated,
        openapi_extra=json_body(JobRequest),
        responses={**responses(ErrorType.UNAVAILABLE), **BODY_RESPONSES},
    )
    def create(body: Annotated[TextsRequest, Depends(job_request)], request: Request, response: Response) -> JobCreated:
        """Queue texts for classification; poll `status_url` for progress and predictions, or name a
        `callback_url` that gets the job's status document when it ends."""
        # (`callback_url` is a field of the `JobRequest` made at run time, with the configured limits.)
        job_id = _store(request).create(body.text, body.callback_url)  # type: ignore[attr-defined]
        url = f"/jobs/{job_id}"
        response.headers["Location"] = url
        return JobCreated(job_id=job_id, status="queued", status_url=url)

    @router.get(
        "/{job_id}", response_model=JobResponse, responses=responses(ErrorType.NOT_FOUND, ErrorType.UNAVAILABLE)
    )
    def status(job_id: str, request: Request) -> Response:
        """The job's status and progress; `predictions` once finished, `error` once failed.

        Jobs (and their predictions) are kept for `SENTIMENT_JOB_TTL_S` after they end, or until
        DELETEd, then 404.
        """
        return _json(_store(request).view(job_id))

    @router.delete(
        "/{job_id}",
        status_code=204,
        response_class=Response,
        responses=responses(ErrorType.NOT_FOUND, ErrorType.UNAVAILABLE),
    )
    def delete(job_id: str, request: Request) -> Response:
        """Cancel a queued or started job, or delete one that ended, with its texts and results.

        Canceled, a queued job never runs and a started one stops at its next part boundary; it then
        reads `canceled` (DELETE it again to delete it). Deleted, it answers 404 from then on.
        """
        _store(request).delete(job_id)
        return Response(status_code=204)

    return router


CALLBACK_URL = (
    "Where to POST the job's status document (as GET /jobs/{id} answers it) when the job ends, signed "
    '(docs/jobs.md, "Webhooks"): http or https, to a public address or an allowed network.'
)


def callback_url_field(settings: Settings) -> tuple[Any, Any]:
    """JobRequest's `callback_url`, checked against the allow-list (`core.webhooks.check_url`): a 422
    that says why. Without webhook secrets every URL is a 422, and the schema takes only null."""
    if not settings.webhook_secrets:

        def off(url: str | None) -> None:
            if url is not None:
                raise ValueError("webhooks are off: this service has no SENTIMENT_WEBHOOK_SECRETS to sign them")

        return Annotated[str | None, AfterValidator(off), WithJsonSchema({"type": "null"})], Field(
            None, description=f"{CALLBACK_URL} Off here: no webhook secrets are configured."
        )

    def checked(url: str) -> str:
        check_url(url, settings.webhook_allowed_networks)
        return url

    url = Annotated[str, StringConstraints(max_length=MAX_URL_CHARS), AfterValidator(checked)]
    return url | None, Field(None, description=CALLBACK_URL)


def _store(request: Request) -> JobStore:
    return request.app.state.jobs


def _json(view: dict) -> Response:
    # Built here rather than validated through the response model: predictions can be 10,000 long.
    return Response(orjson.dumps(view), media_type="application/json")
