"""The fast lane: the two requests a flash sale is made of, answered without FastAPI.

`POST /orders` with a valid JSON body (no Idempotency-Key) and `GET /orders/{id}[?wait=s]` are
nearly every request under load. py-spy showed two thirds of their time in FastAPI's and
Starlette's layers (routing, dependency solving, exception and middleware wrappers), so this
ASGI layer answers them itself, with the same models and use cases as orders/api.py.

It only ever answers the happy path. Anything else — a body that does not validate, an unusual
header or query, an Idempotency-Key, any other route — is handed to the full app unchanged (a
body already read is replayed), so every error answer still comes from one place and the two
lanes cannot disagree about what is valid."""

import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.types import Message, Receive, Scope, Send

from orders import api, db
from shared import edge
from shared.problems import Problem

ORDER_PATH = re.compile(r"/orders/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
JSON_HEADERS = [(b"content-type", b"application/json")]


class FastLane:
    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.metrics = edge.RouteMetrics("orders")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            if method == "POST" and path == "/orders":
                await self._create(scope, receive, send)
                return
            if method == "GET" and (match := ORDER_PATH.fullmatch(path)):
                await self._get(scope, receive, send, match.group(1))
                return
        await self.app(scope, receive, send)

    async def _create(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        plain = (
            length.isdigit() and len(length) < 12 and int(length) <= edge.MAX_BODY_BYTES
            and headers.get(b"content-type", b"").split(b";")[0].strip().lower() == b"application/json"
            and b"idempotency-key" not in headers and b"transfer-encoding" not in headers
        )
        if not plain:
            await self.app(scope, receive, send)
            return
        body, more = await _read_body(receive, int(length))
        try:
            order_in = api.OrderIn.model_validate(orjson.loads(body))
        except (orjson.JSONDecodeError, ValidationError, TypeError, ValueError):
            order_in = None
        if order_in is None or more:
            await self.app(scope, _replay(body, more, receive), send)
            return
        intake = self.app.state.intake

        async def answer() -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
            order, _ = await intake.create(order_in.model_dump(), None)
            self.app.state.waiters.accepted(order)
            location = f"/orders/{order['order_id']}".encode()
            return 202, orjson.dumps(order), [*JSON_HEADERS, (b"location", location)]

        await self._answer(scope, send, "/orders", headers, answer)

    async def _get(self, scope: Scope, receive: Receive, send: Send, raw_id: str) -> None:
        wait = _plain_wait(scope["query_string"])
        if wait is None:
            await self.app(scope, receive, send)
            return
        order_id = uuid.UUID(raw_id)
        state = self.app.state

        async def answer() -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
            # A long-poll right after the POST starts waiting without a read (orders/waiters.py).
            order = (wait > 0 and state.waiters.undecided(raw_id)) or await db.fetch_order(state.pool, order_id)
            if order is None:
                return 0, b"", []  # the full app writes the 404
            if wait > 0:
                waited = await edge.unless_client_leaves(
                    receive, api.wait_for_change(state.pool, state.waiters, order, wait))
                order = waited or order  # None: the client left, the answer goes nowhere
            return 200, orjson.dumps(order), [*JSON_HEADERS]

        if not await self._answer(scope, send, "/orders/{order_id}", dict(scope["headers"]), answer):
            await self.app(scope, receive, send)

    async def _answer(
        self, scope: Scope, send: Send, route: str, headers: dict[bytes, bytes],
        answer: Callable[[], Awaitable[tuple[int, bytes, list[tuple[bytes, bytes]]]]],
    ) -> bool:
        """Runs `answer` with the request id set and the request counted, as the full app's
        middleware would. False: `answer` declined (status 0) and nothing was sent."""
        context = edge.enter(edge.request_id(headers.get(b"x-request-id")))
        try:
            status, body, extra = await answer()
        except Exception as exc:  # noqa: BLE001 - answered by the app's own exception handlers
            response = await _handle(self.app, exc)
            status, body = response.status_code, response.body
            extra = [(k, v) for k, v in response.raw_headers if k != b"content-length"]
        finally:
            context.close()
        if status == 0:
            return False
        await edge.send_answer(send, status, extra, body, context.request_id)
        self.metrics.observe(scope["method"], route, status, context.elapsed())
        return True


async def _handle(app: FastAPI, exc: Exception) -> Any:
    """The response the full app's exception handlers give for `exc` (most specific class first)."""
    for cls in type(exc).__mro__:
        handler = app.exception_handlers.get(cls)
        if handler is not None:
            # Our handlers never read the request (the fast lane has no Request object).
            return await cast(Callable[[Any, Exception], Awaitable[Any]], handler)(None, exc)
    raise exc


async def _read_body(receive: Receive, expected: int) -> tuple[bytes, list[Message]]:
    """The body, if it arrives as announced; otherwise what was read, to be replayed as is."""
    chunks: list[bytes] = []
    seen = 0
    messages: list[Message] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return b"", messages
        chunk = message.get("body", b"")
        chunks.append(chunk)
        seen += len(chunk)
        if seen > expected:
            return b"", messages
        if not message.get("more_body", False):
            break
    return b"".join(chunks), []


def _replay(body: bytes, messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that gives the full app the request exactly as it came."""
    pending = list(messages) or [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


def _plain_wait(query: bytes) -> float | None:
    """0 without a query, the value of a lone valid `wait=`; None: let the full app decide."""
    if not query:
        return 0.0
    if not query.startswith(b"wait=") or b"&" in query:
        return None
    try:
        return edge.wait_seconds(edge.query_wait(query))
    except Problem:
        return None
