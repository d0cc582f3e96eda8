"""What an idle HTTP process costs (shared/edge_server.py): uvicorn's loop looks ten times a second
whether to exit and whether the Date header changed; ours once a second, woken at once by an
exit signal. No sockets: main_loop alone, on this test's event loop."""

import asyncio
import signal
import time

import uvicorn
from starlette.types import Receive, Scope, Send

from shared.edge_server import EdgeServer, protocol


async def _app(scope: Scope, receive: Receive, send: Send) -> None:  # never called: no sockets
    raise AssertionError


class _Counting(EdgeServer):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ticks: list[float] = []

    async def on_tick(self, counter: int) -> bool:
        self.ticks.append(time.monotonic())
        return await super().on_tick(counter)


def _server() -> _Counting:
    config = uvicorn.Config(_app, http=protocol(16), log_config=None, lifespan="off")
    config.load()
    return _Counting(config)


async def test_an_idle_server_wakes_once_a_second_and_keeps_the_date_header_fresh() -> None:
    server = _server()
    loop = asyncio.create_task(server.main_loop())
    await asyncio.sleep(1.5)  # the window measured, not a wait for a result
    server.should_exit = True  # the next tick ends the loop
    await asyncio.wait_for(loop, timeout=3)
    # t=0, t=1 s and the tick that sees should_exit; uvicorn's own loop would have ticked 15 times
    assert 2 <= len(server.ticks) <= 4, server.ticks
    gaps = [later - earlier for earlier, later in zip(server.ticks, server.ticks[1:])]
    assert all(gap >= 0.9 for gap in gaps), gaps
    date = dict(server.server_state.default_headers)[b"date"]
    assert date.endswith(b" GMT")


async def test_an_exit_signal_ends_the_loop_at_once_not_at_the_next_tick() -> None:
    server = _server()
    loop = asyncio.create_task(server.main_loop())
    deadline = time.monotonic() + 3
    while not server.ticks and time.monotonic() < deadline:  # the first tick: a whole second to the next
        await asyncio.sleep(0.01)
    asked = time.monotonic()
    server.handle_exit(signal.SIGTERM, None)  # what the SIGTERM handler calls
    await asyncio.wait_for(loop, timeout=3)
    assert time.monotonic() - asked < 0.5
    assert server.should_exit and not server.force_exit
