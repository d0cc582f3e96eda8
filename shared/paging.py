"""Opaque cursors for every list endpoint: `{"items": [...], "next_cursor": "…" | null}`."""

import base64
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from shared.problems import Problem

T = TypeVar("T")


def encode_cursor(*values: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(values))).decode().rstrip("=")


def decode_cursor(cursor: str, read: Callable[[list[Any]], T]) -> T:
    """Decodes a cursor and reads its values with `read`; anything wrong with it (not ours,
    forged, out of range) is a 422, never a 500."""
    try:
        values = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(values, list):
            raise ValueError("not a list")  # noqa: TRY004 - caught below: a bad cursor is 422
        return read(values)
    except (ValueError, TypeError, OverflowError, AttributeError, orjson.JSONDecodeError):
        raise Problem(422, "cursor is not one this service issued",
                      errors=[{"loc": "query.cursor", "msg": "invalid cursor"}]) from None
