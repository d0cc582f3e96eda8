"""shared/edge_server.py _Coalescing: an answer's head and body leave in one write, at the end
of the event loop's turn; closing or ending the output never loses what is held."""

import asyncio

from shared.edge_server import _Coalescing


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.events.append("write")

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True
        self.events.append("close")

    def write_eof(self) -> None:
        self.events.append("eof")

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


async def next_turn() -> None:
    await asyncio.sleep(0)  # one turn of the loop: what call_soon scheduled has run


async def test_writes_of_one_turn_leave_together_at_its_end() -> None:
    real = FakeTransport()
    transport = _Coalescing(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"{}")
    assert real.writes == [], "held until the end of the turn"
    await next_turn()
    assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    transport.write(b"event")  # a stream's later chunk leaves at the end of its own turn
    await next_turn()
    assert real.writes[-1] == b"event" and len(real.writes) == 2


async def test_close_and_eof_write_what_is_held_first_and_other_calls_pass_through() -> None:
    real = FakeTransport()
    transport = _Coalescing(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"answer")
    transport.write_eof()
    transport.write(b"last")
    transport.close()
    assert real.events == ["write", "eof", "write", "close"]
    assert real.writes == [b"answer", b"last"]
    await next_turn()
    assert real.writes == [b"answer", b"last"], "nothing written twice or after the close"
    assert transport.get_extra_info("peername") == "info:peername"
