"""The OpenAPI document says what each route really answers (docs/API.md §2-§4): every 4xx/5xx as
an `application/problem+json` body of one `Problem` schema, and per route only the status codes
it can give — no 401/403 on public reads, 413/415 where a body is read, 503 everywhere a
database, a broker or a capacity limit stands behind the route.

FastAPI builds the document from the routers; `with_problems` rewrites its responses once, for
every service (shared/web.py), and the gateway adds what only it answers (`forwarded`)."""

from typing import Any

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; `errors` lists each invalid field on a 422.",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "errors": {"type": "array", "items": {
            "type": "object", "required": ["loc", "msg"],
            "properties": {"loc": {"type": "string"}, "msg": {"type": "string"}}}},
    },
}
REASONS = {
    401: "No admin token", 403: "Wrong admin token", 404: "Not found",
    409: "Conflict with the current state", 410: "The hold has expired",
    413: "Body too large", 415: "Unsupported Content-Type", 422: "Invalid request",
    502: "Upstream failed", 503: "Unavailable (database, broker or capacity); see Retry-After",
    504: "Upstream timed out",
}
# The error statuses of each route, beyond the rules of `_codes` (a route missing here gets the
# rules alone). Method, path template -> codes.
ROUTE_CODES: dict[tuple[str, str], set[int]] = {
    ("post", "/orders"): {409},  # same Idempotency-Key still in flight
    ("get", "/orders/{order_id}"): set(),
    ("post", "/orders/{order_id}/confirm"): {409, 410},
    ("post", "/orders/{order_id}/cancel"): {409},
    ("post", "/orders/{order_id}/reserve"): {409},
    ("put", "/stores/{store_id}/stock/{sku}"): {409},
    ("post", "/stores/{store_id}/stock/{sku}/restock"): {409},
    ("get", "/stores/{store_id}/stock/{sku}"): set(),
}
NO_DATA = {"/health/live"}  # answers from memory: nothing stands behind it


def _codes(method: str, path: str, operation: dict[str, Any]) -> set[int]:
    codes = set(ROUTE_CODES.get((method, path), set()))
    if path not in NO_DATA:
        codes.add(503)
    if operation.get("parameters") or "requestBody" in operation:
        codes.add(422)
    if "{" in path:
        codes.add(404)  # an unknown id, or a path the gateway refuses (encoded dot segments)
    if "requestBody" in operation:
        codes |= {413, 415}
    if operation.get("security"):
        codes |= {401, 403}
    if path.startswith("/health/"):
        codes -= {404, 422}
    return codes


def _problem(code: int) -> dict[str, Any]:
    return {"description": REASONS.get(code, "Error"),
            "content": {"application/problem+json": {"schema": PROBLEM_REF}}}


def with_problems(document: dict[str, Any]) -> dict[str, Any]:
    """Rewrites `document` in place (idempotent) and returns it."""
    document.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
    document["components"]["schemas"].pop("HTTPValidationError", None)
    document["components"]["schemas"].pop("ValidationError", None)
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            successes = {c: r for c, r in responses.items() if not str(c).startswith(("4", "5"))}
            errors = {str(c): _problem(c) for c in sorted(_codes(method, path, operation))}
            operation["responses"] = {**successes, **errors}
    return document


def forwarded(document: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """The gateway's own answers on the routes it forwards: 502 and 504 from the upstream."""
    for path, item in document.get("paths", {}).items():
        if path.startswith(prefixes):
            for operation in item.values():
                for code in (502, 504):
                    operation.setdefault("responses", {})[str(code)] = _problem(code)
    return document
