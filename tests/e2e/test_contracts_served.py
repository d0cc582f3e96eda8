"""The gateway serves both contracts: /openapi.json (every public route, errors as Problems,
the gateway's own 502/504) and /asyncapi.json (every event), next to each other."""

import httpx

from shared.asyncapi import document
from tests.helpers import eventually
from tooling.stack import Stack


async def test_gateway_serves_openapi_and_asyncapi(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        events = await client.get("/asyncapi.json")
        assert events.status_code == 200
        assert events.json() == httpx.Response(200, json=document()).json()

        async def merged() -> dict:
            doc = (await client.get("/openapi.json")).json()
            assert "/orders" in doc["paths"] and "/stores/{store_id}/stock/{sku}" in doc["paths"]
            return doc

        doc = await eventually(merged, timeout=30, interval=0.5)
    assert "Problem" in doc["components"]["schemas"]
    create = doc["paths"]["/orders"]["post"]["responses"]
    assert {"202", "409", "413", "415", "422", "502", "503", "504"} <= set(create)
    read = doc["paths"]["/stores/{store_id}/stock/{sku}"]["get"]["responses"]
    assert not {"401", "403"} & set(read)
    assert "/metrics" not in doc["paths"]
