"""The HTTP shell every service shares: the edge rules (shared/edge.py) for FastAPI routes,
problem+json errors, health and Prometheus metrics. Services add their routers and readiness
checks."""

import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse as StarletteJSONResponse
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import edge, edge_server, metrics
from shared.db import PoolBusy
from shared.edge import MAX_BODY_BYTES
from shared.openapi import with_problems
from shared.problems import Problem, problem_response
from shared.settings import get_settings

log = logging.getLogger(__name__)
__all__ = ["MAX_BODY_BYTES", "JSONResponse", "create_app", "serve"]

JSON_TYPES = ("application/json",)

ReadinessCheck = Callable[[], Awaitable[None]]


class JSONResponse(StarletteJSONResponse):
    """JSON rendered by orjson: several times faster than the standard library on our bodies."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class Edge:
    """The edge rules of shared/edge.py for the FastAPI routes, in one pass: the request id
    (answered, logged, put on outbox rows), bodies over the limit (413, counted as they stream in,
    since Content-Length may be absent or lie), a Content-Type the route does not take (415), and
    the metrics, by route template (never by raw path: ids would explode it)."""

    def __init__(self, app: ASGIApp, service: str, body_types: dict[str, tuple[str, ...]] | None,
                 body_limits: dict[str, int] | None, auth_first: frozenset[str]) -> None:
        self.app = app
        self.metrics = edge.RouteMetrics(service)
        # exact path -> accepted media types (default JSON); None: no media type check at all
        self.body_types = body_types
        self.body_limits = body_limits or {}  # exact path -> its own size limit
        # exact paths whose handler checks a token before it reads the body, and the announced
        # length after: a request without a valid token gets 401/403, whatever it announces
        self.auth_first = auth_first

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = edge.enter(edge.request_id_of(scope["headers"]))
        status = 0  # no answer started yet

        async def answer(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", context.request_id)]
            await send(message)

        try:
            limit = self.body_limits.get(scope["path"], edge.MAX_BODY_BYTES)
            problem = self._refusal(scope, limit)
            if problem is not None:
                await edge.send_problem(send, problem, context.request_id)
                status = problem.status
                return
            await self.app(scope, edge.limited(receive, limit), answer)
        except Exception:
            # What no exception handler took would be answered outside this layer, without the
            # request id: answered here instead.
            log.exception("unhandled error")
            if status:
                raise
            status = 500
            problem = Problem(status, "internal error; the request id is in the logs")
            await edge.send_problem(send, problem, context.request_id)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(scope["method"], route, status or 499, context.elapsed())
            context.close()

    def _refusal(self, scope: Scope, limit: int) -> Problem | None:
        path: str = scope["path"]
        if edge.has_control(path):
            return Problem(404, "no such resource")
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None
        headers = dict(scope["headers"])
        if path not in self.auth_first:
            try:
                edge.check_length(headers.get(b"content-length"), limit)
            except Problem as problem:
                return problem
        has_body = headers.get(b"content-length") not in (None, b"0") or b"transfer-encoding" in headers
        if has_body and self.body_types is not None:
            accepted = self.body_types.get(path, JSON_TYPES)
            media = headers.get(b"content-type", b"").split(b";")[0].strip().decode("latin-1").lower()
            if media not in accepted:
                return Problem(415, f"Content-Type must be one of: {', '.join(accepted)}")
        return None


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

    @app.exception_handler(PoolBusy)
    async def on_busy(_: Request, exc: PoolBusy) -> Response:
        log.warning("database pool busy", extra={"error": str(exc)})
        return problem_response(Problem(503, "the service is busy; retry shortly",
                                        headers={"Retry-After": edge.RETRY_AFTER}))

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
    auth_first: frozenset[str] = frozenset(),
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

    # The edge rules again in every service (API.md §4): a request may reach it directly.
    app.add_middleware(Edge, service=service, body_types=(body_types or {}) if check_content_type else None,
                       body_limits=body_limits, auth_first=auth_first)
    return app


def serve(app: ASGIApp | str, port: int, host: str, access_log: bool = False) -> None:
    """Serves `app` with the edge rules that act before a request is whole (shared/edge_server.py)."""
    edge_server.serve(app, port, host, access_log, max_connections=get_settings().max_connections)
