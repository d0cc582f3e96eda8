"""The gateway's lean upstream client (gateway/wire.py) against small real HTTP servers on
loopback: keep-alive reuse, the retry rules for a pooled connection the upstream closed, an
interim 100, a refused URL skipped, and the 503/504/502 answers."""

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from gateway.forward import Upstream
from gateway.wire import Wire
from shared.problems import Problem


@asynccontextmanager
async def server(answer: Callable[[int, bytes], bytes | None], *, close_after: int = 0,
                 delay: float = 0.0) -> AsyncIterator[tuple[str, list[bytes], list[int]]]:
    """An HTTP/1.1 server: `answer(n, request_head)` gives the bytes for the n-th request on a
    connection (None: close without answering). `close_after`: closes each connection after
    that many answers. Yields its base URL, the request heads seen and the connections made."""
    heads: list[bytes] = []
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                heads.append(head)
                if delay:
                    await asyncio.sleep(delay)
                data = answer(n, head)
                if data is None:
                    break
                writer.write(data)
                await writer.drain()
                n += 1
                if close_after and n >= close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    listening = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", heads, connections
    finally:
        listening.close()


def ok(body: bytes = b'{"ok":true}', status: str = "200 OK") -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
            .encode() + body)


async def test_answers_come_back_whole_and_the_connection_is_reused() -> None:
    async with server(lambda n, head: ok(b"n=%d" % n)) as (url, heads, connections):
        wire = Wire(10)
        answers = [await wire.exchange(Upstream("orders", [url]), "GET", f"/orders/{i}?wait=1", b"",
                                       [("x-request-id", f"r{i}")], 5) for i in range(3)]
        wire.close()
    assert [(status, body) for status, _, body in answers] == [(200, b"n=0"), (200, b"n=1"), (200, b"n=2")]
    assert (b"content-type", b"application/json") in answers[0][1]
    assert heads[2].startswith(b"GET /orders/2?wait=1 HTTP/1.1\r\n") and b"x-request-id: r2" in heads[2]
    assert len(connections) == 1, "keep-alive: one connection for three requests"


async def test_an_interim_100_is_not_taken_for_the_answer_and_expect_is_not_forwarded() -> None:
    async with server(lambda n, head: b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"real")) as (url, heads, _):
        wire = Wire(10)
        status, _, body = await wire.exchange(Upstream("orders", [url]), "POST", "/orders", b"{}",
                                              [("expect", "100-continue")], 5)
        wire.close()
    assert (status, body) == (200, b"real")
    assert b"expect" not in heads[0].lower()


async def test_a_pooled_connection_closed_by_the_upstream_is_retried_for_a_get_only() -> None:
    # The upstream answers once per connection and then closes it, but not before the client
    # took it back to its pool: the next request on it meets a closed connection.
    async with server(lambda n, head: ok() if n == 0 else None) as (url, _, connections):
        wire = Wire(10)
        upstream = Upstream("orders", [url])
        await wire.exchange(upstream, "GET", "/orders/1", b"", [], 5)
        status, _, _ = await wire.exchange(upstream, "GET", "/orders/1", b"", [], 5)
        assert status == 200 and len(connections) == 2, "the GET was sent again on a new connection"
        with pytest.raises(Problem) as refused:
            await wire.exchange(upstream, "POST", "/orders", b"{}", [], 5)
        wire.close()
    assert refused.value.status == 502, "a POST the upstream may have acted on is never sent twice"
    assert len(connections) == 2


async def test_a_refused_url_is_skipped_and_no_instance_is_503() -> None:
    async with server(lambda n, head: ok(b"second")) as (url, _, _):
        dead = "http://127.0.0.1:9"  # discard port: nothing listens
        wire = Wire(10)
        status, _, body = await wire.exchange(Upstream("orders", [dead, url]), "POST", "/orders", b"{}", [], 5)
        with pytest.raises(Problem) as none:
            await wire.exchange(Upstream("orders", [dead]), "GET", "/orders/1", b"", [], 5)
        wire.close()
    assert (status, body) == (200, b"second")
    assert none.value.status == 503


async def test_no_answer_in_time_is_504_and_no_free_connection_is_503_with_retry_after() -> None:
    async with server(lambda n, head: ok(), delay=4.0) as (url, heads, _):
        wire = Wire(1)
        upstream = Upstream("orders", [url])
        with pytest.raises(Problem) as late:
            await wire.exchange(upstream, "GET", "/orders/1", b"", [], 0.3)
        assert late.value.status == 504
        # The one connection is held by a slow request: the next cannot get one within the
        # connect timeout (3 s), well before its own 5 s are up.
        slow = asyncio.ensure_future(wire.exchange(upstream, "GET", "/orders/2", b"", [], 8))
        deadline = asyncio.get_running_loop().time() + 5
        while len(heads) < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)  # until the slow request reached the server
        with pytest.raises(Problem) as busy:
            await wire.exchange(upstream, "GET", "/orders/3", b"", [], 5)
        assert busy.value.status == 503 and busy.value.headers == {"Retry-After": "1"}
        assert (await slow)[0] == 200
        wire.close()


async def test_an_answer_that_is_not_http_is_502() -> None:
    async with server(lambda n, head: b"SSH-2.0-OpenSSH\r\n\r\n") as (url, _, _):
        wire = Wire(10)
        with pytest.raises(Problem) as broken:
            await wire.exchange(Upstream("orders", [url]), "GET", "/orders/1", b"", [], 5)
        wire.close()
    assert broken.value.status == 502
