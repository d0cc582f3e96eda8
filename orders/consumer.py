"""Consumes `orders.status`: stock's answers (`AtualizarStatus`) move the order along."""

import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from orders.service import apply_status
from shared.consumer import parse_json
from shared.db import first_delivery
from shared.events import AtualizarStatus


def parse(message: AbstractIncomingMessage) -> AtualizarStatus:
    return AtualizarStatus.model_validate(parse_json(message))


def handler(pool: asyncpg.Pool):  # type: ignore[no-untyped-def]
    async def handle(answer: AtualizarStatus, message_id: str) -> None:
        async with pool.acquire() as conn, conn.transaction():
            if await first_delivery(conn, message_id):
                await apply_status(conn, answer)

    return handle
