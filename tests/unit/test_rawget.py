"""The raw chunk GET's timeout is for silence, not for the whole answer: a peer on
127.0.0.1 sends an answer slowly (it must arrive) or stops halfway (Unreachable)."""

from __future__ import annotations

from functools import partial

import pytest
import trio

from backend.base import Unreachable
from backend.rawget import RawGetter

BODY = bytes(range(256)) * 64  # 16 KiB


async def _serve_one(stream: trio.SocketStream, pause: float, pieces: int) -> None:
    """Answers one GET with BODY in `pieces` parts, `pause` seconds apart; with
    pieces=0, sends the head and half the body, then nothing more."""
    request = b""
    while b"\r\n\r\n" not in request:
        request += await stream.receive_some()
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY)
    if not pieces:
        await stream.send_all(head + BODY[: len(BODY) // 2])
        await trio.sleep_forever()
    await stream.send_all(head)
    step = -(-len(BODY) // pieces)
    for i in range(0, len(BODY), step):
        await trio.sleep(pause)
        await stream.send_all(BODY[i : i + step])
    await trio.sleep_forever()  # keep-alive: the client closes


async def _peer(nursery: trio.Nursery, pause: float, pieces: int) -> int:
    async def handler(stream: trio.SocketStream) -> None:
        await _serve_one(stream, pause, pieces)

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def test_a_slow_answer_longer_than_the_timeout_arrives_whole():
    async with trio.open_nursery() as nursery:
        port = await _peer(nursery, pause=0.3, pieces=6)  # ~1.8 s in all
        getter = RawGetter("127.0.0.1", port, timeout=1.0)
        started = trio.current_time()
        status, body = await getter.get("/chunk", {})
        assert (status, bytes(body)) == (200, BODY)
        assert trio.current_time() - started > 1.0  # longer than the timeout
        assert getter.last_byte > started
        getter.close()
        nursery.cancel_scope.cancel()


async def test_an_answer_that_stops_halfway_is_unreachable_after_the_timeout():
    async with trio.open_nursery() as nursery:
        port = await _peer(nursery, pause=0.0, pieces=0)
        getter = RawGetter("127.0.0.1", port, timeout=0.5)
        started = trio.current_time()
        with pytest.raises(Unreachable):
            await getter.get("/chunk", {})
        assert 0.5 <= trio.current_time() - started < 3.0
        getter.close()
        nursery.cancel_scope.cancel()
