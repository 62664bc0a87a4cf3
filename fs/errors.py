"""The one table from domain errors to errnos, and the guard every handler runs in.

A pyfuse3 handler may raise only `FUSEError`: anything else ends the main loop and
leaves a dead mount. So `errnos()` turns domain errors into their errno (`from None`:
the kernel gets a number, the log gets nothing for expected failures), and any other
exception, which is a bug, into a logged traceback and EIO: loud in the log, but the
mount keeps serving everyone else.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pyfuse3

from cache.errors import (
    Corrupt,
    Exists,
    InvalidArgument,
    InvalidName,
    IsADirectory,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    Offline,
    ReadOnly,
    ReplicaError,
)
from cache.store import StoreFull
from fs.core import BadHandle, CrossSpace, NameTooLong, NoAttribute, NotSupported

log = logging.getLogger(__name__)

ERRNO: dict[type[Exception], int] = {
    NotFound: errno.ENOENT,
    Exists: errno.EEXIST,
    NotADirectory: errno.ENOTDIR,
    IsADirectory: errno.EISDIR,
    NotEmpty: errno.ENOTEMPTY,
    InvalidName: errno.EINVAL,
    NameTooLong: errno.ENAMETOOLONG,
    InvalidArgument: errno.EINVAL,
    ReadOnly: errno.EROFS,
    Offline: errno.EIO,
    Corrupt: errno.EIO,
    NoSpace: errno.ENOSPC,
    StoreFull: errno.ENOSPC,
    NotPermitted: errno.EPERM,
    NoAttribute: pyfuse3.ENOATTR,
    NotSupported: errno.EOPNOTSUPP,
    CrossSpace: errno.EXDEV,
    BadHandle: errno.EBADF,
}

#: errors worth a line in the log: the errno alone does not say why
_LOGGED = {
    Offline: logging.WARNING,
    Corrupt: logging.ERROR,
    NoSpace: logging.WARNING,
    StoreFull: logging.WARNING,
}


def errno_of(exc: BaseException) -> int | None:
    """The errno of a domain error (most specific class first), None for others."""
    for cls in type(exc).__mro__:
        code = ERRNO.get(cls)
        if code is not None:
            return code
    return None


@contextmanager
def errnos(operation: str) -> Iterator[None]:
    """Runs one handler: domain errors become FUSEError(errno), bugs become EIO."""
    try:
        yield
    except pyfuse3.FUSEError:
        raise
    except (ReplicaError, StoreFull) as exc:
        code = errno_of(exc)
        if code is None:
            log.exception("%s: unmapped error", operation)
            code = errno.EIO
        for cls, level in _LOGGED.items():
            if isinstance(exc, cls):
                log.log(level, "%s: %s", operation, exc)
                break
        raise pyfuse3.FUSEError(code) from None
    except Exception:
        log.exception("%s failed: a bug; the caller gets EIO", operation)
        raise pyfuse3.FUSEError(errno.EIO) from None
