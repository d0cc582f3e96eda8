"""X-Request-ID (API.md §4): a client's value is kept only if it is 1-128 characters of
[A-Za-z0-9._:-], else a new one is made; every answer carries the id used. Enforced by the
first process that sees the request and again by every service, since a request may reach
orders or stock directly. (A 140 kB id once went into the outbox and the AMQP headers, the
broker refused the frame and no order was decided any more.)"""

import re
import uuid

import httpx
import pytest

from tests.helpers import create_order, put_stock, random_sku, random_store, wait_for_status
from tests.hostile.raw import exchange, request
from tooling.stack import Stack

pytestmark = pytest.mark.hostile

RULE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
KEPT = ["a", "A" * 128, "abc.DEF_-:123", "0"]
REPLACED = ["A" * 129, "x" * 10_000, "has space", "semi;colon", "comma,separated", "caf\xe9",
            "slash/x", "quote\"x", "tab\tx", "%41"]
SERVICES = ["gateway", "orders", "stock"]


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("value", KEPT, ids=lambda v: f"kept-{len(v)}")
async def test_a_valid_id_is_kept(hostile_stack: Stack, service: str, value: str) -> None:
    answer = await exchange(hostile_stack.ports[service],
                            request("GET", "/health/live", {"X-Request-ID": value}))
    assert answer.status == 200
    assert answer.header(b"x-request-id") == value.encode()


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("value", REPLACED, ids=lambda v: f"replaced-{len(v)}-{v[:6]!r}")
async def test_an_invalid_id_is_replaced(hostile_stack: Stack, service: str, value: str) -> None:
    path = "/orders?limit=1" if service != "stock" else f"/stores/{random_store()}/stock"
    answer = await exchange(hostile_stack.ports[service],
                            request("GET", path, {"X-Request-ID": value}))
    assert answer.status == 200, answer.body[:300]
    used = answer.header(b"x-request-id")
    assert used is not None and used != value.encode("latin-1")
    assert RULE.fullmatch(used.decode()), used


@pytest.mark.parametrize("service", ["gateway", "orders"])
@pytest.mark.parametrize("idempotent", [False, True], ids=["fast-lane", "full-app"])
async def test_an_oversized_id_on_an_order_never_stops_the_system(
    hostile_stack: Stack, service: str, idempotent: bool
) -> None:
    """The order is accepted under a new id, decided, and so is a well-behaved client's after it."""
    store, sku = random_store(), random_sku()
    base = f"http://127.0.0.1:{hostile_stack.ports[service]}"
    async with hostile_stack.client() as client, httpx.AsyncClient(base_url=base, timeout=30) as direct:
        await put_stock(client, hostile_stack.admin, store, sku, 10)
        headers = {"X-Request-ID": "x" * 12_000}
        if idempotent:
            headers["Idempotency-Key"] = uuid.uuid4().hex
        hostile = await create_order(direct, store, [(sku, 1)], headers=headers)
        assert hostile.status_code == 202, hostile.text
        used = hostile.headers["x-request-id"]
        assert RULE.fullmatch(used), used
        normal = await create_order(client, store, [(sku, 1)])
        assert normal.status_code == 202, normal.text
        for order in (hostile.json(), normal.json()):
            decided = await wait_for_status(client, order["order_id"], {"reserved"}, timeout=30)
            assert decided["status"] == "reserved"
