"""The reservation lifecycle (API.md §2, §3, §6) through the gateway, with 3-second holds:

    reserve -> confirm -> confirming -> confirmed      (on_hand down, ledger `sold`)
    reserve -> cancel  -> cancelled                    (hold released, ledger `released`)
    reserve -> ...     -> expired                      (sweep, ledger `expired`) -> reserve again

and the races the contract settles: a cancel against its own order's creation, a confirm
against the expiry sweep, and several workers sweeping the same holds."""

import asyncio
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson

from tests.helpers import (
    create_order,
    eventually,
    put_stock,
    random_sku,
    random_store,
    wait_for_status,
)
from tooling.invariants import check_stock_invariants
from tooling.stack import Stack

# --------------------------------------------------------------------------------------------
# small helpers


def seconds_left(order: dict[str, Any]) -> float:
    """How long the order's hold still has, by this machine's clock."""
    return (datetime.fromisoformat(order["reserved_until"]) - datetime.now(UTC)).total_seconds()


async def stock_item(client: httpx.AsyncClient, store: str, sku: str) -> dict[str, Any]:
    response = await client.get(f"/stores/{store}/stock/{sku}")
    assert response.status_code == 200, response.text
    return response.json()


async def order_of(client: httpx.AsyncClient, order_id: str) -> dict[str, Any]:
    response = await client.get(f"/orders/{order_id}")
    assert response.status_code == 200, response.text
    return response.json()


async def movements(client: httpx.AsyncClient, store: str, sku: str) -> list[dict[str, Any]]:
    """The item's whole ledger, through the public API, page by page."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
        response = await client.get(f"/stores/{store}/stock/{sku}/movements", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def kinds_for(ledger: list[dict[str, Any]], order_id: str) -> list[str]:
    return [m["kind"] for m in ledger if m["order_id"] == order_id]


async def ledger_by_order(stack: Stack, store: str) -> dict[str, Counter[tuple[str, str, int, int]]]:
    """For each order: how many movements of each (sku, kind, on_hand_delta, reserved_delta)."""
    conn = await stack.stock_db()
    try:
        rows = await conn.fetch(
            "SELECT order_id::text AS order_id, sku, kind, on_hand_delta, reserved_delta "
            "FROM movement WHERE store_id = $1 AND order_id IS NOT NULL", store)
    finally:
        await conn.close()
    ledger: dict[str, Counter[tuple[str, str, int, int]]] = {}
    for r in rows:
        ledger.setdefault(r["order_id"], Counter())[
            (r["sku"], r["kind"], r["on_hand_delta"], r["reserved_delta"])] += 1
    return ledger


async def assert_invariants(stack: Stack) -> None:
    conn = await stack.stock_db()
    try:
        await check_stock_invariants(conn)
    finally:
        await conn.close()


async def create_reserved(client: httpx.AsyncClient, store: str, items: list[tuple[str, int]],
                          min_left: float = 1.5) -> dict[str, Any]:
    """An order held with at least `min_left` seconds of its 3 s to go. On a loaded machine the
    answer may come late; such an order is cancelled (its hold released) and another one made."""
    for _ in range(5):
        response = await create_order(client, store, items)
        assert response.status_code == 202, response.text
        order = await wait_for_status(client, response.json()["order_id"], {"reserved", "rejected"})
        assert order["status"] == "reserved", order
        if seconds_left(order) >= min_left:
            return order
        assert (await client.post(f"/orders/{order['order_id']}/cancel")).status_code == 202
    raise AssertionError("no order was held with enough time left to act on it")


@asynccontextmanager
async def workers_stopped(stack: Stack) -> AsyncIterator[None]:
    """No stock worker runs inside the block (nothing is decided, nothing is swept); all of them
    run again after it."""
    names = sorted(n for n in stack.procs if n.startswith("worker-"))
    assert names, "the stack has no stock workers"
    await asyncio.gather(*(asyncio.to_thread(stack.kill, n, signal.SIGKILL) for n in names))
    try:
        yield
    finally:
        for name in names:
            stack.start_worker(int(name.removeprefix("worker-")))


def is_problem(response: httpx.Response, status: int) -> bool:
    return (response.status_code == status
            and response.headers["content-type"].startswith("application/problem+json"))


# --------------------------------------------------------------------------------------------
# the three endings of a hold


async def test_confirm_sells_the_held_units(short_stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with short_stack.client() as client:
        await put_stock(client, short_stack.admin, store, sku, 10)
        order = await create_reserved(client, store, [(sku, 3)])
        order_id = order["order_id"]

        response = await client.post(f"/orders/{order_id}/confirm")
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "confirming"

        confirmed = await wait_for_status(client, order_id, {"confirmed", "expired"})
        assert confirmed["status"] == "confirmed", confirmed
        item = await stock_item(client, store, sku)
        assert (item["on_hand"], item["reserved"], item["available"]) == (7, 0, 7)
        ledger = await movements(client, store, sku)
        assert kinds_for(ledger, order_id) == ["reserved", "sold"]
        sold = [m for m in ledger if m["kind"] == "sold"]
        assert [(m["on_hand_delta"], m["reserved_delta"]) for m in sold] == [(-3, -3)]
    await assert_invariants(short_stack)


async def test_cancel_releases_the_hold(short_stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with short_stack.client() as client:
        await put_stock(client, short_stack.admin, store, sku, 10)
        order = await create_reserved(client, store, [(sku, 4)])
        order_id = order["order_id"]
        assert (await stock_item(client, store, sku))["reserved"] == 4

        response = await client.post(f"/orders/{order_id}/cancel")
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "cancelled"

        async def released() -> None:
            item = await stock_item(client, store, sku)
            assert (item["on_hand"], item["reserved"], item["available"]) == (10, 0, 10)
            assert kinds_for(await movements(client, store, sku), order_id) == ["reserved", "released"]

        await eventually(released, timeout=30)
        assert (await order_of(client, order_id))["status"] == "cancelled"
    await assert_invariants(short_stack)


async def test_expired_order_is_gone_and_can_be_reserved_again(short_stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with short_stack.client() as client:
        await put_stock(client, short_stack.admin, store, sku, 10)
        response = await create_order(client, store, [(sku, 2)])
        order_id = response.json()["order_id"]

        expired = await wait_for_status(client, order_id, {"expired"}, timeout=60)
        assert expired["reason"] == "reservation_expired"
        item = await stock_item(client, store, sku)
        assert (item["on_hand"], item["reserved"]) == (10, 0)
        assert kinds_for(await movements(client, store, sku), order_id) == ["reserved", "expired"]

        response = await client.post(f"/orders/{order_id}/confirm")
        assert is_problem(response, 410), response.text
        assert await order_of(client, order_id) == expired, "a refused confirm changes nothing"

        response = await client.post(f"/orders/{order_id}/reserve")
        assert response.status_code == 202, response.text
        assert response.headers["location"] == f"/orders/{order_id}"
        again = response.json()
        assert (again["status"], again["reason"], again["reserved_until"]) == ("pending", None, None)

        held = await wait_for_status(client, order_id, {"reserved", "rejected"})
        assert held["status"] == "reserved", held
        assert datetime.fromisoformat(held["reserved_until"]) > datetime.fromisoformat(expired["updated_at"])
        assert (await stock_item(client, store, sku))["reserved"] == 2
        assert kinds_for(await movements(client, store, sku), order_id) == [
            "reserved", "expired", "reserved"]

        # An update of the first attempt arriving late is ignored. (No worker runs meanwhile, so
        # the second attempt's own hold cannot run out in between.)
        async with workers_stopped(short_stack):
            before = await order_of(client, order_id)
            stale_id = str(uuid.uuid4())
            stale = {"event_id": stale_id, "event_type": "AtualizarStatus",
                     "occurred_at": datetime.now(UTC).isoformat(), "order_id": order_id,
                     "attempt": 1, "status": "ReservaExpirada"}
            await short_stack.publish_raw(orjson.dumps(stale), "AtualizarStatus", stale_id,
                                          correlation_id=order_id)
            conn = await short_stack.orders_db()
            try:
                async def handled() -> None:
                    assert await conn.fetchval("SELECT 1 FROM inbox WHERE message_id = $1", stale_id)

                await eventually(handled, timeout=30)
            finally:
                await conn.close()
            assert await order_of(client, order_id) == before, "attempt 1 must not touch attempt 2"

        # The second attempt's own expiry does apply.
        expired_again = await wait_for_status(client, order_id, {"expired"}, timeout=60)
        assert expired_again["reason"] == "reservation_expired"
        assert kinds_for(await movements(client, store, sku), order_id) == [
            "reserved", "expired", "reserved", "expired"]
    await assert_invariants(short_stack)


async def test_confirm_past_reserved_until_answers_410_at_once(short_stack: Stack) -> None:
    """The orders service decides by `reserved_until` itself: with no worker running, the sweep
    cannot have expired the hold, and the order is still `reserved` when the confirm comes."""
    store, sku = random_store(), random_sku()
    async with short_stack.client() as client:
        await put_stock(client, short_stack.admin, store, sku, 10)
        order = await create_reserved(client, store, [(sku, 1)])
        order_id = order["order_id"]
        async with workers_stopped(short_stack):
            await asyncio.sleep(max(0.0, seconds_left(order)) + 0.05)  # a wall-clock instant
            before = await order_of(client, order_id)
            assert before["status"] == "reserved", before
            response = await client.post(f"/orders/{order_id}/confirm")
            assert is_problem(response, 410), response.text
            assert await order_of(client, order_id) == before, "a refused confirm changes nothing"
        expired = await wait_for_status(client, order_id, {"expired"}, timeout=60)
        assert expired["reason"] == "reservation_expired"
        ledger = await movements(client, store, sku)
        assert kinds_for(ledger, order_id) == ["reserved", "expired"]
        assert (await stock_item(client, store, sku))["reserved"] == 0


async def test_rejected_order_can_be_reserved_again(short_stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with short_stack.client() as client:
        await put_stock(client, short_stack.admin, store, sku, 1)
        order_id = (await create_order(client, store, [(sku, 3)])).json()["order_id"]
        rejected = await wait_for_status(client, order_id, {"reserved", "rejected"})
        assert rejected["status"] == "rejected"

        response = await client.post(f"/stores/{store}/stock/{sku}/restock", json={"quantity": 5},
                                     headers=short_stack.admin)
        assert response.status_code == 200, response.text
        response = await client.post(f"/orders/{order_id}/reserve")
        assert response.status_code == 202, response.text
        again = response.json()
        assert (again["status"], again["reason"], again["unavailable"]) == ("pending", None, [])

        held = await wait_for_status(client, order_id, {"reserved", "rejected"})
        assert held["status"] == "reserved", held
        item = await stock_item(client, store, sku)
        assert (item["on_hand"], item["reserved"]) == (6, 3)
        response = await client.post(f"/orders/{order_id}/cancel")
        assert response.status_code == 202
    await assert_invariants(short_stack)


# --------------------------------------------------------------------------------------------
# what is not allowed answers 409/410 and changes nothing


async def test_invalid_transitions_change_nothing(short_stack: Stack) -> None:
    store = random_store()
    short, cancelled_sku, confirmed_sku, reserved_sku = (random_sku() for _ in range(4))
    async with short_stack.client() as client:
        for sku, on_hand in ((short, 1), (cancelled_sku, 10), (confirmed_sku, 10), (reserved_sku, 10)):
            await put_stock(client, short_stack.admin, store, sku, on_hand)

        async def refused(order_id: str, command: str, status: int) -> None:
            before = await order_of(client, order_id)
            response = await client.post(f"/orders/{order_id}/{command}")
            assert is_problem(response, status), (command, before["status"], response.text)
            assert await order_of(client, order_id) == before, (command, "changed the order")

        # rejected: cannot be confirmed
        rejected_id = (await create_order(client, store, [(short, 2)])).json()["order_id"]
        rejected = await wait_for_status(client, rejected_id, {"reserved", "rejected"})
        assert rejected["status"] == "rejected"
        await refused(rejected_id, "confirm", 409)

        # reserved: cannot be reserved again
        reserved = await create_reserved(client, store, [(reserved_sku, 1)])
        await refused(reserved["order_id"], "reserve", 409)

        # cancelled: cannot be confirmed or reserved; a second cancel is 202 and changes nothing
        cancelled = await create_reserved(client, store, [(cancelled_sku, 2)])
        cancelled_id = cancelled["order_id"]
        first = await client.post(f"/orders/{cancelled_id}/cancel")
        assert first.status_code == 202 and first.json()["status"] == "cancelled", first.text

        async def released() -> dict[str, Any]:
            item = await stock_item(client, store, cancelled_sku)
            assert (item["on_hand"], item["reserved"]) == (10, 0)
            return item

        released_item = await eventually(released, timeout=30)
        second = await client.post(f"/orders/{cancelled_id}/cancel")
        assert second.status_code == 202, second.text
        assert second.json() == first.json() == await order_of(client, cancelled_id)
        await refused(cancelled_id, "confirm", 409)
        await refused(cancelled_id, "reserve", 409)

        # confirmed: cannot be cancelled, confirmed or reserved again
        confirmed = await create_reserved(client, store, [(confirmed_sku, 3)])
        confirmed_id = confirmed["order_id"]
        assert (await client.post(f"/orders/{confirmed_id}/confirm")).status_code == 202
        assert (await wait_for_status(client, confirmed_id, {"confirmed", "expired"}))["status"] == "confirmed"
        sold_item = await stock_item(client, store, confirmed_sku)
        assert (sold_item["on_hand"], sold_item["reserved"]) == (7, 0)
        await refused(confirmed_id, "cancel", 409)
        await refused(confirmed_id, "confirm", 409)
        await refused(confirmed_id, "reserve", 409)

        # Stock, after everything above had its asynchronous answers: the refused commands and
        # the second cancel moved nothing.
        assert await stock_item(client, store, cancelled_sku) == released_item
        assert kinds_for(await movements(client, store, cancelled_sku), cancelled_id) == [
            "reserved", "released"]
        assert await stock_item(client, store, confirmed_sku) == sold_item
        assert kinds_for(await movements(client, store, confirmed_sku), confirmed_id) == [
            "reserved", "sold"]
        assert (await stock_item(client, store, short))["version"] == 1, "a rejection moves nothing"
    await assert_invariants(short_stack)


# --------------------------------------------------------------------------------------------
# races


async def test_confirm_against_expiry_either_sells_or_expires_each_hold(short_stack: Stack) -> None:
    """~60 holds, each confirmed within a few ms of its `reserved_until`: every one ends sold
    or expired, never both and never neither, and the ledger says the same unit by unit."""
    store = random_store()
    skus = [random_sku() for _ in range(4)]
    initial = 1000
    async with short_stack.client() as client:
        for sku in skus:
            await put_stock(client, short_stack.admin, store, sku, initial)
        lines_of = [[(skus[i % 4], 1 + i % 3)] + ([(skus[(i + 1) % 4], 2)] if i % 2 else [])
                    for i in range(60)]
        responses = await asyncio.gather(*(
            create_order(client, store, lines, customer=f"race-{i}") for i, lines in enumerate(lines_of)))
        assert all(r.status_code == 202 for r in responses)
        ids = [r.json()["order_id"] for r in responses]
        seen = await asyncio.gather(*(
            wait_for_status(client, i, {"reserved", "expired"}, timeout=60) for i in ids))
        # On a loaded machine an answer can come so late that the hold ran out before it was
        # seen; such an order is not raced, but the ledger checks below still apply to it.
        held = [o for o in seen if o["status"] == "reserved" and seconds_left(o) > 0.1]
        assert len(held) >= 30, f"only {len(held)} of 60 holds were seen in time to race them"

        async def confirm_around_expiry(order: dict[str, Any], n: int) -> int:
            lead = 0.06 - 0.01 * (n % 9)  # from 60 ms before reserved_until to 20 ms after
            await asyncio.sleep(max(0.0, seconds_left(order) - lead))  # a wall-clock instant
            response = await client.post(f"/orders/{order['order_id']}/confirm")
            assert response.status_code in (202, 410), response.text
            if response.status_code == 202:
                assert response.json()["status"] == "confirming"
            return response.status_code

        codes = await asyncio.gather(*(confirm_around_expiry(o, n) for n, o in enumerate(held)))
        final = await asyncio.gather(*(
            wait_for_status(client, i, {"confirmed", "expired"}, timeout=60) for i in ids))
        status = {o["order_id"]: o["status"] for o in final}
        for order_id, code in zip((o["order_id"] for o in held), codes):
            if code == 410:
                assert status[order_id] == "expired", "a confirm refused with 410 cannot sell"

        ledger = await ledger_by_order(short_stack, store)
        sold_units = Counter[str]()
        for order_id, lines in zip(ids, lines_of):
            moved = ledger.get(order_id, Counter())
            expected = Counter({(sku, "reserved", 0, q): 1 for sku, q in lines})
            if status[order_id] == "confirmed":
                expected.update({(sku, "sold", -q, -q): 1 for sku, q in lines})
                sold_units.update({sku: q for sku, q in lines})
            else:
                expected.update({(sku, "expired", 0, -q): 1 for sku, q in lines})
            assert moved == expected, (status[order_id], dict(moved))

        for sku in skus:
            item = await stock_item(client, store, sku)
            assert (item["on_hand"], item["reserved"]) == (initial - sold_units[sku], 0), (sku, item)
        outcome = Counter(status.values())
        assert outcome["confirmed"] + outcome["expired"] == 60, outcome
    await assert_invariants(short_stack)


async def test_three_workers_expire_each_hold_exactly_once(short_stack: Stack) -> None:
    """~100 holds left to run out: three workers sweep them, each exactly once."""
    store = random_store()
    skus = [random_sku() for _ in range(10)]
    async with short_stack.client() as client:
        for sku in skus:
            await put_stock(client, short_stack.admin, store, sku, 1000)
        lines_of = [[(skus[(i + k) % 10], 1 + (i + k) % 2) for k in range(1 + i % 3)] for i in range(100)]
        responses = await asyncio.gather(*(
            create_order(client, store, lines, customer=f"sweep-{i}") for i, lines in enumerate(lines_of)))
        assert all(r.status_code == 202 for r in responses)
        ids = [r.json()["order_id"] for r in responses]

        final = await asyncio.gather(*(wait_for_status(client, i, {"expired"}, timeout=90) for i in ids))
        assert all(o["reason"] == "reservation_expired" for o in final)

        ledger = await ledger_by_order(short_stack, store)
        for order_id, lines in zip(ids, lines_of):
            expected = Counter({(sku, kind, 0, delta * q): 1
                                for sku, q in lines for kind, delta in (("reserved", 1), ("expired", -1))})
            assert ledger.get(order_id) == expected, (order_id, dict(ledger.get(order_id, {})))
        for sku in skus:
            item = await stock_item(client, store, sku)
            assert (item["on_hand"], item["reserved"]) == (1000, 0), item
    await assert_invariants(short_stack)


# --------------------------------------------------------------------------------------------
# a cancel that reaches stock before, with or after its order


async def test_pending_order_cannot_be_confirmed_and_a_cancel_before_stock_holds_nothing(
    short_stack: Stack,
) -> None:
    """With the workers stopped, orders stay `pending`: confirm and reserve are 409; a cancel
    is accepted, and once stock sees the order (after its cancel, or before it) nothing stays held."""
    store, sku = random_store(), random_sku()
    async with short_stack.client() as client:
        await put_stock(client, short_stack.admin, store, sku, 10)
        async with workers_stopped(short_stack):
            pending_id = (await create_order(client, store, [(sku, 1)])).json()["order_id"]
            before = await order_of(client, pending_id)
            assert before["status"] == "pending"
            for command in ("confirm", "reserve"):
                response = await client.post(f"/orders/{pending_id}/{command}")
                assert is_problem(response, 409), (command, response.text)
            assert await order_of(client, pending_id) == before

            cancelled_id = (await create_order(client, store, [(sku, 5)])).json()["order_id"]
            response = await client.post(f"/orders/{cancelled_id}/cancel")
            assert response.status_code == 202 and response.json()["status"] == "cancelled"

        held = await wait_for_status(client, pending_id, {"reserved", "rejected"}, timeout=60)
        assert held["status"] == "reserved", held

        async def settled() -> None:
            kinds = Counter(kinds_for(await movements(client, store, sku), cancelled_id))
            assert kinds["reserved"] == kinds["released"] + kinds["expired"] <= 1, (
                "a hold of the cancelled order was never let go", kinds)
            assert kinds["sold"] == 0
            item = await stock_item(client, store, sku)
            assert item["reserved"] in (0, 1), item  # only the first order may still be held

        await eventually(settled, timeout=30)
        assert (await order_of(client, cancelled_id))["status"] == "cancelled"
    await assert_invariants(short_stack)


async def test_cancel_racing_its_own_order_holds_nothing(short_stack: Stack) -> None:
    """200 orders, each cancelled as soon as its POST answered: at stock the cancel may come
    before, during or after the order's creation; in every case the order ends `cancelled`
    and holds nothing."""
    store = random_store()
    skus = [random_sku() for _ in range(5)]
    async with short_stack.client() as client:
        for sku in skus:
            await put_stock(client, short_stack.admin, store, sku, 1000)
        lines_of = [[(skus[i % 5], 1 + i % 3)] + ([(skus[(i + 2) % 5], 1)] if i % 2 else [])
                    for i in range(200)]

        async def order_and_cancel(n: int) -> str:
            response = await create_order(client, store, lines_of[n], customer=f"cancel-{n}")
            assert response.status_code == 202, response.text
            order_id = response.json()["order_id"]
            response = await client.post(f"/orders/{order_id}/cancel")
            assert response.status_code == 202, response.text
            assert response.json()["status"] == "cancelled"
            return order_id

        ids = await asyncio.gather(*(order_and_cancel(n) for n in range(200)))

        async def nothing_held() -> None:
            ledger = await ledger_by_order(short_stack, store)
            for order_id in ids:
                kinds = Counter[str]()
                for (_sku, kind, _on_hand, _reserved), n in ledger.get(order_id, Counter()).items():
                    kinds[kind] += n
                assert kinds["sold"] == 0, (order_id, kinds)
                assert kinds["reserved"] == kinds["released"] + kinds["expired"], (
                    "a hold of a cancelled order was never let go", order_id, kinds)
            for sku in skus:
                item = await stock_item(client, store, sku)
                assert (item["on_hand"], item["reserved"]) == (1000, 0), item

        await eventually(nothing_held, timeout=60, interval=0.5)
        orders = await asyncio.gather(*(order_of(client, i) for i in ids))
        assert Counter(o["status"] for o in orders) == {"cancelled": 200}
    await assert_invariants(short_stack)
