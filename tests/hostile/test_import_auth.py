"""`POST /stock/import` (API.md §4): its 64 MiB limit applies to that exact path only, and a
request without a valid admin token is answered 401/403 before its body is read. Here the
body is announced and never sent: an answer at all proves nobody waited for it."""

import pytest

from tests.hostile.raw import exchange, request
from tooling.stack import Stack

pytestmark = pytest.mark.hostile

MiB = 1024 * 1024


def _upload(announced: int, token: str | None, path: str = "/stock/import") -> bytes:
    headers = {"Content-Type": "text/csv", "Content-Length": str(announced)}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return request("POST", path, headers)


@pytest.mark.parametrize("service", ["gateway", "stock"])
@pytest.mark.parametrize("announced", [245 * 1024, 50 * MiB, 100 * MiB], ids=["245KiB", "50MiB", "100MiB"])
@pytest.mark.parametrize(("token", "status"), [(None, 401), ("wrong", 403)], ids=["no-token", "wrong-token"])
async def test_an_import_without_the_token_is_refused_before_its_body(
    hostile_stack: Stack, service: str, announced: int, token: str | None, status: int
) -> None:
    answer = await exchange(hostile_stack.ports[service], _upload(announced, token), timeout=10)
    answer.problem(status)


@pytest.mark.parametrize("service", ["gateway", "stock"])
async def test_an_import_over_64_mib_with_the_token_is_413_at_once(hostile_stack: Stack, service: str) -> None:
    answer = await exchange(hostile_stack.ports[service], _upload(65 * MiB, hostile_stack.admin_token))
    answer.problem(413)


@pytest.mark.parametrize("path", ["/stock/importX", "/stock/import/x", "/stock/imports"])
async def test_only_the_exact_import_path_has_the_large_limit(hostile_stack: Stack, path: str) -> None:
    answer = await exchange(hostile_stack.ports["gateway"], _upload(2 * MiB, hostile_stack.admin_token, path))
    answer.problem(413)


async def test_an_import_with_the_token_still_works_through_the_gateway(hostile_stack: Stack) -> None:
    body = b"store_id,sku,on_hand\nS-imp,A-imp,3\n"
    answer = await exchange(hostile_stack.ports["gateway"], request(
        "POST", "/stock/import", {"Content-Type": "text/csv", **hostile_stack.admin}, body))
    assert answer.status == 200, answer.body
    assert answer.body == b'{"rows":1}'
