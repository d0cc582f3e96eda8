"""Several candidate stores per order (API.md §2), through the gateway: the first store that
holds every line wins, else split in list order, else a refusal whose reason and figures are
summed over the candidate stores; and the 422s of `stores` / `split`."""

import uuid
from typing import Any

import httpx
import pytest

from tests.helpers import (
    assert_invalid,
    put_stock,
    random_sku,
    random_store,
    wait_for_status,
)
from tooling.invariants import check_stock_invariants
from tooling.stack import Stack


async def place(client: httpx.AsyncClient, stores: list[str], items: list[tuple[str, int]],
                split: bool | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"customer_id": "c-multi", "stores": stores,
                            "items": [{"sku": sku, "quantity": q} for sku, q in items]}
    if split is not None:
        body["split"] = split
    response = await client.post("/orders", json=body)
    assert response.status_code == 202, response.text
    order = response.json()
    assert (order["store_id"], order["stores"], order["split"], order["allocations"]) == (
        None, stores, bool(split), [])
    return await wait_for_status(client, order["order_id"], {"reserved", "rejected"})


async def seed(client: httpx.AsyncClient, stack: Stack, stock: dict[str, dict[str, int]]) -> None:
    for store, items in stock.items():
        for sku, n in items.items():
            await put_stock(client, stack.admin, store, sku, n)


async def reserved_of(client: httpx.AsyncClient, store: str, sku: str) -> int:
    response = await client.get(f"/stores/{store}/stock/{sku}")
    assert response.status_code == 200, response.text
    return response.json()["reserved"]


def alloc(store: str, sku: str, quantity: int) -> dict[str, Any]:
    return {"store_id": store, "sku": sku, "quantity": quantity}


async def invariants(stack: Stack) -> None:
    conn = await stack.stock_db()
    try:
        await check_stock_invariants(conn)
    finally:
        await conn.close()


async def test_the_first_store_that_holds_every_line_holds_the_whole_order(stack: Stack) -> None:
    s1, s2, s3 = random_store(), random_store(), random_store()
    a, b = random_sku(), random_sku()
    async with stack.client() as client:
        # S1 lacks b; S2 and S3 could both hold it all: S2 comes first in the list.
        await seed(client, stack, {s1: {a: 9}, s2: {a: 2, b: 1}, s3: {a: 9, b: 9}})
        order = await place(client, [s1, s2, s3], [(a, 2), (b, 1)])
        assert order["status"] == "reserved", order
        assert order["allocations"] == sorted([alloc(s2, a, 2), alloc(s2, b, 1)],
                                              key=lambda x: (x["store_id"], x["sku"]))
        assert (order["store_id"], order["stores"], order["split"]) == (None, [s1, s2, s3], False)
        assert [await reserved_of(client, s, a) for s in (s1, s2, s3)] == [0, 2, 0]
        assert await reserved_of(client, s3, b) == 0
    await invariants(stack)


async def test_split_takes_each_line_from_the_stores_in_list_order(stack: Stack) -> None:
    s1, s2, s3 = random_store(), random_store(), random_store()
    a, b = random_sku(), random_sku()
    async with stack.client() as client:
        # No store holds both lines; S3 alone could cover a, yet list order takes S1 and S2 first.
        await seed(client, stack, {s1: {a: 2}, s2: {a: 1, b: 4}, s3: {a: 5, b: 2}})
        order = await place(client, [s1, s2, s3], [(a, 4), (b, 3)], split=True)
        assert order["status"] == "reserved", order
        expected = [alloc(s1, a, 2), alloc(s2, a, 1), alloc(s2, b, 3), alloc(s3, a, 1)]
        assert order["allocations"] == sorted(expected, key=lambda x: (x["store_id"], x["sku"]))
        assert [await reserved_of(client, s, a) for s in (s1, s2, s3)] == [2, 1, 1]
        assert [await reserved_of(client, s, b) for s in (s2, s3)] == [3, 0]
        # Each store's ledger shows its own movement for the order.
        for store, sku, quantity in [(s1, a, 2), (s2, a, 1), (s2, b, 3), (s3, a, 1)]:
            ledger = (await client.get(f"/stores/{store}/stock/{sku}/movements")).json()["items"]
            mine = [(m["kind"], m["reserved_delta"]) for m in ledger if m["order_id"] == order["order_id"]]
            assert mine == [("reserved", quantity)], (store, sku, ledger)
    await invariants(stack)


async def test_without_split_stores_that_only_together_could_hold_it_refuse_no_single_store(
    stack: Stack,
) -> None:
    s1, s2 = random_store(), random_store()
    a, b = random_sku(), random_sku()
    async with stack.client() as client:
        await seed(client, stack, {s1: {a: 2, b: 0}, s2: {a: 0, b: 2}})
        order = await place(client, [s1, s2], [(a, 2), (b, 2)])
        assert (order["status"], order["reason"], order["unavailable"], order["allocations"]) == (
            "rejected", "no_single_store", [], [])
        assert [await reserved_of(client, s, sku) for s in (s1, s2) for sku in (a, b)] == [0, 0, 0, 0]


@pytest.mark.parametrize("split", [False, True])
async def test_insufficient_stock_reports_available_summed_over_the_candidate_stores(
    stack: Stack, split: bool,
) -> None:
    s1, s2, elsewhere = random_store(), random_store(), random_store()
    a, b = random_sku(), random_sku()
    async with stack.client() as client:
        await seed(client, stack, {s1: {a: 2, b: 5}, s2: {a: 1}, elsewhere: {a: 50}})
        order = await place(client, [s1, s2], [(a, 4), (b, 1)], split=split)
        assert (order["status"], order["reason"], order["allocations"]) == (
            "rejected", "insufficient_stock", [])
        assert order["unavailable"] == [{"sku": a, "requested": 4, "available": 3}]
        assert [await reserved_of(client, s, a) for s in (s1, s2)] == [0, 0]


async def test_unknown_sku_means_known_in_none_of_the_candidate_stores(stack: Stack) -> None:
    s1, s2, elsewhere = random_store(), random_store(), random_store()
    a, b, c = random_sku(), random_sku(), random_sku()
    async with stack.client() as client:
        # b exists only in S2 (known); c only in a store that is not a candidate (unknown).
        await seed(client, stack, {s1: {a: 1}, s2: {a: 1, b: 1}, elsewhere: {c: 9}})
        order = await place(client, [s1, s2], [(a, 3), (b, 1), (c, 2)], split=True)
        assert (order["status"], order["reason"], order["allocations"]) == ("rejected", "unknown_sku", [])
        assert order["unavailable"] == [{"sku": a, "requested": 3, "available": 2},
                                        {"sku": c, "requested": 2, "available": 0}]


async def test_a_one_store_order_shows_its_store_as_the_only_candidate(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 3)
        response = await client.post("/orders", json={
            "customer_id": "c-1", "store_id": store, "items": [{"sku": sku, "quantity": 2}]})
        assert response.status_code == 202, response.text
        order = await wait_for_status(client, response.json()["order_id"], {"reserved"})
        assert (order["store_id"], order["stores"], order["split"], order["allocations"]) == (
            store, [store], False, [alloc(store, sku, 2)])


# ----- 422s ------------------------------------------------------------------------------------

ITEMS = [{"sku": "SKU-1", "quantity": 1}]


@pytest.mark.parametrize(("extra", "field"), [
    ({"store_id": "S1", "stores": ["S2"]}, "stores"),          # both
    ({"store_id": "S1", "stores": ["S1"]}, "stores"),          # both, even when they agree
    ({"split": True}, "split"),                                # split without stores
    ({"store_id": "S1", "split": False}, "split"),             # split with store_id
    ({"stores": None}, "stores"),                              # null
    ({"split": None, "stores": ["S1"]}, "split"),
    ({"store_id": None}, "store_id"),
    ({"stores": []}, "stores"),                                # 1-20 stores
    ({"stores": [f"S{i}" for i in range(21)]}, "stores"),
    ({"stores": ["S1", "S2", "S1"]}, "stores"),                # distinct
    ({"stores": ["S1", "bad store"]}, "stores"),               # the id pattern
    ({"stores": ["S1", "x" * 65]}, "stores"),
    ({"stores": ["S1", ""]}, "stores"),
    ({"stores": "S1"}, "stores"),                              # wrong types
    ({"stores": [1, 2]}, "stores"),
    ({"stores": ["S1"], "split": "true"}, "split"),
    ({"stores": ["S1"], "split": 1}, "split"),
    ({"stores": [{"store_id": "S1"}]}, "stores"),
])
async def test_stores_and_split_are_validated(stack: Stack, extra: dict[str, Any], field: str) -> None:
    body = {"customer_id": "c-bad", **extra, "items": ITEMS}
    async with stack.client() as client:
        for headers in ({}, {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}):  # both lanes
            errors = assert_invalid(await client.post("/orders", json=body, headers=headers))
            located = " ".join(f"{e['loc']} {e['msg']}" for e in errors)
            assert field in located, errors


async def test_twenty_distinct_stores_are_accepted(stack: Stack) -> None:
    stores = [random_store() for _ in range(20)]
    async with stack.client() as client:
        response = await client.post("/orders", json={
            "customer_id": "c-20", "stores": stores, "split": True, "items": ITEMS})
        assert response.status_code == 202, response.text
        assert response.json()["stores"] == stores
