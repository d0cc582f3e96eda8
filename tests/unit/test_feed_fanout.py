"""SSE fan-out by store (stock/feed.py): one database read per store per wake-up, whatever the
number of streams; a stream resumed from an older event reads the gap once, for itself. A fake
pool stands in for PostgreSQL (the e2e feed tests run against the real one)."""

import asyncio
from typing import Any

from stock import db
from stock.feed import StockFeed

STREAMS = 200


class Ledger:
    """The movements of one store, and the reads made of them."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.reads = 0

    async def fetchval(self, query: str, store_id: str) -> int:
        assert query == db.FEED_HEAD
        return self.rows[-1]["id"] if self.rows else 0

    async def fetch(self, query: str, store_id: str, after: int, limit: int) -> list[dict[str, Any]]:
        assert query == db.FEED_AFTER
        self.reads += 1
        return [r for r in self.rows if r["id"] > after][:limit]

    def add(self) -> None:
        row_id = len(self.rows) + 1
        self.rows.append({"id": row_id, "body": {"sku": f"A{row_id}"}})


async def _collect(feed: StockFeed, after: int, wanted: int, into: list[list[int]]) -> None:
    seen: list[int] = []
    into.append(seen)
    async for event in feed.stream("S1", after):
        seen.append(int(event["id"]))
        if len(seen) == wanted:
            return


async def _until(check: Any) -> None:
    async with asyncio.timeout(5):
        while not check():
            await asyncio.sleep(0.01)


async def test_many_streams_of_one_store_cost_one_read_per_wake_up() -> None:
    ledger = Ledger()
    feed = StockFeed(ledger, max_streams=STREAMS)  # type: ignore[arg-type]
    seen: list[list[int]] = []
    tasks = [asyncio.create_task(_collect(feed, 0, 3, seen)) for _ in range(STREAMS)]
    store = await _wait_for_store(feed)
    await _until(lambda: store.reads >= 1 and len(store.streams) == STREAMS)
    before = ledger.reads
    for wake_ups in range(1, 4):
        ledger.add()
        store.wake.set()
        await _until(lambda n=wake_ups: all(len(s) >= n for s in seen))
    await asyncio.gather(*tasks)
    assert all(s == [1, 2, 3] for s in seen)
    assert ledger.reads - before == 3, f"{ledger.reads - before} reads for 3 wake-ups of {STREAMS} streams"
    assert "S1" not in feed._stores, "the store's reader stops with its last stream"


async def test_a_resumed_stream_reads_its_gap_once_then_shares_the_reader() -> None:
    ledger = Ledger()
    for _ in range(5):
        ledger.add()
    feed = StockFeed(ledger, max_streams=10)  # type: ignore[arg-type]
    seen: list[list[int]] = []
    live = asyncio.create_task(_collect(feed, 5, 1, seen))
    store = await _wait_for_store(feed)
    await _until(lambda: store.ready.is_set() and store.reads >= 1)
    resumed = asyncio.create_task(_collect(feed, 2, 4, seen))
    await _until(lambda: len(seen) == 2 and len(seen[1]) == 3)
    ledger.add()
    store.wake.set()
    await asyncio.gather(live, resumed)
    assert seen == [[6], [3, 4, 5, 6]]


async def _wait_for_store(feed: StockFeed) -> Any:
    await _until(lambda: "S1" in feed._stores)
    return feed._stores["S1"]
