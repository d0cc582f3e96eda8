"""The lean path: `/orders…`, `/stores/…` and `/stock/…` are forwarded in plain ASGI, without
FastAPI's routing, dependency solving and middleware stack (profiled at ~2/3 of the gateway's
CPU per forwarded request). Everything else (health, metrics, docs, OpenAPI) goes on to the
FastAPI app.

The edge rules (shared/edge.py) are applied here in one pass: the request id, the body limit
(the Content-Type is left to the upstreams), the caps on long-polls and event streams, the
Prometheus metrics (same names, same route labels as when these were FastAPI routes) and
problem+json for every error of our own. `/stock/import` alone is streamed to the stock API
instead of buffered: it checks the admin token before it reads a byte of the body."""

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from urllib.parse import quote

import aiohttp
from multidict import CIMultiDict
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.forward import Timeouts, Upstream, open_response, read_body
from gateway.reply import Reply
from gateway.upload import Upload
from gateway.wire import Wire
from shared import edge
from shared.edge import Capacity, hides_dot_or_slash
from shared.problems import Problem
from shared.settings import Settings

log = logging.getLogger(__name__)

# Dropped both ways: they describe one connection, not the message. The request id and the
# length are set by us; `host` by aiohttp for the upstream.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailers", b"transfer-encoding", b"upgrade", b"host", b"content-length", b"x-request-id",
})
# Set by the gateway's own server on every answer: the upstream's copies would be duplicates.
FROM_UPSTREAM_DROPPED = HOP_BY_HOP | {b"date", b"server"}
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
ALLOW = ", ".join(sorted(METHODS))
CLIENT_GONE = 499  # nginx's status for "the client closed the request": not our failure
IMPORT_PATH = "/stock/import"


class Proxy:
    def __init__(self, app: ASGIApp, orders: Upstream, stock: Upstream, settings: Settings) -> None:
        self.app = app  # the FastAPI app: everything that is not forwarded
        self.orders = orders
        self.stock = stock
        self.timeouts = Timeouts(settings.upstream_timeout_seconds)
        self.import_max_bytes = settings.import_max_bytes
        self.long_polls = Capacity("long-polls", settings.max_long_polls)
        self.streams = Capacity("event streams", settings.max_feed_streams)
        self.metrics = edge.RouteMetrics("gateway")
        # Event streams and the import (streamed both ways) go through aiohttp; every other
        # forwarded request through the lean client.
        self.session: aiohttp.ClientSession | None = None  # opened by the app's lifespan
        self.wire = Wire(settings.max_connections)

    def route(self, scope: Scope) -> tuple[str, Upstream | None] | None:
        """The metrics label and the upstream of a request's path; labels are the templates these
        had as FastAPI routes, so dashboards keep working. None: not forwarded (the FastAPI app's);
        no upstream: refused with 404, since an upstream would resolve the path to another one
        than the one matched here (/orders/%252e%252e/metrics is the orders' own /metrics)."""
        path: str = scope["path"]
        if hides_dot_or_slash(_raw_path(scope)) or edge.has_control(path):
            return "unmatched", None
        if path.startswith("/orders"):
            if path == "/orders":
                return "/orders", self.orders
            if path.startswith("/orders/"):
                return "/orders/{rest:path}", self.orders
        elif path.startswith("/stores/"):
            return "/stores/{rest:path}", self.stock
        elif path.startswith("/stock/"):
            return "/stock/{rest:path}", self.stock
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        routed = self.route(scope) if scope["type"] == "http" else None
        if routed is None:
            await self.app(scope, receive, send)
            return
        label, upstream = routed
        request_id, headers, length = _split_headers(scope["headers"])
        context = edge.enter(request_id, database=False)
        reply = Reply(send, request_id)
        try:
            if upstream is None:
                raise Problem(404, "no such resource")
            await self._forward(scope, receive, reply, upstream, headers, length)
        except Problem as problem:
            if reply.status is None:
                await reply.problem(problem)
        except Exception:
            log.exception("unhandled error")
            if reply.status is None:
                await reply.problem(Problem(500, "internal error; the request id is in the logs"))
        finally:
            context.close()
        status = reply.status or CLIENT_GONE
        self.metrics.observe(scope["method"], label, status, context.elapsed())

    async def _forward(self, scope: Scope, receive: Receive, reply: Reply, upstream: Upstream,
                       headers: CIMultiDict[str], length: bytes | None) -> None:
        method: str = scope["method"]
        if method not in METHODS:
            raise Problem(405, "Method Not Allowed", headers={"Allow": ALLOW})
        path: str = scope["path"]
        query: bytes = scope["query_string"]
        streaming = path.endswith("/events")
        wait = _long_poll_wait(query) if method == "GET" and not streaming else 0.0
        with self._held(streaming, wait):
            if path == IMPORT_PATH and method == "POST":
                await self._upload(scope, receive, reply, upstream, headers, length)
                return
            edge.check_length(length, edge.MAX_BODY_BYTES)
            body = await edge.read_body(receive, edge.MAX_BODY_BYTES)
            if body is None:
                return  # the client left while sending; nobody to answer
            if streaming:
                upstream_response = await self._open(scope, upstream, body, headers, wait, streaming)
                reply_headers = _reply_headers(upstream_response)
                if upstream_response.status == 200:
                    await _stream(reply, reply_headers, upstream_response, receive)
                    return
                await reply.send(upstream_response.status, reply_headers, await read_body(upstream_response))
                return
            if wait > 0:
                answer = await edge.unless_client_leaves(
                    receive, self._exchange(scope, upstream, body, headers, wait))
                if answer is not None:
                    await reply.send(*answer)
                return
            await reply.send(*await self._exchange(scope, upstream, body, headers, wait))

    async def _exchange(self, scope: Scope, upstream: Upstream, body: bytes, headers: CIMultiDict[str],
                        wait: float) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """A buffered exchange, on the lean client (gateway/wire.py)."""
        status, raw, content = await self.wire.exchange(
            upstream, scope["method"], _target(scope, scope["query_string"]), body, list(headers.items()),
            self.timeouts.seconds_of(scope["path"], wait))
        return status, _kept(raw), content

    def _held(self, streaming: bool, wait: float) -> contextlib.AbstractContextManager[None]:
        """A slot of the long-poll or event-stream cap for the request's time, if it is one."""
        if streaming:
            return self.streams.slot()
        if wait > 0:
            return self.long_polls.slot()
        return contextlib.nullcontext()

    async def _open(self, scope: Scope, upstream: Upstream, body: object, headers: CIMultiDict[str],
                    wait: float, streaming: bool, expect100: bool = False) -> aiohttp.ClientResponse:
        assert self.session is not None, "the lifespan opens the session before any request"
        path: str = scope["path"]
        return await open_response(
            self.session, upstream, scope["method"], _target(scope, scope["query_string"]), body,
            headers, self.timeouts.of(path, wait, streaming), expect100)

    async def _upload(self, scope: Scope, receive: Receive, reply: Reply, upstream: Upstream,
                      headers: CIMultiDict[str], length: bytes | None) -> None:
        """The import, streamed: the stock API answers 401/403 before it reads the body, and so
        the gateway neither buffers nor even receives one without the admin token."""
        if length is not None and length.isdigit() and len(length) < 16:
            headers["Content-Length"] = length.decode()  # lets the stock API refuse it at once
        upload = Upload(receive, self.import_max_bytes)
        try:
            # Expect: 100-continue: the stock API sees the head (and checks the token) before any
            # body is sent, and asks for the body only once its handler reads it.
            upstream_response = await self._open(scope, upstream, upload.chunks(), headers, 0.0, False,
                                                 expect100=True)
        except Problem:
            if upload.too_large:
                raise edge.too_large(self.import_max_bytes) from None
            if upload.client_left:
                return
            raise
        content = await read_body(upstream_response)
        await reply.send(upstream_response.status, _reply_headers(upstream_response), content)


def _reply_headers(upstream_response: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
    return _kept(upstream_response.raw_headers)


def _kept(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An upstream answer's headers the client gets (both upstream clients)."""
    return [(name, value) for name, value in raw if name.lower() not in FROM_UPSTREAM_DROPPED]


def _long_poll_wait(query: bytes) -> float:
    """The seconds a long-poll may wait; 0 for a `wait` the upstream will answer 422 for."""
    try:
        return edge.wait_seconds(edge.query_wait(query))
    except Problem:
        return 0.0


def _split_headers(raw: list[tuple[bytes, bytes]]) -> tuple[bytes, CIMultiDict[str], bytes | None]:
    """One pass over the request headers (names arrive lower-cased, per ASGI): the request id
    (the client's if it obeys the rule of shared/edge.py, else a new one), the Content-Length, the
    headers to send upstream, repeated ones kept."""
    request_id = b""
    length = None
    forwarded: CIMultiDict[str] = CIMultiDict()
    for name, value in raw:
        if name in HOP_BY_HOP:
            if name == b"x-request-id" and not request_id:
                request_id = value
            elif name == b"content-length":
                length = value
        else:
            forwarded.add(name.decode("latin-1"), value.decode("latin-1"))
    request_id = edge.request_id(request_id)
    forwarded["X-Request-ID"] = request_id.decode("latin-1")
    return request_id, forwarded, length


def _raw_path(scope: Scope) -> bytes:
    raw: bytes | None = scope.get("raw_path")
    return raw if raw is not None else quote(scope["path"]).encode()


def _target(scope: Scope, query: bytes) -> str:
    """Path and query for the upstream exactly as the client sent them (already encoded, sent
    without re-quoting): the upstream decodes them once, to the path matched here."""
    path = _raw_path(scope).decode("latin-1")
    return f"{path}?{query.decode('latin-1')}" if query else path


async def _stream(reply: Reply, headers: list[tuple[bytes, bytes]],
                  upstream_response: aiohttp.ClientResponse, receive: Receive) -> None:
    """Passes each chunk on as it arrives (an event stream must not be buffered), until the
    upstream ends it or the client leaves; a client that leaves closes the upstream at once."""
    await reply.start(200, headers)
    pump = asyncio.ensure_future(_pump(reply, upstream_response))
    left = asyncio.ensure_future(edge.client_left(receive))
    try:
        await asyncio.wait((pump, left), return_when=asyncio.FIRST_COMPLETED)
    finally:
        pump.cancel()
        left.cancel()
        upstream_response.close()
    if pump.done() and not pump.cancelled() and (error := pump.exception()) is not None:
        raise error  # not the upstream breaking off (that ends the stream): a bug, to be logged
    await reply.chunk(b"", more=False)  # a no-op if the client is gone


async def _pump(reply: Reply, upstream_response: aiohttp.ClientResponse) -> None:
    try:
        async for chunk in upstream_response.content.iter_any():
            await reply.chunk(chunk, more=True)
    except (aiohttp.ClientError, TimeoutError):
        pass  # the upstream broke off: end the stream, the client reconnects with Last-Event-ID
