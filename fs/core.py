"""The POSIX core of the mount, free of any kernel interface: inode numbers, lookup
counts, open handles, attributes, directory listings and extended attributes over the
replica. fs/operations.py adapts it to pyfuse3; tests may drive it directly.

Inode numbers. Inode 1 is the home space's root. Every other node gets a number derived
from a hash of (space, node id), so a file keeps its number for the mount's
lifetime and across remounts; on the (2^-63-unlikely) collision with a number the
kernel already knows, the next free number is taken. The core keeps the number of a
node only while the kernel knows it (lookup count > 0).

Lifetimes. A node the kernel knows, or that has an open handle, is held in the
replica (`Replica.hold`), so an unlinked or renamed-over file keeps reading until the
kernel forgets it (the DESIGN's "keep the node until the lookup count reaches zero").

Names. The kernel hands over bytes; names are UTF-8 and normalized to NFC (the
protocol's form), so a name typed in NFD finds and creates the NFC entry. A name
longer than 255 bytes is NameTooLong (ENAMETOOLONG).

Locks. flock and POSIX record locks are not implemented here: pyfuse3 offers no lock
handlers, so the FUSE kernel module keeps them itself, local to this device.

Exceptions raised here, besides the replica's (cache/errors.py):

    ReplicaError
     ├ InvalidName
     │  └ NameTooLong    a name over 255 bytes
     ├ NoAttribute       no such extended attribute
     ├ NotSupported      an xattr namespace other than user.*
     ├ CrossSpace        a rename or link between two spaces (EXDEV: mv copies)
     └ BadHandle         a file handle the core did not hand out
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import unicodedata
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from cache.errors import (
    InvalidArgument,
    InvalidName,
    IsADirectory,
    NotADirectory,
    NotFound,
    NotPermitted,
    ReplicaError,
)
from cache.records import PAGE_SIZE, SPECIALS, Flag, Kind, Node
from cache.replica import Invalidation, Replica
from loft.protocol import ROOT_NODE

log = logging.getLogger(__name__)

ROOT_INODE = 1
MAX_NAME = 255
#: What statfs reports as the drive's size: the server offers no quota query yet, so
#: the drive looks 1 PiB large, and free space is what the local disk can still take
#: (every write lands in the local store before it is uploaded).
DRIVE_BYTES = 1 << 50
STATFS_BLOCK = 4096
STATFS_FILES = 1 << 32
#: entries of all the listings Core keeps for re-listing unchanged directories (about
#: 0.7 KB each)
LISTING_CACHE_ENTRIES = 20_000

VIRTUAL_XATTRS = ("user.loft.state", "user.loft.cached_bytes")
CONFLICT_MARK = " (conflicted copy "

_SPECIAL_MODE = {
    "fifo": stat.S_IFIFO,
    "socket": stat.S_IFSOCK,
    "chr": stat.S_IFCHR,
    "blk": stat.S_IFBLK,
}
_SPECIAL_OF_MODE = {v: k for k, v in _SPECIAL_MODE.items()}

Key = tuple[str, str]


class NameTooLong(InvalidName):
    pass


class NoAttribute(ReplicaError):
    pass


class NotSupported(ReplicaError):
    pass


class BadHandle(ReplicaError):
    pass


class CrossSpace(ReplicaError):
    pass


@dataclass(frozen=True)
class Attrs:
    """What stat(2) says about a node."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass(frozen=True)
class FsStats:
    bsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    namemax: int


@dataclass
class FileHandle:
    ino: int
    key: Key
    append: bool
    written: bool = False


#: One directory entry as readdir hands it out: name, node, inode number, and the
#: attributes as `present_entry` made them. A tuple of objects the garbage collector
#: does not track (pyfuse3's EntryAttributes included), so that after one pass it
#: stops tracking the tuple too.
_Entry = tuple[bytes, Key, int, Any]


@dataclass
class _Listing:
    """A directory's entries as of one snapshot of the store."""

    #: Store.tree_version read before the snapshot
    version: int
    entries: list[_Entry]


@dataclass
class DirHandle:
    ino: int
    key: Key
    #: the listing, taken when reading starts at offset 0; offsets index into it, so
    #: a listing never skips or repeats an entry while the directory changes
    listing: list[_Entry] | None = None


@dataclass
class _Known:
    """What the kernel knows about one inode."""

    key: Key
    lookups: int = 0
    #: (parent inode, name) of the entries the kernel resolved to this inode
    names: set[tuple[int, bytes]] = field(default_factory=set)


def _cost(listing: _Listing) -> int:
    """What a kept listing counts against LISTING_CACHE_ENTRIES: an empty one too."""
    return len(listing.entries) + 1


def _hash_ino(key: Key) -> int:
    digest = hashlib.blake2b(f"{key[0]}/{key[1]}".encode(), digest_size=8).digest()
    return max(int.from_bytes(digest, "big") >> 1, ROOT_INODE + 1)


def _name(raw: bytes) -> str:
    if len(raw) > MAX_NAME:
        raise NameTooLong(f"name longer than {MAX_NAME} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidName("name is not UTF-8") from None
    name = unicodedata.normalize("NFC", text)
    if len(name.encode()) > MAX_NAME:
        raise NameTooLong(f"name longer than {MAX_NAME} bytes")
    return name


class Core:
    def __init__(self, replica: Replica, data_dir: Path | None = None) -> None:
        """`data_dir` is where the local store lives (statfs reports its free space)."""
        self.replica = replica
        self.data_dir = data_dir
        #: what readdir hands out for an entry's Attrs (see present_entries_as)
        self.present_entry: Callable[[Attrs], Any] = lambda attrs: attrs
        #: listings of directories, kept while nothing in the tree changes (Store.
        #: tree_version), least recently listed first; `ls` of an unchanged directory
        #: costs no store reads and no attribute building
        self._listings: OrderedDict[Key, _Listing] = OrderedDict()
        #: what the kept listings count against LISTING_CACHE_ENTRIES (see _cost)
        self._listed = 0
        self.root: Key = (replica.home, ROOT_NODE)
        self._known: dict[int, _Known] = {ROOT_INODE: _Known(self.root, lookups=1)}
        self._inos: dict[Key, int] = {self.root: ROOT_INODE}
        self._files: dict[int, FileHandle] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._next_fh = 1
        self._open_count: Counter[int] = Counter()
        #: (version, gen) of a file when it was last opened: equal at the next open means
        #: the kernel's pages are still right (keep_cache)
        self._opened_as: dict[int, tuple[int, int]] = {}
        #: the version of each file in the last attributes given to the kernel
        self._told: dict[int, int] = {}
        #: files a remote change replaced since the kernel last heard of them: the
        #: version it heard of (see `remote_change` and `read`)
        self._before: dict[int, int] = {}
        self._append_locks: dict[Key, trio.Lock] = {}

    # ------------------------------------------------------------------ inodes

    def key_of(self, ino: int) -> Key:
        known = self._known.get(ino)
        if known is None:
            raise NotFound(f"inode {ino} is not known")
        return known.key

    def _ino_for(self, key: Key) -> int:
        """The inode number of a node, without registering it."""
        ino = self._inos.get(key)
        if ino is not None:
            return ino
        ino = _hash_ino(key)
        while ino in self._known:
            ino += 1
        return ino

    def _remember(self, node: Node, parent_ino: int, name: bytes) -> Attrs:
        """Counts one kernel lookup of `node` (reached as `name` in `parent_ino`)."""
        return self._attrs(self._count_lookup((node.space, node.id), parent_ino, name), node)

    def _count_lookup(
        self, key: Key, parent_ino: int, name: bytes, ino: int | None = None
    ) -> int:
        """_remember without the attributes; returns the inode (`ino`, a free number
        or the node's own, if the caller already chose it)."""
        if ino is None:
            ino = self._ino_for(key)
        known = self._known.get(ino)
        if known is None:
            known = self._known[ino] = _Known(key)
            self._inos[key] = ino
            self.replica.hold(*key)
        known.lookups += 1
        known.names.add((parent_ino, name))
        return ino

    def forget(self, items: list[tuple[int, int]]) -> None:
        for ino, count in items:
            known = self._known.get(ino)
            if known is None or ino == ROOT_INODE:
                continue
            known.lookups -= count
            if known.lookups <= 0:
                del self._known[ino]
                del self._inos[known.key]
                self._opened_as.pop(ino, None)
                self._told.pop(ino, None)
                self._before.pop(ino, None)
                self.replica.release(*known.key)

    def known_spaces(self) -> set[str]:
        return {k.key[0] for k in self._known.values()}

    def known_inodes(self, space: str) -> list[int]:
        return [ino for ino, k in self._known.items() if k.key[0] == space]

    def remote_change(self, inv: Invalidation) -> None:
        """A `Replica.listeners` entry, called as a remote change is applied, before the
        kernel hears of it: notes the version the kernel knows of each file it names."""
        for ino in self.kernel_targets(inv)[0]:
            told = self._told.get(ino)
            if told is not None:
                self._before.setdefault(ino, told)

    def kernel_targets(self, inv: Invalidation) -> tuple[list[int], list[tuple[int, bytes]]]:
        """The inodes and (parent inode, name) entries the kernel may cache for an
        invalidation from the replica; a node id "*" stands for a whole space."""
        nodes, entries = inv
        inos: list[int] = []
        names: set[tuple[int, bytes]] = set()
        for space, node_id in nodes:
            if node_id == "*":
                for ino in self.known_inodes(space):
                    inos.append(ino)
                    names |= self._known[ino].names
            else:
                ino = self._inos.get((space, node_id))
                if ino is not None:
                    inos.append(ino)
        for space, parent, name in entries:
            parent_ino = self._inos.get((space, parent))
            if parent_ino is not None:
                names.add((parent_ino, name.encode()))
        return inos, sorted(names)

    # ------------------------------------------------------------------ attributes

    def _attrs(self, ino: int, node: Node, nlink: int | None = None) -> Attrs:
        if node.kind == Kind.DIR:
            kind_bits = stat.S_IFDIR
        elif node.kind == Kind.SYMLINK:
            kind_bits = stat.S_IFLNK
        elif node.kind == Kind.SPECIAL:
            kind_bits = _SPECIAL_MODE.get(SPECIALS[node.special], stat.S_IFREG)
        else:
            kind_bits = stat.S_IFREG
        size = len(node.target.encode()) if node.kind == Kind.SYMLINK else node.size
        if node.kind == Kind.FILE:
            self._told[ino] = node.version
            self._before.pop(ino, None)
        return Attrs(
            ino=ino,
            mode=kind_bits | (node.mode & 0o7777),
            nlink=self.replica.nlink(node) if nlink is None else nlink,
            uid=node.uid,
            gid=node.gid,
            rdev=node.rdev,
            size=size,
            blocks=(size + 511) // 512,
            blksize=PAGE_SIZE,
            atime_ns=node.mtime_ns,
            mtime_ns=node.mtime_ns,
            ctime_ns=node.ctime_ns,
        )

    def _node(self, ino: int) -> Node:
        return self.replica.node(*self.key_of(ino))

    def lookup(self, parent_ino: int, name: bytes) -> Attrs:
        space, parent = self.key_of(parent_ino)
        node = self.replica.lookup(space, parent, _name(name))
        return self._remember(node, parent_ino, name)

    def getattr(self, ino: int) -> Attrs:
        return self._attrs(ino, self._node(ino))

    async def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        mtime_ns: int | None = None,
        fh: int | None = None,
    ) -> Attrs:
        """Changes what is given; atime is not kept (it reads as mtime)."""
        space, node_id = self.key_of(ino)
        node = None
        if size is not None:
            node = await self.replica.truncate(space, node_id, size)
            handle = self._files.get(fh) if fh is not None else None
            if handle is not None:
                handle.written = True
        if mode is not None or uid is not None or gid is not None or mtime_ns is not None:
            node = self.replica.setattr(
                space, node_id, mode=mode, uid=uid, gid=gid, mtime_ns=mtime_ns
            )
        return self._attrs(ino, node or self.replica.node(space, node_id))

    def readlink(self, ino: int) -> bytes:
        node = self._node(ino)
        if node.kind != Kind.SYMLINK:
            raise InvalidArgument("not a symbolic link")
        return node.target.encode()

    def statfs(self) -> FsStats:
        local_free = DRIVE_BYTES
        if self.data_dir is not None:
            try:
                disk = os.statvfs(self.data_dir)
                local_free = disk.f_bavail * disk.f_frsize
            except OSError:
                pass
        free = min(DRIVE_BYTES, local_free) // STATFS_BLOCK
        return FsStats(
            bsize=STATFS_BLOCK,
            blocks=DRIVE_BYTES // STATFS_BLOCK,
            bfree=DRIVE_BYTES // STATFS_BLOCK,  # usage is not known locally
            bavail=free,
            files=STATFS_FILES,
            ffree=STATFS_FILES - len(self._known),
            namemax=MAX_NAME,
        )

    # ------------------------------------------------------------------ namespace

    def mkdir(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Attrs:
        space, parent = self.key_of(parent_ino)
        node = self.replica.mkdir(space, parent, _name(name), mode & 0o7777, uid, gid)
        return self._remember(node, parent_ino, name)

    def symlink(self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int) -> Attrs:
        space, parent = self.key_of(parent_ino)
        try:
            text = target.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument("a symlink target must be UTF-8") from None
        node = self.replica.symlink(space, parent, _name(name), text, uid, gid)
        return self._remember(node, parent_ino, name)

    def mknod(
        self, parent_ino: int, name: bytes, mode: int, rdev: int, uid: int, gid: int
    ) -> Attrs:
        space, parent = self.key_of(parent_ino)
        fmt = stat.S_IFMT(mode)
        if fmt in (stat.S_IFREG, 0):
            node = self.replica.create(space, parent, _name(name), mode & 0o7777, uid, gid)
        elif fmt in _SPECIAL_OF_MODE:
            special = _SPECIAL_OF_MODE[fmt]
            node = self.replica.mknod(
                space,
                parent,
                _name(name),
                special,
                mode & 0o7777,
                rdev if special in ("chr", "blk") else 0,
                uid,
                gid,
            )
        else:
            raise InvalidArgument(f"cannot make a node of type {fmt:o}")
        return self._remember(node, parent_ino, name)

    def link(self, ino: int, parent_ino: int, name: bytes) -> Attrs:
        space, node_id = self.key_of(ino)
        new_space, parent = self.key_of(parent_ino)
        if new_space != space:
            raise CrossSpace("hard links cannot cross spaces")
        node = self.replica.link(space, node_id, parent, _name(name))
        return self._remember(node, parent_ino, name)

    def unlink(self, parent_ino: int, name: bytes) -> None:
        space, parent = self.key_of(parent_ino)
        self.replica.unlink(space, parent, _name(name))

    def rmdir(self, parent_ino: int, name: bytes) -> None:
        space, parent = self.key_of(parent_ino)
        self.replica.rmdir(space, parent, _name(name))

    def rename(
        self,
        parent_ino: int,
        name: bytes,
        new_parent_ino: int,
        new_name: bytes,
        *,
        noreplace: bool = False,
        exchange: bool = False,
    ) -> None:
        space, parent = self.key_of(parent_ino)
        new_space, new_parent = self.key_of(new_parent_ino)
        if new_space != space:
            raise CrossSpace("cannot move between spaces")
        if noreplace and exchange:
            raise InvalidArgument("RENAME_NOREPLACE and RENAME_EXCHANGE exclude each other")
        self.replica.rename(
            space,
            parent,
            _name(name),
            new_parent,
            _name(new_name),
            noreplace=noreplace,
            exchange=exchange,
        )

    # ------------------------------------------------------------------ directories

    def opendir(self, ino: int) -> int:
        key = self.key_of(ino)
        if self.replica.node(*key).kind != Kind.DIR:
            raise NotADirectory(key[1])
        fh = self._new_fh()
        self._dirs[fh] = DirHandle(ino, key)
        return fh

    def present_entries_as(self, present: Callable[[Attrs], Any]) -> None:
        """Makes readdir hand out `present(attrs)` instead of Attrs: the kernel
        adapter's form, made once per entry and kept with the listing."""
        self.present_entry = present
        self._listings.clear()
        self._listed = 0

    def readdir(self, fh: int, start: int, reply: Callable[[bytes, Any, int], bool]) -> None:
        """Calls `reply(name, attrs, next offset)` for the entries from offset `start`
        ("." and ".." first) until it returns False; each accepted entry other than
        the dots counts as a kernel lookup. The attrs are as present_entries_as says."""
        handle = self._dirs.get(fh)
        if handle is None:
            raise BadHandle(f"no directory handle {fh}")
        if start == 0 or handle.listing is None:
            handle.listing = self._listing(handle.key)
        present = self.present_entry
        if start == 0:
            here = self.replica.node(*handle.key)
            if not reply(b".", present(self._attrs(handle.ino, here)), 1):
                return
            start = 1
        if start == 1:
            if not reply(b"..", present(self._parent_attrs(handle)), 2):
                return
            start = 2
        inos, known = self._inos, self._known
        listing = handle.listing
        for index in range(start - 2, len(listing)):
            name, key, listed_ino, presented = listing[index]
            ino = inos.get(key)
            if ino is None:
                # not known now: the listed number serves unless another node took it
                ino = listed_ino if listed_ino not in known else self._ino_for(key)
            if ino != listed_ino:
                try:
                    presented = present(self._attrs(ino, self.replica.node(*key)))
                except NotFound:
                    continue  # gone since: a listing may or may not show it
            if not reply(name, presented, index + 3):
                return
            self._count_lookup(key, handle.ino, name, ino)

    def _listing(self, key: Key) -> list[_Entry]:
        """The directory's entries, from the kept listing while the tree is unchanged."""
        version = self.replica.store.tree_version  # before the snapshot
        kept = self._listings.get(key)
        if kept is not None and kept.version == version:
            self._listings.move_to_end(key)
            return kept.entries
        entries = []
        for name, node, nlink in self.replica.readdir(*key):
            child = (node.space, node.id)
            attrs = self._attrs(self._ino_for(child), node, nlink)
            entries.append((name.encode(), child, attrs.ino, self.present_entry(attrs)))
        if kept is not None:
            self._listed -= _cost(self._listings.pop(key))
        listing = _Listing(version, entries)
        if _cost(listing) <= LISTING_CACHE_ENTRIES:
            self._listings[key] = listing
            self._listed += _cost(listing)
            while self._listed > LISTING_CACHE_ENTRIES:
                _, dropped = self._listings.popitem(last=False)
                self._listed -= _cost(dropped)
        return entries

    def _parent_attrs(self, handle: DirHandle) -> Attrs:
        """Attributes for "..": the parent the kernel reached the directory through
        (it always knows it), the directory itself at the root."""
        known = self._known.get(handle.ino)
        parents = sorted(p for p, _ in known.names) if known else []
        for parent_ino in parents:
            if parent_ino in self._known:
                return self.getattr(parent_ino)
        return self._attrs(handle.ino, self.replica.node(*handle.key))

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # ------------------------------------------------------------------ files

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _handle(self, fh: int) -> FileHandle:
        handle = self._files.get(fh)
        if handle is None:
            raise BadHandle(f"no file handle {fh}")
        return handle

    def _open_handle(self, ino: int, node: Node, flags: int) -> int:
        key = (node.space, node.id)
        fh = self._new_fh()
        self._files[fh] = FileHandle(ino, key, append=bool(flags & os.O_APPEND))
        self._open_count[ino] += 1
        self.replica.hold(*key)
        return fh

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Opens a file; returns the handle and whether the kernel's cached pages of
        it are still valid (nothing changed it since it was last opened)."""
        space, node_id = self.key_of(ino)
        node = self.replica.node(space, node_id)
        if node.kind == Kind.DIR:
            raise IsADirectory(node_id)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if flags & os.O_TRUNC and writable and node.kind == Kind.FILE and node.size:
            node = await self.replica.truncate(space, node_id, 0)
        fh = self._open_handle(ino, node, flags)
        seen = (node.version, node.gen)
        keep_cache = self._opened_as.get(ino) == seen
        self._opened_as[ino] = seen
        return fh, keep_cache

    def create(
        self, parent_ino: int, name: bytes, mode: int, flags: int, uid: int, gid: int
    ) -> tuple[int, Attrs]:
        space, parent = self.key_of(parent_ino)
        node = self.replica.create(space, parent, _name(name), mode & 0o7777, uid, gid)
        attrs = self._remember(node, parent_ino, name)
        fh = self._open_handle(attrs.ino, node, flags)
        self._opened_as[attrs.ino] = (node.version, node.gen)
        return fh, attrs

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        handle = self._handle(fh)
        told = self._before.get(handle.ino)
        if told is not None:
            # A remote change cut the file short after the kernel last heard of it, and
            # the kernel reads within the size it knows. A short answer would make it
            # fill the rest of its pages with zeros and keep them as the file's until
            # its invalidation lands: answer as of the version it knows, while that
            # version's layout is kept.
            node = self.replica.node(*handle.key)
            old = self.replica.content.retired(*handle.key, told)
            if (old is not None and not node.flags & Flag.DIRTY
                    and node.size < min(offset + size, old.size)):
                # from its chunks: pages on this device hold the current version only
                old = old.but(flags=old.flags & ~Flag.PAGED)
                return await self.replica.content.read(old, offset, size)
        return await self.replica.read(*handle.key, offset, size)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        """Writes all of `data`; an O_APPEND handle writes at the current end."""
        handle = self._handle(fh)
        handle.written = True
        if not handle.append:
            return await self.replica.write(*handle.key, offset, data)
        lock = self._append_locks.setdefault(handle.key, trio.Lock())
        async with lock:
            end = self.replica.node(*handle.key).size
            return await self.replica.write(*handle.key, end, data)

    def flush(self, fh: int) -> None:
        """A close(2) of one of the handle's descriptors; the last one ends in release."""
        handle = self._handle(fh)
        if handle.written:
            self.replica.flushed(*handle.key)

    def fsync(self, fh: int) -> None:
        self.replica.fsync(*self._handle(fh).key)

    def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is None:
            return
        if handle.written:
            self.replica.close_written(*handle.key)
        self._open_count[handle.ino] -= 1
        if self._open_count[handle.ino] <= 0:
            del self._open_count[handle.ino]
            self._append_locks.pop(handle.key, None)
        self.replica.release(*handle.key)

    # ------------------------------------------------------------------ xattrs

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if not name.startswith(b"user."):
            # Only user.* is stored. EOPNOTSUPP (not ENODATA) tells `ls -l` that the
            # whole device lacks security.selinux and ACLs: it asks once per listing,
            # not twice per file (one kernel round trip each).
            raise NotSupported(name.decode("utf-8", "surrogateescape"))
        node = self._node(ino)
        key = name.decode("utf-8", "surrogateescape")
        if key == "user.loft.state":
            return self._state(node).encode()
        if key == "user.loft.cached_bytes":
            return str(self._cached_bytes(node)).encode()
        value = node.xattrs.get(key)
        if value is None:
            raise NoAttribute(key)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        node = self._node(ino)
        names = [k.encode("utf-8", "surrogateescape") for k in node.xattrs]
        return names + [v.encode() for v in VIRTUAL_XATTRS]

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        space, node_id = self.key_of(ino)
        self.replica.set_xattr(space, node_id, self._xattr_name(name), value)

    def removexattr(self, ino: int, name: bytes) -> None:
        node = self._node(ino)
        key = self._xattr_name(name)
        if key not in node.xattrs:
            raise NoAttribute(key)
        self.replica.set_xattr(node.space, node.id, key, None)

    @staticmethod
    def _xattr_name(name: bytes) -> str:
        key = name.decode("utf-8", "surrogateescape")
        if key.startswith("user.loft."):
            raise NotPermitted(f"{key} is maintained by Loft")
        if not key.startswith("user."):
            raise NotSupported(f"only user.* attributes are stored, not {key}")
        return key

    def _cached_bytes(self, node: Node) -> int:
        if node.kind != Kind.FILE:
            return node.size
        return self.replica.cached_bytes(node)

    def _state(self, node: Node) -> str:
        """cached | partial | online-only | pending | conflict."""
        if self.replica.has_pending(node.space, node.id) or node.flags & Flag.DIRTY:
            return "pending"
        path = self.replica.path_of(node.space, node.id) or ""
        if CONFLICT_MARK in path.rsplit("/", 1)[-1]:
            return "conflict"
        if node.kind != Kind.FILE or node.size == 0:
            return "cached"
        held = self.replica.cached_bytes(node)
        if held >= node.size:
            return "cached"
        return "partial" if held else "online-only"
