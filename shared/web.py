"""The HTTP shell every service shares: problem+json errors, request guards, request ids,
health and Prometheus metrics. Services add their routers and readiness checks."""

import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg
import orjson
import uvicorn
from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse as StarletteJSONResponse
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import metrics
from shared.edge import valid_request_id
from shared.metrics import HTTP_LATENCY, HTTP_REQUESTS
from shared.openapi import with_problems
from shared.problems import Problem, problem_response, raw_problem
from shared.runtime import tune_gc

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
JSON_TYPES = ("application/json",)


ReadinessCheck = Callable[[], Awaitable[None]]


class JSONResponse(StarletteJSONResponse):
    """JSON rendered by orjson: several times faster than the standard library on our bodies."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class RequestGuard:
    """Refuses, before any handler runs, bodies over 1 MiB (413) and bodies whose
    Content-Type the route does not take (415). Counts streamed bytes too, since
    Content-Length may be absent or lie."""

    def __init__(
        self,
        app: ASGIApp,
        body_types: dict[str, tuple[str, ...]] | None,
        body_limits: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        # path prefix -> its own size limit (a bulk import is larger than any JSON request)
        self.body_limits = body_limits or {}
        # path prefix -> accepted media types (default JSON); None: the size check only
        self.body_types = body_types

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        limit = next((n for p, n in self.body_limits.items() if scope["path"].startswith(p)), MAX_BODY_BYTES)
        too_large = f"request body is larger than {limit // 1024 // 1024} MiB"
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _answer(send, 413, too_large)
            return
        has_body = length not in (None, b"0") or b"transfer-encoding" in headers
        if has_body and self.body_types is not None and not self._type_ok(scope["path"], headers.get(b"content-type", b"")):
            accepted = ", ".join(self._accepted(scope["path"]))
            await _answer(send, 415, f"Content-Type must be one of: {accepted}")
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise Problem(413, too_large)
            return message

        await self.app(scope, limited_receive, send)

    def _accepted(self, path: str) -> tuple[str, ...]:
        for prefix, types in (self.body_types or {}).items():
            if path.startswith(prefix):
                return types
        return JSON_TYPES

    def _type_ok(self, path: str, content_type: bytes) -> bool:
        media = content_type.split(b";")[0].strip().decode("latin-1").lower()
        return media in self._accepted(path)


async def _answer(send: Send, status: int, detail: str) -> None:
    headers, body = raw_problem(status, detail)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Metrics:
    """Counts and times requests by route template (never by raw path: ids would explode it)."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            HTTP_REQUESTS.labels(self.service, method, route, str(status)).inc()
            HTTP_LATENCY.labels(self.service, route).observe(time.perf_counter() - started)


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def on_problem(_: Request, exc: Problem) -> Response:
        return problem_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError) -> Response:
        errors = [{"loc": _loc(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        detail = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors[:5])
        return problem_response(Problem(422, detail or "invalid request", errors=errors))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:  # FastAPI's "error parsing the body": the contract says 422
            return problem_response(Problem(422, "the body is not valid JSON",
                                            errors=[{"loc": "body", "msg": "malformed JSON"}]))
        return problem_response(Problem(exc.status_code, str(exc.detail), headers=dict(exc.headers) if exc.headers else None))

    @app.exception_handler(asyncpg.exceptions.PostgresConnectionError)
    @app.exception_handler(asyncpg.exceptions.InterfaceError)
    @app.exception_handler(asyncpg.exceptions.CannotConnectNowError)
    @app.exception_handler(asyncpg.exceptions.AdminShutdownError)
    @app.exception_handler(asyncpg.exceptions.ReadOnlySQLTransactionError)  # a node being demoted
    @app.exception_handler(asyncpg.exceptions.InternalClientError)  # a connection cut mid-query
    @app.exception_handler(ConnectionError)
    @app.exception_handler(OSError)
    async def on_unavailable(_: Request, exc: Exception) -> Response:
        log.warning("dependency unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
        return problem_response(Problem(503, "the database is unavailable; retry shortly",
                                        headers={"Retry-After": "1"}))

    @app.exception_handler(Exception)
    async def on_crash(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return problem_response(Problem(500, "internal error; the request id is in the logs"))


def create_app(
    *,
    service: str,
    title: str,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]],
    readiness: Callable[[FastAPI], dict[str, ReadinessCheck]],
    body_types: dict[str, tuple[str, ...]] | None = None,
    body_limits: dict[str, int] | None = None,
    check_content_type: bool = True,
) -> FastAPI:
    app = FastAPIOffline(title=title, lifespan=lifespan, default_response_class=JSONResponse)
    metrics.expose(service)
    build_openapi = app.openapi
    app.openapi = lambda: with_problems(build_openapi())  # type: ignore[method-assign]
    install_problem_handlers(app)

    @app.get("/health/live", tags=["health"])
    async def live() -> dict[str, str]:
        return {"status": "up"}

    @app.get("/health/ready", tags=["health"], responses={503: {"description": "a dependency is down"}})
    async def ready() -> Response:
        down: dict[str, str] = {}
        checks = readiness(app)
        for name, check in checks.items():
            try:
                await check()
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready", with what failed
                down[name] = f"{type(exc).__name__}: {exc}"[:300]
        if down:
            detail = "; ".join(f"{k} down" for k in down)
            body = {"type": "/problems/not-ready", "title": "Service Unavailable", "status": 503,
                    "detail": detail, "checks": down}
            return Response(orjson.dumps(body), 503, media_type="application/problem+json")
        return JSONResponse({"status": "ready", "checks": dict.fromkeys(checks, "up")})

    @app.get("/metrics", tags=["health"], include_in_schema=False)
    async def prometheus() -> Response:
        body, content_type = await metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    app.add_middleware(RequestGuard, body_types=(body_types or {}) if check_content_type else None,
                       body_limits=body_limits)
    app.add_middleware(Metrics, service=service)
    # The X-Request-ID rule again (API.md §4): a request may reach a service directly.
    app.add_middleware(CorrelationIdMiddleware, header_name="X-Request-ID", validator=valid_request_id)
    return app


def serve(app: ASGIApp | str, port: int, host: str, access_log: bool = False) -> None:
    tune_gc()
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=access_log,
        log_config=None,
        timeout_graceful_shutdown=10,
        # Longer than the gateway's pooled-connection idle time, so the gateway never reuses a
        # connection at the instant this side closes it (which surfaces as a reset, then 502).
        timeout_keep_alive=75,
    )
