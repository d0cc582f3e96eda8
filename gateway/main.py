"""The gateway: the only port a client needs. Forwards `/orders…` to orders and `/stores…`,
`/stock…` to the stock API on a lean ASGI path (gateway/proxy.py), and serves health, metrics
and one OpenAPI document for both from a FastAPI app behind it."""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from gateway.forward import Upstream, new_session
from gateway.proxy import Proxy
from shared import tracing
from shared.asyncapi import document as asyncapi_document
from shared.logs import configure_logging
from shared.openapi import forwarded, with_problems
from shared.settings import get_settings
from shared.web import create_app, serve

log = logging.getLogger(__name__)

FORWARDED = ("/orders", "/stores", "/stock")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    proxy: Proxy = app.state.proxy
    app.state.session = proxy.session = new_session(get_settings().max_connections)
    app.state.merged_openapi = None
    loader = asyncio.create_task(_load_openapi(app))
    try:
        yield
    finally:
        loader.cancel()
        await app.state.session.close()
        proxy.wire.close()


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
            if path.startswith(FORWARDED):
                merged["paths"][path] = item
        merged["components"]["schemas"].update(doc.get("components", {}).get("schemas", {}))
        for name, scheme in doc.get("components", {}).get("securitySchemes", {}).items():
            merged["components"].setdefault("securitySchemes", {})[name] = scheme
    return forwarded(with_problems(merged), FORWARDED)


def readiness(app: FastAPI) -> dict:  # type: ignore[type-arg]
    def check(url: str):  # type: ignore[no-untyped-def]
        async def ready() -> None:
            async with app.state.session.get(url + "/health/ready", timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status != 200:
                    raise ConnectionError(f"{url} answered {r.status}")
        return ready

    return {f"{name}:{url}": check(url) for name, up in app.state.upstreams.items() for url in up.urls}


def create() -> Proxy:
    """The ASGI app: the lean forwarding path in front of the FastAPI app."""
    settings = get_settings()
    app = create_app(service="gateway", title="Inventory gateway", lifespan=lifespan,
                     readiness=readiness, check_content_type=False)
    app.state.upstreams = {
        "orders": Upstream("orders", settings.orders_upstreams),
        "stock": Upstream("stock", settings.stock_upstreams),
    }
    app.state.proxy = Proxy(app, app.state.upstreams["orders"], app.state.upstreams["stock"], settings)
    asyncapi = asyncapi_document()

    @app.get("/asyncapi.json", include_in_schema=False)
    async def events() -> dict[str, Any]:
        """The AsyncAPI 3 document of every event, next to /openapi.json."""
        return asyncapi

    base_openapi = app.openapi
    app.openapi = lambda: app.state.merged_openapi or base_openapi()  # type: ignore[method-assign]
    return app.state.proxy


def run() -> None:
    settings = get_settings()
    configure_logging("gateway", settings.log_level)
    tracing.setup("gateway")
    serve(tracing.wrap_asgi(create()), settings.gateway_port, settings.bind_host, settings.access_log)
