"""One order is one trace (API.md §5): with OTEL_EXPORTER_OTLP_ENDPOINT pointing at a collector
(here a small OTLP/HTTP receiver in the test), every hop of an order's life exports its span
into the trace the client started: gateway, orders, the relay's publish, the stock worker, the
relay's publish of the answer, the orders consumer."""

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.helpers import (
    create_order,
    eventually,
    put_stock,
    random_sku,
    random_store,
    wait_for_status,
)
from tooling.stack import Stack, free_port_block


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str


class Collector:
    """Receives OTLP/HTTP protobuf exports and keeps every span."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    async def receive(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    self.spans.append(Span(attributes.get("service.name", "?"), s.name,
                                           s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex()))
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")


@pytest.fixture(scope="module")
def collector_port() -> int:
    return free_port_block(1)


@pytest.fixture(scope="module")
async def collector(collector_port: int) -> AsyncIterator[Collector]:
    found = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", found.receive)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", collector_port).start()
    yield found
    await runner.cleanup()


@pytest.fixture(scope="module")
def traced(infrastructure: None, collector_port: int) -> Iterator[Stack]:
    running = Stack(f"t{uuid.uuid4().hex[:8]}", workers=1, env_overrides={
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector_port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }).start()
    yield running
    running.stop()


async def test_one_order_is_one_trace(collector: Collector, traced: Stack) -> None:
    trace_id, client_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    store, sku = random_store(), random_sku()
    async with traced.client() as client:
        await put_stock(client, traced.admin, store, sku, 5)
        placed = await create_order(client, store, [(sku, 1)],
                                    headers={"traceparent": f"00-{trace_id}-{client_span}-01"})
        assert placed.status_code == 202
        await wait_for_status(client, placed.json()["order_id"], {"reserved"})

    async def chain() -> list[Span]:
        """The orders consumer's span and its ancestors, up to the client's span, newest first."""
        spans = {s.span_id: s for s in collector.spans if s.trace_id == trace_id}
        last = [s for s in spans.values() if s.service == "orders" and s.name.startswith(ORDERS_CONSUMER)]
        assert last, sorted((s.service, s.name) for s in spans.values())
        path, at = [], last[0]
        while at.parent_id != client_span:
            path.append(at)
            assert at.parent_id in spans, ("a span's parent is missing", at, path)
            at = spans[at.parent_id]
        return [*path, at]

    path = await eventually(chain, timeout=30, interval=0.5)
    hops = [(s.service, s.name) for s in reversed(path)]
    # Each hop in order from the client's span, every one a descendant of the one before
    # (the ASGI middleware's own inner spans, if any, may sit between them).
    expected = iter(HOPS)
    want = next(expected)
    for service, name in hops:
        if want is not None and service == want[0] and name.startswith(want[1]):
            want = next(expected, None)
    assert want is None, (want, hops)
    assert {s.trace_id for s in path} == {trace_id}


ORDERS_CONSUMER = "orders.status process AtualizarStatus"
HOPS = [("gateway", "POST /orders"), ("orders", "POST /orders"), ("orders", "publish PedidoCriado"),
        ("stock-worker", "stock.orders process PedidoCriado"), ("stock-worker", "publish AtualizarStatus"),
        ("orders", ORDERS_CONSUMER)]
