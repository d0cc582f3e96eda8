"""The orders API through the gateway, as API.md §2 and §4 describe it: every status code and
every validation rule of POST /orders, GET /orders/{id} (with ?wait) and GET /orders."""

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from tests.helpers import (
    assert_invalid,
    assert_problem,
    create_order,
    cursor_of,
    put_stock,
    random_sku,
    random_store,
    wait_for_status,
)
from tooling.stack import Stack

ORDER_FIELDS = {
    "order_id",
    "customer_id",
    "store_id",
    "stores",
    "split",
    "items",
    "status",
    "reason",
    "unavailable",
    "allocations",
    "reserved_until",
    "created_at",
    "updated_at",
}
MiB = 1024 * 1024


def random_customer() -> str:
    return f"c-{uuid.uuid4().hex[:12]}"


def order_body(sku: str = "SKU-1", quantity: int = 1, **fields: Any) -> dict[str, Any]:
    return {
        "customer_id": random_customer(),
        "items": [{"sku": sku, "quantity": quantity}],
        **fields,
    }


async def new_order(client: httpx.AsyncClient, customer: str) -> str:
    response = await client.post("/orders", json={**order_body(), "customer_id": customer})
    assert response.status_code == 202, response.text
    return response.json()["order_id"]


async def orders_of(
    client: httpx.AsyncClient, customer: str, **params: Any
) -> list[dict[str, Any]]:
    response = await client.get("/orders", params={"customer_id": customer, **params})
    assert response.status_code == 200, response.text
    return response.json()["items"]


def case_id(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 150 else text[:100] + "…"


# ----- POST /orders --------------------------------------------------------------------------


async def test_create_answers_202_with_location_and_the_pending_order(stack: Stack) -> None:
    store, sku, customer = random_store(), random_sku(), random_customer()
    body = {"customer_id": customer, "store_id": store, "items": [{"sku": sku, "quantity": 2}]}
    async with stack.client() as client:
        response = await client.post("/orders", json=body)
        assert response.status_code == 202, response.text
        order = response.json()
        assert set(order) == ORDER_FIELDS
        assert uuid.UUID(order["order_id"]).version == 4
        assert response.headers["location"] == f"/orders/{order['order_id']}"
        assert (order["customer_id"], order["store_id"], order["stores"], order["split"], order["items"]) == (
            customer,
            store,
            [store],
            False,
            body["items"],
        )
        assert (
            order["status"],
            order["reason"],
            order["unavailable"],
            order["allocations"],
            order["reserved_until"],
        ) == ("pending", None, [], [], None)
        fetched = await client.get(response.headers["location"])
        assert fetched.status_code == 200
        assert fetched.json()["order_id"] == order["order_id"]


async def test_store_id_defaults_to_default(stack: Stack) -> None:
    async with stack.client() as client:
        response = await client.post("/orders", json=order_body())
        assert response.status_code == 202, response.text
        assert response.json()["store_id"] == "default"


async def test_boundaries_that_are_still_valid(stack: Stack) -> None:
    """64-char ids, 100 lines, quantity 1 and 10000, every allowed id character."""
    async with stack.client() as client:
        body = {
            "customer_id": "c" * 64,
            "store_id": "S" * 64,
            "items": [
                {"sku": f"A.b_C-{i}", "quantity": 10_000 if i % 2 else 1} for i in range(100)
            ],
        }
        response = await client.post("/orders", json=body)
        assert response.status_code == 202, response.text
        assert len(response.json()["items"]) == 100
        sku64 = await client.post("/orders", json=order_body(sku="K" * 64))
        assert sku64.status_code == 202, sku64.text


LINE = {"sku": "A", "quantity": 1}


def valid(**fields: Any) -> dict[str, Any]:
    """A valid order body with `fields` changed; the customer "c" becomes a fresh one."""
    return {"customer_id": "c", "items": [LINE], **fields}


def without(field: str) -> dict[str, Any]:
    return {k: v for k, v in valid().items() if k != field}


def one_line(**fields: Any) -> dict[str, Any]:
    return valid(items=[{**LINE, **fields}])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (without("customer_id"), "customer_id"),
        (valid(customer_id=""), "customer_id"),
        (valid(customer_id="c" * 65), "customer_id"),
        (valid(customer_id=42), "customer_id"),
        (valid(store_id=""), "store_id"),
        (valid(store_id="S" * 65), "store_id"),
        (valid(store_id="S 1"), "store_id"),
        (valid(store_id="S/1"), "store_id"),
        (valid(store_id=7), "store_id"),
        (without("items"), "items"),
        (valid(items=[]), "items"),
        (valid(items=[{"sku": f"A{i}", "quantity": 1} for i in range(101)]), "items"),
        (valid(items=LINE), "items"),
        (valid(items=[LINE, {"sku": "A", "quantity": 2}]), "items"),  # a sku twice
        (valid(items=[{"quantity": 1}]), "sku"),
        (one_line(sku=""), "sku"),
        (one_line(sku="K" * 65), "sku"),
        (one_line(sku="A*B"), "sku"),
        (valid(items=[{"sku": "A"}]), "quantity"),
        (one_line(quantity="2"), "quantity"),
        (one_line(quantity=2.5), "quantity"),
        (one_line(quantity=True), "quantity"),
        (one_line(quantity=None), "quantity"),
        (one_line(quantity=0), "quantity"),
        (one_line(quantity=-1), "quantity"),
        (one_line(quantity=10_001), "quantity"),
        (one_line(quantity=2**64), "quantity"),
        (valid(coupon="X"), "coupon"),
        (one_line(price=3), "price"),
    ],
    ids=case_id,
)
async def test_invalid_order_is_422_with_located_errors(
    stack: Stack, body: dict[str, Any], field: str
) -> None:
    customer = random_customer()
    if body.get("customer_id") == "c":
        body = {**body, "customer_id": customer}
    async with stack.client() as client:
        assert_invalid(await client.post("/orders", json=body), field)
        assert await orders_of(client, customer) == [], "a refused order must not exist"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"customer_id": "c", "items": [{"sku": "A", "quantity": 1}]',  # cut short
        b'{"customer_id": "c", "items": [{"sku": "A", "quantity": 1},]}',  # trailing comma
        b"{'customer_id': 'c'}",
        b"",
        b"null",
        b"[]",
        b'"an order"',
        b"\xff\xfe\x00",
    ],
)
async def test_malformed_json_is_422_never_500(stack: Stack, raw: bytes) -> None:
    async with stack.client() as client:
        response = await client.post(
            "/orders", content=raw, headers={"Content-Type": "application/json"}
        )
        assert_invalid(response, "body")


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "text/csv", "application/xml"],
)
async def test_wrong_content_type_is_415(stack: Stack, content_type: str) -> None:
    body = order_body()
    async with stack.client() as client:
        response = await client.post(
            "/orders", content=json.dumps(body), headers={"Content-Type": content_type}
        )
        assert_problem(response, 415)
        assert await orders_of(client, body["customer_id"]) == []


async def test_json_content_type_with_charset_is_accepted(stack: Stack) -> None:
    async with stack.client() as client:
        response = await client.post(
            "/orders",
            content=json.dumps(order_body()),
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
        assert response.status_code == 202, response.text


async def test_body_over_one_mib_is_413_and_exactly_one_mib_is_read(stack: Stack) -> None:
    body = order_body()
    raw = json.dumps(body).encode()
    exactly = raw + b" " * (MiB - len(raw))  # still a valid order, padded with whitespace
    async with stack.client() as client:
        headers = {"Content-Type": "application/json"}
        assert_problem(await client.post("/orders", content=exactly + b" ", headers=headers), 413)
        assert await orders_of(client, body["customer_id"]) == []
        accepted = await client.post("/orders", content=exactly, headers=headers)
        assert accepted.status_code == 202, accepted.text


async def test_body_over_one_mib_without_content_length_is_413(stack: Stack) -> None:
    """Content-Length may be absent (chunked upload): the limit still holds."""
    body = order_body()
    raw = json.dumps(body).encode() + b" " * MiB

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 64 * 1024):
            yield raw[start : start + 64 * 1024]

    async with stack.client() as client:
        response = await client.post(
            "/orders", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert_problem(response, 413)
        assert await orders_of(client, body["customer_id"]) == []


async def test_text_the_database_cannot_hold_is_refused_not_500(stack: Stack) -> None:
    """A NUL character is valid JSON; whatever the answer, it is not a server error."""
    async with stack.client() as client:
        body = order_body()
        body["customer_id"] = "c-\u0000-nul"
        response = await client.post("/orders", json=body)
        assert response.status_code in (202, 422), response.text
        if response.status_code == 422:
            assert_invalid(response, "customer_id")


# ----- Idempotency-Key -----------------------------------------------------------------------


async def test_same_key_same_body_is_the_same_order_and_nothing_new(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    body = order_body(sku=sku, quantity=2, store_id=store)
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
        first = await client.post("/orders", json=body, headers=key)
        assert first.status_code == 202, first.text
        again = await client.post("/orders", json=body, headers=key)
        assert again.status_code == 202, again.text
        assert again.json() == first.json()
        assert again.headers["location"] == first.headers["location"]
        listed = await orders_of(client, body["customer_id"])
        assert [o["order_id"] for o in listed] == [first.json()["order_id"]]
        await wait_for_status(client, first.json()["order_id"], {"reserved"})
        item = (await client.get(f"/stores/{store}/stock/{sku}")).json()
        assert item["reserved"] == 2, "the replay must not have reserved a second time"


async def test_replay_returns_the_first_answer_even_after_the_order_moved_on(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    body = order_body(sku=sku, store_id=store)
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 5)
        first = await client.post("/orders", json=body, headers=key)
        assert first.status_code == 202, first.text
        await wait_for_status(client, first.json()["order_id"], {"reserved"})
        replay = await client.post("/orders", json=body, headers=key)
        assert replay.status_code == 202, replay.text
        assert replay.json() == first.json()  # the first answer's body: still `pending`
        assert replay.json()["status"] == "pending"
        assert replay.headers["location"] == first.headers["location"]


async def test_same_key_different_body_is_422_and_creates_nothing(stack: Stack) -> None:
    body = order_body(quantity=1)
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    async with stack.client() as client:
        first = await client.post("/orders", json=body, headers=key)
        assert first.status_code == 202, first.text
        changed = {**body, "items": [{"sku": "SKU-1", "quantity": 2}]}
        assert_problem(await client.post("/orders", json=changed, headers=key), 422)
        other_customer = {**body, "customer_id": random_customer()}
        assert_problem(await client.post("/orders", json=other_customer, headers=key), 422)
        assert await orders_of(client, other_customer["customer_id"]) == []
        assert [o["order_id"] for o in await orders_of(client, body["customer_id"])] == [
            first.json()["order_id"]
        ]


async def test_different_keys_make_different_orders(stack: Stack) -> None:
    body = order_body()
    async with stack.client() as client:
        a = await client.post(
            "/orders", json=body, headers={"Idempotency-Key": f"a-{uuid.uuid4()}"}
        )
        b = await client.post(
            "/orders", json=body, headers={"Idempotency-Key": f"b-{uuid.uuid4()}"}
        )
        assert (a.status_code, b.status_code) == (202, 202)
        assert a.json()["order_id"] != b.json()["order_id"]
        assert len(await orders_of(client, body["customer_id"])) == 2


async def test_concurrent_requests_with_one_key_create_one_order(stack: Stack) -> None:
    """While the first is in flight a duplicate is `409`; afterwards it is the replay (`202`)."""
    body = order_body()
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    async with stack.client() as client:
        responses = await asyncio.gather(
            *(client.post("/orders", json=body, headers=key) for _ in range(20))
        )
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {202, 409}, statuses
        for conflict in (r for r in responses if r.status_code == 409):
            assert_problem(conflict, 409)
        order_ids = {r.json()["order_id"] for r in responses if r.status_code == 202}
        assert len(order_ids) == 1, order_ids
        assert [o["order_id"] for o in await orders_of(client, body["customer_id"])] == list(
            order_ids
        )


@pytest.mark.parametrize("key", ["", "k" * 256], ids=["empty", "256-chars"])
async def test_idempotency_key_length_is_1_to_255(stack: Stack, key: str) -> None:
    body = order_body()
    async with stack.client() as client:
        assert_invalid(
            await client.post("/orders", json=body, headers={"Idempotency-Key": key}),
            "Idempotency-Key",
        )
        assert await orders_of(client, body["customer_id"]) == []
        longest_key = uuid.uuid4().hex.ljust(255, "k")  # keys are global: a fresh one
        longest = await client.post("/orders", json=body, headers={"Idempotency-Key": longest_key})
        assert longest.status_code == 202, longest.text


# ----- GET /orders/{id} ----------------------------------------------------------------------


async def test_get_unknown_order_is_404(stack: Stack) -> None:
    async with stack.client() as client:
        assert_problem(await client.get(f"/orders/{uuid.uuid4()}"), 404)


@pytest.mark.parametrize("order_id", ["not-a-uuid", "123", "0" * 36, f"{uuid.uuid4()}x"])
async def test_get_malformed_order_id_is_422(stack: Stack, order_id: str) -> None:
    async with stack.client() as client:
        assert_invalid(await client.get(f"/orders/{order_id}"), "order_id")


@pytest.mark.parametrize("wait", ["-1", "30.5", "31", "abc", "nan", "inf", ""])
async def test_wait_outside_0_to_30_seconds_is_422(stack: Stack, wait: str) -> None:
    async with stack.client() as client:
        order = (await client.post("/orders", json=order_body())).json()
        assert_invalid(
            await client.get(f"/orders/{order['order_id']}", params={"wait": wait}), "wait"
        )


async def test_wait_on_a_settled_order_answers_at_once(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 1)
        order = (await create_order(client, store, [(sku, 1)])).json()
        await wait_for_status(client, order["order_id"], {"reserved"})
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await client.get(f"/orders/{order['order_id']}", params={"wait": "30"})
        assert response.status_code == 200
        assert response.json()["status"] == "reserved"
        assert loop.time() - started < 5


async def test_both_lanes_answer_alike(stack: Stack) -> None:
    """Valid POST /orders and GET /orders/{id} are answered by the orders service's fast lane
    (orders/fastlane.py), other spellings by the full app: both give the same order, carry the
    request id and are counted under the route template."""
    async with stack.client() as client:
        created = await client.post("/orders", json=order_body(), headers={"X-Request-ID": "lanes-1"})
        assert created.status_code == 202, created.text
        assert created.headers["x-request-id"] == "lanes-1"
        order = created.json()
        fast = await client.get(f"/orders/{order['order_id']}", params={"wait": "0"})
        slow = await client.get(f"/orders/{order['order_id'].upper()}", headers={"X-Request-ID": "lanes-2"})
        assert fast.status_code == slow.status_code == 200
        assert slow.headers["x-request-id"] == "lanes-2"
        for answer in (fast.json(), slow.json()):
            assert set(answer) == ORDER_FIELDS
            assert {k: answer[k] for k in ("order_id", "customer_id", "items", "created_at")} == {
                k: order[k] for k in ("order_id", "customer_id", "items", "created_at")}
        assert_problem(await client.get(f"/orders/{uuid.uuid4()}"), 404)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.ports['orders']}") as orders:
        metrics = (await orders.get("/metrics")).text
    counted = [line for line in metrics.splitlines() if line.startswith("http_requests_total{")]
    for method, route, status in (("POST", "/orders", "202"), ("GET", "/orders/{order_id}", "200"),
                                  ("GET", "/orders/{order_id}", "404")):
        labels = (f'method="{method}"', f'route="{route}"', f'status="{status}"', 'service="orders"')
        assert any(all(label in line for label in labels) for line in counted), (method, route, status)


@asynccontextmanager
async def no_stock_workers(stack: Stack) -> AsyncIterator[list[str]]:
    """Stops every stock worker, so orders stay `pending`; the caller starts them again."""
    names = sorted(name for name in stack.procs if name.startswith("worker-"))
    await asyncio.gather(*(asyncio.to_thread(stack.kill, name, signal.SIGTERM) for name in names))
    try:
        yield names
    finally:
        for name in names:
            if name not in stack.procs:
                stack.start_worker(int(name.removeprefix("worker-")))


async def test_wait_returns_pending_when_the_time_is_up_and_wakes_on_the_answer(
    stack: Stack,
) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 3)
        loop = asyncio.get_running_loop()
        async with no_stock_workers(stack) as workers:
            order = (await create_order(client, store, [(sku, 1)])).json()
            started = loop.time()
            timed_out = await client.get(f"/orders/{order['order_id']}", params={"wait": "1.5"})
            elapsed = loop.time() - started
            assert timed_out.status_code == 200
            assert timed_out.json()["status"] == "pending"
            assert 1.4 <= elapsed < 6, elapsed

            started = loop.time()
            long_poll = asyncio.create_task(
                client.get(f"/orders/{order['order_id']}", params={"wait": "30"})
            )
            stack.start_worker(int(workers[0].removeprefix("worker-")))
            answered = await long_poll
            assert answered.status_code == 200
            assert answered.json()["status"] == "reserved"
            assert loop.time() - started < 20, (
                "the long-poll must answer on the change, not at its end"
            )


# ----- GET /orders ---------------------------------------------------------------------------


async def test_list_is_newest_first_filtered_by_customer(stack: Stack) -> None:
    customer, other = random_customer(), random_customer()
    async with stack.client() as client:
        mine = [await new_order(client, customer) for _ in range(3)]
        await new_order(client, other)
        response = await client.get("/orders", params={"customer_id": customer})
        assert response.status_code == 200
        page = response.json()
        assert set(page) == {"items", "next_cursor"}
        assert [o["order_id"] for o in page["items"]] == mine[::-1]
        assert all(set(o) == ORDER_FIELDS and o["customer_id"] == customer for o in page["items"])
        assert page["next_cursor"] is None
        created = [o["created_at"] for o in page["items"]]
        assert created == sorted(created, reverse=True)


async def test_list_filters_by_status(stack: Stack) -> None:
    store, sku, customer = random_store(), random_sku(), random_customer()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 5)
        ok = await create_order(client, store, [(sku, 1)], customer=customer)
        unknown = await create_order(client, store, [(random_sku(), 1)], customer=customer)
        reserved, rejected = ok.json()["order_id"], unknown.json()["order_id"]
        await wait_for_status(client, reserved, {"reserved"})
        await wait_for_status(client, rejected, {"rejected"})
        only_reserved = await orders_of(client, customer, status="reserved")
        assert [o["order_id"] for o in only_reserved] == [reserved]
        only_rejected = await orders_of(client, customer, status="rejected")
        assert [o["order_id"] for o in only_rejected] == [rejected]
        assert await orders_of(client, customer, status="confirmed") == []
        assert {o["order_id"] for o in await orders_of(client, customer)} == {reserved, rejected}


async def test_list_pages_with_cursor_until_null(stack: Stack) -> None:
    customer = random_customer()
    async with stack.client() as client:
        created = [await new_order(client, customer) for _ in range(5)]
        seen, cursor, pages = [], None, 0
        while True:
            params = {"customer_id": customer, "limit": 2, **({"cursor": cursor} if cursor else {})}
            response = await client.get("/orders", params=params)
            assert response.status_code == 200, response.text
            page = response.json()
            pages += 1
            assert len(page["items"]) <= 2
            seen += [o["order_id"] for o in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert isinstance(cursor, str) and cursor
            assert pages < 10
        assert pages == 3
        assert seen == created[::-1], "every order once, newest first, across pages"


async def test_list_limit_defaults_to_50_and_takes_up_to_100(stack: Stack) -> None:
    customer = random_customer()
    async with stack.client() as client:
        await asyncio.gather(*(new_order(client, customer) for _ in range(55)))
        default = (await client.get("/orders", params={"customer_id": customer})).json()
        assert len(default["items"]) == 50
        assert default["next_cursor"] is not None
        hundred = await client.get("/orders", params={"customer_id": customer, "limit": 100})
        assert hundred.status_code == 200
        assert len(hundred.json()["items"]) == 55
        assert hundred.json()["next_cursor"] is None
        one = await client.get("/orders", params={"customer_id": customer, "limit": 1})
        assert len(one.json()["items"]) == 1


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "-5"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "2.5"}, "limit"),
        ({"status": "shipped"}, "status"),
        ({"status": "PENDING"}, "status"),
        ({"customer_id": ""}, "customer_id"),
        ({"customer_id": "c" * 65}, "customer_id"),
        ({"cursor": "not a cursor"}, "cursor"),
        ({"cursor": "!!!"}, "cursor"),
        ({"cursor": "x" * 300}, "cursor"),
        ({"cursor": cursor_of("2024-01-01T00:00:00+00:00", "not-a-uuid")}, "cursor"),
        ({"cursor": cursor_of(1, 2)}, "cursor"),
        ({"cursor": cursor_of("yesterday")}, "cursor"),
    ],
    ids=[
        "limit-0",
        "limit-101",
        "limit-negative",
        "limit-word",
        "limit-fraction",
        "status-unknown",
        "status-uppercase",
        "customer-empty",
        "customer-65-chars",
        "cursor-garbage",
        "cursor-punctuation",
        "cursor-300-chars",
        "cursor-bad-uuid",
        "cursor-numbers",
        "cursor-one-value",
    ],
)
async def test_bad_list_parameters_are_422(
    stack: Stack, params: dict[str, str], field: str
) -> None:
    async with stack.client() as client:
        assert_invalid(await client.get("/orders", params=params), field)


@pytest.mark.parametrize(
    "params",
    [
        {"customer_id": "c-\u0000"},
        {"cursor": cursor_of("0001-01-01T00:00:00+14:00", str(uuid.uuid4()))},
        {"cursor": cursor_of("9999-12-31T23:59:59-14:00", str(uuid.uuid4()))},
    ],
    ids=["nul-in-customer", "cursor-before-year-1", "cursor-after-year-9999"],
)
async def test_odd_list_parameters_are_never_a_server_error(
    stack: Stack, params: dict[str, str]
) -> None:
    """Parameters a client can send but no issued cursor or stored customer has: a page or a 422."""
    async with stack.client() as client:
        response = await client.get("/orders", params=params)
        assert response.status_code in (200, 422), response.text
        if response.status_code == 422:
            assert_invalid(response)
