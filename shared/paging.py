"""Opaque cursors for every list endpoint: `{"items": [...], "next_cursor": "…" | null}`."""

import base64
from typing import Any

import orjson

from shared.problems import Problem


def encode_cursor(*values: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(values))).decode().rstrip("=")


def decode_cursor(cursor: str, arity: int) -> list[Any]:
    try:
        values = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        values = None
    if not isinstance(values, list) or len(values) != arity:
        raise Problem(422, "cursor is not one this service issued",
                      errors=[{"loc": "query.cursor", "msg": "invalid cursor"}])
    return values
