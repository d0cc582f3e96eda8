"""HTTP on a raw socket: what an HTTP client library would refuse to send (dot segments,
oversized or malformed headers) or would fix before sending, and half-sent requests."""

import asyncio
from dataclasses import dataclass

import orjson

PROBLEM_JSON = b"application/problem+json"


@dataclass
class Answer:
    status: int
    headers: dict[bytes, list[bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def problem(self, status: int) -> dict[str, object]:
        """Asserts a problem+json answer with this status (API.md §4); returns its body."""
        assert self.status == status, (self.status, self.body[:300])
        media = (self.header(b"content-type") or b"").split(b";")[0].strip()
        assert media == PROBLEM_JSON, self.headers
        body = orjson.loads(self.body)
        assert body["status"] == status and body["title"] and body["detail"], body
        assert self.header(b"x-request-id"), "every answer carries its request id"
        return body


def parse(data: bytes) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1."), data[:300]
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return Answer(int(lines[0].split()[1]), headers, body)


def request(method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b"",
            host: str = "gateway") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def exchange(port: int, data: bytes, timeout: float = 15) -> Answer:
    """Sends `data` (a whole request with `Connection: close`) and reads the answer to its end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return parse(await asyncio.wait_for(reader.read(), timeout=timeout))
    finally:
        writer.close()
