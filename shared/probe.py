"""Health and metrics of a process that serves no HTTP otherwise (a stock worker): a small aiohttp
server on its own port with `/health/live`, `/health/ready` and `/metrics` (API.md §5), the same
answers as the HTTP services give. aiohttp rather than uvicorn: it runs inside the worker's
event loop without taking over its signal handlers."""

import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from shared.metrics import render

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Awaitable[None]]


async def _live(_: web.Request) -> web.Response:
    return web.json_response({"status": "up"})


def _ready(checks: dict[str, ReadinessCheck]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def ready(_: web.Request) -> web.Response:
        down: dict[str, str] = {}
        for name, check in checks.items():
            try:
                await check()
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready", with what failed
                down[name] = f"{type(exc).__name__}: {exc}"[:300]
        if down:
            body = {"type": "/problems/not-ready", "title": "Service Unavailable", "status": 503,
                    "detail": "; ".join(f"{k} down" for k in down), "checks": down}
            return web.Response(body=orjson.dumps(body), status=503,
                                content_type="application/problem+json")
        return web.json_response({"status": "ready", "checks": dict.fromkeys(checks, "up")})

    return ready


async def _metrics(_: web.Request) -> web.Response:
    body, content_type = await render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def start_probe(host: str, port: int, checks: dict[str, ReadinessCheck]) -> web.AppRunner:
    """Serves until the returned runner's `cleanup()`."""
    app = web.Application()
    app.router.add_get("/health/live", _live)
    app.router.add_get("/health/ready", _ready(checks))
    app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        # The process's real work goes on; Prometheus shows this target down, which alerts.
        log.exception("cannot serve health and metrics", extra={"port": port})
    else:
        log.info("health and metrics served", extra={"port": port})
    return runner
