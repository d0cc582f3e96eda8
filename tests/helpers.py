"""What tests share: random ids, polling with a deadline, problem+json checks. The stock
invariants live in tooling/invariants.py (the benchmark checks them too)."""

import asyncio
import uuid
from collections.abc import Iterable
from typing import Any

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
