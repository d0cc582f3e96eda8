"""The edge rules of shared/edge.py (API.md §1, §4), without a server."""

import pytest

from orders.api import _read_cursor
from shared import edge
from shared.paging import decode_cursor
from shared.problems import Problem
from shared.settings import Settings
from tests.helpers import cursor_of


@pytest.mark.parametrize("value", [b"a", b"A" * 128, b"abc.DEF_-:123", b"0"])
def test_a_request_id_by_the_rule_is_kept(value: bytes) -> None:
    assert edge.request_id(value) == value


@pytest.mark.parametrize("value", [None, b"", b"A" * 129, b"x" * 140_000, b"a b", b"a\n", b"a\r\nb",
                                   b"caf\xc3\xa9", b"a/b", b"a;b", b"%41", b"\x00"])
def test_any_other_request_id_is_replaced_by_a_new_one(value: bytes | None) -> None:
    made = edge.request_id(value)
    assert made != value and edge.REQUEST_ID.fullmatch(made)
    assert edge.request_id(value) != made, "each request gets its own"


@pytest.mark.parametrize("raw", [
    b"/orders/%2e%2e/metrics", b"/orders/%2E%2e/x", b"/orders/%252e%252e/metrics",
    b"/orders/%25252E%25252E/metrics", b"/stores/a%2fb", b"/stores/a%2Fb", b"/orders/%252F",
    b"/orders/..%5cmetrics", b"/orders/%25%32%65%25%32%65/metrics", b"/orders/../metrics",
    b"/stores/./x", b"/x/%25252525252525252e",
])
def test_a_hidden_dot_or_slash_is_found_at_any_depth(raw: bytes) -> None:
    assert edge.hides_dot_or_slash(raw)


@pytest.mark.parametrize("raw", [b"/orders", b"/stores/S1/stock/A.B", b"/stores/S1/stock/%41",
                                 b"/stores/S1/stock/..A", b"/orders/x.y/z"])
def test_a_plain_path_passes(raw: bytes) -> None:
    assert not edge.hides_dot_or_slash(raw)


def test_a_control_character_in_a_path_is_found() -> None:
    assert edge.has_control("/stores/S/stock/A\n")
    assert edge.has_control("/stores/S/stock/A\x00")
    assert not edge.has_control("/stores/S/stock/A")


@pytest.mark.parametrize(("value", "seconds"), [(None, 0.0), ("0", 0.0), ("30", 30.0), ("2.5", 2.5)])
def test_wait_is_seconds_from_0_to_30(value: str | None, seconds: float) -> None:
    assert edge.wait_seconds(value) == seconds


@pytest.mark.parametrize("value", ["", "-1", "30.01", "nan", "inf", "-inf", "1e309", "x", "5s", "0x10",
                                   "1_0", "1e1", " 5", "5 ", "\u0665"])
def test_any_other_wait_is_422(value: str) -> None:
    with pytest.raises(Problem) as refused:
        edge.wait_seconds(value)
    assert refused.value.status == 422


def test_the_wait_of_a_query_is_its_last() -> None:
    assert edge.query_wait(b"") is None
    assert edge.query_wait(b"wait=1&wait=7") == "7"
    assert edge.query_wait(b"x=1") is None


@pytest.mark.parametrize("length", [b"1048577", b"99999999999999999999999", b"-1", b"1e3", b" 1"])
def test_an_announced_body_over_the_limit_or_not_a_number_is_413(length: bytes) -> None:
    with pytest.raises(Problem) as refused:
        edge.check_length(length, edge.MAX_BODY_BYTES)
    assert refused.value.status == 413


def test_a_capacity_refuses_with_503_and_retry_after_then_frees() -> None:
    capacity = edge.Capacity("long-polls", 2)
    with capacity.slot(), capacity.slot():
        with pytest.raises(Problem) as refused, capacity.slot():
            pass
        assert refused.value.status == 503
        assert refused.value.headers == {"Retry-After": edge.RETRY_AFTER}
    assert capacity.held == 0
    with capacity.slot():
        assert capacity.held == 1


def test_the_caps_have_the_contract_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MAX_CONNECTIONS", "MAX_LONG_POLLS", "MAX_FEED_STREAMS"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert (settings.max_connections, settings.max_long_polls, settings.max_feed_streams) == (
        4096, 10000, 1000)


@pytest.mark.parametrize("values", [
    ["2026-01-01T00:00:00+00:00", 2**80], ["2026-01-01T00:00:00+00:00", -1],
    ["2026-01-01T00:00:00+00:00", []], [2**80, "00000000-0000-4000-8000-000000000000"],
    ["2026-01-01T00:00:00", "00000000-0000-4000-8000-000000000000"], [None, None], [[], {}],
    ["9999-12-31T23:59:59-23:59", "00000000-0000-4000-8000-000000000000"],
])
def test_a_forged_orders_cursor_is_422(values: list[object]) -> None:
    with pytest.raises(Problem) as refused:
        decode_cursor(cursor_of(*values), _read_cursor)
    assert refused.value.status == 422


async def test_work_is_cancelled_when_the_client_leaves_first() -> None:
    import asyncio

    left = asyncio.Event()
    cancelled = asyncio.Event()

    async def receive() -> dict[str, object]:
        await left.wait()
        return {"type": "http.disconnect"}

    async def work() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "done"

    waiting = asyncio.ensure_future(edge.unless_client_leaves(receive, work()))
    await asyncio.sleep(0.01)
    left.set()
    assert await asyncio.wait_for(waiting, 5) is None
    assert cancelled.is_set()


async def test_work_that_ends_first_gives_its_result() -> None:
    import asyncio

    async def receive() -> dict[str, object]:
        await asyncio.sleep(30)
        return {"type": "http.disconnect"}

    async def work() -> str:
        return "done"

    assert await asyncio.wait_for(edge.unless_client_leaves(receive, work()), 5) == "done"
