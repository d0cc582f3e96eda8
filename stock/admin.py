"""Stock administration: counting (PUT) and restocking an item, with optimistic versions.
Refusals are domain errors (stock/domain.py); the HTTP layer turns them into answers."""

from typing import Any

import asyncpg
from asgi_correlation_id import correlation_id

from stock import db
from stock.domain import (
    Change,
    Conflict,
    Figures,
    UnknownItem,
    VersionRequired,
    check_version,
    count,
)

MAX_ON_HAND = 1_000_000_000


async def put_item(
    pool: asyncpg.Pool, store_id: str, sku: str, on_hand: int, expected_version: int | None, version_given: bool
) -> tuple[dict[str, Any], bool]:
    """Creates the item (expected_version absent/null/0) or sets its counted quantity.
    Returns the item and whether it was created."""
    async with pool.acquire() as conn, conn.transaction():
        current = await conn.fetchrow(db.LOCK_ITEM, store_id, sku)
        if not expected_version:
            if current is not None:
                if not version_given:
                    raise VersionRequired("expected_version is required to change an existing item")
                raise Conflict(f"{store_id}/{sku} exists; send its current version to change it")
            created = await db.create_items(conn, [(store_id, sku, on_hand)], correlation_id.get())
            if not created:  # created concurrently between our read and insert
                raise Conflict(f"{store_id}/{sku} was just created by another request")
            return db.to_item(created[0]), True
        if current is None:
            raise UnknownItem(f"no stock item {store_id}/{sku}")
        check_version(current["version"], expected_version)
        change = count(store_id, sku, Figures(current["on_hand"], current["reserved"]), on_hand)
        rows = await db.apply_changes(conn, "adjusted", [change], None, correlation_id.get())
        return db.to_item(rows[0]), False


async def restock(
    pool: asyncpg.Pool, store_id: str, sku: str, quantity: int, expected_version: int | None
) -> dict[str, Any]:
    async with pool.acquire() as conn, conn.transaction():
        current = await conn.fetchrow(db.LOCK_ITEM, store_id, sku)
        if current is None:
            raise UnknownItem(f"no stock item {store_id}/{sku}")
        if expected_version is not None:
            check_version(current["version"], expected_version)
        if current["on_hand"] + quantity > MAX_ON_HAND:
            raise Conflict(f"on_hand would exceed {MAX_ON_HAND}")
        rows = await db.apply_changes(
            conn, "restocked", [Change(store_id, sku, quantity, 0)], None, correlation_id.get()
        )
        return db.to_item(rows[0])
