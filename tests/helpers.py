"""What tests share: random ids, polling with a deadline, and the invariant checks."""

import asyncio
import uuid
from collections.abc import Iterable
from typing import Any

import asyncpg
import httpx

SETTLED = {"reserved", "rejected", "confirmed", "cancelled", "expired"}


def random_sku(prefix: str = "SKU") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def random_store() -> str:
    return f"S-{uuid.uuid4().hex[:8]}"


async def put_stock(client: httpx.AsyncClient, admin: dict[str, str], store: str, sku: str, on_hand: int) -> dict[str, Any]:
    response = await client.put(f"/stores/{store}/stock/{sku}", json={"on_hand": on_hand}, headers=admin)
    assert response.status_code == 201, response.text
    return response.json()


async def create_order(client: httpx.AsyncClient, store: str, items: list[tuple[str, int]],
                       customer: str = "c-1", **kwargs: Any) -> httpx.Response:
    body = {"customer_id": customer, "store_id": store,
            "items": [{"sku": sku, "quantity": q} for sku, q in items]}
    return await client.post("/orders", json=body, **kwargs)


async def wait_for_status(client: httpx.AsyncClient, order_id: str, statuses: Iterable[str],
                          timeout: float = 30) -> dict[str, Any]:
    """Long-polls the order until its status is one of `statuses`, or fails at the deadline."""
    wanted = set(statuses)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    order: dict[str, Any] = {}
    while loop.time() < deadline:
        wait = max(0.1, min(5.0, deadline - loop.time()))
        response = await client.get(f"/orders/{order_id}", params={"wait": f"{wait:.1f}"})
        assert response.status_code == 200, response.text
        order = response.json()
        if order["status"] in wanted:
            return order
        if order["status"] not in ("pending", "confirming"):
            await asyncio.sleep(0.05)  # settled elsewhere: re-read soon, bounded by the deadline
    raise AssertionError(f"order {order_id} stayed {order.get('status')!r}, wanted {wanted}")


async def eventually(check: Any, timeout: float = 15, interval: float = 0.1) -> Any:
    """Calls the async `check` until it returns without AssertionError, or re-raises at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await check()
        except AssertionError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(interval)


async def check_stock_invariants(conn: asyncpg.Connection) -> dict[tuple[str, str], dict[str, int]]:
    """Checks, for every item: 0 <= reserved <= on_hand; the held lines add up to `reserved`;
    the ledger is gap-free by version, its times never decrease, and it replays to the figures.
    Returns the figures by (store, sku).

    All reads share one snapshot (REPEATABLE READ): read one by one, a sweep committing between
    two of them would look like a broken invariant."""
    if conn.is_in_transaction():
        return await _check_stock_invariants(conn)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _check_stock_invariants(conn)


async def _check_stock_invariants(conn: asyncpg.Connection) -> dict[tuple[str, str], dict[str, int]]:
    items = {(r["store_id"], r["sku"]): dict(r) for r in await conn.fetch(
        "SELECT store_id, sku, on_hand, reserved, version FROM stock_item")}
    holds = {(r["store_id"], r["sku"]): r["held"] for r in await conn.fetch(
        "SELECT store_id, sku, sum(quantity) AS held FROM reservation GROUP BY 1, 2")}
    ledger = {(r["store_id"], r["sku"]): r for r in await conn.fetch("""
        SELECT store_id, sku, sum(on_hand_delta) AS on_hand, sum(reserved_delta) AS reserved,
               count(*) AS n, min(version) AS first, max(version) AS last,
               bool_and(ok_time) AS times_ok
        FROM (SELECT *, at >= coalesce(lag(at) OVER w, at) AS ok_time FROM movement
              WINDOW w AS (PARTITION BY store_id, sku ORDER BY version)) m
        GROUP BY 1, 2""")}
    for key, item in items.items():
        assert 0 <= item["reserved"] <= item["on_hand"], (key, item)
        assert holds.get(key, 0) == item["reserved"], (key, item, holds.get(key))
        entry = ledger[key]
        assert (entry["on_hand"], entry["reserved"]) == (item["on_hand"], item["reserved"]), (key, item, dict(entry))
        assert (entry["first"], entry["last"], entry["n"]) == (1, item["version"], item["version"]), (key, dict(entry))
        assert entry["times_ok"], key
    held_orders = await conn.fetchval("""
        SELECT count(*) FROM stock_order o
        WHERE o.state = 'held' AND NOT EXISTS (SELECT 1 FROM reservation r WHERE r.order_id = o.order_id)""")
    assert held_orders == 0, "an order is 'held' without held lines"
    stray = await conn.fetchval("""
        SELECT count(*) FROM reservation r JOIN stock_order o USING (order_id) WHERE o.state <> 'held'""")
    assert stray == 0, "held lines belong to an order that is no longer held"
    return items


PROBLEM_JSON = "application/problem+json"


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """The answer is `status` with an RFC 9457 body (API.md §4); returns the body."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    media_type = response.headers.get("content-type", "").split(";")[0].strip()
    assert media_type == PROBLEM_JSON, response.headers
    body = response.json()
    assert body["status"] == status, body
    for key in ("type", "title", "detail"):
        assert isinstance(body.get(key), str) and body[key], (key, body)
    return body


def assert_invalid(response: httpx.Response, *fields: str) -> list[dict[str, Any]]:
    """A validation failure: `422` problem+json with `errors: [{loc, msg}]`, where some `loc`
    names each of `fields`. Returns the errors."""
    body = assert_problem(response, 422)
    errors = body.get("errors")
    assert isinstance(errors, list) and errors, f"a validation problem lists its errors: {body}"
    for error in errors:
        assert {"loc", "msg"} <= set(error) and error["msg"], error
    locs = " ".join(str(error["loc"]) for error in errors)
    for name in fields:
        assert name in locs, f"no error located at {name!r}: {errors}"
    return errors


def cursor_of(*values: Any) -> str:
    """A cursor the service never issued, in the shape of those it does (base64url JSON)."""
    import base64
    import json

    return base64.urlsafe_b64encode(json.dumps(list(values)).encode()).decode().rstrip("=")
