"""Every process is observable (API.md §5): health and metrics on every process, stock workers
included (STOCK_WORKER_PORT + i), and the metric families count what really happened."""

import asyncio
import uuid
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.messaging import STOCK_ORDERS
from tests.helpers import (
    create_order,
    eventually,
    put_stock,
    random_sku,
    random_store,
    wait_for_status,
)
from tooling.stack import Stack

WORKERS = 2
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def observed(infrastructure: None) -> Iterator[Stack]:
    running = Stack(f"o{uuid.uuid4().hex[:8]}", workers=WORKERS).start()
    yield running
    running.stop()


def process_urls(stack: Stack) -> dict[str, str]:
    urls = {name: f"http://127.0.0.1:{port}" for name, port in stack.ports.items()}
    urls |= {f"worker-{i}": stack.worker_url(i) for i in range(WORKERS)}
    return urls


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{url}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def workers_total(stack: Stack, name: str, **labels: str) -> float:
    scraped = await asyncio.gather(*(scrape(stack.worker_url(i)) for i in range(WORKERS)))
    return sum(total(samples, name, **labels) for samples in scraped)


async def test_every_process_serves_health_and_metrics(observed: Stack) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        for name, url in process_urls(observed).items():
            assert (await client.get(f"{url}/health/live")).status_code == 200, name
            ready = await client.get(f"{url}/health/ready")
            assert ready.status_code == 200, (name, ready.text)
            assert ready.json()["status"] == "ready"
    worker = await scrape(observed.worker_url(0))
    names = {n for n, _ in worker}
    assert {"outbox_backlog", "outbox_oldest_seconds", "dead_letter_messages",
            "reservation_decision_seconds_count", "process_cpu_seconds_total",
            "holds_overdue_seconds"} <= names
    assert "http_requests_total" not in names and "orders_status_total" not in names
    stock_api = {n for n, _ in await scrape(process_urls(observed)["stock"])}
    assert "holds_total" not in stock_api, "holds are decided and counted in the workers"
    orders = {n for n, _ in await scrape(process_urls(observed)["orders"])}
    assert {"orders_pending_oldest_seconds", "outbox_backlog", "dead_letter_messages"} <= orders


async def test_a_flash_sale_is_counted_where_it_happens(observed: Stack) -> None:
    """Stock 10, 30 orders for one unit: 10 held, 20 rejected, each counted exactly once."""
    store, sku = random_store(), random_sku()
    before = {
        "held": await workers_total(observed, "holds_total", outcome="held"),
        "rejected": await workers_total(observed, "holds_total", outcome="rejected"),
        "decisions": await workers_total(observed, "reservation_decision_seconds_count"),
        "consumed": await workers_total(observed, "messages_consumed_total", queue=STOCK_ORDERS,
                                        type="PedidoCriado", outcome="acked"),
    }
    orders_url = process_urls(observed)["orders"]
    orders_before = await scrape(orders_url)
    async with observed.client() as client:
        await put_stock(client, observed.admin, store, sku, 10)
        placed = await asyncio.gather(*(create_order(client, store, [(sku, 1)], customer=f"c-{i}")
                                        for i in range(30)))
        await asyncio.gather(*(wait_for_status(client, r.json()["order_id"], {"reserved", "rejected"})
                               for r in placed))

    async def counted() -> None:
        assert await workers_total(observed, "holds_total", outcome="held") - before["held"] == 10
        assert await workers_total(observed, "holds_total", outcome="rejected") - before["rejected"] == 20
        assert await workers_total(observed, "reservation_decision_seconds_count") - before["decisions"] == 30
        consumed = await workers_total(observed, "messages_consumed_total", queue=STOCK_ORDERS,
                                       type="PedidoCriado", outcome="acked")
        assert consumed - before["consumed"] == 30
        after = await scrape(orders_url)
        for status, n in (("pending", 30), ("reserved", 10), ("rejected", 20)):
            grown = (total(after, "orders_status_total", status=status)
                     - total(orders_before, "orders_status_total", status=status))
            assert grown == n, status
        answers = (total(after, "messages_consumed_total", queue="orders.status", outcome="acked")
                   - total(orders_before, "messages_consumed_total", queue="orders.status", outcome="acked"))
        assert answers == 30
        routes = {dict(ls).get("route") for n, ls in after if n == "http_request_duration_seconds_count"}
        assert "/orders" in routes
        assert all("method" not in dict(ls) for n, ls in after
                   if n.startswith("http_request_duration_seconds")), "labels: service, route"

    await eventually(counted, timeout=20)


async def test_a_poison_message_shows_in_the_dead_letter_depth(observed: Stack) -> None:
    queue = f"{STOCK_ORDERS}.dlq"
    before = await workers_total(observed, "messages_consumed_total", queue=STOCK_ORDERS,
                                 outcome="dead_lettered")
    depth_before = (await scrape(observed.worker_url(0)))[("dead_letter_messages",
                                                          frozenset({("queue", queue)}))]
    await observed.publish_raw(b"{not json", "PedidoCriado", str(uuid.uuid4()))

    async def dead_lettered() -> None:
        assert await workers_total(observed, "messages_consumed_total", queue=STOCK_ORDERS,
                                   outcome="dead_lettered") - before == 1
        for i in range(WORKERS):
            samples = await scrape(observed.worker_url(i))
            assert samples[("dead_letter_messages", frozenset({("queue", queue)}))] == depth_before + 1

    await eventually(dead_lettered, timeout=20, interval=1.1)  # gauges refresh once a second
