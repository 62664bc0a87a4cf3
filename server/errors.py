"""Errors the server answers with.

    ApiError                 an answer for the caller: HTTP status + stable ErrorCode
     └ CommitRejected        409 conflict with one OpResult per operation
    StoreError               the metadata store failed (translated sqlite errors); a 5xx
    BlobStoreError           the blob store failed (translated OSError)
     └ StorageFull           no space left for blobs; 507

Only the dispatcher turns these into responses; anything else escaping a handler is a
bug, logged with its traceback and answered with a bare 500 `internal_error`.
"""

from __future__ import annotations

from loft.protocol import ErrorCode, OpResult


class ApiError(Exception):
    def __init__(self, status: int, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details: list[OpResult] | None = None
        self.headers: list[tuple[bytes, bytes]] = []


class CommitRejected(ApiError):
    def __init__(self, results: list[OpResult]) -> None:
        refused = [r for r in results if r.code != "ok"]
        super().__init__(
            409, ErrorCode.CONFLICT, f"{len(refused)} of {len(results)} operations refused"
        )
        self.details = results


class StoreError(Exception):
    """The metadata store failed for a reason that is not the caller's."""


class BlobStoreError(Exception):
    """The blob store failed for a reason that is not the caller's."""


class StorageFull(BlobStoreError):
    pass


def not_found(what: str = "not found") -> ApiError:
    return ApiError(404, ErrorCode.NOT_FOUND, what)


def forbidden(what: str) -> ApiError:
    return ApiError(403, ErrorCode.FORBIDDEN, what)


def unauthorized(what: str = "a valid device token is required") -> ApiError:
    return ApiError(401, ErrorCode.UNAUTHORIZED, what)


def invalid(what: str) -> ApiError:
    return ApiError(400, ErrorCode.INVALID, what)
