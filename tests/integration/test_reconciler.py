"""An order is never `pending` for good (API.md §6): stock answers again a decision it already
made, and the orders reconciler asks again when a PedidoCriado or its answer was lost."""

import asyncio
import json
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest

from orders.db import CLAIM_UNSETTLED
from orders.reconciler import reconcile_once
from shared.db import create_pool, migrate
from shared.events import Line, PedidoCancelado, PedidoConfirmado, PedidoCriado
from shared.messaging import EXCHANGE, ORDERS_STATUS, STOCK_ORDERS
from shared.settings import Settings
from tests.helpers import (
    create_order,
    eventually,
    put_stock,
    random_sku,
    random_store,
    wait_for_status,
)
from tooling.devenv import local_servers, wait_ready
from tooling.invariants import check_stock_invariants
from tooling.migrate import MIGRATIONS
from tooling.stack import Stack

WORKERS = 2


@pytest.fixture(scope="module")
def stack(infrastructure: None) -> Iterator[Stack]:
    """Unsettled orders are asked about again after 2 s (the contract's default: 2 minutes)."""
    running = Stack(f"r{uuid.uuid4().hex[:8]}", workers=WORKERS, env_overrides={
        "RECONCILE_AFTER_SECONDS": "2", "RECONCILE_INTERVAL_SECONDS": "0.3"}).start()
    yield running
    running.stop()


class Answers:
    """Every AtualizarStatus published in the stack's vhost, by order id (a queue of our own
    bound next to `orders.status`, so the orders service still gets its copies)."""

    def __init__(self) -> None:
        self.by_order: dict[str, list[dict[str, Any]]] = defaultdict(list)

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        self.by_order[body["order_id"]].append(body)

    async def wait(self, order_id: uuid.UUID, count: int) -> list[dict[str, Any]]:
        async def arrived() -> list[dict[str, Any]]:
            got = self.by_order[str(order_id)]
            assert len(got) >= count, got
            return got

        return await eventually(arrived, timeout=30)


@pytest.fixture
async def answers(stack: Stack) -> AsyncIterator[Answers]:
    collected = Answers()
    connection = await aio_pika.connect(stack.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await queue.bind(EXCHANGE, routing_key="AtualizarStatus")
        await queue.consume(collected.on_message, no_ack=True)
        yield collected


async def send(stack: Stack, event: Any) -> None:
    """Publishes a command as orders would, each time as a new message (its own event id)."""
    fresh = event.model_copy(update={"event_id": uuid.uuid4()})
    await stack.publish_raw(fresh.model_dump_json().encode(), fresh.event_type, str(fresh.event_id),
                            correlation_id=str(fresh.order_id))


def created(store: str, sku: str, quantity: int) -> PedidoCriado:
    return PedidoCriado(order_id=uuid.uuid4(), attempt=1, customer_id="c-again", store_id=store,
                        items=[Line(sku=sku, quantity=quantity)])


def decision(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer without what differs between two sendings of it."""
    return {k: v for k, v in answer.items() if k not in ("event_id", "occurred_at")}


async def figures(stack: Stack, store: str, sku: str) -> tuple[int, int, int]:
    conn = await stack.stock_db()
    try:
        row = await conn.fetchrow("SELECT on_hand, reserved, version FROM stock_item "
                                  "WHERE store_id = $1 AND sku = $2", store, sku)
        assert row is not None
        return row["on_hand"], row["reserved"], row["version"]
    finally:
        await conn.close()


# ----- stock answers again ---------------------------------------------------------------------

async def test_a_held_order_asked_again_gets_the_same_hold_and_holds_nothing_more(
    stack: Stack, answers: Answers
) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 5)
    order = created(store, sku, 2)
    await send(stack, order)
    [first] = await answers.wait(order.order_id, 1)
    assert first["status"] == "EstoqueReservado" and first["reserved_until"]
    before = await figures(stack, store, sku)
    await send(stack, order)  # a new message for the same attempt
    await send(stack, order)
    got = await answers.wait(order.order_id, 3)
    assert [decision(a) for a in got] == [decision(first)] * 3
    assert len({a["event_id"] for a in got}) == 3
    assert await figures(stack, store, sku) == before == (5, 2, 2)


async def test_a_rejected_order_asked_again_is_rejected_again_even_if_it_would_fit_now(
    stack: Stack, answers: Answers
) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 1)
        order = created(store, sku, 3)
        await send(stack, order)
        [first] = await answers.wait(order.order_id, 1)
        assert first["status"] == "EstoqueNaoDisponivel"
        assert first["reason"] == "insufficient_stock"
        assert first["unavailable"] == [{"sku": sku, "requested": 3, "available": 1}]
        response = await client.put(f"/stores/{store}/stock/{sku}", headers=stack.admin,
                                    json={"on_hand": 10, "expected_version": 1})
        assert response.status_code == 200, response.text  # it would fit now
    await send(stack, order)
    got = await answers.wait(order.order_id, 2)
    assert decision(got[1]) == decision(first)
    assert (await figures(stack, store, sku))[:2] == (10, 0)


async def test_an_order_sold_or_released_since_is_answered_with_its_current_state(
    stack: Stack, answers: Answers
) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 10)
    sold, released = created(store, sku, 2), created(store, sku, 3)
    for order in (sold, released):
        await send(stack, order)
        await answers.wait(order.order_id, 1)
    await send(stack, PedidoConfirmado(order_id=sold.order_id, attempt=1))
    await send(stack, PedidoCancelado(order_id=released.order_id, attempt=1))
    assert (await answers.wait(sold.order_id, 2))[1]["status"] == "EstoqueBaixado"
    assert (await answers.wait(released.order_id, 2))[1]["status"] == "ReservaLiberada"
    after = await figures(stack, store, sku)
    assert after[:2] == (8, 0)

    await send(stack, sold)  # PedidoCriado again, for both
    await send(stack, released)
    await send(stack, PedidoConfirmado(order_id=sold.order_id, attempt=1))  # and the confirm again
    got = await answers.wait(sold.order_id, 4)
    assert [a["status"] for a in got[2:]] == ["EstoqueBaixado"] * 2
    assert (await answers.wait(released.order_id, 3))[2]["status"] == "ReservaLiberada"
    assert await figures(stack, store, sku) == after
    conn = await stack.stock_db()
    try:
        await check_stock_invariants(conn)
    finally:
        await conn.close()


async def test_a_late_pedido_criado_for_a_cancel_tombstone_still_gets_no_answer(
    stack: Stack, answers: Answers
) -> None:
    """Stock never decided an order whose cancel came first: nobody waits on it, nothing is
    answered (an answer, had there been one, would come before the marker's: one relay lane
    publishes in outbox order, and the marker is sent after the late order was handled)."""
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 5)
    order, marker = created(store, sku, 1), created(store, sku, 1)
    await send(stack, PedidoCancelado(order_id=order.order_id, attempt=1))
    late = order.model_copy(update={"event_id": uuid.uuid4()})
    await stack.publish_raw(late.model_dump_json().encode(), "PedidoCriado", str(late.event_id),
                            correlation_id=str(order.order_id))
    conn = await stack.stock_db()
    try:
        async def handled() -> None:
            assert await conn.fetchval("SELECT count(*) FROM inbox WHERE message_id = $1",
                                       str(late.event_id)) == 1

        await eventually(handled, timeout=30)
        assert await conn.fetchval("SELECT state FROM stock_order WHERE order_id = $1", order.order_id) == "cancelled"
    finally:
        await conn.close()
    await send(stack, marker)
    await answers.wait(marker.order_id, 1)
    assert answers.by_order[str(order.order_id)] == []
    assert (await figures(stack, store, sku))[:2] == (5, 1)  # the marker's hold only


async def test_many_orders_asked_again_at_once_each_get_their_decision_once_per_asking(
    stack: Stack, answers: Answers
) -> None:
    """Concurrent re-asks, spread over the workers and batched with first askings, never hold
    twice and never answer something else."""
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 50)
    orders = [created(store, sku, 1) for _ in range(80)]  # 50 fit, 30 do not
    await asyncio.gather(*(send(stack, o) for o in orders))
    firsts = {o.order_id: (await answers.wait(o.order_id, 1))[0] for o in orders}
    assert sorted(a["status"] for a in firsts.values()).count("EstoqueReservado") == 50
    await asyncio.gather(*(send(stack, o) for o in orders for _ in range(3)))
    for o in orders:
        got = await answers.wait(o.order_id, 4)
        assert [decision(a) for a in got] == [decision(firsts[o.order_id])] * 4
    assert (await figures(stack, store, sku))[:2] == (50, 50)
    conn = await stack.stock_db()
    try:
        await check_stock_invariants(conn)
    finally:
        await conn.close()


# ----- the reconciler: lost commands and lost answers --------------------------------------------

def stop_workers(stack: Stack) -> None:
    for i in range(WORKERS):
        stack.kill(f"worker-{i}")


def start_workers(stack: Stack) -> None:
    for i in range(WORKERS):
        stack.start_worker(i)


def restart_orders(stack: Stack) -> None:
    stack.start_process("orders", "orders-service")
    assert wait_ready(f"http://127.0.0.1:{stack.ports['orders']}/health/ready", timeout=60)


async def depth(stack: Stack, queue: str) -> int:
    assert stack.rabbit is not None
    done = await asyncio.to_thread(stack.rabbit.ctl, "list_queues", "-p", f"test-{stack.name}",
                                   "name", "messages", "--no-table-headers", "--quiet")
    counts = {row.split()[0]: int(row.split()[1]) for row in done.stdout.splitlines() if len(row.split()) == 2}
    return counts[queue]


async def dead_letter(stack: Stack, queue: str, order_id: str, event_type: str) -> None:
    """Takes the order's message off `queue` and rejects it: the broker dead-letters it."""
    connection = await aio_pika.connect(stack.amqp_url)
    async with connection:
        channel = await connection.channel()
        source = await channel.declare_queue(queue, passive=True)

        async def rejected() -> None:
            message = await source.get(no_ack=False, fail=False)
            assert message is not None, f"no {event_type} for {order_id} in {queue} yet"
            if message.correlation_id != order_id or message.type != event_type:
                await message.nack(requeue=True)
                raise AssertionError(f"{message.type} {message.correlation_id}: not the one")
            await message.reject(requeue=False)

        await eventually(rejected, timeout=30, interval=0.2)

        async def in_dlq() -> None:
            dlq = await channel.declare_queue(f"{queue}.dlq", passive=True)
            assert dlq.declaration_result.message_count >= 1

        await eventually(in_dlq, timeout=10)


async def held(stack: Stack, order_id: str) -> list[tuple[str, int]]:
    conn = await stack.stock_db()
    try:
        rows = await conn.fetch("SELECT sku, quantity FROM hold WHERE order_id = $1", uuid.UUID(order_id))
        await check_stock_invariants(conn)
        return [(r["sku"], r["quantity"]) for r in rows]
    finally:
        await conn.close()


async def test_an_order_whose_pedido_criado_was_dead_lettered_is_decided(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 5)
        stop_workers(stack)
        try:
            response = await create_order(client, store, [(sku, 2)])
            assert response.status_code == 202, response.text
            order_id = response.json()["order_id"]
            await dead_letter(stack, STOCK_ORDERS, order_id, "PedidoCriado")
        finally:
            start_workers(stack)
        order = await wait_for_status(client, order_id, {"reserved"}, timeout=60)
    assert order["reserved_until"]
    assert await held(stack, order_id) == [(sku, 2)]
    assert (await figures(stack, store, sku))[:2] == (5, 2)


async def test_an_order_whose_answer_was_purged_is_decided(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 5)
        stop_workers(stack)
        response = await create_order(client, store, [(sku, 3)])
        assert response.status_code == 202, response.text
        order_id = response.json()["order_id"]

        async def published() -> None:
            assert await depth(stack, STOCK_ORDERS) >= 1

        await eventually(published, timeout=30)
        stack.kill("orders")  # nobody takes the answer off orders.status now
        start_workers(stack)

        async def answered() -> None:
            assert (await figures(stack, store, sku))[1] == 3
            assert await depth(stack, ORDERS_STATUS) >= 1

        await eventually(answered, timeout=30)
        assert stack.rabbit is not None
        stack.rabbit.ctl("purge_queue", "-p", f"test-{stack.name}", ORDERS_STATUS)
        restart_orders(stack)
        order = await wait_for_status(client, order_id, {"reserved"}, timeout=60)
    assert order["reserved_until"]
    assert await held(stack, order_id) == [(sku, 3)]
    assert (await figures(stack, store, sku))[:2] == (5, 3)  # held once, whatever was asked


async def test_a_confirming_order_whose_pedido_confirmado_was_dead_lettered_is_confirmed(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 5)
        response = await create_order(client, store, [(sku, 2)])
        order_id = response.json()["order_id"]
        await wait_for_status(client, order_id, {"reserved"})
        stop_workers(stack)
        try:
            confirm = await client.post(f"/orders/{order_id}/confirm")
            assert confirm.status_code in (200, 202), confirm.text
            await dead_letter(stack, STOCK_ORDERS, order_id, "PedidoConfirmado")
        finally:
            start_workers(stack)
        await wait_for_status(client, order_id, {"confirmed"}, timeout=60)
    assert await held(stack, order_id) == []
    assert (await figures(stack, store, sku))[:2] == (3, 0)  # sold once


# ----- several reconcilers at once ---------------------------------------------------------------

@pytest.fixture
async def orders_database(infrastructure: None) -> AsyncIterator[str]:
    """A migrated orders database of its own, with no process running on it."""
    settings = Settings()
    pg, _ = local_servers(settings)
    assert pg is not None
    parts = urlsplit(settings.orders_database_url)
    dsn = urlunsplit(parts._replace(path=f"/orders_rc{uuid.uuid4().hex[:8]}"))
    await pg.ensure_database(dsn, fresh=True)
    await migrate(pg.migrator_dsn(dsn), MIGRATIONS["orders"])
    yield dsn
    conn = await asyncpg.connect(pg.admin_dsn())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{urlsplit(dsn).path[1:]}" WITH (FORCE)')
    finally:
        await conn.close()


async def add_orders(conn: asyncpg.Connection, status: str, count: int, age_seconds: float) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(count)]
    await conn.execute("""
        INSERT INTO orders (order_id, customer_id, store_id, items, status, attempt, updated_at)
        SELECT id, 'c-rc', 'S-rc', '[{"sku": "A", "quantity": 1}]', $2, 2,
               now() - make_interval(secs => $3)
        FROM unnest($1::uuid[]) AS id""", ids, status, age_seconds)
    return ids


async def test_many_reconcilers_at_once_ask_about_each_order_once_per_period(orders_database: str) -> None:
    setup = await asyncpg.connect(orders_database)
    pools = [await create_pool(orders_database, 2) for _ in range(8)]
    try:
        pending = await add_orders(setup, "pending", 300, 600)
        confirming = await add_orders(setup, "confirming", 40, 600)
        await add_orders(setup, "pending", 50, 0)  # too young
        await add_orders(setup, "reserved", 50, 600)  # settled

        async def drain(pool: asyncpg.Pool) -> int:
            done = 0
            while (n := await reconcile_once(pool, 60, 25)) > 0:
                done += n
            return done

        counts = await asyncio.gather(*(drain(pool) for pool in pools for _ in range(2)))
        assert sum(counts) == 340
        assert sum(1 for n in counts if n) > 1  # the work was shared, not done by one
        rows = [{"event_type": r["event_type"], "body": json.loads(r["body"])}
                for r in await setup.fetch("SELECT event_type, body FROM outbox")]
        asked = [(r["event_type"], uuid.UUID(r["body"]["order_id"]), r["body"]["attempt"]) for r in rows]
        assert sorted(asked) == sorted([("PedidoCriado", i, 2) for i in pending]
                                       + [("PedidoConfirmado", i, 2) for i in confirming])
        created_again = next(r["body"] for r in rows if r["event_type"] == "PedidoCriado")
        assert created_again["items"] == [{"sku": "A", "quantity": 1}]
        assert created_again["store_id"] == "S-rc"

        assert await drain(pools[0]) == 0  # asked this period: not again before the next
        await setup.execute("UPDATE orders SET asked_at = asked_at - interval '10 minutes'")
        assert await drain(pools[0]) == 340

        await setup.execute("SET enable_seqscan = off")  # the look is an index scan, not a full one
        plan = "\n".join(r[0] for r in await setup.fetch("EXPLAIN " + CLAIM_UNSETTLED, 60.0, 25))
        assert "Index" in plan and "Seq Scan" not in plan, plan
    finally:
        await asyncio.gather(*(pool.close() for pool in pools))
        await setup.close()
