"""Use cases of the orders service. Each runs in one transaction that writes the order and the
event announcing it (outbox) together, so an accepted order is never without its message."""

import hashlib
import logging
import uuid
from datetime import UTC, datetime
from typing import Any, NamedTuple

import asyncpg
import orjson
from asgi_correlation_id import correlation_id

from orders import db
from orders.domain import (
    Refused,
    Status,
    Update,
    apply_stock_answer,
    check_cancel,
    check_confirm,
    check_reserve,
)
from shared import metrics
from shared.batching import Batcher
from shared.db import UNAVAILABLE as DATABASE_UNAVAILABLE
from shared.events import AtualizarStatus, Line, PedidoCancelado, PedidoConfirmado, PedidoCriado
from shared.messaging import TRACEPARENT
from shared.outbox import add_to_outbox, hand_over, wake_relays

log = logging.getLogger(__name__)

class NotFound(Exception):
    pass


class IdempotencyConflict(Exception):
    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


async def _announce(conn: asyncpg.Connection, event: Any, order_id: uuid.UUID) -> None:
    await add_to_outbox(conn, event, str(order_id), correlation_id.get())


class NewOrder(NamedTuple):
    """A new order and its PedidoCriado: one row of INSERT_ORDERS_ANNOUNCED, in its column order
    (lists as JSON text)."""

    order_id: uuid.UUID
    customer_id: str
    store_id: str | None
    stores: str
    split: bool
    items: str
    event_id: uuid.UUID
    request_id: str | None
    body: str
    traceparent: str | None


# Failures after which no order of the batch was written, so none is retried alone.
WRITE_FAILED = DATABASE_UNAVAILABLE


class Intake:
    """Accepts new orders.

    Orders without an Idempotency-Key are written in natural batches (shared/batching.py): the
    orders that arrive while the previous batch commits go together, each with its PedidoCriado,
    in one statement and one commit. A commit (a WAL flush) per order was the database's main
    cost of a busy accept path; at low load a batch is one order and waits for nothing."""

    def __init__(self, pool: asyncpg.Pool, max_batch: int = 100) -> None:
        self.pool = pool
        self._batcher: Batcher[tuple[NewOrder, dict[str, Any]]] = Batcher(
            self._write, max_size=max_batch, transient=WRITE_FAILED)

    async def close(self) -> None:
        await self._batcher.close()

    async def create(self, body: dict[str, Any], idempotency_key: str | None) -> tuple[dict[str, Any], bool]:
        """Returns the order and whether it was created now (False: an idempotent replay)."""
        if idempotency_key is None:
            slot: dict[str, Any] = {}
            await self._batcher.submit((_new_order_row(body), slot))
            order = slot["order"]
        else:
            order, created = await self._create_once(body, idempotency_key)
            if not created:
                return order, False
        metrics.order_status(Status.PENDING.value)
        return order, True

    async def _write(self, batch: list[tuple[NewOrder, dict[str, Any]]]) -> None:
        orders, announced = await _insert_announced(self.pool, [values for values, _ in batch])
        hand_over(announced)  # one statement: committed
        for (_, slot), order in zip(batch, orders, strict=True):
            slot["order"] = order

    async def _create_once(self, body: dict[str, Any], idempotency_key: str) -> tuple[dict[str, Any], bool]:
        async with self.pool.acquire() as conn, conn.transaction():
            digest = request_hash(body)
            if not await conn.fetchval(db.LOCK_IDEMPOTENCY_KEY, idempotency_key):
                raise IdempotencyConflict(409, "a request with this Idempotency-Key is in flight")
            seen = await conn.fetchrow(db.SELECT_IDEMPOTENCY_KEY, idempotency_key)
            if seen is not None:
                if seen["request_hash"] != digest:
                    raise IdempotencyConflict(
                        422, "this Idempotency-Key was used with a different request body"
                    )
                return seen["response"], False
            [order], announced = await _insert_announced(conn, [_new_order_row(body)])
            await conn.execute(db.SAVE_IDEMPOTENCY_KEY, idempotency_key, digest,
                               uuid.UUID(order["order_id"]), order)
        hand_over(announced)
        return order, True


def _order_created(order_id: uuid.UUID, attempt: int, order: Any) -> PedidoCriado:
    """The PedidoCriado of an attempt, from a request body or an order row (same fields)."""
    return PedidoCriado(
        order_id=order_id,
        attempt=attempt,
        customer_id=order["customer_id"],
        store_id=order["store_id"],
        stores=order["stores"],
        split=order["split"],
        items=[Line(**item) for item in order["items"]],
    )


def _new_order_row(body: dict[str, Any]) -> NewOrder:
    """`body` as orders/models.py OrderIn gives it: stores and split always set."""
    order_id = uuid.uuid4()
    event = _order_created(order_id, 1, body)
    return NewOrder(order_id, body["customer_id"], body["store_id"], orjson.dumps(body["stores"]).decode(),
                    body["split"], orjson.dumps(body["items"]).decode(), event.event_id,
                    correlation_id.get(), event.model_dump_json(), TRACEPARENT.get())


async def _insert_announced(
    conn: asyncpg.Connection | asyncpg.Pool, rows: list[NewOrder]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inserts the orders with their claimed PedidoCriado in one statement: the orders in the
    rows' order, and the outbox rows to hand over once committed (shared/handover.py)."""
    written = await conn.fetch(db.INSERT_ORDERS_ANNOUNCED, *zip(*rows, strict=True))
    by_id = {row["order_id"]: row for row in written}
    return ([db.to_order(by_id[row.order_id]) for row in rows],
            [_announcement(row, by_id[row.order_id]["outbox_id"]) for row in rows])


def _announcement(row: NewOrder, outbox_id: int) -> dict[str, Any]:
    """A new order's claimed outbox row, as shared.handover publishes it."""
    return {"id": outbox_id, "event_id": str(row.event_id), "event_type": "PedidoCriado",
            "correlation_id": str(row.order_id), "request_id": row.request_id,
            "traceparent": row.traceparent, "body": row.body}


async def confirm(pool: asyncpg.Pool, order_id: uuid.UUID) -> dict[str, Any]:
    async with metrics.after_commit(), pool.acquire() as conn, conn.transaction():
        row = await _lock(conn, order_id)
        check_confirm(Status(row["status"]), row["reserved_until"], datetime.now(UTC))
        order = await _set(conn, row, Status.CONFIRMING, reserved_until=row["reserved_until"],
                           allocations=row["allocations"])
        await _announce(conn, PedidoConfirmado(order_id=order_id, attempt=row["attempt"]), order_id)
    wake_relays()
    return order


async def cancel(pool: asyncpg.Pool, order_id: uuid.UUID) -> dict[str, Any]:
    async with metrics.after_commit(), pool.acquire() as conn, conn.transaction():
        row = await _lock(conn, order_id)
        if not check_cancel(Status(row["status"])):
            return db.to_order(row)
        order = await _set(conn, row, Status.CANCELLED)
        await _announce(conn, PedidoCancelado(order_id=order_id, attempt=row["attempt"]), order_id)
    wake_relays()
    return order


async def reserve_again(pool: asyncpg.Pool, order_id: uuid.UUID) -> dict[str, Any]:
    async with metrics.after_commit(), pool.acquire() as conn, conn.transaction():
        row = await _lock(conn, order_id)
        check_reserve(Status(row["status"]))
        attempt = row["attempt"] + 1
        order = await _set(conn, row, Status.PENDING, attempt=attempt)
        event = _order_created(order_id, attempt, row)
        await _announce(conn, event, order_id)
    wake_relays()
    return order


async def apply_answers(
    conn: asyncpg.Connection, answers: list[tuple[AtualizarStatus, str | None]], rows: list[asyncpg.Record]
) -> dict[str, dict[str, Any]]:
    """Applies a batch of stock's answers, each with its request id, in arrival order. The caller
    holds the transaction, has checked the inbox and locked the orders (`rows`: status and
    attempt of each, orders/db.py CLAIM_ANSWERS). They are written by one statement: the state
    machine runs in memory in between, so two answers for one order apply in turn.
    Returns the orders it changed, as written (by order id)."""
    state = {row["order_id"]: (Status(row["status"]), row["attempt"]) for row in rows}
    final: dict[uuid.UUID, Update] = {}
    for answer, request_id in answers:
        if answer.order_id not in state:
            log.warning("status for an unknown order", extra={"order_id": str(answer.order_id)})
            continue
        status, attempt = state[answer.order_id]
        outcome = apply_stock_answer(status, attempt, answer)
        if outcome.release_again:
            # The customer cancelled while stock was holding: make sure the hold is let go.
            await add_to_outbox(conn, PedidoCancelado(order_id=answer.order_id, attempt=answer.attempt),
                                str(answer.order_id), request_id)
        if outcome.update is None:
            log.info("status update not applied", extra={
                "order_id": str(answer.order_id), "update": answer.status, "why": outcome.ignored})
            continue
        final[answer.order_id] = outcome.update
        state[answer.order_id] = (outcome.update.status, attempt)
        metrics.order_status(outcome.update.status.value)
    if not final:
        return {}
    written = await conn.fetch(db.SET_STATUSES, list(final), [u.status.value for u in final.values()],
                               [u.reason for u in final.values()],
                               [orjson.dumps(u.unavailable or []).decode() for u in final.values()],
                               [None if u.allocations is None else orjson.dumps(u.allocations).decode()
                                for u in final.values()],
                               [u.reserved_until for u in final.values()])
    return {str(row["order_id"]): db.to_order(row) for row in written}


async def _lock(conn: asyncpg.Connection, order_id: uuid.UUID) -> asyncpg.Record:
    row = await conn.fetchrow(db.LOCK_ORDER, order_id)
    if row is None:
        raise NotFound(str(order_id))
    return row


async def _set(
    conn: asyncpg.Connection,
    row: asyncpg.Record,
    status: Status,
    *,
    reason: str | None = None,
    unavailable: list[dict[str, Any]] | None = None,
    reserved_until: datetime | None = None,
    allocations: list[dict[str, Any]] | None = None,
    attempt: int | None = None,
) -> dict[str, Any]:
    """Sets a status a command (not stock) decided; allocations are [] unless given."""
    updated = await conn.fetchrow(
        db.SET_STATUS, row["order_id"], status.value, reason, unavailable or [], allocations or [],
        reserved_until, attempt or row["attempt"],
    )
    metrics.order_status(status.value)
    return db.to_order(updated)


__all__ = [
    "IdempotencyConflict",
    "Intake",
    "NotFound",
    "Refused",
    "apply_answers",
    "cancel",
    "confirm",
    "reserve_again",
]
