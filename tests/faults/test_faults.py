"""Reliability under faults (API.md §3 invariants, §6 outbox/inbox, quorum queues).

Each test runs a steady load of orders through the gateway on its own system, injects one fault
in the middle, and then checks that every order that got 202 reached a final status, that the
stock invariants hold, and that no message was applied twice or lost (tools.effect_violations).
The suite runs its own PostgreSQL and RabbitMQ (conftest.py): it stops and restarts them."""

import asyncio
import signal
from typing import Any

import httpx
import pytest

from shared.messaging import ORDERS_STATUS, STOCK_ORDERS
from tests.faults.tools import (
    FINAL,
    SKUS,
    FaultResult,
    Load,
    connections_of_process,
    consumers,
    drained,
    effect_violations,
    gateway_statuses,
    ready_through_gateway,
    record,
    say,
    seed_stock,
    stop_rabbit,
    unacked_on,
    vhost_of,
    wait_all_final,
)
from tests.helpers import create_order, eventually
from tooling.devenv import wait_ready
from tooling.stack import Stack

pytestmark = pytest.mark.faults

WORKERS = 2
# Long enough for a message to be delivered and returned more often than the queues' delivery
# limit (5) if a consumer gave up on a dead database after its few quick retries (~4 s each).
PG_OUTAGE_SECONDS = 30


async def finish(stack: Stack, client: httpx.AsyncClient, load: Load, result: FaultResult, *,
                 extra_accepted: dict[str, str] | None = None, cancelled_before_stock: set[str] = frozenset(),  # type: ignore[assignment]
                 extra_stock_messages: int = 0) -> None:
    """The common end of every fault test: all accepted orders final, and no violation."""
    extra = extra_accepted or {}  # order id -> customer, created outside the load
    accepted = set(load.accepted) | set(extra)
    final = FINAL | ({"cancelled"} if cancelled_before_stock else set())
    result.accepted = len(accepted)
    result.refused = load.refused()
    say(f"load stopped: {len(accepted)} accepted, POSTs {dict(load.statuses())}; waiting for final statuses")
    result.final, not_final = await wait_all_final(stack, accepted, final)
    say(f"{result.final} accepted orders final, {len(not_final)} orders not final")
    # Duplicates (redeliveries, republished events) may still be on their way to an inbox; then
    # every queue must be empty: nothing dead-lettered, nothing left unacked.
    try:
        await drained(stack, timeout=30)
    except AssertionError as exc:
        result.violations.append(str(exc))
    say("queues drained; checking effects")
    result.violations += await effect_violations(
        stack, load.store, cancelled_before_stock=cancelled_before_stock,
        extra_stock_messages=extra_stock_messages)
    result.violations += [f"POST /orders: {a}" for a in load.anomalies[:20]]
    shown: dict[str, str] = {}
    for customer in {load.customer, *extra.values()}:
        shown.update(await gateway_statuses(client, customer))
    hidden = [i for i in accepted if shown.get(i) not in final]
    if hidden:
        result.violations.append(f"{len(hidden)} accepted orders not final through the gateway, e.g. {hidden[:3]}")
    assert not not_final, (f"{len(not_final)} orders never reached a final status within the deadline, "
                           f"e.g. {not_final[:3]}; logs in {stack.log_dir}; also: {result.violations[-3:]}")
    assert result.violations == [], result.violations[:20]


async def restart_orders(stack: Stack, *, relay: bool, hard: bool) -> None:
    """Replaces the orders process (kill -9 when `hard`, else SIGTERM); without the relay it
    commits orders and their events but never publishes them."""
    await asyncio.to_thread(stack.kill, "orders", signal.SIGKILL if hard else signal.SIGTERM)
    stack.start_process("orders", "orders-service", extra_env=None if relay else {"OUTBOX_RELAY": "false"})
    url = f"http://127.0.0.1:{stack.ports['orders']}/health/ready"
    assert await asyncio.to_thread(wait_ready, url, 60), f"orders did not get ready; see {stack.log_dir}"


async def all_consumers_back(stack: Stack, timeout: float = 60) -> None:
    expected = {STOCK_ORDERS: WORKERS, ORDERS_STATUS: 1}

    async def back() -> None:
        found = await asyncio.to_thread(consumers, stack.rabbit, vhost_of(stack))
        say(f"consumers {dict(found)}")
        assert {q: found[q] for q in expected} == expected, f"consumers: {dict(found)}"

    await eventually(back, timeout=timeout, interval=0.5)


# ----- 1 -------------------------------------------------------------------------------------------
async def test_stock_worker_killed_while_holding_unacked_messages(fault_stack: Stack) -> None:
    stack = fault_stack
    result = record("kill -9 of a stock worker holding unacked messages")
    amqp_port = stack.rabbit.port  # type: ignore[union-attr]
    async with stack.client() as client:
        store = await seed_stock(stack, client)
        load = Load(client, store, seed=1).start()
        try:
            await load.wait_accepted(60)
            victim = stack.procs["worker-0"]

            async def connected() -> set[str]:
                return await asyncio.to_thread(connections_of_process, stack.rabbit, victim.pid, amqp_port)  # type: ignore[arg-type]

            connections = await eventually(connected, timeout=30, interval=0.5)
            # Frozen, it takes deliveries up to its prefetch and acks none: kill it holding them.
            say(f"{len(load.accepted)} accepted; freezing worker-0 (pid {victim.pid})")
            victim.send_signal(signal.SIGSTOP)
            frozen = asyncio.get_running_loop().time()

            async def holding() -> int:
                count = await asyncio.to_thread(unacked_on, stack.rabbit, connections)  # type: ignore[arg-type]
                assert count > 0, "the frozen worker holds no unacked message yet"
                return count

            try:
                held = await eventually(holding, timeout=30, interval=0.2)
            finally:
                stack.kill("worker-0", signal.SIGKILL)
                frozen_for = asyncio.get_running_loop().time() - frozen
            say(f"worker-0 killed holding {held} unacked messages; starting a replacement")
            stack.start_worker(WORKERS)  # the replacement
            await all_consumers_back(stack)
            await load.wait_accepted(80, timeout=60)
        finally:
            await load.stop()
        result.notes = (f"worker frozen {frozen_for:.1f} s, then killed holding {held} unacked "
                        "messages; replacement started")
        await finish(stack, client, load, result)


# ----- 2 -------------------------------------------------------------------------------------------
async def test_rabbitmq_restart(fault_stack: Stack) -> None:
    stack = fault_stack
    rabbit = stack.rabbit
    assert rabbit is not None
    result = record("RabbitMQ stopped and restarted")
    loop = asyncio.get_running_loop()
    async with stack.client() as client:
        store = await seed_stock(stack, client)
        load = Load(client, store, seed=2).start()
        try:
            await load.wait_accepted(60)
            say(f"{len(load.accepted)} accepted; stopping RabbitMQ")
            await asyncio.to_thread(stop_rabbit, rabbit)
            down = loop.time()
            say("RabbitMQ down; starting it again")
            await asyncio.to_thread(rabbit.ensure_running)
            up = loop.time()
            say(f"RabbitMQ up after {up - down:.1f} s; waiting for the consumers to come back")
            during = load.between(down, up)
            await all_consumers_back(stack)
            await ready_through_gateway(stack, client)
            await load.wait_accepted(60, timeout=60)
        finally:
            await load.stop()
        refused = [o.status for o in during if o.status != 202]
        result.notes = (f"outage {up - down:.1f} s: {len(during)} POSTs during it, "
                        f"{len(during) - len(refused)} got 202")
        # The outbox absorbs the outage: creating an order needs only the orders database.
        assert len(during) >= 10, f"only {len(during)} POSTs fell within the outage"
        assert not refused, f"POSTs refused while the broker was down: {refused[:10]}"
        await finish(stack, client, load, result)


# ----- 3 -------------------------------------------------------------------------------------------
async def test_postgresql_fast_restart(fault_stack: Stack) -> None:
    stack = fault_stack
    pg = stack.pg
    assert pg is not None
    result = record(f"PostgreSQL fast shutdown, down {PG_OUTAGE_SECONDS} s, restarted")
    loop = asyncio.get_running_loop()
    async with stack.client() as client:
        store = await seed_stock(stack, client)
        load = Load(client, store, seed=3).start()
        try:
            await load.wait_accepted(60)
            say(f"{len(load.accepted)} accepted; stopping PostgreSQL (fast shutdown) for {PG_OUTAGE_SECONDS} s")
            down = loop.time()
            await asyncio.to_thread(pg.stop)
            # The fault's length, not a wait for a result: consumers keep meeting a dead database
            # for longer than their in-process retries last (the delivery limit must not count it).
            await asyncio.sleep(PG_OUTAGE_SECONDS - (loop.time() - down))
            await asyncio.to_thread(pg.ensure_running)
            up = loop.time()
            say(f"PostgreSQL back after {up - down:.1f} s")
            await ready_through_gateway(stack, client)
            before = len(load.accepted)
            await load.wait_accepted(60, timeout=60)
        finally:
            await load.stop()
        during = load.between(down, up)
        result.notes = (f"outage {up - down:.1f} s; {sum(o.status != 202 for o in during)} of "
                        f"{len(during)} POSTs within it refused (allowed); "
                        f"{len(load.accepted) - before} accepted after recovery")
        await finish(stack, client, load, result)


# ----- 4 -------------------------------------------------------------------------------------------
async def test_orders_killed_between_commit_and_publish(fault_stack: Stack) -> None:
    stack = fault_stack
    result = record("orders killed between commit and publish")
    async with stack.client() as client:
        store = await seed_stock(stack, client)
        await restart_orders(stack, relay=False, hard=False)
        load = Load(client, store, seed=4).start()
        try:
            await load.wait_accepted(100)
            committed = len(load.accepted)
            orders_db, stock_db = await stack.orders_db(), await stack.stock_db()
            try:
                waiting = await orders_db.fetchval("SELECT count(*) FROM outbox WHERE event_type = 'PedidoCriado'")
                seen_by_stock = await stock_db.fetchval("SELECT count(*) FROM stock_order")
            finally:
                await orders_db.close()
                await stock_db.close()
            assert waiting >= committed, f"{committed} orders accepted, {waiting} events in the outbox"
            assert seen_by_stock == 0, "stock saw orders although nothing was published"
            say(f"{committed} accepted, {waiting} PedidoCriado in the outbox; kill -9 orders")
            await restart_orders(stack, relay=True, hard=True)  # kill -9, then start it normally
            say("orders back with its relay")
            await load.wait_accepted(60, timeout=60)
        finally:
            await load.stop()
        result.notes = f"{waiting} events committed, unpublished, when orders was killed"
        await finish(stack, client, load, result)


# ----- 5 -------------------------------------------------------------------------------------------
async def test_duplicate_and_out_of_order_messages(fault_stack: Stack) -> None:
    """Every PedidoCriado delivered up to four times (three copies at once plus the relay's own);
    a PedidoCancelado delivered before its PedidoCriado: the late order holds nothing."""
    stack = fault_stack
    result = record("duplicate and out-of-order messages")
    async with stack.client() as client:
        store = await seed_stock(stack, client)
        # With the relay off, events wait in the outbox: this test delivers them itself, in the
        # order and number it chooses, before the relay sends its own copy.
        await restart_orders(stack, relay=False, hard=False)
        load = Load(client, store, seed=5).start()
        try:
            special: dict[str, str] = {}
            for i in range(10):
                response = await create_order(client, store, [(SKUS[i], 1)], customer="c-special")
                assert response.status_code == 202, response.text
                special[response.json()["order_id"]] = "c-special"
            cancelled = set(list(special)[:5])
            for order_id in cancelled:
                response = await client.post(f"/orders/{order_id}/cancel")
                assert response.status_code == 202, response.text
                assert response.json()["status"] == "cancelled"
            await load.wait_accepted(60)
            outbox = await outbox_rows(stack)
            creates = {r["correlation_id"]: r for r in outbox if r["event_type"] == "PedidoCriado"}
            cancels = {r["correlation_id"]: r for r in outbox if r["event_type"] == "PedidoCancelado"}
            assert cancels.keys() == cancelled, cancels.keys()
            assert set(special) <= creates.keys()

            say(f"{len(creates)} PedidoCriado, {len(cancels)} PedidoCancelado waiting in the outbox")
            # Out of order: the cancel first (twice); stock keeps a tombstone...
            await publish(stack, [cancels[i] for i in cancelled] * 2)
            await eventually(lambda: stock_states(stack, cancelled, {"cancelled"}), timeout=30)
            # ...then the order itself, late: it must find the tombstone and hold nothing.
            await publish(stack, [creates[i] for i in cancelled])
            await eventually(lambda: inbox_has(stack, [creates[i]["event_id"] for i in cancelled]), timeout=30)

            say("late orders found their tombstones")
            # Duplicates: three copies of each at once, to several workers.
            twice = [i for i in special if i not in cancelled] + [i for i in creates if i in load.accepted][:25]
            await publish(stack, [creates[i] for i in twice] * 3)
            await eventually(lambda: orders_final(stack, twice), timeout=60)

            say(f"{len(twice)} orders decided from triplicated PedidoCriado; restarting orders with its relay")
            # The relay comes back and sends everything once more (same message ids).
            await restart_orders(stack, relay=True, hard=False)
            await load.wait_accepted(40, timeout=60)
        finally:
            await load.stop()
        result.notes = (f"{len(twice)} orders x4 deliveries, {len(cancelled)} cancels before their "
                        "order (x3), late orders x2")
        await finish(stack, client, load, result, extra_accepted=special,
                     cancelled_before_stock=cancelled, extra_stock_messages=len(cancelled))
        stock = await stack.stock_db()
        try:
            moved = await stock.fetchval("SELECT count(*) FROM movement WHERE order_id = ANY($1::uuid[])",
                                         list(cancelled))
            held = await stock.fetchval("SELECT count(*) FROM hold WHERE order_id = ANY($1::uuid[])",
                                        list(cancelled))
        finally:
            await stock.close()
        assert (moved, held) == (0, 0), "an order cancelled before it arrived moved stock"


async def outbox_rows(stack: Stack) -> list[dict[str, Any]]:
    conn = await stack.orders_db()
    try:
        return [dict(r) for r in await conn.fetch(
            "SELECT event_id::text, event_type, correlation_id, body::text FROM outbox ORDER BY id")]
    finally:
        await conn.close()


async def publish(stack: Stack, rows: list[dict[str, Any]]) -> None:
    """Publishes the outbox rows as the relay would (same message ids), several at a time."""
    slots = asyncio.Semaphore(16)

    async def one(row: dict[str, Any]) -> None:
        async with slots:
            await stack.publish_raw(row["body"].encode(), row["event_type"], row["event_id"],
                                    correlation_id=row["correlation_id"])

    await asyncio.gather(*(one(row) for row in rows))


async def stock_states(stack: Stack, order_ids: set[str], states: set[str]) -> None:
    conn = await stack.stock_db()
    try:
        rows = await conn.fetch("SELECT order_id::text, state FROM stock_order WHERE order_id = ANY($1::uuid[])",
                                list(order_ids))
    finally:
        await conn.close()
    found = {r["order_id"]: r["state"] for r in rows}
    assert found.keys() == order_ids and set(found.values()) <= states, found


async def inbox_has(stack: Stack, message_ids: list[str]) -> None:
    conn = await stack.stock_db()
    try:
        count = await conn.fetchval("SELECT count(*) FROM inbox WHERE message_id = ANY($1)", message_ids)
    finally:
        await conn.close()
    assert count == len(message_ids), f"{count} of {len(message_ids)} handled"


async def orders_final(stack: Stack, order_ids: list[str]) -> None:
    conn = await stack.orders_db()
    try:
        rows = await conn.fetch("SELECT status FROM orders WHERE order_id = ANY($1::uuid[])", order_ids)
    finally:
        await conn.close()
    assert len(rows) == len(order_ids) and all(r["status"] in FINAL for r in rows), \
        [r["status"] for r in rows]

