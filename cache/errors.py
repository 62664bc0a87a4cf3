"""Domain errors of the replica. The mount turns each into one errno (fs/errors.py);
nothing here knows about errnos.

    ReplicaError
     ├ NotFound          no such entry or node
     ├ Exists            the name is taken
     ├ NotADirectory
     ├ IsADirectory
     ├ NotEmpty
     ├ InvalidName       not a legal entry name
     ├ InvalidArgument   e.g. renaming a folder into itself
     ├ ReadOnly          the space (or the mount) is read-only for this device
     ├ Offline           the server cannot be reached and the data is not local
     ├ Corrupt           a chunk failed verification (names the chunk)
     ├ NoSpace           the local store is full; nothing was written
     └ NotPermitted      e.g. a hard link to a directory
"""

from __future__ import annotations


class ReplicaError(Exception):
    pass


class NotFound(ReplicaError):
    pass


class Exists(ReplicaError):
    pass


class NotADirectory(ReplicaError):
    pass


class IsADirectory(ReplicaError):
    pass


class NotEmpty(ReplicaError):
    pass


class InvalidName(ReplicaError):
    pass


class InvalidArgument(ReplicaError):
    pass


class ReadOnly(ReplicaError):
    pass


class Offline(ReplicaError):
    pass


class Corrupt(ReplicaError):
    pass


class NoSpace(ReplicaError):
    pass


class NotPermitted(ReplicaError):
    """e.g. a hard link to a directory."""
