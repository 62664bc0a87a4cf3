"""Retry and concurrency wrappers, and the status → error table, without a server.

The inner backend here is a scripted stand-in for the contract (not for the server):
it fails as told and records how many calls overlap.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio

from backend import (
    BadCredentials,
    BadRequest,
    ChunkMissing,
    CommitConflict,
    Conflict,
    Forbidden,
    HttpBackend,
    LimitedBackend,
    NotFound,
    QuotaExceeded,
    Rejected,
    RetryingBackend,
    ServerFailure,
    TooLarge,
    Unauthorized,
    Unreachable,
    UserExists,
    is_transient,
    layer,
    stack,
)
from backend.http import _rejection
from loft.protocol import LoginRequest, OpCode


class Scripted:
    """Answers chunk gets after `failures` raises of `error`; tracks overlapping calls."""

    def __init__(self, failures: int = 0, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or Unreachable("connection refused")
        self.calls: list[str] = []
        self.active = 0
        self.most_active = 0

    async def _run(self, kind: str) -> None:
        self.calls.append(kind)
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            await trio.sleep(1)
            if self.failures:
                self.failures -= 1
                raise self.error
        finally:
            self.active -= 1

    async def get_chunk(self, space: str, chunk_id: str, ahead=()) -> bytes:
        await self._run("get_chunk")
        return b"blob"

    async def spaces(self) -> list[Any]:
        await self._run("spaces")
        return []

    async def login(self, req: LoginRequest) -> Any:
        await self._run("login")

    async def changes(self, cursors: dict[str, int], wait: float = 0, limit: int = 1000) -> Any:
        await self._run("changes")

    async def aclose(self) -> None:
        pass


async def test_retrying_backend_retries_transient_errors_with_backoff(autojump_clock, caplog):
    inner = Scripted(failures=3)
    backend = RetryingBackend(inner, attempts=4, base_delay=1.0, max_delay=3.0)  # type: ignore[arg-type]
    started = trio.current_time()
    with caplog.at_level(logging.DEBUG, logger="backend"):
        assert await backend.get_chunk("s", "c") == b"blob"
    # four calls of 1 s each, and waits of [0.5, 1], [1, 2], [1.5, 3] seconds between
    elapsed = trio.current_time() - started
    assert 4 + 3 <= elapsed <= 4 + 6
    assert inner.calls == ["get_chunk"] * 4
    assert backend.retries == {"get_chunk": 3}
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 3


async def test_retrying_backend_gives_up_after_attempts(autojump_clock):
    inner = Scripted(failures=10, error=ServerFailure(500, "boom"))
    backend = RetryingBackend(inner, attempts=3)  # type: ignore[arg-type]
    with pytest.raises(ServerFailure):
        await backend.get_chunk("s", "c")
    assert len(inner.calls) == 3


async def test_retrying_backend_does_not_retry_rejections_logins_or_polls(autojump_clock):
    for error in (NotFound(404, "not_found", "no"), Unauthorized(401, "unauthorized", "no")):
        inner = Scripted(failures=1, error=error)
        with pytest.raises(type(error)):
            await RetryingBackend(inner).get_chunk("s", "c")  # type: ignore[arg-type]
        assert inner.calls == ["get_chunk"]

    inner = Scripted(failures=5)
    backend = RetryingBackend(inner)  # type: ignore[arg-type]
    for call in (
        lambda: backend.login(LoginRequest(name="a", auth_key=bytes(32), device_name="d")),
        lambda: backend.changes({}, wait=30),
    ):
        with pytest.raises(Unreachable):
            await call()
    assert inner.calls == ["login", "changes"]
    await backend.changes({}, wait=0)  # not a long-poll: retried
    assert inner.calls[2:] == ["changes"] * 4


async def test_limited_backend_bounds_concurrent_transfers_only(autojump_clock):
    inner = Scripted()
    backend = LimitedBackend(inner, transfers=3)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(backend.get_chunk, "s", "c")
    assert inner.most_active == 3

    inner.most_active = 0
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(backend.spaces)
    assert inner.most_active == 10


async def test_stack_layers_are_found_by_type():
    backend = stack("http://127.0.0.1:9", "token", transfers=2)
    try:
        assert isinstance(backend, RetryingBackend)
        assert layer(backend, LimitedBackend).limiter.total_tokens == 2
        assert layer(backend, HttpBackend).requests == {}
        with pytest.raises(LookupError):
            layer(layer(backend, HttpBackend), RetryingBackend)
    finally:
        await backend.aclose()
    with pytest.raises(ValueError):
        HttpBackend("ftp://example.org")


def test_is_transient_only_for_offline_and_server_failures():
    assert is_transient(Unreachable("refused"))
    assert is_transient(Unreachable("bad gateway", 502))
    assert is_transient(ServerFailure(500, "bug"))
    assert not is_transient(NotFound(404, "not_found", "x"))
    assert not is_transient(ValueError())


def _body(code: str, **extra: Any) -> bytes:
    return json.dumps({"code": code, "message": "m", **extra}).encode()


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (400, _body("invalid_request"), BadRequest),
        (400, _body("digest_mismatch"), BadRequest),
        (401, _body("unauthorized"), Unauthorized),
        (401, _body("bad_credentials"), BadCredentials),
        (403, _body("forbidden"), Forbidden),
        (404, _body("not_found"), NotFound),
        (404, _body("chunk_not_found"), ChunkMissing),
        (405, _body("method_not_allowed"), BadRequest),
        (409, _body("user_exists"), UserExists),
        (409, _body("conflict"), Conflict),
        (409, _body("conflict", details=[{"index": 0, "code": "stale_base"}]), CommitConflict),
        (409, _body("quota_exceeded"), QuotaExceeded),
        (413, _body("payload_too_large"), TooLarge),
        (404, b"<html>not json</html>", NotFound),
    ],
)
def test_rejection_maps_status_and_code(status: int, body: bytes, cls: type[Rejected]):
    error = _rejection(status, body)
    assert type(error) is cls
    assert error.status == status
    if isinstance(error, CommitConflict):
        assert [r.code for r in error.results] == [OpCode.STALE_BASE]
