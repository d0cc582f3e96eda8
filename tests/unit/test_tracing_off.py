"""Tracing off (no OTEL_EXPORTER_OTLP_ENDPOINT): nothing of OpenTelemetry is loaded, a client's
traceparent is carried as it came, and log lines still name its trace id."""

import logging
import os
import subprocess
import sys
from typing import Any

import pytest

from shared import tracing

GOOD = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize("bad", [None, 7, "", "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
                                 "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",
                                 GOOD.upper(), GOOD + "-extra", "ff" + GOOD[2:], "x" * 10_000])
def test_only_a_well_formed_traceparent_is_kept(bad: Any) -> None:
    assert tracing.valid(bad) is None
    assert tracing.valid(GOOD) == GOOD and tracing.valid(GOOD.encode()) == GOOD


async def test_off_the_client_traceparent_is_carried_unchanged() -> None:
    assert not tracing.enabled()
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["carried"] = tracing.TRACEPARENT.get()
        seen["headers"] = scope["headers"]
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "m", None, None)
        tracing.TraceIdFilter().filter(record)
        seen["trace_id"] = record.trace_id  # type: ignore[attr-defined]

    wrapped = tracing.wrap_asgi(app)
    headers = [(b"traceparent", GOOD.encode())]
    await wrapped({"type": "http", "headers": headers}, None, None)
    assert seen == {"carried": GOOD, "headers": headers, "trace_id": GOOD[3:35]}
    await wrapped({"type": "http", "headers": [(b"traceparent", b"junk")]}, None, None)
    assert seen["carried"] is None and seen["trace_id"] is None
    assert tracing.TRACEPARENT.get() is None, "the request's context does not leak"
    with tracing.span("anything", "internal", GOOD) as carried:
        assert carried == GOOD
    assert tracing.published(GOOD, "PedidoCriado") == GOOD


def test_off_the_services_load_nothing_of_opentelemetry() -> None:
    """Every process set up as `run` sets it up (apps built, logging and tracing set up, the ASGI
    layers wrapped, a span asked for), in a fresh interpreter without the endpoint: no
    OpenTelemetry SDK, exporter or instrumentation is loaded, no provider is set, and nothing of
    OpenTelemetry beyond what FastAPI itself imports (FastAPI 0.16x imports the no-op API package
    for its own telemetry, which stays off while no provider is set)."""
    done = subprocess.run([sys.executable, "-c", _OFF_SCRIPT], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
                          timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip().endswith("clean"), done.stderr[-2000:]


_OFF_SCRIPT = """
import sys
import fastapi
baseline = {m for m in sys.modules if m.startswith("opentelemetry")}
from shared import tracing
from shared.logs import configure_logging
import gateway.main, orders.main, stock.main, stock.worker, shared.consumer, shared.outbox
for service, app in [("gateway", gateway.main.create), ("orders", orders.main.create),
                     ("stock-api", stock.main.create)]:
    configure_logging(service)
    tracing.setup(service)
    tracing.wrap_asgi(app())
tracing.setup("stock-worker")
with tracing.span("x", "consumer", None):
    tracing.published(None, "PedidoCriado")
added = sorted(m for m in sys.modules if m.startswith("opentelemetry") and m not in baseline)
assert not tracing.enabled() and not added, added
heavy = [m for m in sys.modules
         if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter", "opentelemetry.instrumentation"))]
assert not heavy, heavy
if "opentelemetry.trace" in sys.modules:
    provider = sys.modules["opentelemetry.trace"].get_tracer_provider()
    assert type(provider).__name__ == "ProxyTracerProvider", provider
print("clean")
"""
