"""The stock API through the gateway, as API.md §3 and §4 describe it: reads, the paged
lists, PUT (create or count) with its `expected_version` rules, restock, the ledger, and the
admin token."""

import json
from datetime import datetime
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

ITEM_FIELDS = {"store_id", "sku", "on_hand", "reserved", "available", "version", "updated_at"}
MOVEMENT_KINDS = {"created", "adjusted", "restocked", "reserved", "released", "expired", "sold"}


def item_url(store: str, sku: str) -> str:
    return f"/stores/{store}/stock/{sku}"


async def get_item(client: httpx.AsyncClient, store: str, sku: str) -> dict[str, Any]:
    response = await client.get(item_url(store, sku))
    assert response.status_code == 200, response.text
    return response.json()


async def movements(
    client: httpx.AsyncClient, store: str, sku: str, **params: Any
) -> list[dict[str, Any]]:
    response = await client.get(
        item_url(store, sku) + "/movements", params={"limit": 100, **params}
    )
    assert response.status_code == 200, response.text
    return response.json()["items"]


async def put(
    client: httpx.AsyncClient, stack: Stack, store: str, sku: str, body: Any
) -> httpx.Response:
    return await client.put(item_url(store, sku), json=body, headers=stack.admin)


async def restock(
    client: httpx.AsyncClient, stack: Stack, store: str, sku: str, body: Any
) -> httpx.Response:
    return await client.post(item_url(store, sku) + "/restock", json=body, headers=stack.admin)


def assert_item(
    item: dict[str, Any], store: str, sku: str, on_hand: int, reserved: int, version: int
) -> None:
    assert set(item) == ITEM_FIELDS, item
    assert (item["store_id"], item["sku"]) == (store, sku)
    assert (item["on_hand"], item["reserved"], item["available"], item["version"]) == (
        on_hand,
        reserved,
        on_hand - reserved,
        version,
    ), item
    assert datetime.fromisoformat(item["updated_at"]).utcoffset() is not None, (
        "timestamps carry an offset"
    )


def case_id(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 150 else text[:100] + "…"


# ----- GET /stores/{store}/stock/{sku} -------------------------------------------------------


async def test_get_item_shows_figures_with_available_on_hand_minus_reserved(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
        order = (await create_order(client, store, [(sku, 4)])).json()
        await wait_for_status(client, order["order_id"], {"reserved"})
        assert_item(
            await get_item(client, store, sku), store, sku, on_hand=10, reserved=4, version=2
        )


async def test_get_unknown_item_is_404(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        assert_problem(await client.get(item_url(store, sku)), 404)
        await put_stock(client, stack.admin, store, sku, 1)
        assert_problem(await client.get(item_url(store, random_sku())), 404)
        assert_problem(await client.get(item_url(random_store(), sku)), 404)


@pytest.mark.parametrize(
    ("store", "sku", "field"),
    [
        ("S 1", "SKU-1", "store_id"),
        ("S*1", "SKU-1", "store_id"),
        ("S" * 65, "SKU-1", "store_id"),
        ("S1", "SKU 1", "sku"),
        ("S1", "SKU+1", "sku"),
        ("S1", "é", "sku"),
        ("S1", "K" * 65, "sku"),
    ],
)
async def test_ids_outside_the_allowed_characters_are_422(
    stack: Stack, store: str, sku: str, field: str
) -> None:
    async with stack.client() as client:
        assert_invalid(await client.get(item_url(store, sku)), field)
        assert_invalid(await client.get(item_url(store, sku) + "/movements"), field)
        response = await put(client, stack, store, sku, {"on_hand": 1})
        assert_invalid(response, field)
        response = await restock(client, stack, store, sku, {"quantity": 1})
        assert_invalid(response, field)
        if field == "store_id":
            assert_invalid(await client.get(f"/stores/{store}/stock"), field)


async def test_64_char_ids_are_valid(stack: Stack) -> None:
    store, sku = "S" * 56 + random_store()[2:], "a.B_c-9" + random_sku()[4:].ljust(57, "x")
    assert len(store) == len(sku) == 64
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 3)
        assert (await get_item(client, store, sku))["on_hand"] == 3


async def test_as_of_rebuilds_the_figures_of_that_moment(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        created = await put_stock(client, stack.admin, store, sku, 10)
        response = await put(client, stack, store, sku, {"on_hand": 25, "expected_version": 1})
        assert response.status_code == 200, response.text
        then = await client.get(item_url(store, sku), params={"as_of": created["updated_at"]})
        assert then.status_code == 200, then.text
        assert (then.json()["on_hand"], then.json()["version"]) == (10, 1)
        now = await client.get(
            item_url(store, sku), params={"as_of": response.json()["updated_at"]}
        )
        assert (now.json()["on_hand"], now.json()["version"]) == (25, 2)
        before = datetime.fromisoformat(created["updated_at"]).replace(year=2000).isoformat()
        assert_problem(await client.get(item_url(store, sku), params={"as_of": before}), 404)


@pytest.mark.parametrize(
    "as_of", ["yesterday", "2024-01-01T00:00:00", "2024-13-01T00:00:00+00:00", ""]
)
async def test_as_of_without_a_valid_iso_8601_offset_is_422(stack: Stack, as_of: str) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 1)
        assert_invalid(await client.get(item_url(store, sku), params={"as_of": as_of}), "as_of")


@pytest.mark.parametrize("as_of", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
async def test_as_of_at_the_ends_of_the_calendar_is_never_a_server_error(
    stack: Stack, as_of: str
) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 1)
        response = await client.get(item_url(store, sku), params={"as_of": as_of})
        assert response.status_code in (200, 404, 422), response.text
        if response.status_code != 200:
            assert_problem(response, response.status_code)


# ----- GET /stores/{store}/stock (paged) -----------------------------------------------------


async def test_list_pages_through_the_store_by_sku(stack: Stack) -> None:
    store = random_store()
    skus = sorted(random_sku() for _ in range(5))
    async with stack.client() as client:
        for sku in reversed(skus):
            await put_stock(client, stack.admin, store, sku, 7)
        await put_stock(client, stack.admin, random_store(), random_sku(), 1)  # another store
        seen, cursor, pages = [], None, 0
        while True:
            response = await client.get(
                f"/stores/{store}/stock",
                params={"limit": 2, **({"cursor": cursor} if cursor else {})},
            )
            assert response.status_code == 200, response.text
            page = response.json()
            assert set(page) == {"items", "next_cursor"}
            assert len(page["items"]) <= 2
            for item in page["items"]:
                assert_item(item, store, item["sku"], on_hand=7, reserved=0, version=1)
            seen += [item["sku"] for item in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert pages < 10
        assert pages == 3
        assert seen == skus
        whole = (await client.get(f"/stores/{store}/stock")).json()
        assert [item["sku"] for item in whole["items"]] == skus
        assert whole["next_cursor"] is None


async def test_list_of_a_store_without_items_is_empty(stack: Stack) -> None:
    async with stack.client() as client:
        response = await client.get(f"/stores/{random_store()}/stock")
        assert response.status_code == 200
        assert response.json() == {"items": [], "next_cursor": None}


@pytest.mark.parametrize("path", ["/stores/{store}/stock", "/stores/{store}/stock/{sku}/movements"])
@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"limit": "1.5"}, "limit"),
        ({"cursor": "not a cursor"}, "cursor"),
        ({"cursor": "x" * 300}, "cursor"),
        ({"cursor": cursor_of(1, 2, 3)}, "cursor"),
    ],
    ids=[
        "limit-0",
        "limit-101",
        "limit-word",
        "limit-fraction",
        "cursor-garbage",
        "cursor-300-chars",
        "cursor-three-values",
    ],
)
async def test_bad_paging_parameters_are_422(
    stack: Stack, path: str, params: dict[str, str], field: str
) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 1)
        assert_invalid(await client.get(path.format(store=store, sku=sku), params=params), field)


@pytest.mark.parametrize(
    ("path", "cursor"),
    [
        ("/stores/{store}/stock", cursor_of("\u0000")),
        ("/stores/{store}/stock/{sku}/movements", cursor_of(2**63)),
        ("/stores/{store}/stock/{sku}/movements", cursor_of("3")),
    ],
    ids=["items-nul", "movements-beyond-bigint", "movements-string"],
)
async def test_forged_cursors_are_never_a_server_error(
    stack: Stack, path: str, cursor: str
) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 1)
        response = await client.get(path.format(store=store, sku=sku), params={"cursor": cursor})
        assert response.status_code in (200, 422), response.text
        if response.status_code == 422:
            assert_invalid(response, "cursor")


# ----- PUT /stores/{store}/stock/{sku} -------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"on_hand": 120},
        {"on_hand": 120, "expected_version": None},
        {"on_hand": 120, "expected_version": 0},
    ],
    ids=["version-absent", "version-null", "version-0"],
)
async def test_put_creates_a_missing_item_with_201(stack: Stack, body: dict[str, Any]) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        response = await put(client, stack, store, sku, body)
        assert response.status_code == 201, response.text
        assert_item(response.json(), store, sku, on_hand=120, reserved=0, version=1)
        assert await get_item(client, store, sku) == response.json()
        [created] = await movements(client, store, sku)
        assert (
            created["kind"],
            created["on_hand_delta"],
            created["reserved_delta"],
            created["version"],
        ) == ("created", 120, 0, 1)


async def test_put_creates_an_item_with_zero_on_hand(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        response = await put(client, stack, store, sku, {"on_hand": 0})
        assert response.status_code == 201, response.text
        assert_item(response.json(), store, sku, on_hand=0, reserved=0, version=1)


async def test_put_with_the_current_version_sets_the_count_with_200(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
        response = await put(client, stack, store, sku, {"on_hand": 4, "expected_version": 1})
        assert response.status_code == 200, response.text
        assert_item(response.json(), store, sku, on_hand=4, reserved=0, version=2)
        assert await get_item(client, store, sku) == response.json()


async def test_put_at_the_same_count_is_still_a_change(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
        response = await put(client, stack, store, sku, {"on_hand": 10, "expected_version": 1})
        assert response.status_code == 200, response.text
        assert_item(response.json(), store, sku, on_hand=10, reserved=0, version=2)
        adjusted = (await movements(client, store, sku))[-1]
        assert (adjusted["kind"], adjusted["on_hand_delta"], adjusted["version"]) == (
            "adjusted",
            0,
            2,
        )


async def test_put_on_an_existing_item_without_expected_version_is_422(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
        response = await put(client, stack, store, sku, {"on_hand": 3})
        assert_invalid(response, "expected_version")
        assert_item(
            await get_item(client, store, sku), store, sku, on_hand=10, reserved=0, version=1
        )


@pytest.mark.parametrize("expected_version", [0, None], ids=["version-0", "version-null"])
async def test_put_create_on_an_existing_item_is_409(
    stack: Stack, expected_version: int | None
) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
        response = await put(
            client, stack, store, sku, {"on_hand": 3, "expected_version": expected_version}
        )
        assert_problem(response, 409)
        assert_item(
            await get_item(client, store, sku), store, sku, on_hand=10, reserved=0, version=1
        )


@pytest.mark.parametrize("expected_version", [2, 7])
async def test_put_with_a_stale_or_future_version_is_409(
    stack: Stack, expected_version: int
) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
        await restock(client, stack, store, sku, {"quantity": 1})
        await restock(client, stack, store, sku, {"quantity": 1})
        # the item is at version 3: 2 is stale, 7 is from nowhere
        response = await put(
            client, stack, store, sku, {"on_hand": 3, "expected_version": expected_version}
        )
        assert_problem(response, 409)
        assert_item(
            await get_item(client, store, sku), store, sku, on_hand=12, reserved=0, version=3
        )


async def test_put_with_a_version_on_a_missing_item_is_404(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        response = await put(client, stack, store, sku, {"on_hand": 3, "expected_version": 1})
        assert_problem(response, 404)
        assert_problem(await client.get(item_url(store, sku)), 404)


async def test_put_below_the_reserved_units_is_409(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
        order = (await create_order(client, store, [(sku, 6)])).json()
        await wait_for_status(client, order["order_id"], {"reserved"})
        version = (await get_item(client, store, sku))["version"]
        response = await put(client, stack, store, sku, {"on_hand": 5, "expected_version": version})
        assert_problem(response, 409)
        assert_item(
            await get_item(client, store, sku), store, sku, on_hand=10, reserved=6, version=version
        )
        exactly = await put(client, stack, store, sku, {"on_hand": 6, "expected_version": version})
        assert exactly.status_code == 200, exactly.text
        assert_item(exactly.json(), store, sku, on_hand=6, reserved=6, version=version + 1)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "on_hand"),
        ({"expected_version": 1}, "on_hand"),
        ({"on_hand": -1}, "on_hand"),
        ({"on_hand": "5"}, "on_hand"),
        ({"on_hand": 5.5}, "on_hand"),
        ({"on_hand": 5.0}, "on_hand"),
        ({"on_hand": True}, "on_hand"),
        ({"on_hand": None}, "on_hand"),
        ({"on_hand": 2**64}, "on_hand"),
        ({"on_hand": 5, "expected_version": -1}, "expected_version"),
        ({"on_hand": 5, "expected_version": "1"}, "expected_version"),
        ({"on_hand": 5, "expected_version": 1.5}, "expected_version"),
        ({"on_hand": 5, "expected_version": 2**64}, "expected_version"),
        ({"on_hand": 5, "reserved": 0}, "reserved"),
        ({"on_hand": 5, "sku": "other"}, "sku"),
    ],
    ids=case_id,
)
async def test_invalid_put_body_is_422(stack: Stack, body: dict[str, Any], field: str) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        assert_invalid(await put(client, stack, store, sku, body), field)
        assert_problem(await client.get(item_url(store, sku)), 404)


@pytest.mark.parametrize(
    "raw", [b'{"on_hand": 5', b"on_hand=5", b"[5]", b"", b"null", b"\xff\xfe\x00"]
)
async def test_malformed_put_body_is_422(stack: Stack, raw: bytes) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        response = await client.put(
            item_url(store, sku),
            content=raw,
            headers={**stack.admin, "Content-Type": "application/json"},
        )
        assert_invalid(response, "body")
        assert_problem(await client.get(item_url(store, sku)), 404)


@pytest.mark.parametrize("method", ["put", "restock"])
async def test_wrong_content_type_is_415_and_oversized_body_413(stack: Stack, method: str) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
        url, body = (
            (item_url(store, sku), {"on_hand": 3, "expected_version": 1})
            if method == "put"
            else (item_url(store, sku) + "/restock", {"quantity": 3})
        )
        send = client.put if method == "put" else client.post
        raw = json.dumps(body).encode()
        response = await send(
            url, content=raw, headers={**stack.admin, "Content-Type": "text/plain"}
        )
        assert_problem(response, 415)
        response = await send(
            url,
            content=raw + b" " * (1024 * 1024),
            headers={**stack.admin, "Content-Type": "application/json"},
        )
        assert_problem(response, 413)
        assert_item(
            await get_item(client, store, sku), store, sku, on_hand=10, reserved=0, version=1
        )


# ----- POST /stores/{store}/stock/{sku}/restock ----------------------------------------------


async def test_restock_adds_to_on_hand_and_bumps_the_version(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
        response = await restock(client, stack, store, sku, {"quantity": 5})
        assert response.status_code == 200, response.text
        assert_item(response.json(), store, sku, on_hand=15, reserved=0, version=2)
        response = await restock(
            client, stack, store, sku, {"quantity": 1_000_000, "expected_version": 2}
        )
        assert response.status_code == 200, response.text
        assert_item(response.json(), store, sku, on_hand=1_000_015, reserved=0, version=3)
        assert await get_item(client, store, sku) == response.json()


async def test_restock_keeps_what_is_reserved(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 2)
        order = (await create_order(client, store, [(sku, 2)])).json()
        await wait_for_status(client, order["order_id"], {"reserved"})
        response = await restock(client, stack, store, sku, {"quantity": 3})
        assert response.status_code == 200, response.text
        assert_item(response.json(), store, sku, on_hand=5, reserved=2, version=3)


async def test_restock_with_a_wrong_version_is_409(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
        for version in (0, 2):
            response = await restock(
                client, stack, store, sku, {"quantity": 5, "expected_version": version}
            )
            assert_problem(response, 409)
        assert_item(
            await get_item(client, store, sku), store, sku, on_hand=10, reserved=0, version=1
        )


async def test_restock_of_an_unknown_sku_is_404(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        response = await restock(client, stack, store, sku, {"quantity": 5})
        assert_problem(response, 404)
        assert_problem(await client.get(item_url(store, sku)), 404)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "quantity"),
        ({"quantity": 0}, "quantity"),
        ({"quantity": -5}, "quantity"),
        ({"quantity": 1_000_001}, "quantity"),
        ({"quantity": 2**64}, "quantity"),
        ({"quantity": "5"}, "quantity"),
        ({"quantity": 5.0}, "quantity"),
        ({"quantity": False}, "quantity"),
        ({"quantity": None}, "quantity"),
        ({"quantity": 5, "expected_version": -1}, "expected_version"),
        ({"quantity": 5, "expected_version": "1"}, "expected_version"),
        ({"quantity": 5, "note": "pallet"}, "note"),
    ],
    ids=case_id,
)
async def test_invalid_restock_body_is_422(stack: Stack, body: dict[str, Any], field: str) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
        response = await restock(client, stack, store, sku, body)
        assert_invalid(response, field)
        assert_item(
            await get_item(client, store, sku), store, sku, on_hand=10, reserved=0, version=1
        )


@pytest.mark.parametrize("raw", [b'{"quantity": 5', b"quantity=5", b"5", b""])
async def test_malformed_restock_body_is_422(stack: Stack, raw: bytes) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
        response = await client.post(
            item_url(store, sku) + "/restock",
            content=raw,
            headers={**stack.admin, "Content-Type": "application/json"},
        )
        assert_invalid(response, "body")
        assert_item(
            await get_item(client, store, sku), store, sku, on_hand=10, reserved=0, version=1
        )


# ----- the admin token -----------------------------------------------------------------------


def admin_writes(store: str, sku: str) -> list[tuple[str, str, dict[str, Any]]]:
    csv = f"store_id,sku,on_hand\n{store},{sku},99\n"
    return [
        ("PUT", item_url(store, sku), {"json": {"on_hand": 99, "expected_version": 1}}),
        ("POST", item_url(store, sku) + "/restock", {"json": {"quantity": 99}}),
        ("POST", "/stock/import", {"content": csv, "headers": {"Content-Type": "text/csv"}}),
    ]


@pytest.mark.parametrize(
    ("auth", "status"),
    [
        (None, 401),
        ("Bearer", 401),
        ("Basic YWRtaW46YWRtaW4=", 401),
        ("Bearer not-the-token", 403),
        ("Bearer {token}x", 403),
        ("Bearer {token_upper}", 403),
    ],
    ids=[
        "no-header",
        "bearer-without-token",
        "basic-scheme",
        "wrong-token",
        "token-plus-one",
        "token-other-case",
    ],
)
async def test_writes_without_the_admin_token_are_refused(
    stack: Stack, auth: str | None, status: int
) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
        for method, url, kwargs in admin_writes(store, sku):
            headers = dict(kwargs.get("headers", {}))
            if auth is not None:
                headers["Authorization"] = auth.format(
                    token=stack.admin_token, token_upper=stack.admin_token.upper()
                )
            response = await client.request(method, url, **{**kwargs, "headers": headers})
            assert_problem(response, status)
        assert_item(
            await get_item(client, store, sku), store, sku, on_hand=10, reserved=0, version=1
        )
        assert [m["kind"] for m in await movements(client, store, sku)] == ["created"]


async def test_create_without_the_admin_token_creates_nothing(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        assert_problem(await client.put(item_url(store, sku), json={"on_hand": 1}), 401)
        assert_problem(
            await client.put(
                item_url(store, sku), json={"on_hand": 1}, headers={"Authorization": "Bearer nope"}
            ),
            403,
        )
        assert_problem(await client.get(item_url(store, sku)), 404)


async def test_reads_need_no_token(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
        for url in (
            item_url(store, sku),
            f"/stores/{store}/stock",
            item_url(store, sku) + "/movements",
        ):
            response = await client.get(url)
            assert response.status_code == 200, (url, response.text)


# ----- GET /stores/{store}/stock/{sku}/movements ---------------------------------------------


async def test_movements_are_the_ledger_by_version_and_replay_to_the_figures(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
        await put(client, stack, store, sku, {"on_hand": 8, "expected_version": 1})
        await restock(client, stack, store, sku, {"quantity": 4})
        order = (await create_order(client, store, [(sku, 5)])).json()
        await wait_for_status(client, order["order_id"], {"reserved"})
        ledger = await movements(client, store, sku)
        assert [
            (m["kind"], m["on_hand_delta"], m["reserved_delta"], m["order_id"]) for m in ledger
        ] == [
            ("created", 10, 0, None),
            ("adjusted", -2, 0, None),
            ("restocked", 4, 0, None),
            ("reserved", 0, 5, order["order_id"]),
        ]
        assert [m["version"] for m in ledger] == [1, 2, 3, 4]
        times = [datetime.fromisoformat(m["at"]) for m in ledger]
        assert times == sorted(times), "`at` never decreases along the ledger"
        assert all(t.utcoffset() is not None for t in times)
        assert {m["kind"] for m in ledger} <= MOVEMENT_KINDS
        item = await get_item(client, store, sku)
        replayed = (
            sum(m["on_hand_delta"] for m in ledger),
            sum(m["reserved_delta"] for m in ledger),
        )
        assert replayed == (item["on_hand"], item["reserved"]) == (12, 5)
        assert item["version"] == ledger[-1]["version"]


async def test_movements_page_in_version_order(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 1)
        for _ in range(4):
            response = await restock(client, stack, store, sku, {"quantity": 1})
            assert response.status_code == 200
        versions, cursor, pages = [], None, 0
        while True:
            response = await client.get(
                item_url(store, sku) + "/movements",
                params={"limit": 2, **({"cursor": cursor} if cursor else {})},
            )
            assert response.status_code == 200, response.text
            page = response.json()
            assert set(page) == {"items", "next_cursor"}
            assert len(page["items"]) <= 2
            versions += [m["version"] for m in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert pages < 10
        assert versions == [1, 2, 3, 4, 5]
        assert pages == 3


async def test_movements_of_an_unknown_item_are_404(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        assert_problem(await client.get(item_url(store, sku) + "/movements"), 404)
        await put_stock(client, stack.admin, store, sku, 1)
        assert_problem(await client.get(item_url(store, random_sku()) + "/movements"), 404)
