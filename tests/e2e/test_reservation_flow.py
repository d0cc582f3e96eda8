"""The heart of the system through the gateway: order -> hold -> answer, under contention."""

import asyncio

from tests.helpers import (
    create_order,
    put_stock,
    random_sku,
    random_store,
    wait_for_status,
)
from tooling.invariants import check_stock_invariants
from tooling.stack import Stack


async def test_order_is_reserved_and_stock_held(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
        response = await create_order(client, store, [(sku, 3)])
        assert response.status_code == 202
        order = response.json()
        assert order["status"] == "pending"
        assert response.headers["location"] == f"/orders/{order['order_id']}"
        reserved = await wait_for_status(client, order["order_id"], {"reserved", "rejected"})
        assert reserved["status"] == "reserved"
        assert reserved["reserved_until"] is not None
        item = (await client.get(f"/stores/{store}/stock/{sku}")).json()
        assert (item["on_hand"], item["reserved"], item["available"]) == (10, 3, 7)


async def test_order_rejected_names_every_short_line(stack: Stack) -> None:
    store, a, b, c = random_store(), random_sku(), random_sku(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, a, 5)
        await put_stock(client, stack.admin, store, b, 1)
        order = (await create_order(client, store, [(a, 2), (b, 2)])).json()
        rejected = await wait_for_status(client, order["order_id"], {"reserved", "rejected"})
        assert rejected["status"] == "rejected"
        assert rejected["reason"] == "insufficient_stock"
        assert rejected["unavailable"] == [{"sku": b, "requested": 2, "available": 1}]
        unknown = (await create_order(client, store, [(a, 1), (c, 1)])).json()
        rejected = await wait_for_status(client, unknown["order_id"], {"reserved", "rejected"})
        assert rejected["reason"] == "unknown_sku"
        assert rejected["unavailable"] == [{"sku": c, "requested": 1, "available": 0}]
        item = (await client.get(f"/stores/{store}/stock/{a}")).json()
        assert item["reserved"] == 0, "all lines or none: nothing may stay held"


async def test_last_item_race_through_the_gateway(stack: Stack) -> None:
    """Stock 10, 300 concurrent single-unit orders: exactly 10 reserved, the rest rejected."""
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
        responses = await asyncio.gather(
            *(create_order(client, store, [(sku, 1)], customer=f"c-{i}") for i in range(300)))
        assert all(r.status_code == 202 for r in responses)
        ids = [r.json()["order_id"] for r in responses]
        final = await asyncio.gather(
            *(wait_for_status(client, i, {"reserved", "rejected"}, timeout=60) for i in ids))
        statuses = [o["status"] for o in final]
        assert statuses.count("reserved") == 10
        assert statuses.count("rejected") == 290
        item = (await client.get(f"/stores/{store}/stock/{sku}")).json()
        assert (item["on_hand"], item["reserved"], item["available"]) == (10, 10, 0)
    conn = await stack.stock_db()
    try:
        await check_stock_invariants(conn)
    finally:
        await conn.close()
