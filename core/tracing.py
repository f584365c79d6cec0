"""OpenTelemetry traces: off unless the standard OTEL_* environment turns them on.

On when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`, comma-separated; `none` is off)
or, that unset, when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set;
`OTEL_SDK_DISABLED=true` keeps it off. The SDK reads the rest itself: endpoint, headers, sampler
(`OTEL_TRACES_SAMPLER`), `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, batch export sizes.

A request's trace crosses Redis as a W3C traceparent in its `WorkItem`; the worker's spans serve
many requests at once, so they link to theirs rather than join one. Off, the SDK is never imported
and `enabled` is False: callers test it and build no span, context or string.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

enabled = False
tracer: trace.Tracer = trace.NoOpTracer()
OFF: AbstractContextManager[trace.Span] = nullcontext(trace.INVALID_SPAN)  # what `span` gives when off
_W3C = TraceContextTextMapPropagator()
KNOWN = ("otlp", "console")
# A client's malformed traceparent, tracestate or baggage header is its own affair, not the operator's:
# the SDK logs a WARNING for each bad entry (up to 180 a request), quoting the header whole (kilobytes),
# so any client could fill the log with lines of its choosing. The header is ignored all the same.
for _logger in (
    "opentelemetry.baggage.propagation",
    "opentelemetry.trace.propagation.tracecontext",
    "opentelemetry.trace.span",
):
    logging.getLogger(_logger).setLevel(logging.ERROR)


def exporters(env: Mapping[str, str] = os.environ) -> list[str]:
    """The exporters the environment asks for; none: tracing stays off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names and (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        names = ["otlp"]
    return [n for n in names if n != "none"]


def setup(service: str) -> bool:
    """Turn tracing on if the environment asks (once per process); `service`: the service name unless
    `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` gives one. True if tracing is on."""
    if enabled:
        return True
    wanted = []
    # gRPC's OTLP exporter is not installed: HTTP's would send to the gRPC collector port, failing each batch.
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    for name in exporters():  # only those it can export to: spans for no exporter would cost every request
        if name not in KNOWN:
            log.warning("OTEL_TRACES_EXPORTER=%s: unknown exporter (known: %s); ignored", name, ", ".join(KNOWN))
        elif name == "otlp" and protocol.strip().lower() == "grpc":
            log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=grpc: OTLP goes over HTTP only (http/protobuf); otlp ignored")
        else:
            wanted.append(name)
    if not wanted:
        return False
    # The SDK raises on some OTEL_* values (OTEL_BSP_SCHEDULE_DELAY=-5, OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT=x,
    # the latter as it is imported) where it defaults others: traces off, and the process serves.
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        known: dict[str, type[SpanExporter]] = {"otlp": OTLPSpanExporter, "console": ConsoleSpanExporter}
        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: service}))
        provider = TracerProvider(resource=resource)  # shut down (spans flushed) at exit
        for name in wanted:
            provider.add_span_processor(BatchSpanProcessor(known[name]()))
    except ValueError as exc:
        log.error("tracing off: an OTEL_* environment variable is invalid (%s)", exc)
        return False
    trace.set_tracer_provider(provider)
    install(provider)
    log.info("tracing on: %s spans of %s", "+".join(wanted), resource.attributes.get(SERVICE_NAME))
    return True


def install(provider: trace.TracerProvider | None) -> None:
    """Trace to `provider` from now on, or stop tracing (None). `setup` calls it; tests too."""
    global enabled, tracer
    enabled = provider is not None
    tracer = provider.get_tracer("sentiment-batcher") if provider is not None else trace.NoOpTracer()


def span(name: str) -> AbstractContextManager[trace.Span]:
    """A child span of the current one; `OFF` when off (nothing built)."""
    return tracer.start_as_current_span(name) if enabled else OFF


def linked_span(
    name: str, traceparents: Iterable[str | None], kind: trace.SpanKind = trace.SpanKind.INTERNAL, **attributes: Any
) -> AbstractContextManager[trace.Span]:
    """A span of work done for many requests at once, linked to each request's span. Call only when
    `enabled` (its arguments cost something to build)."""
    links = [trace.Link(c) for c in map(_span_context, dict.fromkeys(filter(None, traceparents))) if c is not None]
    return tracer.start_as_current_span(
        name, kind=kind, links=links, attributes={f"sentiment.{k}": v for k, v in attributes.items()}
    )


def traceparent() -> str | None:
    """The current span as a W3C traceparent (to carry in a work item); None with no span."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent")


def _span_context(traceparent: str | None) -> trace.SpanContext | None:
    if not traceparent:
        return None
    context = trace.get_current_span(_W3C.extract({"traceparent": traceparent})).get_span_context()
    return context if context.is_valid else None
