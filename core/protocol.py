"""The API <-> worker wire protocol, defined once and imported by both sides.

Everything that crosses Redis is here: key names, the work item the API queues, the result the
worker writes back, the cached per-text prediction, and what workers announce about themselves.
No user text ever appears in a key name: texts are addressed by a SHA-256 digest.

Flow: the API LPUSHes a `WorkItem` onto `queue`; a worker moves it (RIGHT -> LEFT, so FIFO) into
its own `processing(worker)` list, computes, writes `result(id)` (short TTL) and one `cache` key per
text, PUBLISHes `replies` (ids and results) on the items' `reply_to` channel, and in the same
transaction removes the items from its processing list. A dead worker's processing list is pushed back onto the
queue by a live one.

Bulk work (/jobs parts, pushed by the jobs worker) is the same `WorkItem` on a list of its own,
`bulk`, moved into `bulk_processing(worker)` and answered the same way: the list says the class, and
a worker takes from it only for room the queue leaves (`batcher.plan`).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import StrEnum
from types import UnionType
from typing import Any, Self, get_args, get_origin, get_type_hints

import orjson

LabelScore = dict[str, Any]  # {"label": "POSITIVE", "score": 0.98} (the API's response model: `api.schemas.Score`)
Prediction = list[LabelScore]  # one per label, in the model's label order
DEFAULT_CLIENT = "default"  # the client of every request when API keys are off
ABANDONED_GRACE_S = 1.0  # how long an `abandoned` marker outlives its item's deadline


class ScoreFunction(StrEnum):
    """What turns a model's logits into its scores, named as transformers' text-classification
    pipeline names them (`function_to_apply`): each checkpoint has its own (`model_store.scoring`)."""

    SOFTMAX = "softmax"  # single-label classification: the labels' probabilities, summing to 1
    SIGMOID = "sigmoid"  # multi-label classification, or one output: each label its own yes/no
    NONE = "none"  # regression: the raw value


def scored_version(version: str, function: str | None) -> str:
    """The cache version of scores by `function`, a function other than the model's own (None): cached
    apart from the model's own scores, which are cached under the model's version."""
    return version if function is None else f"{version}~{function}"


def new_id() -> str:
    """An unguessable identifier (128 random bits) for requests, workers and API processes."""
    return secrets.token_hex(16)


def text_digest(text: str) -> str:
    """The name of a text inside keys: never the text itself."""
    return hashlib.sha256(text.encode()).hexdigest()


def replies(answers: list[tuple[str, bytes]]) -> bytes:
    """The pub/sub message that answers requests of one API process: per request, its id, a space and
    the bytes of its result key, one request a line (a result is JSON: it holds no raw newline). The
    results ride along so the waiting API needs no round trip to fetch them, and one message answers
    all of a process's requests that a worker finished together; the keys stay, for a waiter that
    missed the message (its subscription was reconnecting)."""
    return b"\n".join(f"{request_id} ".encode() + result for request_id, result in answers)


def parse_replies(message: bytes) -> list[tuple[str, bytes | None]]:
    """(request id, result) per line of `replies`; the result is None in the bare id earlier workers
    sent. A line that is not ours names no waiting request: bytes that are not UTF-8 come out replaced."""
    answers = []
    for line in message.split(b"\n"):
        request_id, _, result = line.partition(b" ")
        answers.append((request_id.decode(errors="replace"), result or None))
    return answers


def prediction(labels: list[str], probabilities: list[float]) -> Prediction:
    """The response shape for one text: every label, in the model's order."""
    return [{"label": label, "score": p} for label, p in zip(labels, probabilities, strict=True)]


def encode_prediction(labels: list[str], probabilities: list[float]) -> bytes:
    """One text's `prediction` as JSON: the cache entry, and a piece of every result that holds it."""
    return orjson.dumps(prediction(labels, probabilities))


def read_prediction(raw: bytes | str) -> Prediction | None:
    """A cache entry's prediction; None when it holds none (garbage, or written by something else):
    read as a miss, computed and written over, rather than failing every request for that text until
    the entry expires."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    scored = isinstance(value, list) and value and all(_label_score(s) for s in value)
    return value if scored else None


def _label_score(value: object) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("label"), str)
        and isinstance(score := value.get("score"), int | float)
        and not isinstance(score, bool)
    )


def encode_result(predictions: list[bytes]) -> bytes:
    """A `Result` with the given encoded predictions, joined rather than encoded again."""
    return b'{"predictions":[' + b",".join(predictions) + b"]}"


@dataclass(frozen=True)
class Keys:
    """Redis key names, all under one prefix."""

    prefix: str

    @property
    def queue(self) -> str:
        return f"{self.prefix}:queue"

    @property
    def workers(self) -> str:
        """Set of the ids of workers that may hold work (live, or dead and not yet reclaimed)."""
        return f"{self.prefix}:workers"

    @property
    def model(self) -> str:
        """The `ModelInfo` of the model the workers serve (the API reads the cache version here)."""
        return f"{self.prefix}:model"

    def worker_connection(self, process_id: str) -> str:
        """The name on a worker process's Redis connections (a client name, not a key)."""
        return f"{self.prefix}:worker:{process_id}"

    def processing(self, worker_id: str) -> str:
        return f"{self.prefix}:processing:{worker_id}"

    @property
    def bulk(self) -> str:
        """The bulk class's queue: /jobs parts' never-seen texts, as `WorkItem`s the jobs worker LPUSHes."""
        return f"{self.prefix}:bulk"

    def bulk_processing(self, worker_id: str) -> str:
        """A worker's bulk items taken and not yet answered (reclaimed onto `bulk` as `processing` is onto `queue`)."""
        return f"{self.prefix}:processing-bulk:{worker_id}"

    def heartbeat(self, worker_id: str) -> str:
        return f"{self.prefix}:heartbeat:{worker_id}"

    def result(self, request_id: str) -> str:
        return f"{self.prefix}:result:{request_id}"

    def reply_channel(self, api_id: str) -> str:
        return f"{self.prefix}:done:{api_id}"

    def cache(self, model_version: str, text: str) -> str:
        return f"{self.prefix}:cache:{model_version}:{text_digest(text)}"

    @property
    def clients(self) -> str:
        """Set of the clients that queued work (`outstanding` per client), for the overload refusal."""
        return f"{self.prefix}:clients"

    def outstanding(self, client: str) -> str:
        """Sorted set of a client's work items queued or in a forward (id -> deadline): the API adds,
        the worker removes when it answers or drops one; entries past their deadline count no more."""
        return f"{self.prefix}:outstanding:{client}"

    @property
    def webhooks(self) -> str:
        """Sorted set: the job ids whose webhook is not yet delivered, scored by when to look next."""
        return f"{self.prefix}:webhooks"

    def webhook(self, job_id: str) -> str:
        """Hash: a job's callback URL, tries so far, last error; once the job ended, the body and the delivery id."""
        return f"{self.prefix}:webhook:{job_id}"

    def webhook_claim(self, job_id: str) -> str:
        """Held (with an expiry) by the jobs worker delivering it, so that two never send it at once."""
        return f"{self.prefix}:webhook:{job_id}:claim"

    @property
    def webhook_dead_letters(self) -> str:
        """List of the deliveries that gave up (JSON: job id, host, tries, last error, when), newest first."""
        return f"{self.prefix}:webhooks:dead"

    def rate_limit(self, client: str) -> str:
        """A client's token bucket; `client` is an API key's digest or an address, never a key."""
        return f"{self.prefix}:ratelimit:{client}"

    def abandoned(self, request_id: str) -> str:
        """Set (`ABANDONED_GRACE_S` past its deadline) once nobody waits for the request's work item:
        its client went away, or the deadline cut its wait. A worker drops such an item unstarted."""
        return f"{self.prefix}:abandoned:{request_id}"

    @property
    def abandoned_epoch(self) -> str:
        """Counter moved with every `abandoned` marker set: a worker looks markers up only when it moved."""
        return f"{self.prefix}:abandoned"


class Unreadable(ValueError):
    """Bytes in Redis that are not the message they should be (not JSON, not an object, a field
    missing or of the wrong type): written by something else, or by a version that broke the rules
    below. Readers log it and skip it; it is never fatal to the process that meets it."""


class _Json:
    """JSON encoding for the dataclasses below (orjson: the hot path encodes these per request).

    Readers ignore fields they do not know, and every field added later has a default, so APIs and
    workers one version apart read each other during a rolling update (docs/deploy.md). `decode`
    checks each field's type as declared (a list's items too, where declared as `list[str]`), so a
    reader works on what it expects or gets `Unreadable`.
    """

    def encode(self) -> bytes:
        # orjson writes dataclasses itself: `asdict` first would deep-copy every prediction.
        return orjson.dumps(self)

    @classmethod
    def decode(cls, raw: bytes | str) -> Self:
        try:
            fields = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise Unreadable(f"{cls.__name__}: not JSON") from None
        if not isinstance(fields, dict):
            raise Unreadable(f"{cls.__name__}: not a JSON object")
        checks = _field_checks(cls)
        values = {k: v for k, v in fields.items() if k in checks}
        if wrong := [k for k, v in values.items() if not checks[k](v)]:
            raise Unreadable(f"{cls.__name__}: {', '.join(sorted(wrong))} of the wrong type")
        try:
            return cls(**values)
        except TypeError:  # a field without a default is missing
            raise Unreadable(f"{cls.__name__}: a field is missing") from None


_FIELD_CHECKS: dict[type, dict[str, Callable[[Any], bool]]] = {}


def _field_checks(cls: type) -> dict[str, Callable[[Any], bool]]:
    """Per field of a dataclass, whether a decoded JSON value fits its declared type; worked out once per class."""
    checks = _FIELD_CHECKS.get(cls)
    if checks is None:
        hints = get_type_hints(cls)
        checks = _FIELD_CHECKS[cls] = {f.name: _check(hints[f.name]) for f in fields(cls)}
    return checks


def _check(annotation: Any) -> Callable[[Any], bool]:
    """Whether a JSON value fits `annotation`: str, int, float (an int too), bool, `list[str]`, any
    other list, or one of those `| None`."""
    options = get_args(annotation) if get_origin(annotation) is UnionType else (annotation,)
    nullable = type(None) in options
    [kind] = [o for o in options if o is not type(None)]
    if get_origin(kind) is list:
        strings = get_args(kind) == (str,)
        return lambda v: (
            (v is None and nullable) or (isinstance(v, list) and (not strings or all(isinstance(x, str) for x in v)))
        )
    types: tuple[type, ...] = (int, float) if kind is float else (kind,)
    if kind in (int, float):  # JSON true and false are not numbers
        return lambda v: (v is None and nullable) or (isinstance(v, types) and not isinstance(v, bool))
    return lambda v: (v is None and nullable) or isinstance(v, types)


@dataclass(frozen=True, slots=True)
class WorkItem(_Json):
    """One /predict request's cache misses, deduplicated, as queued for the worker."""

    id: str
    texts: list[str]
    enqueued_at: float  # unix seconds
    deadline: float  # unix seconds; past it nobody waits and the worker skips the item
    reply_to: str  # pub/sub channel of the API process that waits
    client: str = DEFAULT_CLIENT  # who asked: an API key's name (`api.access`), else the one default client
    traceparent: str | None = None  # W3C trace context of the request's span, only when tracing is on (core/tracing.py)
    function: str | None = None  # a `ScoreFunction` other than the model's own, asked for by name; None: the model's


@dataclass(frozen=True, slots=True)
class Result(_Json):
    """What the worker writes to `Keys.result`: one prediction per item text, an error, or `late`: the
    item was dropped unstarted because it could not be answered by its deadline (not lost: the API's 504)."""

    predictions: list[Prediction] | None = None
    error: str | None = None
    # Texts refused as longer than the model takes (`SENTIMENT_LONG_TEXTS=reject`): [index in the item's
    # texts, its tokens] each; the API answers them as bad input (422), naming them by the request's index.
    too_long: list[list[int]] | None = None
    late: bool = False


@dataclass(frozen=True, slots=True)
class ModelInfo(_Json):
    """What a worker announces about the model it serves; `version` is part of every cache key."""

    name: str
    version: str
    labels: list[str]
    device: str
    dtype: str
    function: str = ScoreFunction.SOFTMAX.value  # the `ScoreFunction` its scores come from
    engine: str = ""  # the runtime of its forwards: torch, onnxruntime, openvino, null ("": a worker before the field)


@dataclass(frozen=True, slots=True)
class WorkerStatus(_Json):
    """A worker's heartbeat value: who it is and what it has done (batch counters)."""

    id: str
    host: str
    pid: int
    model_version: str
    started_at: float
    batches: int = 0
    requests: int = 0
    texts: int = 0
    expired: int = 0
    largest_batch_requests: int = 0
    connection: str | None = None  # the name on its Redis connections; None: only the heartbeat tells its death
    # What the API's admission predicts by (`api.admission`): the texts a second this worker computes
    # under load and a full forward's seconds (None until it timed a forward: a cold worker is not
    # predicted), and the texts ahead of new work in it (held in its window or in a forward).
    texts_per_s: float | None = None
    forward_s: float | None = None
    texts_ahead: int = 0
    # When this heartbeat lapses (seconds since the epoch, the writer's clock): the key carries no
    # expiry, so that no memory policy evicts a live worker's (docs/reliability.md, "When Redis is
    # full"). None: it lapses when its key expires.
    lapses_at: float | None = None

    def lapsed(self, now: float) -> bool:
        """Whether the worker wrote no newer heartbeat by `now` (seconds since the epoch)."""
        return self.lapses_at is not None and now >= self.lapses_at
