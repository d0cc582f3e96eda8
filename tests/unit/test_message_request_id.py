"""A message's `x-request-id` obeys the edge's rule too: a publisher on the broker is a client."""

from types import SimpleNamespace
from typing import Any

import pytest

from shared.consumer import _request_id

ORDER_ID = "0b7f6a52-35d4-4f0e-9d38-5c3e0d5e7b7a"


def message(headers: dict[str, Any] | None) -> Any:
    return SimpleNamespace(headers=headers, correlation_id=ORDER_ID)


@pytest.mark.parametrize("value", ["req-1", b"a.b:c_d-9", "x" * 128])
def test_a_valid_request_id_is_kept(value: str | bytes) -> None:
    expected = value.decode() if isinstance(value, bytes) else value
    assert _request_id(message({"x-request-id": value})) == expected


@pytest.mark.parametrize("value", ["x" * 129, "x" * 140_000, "bad id", "a\nb", "", b"\xff\xfe", 42, None])
def test_any_other_request_id_falls_back_to_the_order_id(value: object) -> None:
    assert _request_id(message({"x-request-id": value})) == ORDER_ID


def test_no_headers_falls_back_to_the_order_id() -> None:
    assert _request_id(message(None)) == ORDER_ID
