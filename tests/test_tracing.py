"""OpenTelemetry traces (core/tracing.py): a request's trace from the API, through its work item, to
the worker's spans that link to it; nothing at all when tracing is off. The API runs in process on
fakeredis with a worker thread on the same server, spans go to the SDK's in-memory exporter."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import fakeredis
import pytest
from opentelemetry import _logs, metrics, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import batcher.jobs
from batcher.bulk import Bulk
from batcher.worker import Worker
from core import tracing
from core.protocol import WorkItem
from core.settings import Settings
from tests.conftest import REPO, start_worker, wait_for
from tests.test_api import client_for

pytestmark = pytest.mark.anyio

CLIENT_TRACE = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"  # a client's W3C traceparent header


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory, for one test; global for this test alone, as `tracing.setup` makes it
    (FastAPI then spans each HTTP request)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    tracing.install(provider)
    yield exporter
    tracing.install(None)
    provider.shutdown()


def taken_items(worker: Worker) -> list[WorkItem]:
    """The work items `worker` takes from here on, as they came off the queue."""
    taken: list[WorkItem] = []
    hold = worker.intake.hold

    def spy(raws: list[bytes]) -> None:
        taken.extend(WorkItem.decode(raw) for raw in raws)
        hold(raws)

    worker.intake.hold = spy  # type: ignore[method-assign]
    return taken


def counted(getter: Callable[[], object], calls: list[str]) -> Callable[[], object]:
    """`getter`, noting its name in `calls` each time it is called."""

    def get() -> object:
        calls.append(getter.__name__)
        return getter()

    return get


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def test_a_requests_trace_crosses_to_the_worker_in_its_work_item(
    exporter: InMemorySpanExporter, settings: Settings, fake_server: fakeredis.FakeServer, worker: Worker
) -> None:
    taken = taken_items(worker)
    start_worker(worker)
    async with client_for(settings, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        response = await client.post("/predict", json={"text": ["good", "bad", "good"]})
        assert response.status_code == 200
        # The worker's reply span ends after the API had its answer (the reply went out in it).
        spans = wait_for(
            "the reply span", lambda: (s := exporter.get_finished_spans()) and named(s, "worker.reply") and s
        )

    [http] = named(spans, "POST /predict")  # FastAPI's
    assert http.kind == SpanKind.SERVER and http.parent is None  # no traceparent header: a trace of its own
    [predict] = named(spans, "predict")
    request = predict.get_span_context()
    ids = (request.trace_id, request.span_id)
    assert predict.parent is not None and predict.parent.span_id == http.context.span_id
    assert predict.attributes == {"sentiment.texts": 3, "sentiment.cache": "miss"}
    phases = [s for s in spans if s.name.startswith("predict.")]
    assert sorted(s.name for s in phases) == ["predict.cache_lookup", "predict.enqueue", "predict.wait"]
    assert all(s.parent is not None and s.parent.span_id == request.span_id for s in phases)
    assert all(s.context.trace_id == request.trace_id for s in phases)

    [item] = taken
    assert item.traceparent == f"00-{request.trace_id:032x}-{request.span_id:016x}-{request.trace_flags:02x}"

    forwards = named(spans, "worker.forward")  # one, or one a lane where idle lanes split the batch
    [tokenize] = named(spans, "worker.tokenize")
    for span in [*forwards, tokenize, *named(spans, "worker.reply")]:
        assert [(link.context.trace_id, link.context.span_id) for link in span.links] == [ids], span.name
    attributes = [dict(s.attributes or {}) for s in forwards]
    assert all(s.kind == SpanKind.CONSUMER for s in forwards)
    assert all(a["sentiment.requests"] == 1 and a["sentiment.queue_wait_s"] >= 0 for a in attributes)
    assert sum(a["sentiment.texts"] for a in attributes) == 2  # the distinct texts
    tokens = sum(a["sentiment.tokens"] for a in attributes)
    assert tokenize.attributes == {"sentiment.texts": 2, "sentiment.tokens": tokens}


async def test_the_predict_span_continues_a_clients_trace(
    exporter: InMemorySpanExporter, settings: Settings, fake_server: fakeredis.FakeServer, worker: Worker
) -> None:
    taken = taken_items(worker)
    start_worker(worker)
    async with client_for(settings, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        response = await client.post("/predict", json={"text": ["fine"]}, headers={"traceparent": CLIENT_TRACE})
        assert response.status_code == 200
    spans = exporter.get_finished_spans()
    [http], [predict] = named(spans, "POST /predict"), named(spans, "predict")
    assert f"{predict.context.trace_id:032x}" == "ab" * 16
    assert http.parent is not None and f"{http.parent.span_id:016x}" == "cd" * 8
    assert [item.traceparent for item in taken] == [
        f"00-{'ab' * 16}-{predict.context.span_id:016x}-01"
    ]  # sampled, as the client's


async def test_off_no_span_is_made_and_no_traceparent_queued(
    settings: Settings, fake_server: fakeredis.FakeServer, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A working tracer behind the flag: anything that built spans without asking `enabled` would show here.
    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "tracer", provider.get_tracer("test"))
    assert not tracing.enabled
    # FastAPI's own telemetry looks for a configured tracer provider (a user's own may be), and no other.
    asked: list[str] = []
    for module, getter in (
        (trace, "get_tracer_provider"),
        (metrics, "get_meter_provider"),
        (_logs, "get_logger_provider"),
    ):
        monkeypatch.setattr(module, getter, counted(getattr(module, getter), asked))
    taken = taken_items(worker)
    start_worker(worker)
    async with client_for(settings, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        response = await client.post("/predict", json={"text": ["good", "bad"]}, headers={"traceparent": CLIENT_TRACE})
        assert response.status_code == 200
    wait_for("the item's acknowledgement", lambda: worker.replies.answered == 1)
    assert [item.traceparent for item in taken] == [None]
    assert exporter.get_finished_spans() == ()
    assert set(asked) == {"get_tracer_provider"}


def test_a_span_per_jobs_part(
    exporter: InMemorySpanExporter,
    settings: Settings,
    worker: Worker,
    redis: fakeredis.FakeRedis,
) -> None:
    start_worker(worker)  # computes the parts' texts
    bulk = Bulk(settings, redis)
    part = bulk.item_texts * batcher.jobs.BATCHES_PER_PART
    texts = [f"text {i}" for i in range(part + 1)]
    with batcher.jobs.running(batcher.jobs.Context(bulk)):
        assert len(batcher.jobs.classify(texts)) == len(texts)
    parts = named(exporter.get_finished_spans(), "jobs.part")
    assert [(s.attributes or {}).get("sentiment.start") for s in parts] == [0, part]
    assert [(s.attributes or {}).get("sentiment.texts") for s in parts] == [part, 1]


@pytest.mark.parametrize(
    ("env", "exporters"),
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp, Console"}, ["otlp", "console"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, []),
    ],
)
def test_which_environment_turns_tracing_on(env: dict[str, str], exporters: list[str]) -> None:
    assert tracing.exporters(env) == exporters


def test_setup_leaves_tracing_off_when_the_environment_does_not_ask(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.setup("test")
    assert not tracing.enabled


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "on", "says"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, False, "OTEL_TRACES_EXPORTER=jaeger: unknown exporter"),
        ({"OTEL_TRACES_EXPORTER": "jaeger,console"}, True, "tracing on: console spans"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            False,
            "OTEL_EXPORTER_OTLP_PROTOCOL=grpc: OTLP goes over HTTP only",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "-5"},
            False,
            "tracing off: an OTEL_* environment variable is invalid (schedule_delay_millis must be positive.)",
        ),
        (  # (raised as the SDK is imported)
            {"OTEL_TRACES_EXPORTER": "console", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "many"},
            False,
            "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT must be a non-negative integer but got many",
        ),
    ],
)
def test_an_otel_environment_the_sdk_cannot_follow_leaves_tracing_off_in_one_line(
    env: dict[str, str], on: bool, says: str
) -> None:
    """An exporter it does not have is no reason to build spans for nobody; an OTEL_* value the SDK
    refuses is no reason to stop serving (a process of its own: the SDK reads its environment once)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    setup = "import logging; logging.basicConfig(level=logging.INFO); from core import tracing; " + (
        "print(tracing.setup('t'), tracing.enabled)"
    )
    done = subprocess.run(
        [sys.executable, "-c", setup], env={**clean, **env}, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stdout.split()) == (0, [str(on)] * 2), done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr


async def test_malformed_trace_headers_are_ignored_without_a_log_line_a_client_writes(
    exporter: InMemorySpanExporter,
    settings: Settings,
    fake_server: fakeredis.FakeServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The SDK would log a WARNING per bad baggage or tracestate entry (180 for one request here),
    and a too long baggage header whole: any client could fill the log with lines of its own."""
    caplog.set_level(logging.INFO)
    bad_entries = ",".join(f'k{i}="v"' for i in range(200))  # (a quote is no baggage character)
    async with client_for(settings, fakeredis.FakeAsyncRedis(server=fake_server)) as client:
        for headers in (
            {
                "traceparent": CLIENT_TRACE,
                "tracestate": ",".join(f"K{i}=v" for i in range(32)),  # (keys are lower case)
                "baggage": bad_entries,
            },
            {"traceparent": CLIENT_TRACE + "-garbage", "baggage": "forged log line " * 2000},
            {"traceparent": "0" * 600},
        ):
            assert (await client.get("/health", headers=headers)).status_code == 200
    assert [r.getMessage()[:80] for r in caplog.records if r.name.startswith("opentelemetry")] == []
    [continued, *_] = named(exporter.get_finished_spans(), "GET /health")
    assert continued.parent is not None and f"{continued.parent.span_id:016x}" == "cd" * 8  # the valid traceparent
