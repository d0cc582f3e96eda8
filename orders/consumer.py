"""Consumes `orders.status`: stock's answers (`AtualizarStatus`) move the order along.
`routes` is the service's routing table: event type → handler.

Answers are applied in natural batches (shared/batching.py): one transaction and one commit for
whatever arrived meanwhile, with one statement locking the batch's orders and checking its
messages against the inbox, and one writing them (orders/service.py apply_answers)."""

from collections.abc import Callable
from typing import Any

import asyncpg
from asgi_correlation_id import correlation_id

from orders import db
from orders.service import apply_answers
from shared import metrics
from shared.batching import Batcher
from shared.consumer import Route, Routes
from shared.events import AtualizarStatus

Pending = tuple[AtualizarStatus, str, str | None]  # the answer, its message_id, its request id


def apply_pending(pool: asyncpg.Pool, on_applied: Callable[[dict[str, dict[str, Any]]], None]):  # type: ignore[no-untyped-def]
    """`on_applied` hears, after commit, the orders the batch changed, as written (long-poll
    wake-ups answer with them)."""

    async def flush(batch: list[Pending]) -> None:
        changed: dict[str, dict[str, Any]] = {}
        async with metrics.after_commit(), pool.acquire() as conn, conn.transaction():
            claimed = await conn.fetch(db.CLAIM_ANSWERS, sorted({answer.order_id for answer, _, _ in batch}),
                                       [message_id for _, message_id, _ in batch])
            fresh = {row["message_id"] for row in claimed if row["kind"] == "message"}
            todo: list[Pending] = []
            for pending in batch:
                if pending[1] in fresh:
                    fresh.discard(pending[1])  # the same message twice in one batch counts once
                    todo.append(pending)
            if todo:
                changed = await apply_answers(conn, [(answer, request_id) for answer, _, request_id in todo],
                                              [row for row in claimed if row["kind"] == "order"])
        on_applied(changed)

    return flush


def routes(batcher: Batcher[Pending]) -> Routes:
    async def on_answer(answer: AtualizarStatus, message_id: str) -> None:
        await batcher.submit((answer, message_id, correlation_id.get()))

    return {"AtualizarStatus": Route(AtualizarStatus.model_validate, on_answer)}
