"""The outbox hand-over (shared/handover.py) against real PostgreSQL and RabbitMQ: rows a writer
claims are published once, by that writer, even while other processes' relays look at the
outbox all the time; a claimed row whose writer died is published by a relay once it is an
orphan; a claimed row the broker refuses goes to the relays' refusal machinery (set aside)."""

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage

from orders.service import Intake
from shared import outbox
from shared.broker import Broker, open_broker
from shared.events import PedidoConfirmado
from shared.handover import WRITTEN_COLUMNS
from shared.messaging import EXCHANGE, STOCK_ORDERS
from shared.outbox import RETRIES, hand_over, start_relays, stop_relays
from tests.helpers import eventually
from tooling.stack import Stack

ORDERS = 300


@pytest.fixture(scope="module")
def provisioned(infrastructure: None) -> Iterator[Stack]:
    stack = Stack(f"h{uuid.uuid4().hex[:8]}", workers=0)
    stack.provision()
    yield stack
    stack.destroy()


@pytest.fixture
async def broker(provisioned: Stack) -> AsyncIterator[Broker]:
    opened = await open_broker(provisioned.amqp_url, delivery_limit=5, prefetch=500, name="test-handover")
    yield opened
    await opened.close()


@pytest.fixture
async def pool(provisioned: Stack) -> AsyncIterator[asyncpg.Pool]:
    opened = await asyncpg.create_pool(provisioned.orders_dsn, min_size=2, max_size=10)
    assert opened is not None
    yield opened
    await opened.close()


async def drain(broker: Broker) -> list[AbstractIncomingMessage]:
    """Every message in stock.orders (acked). Called once the outbox rows are gone: a row is
    deleted only after the broker confirmed it, so every message of theirs is in the queue."""
    queue = await broker.channel.get_queue(STOCK_ORDERS)
    got: list[AbstractIncomingMessage] = []
    while (message := await queue.get(no_ack=False, fail=False, timeout=5)) is not None:
        await message.ack()
        got.append(message)
    return got


def order_body(n: int) -> dict[str, Any]:
    return {"customer_id": f"c{n}", "store_id": "S1", "stores": ["S1"], "split": False,
            "items": [{"sku": f"K{n % 7}", "quantity": 1}]}


async def test_claimed_rows_are_published_once_by_their_writer_while_other_relays_look(
    provisioned: Stack, broker: Broker, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    await drain(broker)
    # Two "processes": each with its lanes looking at the outbox every 20 ms, one with the writer.
    monkeypatch.setattr(outbox, "SWEEP_SECONDS", 0.02)
    other = start_relays(provisioned.orders_dsn, broker.exchange, ["orders"], handing=broker.handing)
    mine = start_relays(provisioned.orders_dsn, broker.exchange, ["orders"], handing=broker.handing)
    intake = Intake(pool)
    try:
        created = await asyncio.gather(*(intake.create(order_body(n), None) for n in range(ORDERS)))
        order_ids = {order["order_id"] for order, _ in created}
        conn = await asyncpg.connect(provisioned.orders_dsn)
        try:
            await eventually(lambda: _empty(conn), timeout=30)
        finally:
            await conn.close()
        messages = await drain(broker)
    finally:
        await intake.close()
        await stop_relays(mine)
        await stop_relays(other)
    assert {m.correlation_id for m in messages} == order_ids, "an accepted order was not announced"
    assert len(messages) == ORDERS, f"{len(messages) - ORDERS} duplicates: a relay took a claimed row"
    assert all(m.type == "PedidoCriado" and m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT for m in messages)


async def _empty(conn: asyncpg.Connection) -> None:
    assert await conn.fetchval("SELECT count(*) FROM outbox") == 0


INSERT_CLAIMED = f"""
INSERT INTO outbox (event_id, event_type, correlation_id, request_id, body, claimed, created_at)
VALUES ($1, $2, $3, NULL, $4::jsonb, true, now() - make_interval(secs => $5))
RETURNING {WRITTEN_COLUMNS}
"""


async def test_a_claimed_row_whose_writer_died_is_published_as_an_orphan_and_a_young_one_is_not(
    provisioned: Stack, broker: Broker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    await drain(broker)
    monkeypatch.setattr(outbox, "SWEEP_SECONDS", 0.02)
    looks = count_looks(monkeypatch)
    conn = await asyncpg.connect(provisioned.orders_dsn)
    orphan = PedidoConfirmado(order_id=uuid.uuid4(), attempt=1)
    young = PedidoConfirmado(order_id=uuid.uuid4(), attempt=1)
    relays = start_relays(provisioned.orders_dsn, broker.exchange, ["orders"], handing=broker.handing)
    try:
        # Written by a process that died before publishing: claimed, older than ORPHAN_SECONDS...
        await conn.fetchrow(INSERT_CLAIMED, orphan.event_id, orphan.event_type, str(orphan.order_id),
                            orphan.model_dump_json(), outbox.ORPHAN_SECONDS + 1)
        # ...and one whose writer is (for all the relays know) still about to publish it.
        await conn.fetchrow(INSERT_CLAIMED, young.event_id, young.event_type, str(young.order_id),
                            young.model_dump_json(), 0)
        await eventually(lambda: _gone(conn, orphan.event_id), timeout=30)
        taken_at = len(looks)
        await eventually(lambda: _at_least(looks, taken_at + 50), timeout=30)  # 50 more looks
        messages = await drain(broker)
        left = await conn.fetchval("SELECT count(*) FROM outbox WHERE event_id = $1", young.event_id)
    finally:
        await stop_relays(relays)
        await conn.execute("DELETE FROM outbox")
        await conn.close()
    assert [m.message_id for m in messages] == [str(orphan.event_id)]
    assert left == 1, "a relay took a young claimed row: its writer would publish it twice"


def count_looks(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """One entry per slow look a relay takes (each pause ends in one)."""
    looks: list[float] = []
    pause = outbox.OutboxRelay._pause

    async def counted(self: outbox.OutboxRelay, seconds: float, *, wakeable: bool = True) -> bool:
        looks.append(seconds)
        return await pause(self, seconds, wakeable=wakeable)

    monkeypatch.setattr(outbox.OutboxRelay, "_pause", counted)
    return looks


async def _at_least(looks: list[float], n: int) -> None:
    assert len(looks) >= n


async def _gone(conn: asyncpg.Connection, event_id: uuid.UUID) -> None:
    assert not await conn.fetchval("SELECT count(*) FROM outbox WHERE event_id = $1", event_id)


async def test_a_handed_row_the_broker_refuses_is_given_to_the_relays_and_set_aside(
    provisioned: Stack, broker: Broker,
) -> None:
    conn = await asyncpg.connect(provisioned.orders_dsn)
    queue = await broker.channel.get_queue(STOCK_ORDERS)
    await queue.unbind(EXCHANGE, routing_key="PedidoConfirmado")  # mandatory: returned
    refused = PedidoConfirmado(order_id=uuid.uuid4(), attempt=1)
    relays = start_relays(provisioned.orders_dsn, broker.exchange, ["orders"], handing=broker.handing)
    try:
        row = await conn.fetchrow(INSERT_CLAIMED, refused.event_id, refused.event_type, str(refused.order_id),
                                  refused.model_dump_json(), 0)
        hand_over([dict(row)])
        await eventually(lambda: _set_aside(conn, refused.event_id), timeout=30)
        attempts = await conn.fetchval("SELECT attempts FROM outbox_set_aside WHERE event_id = $1",
                                       refused.event_id)
    finally:
        await stop_relays(relays)
        await queue.bind(EXCHANGE, routing_key="PedidoConfirmado")
        await conn.close()
    assert attempts == RETRIES


async def _set_aside(conn: asyncpg.Connection, event_id: uuid.UUID) -> None:
    assert await conn.fetchval("SELECT count(*) FROM outbox_set_aside WHERE event_id = $1", event_id)
