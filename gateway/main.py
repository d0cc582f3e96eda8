"""The gateway: the only port a client needs. Routes `/orders…` to orders and `/stores…`,
`/stock…` to the stock API, and serves one OpenAPI document for both."""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from starlette.responses import Response

from gateway.forward import Upstream, forward
from shared.logs import configure_logging
from shared.settings import get_settings
from shared.web import create_app, serve

log = logging.getLogger(__name__)
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    app.state.upstreams = {
        "orders": Upstream("orders", settings.orders_upstreams),
        "stock": Upstream("stock", settings.stock_upstreams),
    }
    app.state.timeout = settings.upstream_timeout_seconds
    # Idle pooled connections close before the services' keep-alive (75 s) does: see serve().
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
    app.state.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    app.state.merged_openapi = None
    loader = asyncio.create_task(_load_openapi(app))
    try:
        yield
    finally:
        loader.cancel()
        await app.state.session.close()


async def _load_openapi(app: FastAPI) -> None:
    """Merges the services' OpenAPI documents once they answer (they may start after us)."""
    while True:
        try:
            docs = [await _fetch_json(app, u.urls[0] + "/openapi.json") for u in app.state.upstreams.values()]
            app.state.merged_openapi = merge_openapi(app, docs)
            app.openapi_schema = None
            return
        except (aiohttp.ClientError, TimeoutError, ValueError):
            await asyncio.sleep(1)


async def _fetch_json(app: FastAPI, url: str) -> Any:
    async with app.state.session.get(url, timeout=aiohttp.ClientTimeout(total=3)) as response:
        response.raise_for_status()
        return await response.json()


def merge_openapi(app: FastAPI, docs: list[dict[str, Any]]) -> dict[str, Any]:
    merged = get_openapi(title="Inventory: orders and stock", version="1.0.0",
                         description="One document for every public endpoint behind the gateway.",
                         routes=[r for r in app.routes if getattr(r, "include_in_schema", False)])
    merged.setdefault("components", {}).setdefault("schemas", {})
    for doc in docs:
        for path, item in doc.get("paths", {}).items():
            if path.startswith(("/orders", "/stores", "/stock")):
                merged["paths"][path] = item
        merged["components"]["schemas"].update(doc.get("components", {}).get("schemas", {}))
        for name, scheme in doc.get("components", {}).get("securitySchemes", {}).items():
            merged["components"].setdefault("securitySchemes", {})[name] = scheme
    return merged


def readiness(app: FastAPI) -> dict:  # type: ignore[type-arg]
    def check(url: str):  # type: ignore[no-untyped-def]
        async def ready() -> None:
            async with app.state.session.get(url + "/health/ready", timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status != 200:
                    raise ConnectionError(f"{url} answered {r.status}")
        return ready

    return {f"{name}:{url}": check(url) for name, up in app.state.upstreams.items() for url in up.urls}


def create() -> FastAPI:
    app = create_app(service="gateway", title="Inventory gateway", lifespan=lifespan,
                     readiness=readiness, check_content_type=False,
                     body_limits={"/stock/import": get_settings().import_max_bytes})

    async def to_orders(request: Request) -> Response:
        return await forward(app.state.session, app.state.upstreams["orders"], request, app.state.timeout)

    async def to_stock(request: Request) -> Response:
        return await forward(app.state.session, app.state.upstreams["stock"], request, app.state.timeout)

    for path in ("/orders", "/orders/{rest:path}"):
        app.add_api_route(path, to_orders, methods=METHODS, include_in_schema=False)
    for path in ("/stores/{rest:path}", "/stock/{rest:path}"):
        app.add_api_route(path, to_stock, methods=METHODS, include_in_schema=False)

    base_openapi = app.openapi
    app.openapi = lambda: app.state.merged_openapi or base_openapi()  # type: ignore[method-assign]
    return app


def run() -> None:
    settings = get_settings()
    configure_logging("gateway", settings.log_level)
    serve(create(), settings.gateway_port, settings.bind_host, settings.access_log)
