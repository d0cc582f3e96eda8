"""Retention (API.md §6): idempotency keys are deleted 24 h after use, inbox entries after
7 days, the tombstones of cancelled orders after 7 days; nothing else, and never the ledger.

Each service lists its purges (statements in its db.py, each deleting at most $1 rows, oldest
first, over an index, and returning how many). Every process of the service runs the loop;
one at a time does the work: each batch is one short transaction that first takes a
transaction-level advisory lock without waiting, and a process that finds it taken leaves the
round to the holder. A batch locks its rows with SKIP LOCKED, so it never waits for (or blocks)
the service's own traffic on a row it is about to delete."""

import asyncio
import logging
from dataclasses import dataclass

import asyncpg

from shared.metrics import RETENTION_DELETED

log = logging.getLogger(__name__)

RETENTION_LOCK = 7_000_020


@dataclass(frozen=True)
class Purge:
    kind: str  # the metric's label
    statement: str  # deletes at most $1 rows due for deletion; returns their number


async def purge_once(pool: asyncpg.Pool, purges: list[Purge], batch_size: int) -> dict[str, int]:
    """Runs every purge until it finds fewer than a batch, unless another process is at it.
    Returns the rows deleted by this call, by kind."""
    deleted = {purge.kind: 0 for purge in purges}
    for purge in purges:
        while True:
            async with pool.acquire() as conn, conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RETENTION_LOCK):
                    return deleted  # another process is purging: it goes on to the end
                count: int = await conn.fetchval(purge.statement, batch_size)
            deleted[purge.kind] += count
            RETENTION_DELETED.labels(purge.kind).inc(count)
            if count < batch_size:
                break
    return deleted


async def purge_forever(
    pool: asyncpg.Pool, purges: list[Purge], interval: float, batch_size: int, stopping: asyncio.Event
) -> None:
    while not stopping.is_set():
        try:
            deleted = await purge_once(pool, purges, batch_size)
            if any(deleted.values()):
                log.info("retention: old rows deleted", extra={"deleted": deleted})
        except Exception:
            log.warning("retention failed; trying again next interval", exc_info=True)
        try:
            await asyncio.wait_for(stopping.wait(), timeout=interval)
        except TimeoutError:
            pass
