"""The gateway itself (API.md §4, §5): health and metrics, request ids, body limits,
problem+json for its own errors, the one OpenAPI document with offline docs, and 503 when an
upstream is unreachable."""

import asyncio
import re
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from html.parser import HTMLParser

import aio_pika
import httpx
import pytest

from shared.messaging import EXCHANGE
from tests.helpers import assert_problem, create_order, eventually, random_sku, random_store
from tooling.stack import Stack, free_port

# A sample line of the Prometheus text format: name{labels} value [timestamp]
SAMPLE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})?\s+(\S+)(\s+-?\d+)?$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
MiB = 1024 * 1024


# ----- health and metrics --------------------------------------------------------------------


async def test_health_live_and_ready(stack: Stack) -> None:
    async with stack.client() as client:
        live = await client.get("/health/live")
        assert live.status_code == 200
        ready = await client.get("/health/ready")
        assert ready.status_code == 200, ready.text


async def test_metrics_are_prometheus_text(stack: Stack) -> None:
    async with stack.client() as client:
        await client.get(f"/stores/{random_store()}/stock/{random_sku()}")
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain"), response.headers
        lines = [line for line in response.text.splitlines() if line.strip()]
        assert any(line.startswith("# TYPE ") for line in lines)
        samples = [line for line in lines if not line.startswith("#")]
        assert samples, "no samples at all"
        for line in samples:
            match = SAMPLE.match(line)
            assert match, f"not a Prometheus sample line: {line!r}"
            float(match.group(2))  # a number, NaN or ±Inf


def _samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """The samples of one metric, by their label set."""
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            match = SAMPLE.match(line)
            assert match, line
            found[frozenset(LABEL.findall(match.group(1)))] = float(match.group(2))
    return found


async def test_forwarded_requests_are_counted_by_route_template_not_raw_path(stack: Stack) -> None:
    order_id = str(uuid.uuid4())
    labels = frozenset({("service", "gateway"), ("method", "GET"),
                        ("route", "/orders/{rest:path}"), ("status", "404")})
    async with stack.client() as client:

        async def counted() -> float:
            text = (await client.get("/metrics")).text
            return _samples(text, "http_requests_total").get(labels, 0.0)

        before = await counted()
        assert (await client.get(f"/orders/{order_id}")).status_code == 404

        async def one_more() -> str:
            assert await counted() == before + 1
            return (await client.get("/metrics")).text

        text = await eventually(one_more)
        latency = _samples(text, "http_request_duration_seconds_count")
        # http_request_duration_seconds is labelled [service, route] (API.md §5)
        timed = labels - {("status", "404"), ("method", "GET")}
        assert latency.get(timed, 0) >= 1, "the request is timed too"
        assert order_id not in text, "a raw path would make one series per order"


# ----- X-Request-ID --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/health/live"),
        ("GET", "/orders?limit=1"),
        ("GET", "/orders/00000000-0000-4000-8000-000000000000"),  # 404 from upstream
        ("GET", "/orders/not-a-uuid"),  # 422 from upstream
        ("GET", "/no/such/route"),  # 404 from the gateway itself
    ],
    ids=["own-route", "proxied", "upstream-404", "upstream-422", "gateway-404"],
)
async def test_request_id_is_echoed_or_created(stack: Stack, method: str, path: str) -> None:
    async with stack.client() as client:
        mine = f"test-{uuid.uuid4()}"
        echoed = await client.request(method, path, headers={"X-Request-ID": mine})
        assert echoed.headers.get("x-request-id") == mine
        first = await client.request(method, path)
        second = await client.request(method, path)
        created = [first.headers.get("x-request-id"), second.headers.get("x-request-id")]
        assert all(created), created
        assert created[0] != created[1], "each request gets its own id"


async def test_request_id_on_a_refused_body(stack: Stack) -> None:
    async with stack.client() as client:
        mine = f"test-{uuid.uuid4()}"
        response = await client.post(
            "/orders",
            content=b"{" + b" " * (1024 * 1024) + b"}",
            headers={"Content-Type": "application/json", "X-Request-ID": mine},
        )
        assert_problem(response, 413)
        assert response.headers.get("x-request-id") == mine


async def test_request_id_reaches_the_upstream_and_travels_with_the_order(stack: Stack) -> None:
    """The id the client gave, or the one the gateway made and answered with, is the one orders
    got: it is on the PedidoCriado message (API.md §6)."""
    connection = await aio_pika.connect(stack.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(await channel.get_exchange(EXCHANGE), routing_key="PedidoCriado")
        async with stack.client() as client:
            mine = f"test-{uuid.uuid4()}"
            given = await create_order(client, random_store(), [(random_sku(), 1)],
                                       headers={"X-Request-ID": mine})
            made = await create_order(client, random_store(), [(random_sku(), 1)])
        assert given.status_code == made.status_code == 202, (given.text, made.text)
        assert given.headers["x-request-id"] == mine
        expected = {given.json()["order_id"]: mine,
                    made.json()["order_id"]: made.headers["x-request-id"]}
        seen: dict[str, str] = {}

        async def both_published() -> None:
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                seen[str(message.correlation_id)] = str((message.headers or {}).get("x-request-id"))
            assert {k: seen.get(k) for k in expected} == expected

        await eventually(both_published, timeout=30)


async def _chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    """A body sent chunked, without Content-Length: only the bytes that arrive tell its size."""
    for start in range(0, len(data), size):
        yield data[start:start + size]


async def test_a_streamed_body_over_1_mib_is_413(stack: Stack) -> None:
    async with stack.client() as client:
        mine = f"test-{uuid.uuid4()}"
        response = await client.post(
            "/orders",
            content=_chunks(b"{" + b" " * MiB + b"}"),
            headers={"Content-Type": "application/json", "X-Request-ID": mine},
        )
        assert_problem(response, 413)
        assert response.headers.get("x-request-id") == mine


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
async def test_an_import_may_be_larger_than_1_mib(stack: Stack, streamed: bool) -> None:
    """`/stock/import` has its own, larger limit. The file's second line is a 1.5 MiB store id,
    so the stock API's verdict on it shows the whole body went through."""
    csv = b"store_id,sku,on_hand\n" + b"S" * (3 * MiB // 2) + b",SKU-1,1\n"
    async with stack.client() as client:
        response = await client.post(
            "/stock/import", content=_chunks(csv) if streamed else csv,
            headers={**stack.admin, "Content-Type": "text/csv"},
        )
    body = assert_problem(response, 422)
    assert body["detail"].startswith("line 2:"), body


# ----- the gateway's own errors --------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nowhere", 404),
        ("POST", "/health/live", 405),
        ("DELETE", "/orders", 405),
        ("PATCH", "/orders/00000000-0000-4000-8000-000000000000", 405),
        ("OPTIONS", "/orders", 405),  # the gateway forwards GET, POST, PUT, PATCH and DELETE
        ("OPTIONS", "/stores/S1/stock/A", 405),
    ],
    ids=["unknown-path", "post-to-health", "delete-orders", "patch-order", "options-orders",
         "options-stock"],
)
async def test_unrouted_requests_are_problem_json(
    stack: Stack, method: str, path: str, status: int
) -> None:
    async with stack.client() as client:
        assert_problem(await client.request(method, path), status)


# ----- OpenAPI and docs ----------------------------------------------------------------------


async def test_openapi_has_the_orders_and_stores_paths(stack: Stack) -> None:
    async with stack.client() as client:

        async def merged() -> dict:  # type: ignore[type-arg]
            response = await client.get("/openapi.json")
            assert response.status_code == 200
            doc = response.json()
            assert "/orders" in doc["paths"] and any(
                p.startswith("/stores/") for p in doc["paths"]
            ), list(doc["paths"])
            return doc

        doc = await eventually(merged, timeout=20)
        assert doc["openapi"].startswith("3.")
        paths = set(doc["paths"])
        assert {
            "/orders",
            "/orders/{order_id}",
            "/orders/{order_id}/confirm",
            "/orders/{order_id}/cancel",
            "/orders/{order_id}/reserve",
        } <= paths
        assert {
            "/stores/{store_id}/stock",
            "/stores/{store_id}/stock/{sku}",
            "/stores/{store_id}/stock/{sku}/restock",
            "/stores/{store_id}/stock/{sku}/movements",
        } <= paths
        assert "post" in doc["paths"]["/orders"] and "get" in doc["paths"]["/orders"]
        assert "put" in doc["paths"]["/stores/{store_id}/stock/{sku}"]


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


async def test_docs_are_served_from_local_assets(stack: Stack) -> None:
    async with stack.client() as client:
        response = await client.get("/docs")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        html = response.text
        parser = _Assets()
        parser.feed(html)
        assert parser.urls, "the page loads its script and style from somewhere"
        for url in parser.urls:
            assert not re.match(r"^(https?:)?//", url), f"asset from another host: {url}"
        assert not re.search(r"cdn\.|jsdelivr|unpkg|cdnjs", html, re.IGNORECASE), (
            "a CDN is named in the page"
        )
        for url in parser.urls:
            asset = await client.get(url)
            assert asset.status_code == 200, f"{url} is not served: {asset.status_code}"
        assert "/openapi.json" in html


# ----- an unreachable upstream ---------------------------------------------------------------


@pytest.fixture(scope="module")
def dead_gateway(stack: Stack) -> Iterator[str]:
    """A second gateway whose orders and stock upstreams are ports nobody listens on."""
    port = free_port()
    stack.start_process(
        "gateway-dead",
        "gateway",
        extra_env={
            "GATEWAY_PORT": str(port),
            "ORDERS_URLS": f"http://127.0.0.1:{free_port()}",
            "STOCK_URLS": f"http://127.0.0.1:{free_port()}",
        },
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stack.kill("gateway-dead", signal.SIGTERM)


@pytest.fixture
async def dead(dead_gateway: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=dead_gateway, timeout=30) as client:

        async def up() -> None:
            try:
                response = await client.get("/health/live")
            except httpx.TransportError as exc:
                raise AssertionError(f"gateway not up yet: {exc}") from None
            assert response.status_code == 200

        await eventually(up, timeout=30)
        yield client


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/orders", {"customer_id": "c-1", "items": [{"sku": "A", "quantity": 1}]}),
        ("GET", "/orders/00000000-0000-4000-8000-000000000000", None),
        ("GET", "/orders?customer_id=c-1", None),
        ("GET", "/stores/S1/stock/A", None),
        ("PUT", "/stores/S1/stock/A", {"on_hand": 1}),
    ],
    ids=["create-order", "get-order", "list-orders", "get-stock", "put-stock"],
)
async def test_unreachable_upstream_is_503_problem(
    dead: httpx.AsyncClient,
    method: str,
    path: str,
    body: dict | None,  # type: ignore[type-arg]
) -> None:
    mine = f"test-{uuid.uuid4()}"
    response = await dead.request(method, path, json=body, headers={"X-Request-ID": mine})
    assert_problem(response, 503)
    assert response.headers.get("x-request-id") == mine


async def test_gateway_with_dead_upstreams_is_live_but_not_ready(dead: httpx.AsyncClient) -> None:
    assert (await dead.get("/health/live")).status_code == 200
    ready = await dead.get("/health/ready")
    body = assert_problem(ready, 503)
    reported = str(body)
    assert "orders" in reported and "stock" in reported, f"each upstream is reported: {body}"


async def test_dot_segments_never_reach_an_internal_endpoint(stack: Stack) -> None:
    """`/orders/../metrics` would be resolved by the upstream client to the orders service's own
    /metrics; the gateway refuses such paths instead of forwarding them. (Sent on a raw socket:
    HTTP clients resolve dot segments before sending.)"""
    for path in ("/orders/../metrics", "/stores/./../health/live", "/stock/%2E%2E/metrics"):
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.ports["gateway"])
        writer.write(f"GET {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
        writer.close()
        status_line = answer.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 404"), (path, answer[:300])
        assert b"http_requests_total" not in answer


async def test_answers_carry_one_date_and_one_server_header(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as client:
        response = await client.get(f"/orders/{uuid.uuid4()}")
    assert response.status_code == 404
    assert len(response.headers.get_list("date")) == 1
    assert len(response.headers.get_list("server")) <= 1
