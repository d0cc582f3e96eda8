"""Readiness checks: a dependency is up when it answers within a second."""

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
from aio_pika.abc import AbstractRobustConnection


def database_check(pool: asyncpg.Pool) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        async with asyncio.timeout(1):
            await pool.fetchval("SELECT 1")

    return check


def broker_check(connection: AbstractRobustConnection) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        if connection.is_closed or not connection.connected.is_set():
            raise ConnectionError("not connected to RabbitMQ")

    return check
