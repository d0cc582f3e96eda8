"""The stock workers against a real stack (3 worker processes): contention on crossing lines,
redelivery through the inbox, and poison messages to the dead-letter queue."""

import asyncio
import json
import random
import uuid
from collections import defaultdict
from typing import Any

import aio_pika
import asyncpg
import httpx

from shared.events import Line, PedidoCriado
from shared.messaging import STOCK_ORDERS
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

SETTLE = {"reserved", "rejected"}


# ----- helpers --------------------------------------------------------------------------------

async def deadlocks(conn: asyncpg.Connection) -> int:
    """Deadlocks PostgreSQL detected in this database (the worker retries them silently)."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return await conn.fetchval(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")


def worker_logs_mentioning(stack: Stack, word: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(stack.log_dir.glob("worker-*.log")):
        hits = [line for line in path.read_text(errors="replace").splitlines() if word in line.lower()]
        if hits:
            found[path.name] = hits[:5]
    return found


async def queue_depth(stack: Stack, queue: str) -> int:
    """Ready + unacknowledged messages of a queue in the stack's vhost (rabbitmqctl)."""
    assert stack.rabbit is not None
    done = await asyncio.to_thread(
        stack.rabbit.ctl, "list_queues", "-p", f"test-{stack.name}", "name", "messages",
        "--no-table-headers", "--quiet")
    for row in done.stdout.splitlines():
        parts = row.split()
        if len(parts) == 2 and parts[0] == queue:
            return int(parts[1])
    raise AssertionError(f"queue {queue} not listed: {done.stdout!r} {done.stderr!r}")


def order_event(store: str, items: list[tuple[str, int]], order_id: uuid.UUID | None = None) -> PedidoCriado:
    return PedidoCriado(order_id=order_id or uuid.uuid4(), attempt=1, customer_id="c-raw",
                        store_id=store, items=[Line(sku=s, quantity=q) for s, q in items])


async def publish(stack: Stack, event: PedidoCriado, message_id: str | None = None) -> str:
    message_id = message_id or str(event.event_id)
    await stack.publish_raw(event.model_dump_json().encode(), "PedidoCriado", message_id,
                            correlation_id=str(event.order_id))
    return message_id


async def item(conn: asyncpg.Connection, store: str, sku: str) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT on_hand, reserved, version FROM stock_item WHERE store_id = $1 AND sku = $2", store, sku)
    assert row is not None, (store, sku)
    return row


async def wait_reserved(conn: asyncpg.Connection, store: str, sku: str, reserved: int) -> None:
    async def check() -> None:
        assert (await item(conn, store, sku))["reserved"] == reserved

    await eventually(check, timeout=30)


def header(headers: dict[str, Any], name: str) -> str | None:
    value = headers.get(name)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return None if value is None else str(value)


# ----- a. contention ----------------------------------------------------------------------------

async def test_500_concurrent_orders_on_crossing_lines(stack: Stack) -> None:
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    store = random_store()
    skus = [random_sku(f"X{i:02d}") for i in range(20)]
    # Demand is about 500 orders x 3 lines x 2 units / 20 skus = 150 units per sku: some orders
    # must be refused, many can be held.
    on_hand = {sku: rng.randint(40, 120) for sku in skus}
    orders_items = []
    for _ in range(500):
        chosen = rng.sample(skus, rng.randint(2, 4))  # random order: lines cross between orders
        orders_items.append([(sku, rng.randint(1, 3)) for sku in chosen])

    conn = await stack.stock_db()
    try:
        deadlocks_before = await deadlocks(conn)
        async with stack.client() as client:
            await asyncio.gather(*(put_stock(client, stack.admin, store, s, n) for s, n in on_hand.items()))
            gate = asyncio.Semaphore(100)

            async def submit(i: int, items: list[tuple[str, int]]) -> httpx.Response:
                async with gate:
                    return await create_order(client, store, items, customer=f"c-{i}")

            responses = await asyncio.gather(*(submit(i, it) for i, it in enumerate(orders_items)))
            assert [r.status_code for r in responses] == [202] * 500, \
                {r.status_code: r.text for r in responses if r.status_code != 202}
            ids = [r.json()["order_id"] for r in responses]
            assert len(set(ids)) == 500

            async def settled(order_id: str) -> dict[str, Any]:
                async with gate:
                    return await wait_for_status(client, order_id, SETTLE, timeout=60)

            final = await asyncio.gather(*(settled(i) for i in ids))

        by_status: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for order in final:
            by_status[order["status"]].append(order)
        assert set(by_status) <= SETTLE
        reserved_orders, rejected_orders = by_status["reserved"], by_status["rejected"]
        context = f"seed={seed} reserved={len(reserved_orders)} rejected={len(rejected_orders)}"
        assert reserved_orders and rejected_orders, context

        # The orders' own items are what the orders service reports back.
        for order, items in zip(final, orders_items):
            assert [(line["sku"], line["quantity"]) for line in order["items"]] == items, context

        # 1. No worker ran into a deadlock.
        assert worker_logs_mentioning(stack, "deadlock") == {}, context
        assert await deadlocks(conn) == deadlocks_before, f"PostgreSQL detected deadlocks; {context}"

        # 2. The ledger, the held lines and the figures agree.
        figures = await check_stock_invariants(conn)

        # 3. Every sku holds exactly what the reserved orders asked for, never more than on hand.
        expected = {sku: 0 for sku in skus}
        for order in reserved_orders:
            for line in order["items"]:
                expected[line["sku"]] += line["quantity"]
        actual = {sku: figures[(store, sku)]["reserved"] for sku in skus}
        assert actual == expected, context
        assert {sku: figures[(store, sku)]["on_hand"] for sku in skus} == on_hand, context
        for sku in skus:
            assert expected[sku] <= on_hand[sku], (sku, expected[sku], on_hand[sku], context)

        # 4. Stock's own view of each order: all lines held, or none.
        states = {str(r["order_id"]): r["state"] for r in await conn.fetch(
            "SELECT order_id, state FROM stock_order WHERE order_id = ANY($1::uuid[])",
            [uuid.UUID(i) for i in ids])}
        held_lines: dict[str, set[tuple[str, int]]] = defaultdict(set)
        for r in await conn.fetch("SELECT order_id, sku, quantity FROM hold WHERE store_id = $1", store):
            held_lines[str(r["order_id"])].add((r["sku"], r["quantity"]))
        ledger_lines: dict[str, int] = defaultdict(int)
        for r in await conn.fetch("""SELECT order_id, count(*) AS n FROM movement
                                     WHERE store_id = $1 AND kind = 'reserved' GROUP BY 1""", store):
            ledger_lines[str(r["order_id"])] = r["n"]
        for order in reserved_orders:
            oid = order["order_id"]
            assert order["reserved_until"] is not None, order
            assert states.get(oid) == "held", (oid, states.get(oid))
            assert held_lines[oid] == {(l["sku"], l["quantity"]) for l in order["items"]}, oid
            assert ledger_lines[oid] == len(order["items"]), oid

        # 5. A refusal is never wrong: stock only goes down during this test, so a line that was
        # short at decision time is still short now, and the reported figures are consistent.
        for order in rejected_orders:
            oid = order["order_id"]
            assert states.get(oid) == "rejected", (oid, states.get(oid))
            assert oid not in held_lines and ledger_lines[oid] == 0, oid
            assert order["reason"] == "insufficient_stock", order
            assert order["unavailable"], order
            requested = {l["sku"]: l["quantity"] for l in order["items"]}
            for short in order["unavailable"]:
                sku = short["sku"]
                assert short["requested"] == requested[sku], order
                now_available = on_hand[sku] - actual[sku]
                assert now_available <= short["available"] < short["requested"], (order, now_available)
            assert any(on_hand[s] - actual[s] < q for s, q in requested.items()), \
                f"order {oid} was refused though every line still fits; {context}"
    finally:
        await conn.close()


# ----- b. redelivery ----------------------------------------------------------------------------

async def test_a_redelivered_order_is_held_once(stack: Stack) -> None:
    store, sku, marker_sku = random_store(), random_sku(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
        await put_stock(client, stack.admin, store, marker_sku, 10)
    event = order_event(store, [(sku, 2)])  # an order the orders service never heard of
    message_id = str(event.event_id)

    conn = await stack.stock_db()
    try:
        await publish(stack, event, message_id)
        await publish(stack, event, message_id)  # the very same message again
        marker = order_event(store, [(marker_sku, 1)])
        await publish(stack, marker)  # published after both copies

        await wait_reserved(conn, store, marker_sku, 1)

        async def drained() -> None:
            assert await queue_depth(stack, STOCK_ORDERS) == 0  # both copies handled and acked

        await eventually(drained, timeout=30, interval=0.5)

        figures = await item(conn, store, sku)
        assert (figures["on_hand"], figures["reserved"]) == (10, 2)
        moves = await conn.fetch(
            "SELECT kind, reserved_delta FROM movement WHERE order_id = $1 ORDER BY id", event.order_id)
        assert [(m["kind"], m["reserved_delta"]) for m in moves] == [("reserved", 2)]
        assert await conn.fetchval("SELECT count(*) FROM inbox WHERE message_id = $1", message_id) == 1
        held = await conn.fetch("SELECT sku, quantity FROM hold WHERE order_id = $1", event.order_id)
        assert [(r["sku"], r["quantity"]) for r in held] == [(sku, 2)]
        answers = await conn.fetchval(
            """SELECT count(*) FROM outbox WHERE event_type = 'AtualizarStatus'
               AND correlation_id = $1""", str(event.order_id))
        # The relay may already have published and removed it; never more than one answer.
        assert answers <= 1
        await check_stock_invariants(conn)
    finally:
        await conn.close()


# ----- c. poison messages -----------------------------------------------------------------------

async def test_poison_messages_go_to_the_dead_letter_queue_and_the_queue_keeps_flowing(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 5)

    not_json_id, invalid_id = str(uuid.uuid4()), str(uuid.uuid4())
    not_json = b"{this is not json"
    body = json.loads(order_event(store, [(sku, 1)]).model_dump_json())
    body["items"][0]["quantity"] = "x"
    invalid = json.dumps(body).encode()
    await stack.publish_raw(not_json, "PedidoCriado", not_json_id)
    await stack.publish_raw(invalid, "PedidoCriado", invalid_id, correlation_id=body["order_id"])
    valid = order_event(store, [(sku, 3)])
    valid_id = await publish(stack, valid)

    dead: dict[str, aio_pika.IncomingMessage] = {}
    connection = await aio_pika.connect(stack.amqp_url)
    async with connection:
        channel = await connection.channel()
        dlq = await channel.declare_queue(f"{STOCK_ORDERS}.dlq", passive=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not {not_json_id, invalid_id} <= dead.keys() and loop.time() < deadline:
            message = await dlq.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.1)  # polling the queue, bounded by the deadline
                continue
            if message.message_id:
                dead[message.message_id] = message
    assert {not_json_id, invalid_id} <= dead.keys(), f"dead-lettered: {sorted(dead)}"
    assert dead[not_json_id].body == not_json
    assert dead[invalid_id].body == invalid
    for message_id in (not_json_id, invalid_id):
        reason = header(dict(dead[message_id].headers or {}), "x-dead-letter-reason")
        assert reason, (message_id, dead[message_id].headers)

    conn = await stack.stock_db()
    try:
        await wait_reserved(conn, store, sku, 3)  # the valid order behind them was handled
        assert await conn.fetchval(
            "SELECT count(*) FROM inbox WHERE message_id = ANY($1::text[])", [not_json_id, invalid_id]) == 0
        assert await conn.fetchval("SELECT count(*) FROM inbox WHERE message_id = $1", valid_id) == 1
        assert await conn.fetchval(
            "SELECT count(*) FROM stock_order WHERE order_id = $1", uuid.UUID(body["order_id"])) == 0
        assert await conn.fetchval(
            "SELECT state FROM stock_order WHERE order_id = $1", valid.order_id) == "held"

        async def drained() -> None:
            assert await queue_depth(stack, STOCK_ORDERS) == 0  # nothing left to retry

        await eventually(drained, timeout=30, interval=0.5)
        await check_stock_invariants(conn)
    finally:
        await conn.close()
