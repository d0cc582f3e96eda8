"""Gauges refreshed when Prometheus scrapes (shared/metrics.py `on_scrape`): the outbox backlog
and its age per lane, and the depth of the dead-letter queues. The age of the oldest pending
order is the orders service's own (orders/db.py)."""

import asyncpg
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from shared.messaging import ROUTED_EVENTS
from shared.metrics import (
    DEAD_LETTERS,
    OUTBOX_BACKLOG,
    OUTBOX_OLDEST,
    OUTBOX_SET_ASIDE_ROWS,
    Refresh,
)

# The relay's two lanes (shared/outbox.py): events some queue must receive, and the rest.
ROUTED_LANE, UNROUTED_LANE = "orders", "stock-changes"

# Every waiting row is counted (a backlog capped at one batch hides how far behind a relay is).
# The outbox is a queue the relay keeps near empty, so the scan is short; when it is not, a
# scrape every 15 s costing a few milliseconds is what an operator wants spent.
OUTBOX_LANES = """
SELECT event_type = ANY($1::text[]) AS routed, count(*) AS waiting,
       COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(created_at)), 0)::float8 AS oldest
FROM outbox GROUP BY 1
"""
SET_ASIDE = "SELECT count(*) FROM outbox_set_aside"


def outbox_gauges(pool: asyncpg.Pool) -> Refresh:
    async def refresh() -> None:
        rows = await pool.fetch(OUTBOX_LANES, list(ROUTED_EVENTS))
        found = {ROUTED_LANE: (0, 0.0), UNROUTED_LANE: (0, 0.0)}
        for row in rows:
            found[ROUTED_LANE if row["routed"] else UNROUTED_LANE] = (row["waiting"], row["oldest"])
        for lane, (waiting, oldest) in found.items():
            OUTBOX_BACKLOG.labels(lane).set(waiting)
            OUTBOX_OLDEST.labels(lane).set(max(0.0, oldest))
        OUTBOX_SET_ASIDE_ROWS.set(await pool.fetchval(SET_ASIDE))

    return refresh


def dead_letter_gauges(connection: AbstractRobustConnection, queues: list[str]) -> Refresh:
    """Depth of `<queue>.dlq` for each queue, by a passive declare on a channel of its own (a
    missing queue closes the channel it was asked on; the next scrape opens another)."""
    channel: AbstractChannel | None = None

    async def refresh() -> None:
        nonlocal channel
        if channel is None or channel.is_closed:
            channel = await connection.channel()
        underlay = await channel.get_underlay_channel()
        for queue in queues:
            declared = await underlay.queue_declare(f"{queue}.dlq", passive=True)
            DEAD_LETTERS.labels(f"{queue}.dlq").set(declared.message_count or 0)

    return refresh
