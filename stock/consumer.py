"""Consumes `stock.orders`: the orders service's commands. `routes` is the service's routing
table: event type → handler.

PedidoCriado are decided in natural batches (shared/batching.py, stock/reserve.py); a confirm
or a cancel is applied alone, in its own transaction with its inbox entry."""

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from asgi_correlation_id import correlation_id

from shared import metrics
from shared.batching import Batcher
from shared.consumer import Route, Routes
from shared.db import first_delivery
from shared.events import PedidoCancelado, PedidoConfirmado, PedidoCriado
from shared.messaging import TRACEPARENT
from shared.outbox import hand_over, wake_relays
from stock.holds import on_order_cancelled, on_order_confirmed
from stock.reserve import Arrival, decide_batch


def decide_pending(pool: asyncpg.Pool, ttl_seconds: float) -> Callable[[list[Arrival]], Awaitable[None]]:
    """Decides a batch of PedidoCriado in one transaction (stock/reserve.py)."""

    async def flush(batch: list[Arrival]) -> None:
        async with metrics.after_commit(), pool.acquire() as conn, conn.transaction():
            written = await decide_batch(conn, batch, ttl_seconds)
        hand_over(written)

    return flush


def routes(pool: asyncpg.Pool, batcher: Batcher[Arrival]) -> Routes:
    async def on_created(cmd: PedidoCriado, message_id: str) -> None:
        await batcher.submit(Arrival(cmd, message_id, correlation_id.get(), TRACEPARENT.get()))

    def once(apply: Callable[[asyncpg.Connection, Any], Awaitable[None]]) -> Callable[[Any, str], Awaitable[None]]:
        """A confirm or cancel: applied in its own transaction with its inbox entry."""

        async def handle(cmd: PedidoConfirmado | PedidoCancelado, message_id: str) -> None:
            async with metrics.after_commit(), pool.acquire() as conn, conn.transaction():
                if not await first_delivery(conn, message_id):
                    return
                await apply(conn, cmd)
            wake_relays()

        return handle

    return {
        "PedidoCriado": Route(PedidoCriado.model_validate, on_created),
        "PedidoConfirmado": Route(PedidoConfirmado.model_validate, once(on_order_confirmed)),
        "PedidoCancelado": Route(PedidoCancelado.model_validate, once(on_order_cancelled)),
    }
