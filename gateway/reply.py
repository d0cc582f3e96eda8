"""The client side of a forwarded request: the answer in ASGI messages, and its metrics."""

import orjson
from prometheus_client import Counter, Histogram
from starlette.types import Send

from shared.metrics import HTTP_LATENCY, HTTP_REQUESTS
from shared.problems import PROBLEM_JSON, Problem, problem_body

SERVICE = "gateway"
PROBLEM_TYPE = (b"content-type", PROBLEM_JSON.encode())


class Reply:
    """Sends the answer to one request, once, always with its request id; remembers the status
    (None until the answer has started)."""

    __slots__ = ("_request_id", "_send", "status")

    def __init__(self, send: Send, request_id: bytes) -> None:
        self._send = send
        self._request_id = request_id
        self.status: int | None = None

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        headers.append((b"x-request-id", self._request_id))
        self.status = status
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def chunk(self, body: bytes, *, more: bool) -> None:
        await self._send({"type": "http.response.body", "body": body, "more_body": more})

    async def send(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A whole answer; `headers` (without a length) is extended in place."""
        if status >= 200 and status not in (204, 304):  # these have no body, so no length
            headers.append((b"content-length", b"%d" % len(body)))
        await self.start(status, headers)
        await self.chunk(body, more=False)

    async def problem(self, problem: Problem) -> None:
        body = orjson.dumps(problem_body(problem.status, problem.detail, problem.title, problem.errors))
        headers = [PROBLEM_TYPE]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1"))
                    for k, v in (problem.headers or {}).items()]
        await self.send(problem.status, headers, body)


class Metrics:
    """The samples shared.web.Metrics records for FastAPI routes, for the forwarded ones. The
    labelled children are looked up once per label set (methods x routes x statuses: a few
    dozen), not on every request."""

    def __init__(self) -> None:
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                HTTP_REQUESTS.labels(SERVICE, method, route, str(status)),
                HTTP_LATENCY.labels(SERVICE, route),
            )
        children[0].inc()
        children[1].observe(seconds)
