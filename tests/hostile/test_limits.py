"""Sizes and slowness of a request head (API.md §4), in every process a client can reach:
request headers over 16 KiB in all are 431, a request target over 8 KiB is 414 (both refused
while the head arrives, never buffered whole), and a client that has not sent its whole head
within 10 s is disconnected. Each refusal is problem+json with a request id."""

import asyncio
import time

import pytest

from tests.helpers import create_order, put_stock, random_sku, random_store, wait_for_status
from tests.hostile.raw import exchange, request
from tooling.stack import Stack

pytestmark = pytest.mark.hostile

SERVICES = ["gateway", "orders", "stock"]
KiB = 1024


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("size", [17 * KiB, 20 * KiB, 140_000, 4 * 1024 * KiB],
                         ids=["17KiB", "20KiB", "140kB", "4MiB"])
async def test_one_header_over_16_kib_is_431(hostile_stack: Stack, service: str, size: int) -> None:
    answer = await exchange(hostile_stack.ports[service],
                            request("GET", "/health/live", {"X-Filler": "a" * size}))
    answer.problem(431)


@pytest.mark.parametrize("service", SERVICES)
async def test_many_headers_over_16_kib_in_all_are_431(hostile_stack: Stack, service: str) -> None:
    headers = {f"X-H{i}": "v" * 100 for i in range(200)}
    answer = await exchange(hostile_stack.ports[service], request("GET", "/health/live", headers))
    answer.problem(431)


@pytest.mark.parametrize("service", SERVICES)
async def test_headers_under_16_kib_are_served(hostile_stack: Stack, service: str) -> None:
    answer = await exchange(hostile_stack.ports[service],
                            request("GET", "/health/live", {"X-Filler": "a" * (15 * KiB)}))
    assert answer.status == 200, answer.body[:300]


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("where", ["query", "path"])
async def test_a_target_over_8_kib_is_414(hostile_stack: Stack, service: str, where: str) -> None:
    target = "/orders?customer_id=" + "c" * 9 * KiB if where == "query" else "/orders/" + "x" * 9 * KiB
    answer = await exchange(hostile_stack.ports[service], request("GET", target))
    answer.problem(414)


async def test_a_target_under_8_kib_is_not_414(hostile_stack: Stack) -> None:
    answer = await exchange(hostile_stack.ports["gateway"],
                            request("GET", "/orders?customer_id=" + "c" * 7 * KiB))
    answer.problem(422)  # too long a customer id: the service's own verdict


async def test_the_140_kb_request_id_of_the_outage_is_431_and_orders_go_on(hostile_stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    body = b'{"customer_id": "c-1", "store_id": "%s", "items": [{"sku": "%s", "quantity": 1}]}' % (
        store.encode(), sku.encode())
    answer = await exchange(hostile_stack.ports["gateway"], request(
        "POST", "/orders", {"Content-Type": "application/json", "X-Request-ID": "x" * 140_000}, body))
    answer.problem(431)
    async with hostile_stack.client() as client:
        await put_stock(client, hostile_stack.admin, store, sku, 1)
        order = await create_order(client, store, [(sku, 1)])
        assert order.status_code == 202, order.text
        assert (await wait_for_status(client, order.json()["order_id"], {"reserved"}))["status"] == "reserved"


async def _closed_after(port: int, send: bytes, trickle: bool) -> float:
    """Seconds until the server closes a connection that sent `send` and, if `trickle`, one more
    header byte every second (a slowloris never finishing its head)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(send)
        await writer.drain()
        while time.monotonic() - started < 30:
            try:
                data = await asyncio.wait_for(reader.read(4096), timeout=1)
            except TimeoutError:
                if trickle:
                    writer.write(b"a")
                    await writer.drain()
                continue
            if not data:
                return time.monotonic() - started
        raise AssertionError("the connection is still open after 30 s")
    except ConnectionResetError:
        return time.monotonic() - started
    finally:
        writer.close()


@pytest.mark.parametrize("service", SERVICES)
async def test_a_client_that_does_not_finish_its_headers_is_cut_after_10_s(
    hostile_stack: Stack, service: str
) -> None:
    port = hostile_stack.ports[service]
    closed = await asyncio.gather(
        _closed_after(port, b"", trickle=False),  # connects and says nothing
        _closed_after(port, b"GET /health/live HTTP/1.1\r\nHost: x\r\n", trickle=False),
        _closed_after(port, b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ", trickle=True),
    )
    assert all(9 <= seconds <= 13 for seconds in closed), closed
