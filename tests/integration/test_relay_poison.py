"""No poison pill in the relay (API.md §6, shared/outbox.py): outbox rows the broker refuses —
properties beyond the frame size, a message no queue takes — are tried a bounded number of
times and set aside with their error, while the orders behind them are decided; the status
consumer, on a connection of its own, is never cut; `dlq outbox` lists them and `dlq resend`
puts them back. And the W3C `traceparent` header travels like the request id."""

import asyncio
import json
import subprocess
import uuid
from collections.abc import Iterator

import aio_pika
import httpx
import pytest

from shared.events import PedidoCancelado, PedidoConfirmado, PedidoCriado
from shared.messaging import EXCHANGE, STOCK_ORDERS, build_message
from shared.outbox import RETRIES
from tests.helpers import (
    create_order,
    eventually,
    put_stock,
    random_sku,
    random_store,
    wait_for_status,
)
from tooling.stack import BIN, Stack


@pytest.fixture(scope="module")
def poison_stack(infrastructure: None) -> Iterator[Stack]:
    running = Stack(f"p{uuid.uuid4().hex[:8]}", workers=1).start()
    yield running
    running.stop()


INSERT = """INSERT INTO outbox (event_id, event_type, correlation_id, request_id, body)
            VALUES ($1, $2, $3, $4, $5::jsonb) RETURNING id"""


async def set_aside_total(stack: Stack) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{stack.ports['orders']}/metrics")).text
    lines = [line for line in text.splitlines() if line.startswith('outbox_set_aside_total{lane="orders"}')]
    return float(lines[0].split()[-1]) if lines else 0.0


def dlq(stack: Stack, *args: str) -> str:
    done = subprocess.run([str(BIN / "dlq"), *args], env=stack.env(), capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout


async def test_refused_rows_are_set_aside_and_the_orders_behind_them_are_decided(poison_stack: Stack) -> None:
    stack = poison_stack
    store, sku = random_store(), random_sku()
    # PedidoConfirmado reaches no queue for now: mandatory, so the broker returns it.
    connection = await aio_pika.connect(stack.amqp_url)
    channel = await connection.channel()
    queue = await channel.declare_queue(STOCK_ORDERS, passive=True)
    await queue.unbind(EXCHANGE, routing_key="PedidoConfirmado")
    conn = await stack.orders_db()
    try:
        async with stack.client() as client:
            await put_stock(client, stack.admin, store, sku, 100)
            # One request id of 140,000 characters (the header no longer fits in a frame) and
            # one message no queue takes, at the head of the outbox...
            huge = PedidoCriado(order_id=uuid.uuid4(), attempt=1, customer_id="c", store_id=store,
                                items=[{"sku": sku, "quantity": 1}])  # type: ignore[list-item]
            lost = PedidoConfirmado(order_id=uuid.uuid4(), attempt=1)
            huge_id = await conn.fetchval(INSERT, huge.event_id, "PedidoCriado", str(huge.order_id),
                                          "r" * 140_000, huge.model_dump_json())
            lost_id = await conn.fetchval(INSERT, lost.event_id, "PedidoConfirmado", str(lost.order_id),
                                          None, lost.model_dump_json())
            # ...and normal orders behind them, all decided.
            created = [await create_order(client, store, [(sku, 1)]) for _ in range(5)]
            assert all(r.status_code == 202 for r in created)
            decided = await asyncio.gather(*(wait_for_status(client, r.json()["order_id"], {"reserved"}, timeout=30)
                                             for r in created))
            assert len(decided) == 5

            async def both_set_aside() -> list[dict[str, object]]:
                rows = [dict(r) for r in await conn.fetch(
                    "SELECT id, attempts, error FROM outbox_set_aside ORDER BY id")]
                assert [r["id"] for r in rows] == [huge_id, lost_id], rows
                return rows

            huge_row, lost_row = await eventually(both_set_aside, timeout=60, interval=0.2)
            assert "FrameTooLarge" in str(huge_row["error"]) and huge_row["attempts"] == 1
            assert "PublishError" in str(lost_row["error"]) and lost_row["attempts"] == RETRIES
            assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
            assert await set_aside_total(stack) == 2

            # Orders keep being decided afterwards, by the same status consumer.
            later = await create_order(client, store, [(sku, 1)])
            await wait_for_status(client, later.json()["order_id"], {"reserved"}, timeout=30)

            # Listed, then put back once the binding is there again: published this time.
            listed = [json.loads(line) for line in (await asyncio.to_thread(dlq, stack, "outbox", "orders")).splitlines()]
            assert [row["id"] for row in listed] == [huge_id, lost_id]
            assert listed[0]["body_bytes"] > 0 and "FrameTooLarge" in listed[0]["error"]
            await queue.bind(EXCHANGE, routing_key="PedidoConfirmado")
            out = await asyncio.to_thread(dlq, stack, "resend", "orders", "--id", str(lost_id))
            assert "put 1 row(s) back" in out

            async def resent() -> None:
                assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
                assert [r["id"] for r in await conn.fetch("SELECT id FROM outbox_set_aside")] == [huge_id]
                stock = await stack.stock_db()
                try:
                    assert await stock.fetchval("SELECT count(*) FROM inbox WHERE message_id = $1",
                                                str(lost.event_id)) == 1
                finally:
                    await stock.close()

            await eventually(resent, timeout=30, interval=0.2)
    finally:
        await conn.close()
        await connection.close()


async def test_the_traceparent_of_a_message_travels_into_the_messages_it_causes(poison_stack: Stack) -> None:
    stack = poison_stack
    store, sku = random_store(), random_sku()
    trace = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
    connection = await aio_pika.connect(stack.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        answers = await channel.declare_queue(exclusive=True)
        await answers.bind(EXCHANGE, routing_key="AtualizarStatus")
        async with stack.client() as client:
            await put_stock(client, stack.admin, store, sku, 10)
            order_id = (await create_order(client, store, [(sku, 1)])).json()["order_id"]
            await wait_for_status(client, order_id, {"reserved"})
        # A cancel carrying a trace context: stock's answer (written by the handler into the
        # outbox, published by the relay) carries the same one.
        cancel = PedidoCancelado(order_id=uuid.UUID(order_id), attempt=1)
        exchange = await channel.get_exchange(EXCHANGE)
        await exchange.publish(build_message(body=cancel.model_dump_json().encode(), event_id=str(cancel.event_id),
                                             event_type="PedidoCancelado", correlation_id=order_id,
                                             request_id=None, traceparent=trace), routing_key="PedidoCancelado")

        async def released() -> aio_pika.abc.AbstractIncomingMessage:
            while (message := await answers.get(no_ack=True, fail=False)) is not None:
                if message.correlation_id == order_id and b"ReservaLiberada" in message.body:
                    return message
            raise AssertionError("no ReservaLiberada yet")

        message = await eventually(released, timeout=30, interval=0.1)
        assert message.headers["traceparent"] == trace
    finally:
        await connection.close()
