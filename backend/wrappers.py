"""Behaviour stacked around a backend: retries with back-off, and a bound on concurrent
chunk transfers. Each wrapper implements the same contract by delegating to `inner`.

`stack()` is the one place the standard stack is built:

    RetryingBackend          retries transient failures of repeatable calls
     └ LimitedBackend        at most `transfers` chunk transfers at once
        └ HttpBackend        the server, over one httpx client

The limiter sits below the retries, so a call waiting out its back-off holds no
transfer slot. The HTTP pool has more connections than transfer slots, so commits,
listings and a long-poll never queue behind uploads.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import trio

from backend.base import Backend, BackendError, is_transient
from backend.http import HttpBackend
from loft.protocol import (
    ChangesResponse,
    CommitRequest,
    CommitResponse,
    CreateSpaceRequest,
    Device,
    KdfParams,
    LoginRequest,
    LoginResponse,
    Member,
    MemberAddRequest,
    NodeState,
    SignupRequest,
    SpaceInfo,
    TrashList,
    TreeResponse,
    VersionList,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
B = TypeVar("B")


class Wrapper:
    """Delegates the whole contract to `inner`, every call through `_call`, which
    subclasses override. The `kind` of a call is its method name, except `changes`
    with a wait, whose kind is `poll`."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    async def _call(self, kind: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return await fn(*args)

    async def aclose(self) -> None:
        await self.inner.aclose()

    # accounts

    async def prelogin(self, name: str) -> KdfParams:
        return await self._call("prelogin", self.inner.prelogin, name)

    async def signup(self, req: SignupRequest) -> LoginResponse:
        return await self._call("signup", self.inner.signup, req)

    async def login(self, req: LoginRequest) -> LoginResponse:
        return await self._call("login", self.inner.login, req)

    async def logout(self) -> None:
        await self._call("logout", self.inner.logout)

    async def devices(self) -> list[Device]:
        return await self._call("devices", self.inner.devices)

    async def revoke(self, device_id: str) -> None:
        await self._call("revoke", self.inner.revoke, device_id)

    async def user_key(self, name: str) -> bytes:
        return await self._call("user_key", self.inner.user_key, name)

    # spaces

    async def spaces(self) -> list[SpaceInfo]:
        return await self._call("spaces", self.inner.spaces)

    async def space(self, space_id: str) -> SpaceInfo:
        return await self._call("space", self.inner.space, space_id)

    async def create_space(self, req: CreateSpaceRequest) -> SpaceInfo:
        return await self._call("create_space", self.inner.create_space, req)

    async def members(self, space: str) -> list[Member]:
        return await self._call("members", self.inner.members, space)

    async def add_member(self, space: str, req: MemberAddRequest) -> Member:
        return await self._call("add_member", self.inner.add_member, space, req)

    async def remove_member(self, space: str, user: str) -> None:
        await self._call("remove_member", self.inner.remove_member, space, user)

    # chunks

    async def missing(self, space: str, ids: list[str]) -> list[str]:
        return await self._call("missing", self.inner.missing, space, ids)

    async def put_chunk(self, space: str, chunk_id: str, blob: bytes) -> None:
        await self._call("put_chunk", self.inner.put_chunk, space, chunk_id, blob)

    async def put_chunks(self, space: str, items: list[tuple[str, bytes]]) -> None:
        await self._call("put_chunks", self.inner.put_chunks, space, items)

    async def get_chunk(self, space: str, chunk_id: str, ahead: Sequence[str] = ()) -> bytes:
        return await self._call("get_chunk", self.inner.get_chunk, space, chunk_id, ahead)

    async def get_chunks(self, space: str, ids: list[str]) -> dict[str, bytes | None]:
        return await self._call("get_chunks", self.inner.get_chunks, space, ids)

    # sync

    async def commit(self, space: str, req: CommitRequest) -> CommitResponse:
        return await self._call("commit", self.inner.commit, space, req)

    async def changes(
        self, cursors: dict[str, int], wait: float = 0.0, limit: int = 1000
    ) -> ChangesResponse:
        kind = "poll" if wait > 0 else "changes"
        return await self._call(kind, self.inner.changes, cursors, wait, limit)

    async def tree(
        self,
        space: str,
        at: int | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> TreeResponse:
        return await self._call("tree", self.inner.tree, space, at, after, limit)

    async def versions(self, space: str, node: str) -> VersionList:
        return await self._call("versions", self.inner.versions, space, node)

    async def version(self, space: str, node: str, seq: int) -> NodeState:
        return await self._call("version", self.inner.version, space, node, seq)

    async def trash(self, space: str) -> TrashList:
        return await self._call("trash", self.inner.trash, space)


#: Calls that answer the same when sent twice: reads, content-addressed puts, commits
#: (a commit_id is applied once), role changes and device revocation. Not here: signup
#: and login (a second device, or user_exists), create_space (a second space), logout
#: and remove_member (a lost answer would come back as 401/404), and long-polls (the
#: caller loops anyway).
RETRIED = frozenset(
    {
        "prelogin",
        "devices",
        "revoke",
        "user_key",
        "spaces",
        "space",
        "members",
        "add_member",
        "missing",
        "put_chunk",
        "put_chunks",
        "get_chunk",
        "get_chunks",
        "commit",
        "changes",
        "tree",
        "versions",
        "version",
        "trash",
    }
)


class RetryingBackend(Wrapper):
    """Sends repeatable calls (`RETRIED`) again after transient failures, up to
    `attempts` times in all, waiting an exponentially growing delay with jitter in
    between: attempt n waits between half and all of min(max_delay, base_delay·2ⁿ⁻¹).
    The last failure is raised as it is."""

    def __init__(
        self,
        inner: Backend,
        attempts: int = 5,
        base_delay: float = 0.2,
        max_delay: float = 5.0,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        super().__init__(inner)
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        #: Retries made so far, by kind.
        self.retries: dict[str, int] = {}

    def delay(self, attempt: int) -> float:
        """How long to wait after failed attempt number `attempt` (from 1)."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    async def _call(self, kind: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if kind not in RETRIED:
            return await fn(*args)
        attempt = 1
        while True:
            try:
                return await fn(*args)
            except BackendError as exc:
                if not is_transient(exc) or attempt >= self.attempts:
                    raise
                delay = self.delay(attempt)
                # An offline server is an expected state, not an error.
                log.warning(
                    "%s failed (%s); attempt %d of %d, retrying in %.2f s",
                    kind,
                    exc,
                    attempt,
                    self.attempts,
                    delay,
                )
                self.retries[kind] = self.retries.get(kind, 0) + 1
            await trio.sleep(delay)
            attempt += 1


#: Calls that move chunk bodies.
TRANSFERS = frozenset({"put_chunk", "put_chunks", "get_chunk", "get_chunks"})


class LimitedBackend(Wrapper):
    """At most `transfers` chunk transfers (`TRANSFERS`) in flight at once; other calls
    pass straight through."""

    def __init__(self, inner: Backend, transfers: int = 4) -> None:
        super().__init__(inner)
        self.limiter = trio.CapacityLimiter(transfers)

    async def _call(self, kind: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if kind not in TRANSFERS:
            return await fn(*args)
        async with self.limiter:
            return await fn(*args)


def layer(backend: Backend, cls: type[B]) -> B:
    """The layer of type `cls` in a stack of wrappers (e.g. the `HttpBackend`, for its
    counters or `set_token`). LookupError when the stack has none."""
    current: object = backend
    while True:
        if isinstance(current, cls):
            return current
        if not isinstance(current, Wrapper):
            raise LookupError(f"no {cls.__name__} in this backend stack")
        current = current.inner


def stack(
    url: str,
    token: str | None = None,
    *,
    transfers: int = 8,
    attempts: int = 5,
    max_connections: int = 12,
    timeout: float = 30.0,
) -> Backend:
    """The standard client stack to the server at `url` (see the module docstring).
    More connections than transfers: the long poll and commits must never wait behind
    uploads."""
    http = HttpBackend(url, token, max_connections=max_connections, timeout=timeout)
    return RetryingBackend(LimitedBackend(http, transfers), attempts=attempts)
