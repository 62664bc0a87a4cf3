"""Record types of the local store, with their byte encodings.

Keys are built from raw ids: a space or node id is its 16 UUID bytes, a chunk id its 32
bytes; integers are big-endian so that keys sort numerically.
"""

from __future__ import annotations

import enum
import json
import struct
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from loft.protocol import ChunkRef

PAGE_SIZE = 128 * 1024
NO_FLOOR = 2**64 - 1


def raw(id_: str) -> bytes:
    """16 bytes of a UUID string (ValueError if it is none). Listings call this per
    entry, so the common form is parsed without building a UUID (5x faster)."""
    digits = id_.replace("-", "")
    if len(digits) == 32:
        try:
            out = bytes.fromhex(digits)
        except ValueError:
            out = b""
        if len(out) == 16:  # fromhex skips whitespace: " " in 32 characters is short
            return out
    return uuid.UUID(id_).bytes


def unraw(b: bytes) -> str:
    """The canonical UUID string of 16 bytes (str(uuid.UUID(bytes=b)), 5x faster)."""
    h = bytes(b).hex()
    if len(h) != 32:
        raise ValueError(f"not 16 bytes of a UUID: {len(h) // 2}")
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Kind(enum.IntEnum):
    FILE = 0
    DIR = 1
    SYMLINK = 2
    SPECIAL = 3


KIND_NAMES = {Kind.FILE: "file", Kind.DIR: "dir", Kind.SYMLINK: "symlink", Kind.SPECIAL: "special"}
KIND_OF_NAME = {v: k for k, v in KIND_NAMES.items()}
SPECIALS = ["", "fifo", "socket", "chr", "blk"]


class Flag(enum.IntFlag):
    NONE = 0
    #: The content differs from the base manifest: dirty pages and/or a truncation.
    DIRTY = 1
    #: Created on this device and not yet committed.
    LOCAL = 2
    #: Pages of the committed content may be kept as its cached copy (clean pages, see
    #: Txn.keep_pages): reads look for pages first. They may since have been evicted.
    PAGED = 4


_NODE = struct.Struct(">BQQIIIqqQBBQQ")
_LEN = struct.Struct(">I")
_MANIFEST_ITEM = struct.Struct(">32sI")


@dataclass(frozen=True)
class Node:
    """A node as this device sees it.

    `version` is the server version the local state derives from (0: never committed);
    the flusher names it as the base of the next commit. `size` is the current size,
    including unflushed writes. `gen` counts local content changes, so a flush can tell
    whether the file changed while it was uploading. Base content beyond `floor` reads
    as zeros (a truncation not yet committed).
    """

    space: str
    id: str
    kind: Kind
    version: int = 0
    size: int = 0
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    rdev: int = 0
    special: int = 0
    flags: Flag = Flag.NONE
    gen: int = 0
    floor: int = NO_FLOOR
    target: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)

    def encode(self) -> bytes:
        xattrs = json.dumps({k: v.hex() for k, v in self.xattrs.items()}).encode()
        target = self.target.encode()
        return b"".join(
            [
                _NODE.pack(
                    self.kind,
                    self.version,
                    self.size,
                    self.mode,
                    self.uid,
                    self.gid,
                    self.mtime_ns,
                    self.ctime_ns,
                    self.rdev,
                    self.special,
                    self.flags,
                    self.gen,
                    self.floor,
                ),
                _LEN.pack(len(target)),
                target,
                _LEN.pack(len(xattrs)),
                xattrs,
            ]
        )

    @classmethod
    def decode(cls, space: str, node: str, data: bytes) -> Node:
        fixed = _NODE.unpack_from(data, 0)
        pos = _NODE.size
        (n,) = _LEN.unpack_from(data, pos)
        target = bytes(data[pos + 4 : pos + 4 + n]).decode()
        pos += 4 + n
        (n,) = _LEN.unpack_from(data, pos)
        xattrs = (
            {k: bytes.fromhex(v) for k, v in json.loads(bytes(data[pos + 4 : pos + 4 + n])).items()}
            if n > len(b"{}")
            else {}
        )
        return cls(
            space,
            node,
            Kind(fixed[0]),
            fixed[1],
            fixed[2],
            fixed[3],
            fixed[4],
            fixed[5],
            fixed[6],
            fixed[7],
            fixed[8],
            fixed[9],
            Flag(fixed[10]),
            fixed[11],
            fixed[12],
            target,
            xattrs,
        )

    def but(self, **changes: Any) -> Node:
        return replace(self, **changes)

    @property
    def key(self) -> bytes:
        return raw(self.space) + raw(self.id)


def encode_manifest(chunks: list[ChunkRef]) -> bytes:
    return b"".join(_MANIFEST_ITEM.pack(bytes.fromhex(c), n) for c, n in chunks)


def decode_manifest(data: bytes | None) -> list[ChunkRef]:
    if not data:
        return []
    return [(c.hex(), n) for c, n in _MANIFEST_ITEM.iter_unpack(data)]


@dataclass(frozen=True)
class ChunkMeta:
    """Bookkeeping of one cached sealed chunk."""

    atime_ns: int
    size: int
    pins: int = 0

    _S = struct.Struct(">QII")

    def encode(self) -> bytes:
        return self._S.pack(self.atime_ns, self.size, self.pins)

    @classmethod
    def decode(cls, data: bytes) -> ChunkMeta:
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True)
class Pending:
    """One journaled local operation, waiting for the flusher.

    `op` is a protocol op name (mkdir, create, symlink, special, content, setattr, move,
    link, unlink, rmdir); `content` means "commit the node's current content". Bases are
    not stored: the flusher takes them from the node when it sends the op, so ops queued
    behind each other chain correctly.
    """

    op: str
    space: str
    node: str
    parent: str | None = None
    name: str | None = None
    new_parent: str | None = None
    new_name: str | None = None
    replace: str | None = None
    exchange: bool = False

    def encode(self) -> bytes:
        return json.dumps(
            {k: v for k, v in self.__dict__.items() if v not in (None, False)},
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Pending:
        return cls(**json.loads(bytes(data)))


def u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def from_u64(b: bytes) -> int:
    return int.from_bytes(b, "big")
