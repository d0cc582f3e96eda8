"""Forwarding to upstream services with aiohttp (measured ~5x faster here than httpx).

Each upstream is a list of base URLs taken round-robin. A URL that refuses the connection is
skipped (the request never reached it, so even a POST may go to the next one); a timeout is not
retried, since the upstream may have acted on the request."""

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from asgi_correlation_id import correlation_id
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from shared.problems import Problem

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length", "x-request-id",
})


BULK_TIMEOUT = 300.0
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


@dataclass
class Upstream:
    name: str
    urls: list[str]
    _turn: itertools.count = field(default_factory=itertools.count)  # type: ignore[type-arg]

    def rotation(self) -> list[str]:
        start = next(self._turn) % len(self.urls)
        return self.urls[start:] + self.urls[:start]


async def forward(
    session: aiohttp.ClientSession, upstream: Upstream, request: Request, timeout: float
) -> Response:
    body = await request.body()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    headers["X-Request-ID"] = correlation_id.get() or ""
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    streaming = request.url.path.endswith("/events")
    if request.url.path == "/stock/import":
        timeout = max(timeout, BULK_TIMEOUT)  # a whole ERP file is one transaction
    if not streaming and request.query_params.get("wait"):
        timeout += _seconds(request.query_params["wait"])
    client_timeout = aiohttp.ClientTimeout(
        total=None if streaming else timeout, connect=min(timeout, 3.0)
    )
    for base in upstream.rotation():
        try:
            upstream_response = await _send(session, request.method, base + path, body, headers, client_timeout)
        except aiohttp.ClientConnectorError:
            continue  # refused: try the next URL
        except TimeoutError:
            raise Problem(504, f"{upstream.name} did not answer within {timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise Problem(502, f"{upstream.name} failed: {type(exc).__name__}") from None
        return await _relay(upstream_response, streaming)
    raise Problem(503, f"no {upstream.name} instance is reachable")


async def _send(
    session: aiohttp.ClientSession, method: str, url: str, body: bytes, headers: dict[str, str],
    timeout: aiohttp.ClientTimeout,
) -> aiohttp.ClientResponse:
    """One request; an idempotent one is sent again once if a pooled connection turned out to
    be closed by the upstream (a POST is not: it may have been acted on)."""
    try:
        return await session.request(method, url, data=body or None, headers=headers,
                                     timeout=timeout, allow_redirects=False)
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
        if method not in IDEMPOTENT:
            raise
    return await session.request(method, url, data=body or None, headers=headers,
                                 timeout=timeout, allow_redirects=False)


async def _relay(upstream_response: aiohttp.ClientResponse, streaming: bool) -> Response:
    headers = {k: v for k, v in upstream_response.headers.items() if k.lower() not in HOP_BY_HOP}
    if streaming and upstream_response.status == 200:
        return StreamingResponse(_chunks(upstream_response), status_code=200, headers=headers)
    try:
        content = await upstream_response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise Problem(502, f"upstream response broke off: {type(exc).__name__}") from None
    finally:
        upstream_response.release()
    return Response(content, status_code=upstream_response.status, headers=headers)


async def _chunks(upstream_response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """Passes each chunk on as it arrives: an event stream must not be buffered."""
    try:
        async for chunk in upstream_response.content.iter_any():
            yield chunk
    except (aiohttp.ClientError, asyncio.CancelledError):
        pass
    finally:
        upstream_response.release()


def _seconds(value: str) -> float:
    try:
        return min(max(float(value), 0.0), 30.0)
    except ValueError:
        return 0.0
