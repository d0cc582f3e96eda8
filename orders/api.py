"""HTTP entry point of the orders service (API.md §2)."""

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request

from orders import db, service
from orders.domain import UNSETTLED, Refused, Status
from orders.models import NO_NUL, Order, OrderIn, OrderPage
from orders.waiters import StatusWaiters
from shared import edge
from shared.paging import decode_cursor, encode_cursor
from shared.problems import Problem
from shared.web import JSONResponse

router = APIRouter(tags=["orders"])

OrderId = Annotated[uuid.UUID, Path(description="the order's id (UUIDv4)")]


PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/problem+json": {}}}
    for code, text in {404: "no such order", 409: "not allowed in this status",
                       410: "the reservation expired", 422: "invalid input"}.items()
}


def _pool(request: Request) -> Any:
    return request.app.state.pool


def _accepted(order: dict[str, Any]) -> JSONResponse:
    return JSONResponse(order, status_code=202, headers={"Location": f"/orders/{order['order_id']}"})


@router.post("/orders", status_code=202, responses={202: {"model": Order}, **PROBLEMS})
async def create_order(
    body: OrderIn,
    request: Request,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)] = None,
) -> JSONResponse:
    try:
        order, _ = await request.app.state.intake.create(body.model_dump(), idempotency_key)
    except service.IdempotencyConflict as exc:
        raise Problem(exc.status_code, exc.detail) from None
    return _accepted(order)


@router.get("/orders/{order_id}", responses={200: {"model": Order}, **PROBLEMS})
async def get_order(
    order_id: OrderId,
    request: Request,
    wait: Annotated[str | None, Query(
        description="long-poll: seconds (0-30) to wait while pending/confirming",
        json_schema_extra={"type": "number", "minimum": 0, "maximum": edge.MAX_WAIT_SECONDS})] = None,
) -> JSONResponse:
    seconds = edge.wait_seconds(wait)
    pool = _pool(request)
    order = await db.fetch_order(pool, order_id)
    if order is None:
        raise Problem(404, f"order {order_id} does not exist")
    if seconds > 0:
        order = await wait_for_change(pool, request.app.state.waiters, order, seconds)
    return JSONResponse(order)


async def wait_for_change(
    pool: Any, waiters: StatusWaiters, order: dict[str, Any], wait: float
) -> dict[str, Any]:
    """Long-poll: `order` as just read, or as it is once its status changed or `wait` ran out.
    At most MAX_LONG_POLLS at once per process (503 beyond), whichever lane asked."""
    if order["status"] not in UNSETTLED:
        return order
    with waiters.capacity.slot():
        return await _wait_for_change(pool, waiters, order, wait)


async def _wait_for_change(
    pool: Any, waiters: StatusWaiters, order: dict[str, Any], wait: float
) -> dict[str, Any]:
    order_id = uuid.UUID(order["order_id"])
    deadline = asyncio.get_running_loop().time() + wait
    while order["status"] in UNSETTLED:
        # Registered with the status just read: a change after that read is never missed.
        future = waiters.register(order["order_id"], order["status"])
        try:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return order
            try:
                changed = await asyncio.wait_for(asyncio.shield(future), timeout=remaining)
            except TimeoutError:
                changed = None
        finally:
            waiters.discard(order["order_id"], future)
        # The order as this process's consumer just wrote it, else as it is now.
        order = changed or await db.fetch_order(pool, order_id) or order
        if asyncio.get_running_loop().time() >= deadline:
            return order
    return order


@router.get("/orders", responses={200: {"model": OrderPage}, 422: PROBLEMS[422]})
async def list_orders(
    request: Request,
    customer_id: Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_NUL)] = None,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> JSONResponse:
    after_time, after_id = decode_cursor(cursor, _read_cursor) if cursor else (None, None)
    rows = await _pool(request).fetch(
        db.LIST_ORDERS, customer_id, status.value if status else None, after_time, after_id, limit + 1
    )
    items = [db.to_order(r) for r in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor(last["created_at"].isoformat(), str(last["order_id"]))
    return JSONResponse({"items": items, "next_cursor": next_cursor})


def _read_cursor(values: list[Any]) -> tuple[datetime, uuid.UUID]:
    raw_time, raw_id = values
    if not isinstance(raw_time, str) or not isinstance(raw_id, str):
        raise TypeError("not a time and an order id")
    after = datetime.fromisoformat(raw_time)
    if after.tzinfo is None:
        raise ValueError("naive time")
    return after.astimezone(UTC), uuid.UUID(raw_id)  # astimezone: overflow at the calendar's ends


async def _command(request: Request, action: Any, order_id: uuid.UUID) -> JSONResponse:
    try:
        order = await action(_pool(request), order_id)
    except service.NotFound:
        raise Problem(404, f"order {order_id} does not exist") from None
    except Refused as exc:
        raise Problem(exc.status_code, exc.detail) from None
    return _accepted(order)


@router.post("/orders/{order_id}/confirm", status_code=202, responses={202: {"model": Order}, **PROBLEMS})
async def confirm_order(order_id: OrderId, request: Request) -> JSONResponse:
    return await _command(request, service.confirm, order_id)


@router.post("/orders/{order_id}/cancel", status_code=202, responses={202: {"model": Order}, **PROBLEMS})
async def cancel_order(order_id: OrderId, request: Request) -> JSONResponse:
    return await _command(request, service.cancel, order_id)


@router.post("/orders/{order_id}/reserve", status_code=202, responses={202: {"model": Order}, **PROBLEMS})
async def reserve_order(order_id: OrderId, request: Request) -> JSONResponse:
    return await _command(request, service.reserve_again, order_id)
