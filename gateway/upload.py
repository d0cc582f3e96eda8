"""A request body passed on to the upstream as it arrives, never held whole (`/stock/import`)."""

from collections.abc import AsyncIterator

from starlette.types import Receive


class Upload:
    """The client's body as an async iterator for aiohttp; stops (so the upstream request fails)
    once more than `limit` bytes came, or when the client leaves, and says which happened."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self.too_large = False
        self.client_left = False

    async def chunks(self) -> AsyncIterator[bytes]:
        seen = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.client_left = True
                raise ConnectionAbortedError("the client left while sending")
            chunk: bytes = message.get("body", b"")
            seen += len(chunk)
            if seen > self._limit:
                self.too_large = True
                # Raised, not returned: a body cut short must not reach the upstream as whole.
                raise ValueError("the body is over the limit")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return
