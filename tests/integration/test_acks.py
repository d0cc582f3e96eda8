"""Acks in bulk (shared/consumer.py, BulkAcks) against a real stack with one stock worker.

A bulk ack (`basic.ack(multiple=True)`) acks every earlier delivery of the channel too. The
contract's promise, "ack only after commit", then holds only if no bulk ack ever reaches past a
message still being handled; and the channel keeps flowing only if the messages handled after
such a message are acked anyway."""

import asyncio
import signal
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from shared.events import PedidoCancelado
from shared.messaging import STOCK_ORDERS
from stock import db
from tests.helpers import eventually, put_stock, random_sku, random_store
from tests.integration.test_workers import order_event, publish
from tooling.stack import Stack


@pytest.fixture(scope="module")
def one_worker(infrastructure: None) -> Iterator[Stack]:
    """One worker: every message below shares its channel, so one bulk ack could cover them all."""
    running = Stack(f"a{uuid.uuid4().hex[:8]}", workers=1).start()
    yield running
    running.stop()


async def ready_and_unacked(stack: Stack, queue: str) -> tuple[int, int]:
    assert stack.rabbit is not None
    done = await asyncio.to_thread(
        stack.rabbit.ctl, "list_queues", "-p", f"test-{stack.name}", "name", "messages_ready",
        "messages_unacknowledged", "--no-table-headers", "--quiet")
    for row in done.stdout.splitlines():
        parts = row.split()
        if len(parts) == 3 and parts[0] == queue:
            return int(parts[1]), int(parts[2])
    raise AssertionError(f"queue {queue} not listed: {done.stdout!r} {done.stderr!r}")


async def waiting_on_advisory_lock(conn: asyncpg.Connection) -> None:
    busy = await conn.fetchval("""SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                                  AND wait_event_type = 'Lock' AND wait_event = 'advisory'""")
    assert busy, "no session waits on the order's lock yet"


async def test_a_message_still_in_hand_is_not_acked_by_the_acks_of_later_ones(one_worker: Stack) -> None:
    stack = one_worker
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 100)
    cancel = PedidoCancelado(order_id=uuid.uuid4(), attempt=1)
    holder, conn = await stack.stock_db(), await stack.stock_db()
    try:
        # The worker takes the cancel first and waits on its order's lock, held here...
        blocker = holder.transaction()
        await blocker.start()
        await holder.execute(db.LOCK_ORDER_IDS, [cancel.order_id])
        await stack.publish_raw(cancel.model_dump_json().encode(), "PedidoCancelado", str(cancel.event_id),
                                correlation_id=str(cancel.order_id))
        await eventually(lambda: waiting_on_advisory_lock(conn), timeout=30)
        # ...while ten orders delivered after it on the same channel are decided and acked.
        orders = [order_event(store, [(sku, 1)]) for _ in range(10)]
        for event in orders:
            await publish(stack, event)

        async def decided() -> None:
            count = await conn.fetchval("SELECT count(*) FROM stock_order WHERE order_id = ANY($1::uuid[])",
                                        [e.order_id for e in orders])
            assert count == len(orders)

        await eventually(decided, timeout=30)

        async def only_the_cancel_unacked() -> None:
            assert await ready_and_unacked(stack, STOCK_ORDERS) == (0, 1)

        await eventually(only_the_cancel_unacked, timeout=30, interval=0.2)

        # The worker dies holding it: only a message never acked comes back and takes effect.
        await asyncio.to_thread(stack.kill, "worker-0", signal.SIGKILL)
        await blocker.rollback()
        stack.start_worker(1)

        async def cancel_applied() -> None:
            state = await conn.fetchval("SELECT state FROM stock_order WHERE order_id = $1", cancel.order_id)
            assert state == "cancelled", "the cancel was acked before it was handled, and is lost"
            assert await ready_and_unacked(stack, STOCK_ORDERS) == (0, 0)

        await eventually(cancel_applied, timeout=60, interval=0.2)
    finally:
        await holder.close()
        await conn.close()
