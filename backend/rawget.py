"""Chunk downloads over plain HTTP/1.1 sockets, beside httpx.

httpx costs 1.5-2.6 ms of CPU per MB received here (64 KiB reads, then joins), and on
the one trio thread that caps a cold read near 250 MB/s. A chunk GET is the simplest
exchange there is — one request line, a Content-Length answer — so this reads the
answer with `recv_into` into one preallocated buffer on keep-alive connections. Only
for http:// (TLS stays with httpx), only for GET, and only 2xx/4xx/5xx with a
Content-Length; anything else is a BadResponse.

Errors: socket failures and timeouts raise `Unreachable`; a reused keep-alive
connection that the server had closed is retried once on a fresh one. The timeout is
for silence, as httpx's read timeout is: each byte received moves the deadline, so a
large chunk over a slow link is not cut off halfway.
"""

from __future__ import annotations

import trio

from backend.base import BadResponse, Unreachable

HEAD_LIMIT = 16 * 1024
RECV_BUFFER = 4 * 1024 * 1024


class _Conn:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()


class RawGetter:
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._idle: list[_Conn] = []
        #: trio.current_time() when the server last sent bytes of any answer: a slow
        #: link still delivers, an unreachable server does not (see ChunkSource.fetch)
        self.last_byte = 0.0

    async def _connect(self) -> _Conn:
        sock = trio.socket.socket(trio.socket.AF_INET6 if ":" in self.host
                                  else trio.socket.AF_INET)
        sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
        # a chunk arrives in a few large reads instead of many 64 KiB ones: each read
        # costs a trip through the event loop
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, RECV_BUFFER)
        try:
            await sock.connect((self.host, self.port))
        except BaseException:
            sock.close()
            raise
        return _Conn(sock)

    async def get(self, path: str, headers: dict[str, str]) -> tuple[int, bytearray]:
        """(status, body) of GET `path`."""
        lines = [f"GET {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        for attempt in (0, 1):
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else None
            try:
                with trio.fail_after(self.timeout) as deadline:
                    if conn is None:
                        conn = await self._connect()
                    status, body, keep = await self._exchange(conn, request, deadline)
            except (OSError, trio.TooSlowError, _Closed) as exc:
                if conn is not None:
                    conn.close()
                if reused and attempt == 0 and isinstance(exc, (_Closed, OSError)):
                    continue  # the server closed an idle keep-alive connection
                raise Unreachable(f"GET {path}: {type(exc).__name__}: {exc}") from exc
            except BaseException:
                if conn is not None:
                    conn.close()
                raise
            if keep:
                self._idle.append(conn)
            else:
                conn.close()
            return status, body
        raise AssertionError("unreachable")

    def _heard(self, deadline: trio.CancelScope) -> None:
        """Bytes arrived: the silence deadline starts again."""
        self.last_byte = trio.current_time()
        deadline.deadline = self.last_byte + self.timeout

    async def _exchange(
        self, conn: _Conn, request: bytes, deadline: trio.CancelScope
    ) -> tuple[int, bytes, bool]:
        await conn.sock.send(request)
        head_end = -1
        while head_end < 0:
            if len(conn.buf) > HEAD_LIMIT:
                raise BadResponse("an answer's head is too long")
            data = await conn.sock.recv(65536)
            if not data:
                raise _Closed("connection closed before an answer")
            self._heard(deadline)
            conn.buf += data
            head_end = conn.buf.find(b"\r\n\r\n")
        head = bytes(conn.buf[:head_end]).decode("latin-1").split("\r\n")
        del conn.buf[:head_end + 4]
        try:
            status = int(head[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise BadResponse(f"malformed status line {head[0]!r}") from None
        fields = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "content-length" not in fields or not fields["content-length"].isdigit():
            raise BadResponse("an answer without a Content-Length")
        length = int(fields["content-length"])
        body = bytearray(length)
        have = min(len(conn.buf), length)
        body[:have] = conn.buf[:have]
        del conn.buf[:have]
        view = memoryview(body)
        while have < length:
            n = await conn.sock.recv_into(view[have:])
            if n == 0:
                raise _Closed("connection closed in an answer's body")
            self._heard(deadline)
            have += n
        keep = fields.get("connection", "").lower() != "close" and not conn.buf
        return status, body, keep

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


class _Closed(Exception):
    pass
