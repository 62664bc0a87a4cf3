"""The storage contract every backend implements, and the errors backends raise.

A backend is the client's only way to the server: accounts, spaces, sealed chunks, commits
and the change feed. Implementations translate their transport's failures into the tree
below at exactly one place; callers branch on these classes, never on messages or on a
transport library's exceptions.

    BackendError                  anything a backend raises on purpose
     ├ Unreachable                no usable answer: connection refused or reset, timeout,
     │                            DNS failure, 502/503/504. The client is offline. Transient.
     ├ ServerFailure              any other 5xx: the server failed. Transient.
     ├ BadResponse                an answer that breaks the protocol (malformed JSON or
     │                            framing, unexpected status). A bug or a version skew.
     └ Rejected                   a 4xx: the request was refused; sending it again will not
        │                         help. Carries `status`, `code` (an ErrorCode) and `message`.
        ├ BadRequest              400 and any 4xx not listed here (a client bug, or input
        │                         the caller passed through, such as an invalid name)
        ├ Unauthorized            401 unauthorized: no token, or an unknown or revoked one
        ├ BadCredentials          401 bad_credentials: wrong user name or password
        ├ Forbidden               403: the caller's role is too low
        ├ NotFound                404: no such space, node, version, user, device…
        │  └ ChunkMissing         404 chunk_not_found
        ├ Conflict                409 conflict without per-operation results
        │  └ CommitConflict       409 conflict of a commit: one OpResult per operation
        ├ UserExists              409 user_exists
        ├ QuotaExceeded           code quota_exceeded
        └ TooLarge                413: body or answer over a limit

`is_transient(exc)` says whether waiting and sending the same request again may succeed.
A commit refused for quota arrives as a `CommitConflict` whose results carry
`OpCode.QUOTA_EXCEEDED`: the server reports quota per operation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from loft.protocol import (
    ChangesResponse,
    CommitRequest,
    CommitResponse,
    CreateSpaceRequest,
    Device,
    ErrorCode,
    KdfParams,
    LoginRequest,
    LoginResponse,
    Member,
    MemberAddRequest,
    NodeState,
    OpCode,
    OpResult,
    SignupRequest,
    SpaceInfo,
    TrashList,
    TreeResponse,
    VersionList,
)

__all__ = [
    "Backend",
    "BackendError",
    "BadCredentials",
    "BadRequest",
    "BadResponse",
    "ChunkMissing",
    "CommitConflict",
    "Conflict",
    "Forbidden",
    "NotFound",
    "QuotaExceeded",
    "Rejected",
    "ServerFailure",
    "TooLarge",
    "Unauthorized",
    "Unreachable",
    "UserExists",
    "is_transient",
]


# ---------------------------------------------------------------------------- errors


class BackendError(Exception):
    """Base of every error a backend raises on purpose."""


class Unreachable(BackendError):
    """No usable answer from the server: the client is offline for now."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The gateway status (502/503/504) when a proxy or the server answered one.
        self.status = status


class ServerFailure(BackendError):
    """The server answered with a 5xx other than 502/503/504."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class BadResponse(BackendError):
    """The server's answer does not follow the protocol."""


class Rejected(BackendError):
    """The server refused the request (a 4xx)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        #: An `ErrorCode` value; kept as a plain string when the server sent one this
        #: client does not know.
        self.code = code
        self.message = message


class BadRequest(Rejected):
    pass


class Unauthorized(Rejected):
    pass


class BadCredentials(Rejected):
    pass


class Forbidden(Rejected):
    pass


class NotFound(Rejected):
    pass


class ChunkMissing(NotFound):
    pass


class Conflict(Rejected):
    pass


class CommitConflict(Conflict):
    """A commit was refused as a whole; `results` says, per operation, why."""

    def __init__(self, results: list[OpResult], message: str = "") -> None:
        refused = [r for r in results if r.code != OpCode.OK]
        super().__init__(
            409,
            ErrorCode.CONFLICT,
            message or f"{len(refused)} of {len(results)} operations refused",
        )
        self.results = results

    @property
    def refused(self) -> list[OpResult]:
        """The results of the operations that caused the refusal."""
        return [r for r in self.results if r.code != OpCode.OK]


class UserExists(Rejected):
    pass


class QuotaExceeded(Rejected):
    pass


class TooLarge(Rejected):
    pass


def is_transient(exc: BaseException) -> bool:
    """True when the same request may succeed later: the server was unreachable or
    failed, rather than refusing the request."""
    return isinstance(exc, Unreachable | ServerFailure)


# ---------------------------------------------------------------------------- contract


@runtime_checkable
class Backend(Protocol):
    """What the client needs from storage. Every method is async and trio-compatible,
    and raises only `BackendError`s (and `trio.Cancelled`).

    Ids are plain strings in their wire form: chunk ids as 64 lowercase hex digits,
    space and node ids as lowercase UUIDs. Blobs are sealed chunks, opaque here.
    """

    # accounts: no token needed

    async def prelogin(self, name: str) -> KdfParams:
        """The KDF parameters of `name` (decoys for unknown names)."""
        ...

    async def signup(self, req: SignupRequest) -> LoginResponse:
        """Creates the account, its home space and a first device. The backend's own
        token does not change: pass the answer's token to the next backend."""
        ...

    async def login(self, req: LoginRequest) -> LoginResponse:
        """Registers a new device and returns its token (the backend's own token does
        not change)."""
        ...

    # accounts and devices

    async def logout(self) -> None:
        """Revokes the calling device's token."""
        ...

    async def devices(self) -> list[Device]: ...

    async def revoke(self, device_id: str) -> None:
        """Revokes one of the caller's devices (revoking twice is not an error)."""
        ...

    async def user_key(self, name: str) -> bytes:
        """The public key of user `name`."""
        ...

    # spaces

    async def spaces(self) -> list[SpaceInfo]: ...

    async def space(self, space_id: str) -> SpaceInfo: ...

    async def create_space(self, req: CreateSpaceRequest) -> SpaceInfo: ...

    async def members(self, space: str) -> list[Member]: ...

    async def add_member(self, space: str, req: MemberAddRequest) -> Member:
        """Adds a member or changes their role."""
        ...

    async def remove_member(self, space: str, user: str) -> None: ...

    # chunks

    async def missing(self, space: str, ids: list[str]) -> list[str]:
        """The ids among `ids` the space does not hold, in the order given, without
        duplicates. Present ones are kept from collection for a grace period more. Any
        number of ids."""
        ...

    async def put_chunk(self, space: str, chunk_id: str, blob: bytes) -> None:
        """Stores one blob; returns once the server holds it durably."""
        ...

    async def put_chunks(self, space: str, items: list[tuple[str, bytes]]) -> None:
        """Stores many blobs (any number, any total size), batching them into as few
        requests as the server's limits allow."""
        ...

    async def get_chunk(self, space: str, chunk_id: str, ahead: Sequence[str] = ()) -> bytes:
        """One blob; `ChunkMissing` when the space does not hold it. `ahead`: chunks of
        the space the caller will ask for next, which the server may start reading (at
        most MAX_READ_AHEAD_IDS; a hint)."""
        ...

    async def get_chunks(self, space: str, ids: list[str]) -> dict[str, bytes | None]:
        """Many blobs by id (None for those the space does not hold). Meant for small
        chunks: large ones are cheaper one by one with `get_chunk`."""
        ...

    # sync

    async def commit(self, space: str, req: CommitRequest) -> CommitResponse:
        """Applies the operations all or nothing. `CommitConflict` when any is refused;
        a commit sent again with the same `commit_id` is answered, not re-applied."""
        ...

    async def changes(
        self, cursors: dict[str, int], wait: float = 0.0, limit: int = 1000
    ) -> ChangesResponse:
        """Journal entries after `cursors`; with `wait` > 0 the server holds the request
        up to `wait` seconds until something commits."""
        ...

    async def tree(
        self,
        space: str,
        at: int | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> TreeResponse:
        """One page of the space's tree, now or as of seq `at`; pass the answer's `next`
        as `after` for the following page."""
        ...

    async def versions(self, space: str, node: str) -> VersionList: ...

    async def version(self, space: str, node: str, seq: int) -> NodeState: ...

    async def trash(self, space: str) -> TrashList: ...

    async def aclose(self) -> None:
        """Releases connections. The backend is unusable afterwards."""
        ...
