"""Capacity (API.md §1, §4): while thousands of connections are held open — idle, half-sent,
long-polling or streaming events — each cap answers 503 problem+json with Retry-After, the idle
and half-sent ones are cut after 10 s, and a well-behaved client's orders are decided meanwhile
and afterwards. The stack's caps are set just above what the test holds, so it can reach them."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httpx
import pytest

from tests.helpers import (
    create_order,
    eventually,
    random_sku,
    random_store,
    wait_for_status,
)
from tests.hostile.raw import Answer, exchange, parse, request
from tooling.stack import Stack

pytestmark = pytest.mark.hostile

IDLE, HALF_SENT, LONG_POLLS, STREAMS = 2000, 1000, 1000, 200
CAPS = {"MAX_CONNECTIONS": "4400", "MAX_LONG_POLLS": str(LONG_POLLS), "MAX_FEED_STREAMS": str(STREAMS),
        # 1,000 long-polls arriving at once each read their order first: with the default pool
        # of 10 on a busy CI machine, some wait over the acquire timeout and are (rightly) shed
        # with 503, which would leave the long-poll cap unreached.
        "DB_POOL_SIZE": "30"}
BATCH = 200  # connections opened at once: below the listen backlog

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(scope="module")
def capped_stack(infrastructure: None) -> Iterator[Stack]:
    running = Stack(f"c{uuid.uuid4().hex[:8]}", workers=2, env_overrides=CAPS).start()
    yield running
    running.stop()


async def _open(port: int, count: int, first_bytes: bytes = b"") -> list[Connection]:
    opened: list[Connection] = []
    for start in range(0, count, BATCH):
        batch = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port)
                                       for _ in range(min(BATCH, count - start))))
        for _, writer in batch:
            if first_bytes:
                writer.write(first_bytes)
        opened += batch
    return opened


async def _pending_orders(stack: Stack, count: int) -> list[str]:
    """Orders that stay `pending` for the test's time: written as orders would write them, but
    with no PedidoCriado (the reconciler asks about them only minutes later)."""
    conn = await stack.orders_db()
    try:
        rows = await conn.fetch(
            "INSERT INTO orders (order_id, customer_id, store_id, items, status) "
            "SELECT gen_random_uuid(), 'held', 'S-held', '[{\"sku\": \"A\", \"quantity\": 1}]', 'pending' "
            "FROM generate_series(1, $1) RETURNING order_id::text", count)
    finally:
        await conn.close()
    return [r["order_id"] for r in rows]


async def _refused(port: int, target: str, cap: str) -> Answer:
    """One more request on a new connection, expected to be refused by the cap named `cap` (an
    answer that is not that refusal, such as an event stream that starts, fails the check)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request("GET", target))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        assert parse(head).status == 503, (target, head[:200])
        answer = parse(head + await asyncio.wait_for(reader.read(), timeout=10))
    finally:
        writer.close()
    problem = answer.problem(503)
    assert answer.header(b"retry-after"), answer.headers
    assert cap in str(problem["detail"]), problem
    return answer


async def _hold(port: int, target: str, held: list[Connection]) -> None:
    """Keeps one request open: sent again whenever it is answered early (on a machine this busy,
    a burst may be shed with 503 by the database pool's acquire timeout), until cancelled. An
    event stream counts as held once its answer started with 200."""
    while True:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        held.append((reader, writer))
        writer.write(request("GET", target))
        head = await reader.readuntil(b"\r\n\r\n")
        if parse(head).status == 200 and target.endswith("/events"):
            await reader.read()  # streams until the test ends it
        writer.close()
        await asyncio.sleep(0.2)


@pytest.fixture
async def well_behaved(capped_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose pooled connections were opened before the flood (and are kept)."""
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=120)
    async with httpx.AsyncClient(base_url=capped_stack.url, timeout=30, limits=limits) as client:
        await asyncio.gather(*(client.get("/health/live") for _ in range(10)))
        yield client


async def _polite(call: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
    """A well-behaved client: a 503 is retried after its Retry-After, within a deadline."""
    deadline = time.monotonic() + 30
    while (response := await call()).status_code == 503 and time.monotonic() < deadline:
        await asyncio.sleep(float(response.headers.get("retry-after", "1")))
    return response


async def _decided(client: httpx.AsyncClient, stack: Stack, count: int, long_poll: bool) -> None:
    """`count` orders placed and each reserved; polled with plain GETs while long-polls are full."""
    store, sku = random_store(), random_sku()
    stocked = await _polite(lambda: client.put(f"/stores/{store}/stock/{sku}", json={"on_hand": count},
                                               headers=stack.admin))
    assert stocked.status_code == 201, stocked.text
    created = [await _polite(lambda: create_order(client, store, [(sku, 1)])) for _ in range(count)]
    assert all(r.status_code == 202 for r in created), [r.text for r in created]
    for response in created:
        order_id = response.json()["order_id"]
        if long_poll:
            await wait_for_status(client, order_id, {"reserved"})
            continue

        async def reserved(order_id: str = order_id) -> None:
            polled = await _polite(lambda: client.get(f"/orders/{order_id}"))
            assert polled.status_code == 200 and polled.json()["status"] == "reserved", polled.text

        await eventually(reserved, timeout=30, interval=0.2)


async def test_held_connections_hit_their_caps_and_others_are_still_served(
    capped_stack: Stack, well_behaved: httpx.AsyncClient
) -> None:
    port = capped_stack.ports["gateway"]
    held: list[Connection] = []
    holders: list[asyncio.Task[None]] = []
    try:
        order_ids = await _pending_orders(capped_stack, LONG_POLLS)
        store = random_store()
        holders += [asyncio.create_task(_hold(port, f"/orders/{order_id}?wait=30", held))
                    for order_id in order_ids]
        holders += [asyncio.create_task(_hold(port, f"/stores/{store}/stock/events", held))
                    for _ in range(STREAMS)]

        async def long_polls_full() -> None:
            await _refused(port, f"/orders/{order_ids[0]}?wait=1", "long-polls")

        async def streams_full() -> None:
            await _refused(port, f"/stores/{store}/stock/events", "event streams")

        await eventually(long_polls_full, timeout=60, interval=0.5)
        await eventually(streams_full, timeout=60, interval=0.5)

        opened_idle = time.monotonic()
        idle = await _open(port, IDLE) + await _open(port, HALF_SENT, b"GET /orders HTTP/1.1\r\nHost: x\r\n")
        held += idle

        async def connections_full() -> None:
            held.extend(await _open(port, 100))
            await _refused(port, "/health/live", "connections")

        await eventually(connections_full, timeout=30, interval=0)
        await _decided(well_behaved, capped_stack, 5, long_poll=False)  # meanwhile
        # The idle and half-sent ones are cut by the server 10 s after they connected.
        closed = await asyncio.gather(*(asyncio.wait_for(reader.read(), timeout=30) for reader, _ in idle))
        assert all(data == b"" for data in closed)
        assert time.monotonic() - opened_idle < 30
    finally:
        for holder in holders:
            holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
        for _, writer in held:
            writer.close()

    async def served_again() -> None:
        answer = await exchange(port, request("GET", "/health/live"))
        assert answer.status == 200, answer.status

    await eventually(served_again, timeout=30, interval=0.5)
    async with capped_stack.client() as fresh:  # new connections, long-polls again
        await _decided(fresh, capped_stack, 5, long_poll=True)
