"""The seam to storage: a narrow contract implemented by the HTTP client of our server.

`base` holds the contract (`Backend`) and the error tree, `http` the httpx client of our
server, `wrappers` retries and concurrency limits and `stack()`, which builds the
standard stack. This package imports nothing of the client but `loft.protocol`.
"""

from backend.base import (
    Backend,
    BackendError,
    BadCredentials,
    BadRequest,
    BadResponse,
    ChunkMissing,
    CommitConflict,
    Conflict,
    Forbidden,
    NotFound,
    QuotaExceeded,
    Rejected,
    ServerFailure,
    TooLarge,
    Unauthorized,
    Unreachable,
    UserExists,
    is_transient,
)
from backend.http import HttpBackend
from backend.wrappers import LimitedBackend, RetryingBackend, Wrapper, layer, stack

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
    "HttpBackend",
    "LimitedBackend",
    "NotFound",
    "QuotaExceeded",
    "Rejected",
    "RetryingBackend",
    "ServerFailure",
    "TooLarge",
    "Unauthorized",
    "Unreachable",
    "UserExists",
    "Wrapper",
    "is_transient",
    "layer",
    "stack",
]
