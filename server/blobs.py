"""The blob store: sealed chunks by (space, id). The server cannot open them.

`DirectoryBlobStore` keeps one file per blob under `root/<space>/<id[:2]>/<id>`. A put
writes a temporary file, fsyncs it, renames it into place and fsyncs the folder, so a
blob is either wholly there or absent after a crash. OSError is translated to
BlobStoreError here (ENOSPC → StorageFull) and nowhere else. All methods block: call
them from a worker thread.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path
from typing import Protocol

from server.errors import BlobStoreError, StorageFull


class BlobStore(Protocol):
    def put(self, space: str, chunk_id: str, data: bytes | memoryview) -> None: ...
    def get(self, space: str, chunk_id: str) -> bytes | None: ...
    def delete(self, space: str, chunk_id: str) -> None: ...


def _translate(exc: OSError, what: str) -> BlobStoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"blob store full while {what}")
    return BlobStoreError(f"blob store: {what}: {exc}")


class DirectoryBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()

    def _path(self, space: str, chunk_id: str) -> Path:
        return self.root / space / chunk_id[:2] / chunk_id

    def put(self, space: str, chunk_id: str, data: bytes | memoryview) -> None:
        path = self._path(space, chunk_id)
        if path.exists():
            return  # same id, same content: blobs are immutable
        folder = path.parent
        tmp = folder / f".{chunk_id}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            if folder not in self._known_dirs:
                folder.mkdir(parents=True, exist_ok=True)
                self._known_dirs.add(folder)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise _translate(exc, f"writing {chunk_id}") from exc

    def get(self, space: str, chunk_id: str) -> bytes | None:
        try:
            with open(self._path(space, chunk_id), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _translate(exc, f"reading {chunk_id}") from exc

    def delete(self, space: str, chunk_id: str) -> None:
        try:
            self._path(space, chunk_id).unlink(missing_ok=True)
        except OSError as exc:
            raise _translate(exc, f"deleting {chunk_id}") from exc
