"""Readiness checks: a dependency is up when it answers within a second."""

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg

from shared.broker import Broker


def database_check(pool: asyncpg.Pool) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        async with asyncio.timeout(1):
            await pool.fetchval("SELECT 1")

    return check


def broker_check(broker: Broker) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        for connection in (broker.connection, broker.publisher):
            if connection.is_closed or not connection.connected.is_set():
                raise ConnectionError("not connected to RabbitMQ")

    return check
