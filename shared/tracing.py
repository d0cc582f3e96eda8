"""One order, one trace (API.md §5): OpenTelemetry spans at every hop, exported with OTLP when
OTEL_EXPORTER_OTLP_ENDPOINT is set, and nothing at all otherwise.

Off (the default), no OpenTelemetry module is even imported: the W3C `traceparent` a client sent
is carried through unchanged (HTTP header -> outbox row -> message header -> the rows a consumer
writes) and the helpers below cost a function call. On, each hop makes its span a child of the
traceparent it received and passes its own on:

  gateway (server span; the forwarded request carries it)  ->  orders (server span; written
  into the outbox row)  ->  relay (producer span per row; in the message header)  ->  stock
  worker (consumer span; written into its answer's outbox row)  ->  relay  ->  orders consumer.

The plain-ASGI proxy and the orders fast lane never reach FastAPI's hooks, so the server span is
made by OpenTelemetry's ASGI middleware around the whole process (`wrap_asgi`); publish_batch
never calls aio-pika's publish, so relay and consumer spans are made here too."""

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from shared.messaging import TRACEPARENT, valid_traceparent

log = logging.getLogger(__name__)

# TRACEPARENT (shared/messaging.py): the trace context of what this task is doing, set from an
# HTTP request or a message, read by whoever writes an outbox row.
_tracer: Any = None  # an opentelemetry Tracer once `setup` found an endpoint


def enabled() -> bool:
    return _tracer is not None


def valid(value: object) -> str | None:
    """`value` if it is a W3C traceparent, else None (shared/messaging.py's rule)."""
    return valid_traceparent(value)


def trace_id(traceparent: str | None) -> str | None:
    return traceparent[3:35] if traceparent else None


def setup(service: str) -> None:
    """Tracing on, exporting to OTEL_EXPORTER_OTLP_ENDPOINT, when that is set (and the other
    standard OTEL_* variables apply); otherwise nothing happens."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    use(BatchSpanProcessor(OTLPSpanExporter()), service)


def use(processor: Any, service: str) -> None:
    """Tracing on with `processor` (tests pass a SimpleSpanProcessor over an in-memory exporter)."""
    global _tracer  # noqa: PLW0603 - one tracer per process, chosen at start
    import atexit

    from opentelemetry import trace
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    AsyncPGInstrumentor().instrument()
    atexit.register(provider.shutdown)  # flushes what the batch processor still holds
    _tracer = trace.get_tracer("inventory")
    log.info("tracing on", extra={"endpoint": os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")})


def _traceparent_of(span: Any) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _context(traceparent: str | None) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent}) if traceparent else None


@contextmanager
def span(name: str, kind: str, parent: str | None = None, **attributes: Any) -> Iterator[str | None]:
    """A span `kind` ("server", "client", "producer", "consumer", "internal") child of `parent`
    (or of the current span when None); yields the traceparent to pass on: the span's when
    tracing, `parent` unchanged when not."""
    if _tracer is None:
        yield parent
        return
    from opentelemetry.trace import SpanKind

    with _tracer.start_as_current_span(name, context=_context(parent), kind=SpanKind[kind.upper()],
                                       attributes=attributes) as current:
        yield _traceparent_of(current)


def published(parent: str | None, event_type: str) -> str | None:
    """The traceparent a message leaves with: a producer span's (ended at once: the relay's
    batch publish is one write for many rows), or the row's own when tracing is off."""
    if _tracer is None:
        return parent
    with span(f"publish {event_type}", "producer", parent, **{
            "messaging.system": "rabbitmq", "messaging.destination.name": event_type}) as carried:
        return carried


class _CarryTraceparent:
    """Innermost: the request's trace context becomes the task's (TRACEPARENT) and the header
    the proxy forwards (so the gateway's span is the upstream's parent)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carried = None
        if _tracer is not None:
            from opentelemetry import trace

            current = trace.get_current_span()
            if current.get_span_context().is_valid:
                carried = _traceparent_of(current)
                headers = [(k, v) for k, v in scope["headers"] if k != b"traceparent"]
                scope = {**scope, "headers": [*headers, (b"traceparent", carried.encode())]}
        else:
            carried = valid(next((v for k, v in scope["headers"] if k == b"traceparent"), None))
        token = TRACEPARENT.set(carried)
        try:
            await self.app(scope, receive, send)
        finally:
            TRACEPARENT.reset(token)


def wrap_asgi(app: ASGIApp) -> ASGIApp:
    """The process's outermost ASGI layer: a server span per request when tracing is on."""
    inner = _CarryTraceparent(app)
    if _tracer is None:
        return inner
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(inner, exclude_spans=["receive", "send"])


class TraceIdFilter(logging.Filter):
    """Every log line carries the trace id next to the request id."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.trace_id = _current_trace_id()
        return True


def _current_trace_id() -> str | None:
    if _tracer is not None:
        from opentelemetry import trace

        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            return f"{ctx.trace_id:032x}"
    return trace_id(TRACEPARENT.get())
