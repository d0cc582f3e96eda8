"""The lean path: `/orders…`, `/stores/…` and `/stock/…` are forwarded in plain ASGI, without
FastAPI's routing, dependency solving and middleware stack (profiled at ~2/3 of the gateway's
CPU per forwarded request). Everything else (health, metrics, docs, OpenAPI) goes on to the
FastAPI app.

What the shared middlewares of shared/web.py do for FastAPI routes is done here by hand, in one
pass: the request id (as asgi-correlation-id), the body limit (as RequestGuard; the Content-Type
is left to the upstreams), the Prometheus metrics (same names, same route labels as when these
were FastAPI routes) and problem+json for every error of our own."""

import asyncio
import logging
import time
from urllib.parse import quote

import aiohttp
from asgi_correlation_id import correlation_id
from multidict import CIMultiDict
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.forward import Timeouts, Upstream, open_response, read_body
from gateway.reply import Metrics, Reply
from shared import edge
from shared.edge import hides_dot_or_slash
from shared.problems import Problem
from shared.web import MAX_BODY_BYTES

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


class Proxy:
    def __init__(self, app: ASGIApp, orders: Upstream, stock: Upstream, timeout: float,
                 import_max_bytes: int) -> None:
        self.app = app  # the FastAPI app: everything that is not forwarded
        self.orders = orders
        self.stock = stock
        self.timeouts = Timeouts(timeout)
        self.import_max_bytes = import_max_bytes
        self.metrics = Metrics()
        self.session: aiohttp.ClientSession | None = None  # opened by the app's lifespan

    def route(self, scope: Scope) -> tuple[str, Upstream | None] | None:
        """The metrics label and the upstream of a request's path; labels are the templates these
        had as FastAPI routes, so dashboards keep working. None: not forwarded (the FastAPI app's);
        no upstream: refused with 404, since an upstream would resolve the path to another one
        than the one matched here (/orders/%252e%252e/metrics is the orders' own /metrics)."""
        if hides_dot_or_slash(_raw_path(scope)):
            return "unmatched", None
        path: str = scope["path"]
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
        started = time.perf_counter()
        label, upstream = routed
        request_id, headers, length = _split_headers(scope["headers"])
        correlation_id.set(request_id.decode("latin-1"))  # for the log lines of this request
        reply = Reply(send, request_id)
        try:
            if upstream is None:
                raise Problem(404, "no such resource")
            await self._forward(scope, receive, reply, upstream, headers, length)
        except Problem as problem:
            await reply.problem(problem)
        except Exception:
            log.exception("unhandled error")
            if reply.status is None:
                await reply.problem(Problem(500, "internal error; the request id is in the logs"))
        status = reply.status or CLIENT_GONE
        self.metrics.observe(scope["method"], label, status, time.perf_counter() - started)

    async def _forward(self, scope: Scope, receive: Receive, reply: Reply, upstream: Upstream,
                       headers: CIMultiDict[str], length: bytes | None) -> None:
        method: str = scope["method"]
        if method not in METHODS:
            raise Problem(405, "Method Not Allowed", headers={"Allow": ALLOW})
        path: str = scope["path"]
        body = await self._body(receive, path, length)
        if body is None:
            return  # the client left while sending; nobody to answer
        query: bytes = scope["query_string"]
        streaming = path.endswith("/events")
        assert self.session is not None, "the lifespan opens the session before any request"
        upstream_response = await open_response(
            self.session, upstream, method, _target(scope, query), body, headers,
            self.timeouts.of(path, query, streaming))
        reply_headers = [(name, value) for name, value in upstream_response.raw_headers
                         if name.lower() not in FROM_UPSTREAM_DROPPED]
        if streaming and upstream_response.status == 200:
            await _stream(reply, reply_headers, upstream_response, receive)
            return
        content = await read_body(upstream_response)
        await reply.send(upstream_response.status, reply_headers, content)

    async def _body(self, receive: Receive, path: str, length: bytes | None) -> bytes | None:
        """The whole request body, refused with 413 past the limit: at once on Content-Length,
        else while it streams in (the header may be absent or lie). None: the client left."""
        limit = self.import_max_bytes if path.startswith("/stock/import") else MAX_BODY_BYTES
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise _too_large(limit)
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk: bytes = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                raise _too_large(limit)
            if not message.get("more_body", False):
                return b"".join(chunks) + chunk if chunks else chunk
            chunks.append(chunk)


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


def _too_large(limit: int) -> Problem:
    return Problem(413, f"request body is larger than {limit // 1024 // 1024} MiB")


async def _stream(reply: Reply, headers: list[tuple[bytes, bytes]],
                  upstream_response: aiohttp.ClientResponse, receive: Receive) -> None:
    """Passes each chunk on as it arrives (an event stream must not be buffered), until the
    upstream ends it or the client leaves; a client that leaves closes the upstream at once."""
    await reply.start(200, headers)
    pump = asyncio.ensure_future(_pump(reply, upstream_response))
    left = asyncio.ensure_future(_client_left(receive))
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


async def _client_left(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass

