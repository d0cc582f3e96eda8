"""Several-store split orders racing on little stock, decided by 3 worker processes: orders
list the same 3 stores in different orders (their lock needs cross), most may split. No store
is oversold at any point of its ledger, the held units are exactly the reserved orders'
allocations, every order is all-or-none, and PostgreSQL sees no deadlock. And a split order
asked about again (the reconciler) gets the same allocations again."""

import asyncio
import random
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest

from shared.events import Line, PedidoCriado
from tests.helpers import (
    put_stock,
    random_sku,
    random_store,
    wait_for_status,
)
from tests.integration.test_workers import deadlocks, worker_logs_mentioning
from tooling.invariants import check_stock_invariants
from tooling.stack import Stack

ORDERS = 400


async def test_split_orders_over_three_stores_never_oversell_or_deadlock(stack: Stack) -> None:
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    stores = [random_store() for _ in range(3)]
    skus = [random_sku(f"M{i}") for i in range(6)]
    # Little stock: about 400 orders x 2 lines x 2 units = 1,600 units asked of ~6 x 3 x 12.
    on_hand = {(s, sku): rng.randint(0, 20) for s in stores for sku in skus if rng.random() < 0.9}
    bodies = []
    for i in range(ORDERS):
        chosen = rng.sample(skus, rng.randint(1, 3))
        bodies.append({"customer_id": f"c-{i}", "stores": rng.sample(stores, rng.randint(2, 3)),
                       "split": rng.random() < 0.8,
                       "items": [{"sku": sku, "quantity": rng.randint(1, 4)} for sku in chosen]})
    context = f"seed={seed}"

    conn = await stack.stock_db()
    try:
        deadlocks_before = await deadlocks(conn)
        async with stack.client() as client:
            await asyncio.gather(*(put_stock(client, stack.admin, s, sku, n) for (s, sku), n in on_hand.items()))
            gate = asyncio.Semaphore(100)

            async def submit(body: dict[str, Any]) -> httpx.Response:
                async with gate:
                    return await client.post("/orders", json=body)

            responses = await asyncio.gather(*(submit(b) for b in bodies))
            assert [r.status_code for r in responses] == [202] * ORDERS, context

            async def settled(order_id: str) -> dict[str, Any]:
                async with gate:
                    return await wait_for_status(client, order_id, {"reserved", "rejected"}, timeout=90)

            final = await asyncio.gather(*(settled(r.json()["order_id"]) for r in responses))

        reserved = [o for o in final if o["status"] == "reserved"]
        rejected = [o for o in final if o["status"] == "rejected"]
        context += f" reserved={len(reserved)} rejected={len(rejected)}"
        assert reserved and rejected, context
        assert any(len({a["store_id"] for a in o["allocations"]}) > 1 for o in reserved), \
            f"no order was split; {context}"

        # 1. No deadlock, in the workers' logs or PostgreSQL's counter.
        assert worker_logs_mentioning(stack, "deadlock") == {}, context
        assert await deadlocks(conn) == deadlocks_before, context

        # 2. No store oversold at any point of its ledger: every movement carries the figures
        # after it.
        broken = await conn.fetch(
            "SELECT store_id, sku, version, on_hand, reserved FROM movement "
            "WHERE store_id = ANY($1::text[]) AND NOT (0 <= reserved AND reserved <= on_hand)", stores)
        assert broken == [], context
        figures = await check_stock_invariants(conn)  # replays, gap-free, holds = reserved

        # 3. Held units are exactly the reserved orders' allocations; each reserved order is
        # allocated every line exactly, within its candidate stores.
        allocated: Counter[tuple[str, str]] = Counter()
        for order, body in zip(final, bodies, strict=True):
            if order["status"] != "reserved":
                assert order["allocations"] == [], order
                continue
            per_line: Counter[str] = Counter()
            for a in order["allocations"]:
                assert a["store_id"] in body["stores"], (order, context)
                allocated[(a["store_id"], a["sku"])] += a["quantity"]
                per_line[a["sku"]] += a["quantity"]
            assert per_line == {line["sku"]: line["quantity"] for line in body["items"]}, order
            if not body["split"]:
                assert len({a["store_id"] for a in order["allocations"]}) == 1, order
        for key, seeded in on_hand.items():
            assert figures[key]["reserved"] == allocated[key], (key, context)
            assert figures[key]["on_hand"] == seeded, (key, context)
        holds = Counter({(r["store_id"], r["sku"]): r["n"] for r in await conn.fetch(
            "SELECT store_id, sku, sum(quantity) AS n FROM hold WHERE order_id = ANY($1::uuid[]) "
            "GROUP BY 1, 2", [o["order_id"] for o in reserved])})
        assert holds == allocated, context

        # 4. A refusal holds nothing and its reason fits what the stores had left at the end
        # (stock only went down): a line reported short is still short across the candidates.
        for order, body in zip(final, bodies, strict=True):
            if order["status"] != "rejected":
                continue
            assert order["reason"] in {"insufficient_stock", "no_single_store", "unknown_sku"}, order
            if order["reason"] == "no_single_store":
                assert not body["split"] and order["unavailable"] == [], order
            for short in order["unavailable"]:
                left = sum(figures[(s, short["sku"])]["on_hand"] - figures[(s, short["sku"])]["reserved"]
                           for s in body["stores"] if (s, short["sku"]) in figures)
                assert left <= short["available"] < short["requested"], (order, left, context)
    finally:
        await conn.close()


@pytest.mark.parametrize("answer_kept", [True, False])
async def test_a_split_order_asked_again_gets_its_allocations_again(stack: Stack, answer_kept: bool) -> None:
    """The reconciler's re-ask (a new PedidoCriado for an attempt stock already decided) answers
    the same decision, allocations included, whether stock kept its last answer or rebuilds it
    from the hold (an order answered before answers were kept)."""
    s1, s2, sku = random_store(), random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, s1, sku, 2)
        await put_stock(client, stack.admin, s2, sku, 2)
        body = {"customer_id": "c-again", "stores": [s1, s2], "split": True,
                "items": [{"sku": sku, "quantity": 3}]}
        created = await client.post("/orders", json=body)
        assert created.status_code == 202, created.text
        order = await wait_for_status(client, created.json()["order_id"], {"reserved"})
        allocations = order["allocations"]
        assert len(allocations) == 2, order

        # As if the answer had been lost: the order is pending again, and asked about again.
        order_id = uuid.UUID(order["order_id"])
        orders_db, stock_db = await stack.orders_db(), await stack.stock_db()
        try:
            await orders_db.execute(
                "UPDATE orders SET status = 'pending', allocations = '[]', reserved_until = NULL "
                "WHERE order_id = $1", order_id)
            if not answer_kept:
                await stock_db.execute("DELETE FROM stock_answer WHERE order_id = $1", order_id)
            again = PedidoCriado(order_id=order_id, attempt=1, customer_id="c-again", stores=[s1, s2],
                                 split=True, items=[Line(sku=sku, quantity=3)])
            await stack.publish_raw(again.model_dump_json().encode(), "PedidoCriado", str(again.event_id),
                                    correlation_id=str(order_id))
            answered = await wait_for_status(client, order["order_id"], {"reserved"})
            assert answered["allocations"] == allocations, answered
            # Nothing was held twice.
            assert await stock_db.fetchval("SELECT sum(quantity) FROM hold WHERE order_id = $1", order_id) == 3
            await check_stock_invariants(stock_db)
        finally:
            await orders_db.close()
            await stock_db.close()
