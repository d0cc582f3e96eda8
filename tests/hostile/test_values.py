"""Hostile values that once gave a 500 or slipped through (issue 10), and their siblings: every
id pattern and every integer that reaches SQL. Each gets a clean problem+json 4xx, before the
database is asked anything it cannot hold."""

import uuid

import orjson
import pytest

from tests.helpers import assert_problem, cursor_of, random_sku, random_store
from tests.hostile.raw import exchange, request
from tooling.stack import Stack

pytestmark = pytest.mark.hostile

A_TIME = "2026-01-01T00:00:00+00:00"
AN_ID = "00000000-0000-4000-8000-000000000000"
BIG = 2**80


@pytest.mark.parametrize("values", [
    [A_TIME, BIG], [A_TIME, -1], [A_TIME, []], [A_TIME, {}], [BIG, AN_ID], [A_TIME, AN_ID + "\n"],
    [A_TIME], [A_TIME, AN_ID, 1], ["9999-12-31T23:59:59-23:59", AN_ID], [None, None],
], ids=lambda v: repr(v)[:40])
async def test_a_forged_orders_cursor_is_422(hostile_stack: Stack, values: list[object]) -> None:
    async with hostile_stack.client() as client:
        assert_problem(await client.get("/orders", params={"cursor": cursor_of(*values)}), 422)


@pytest.mark.parametrize("query", [
    {"limit": str(BIG)}, {"limit": "-1"}, {"limit": "0"}, {"limit": "1e2"}, {"limit": "nan"},
    {"cursor": "!!!"}, {"cursor": "x" * 201}, {"customer_id": "a\x00b"}, {"status": "pending\n"},
])
async def test_a_bad_orders_query_is_422(hostile_stack: Stack, query: dict[str, str]) -> None:
    async with hostile_stack.client() as client:
        assert_problem(await client.get("/orders", params=query), 422)


@pytest.mark.parametrize("wait", ["1e309", "nan", "inf", "-0.5", "31", "", "1_0", "0x1"])
async def test_a_bad_wait_is_422_on_both_lanes(hostile_stack: Stack, wait: str) -> None:
    async with hostile_stack.client() as client:
        order_id = str(uuid.uuid4())
        assert_problem(await client.get(f"/orders/{order_id}", params={"wait": wait}), 422)


@pytest.mark.parametrize("values", [[BIG], [2**62], [-1], ["1"], [1.5], [True], []])
async def test_a_forged_movements_cursor_is_422(hostile_stack: Stack, values: list[object]) -> None:
    async with hostile_stack.client() as client:
        response = await client.get(f"/stores/{random_store()}/stock/A/movements",
                                    params={"cursor": cursor_of(*values)})
        assert_problem(response, 422)


@pytest.mark.parametrize("values", [["A\n"], ["A" * 65], [""], [1], ["a/b"]], ids=repr)
async def test_a_forged_stock_cursor_is_422(hostile_stack: Stack, values: list[object]) -> None:
    async with hostile_stack.client() as client:
        response = await client.get(f"/stores/{random_store()}/stock", params={"cursor": cursor_of(*values)})
        assert_problem(response, 422)


@pytest.mark.parametrize("last_event_id", [
    str(2**63), str(2**64), "9" * 20, "-1", "1e5", "1.0", "\xb2", "0x10", "1" * 19 + "0",
])
async def test_a_last_event_id_the_ledger_cannot_hold_is_422(hostile_stack: Stack, last_event_id: str) -> None:
    async with hostile_stack.client() as client:
        response = await client.get(f"/stores/{random_store()}/stock/events",
                                    headers={"Last-Event-ID": last_event_id.encode("latin-1")})
        assert_problem(response, 422)


@pytest.mark.parametrize("service", ["gateway", "stock"])
@pytest.mark.parametrize(("method", "path"), [
    ("PUT", "/stores/S1/stock/A%0A"), ("PUT", "/stores/S1%0A/stock/A"), ("GET", "/stores/S1/stock/A%0a"),
    ("GET", "/stores/S1/stock/A%00"), ("POST", "/stores/S1/stock/A%0D/restock"), ("GET", "/orders/%0A"),
])
async def test_a_control_character_in_a_path_is_404(hostile_stack: Stack, service: str, method: str,
                                                    path: str) -> None:
    body = b'{"on_hand": 1}' if method != "GET" else b""
    headers = {**hostile_stack.admin, "Content-Type": "application/json"}
    answer = await exchange(hostile_stack.ports[service], request(method, path, headers, body))
    answer.problem(404)


@pytest.mark.parametrize(("path", "body"), [
    ("/stores/S1/stock/A", {"on_hand": BIG}), ("/stores/S1/stock/A", {"on_hand": -1}),
    ("/stores/S1/stock/A", {"on_hand": 1, "expected_version": 2**63}),
    ("/stores/S1/stock/A", {"on_hand": 1, "expected_version": -1}),
    ("/stores/S1/stock/A", {"on_hand": 1.5}), ("/stores/S1/stock/A", {"on_hand": "1"}),
    ("/stores/S1/stock/A/restock", {"quantity": BIG}), ("/stores/S1/stock/A/restock", {"quantity": 0}),
    ("/stores/S1/stock/A/restock", {"quantity": 1, "expected_version": BIG}),
], ids=lambda v: str(v)[:40])
async def test_an_integer_sql_cannot_hold_is_422(hostile_stack: Stack, path: str, body: dict[str, object]) -> None:
    method = "POST" if path.endswith("/restock") else "PUT"
    async with hostile_stack.client() as client:
        response = await client.request(method, path, json=body, headers=hostile_stack.admin)
        assert_problem(response, 422)


@pytest.mark.parametrize("line", [
    {"customer_id": "c", "items": [{"sku": "A", "quantity": BIG}]},
    {"customer_id": "c", "items": [{"sku": "A", "quantity": -1}]},
    {"customer_id": "c", "items": [{"sku": "A\n", "quantity": 1}]},
    {"customer_id": "c", "store_id": "S\n", "items": [{"sku": "A", "quantity": 1}]},
    {"customer_id": "c\x00", "items": [{"sku": "A", "quantity": 1}]},
], ids=lambda v: str(v)[:50])
@pytest.mark.parametrize("keyed", [False, True], ids=["fast-lane", "full-app"])
async def test_a_hostile_order_body_is_422(hostile_stack: Stack, line: dict[str, object], keyed: bool) -> None:
    headers = {"Idempotency-Key": uuid.uuid4().hex} if keyed else {}
    async with hostile_stack.client() as client:
        assert_problem(await client.post("/orders", json=line, headers=headers), 422)


@pytest.mark.parametrize("key", ["k" * 256, ""])
async def test_a_bad_idempotency_key_is_422(hostile_stack: Stack, key: str) -> None:
    async with hostile_stack.client() as client:
        response = await client.post("/orders", headers={"Idempotency-Key": key},
                                     json={"customer_id": "c", "items": [{"sku": "A", "quantity": 1}]})
        assert_problem(response, 422)


@pytest.mark.parametrize("field", ["store_id", "sku"])
@pytest.mark.parametrize("bad", ["A\n", "A\r", "A\u2028", "A ", ""], ids=repr)
async def test_an_ndjson_id_with_a_trailing_newline_is_refused(hostile_stack: Stack, field: str, bad: str) -> None:
    store, sku = random_store(), random_sku()
    rows = [{"store_id": store, "sku": sku, "on_hand": 1}, {"store_id": store, "sku": sku + "B", "on_hand": 1}]
    rows[1][field] = bad
    body = b"\n".join(orjson.dumps(row) for row in rows)
    async with hostile_stack.client() as client:
        response = await client.post("/stock/import", content=body,
                                     headers={**hostile_stack.admin, "Content-Type": "application/x-ndjson"})
        problem = assert_problem(response, 422)
        assert problem["detail"].startswith("line 2:"), problem
        gone = await client.get(f"/stores/{store}/stock/{sku}")
        assert gone.status_code == 404, "one bad row rejects the whole file"
