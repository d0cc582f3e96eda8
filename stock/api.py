"""HTTP entry point of the stock service (API.md §3): reads are public, writes need the token."""

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from asgi_correlation_id import correlation_id
from fastapi import APIRouter, Header, Path, Query, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from shared import edge
from shared.events import Sku, StoreId
from shared.paging import decode_cursor, encode_cursor
from shared.problems import Problem
from shared.settings import get_settings
from shared.web import JSONResponse
from stock import admin, db, domain, imports
from stock.auth import Admin
from stock.feed import StockFeed

router = APIRouter(tags=["stock"])

SKU_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # fullmatch: `$` would let a trailing newline in
EVENT_ID = re.compile(r"[0-9]{1,19}")
MAX_BIGINT = 2**63 - 1
StorePath = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
SkuPath = StorePath
Version = Annotated[int, Field(ge=0, le=2**62, strict=True)]


class StockItem(BaseModel):
    store_id: StoreId
    sku: Sku
    on_hand: int
    reserved: int
    available: int
    version: int
    updated_at: datetime


class StockPage(BaseModel):
    items: list[StockItem]
    next_cursor: str | None


class PutStock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    on_hand: Annotated[int, Field(ge=0, le=admin.MAX_ON_HAND, strict=True)]
    expected_version: Version | None = None


class Restock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    quantity: Annotated[int, Field(ge=1, le=1_000_000, strict=True)]
    expected_version: Version | None = None


class Movement(BaseModel):
    kind: str
    on_hand_delta: int
    reserved_delta: int
    on_hand: int
    reserved: int
    order_id: str | None
    version: int
    at: datetime


class MovementPage(BaseModel):
    items: list[Movement]
    next_cursor: str | None


PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/problem+json": {}}}
    for code, text in {401: "no bearer token", 403: "wrong token", 404: "no such item",
                       409: "version mismatch or conflict", 422: "invalid input"}.items()
}


def _pool(request: Request) -> Any:
    return request.app.state.pool


@router.get("/stores/{store_id}/stock/events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "`stock` events"},
                       422: PROBLEMS[422]})
async def stock_events(
    store_id: StorePath, request: Request,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
) -> EventSourceResponse:
    """Every change of the store's stock as it commits; `Last-Event-ID` resumes after that event.
    At most MAX_FEED_STREAMS at once per process (503 beyond)."""
    feed: StockFeed = request.app.state.feed
    resume = _event_id(last_event_id)
    feed.capacity.take()
    try:
        after = await feed.head(store_id) if resume is None else resume
    except BaseException:
        feed.capacity.give_back()
        raise
    return _HeldStream(feed.capacity.give_back, feed.stream(store_id, after),
                       ping=request.app.state.sse_ping,
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event_id(value: str | None) -> int | None:
    """The id of `Last-Event-ID`; None: start with the next change. An id the ledger cannot hold
    is one this feed never sent: 422, before anything reaches the database."""
    if value is None or value == "":
        return None
    if not EVENT_ID.fullmatch(value) or int(value) > MAX_BIGINT:
        raise Problem(422, "Last-Event-ID must be an event id this feed sent",
                      errors=[{"loc": "header.Last-Event-ID", "msg": "not an event id"}])
    return int(value)


class _HeldStream(EventSourceResponse):
    """An event stream that gives its capacity slot back however it ends (even never started)."""

    def __init__(self, release: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


@router.post("/stock/import", dependencies=[Admin], responses={
    200: {"content": {"application/json": {"example": {"rows": 2}}}}, 413: {"description": "too large"},
    415: {"description": "not CSV or JSON lines"}, **PROBLEMS},
    openapi_extra={"requestBody": {"required": True, "content": {
        "text/csv": {"schema": {"type": "string"}},
        "application/x-ndjson": {"schema": {"type": "string"}}}}})
async def import_stock(request: Request) -> JSONResponse:
    """Upserts counted stock from an ERP file in one transaction; one bad row rejects the file.
    The token is checked (the Admin dependency) before a byte of the body is read, and the
    announced length only after."""
    edge.check_length(request.headers.get("content-length", "").encode() or None,
                      get_settings().import_max_bytes)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    parse = imports.parse_csv if media == "text/csv" else imports.parse_ndjson
    try:
        async with _pool(request).acquire() as conn, conn.transaction():
            result = await imports.import_rows(conn, parse(request.stream()), correlation_id.get())
    except imports.BadRow as exc:
        raise Problem(422, str(exc), errors=[{"loc": f"body.line.{exc.line}", "msg": str(exc)}]) from None
    return JSONResponse({"rows": result.rows})


@router.get("/stores/{store_id}/stock/{sku}", responses={200: {"model": StockItem}, **PROBLEMS})
async def get_item(
    store_id: StorePath, sku: SkuPath, request: Request,
    as_of: Annotated[AwareDatetime | None, Query(description="ISO-8601 with offset")] = None,
) -> JSONResponse:
    if as_of is not None:
        try:
            as_of = as_of.astimezone(UTC)
        except OverflowError:
            raise Problem(422, "as_of is outside the calendar the ledger can hold",
                          errors=[{"loc": "query.as_of", "msg": "out of range"}]) from None
    if as_of is None:
        row = await _pool(request).fetchrow(db.SELECT_ITEM, store_id, sku)
    else:
        row = await _pool(request).fetchrow(db.ITEM_AS_OF, store_id, sku, as_of)
    if row is None:
        raise Problem(404, f"no stock item {store_id}/{sku}" + (f" as of {as_of.isoformat()}" if as_of else ""))
    return JSONResponse(db.to_item(row))


@router.get("/stores/{store_id}/stock", responses={200: {"model": StockPage}, **PROBLEMS})
async def list_items(
    store_id: StorePath, request: Request,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> JSONResponse:
    after = decode_cursor(cursor, _read_sku_cursor) if cursor else None
    rows = await _pool(request).fetch(db.LIST_ITEMS, store_id, after, limit + 1)
    next_cursor = encode_cursor(rows[limit - 1]["sku"]) if len(rows) > limit else None
    return JSONResponse({"items": [db.to_item(r) for r in rows[:limit]], "next_cursor": next_cursor})


@router.put("/stores/{store_id}/stock/{sku}", dependencies=[Admin],
            responses={200: {"model": StockItem}, 201: {"model": StockItem}, **PROBLEMS})
async def put_item(store_id: StorePath, sku: SkuPath, body: PutStock, request: Request) -> JSONResponse:
    try:
        item, created = await admin.put_item(
            _pool(request), store_id, sku, body.on_hand, body.expected_version,
            "expected_version" in body.model_fields_set,
        )
    except domain.StockError as exc:
        raise _problem(exc) from None
    return JSONResponse(item, status_code=201 if created else 200)


@router.post("/stores/{store_id}/stock/{sku}/restock", dependencies=[Admin],
             responses={200: {"model": StockItem}, **PROBLEMS})
async def restock(store_id: StorePath, sku: SkuPath, body: Restock, request: Request) -> JSONResponse:
    try:
        item = await admin.restock(_pool(request), store_id, sku, body.quantity, body.expected_version)
    except domain.StockError as exc:
        raise _problem(exc) from None
    return JSONResponse(item)


def _problem(exc: domain.StockError) -> Problem:
    """A refusal of stock's rules as an answer (API.md §3)."""
    if isinstance(exc, domain.VersionRequired):
        return Problem(422, str(exc), errors=[{"loc": "body.expected_version", "msg": "field required"}])
    return Problem(404 if isinstance(exc, domain.UnknownItem) else 409, str(exc))


def _read_sku_cursor(values: list[Any]) -> str:
    (sku,) = values
    if not isinstance(sku, str) or not SKU_RE.fullmatch(sku):
        raise ValueError("not a sku")
    return sku


def _read_version_cursor(values: list[Any]) -> int:
    (version,) = values
    if type(version) is not int or not 0 <= version < 2**62:
        raise ValueError("not a version")
    return version


@router.get("/stores/{store_id}/stock/{sku}/movements", responses={200: {"model": MovementPage}, **PROBLEMS})
async def list_movements(
    store_id: StorePath, sku: SkuPath, request: Request,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> JSONResponse:
    after = decode_cursor(cursor, _read_version_cursor) if cursor else 0
    pool = _pool(request)
    rows = await pool.fetch(db.LIST_MOVEMENTS, store_id, sku, after, limit + 1)
    if not rows and after == 0 and await pool.fetchrow(db.SELECT_ITEM, store_id, sku) is None:
        raise Problem(404, f"no stock item {store_id}/{sku}")
    items = [
        {**dict(r), "order_id": str(r["order_id"]) if r["order_id"] else None, "at": r["at"].isoformat()}
        for r in rows[:limit]
    ]
    next_cursor = encode_cursor(rows[limit - 1]["version"]) if len(rows) > limit else None
    return JSONResponse({"items": items, "next_cursor": next_cursor})
