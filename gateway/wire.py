"""The upstream side of a buffered exchange (nearly every forwarded request), on pooled
keep-alive connections without aiohttp: the request is written as one buffer and the answer
parsed by httptools (the parser uvicorn uses). py-spy put aiohttp's client at ~40% of the
gateway's CPU per request (request/response objects, URL, timers, multidicts); an order is two
requests through the gateway. Event streams and the streamed import stay on aiohttp
(gateway/forward.py), as do the rules this module shares with it:

- an upstream is a list of base URLs taken round-robin; a URL that refuses the connection is
  skipped (the request never reached it, so even a POST may go to the next one);
- an idempotent request is sent once more if a pooled connection turns out to have been closed
  by the upstream before any answer (a POST is not: it may have been acted on);
- at most `max_connections` upstream connections at once; a request that finds none free
  within the connect timeout is answered 503 with Retry-After, a timeout 504, anything else
  that broke 502. Idle connections are dropped after IDLE_SECONDS, before the services' own
  keep-alive limit (75 s) closes them under a request."""

import asyncio
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

from gateway.forward import IDEMPOTENT, Upstream
from shared.problems import Problem

IDLE_SECONDS = 60.0
CONNECT_SECONDS = 3.0


class _Closed(Exception):
    """The connection closed before any byte of the answer: nothing was acted on if it was idle."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answer: asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes]] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.started = False  # a byte of the current answer came
        self.keep_alive = False  # the last answer allows another request on this connection
        self.closed = False
        self.idle_since = 0.0

    # ----- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(Problem(502, f"upstream answered something that is not HTTP: {type(exc).__name__}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(_Closed() if not self.started else Problem(502, "upstream response broke off"))

    # ----- httptools callbacks ------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:  # an interim answer (100 Continue): the real one follows
            self.headers, self.body = [], []
            return
        self.keep_alive = self.parser.should_keep_alive()  # only known while the message is current
        if self.answer is not None and not self.answer.done():
            self.answer.set_result((self.parser.get_status_code(), self.headers, b"".join(self.body)))

    # ----- use ----------------------------------------------------------------------------------
    def send(self, payload: bytes) -> "asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes]]":
        assert self.transport is not None
        self.answer = asyncio.get_running_loop().create_future()
        self.headers, self.body, self.started = [], [], False
        self.transport.write(payload)
        return self.answer

    def reusable(self) -> bool:
        return not self.closed and self.keep_alive

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


@dataclass
class Wire:
    """Buffered exchanges with the upstreams, `max_connections` connections at most."""

    max_connections: int
    _idle: dict[tuple[str, int], deque[_Connection]] = field(default_factory=dict)
    _slots: asyncio.Semaphore | None = None

    async def exchange(self, upstream: Upstream, method: str, target: str, body: bytes,
                       headers: list[tuple[str, str]], seconds: float) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """The upstream's status, headers and body for one request (`target`: path and query as
        sent by the client, already encoded)."""
        for base in upstream.rotation():
            address = _address(base)
            try:
                return await asyncio.wait_for(
                    self._exchange(address, method, target, body, headers, min(seconds, CONNECT_SECONDS)),
                    timeout=seconds)
            except ConnectionRefusedError:
                continue  # refused: the request never reached it
            except TimeoutError:
                raise Problem(504, f"{upstream.name} did not answer within {seconds:g} s") from None
            except _Busy:
                raise Problem(503, f"{upstream.name} is busy; retry shortly", headers={"Retry-After": "1"}) from None
            except (_Closed, OSError) as exc:
                raise Problem(502, f"{upstream.name} failed: {type(exc).__name__}") from None
        raise Problem(503, f"no {upstream.name} instance is reachable")

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    async def _exchange(self, address: tuple[str, int], method: str, target: str, body: bytes,
                        headers: list[tuple[str, str]], connect_seconds: float) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        payload = _request(address, method, target, body, headers)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_connections)
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=connect_seconds)
        except TimeoutError:
            raise _Busy() from None
        try:
            conn, pooled = await self._connection(address, connect_seconds)
            try:
                answer = await _send(conn, payload)
            except _Closed:
                if not pooled or method not in IDEMPOTENT:
                    raise
                conn, _ = await self._connection(address, connect_seconds, fresh=True)
                answer = await _send(conn, payload)
            if conn.reusable():
                conn.idle_since = asyncio.get_running_loop().time()
                self._idle.setdefault(address, deque()).append(conn)
            else:
                conn.close()
            return answer
        finally:
            self._slots.release()

    async def _connection(self, address: tuple[str, int], connect_seconds: float,
                          fresh: bool = False) -> tuple[_Connection, bool]:
        """A pooled idle connection (True), else a new one (False)."""
        loop = asyncio.get_running_loop()
        idle = self._idle.get(address)
        while idle and not fresh:
            conn = idle.pop()  # the most recently used: the least likely to be closed
            if not conn.closed and loop.time() - conn.idle_since < IDLE_SECONDS:
                return conn, True
            conn.close()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(_Connection, *address),
                                             timeout=connect_seconds)
        except TimeoutError:
            raise _Busy() from None
        return conn, False


async def _send(conn: _Connection, payload: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    try:
        return await conn.send(payload)
    except BaseException:
        conn.close()  # cancelled (a timeout, the client left) or broken: its state is unknown
        raise


class _Busy(Exception):
    """No connection could be had in time: nothing was sent."""


def _address(base: str) -> tuple[str, int]:
    parts = urlsplit(base)
    return parts.hostname or "127.0.0.1", parts.port or 80


def _request(address: tuple[str, int], method: str, target: str, body: bytes,
             headers: list[tuple[str, str]]) -> bytes:
    """The request as one buffer. Header names and values come from the client's request as
    uvicorn parsed it (no CR or LF can be in them), hop-by-hop ones already dropped."""
    lines = [f"{method} {target} HTTP/1.1", f"host: {address[0]}:{address[1]}"]
    # The body is whole already: an Expect header would only make the upstream answer 100 first.
    lines += [f"{name}: {value}" for name, value in headers if name.lower() != "expect"]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
