"""Paths (API.md §4, §5): an encoded dot segment or slash, even double-encoded, in any case, is
404 at the gateway, and the gateway forwards exactly the path it matched, so no internal
endpoint (/metrics, /health/..., /docs of orders and stock) is reachable through it. Sent on a
raw socket: HTTP clients normalise such paths before sending."""

import pytest

from tests.helpers import put_stock, random_sku, random_store
from tests.hostile.raw import exchange, request
from tooling.stack import Stack

pytestmark = pytest.mark.hostile

HIDDEN = [
    "/orders/%252e%252e/metrics",
    "/orders/%252E%252E/metrics",
    "/stores/%252e%252e/%252e%252e/health/ready",
    "/stock/%25252e%25252e/metrics",
    "/orders/%2e%2e/metrics",
    "/orders/%2E%2e/docs",
    "/orders%2f..%2fmetrics",
    "/orders/x%2F..%2F..%2Fmetrics",
    "/orders/%252f..%252fmetrics",
    "/stores/S1/stock/A%2fB",
    "/stores/S1/stock/..%5c..%5cmetrics",
    "/orders/../metrics",
    "/stores/./../health/live",
    "/stock/%2E%2E/metrics",
    "/orders/%25%32%65%25%32%65/metrics",
]


@pytest.mark.parametrize("path", HIDDEN)
async def test_a_hidden_dot_segment_or_slash_is_404(hostile_stack: Stack, path: str) -> None:
    answer = await exchange(hostile_stack.ports["gateway"], request("GET", path))
    answer.problem(404)
    for leaked in (b"http_requests_total", b"python_gc", b"\"checks\"", b"swagger"):
        assert leaked not in answer.body, (path, answer.body[:300])


async def test_an_encoded_letter_reaches_the_upstream_decoded_once(hostile_stack: Stack) -> None:
    """What the gateway matched is what the stock API gets: `%41` is `A` to both."""
    store, sku = random_store(), "A" + random_sku()[1:]
    async with hostile_stack.client() as client:
        await put_stock(client, hostile_stack.admin, store, sku, 3)
    answer = await exchange(hostile_stack.ports["gateway"],
                            request("GET", f"/stores/{store}/stock/%41{sku[1:]}"))
    assert answer.status == 200, answer.body[:300]
    assert b'"on_hand":3' in answer.body
