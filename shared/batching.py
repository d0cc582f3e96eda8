"""Natural batching: whatever piled up while the previous batch was being written goes next.

Callers `await submit(item)` and get back when the batch holding their item committed (or its
error). No timer waits for a batch to fill: at low load a batch is one item and costs no extra
latency; under load batches grow by themselves, up to `max_size`. If a batch fails for a reason
that is not transient, its items are retried one by one, so one bad item fails alone."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class Batcher(Generic[T]):
    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[None]],
        *,
        max_size: int = 100,
        flushers: int = 2,
        transient: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._flush = flush
        self._max_size = max_size
        self._transient = transient
        self._queue: list[tuple[T, asyncio.Future[None]]] = []
        self._ready = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run(), name=f"batcher-{i}") for i in range(flushers)]

    async def submit(self, item: T) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._ready.set()
        await future

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            batch, self._queue = self._queue[: self._max_size], self._queue[self._max_size :]
            if not self._queue:
                self._ready.clear()
            if batch:
                await self._write(batch)

    async def _write(self, batch: list[tuple[T, asyncio.Future[None]]]) -> None:
        try:
            await self._flush([item for item, _ in batch])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if len(batch) == 1 or isinstance(exc, self._transient):
                _settle(batch, exc)
                return
            log.warning("batch failed; retrying its items one by one", exc_info=True)
            for entry in batch:
                await self._write([entry])
            return
        _settle(batch, None)


def _settle(batch: list[tuple[T, asyncio.Future[None]]], exc: BaseException | None) -> None:
    for _, future in batch:
        if future.done():
            continue
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)
