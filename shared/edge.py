"""The edge rules of every HTTP process (API.md §4), written once.

The gateway's lean path (gateway/proxy.py), the orders fast lane (orders/fastlane.py) and the
FastAPI shell of every service (shared/web.py) all take these from here, so the first process
that sees a request and every service behind it apply the same rules and cannot disagree.
What must act before a request is whole (header and target sizes, the header timeout, the
connection cap) is in shared/edge_server.py, the server every process runs."""

import asyncio
import contextlib
import math
import re
import time
import uuid
from collections.abc import Awaitable, Iterator
from contextvars import Token
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote

import orjson
from asgi_correlation_id import correlation_id
from prometheus_client import Counter, Histogram
from starlette.types import Message, Receive, Send

from shared.db import acquire_timeout
from shared.metrics import HTTP_LATENCY, HTTP_REQUESTS
from shared.problems import PROBLEM_JSON, Problem, problem_body

MAX_BODY_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024  # all request header lines together: beyond, 431
MAX_TARGET_BYTES = 8 * 1024  # the request target (path and query): beyond, 414
HEADER_TIMEOUT_SECONDS = 10.0  # a client still sending its headers after this is cut off
# How long a request waits for a database connection before it is answered 503 (a pool of 10
# against thousands of clients must shed load, not queue it until every client timed out).
ACQUIRE_TIMEOUT_SECONDS = 5.0
RETRY_AFTER = "1"
MAX_WAIT_SECONDS = 30.0  # `?wait=` of a long-poll, API.md §2

# API.md §4: a client's X-Request-ID is kept only if it is 1-128 of these; anything else would
# travel into outbox rows, AMQP headers and log lines (a 140 kB id once stopped the relay).
REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
# An escape that decodes to a dot, a slash or a backslash: a path holding one could be resolved
# by an upstream (or an HTTP client on the way) to a path other than the one the gateway matched.
_HIDDEN = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)
_DECODE_ROUNDS = 4
T = TypeVar("T")


# ----- the request's context ------------------------------------------------------------------


def new_request_id() -> bytes:
    return uuid.uuid4().hex.encode()


def request_id(value: bytes | None) -> bytes:
    """The id a request is answered and logged with: the client's if it obeys the rule, else new."""
    if value and REQUEST_ID.fullmatch(value):
        return value
    return new_request_id()


def request_id_of(headers: list[tuple[bytes, bytes]]) -> bytes:
    """`request_id` of the first X-Request-ID header (names are lower-cased, per ASGI)."""
    for name, value in headers:
        if name == b"x-request-id":
            return request_id(value)
    return new_request_id()


@dataclass(slots=True)
class RequestContext:
    """What the edge decided about one request before any handler runs, in force (log lines,
    outbox rows, database waits) until `close`. The place for more per-request context, such as
    a trace id, is here."""

    request_id: bytes
    started: float = field(default_factory=time.perf_counter)
    _tokens: list[tuple[Any, Token[Any]]] = field(default_factory=list)

    def close(self) -> None:
        for var, token in reversed(self._tokens):
            var.reset(token)
        self._tokens.clear()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def enter(request_id_value: bytes, *, database: bool = True) -> RequestContext:
    """`database`: the process has a pool, whose waits are bounded for the request's time."""
    context = RequestContext(request_id_value)
    context._tokens.append((correlation_id, correlation_id.set(request_id_value.decode("latin-1"))))
    if database:
        context._tokens.append((acquire_timeout, acquire_timeout.set(ACQUIRE_TIMEOUT_SECONDS)))
    return context


# ----- paths, queries, bodies -------------------------------------------------------------------


def hides_dot_or_slash(raw_path: bytes) -> bool:
    """True if the raw path encodes a dot, slash or backslash, however many times encoded
    (`%2e`, `%252e`, `%25252E`, ...), or holds a dot segment."""
    if b"%" not in raw_path and b"/." not in raw_path:
        return False  # the common case, at the cost of two scans
    text = raw_path.decode("latin-1")
    for _ in range(_DECODE_ROUNDS):
        if "/." in text and any(part in (".", "..") for part in text.split("/")):
            return True
        if "%" not in text:
            return False
        if _HIDDEN.search(text):
            return True
        text = unquote(text)
    return True  # still escaped after that many rounds: no client of ours does that


_DECIMAL = re.compile(r"[0-9]{1,9}(\.[0-9]{0,9})?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def has_control(path: str) -> bool:
    """A decoded path holding a control character (`/stores/S/stock/A%0A`): no id may hold one,
    and routers matching with `$` would take `A\n` for `A`."""
    return _CONTROL.search(path) is not None


def wait_seconds(value: str | None) -> float:
    """A long-poll's `?wait=`: 0 when absent; a finite number of seconds from 0 to 30, else 422."""
    if value is None:
        return 0.0
    # A plain decimal only: float() alone would also take "1_0", "1e1", "nan" or " 5 ".
    seconds = float(value) if _DECIMAL.fullmatch(value) else math.nan
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_WAIT_SECONDS):
        raise Problem(422, f"wait must be a number of seconds from 0 to {MAX_WAIT_SECONDS:g}",
                      errors=[{"loc": "query.wait", "msg": "not a number from 0 to 30"}])
    return seconds


def query_wait(query: bytes) -> str | None:
    """The raw `wait` of a query string (the last one, as the services read it), if any."""
    if b"wait" not in query:
        return None
    values = [v for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True) if k == "wait"]
    return values[-1] if values else None


def too_large(limit: int) -> Problem:
    return Problem(413, f"request body is larger than {limit // 1024 // 1024} MiB")


def check_length(length: bytes | None, limit: int) -> None:
    """413 at once for an announced body over `limit` (or a Content-Length that is no number)."""
    if length is not None and (not length.isdigit() or len(length) > 12 or int(length) > limit):
        raise too_large(limit)


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, refused with 413 once more than `limit` arrived (Content-Length
    may be absent or lie). None: the client left while sending."""
    chunks: list[bytes] = []
    seen = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            raise too_large(limit)
        if not message.get("more_body", False):
            return b"".join(chunks) + chunk if chunks else chunk
        chunks.append(chunk)


def limited(receive: Receive, limit: int) -> Receive:
    """`receive` that raises 413 once more than `limit` body bytes came in."""
    seen = 0

    async def limited_receive() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise too_large(limit)
        return message

    return limited_receive


async def client_left(receive: Receive) -> None:
    """Returns once the client has disconnected (call it once the body was read, if any)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(receive: Receive, work: Awaitable[T]) -> T | None:
    """`work`, cancelled if the client leaves first (None then): a long-poll whose client is gone
    must not keep its slot of the cap, nor the upstream's, for the rest of its wait."""
    task = asyncio.ensure_future(work)
    left = asyncio.ensure_future(client_left(receive))
    try:
        await asyncio.wait((task, left), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we are cancelled ourselves (shutdown): so is the work
        task.cancel()
        raise
    finally:
        left.cancel()
    if task.done():
        return task.result()
    task.cancel()
    # Whatever it ends with now, nobody is there to be told.
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return None


# ----- capacity ---------------------------------------------------------------------------------


class Capacity:
    """At most `limit` at once of something a client can hold open (long-polls, event streams);
    beyond it, 503 with Retry-After (API.md §1)."""

    def __init__(self, what: str, limit: int) -> None:
        self.what = what
        self.limit = limit
        self.held = 0

    def take(self) -> None:
        if self.held >= self.limit:
            raise Problem(503, f"too many {self.what} open at once; retry shortly",
                          headers={"Retry-After": RETRY_AFTER})
        self.held += 1

    def give_back(self) -> None:
        self.held -= 1

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        self.take()
        try:
            yield
        finally:
            self.give_back()


# ----- answers ------------------------------------------------------------------------------------

PROBLEM_TYPE = (b"content-type", PROBLEM_JSON.encode())


def problem_parts(problem: Problem) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers (without length or request id) and body of a problem+json answer."""
    body = orjson.dumps(problem_body(problem.status, problem.detail, problem.title, problem.errors))
    headers = [PROBLEM_TYPE]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1"))
                for k, v in (problem.headers or {}).items()]
    return headers, body


async def send_answer(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                      request_id_value: bytes) -> None:
    """A whole answer in ASGI messages, with its length and request id; `headers` is extended."""
    if status >= 200 and status not in (204, 304):  # these have no body, so no length
        headers.append((b"content-length", b"%d" % len(body)))
    headers.append((b"x-request-id", request_id_value))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_problem(send: Send, problem: Problem, request_id_value: bytes) -> None:
    headers, body = problem_parts(problem)
    await send_answer(send, problem.status, headers, body, request_id_value)


class RouteMetrics:
    """`http_requests_total` and `http_request_duration_seconds` of one service. The labelled
    children are looked up once per label set (a few dozen), not on every request."""

    def __init__(self, service: str) -> None:
        self.service = service
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                HTTP_REQUESTS.labels(self.service, method, route, str(status)),
                HTTP_LATENCY.labels(self.service, route),
            )
        children[0].inc()
        children[1].observe(seconds)
