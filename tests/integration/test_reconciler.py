"""An order is never `pending` for good (API.md §6): stock answers again a decision it already
made, and the orders reconciler asks again when a PedidoCriado or its answer was lost."""

import asyncio
import json
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from shared.events import Line, PedidoCancelado, PedidoConfirmado, PedidoCriado
from shared.messaging import EXCHANGE
from tests.helpers import eventually, put_stock, random_sku, random_store
from tooling.invariants import check_stock_invariants
from tooling.stack import Stack


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
