"""The HTTP server of every process: uvicorn with the edge rules that must act before a request
is whole, so before any ASGI app could (API.md §1, §4):

- a request target over 8 KiB is 414, request headers over 16 KiB in all are 431, refused while
  they arrive (uvicorn alone buffers a head of any size);
- a client that has not sent its whole request head 10 s after connecting (or after starting a
  request) is disconnected: thousands of half-open connections cost nothing for long;
- beyond `MAX_CONNECTIONS` open connections, a new connection's request is answered 503 with
  Retry-After (uvicorn's own `limit_concurrency` answers plain text without it);
- a request that is not HTTP/1.1 at all is 400 problem+json, not uvicorn's plain text.

Each refusal is problem+json with the request's id and `Connection: close`.

An idle server wakes once a second, not ten times (EdgeServer): the idle stack's CPU budget."""

import asyncio
import contextlib
from types import FrameType
from typing import Any, ClassVar

import uvicorn
from starlette.types import ASGIApp
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from shared import edge
from shared.problems import Problem
from shared.runtime import tune_gc

LINGER_SECONDS = 1.0  # how long a refused client may go on sending before the socket closes
# A head bigger than both limits together is refused without parsing further (one read of a
# socket brings at most a few hundred kB more).
HEAD_HARD_LIMIT = edge.MAX_HEADER_BYTES + edge.MAX_TARGET_BYTES + 1024


class _Refused(Exception):
    """Raised from a parser callback: httptools stops parsing and our 400 path answers."""


class _Coalescing:
    """A transport whose writes within one turn of the event loop leave in one system call:
    uvicorn writes an answer's head and its body separately, and a `write` is a fifth of a
    service's CPU per request (py-spy). Written at the end of the turn (call_soon), so a stream's
    head still leaves at once; closing or ending the output writes what is held first."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self._flush)
        self._held.append(data)

    def _flush(self) -> None:
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class EdgeProtocol(HttpToolsProtocol):
    max_connections: ClassVar[int] = 4096
    header_timeout: ClassVar[float] = edge.HEADER_TIMEOUT_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = True  # waiting for (the rest of) a request head
        self._head_bytes = 0
        self._header_bytes = 0
        self._over_cap = False
        self._refusal: Problem | None = None
        self._refused = False

    # ----- connection -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Coalescing(transport, self.loop))  # type: ignore[arg-type]
        self._over_cap = len(self.connections) > self.max_connections
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered already; what still comes is dropped until the socket closes
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > HEAD_HARD_LIMIT and not self._refused:
            self._refuse(self._head_problem())

    # ----- parser callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._header_bytes = 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > edge.MAX_TARGET_BYTES:
            self._refusal = self._head_problem()
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4  # name: value CRLF
        if self._header_bytes > edge.MAX_HEADER_BYTES:
            self._refusal = self._head_problem()
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._disarm()
        if self._over_cap:
            self._refusal = Problem(503, "this server has too many open connections; retry shortly",
                                    headers={"Retry-After": edge.RETRY_AFTER})
            raise _Refused
        super().on_headers_complete()

    # ----- refusals -----------------------------------------------------------------------------

    def _head_problem(self) -> Problem:
        if len(getattr(self, "url", b"")) > edge.MAX_TARGET_BYTES:
            return Problem(414, f"the request target is longer than {edge.MAX_TARGET_BYTES // 1024} KiB")
        return Problem(431, f"the request headers are larger than {edge.MAX_HEADER_BYTES // 1024} KiB")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to anything the parser refused, including our own refusals."""
        self._refuse(self._refusal or Problem(400, "the request is not valid HTTP/1.1"))

    def _refuse(self, problem: Problem) -> None:
        self._refused = True
        self._disarm()
        headers, body = edge.problem_parts(problem)
        request_id = edge.request_id_of(self.headers or [])
        lines = [STATUS_LINE[problem.status]]
        for name, value in [*self.server_state.default_headers, *headers,
                            (b"content-length", b"%d" % len(body)), (b"x-request-id", request_id),
                            (b"connection", b"close")]:
            lines += [name, b": ", value, b"\r\n"]
        self.transport.write(b"".join([*lines, b"\r\n", body]))
        # Closed a little later, not at once: closing with unread input would reset the
        # connection, and a reset may destroy the answer before the client has read it.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)


class EdgeServer(uvicorn.Server):
    """uvicorn's server with a tick of one second instead of 0.1 s. The tick only refreshes the
    Date header (which changes once a second) and looks whether to exit; ten ticks a second are
    most of what an idle HTTP process costs. An exit signal wakes the loop at once, so shutdown
    is no slower than with uvicorn's own loop."""

    tick_seconds: ClassVar[float] = 1.0

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        # Set before the first look at should_exit: a signal from now on wakes the wait below.
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        # on_tick refreshes the Date header when its counter is a multiple of 10: every tick here.
        while not await self.on_tick(0):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.tick_seconds):
                    await self._wake.wait()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # A signal handler may run in the middle of the loop's own work: hand the wake-up to the
        # loop instead of touching the event here.
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)


def protocol(max_connections: int) -> type[EdgeProtocol]:
    return type("EdgeProtocol", (EdgeProtocol,), {"max_connections": max_connections})


def serve(app: ASGIApp | str, port: int, host: str, access_log: bool = False,
          max_connections: int = 4096) -> None:
    tune_gc()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=protocol(max_connections),
        access_log=access_log,
        log_config=None,
        timeout_graceful_shutdown=10,
        # Longer than the gateway's pooled-connection idle time, so the gateway never reuses a
        # connection at the instant this side closes it (which surfaces as a reset, then 502).
        timeout_keep_alive=75,
        # Past the connection cap, the kernel's queue of connections not yet accepted.
        backlog=2048,
    )
    server = EdgeServer(config)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises a Ctrl-C it has handled
        server.run()
    if not server.started:  # as uvicorn.run: a startup that failed is a process that failed
        raise SystemExit(STARTUP_FAILURE)
