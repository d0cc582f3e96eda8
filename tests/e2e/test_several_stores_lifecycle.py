"""The life of a split order's hold (API.md §2, §3), through the gateway with 3-second holds:
confirm sells in every store it holds units in, cancel and expiry let go in every store, and a
re-reserve decides again from the current stock. Each store's ledger shows its own movements."""

from datetime import UTC, datetime
from typing import Any

import httpx

from tests.e2e.test_stock_ledger import feed_of, stock_event
from tests.helpers import (
    eventually,
    put_stock,
    random_sku,
    random_store,
    wait_for_status,
)
from tooling.invariants import check_stock_invariants
from tooling.stack import Stack


def alloc(store: str, sku: str, quantity: int) -> dict[str, Any]:
    return {"store_id": store, "sku": sku, "quantity": quantity}


def seconds_left(order: dict[str, Any]) -> float:
    return (datetime.fromisoformat(order["reserved_until"]) - datetime.now(UTC)).total_seconds()


async def item(client: httpx.AsyncClient, store: str, sku: str) -> tuple[int, int]:
    body = (await client.get(f"/stores/{store}/stock/{sku}")).json()
    return body["on_hand"], body["reserved"]


async def kinds(client: httpx.AsyncClient, store: str, sku: str, order_id: str) -> list[tuple[str, int, int]]:
    ledger = (await client.get(f"/stores/{store}/stock/{sku}/movements", params={"limit": 100})).json()
    return [(m["kind"], m["on_hand_delta"], m["reserved_delta"])
            for m in ledger["items"] if m["order_id"] == order_id]


class Split:
    """Two stores, one sku: 2 units in S1, 2 in S2; the order asks 3, so it is split 2 + 1."""

    def __init__(self) -> None:
        self.s1, self.s2, self.sku = random_store(), random_store(), random_sku()
        self.expected = [alloc(self.s1, self.sku, 2), alloc(self.s2, self.sku, 1)]
        self.expected.sort(key=lambda a: (a["store_id"], a["sku"]))

    async def seed(self, client: httpx.AsyncClient, stack: Stack) -> None:
        await put_stock(client, stack.admin, self.s1, self.sku, 2)
        await put_stock(client, stack.admin, self.s2, self.sku, 2)

    async def reserved_order(self, client: httpx.AsyncClient, min_left: float = 1.5) -> dict[str, Any]:
        """Held with at least `min_left` of its 3 s to go (a late one is cancelled, and retried)."""
        for _ in range(5):
            response = await client.post("/orders", json={
                "customer_id": "c-split", "stores": [self.s1, self.s2], "split": True,
                "items": [{"sku": self.sku, "quantity": 3}]})
            assert response.status_code == 202, response.text
            order = await wait_for_status(client, response.json()["order_id"], {"reserved", "rejected"})
            assert order["status"] == "reserved", order
            assert order["allocations"] == self.expected, order
            if seconds_left(order) >= min_left:
                return order
            assert (await client.post(f"/orders/{order['order_id']}/cancel")).status_code == 202
            await wait_for_status(client, order["order_id"], {"cancelled"})
        raise AssertionError("no split order was held with enough time left")


async def invariants(stack: Stack) -> None:
    conn = await stack.stock_db()
    try:
        await check_stock_invariants(conn)
    finally:
        await conn.close()


async def test_confirm_sells_in_every_store_and_keeps_the_allocations(short_stack: Stack) -> None:
    split = Split()
    async with short_stack.client() as client:
        await split.seed(client, short_stack)
        order = await split.reserved_order(client)
        confirming = await client.post(f"/orders/{order['order_id']}/confirm")
        assert confirming.status_code == 202, confirming.text
        assert (confirming.json()["status"], confirming.json()["allocations"]) == ("confirming", split.expected)
        done = await wait_for_status(client, order["order_id"], {"confirmed", "expired"})
        assert (done["status"], done["allocations"]) == ("confirmed", split.expected), done
        assert await item(client, split.s1, split.sku) == (0, 0)
        assert await item(client, split.s2, split.sku) == (1, 0)
        assert await kinds(client, split.s1, split.sku, order["order_id"]) == [("reserved", 0, 2), ("sold", -2, -2)]
        assert await kinds(client, split.s2, split.sku, order["order_id"]) == [("reserved", 0, 1), ("sold", -1, -1)]
        # Each store's live feed, replayed from its start, shows its own changes and only those.
        for store, expected in ((split.s1, [("created", 2, 0), ("reserved", 2, 2), ("sold", 0, 0)]),
                                (split.s2, [("created", 2, 0), ("reserved", 2, 1), ("sold", 1, 0)])):
            async with feed_of(client, store, last_event_id="0") as feed:
                events = [stock_event(await feed.next(), store) for _ in expected]
            assert [(e["kind"], e["on_hand"], e["reserved"]) for e in events] == expected, store
            assert {e["sku"] for e in events} == {split.sku}
    await invariants(short_stack)


async def test_cancel_releases_in_every_store(short_stack: Stack) -> None:
    split = Split()
    async with short_stack.client() as client:
        await split.seed(client, short_stack)
        order = await split.reserved_order(client)
        cancelled = await client.post(f"/orders/{order['order_id']}/cancel")
        assert cancelled.status_code == 202
        assert (cancelled.json()["status"], cancelled.json()["allocations"]) == ("cancelled", [])

        async def released() -> None:
            assert await item(client, split.s1, split.sku) == (2, 0)
            assert await item(client, split.s2, split.sku) == (2, 0)

        await eventually(released, timeout=30)
        assert await kinds(client, split.s1, split.sku, order["order_id"]) == [("reserved", 0, 2), ("released", 0, -2)]
        assert await kinds(client, split.s2, split.sku, order["order_id"]) == [("reserved", 0, 1), ("released", 0, -1)]
    await invariants(short_stack)


async def test_expiry_lets_go_in_every_store_and_a_re_reserve_decides_again(short_stack: Stack) -> None:
    split = Split()
    async with short_stack.client() as client:
        await split.seed(client, short_stack)
        order = await split.reserved_order(client, min_left=0)
        expired = await wait_for_status(client, order["order_id"], {"expired"}, timeout=30)
        assert (expired["reason"], expired["allocations"]) == ("reservation_expired", [])
        assert await item(client, split.s1, split.sku) == (2, 0)
        assert await item(client, split.s2, split.sku) == (2, 0)
        assert await kinds(client, split.s1, split.sku, order["order_id"]) == [("reserved", 0, 2), ("expired", 0, -2)]
        assert await kinds(client, split.s2, split.sku, order["order_id"]) == [("reserved", 0, 1), ("expired", 0, -1)]

        # Meanwhile S2 got enough to hold the whole order alone: the new attempt is not split.
        restock = await client.post(f"/stores/{split.s2}/stock/{split.sku}/restock",
                                    json={"quantity": 1}, headers=short_stack.admin)
        assert restock.status_code == 200, restock.text
        again = await client.post(f"/orders/{order['order_id']}/reserve")
        assert again.status_code == 202, again.text
        assert (again.json()["status"], again.json()["allocations"]) == ("pending", [])
        held = await wait_for_status(client, order["order_id"], {"reserved", "rejected"})
        # S1 (first in the list) cannot hold 3, S2 can: the first store that holds it all wins.
        assert (held["status"], held["allocations"]) == ("reserved", [alloc(split.s2, split.sku, 3)]), held
        assert await item(client, split.s2, split.sku) == (3, 3)
    await invariants(short_stack)
