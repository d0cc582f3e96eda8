"""The client side of a forwarded request: the answer in ASGI messages, always with its id."""

from starlette.types import Send

from shared import edge
from shared.problems import Problem


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
        self.status = status
        await edge.send_answer(self._send, status, headers, body, self._request_id)

    async def problem(self, problem: Problem) -> None:
        headers, body = edge.problem_parts(problem)
        await self.send(problem.status, headers, body)
