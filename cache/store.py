"""The local store: one LMDB environment holding everything a device knows.

Named databases (keys: S = 16-byte space id, N/P = 16-byte node ids, C = 32-byte chunk
id, integers big-endian):

    meta       str key -> bytes      cursors ("cursor:" + space id -> u64), the cache byte
                                     count ("cache_bytes"), the journal counter, settings
    spaces     S -> JSON             the spaces this device syncs (SpaceInfo + local fields)
    nodes      S N -> Node           the metadata mirror, with local changes applied
    manifests  S N -> manifest       the node's base content: (C, u32 length)* as committed
    children   S P name -> N         directory entries (name is UTF-8)
    links      S N P name -> ''      the same entries keyed by node: hard links, paths
    pages      S N u64 -> sealed     a file's pages (PAGE_SIZE bytes of its content each,
                                     or up to the file's end for the page holding it;
                                     sealed under the device key: no plaintext on disk):
                                     dirty ones, written since the last commit, and clean
                                     ones, a saved file's pages kept as its cached copy.
                                     A sealed page of SPOOL_FROM bytes or more lives in
                                     the page spool (cache/spool.py), its value a record
                                     of its slot
    pagekeys   S N u64 -> state      the keys of `pages` ('' dirty, CLEAN clean), to list
                                     and delete them without a cursor over the pages
                                     themselves (the binding faults in every value a
                                     cursor passes, 1 GiB for a 1 GiB file)
    journal    u64 -> Pending        local operations not yet committed, in order
    chunks     S C -> sealed blob    the chunk cache (blobs as the server stores them)
    chunkmeta  S C -> ChunkMeta      access time, size, pin count of each cached chunk;
               S N -> ChunkMeta      the same for a file's clean pages, as one entry
    lru        u64 atime S C -> ''   cached chunks (and S N: clean pages) in access order,
                                     for eviction
    pins       S N -> ''             nodes pinned for offline use
    freeslots  u64 txn u64 slot -> '' the spool's free slots, by the transaction that
                                     freed them (see Txn._alloc_slot); "spool_slots" in
                                     meta counts the slots ever used
    applied    S u64 -> ''           seqs of this device's commits, already applied here by
                                     the flusher: the reconciler skips them in the feed

Every mutation is one write transaction, so a crash leaves the old or the new state.
Transactions are short and synchronous; never hold one across an `await`. This module
is the only one that imports lmdb; lmdb errors become StoreError (MapFull → StoreFull).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import math
import mmap
import os
import time
from collections.abc import Container, Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb

from cache.records import (
    PAGE_SIZE,
    ChunkMeta,
    Flag,
    Node,
    Pending,
    decode_manifest,
    from_u64,
    raw,
    u64,
    unraw,
)
from cache.spool import (
    RUN_SLOTS,
    SPOOL_FROM,
    TAG_BYTES,
    Spool,
    decode_record,
    encode_record,
)

log = logging.getLogger(__name__)

MAP_SIZE = 1 << 40  # sparse: only what is used takes disk
#: `pagekeys` value of a clean page (see Txn.keep_pages); a dirty page's is empty
CLEAN = b"c"
DBS = (
    "meta",
    "spaces",
    "nodes",
    "manifests",
    "children",
    "links",
    "pages",
    "pagekeys",
    "journal",
    "chunks",
    "chunkmeta",
    "lru",
    "pins",
    "applied",
    "freeslots",
)


#: bytes read through the map between two releases of its pages (see MapPages)
RELEASE_EVERY = 32 * 1024 * 1024
#: file-backed resident bytes over the floor past which `keep_under` releases the map,
#: whatever the byte counts say
MAP_BUDGET = 32 * 1024 * 1024
_MADV_DONTNEED = 4
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _resident_file_bytes() -> int | None:
    """File-backed (and shared) resident bytes of this process; None off Linux."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[2]) * PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


class MapPages:
    """Keeps LMDB's map from swelling this process's resident memory.

    Every value read is copied out of a read-only shared file mapping (deleting a large
    value touches it too), and each page touched that way stays mapped into the process
    (and counted in its RSS) until the kernel needs the memory back; streaming a 1 GiB
    file through the store would show as a 1 GiB process. Once RELEASE_EVERY bytes
    were touched, the map's pages are dropped from this process with
    madvise(MADV_DONTNEED). For a shared file mapping that loses nothing: the data stays
    in the page cache, and the next access maps it again. Without a map to find (not
    Linux), this does nothing."""

    def __init__(self, data_file: Path) -> None:
        self.span: tuple[int, int] | None = None
        self.pending = 0
        #: file-backed resident bytes after the last release (see keep_under)
        self.floor: int | None = None
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    if line.rstrip().endswith(str(data_file)):
                        lo, _, hi = line.split()[0].partition("-")
                        self.span = (int(lo, 16), int(hi, 16) - int(lo, 16))
                        break
            self._madvise = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError, ValueError):
            self.span = None

    def touched(self, nbytes: int) -> None:
        """Notes `nbytes` of values touched through the map."""
        self.pending += nbytes
        if self.pending >= RELEASE_EVERY:
            self.release()

    def keep_under(self, budget: int = MAP_BUDGET) -> bool:
        """Releases the map once this process holds `budget` bytes more file pages
        (/proc/self/statm) than right after the last release: the counts passed to
        `touched` miss the B-tree pages that cursors walk, which add up over hours of
        listings, lookups and deletions. The floor (the program's own files, mostly)
        is measured, so a large one does not make every call release. True if it
        released."""
        shared = _resident_file_bytes()
        if shared is None:
            return False
        if self.floor is None:
            self.floor = shared
        if shared - self.floor <= budget:
            self.floor = min(self.floor, shared)
            return False
        self.release()
        self.floor = _resident_file_bytes() or 0
        return True

    def release(self) -> None:
        self.pending = 0
        if self.span is not None:
            addr, length = self.span
            self._madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), _MADV_DONTNEED)


#: set in stores whose chunk cache has held only blobs checked against their ids (see
#: ChunkSource._open_cached): new stores, and old ones once their cache was empty.
#: Older versions' `loft pin` cached server blobs unchecked.
CHUNKS_CHECKED = "chunks_checked"


class StoreError(Exception):
    """The local store failed."""


class StoreFull(StoreError):
    """The disk (or the map) is full: the write did not happen."""


class Store:
    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.env = lmdb.open(
                str(path),
                map_size=MAP_SIZE,
                max_dbs=len(DBS) + 2,
                readonly=readonly,
                metasync=False,
                sync=True,
                max_readers=256,
                create=not readonly,
            )
            if readonly:
                # handles opened inside a read transaction die with it: open them bare;
                # a store written before a database existed lacks it until the mount
                # opens it (freeslots): a read-only process never needs it
                self.dbs = {}
                for name in DBS:
                    try:
                        self.dbs[name] = self.env.open_db(name.encode(), create=False)
                    except lmdb.NotFoundError:
                        if name != "freeslots":
                            raise
            else:
                with self.env.begin(write=True) as txn:
                    self.dbs = {name: self.env.open_db(name.encode(), txn=txn)
                                for name in DBS}
                    t = Txn(txn, self.dbs)
                    if not txn.stat(self.dbs["pagekeys"])["entries"]:
                        t.index_pages()
                    empty = not txn.stat(self.dbs["chunks"])["entries"]
                    if empty and t.meta(CHUNKS_CHECKED) is None:
                        t.set_meta(CHUNKS_CHECKED, b"1")
            with self.env.begin(write=False) as txn:
                self.chunks_checked = Txn(txn, self.dbs).meta(CHUNKS_CHECKED) is not None
        except lmdb.Error as exc:
            raise StoreError(f"cannot open the local store at {path}: {exc}") from exc
        self.mapped = MapPages(Path(os.path.realpath(path / "data.mdb")))
        spool = path / "pages.spool"
        self.spool = Spool(spool, readonly=readonly) if spool.exists() or not readonly else None
        self.readers = Readers()
        self._tree_versions = itertools.count(1)
        #: changes with every committed write transaction that changed a node or an
        #: entry (read it before a snapshot: what the snapshot shows is at least that
        #: new); caches of listings and attributes compare it
        self.tree_version = 0

    def close(self) -> None:
        self.env.close()
        if self.spool is not None:
            self.spool.close()

    @contextmanager
    def read(self, *, views: bool = False) -> Iterator[Txn]:
        """A read transaction. With `views`, values come as memoryviews into the map,
        valid only until the transaction ends: for the `*_view` methods, which skip a
        copy (see `chunk_view`)."""
        try:
            token = self.readers.hold()
            try:
                with self.env.begin(write=False, buffers=views) as txn:
                    self.readers.at(token, txn.id())
                    yield Txn(txn, self.dbs, self.mapped, self.spool, self.readers)
            finally:
                self.readers.release(token)
        except lmdb.Error as exc:
            raise StoreError(f"local store: {exc}") from exc

    @contextmanager
    def write(self) -> Iterator[Txn]:
        try:
            with self.env.begin(write=True) as txn:
                t = Txn(txn, self.dbs, self.mapped, self.spool, self.readers)
                yield t
                t.write_spool()
                if t.spooled:
                    self.spool.sync()  # the slots before the records that name them
            if t.tree_changed:
                self.tree_version = next(self._tree_versions)  # atomic across threads
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"no space left for the page spool: {exc}") from exc
            raise
        except lmdb.MapFullError as exc:
            raise StoreFull("the local store is full") from exc
        except lmdb.DiskError as exc:
            raise StoreFull(f"local store: {exc}") from exc
        except lmdb.Error as exc:
            if "No space left" in str(exc):
                raise StoreFull("no space left for the local store") from exc
            raise StoreError(f"local store: {exc}") from exc

    def size_on_disk(self) -> int:
        info = self.env.info()
        return info["last_pgno"] * self.env.stat()["psize"]


class Readers:
    """The snapshots (LMDB transaction ids) this process's read transactions hold: a
    spool slot freed after the oldest of them may still be read through it. Plain dict
    operations, atomic under the GIL: a read transaction pays no lock."""

    def __init__(self) -> None:
        self._held: dict[int, int] = {}
        self._tokens = itertools.count()

    def hold(self) -> int:
        """Registers a reader about to begin: until `at` says its snapshot, it holds
        back every freed slot."""
        token = next(self._tokens)
        self._held[token] = 0
        return token

    def at(self, token: int, txn_id: int) -> None:
        self._held[token] = txn_id

    def release(self, token: int) -> None:
        del self._held[token]

    def oldest(self) -> float:
        return min(list(self._held.values()), default=math.inf)


class Txn:
    """Typed access to the named databases inside one transaction."""

    def __init__(
        self,
        txn: lmdb.Transaction,
        dbs: dict,
        mapped: MapPages | None = None,
        spool: Spool | None = None,
        readers: Readers | None = None,
    ) -> None:
        self.txn = txn
        self.db = dbs
        self.mapped = mapped
        self.spool = spool
        self.readers = readers or Readers()
        #: a node or an entry was written (see Store.tree_version)
        self.tree_changed = False
        #: a page was written to the spool (synced before the commit)
        self.spooled = False
        #: pages put in the spool not written there yet, by slot
        self._unwritten: dict[int, bytes | bytearray] = {}

    def _mapped(self, nbytes: int) -> None:
        if self.mapped is not None:
            self.mapped.touched(nbytes)

    def _value(self, db: str, key: bytes) -> bytes | memoryview | None:
        """A large value (a page, a chunk), counted as touched in the map: a copy, or a
        view into the map in a `read(views=True)` transaction."""
        value = self.txn.get(key, db=self.db[db])
        if value is not None:
            self._mapped(len(value))
        return value

    # ------------------------------------------------------------------ meta

    def meta(self, key: str) -> bytes | None:
        value = self.txn.get(key.encode(), db=self.db["meta"])
        return bytes(value) if value is not None else None

    def set_meta(self, key: str, value: bytes) -> None:
        self.txn.put(key.encode(), value, db=self.db["meta"])

    def meta_int(self, key: str, default: int = 0) -> int:
        value = self.meta(key)
        return from_u64(value) if value is not None else default

    def set_meta_int(self, key: str, value: int) -> None:
        self.set_meta(key, u64(value))

    def del_meta(self, key: str) -> None:
        self.txn.delete(key.encode(), db=self.db["meta"])

    # ------------------------------------------------------------------ spaces

    def spaces(self) -> dict[str, bytes]:
        with self.txn.cursor(db=self.db["spaces"]) as cur:
            return {unraw(k): bytes(v) for k, v in cur}

    def put_space(self, space: str, info: bytes) -> None:
        self.txn.put(raw(space), info, db=self.db["spaces"])

    # ------------------------------------------------------------------ nodes

    def node(self, space: str, node: str) -> Node | None:
        data = self.txn.get(raw(space) + raw(node), db=self.db["nodes"])
        return Node.decode(space, node, data) if data is not None else None

    def put_node(self, node: Node) -> None:
        self.tree_changed = True
        self.txn.put(node.key, node.encode(), db=self.db["nodes"])

    def del_node(self, space: str, node: str) -> None:
        self.tree_changed = True
        key = raw(space) + raw(node)
        self.txn.delete(key, db=self.db["nodes"])
        self.txn.delete(key, db=self.db["manifests"])
        self.del_pages(space, node)
        self.txn.delete(key, db=self.db["pins"])

    def nodes(self, space: str) -> Iterator[Node]:
        prefix = raw(space)
        with self.txn.cursor(db=self.db["nodes"]) as cur:
            if not cur.set_range(prefix):
                return
            for key, value in cur:
                if not key.startswith(prefix):
                    return
                yield Node.decode(space, unraw(key[16:32]), value)

    def manifest_bytes(self, space: str, node: str) -> bytes:
        data = self.txn.get(raw(space) + raw(node), db=self.db["manifests"])
        return bytes(data) if data is not None else b""

    def put_manifest_bytes(self, space: str, node: str, data: bytes) -> None:
        key = raw(space) + raw(node)
        if data:
            self.txn.put(key, data, db=self.db["manifests"])
        else:
            self.txn.delete(key, db=self.db["manifests"])

    # ------------------------------------------------------------------ entries

    def child(self, space: str, parent: str, name: str) -> str | None:
        value = self.txn.get(raw(space) + raw(parent) + name.encode(), db=self.db["children"])
        return unraw(value) if value is not None else None

    def children(
        self, space: str, parent: str, after: str | None = None
    ) -> Iterator[tuple[str, str]]:
        """(name, node) of a directory in name order, starting after `after`."""
        prefix = raw(space) + raw(parent)
        start = prefix + (after.encode() + b"\x00" if after is not None else b"")
        with self.txn.cursor(db=self.db["children"]) as cur:
            if not cur.set_range(start):
                return
            for key, value in cur:
                if not key.startswith(prefix):
                    return
                yield bytes(key[32:]).decode(), unraw(value)

    def has_children(self, space: str, parent: str) -> bool:
        return next(self.children(space, parent), None) is not None

    def add_entry(self, space: str, parent: str, name: str, node: str) -> None:
        self.tree_changed = True
        self.txn.put(raw(space) + raw(parent) + name.encode(), raw(node), db=self.db["children"])
        self.txn.put(raw(space) + raw(node) + raw(parent) + name.encode(), b"", db=self.db["links"])

    def remove_entry(self, space: str, parent: str, name: str) -> str | None:
        self.tree_changed = True
        key = raw(space) + raw(parent) + name.encode()
        value = self.txn.pop(key, db=self.db["children"])
        if value is None:
            return None
        self.txn.delete(
            raw(space) + bytes(value) + raw(parent) + name.encode(), db=self.db["links"]
        )
        return unraw(value)

    def entries_of(self, space: str, node: str) -> list[tuple[str, str]]:
        """(parent, name) of every entry leading to the node."""
        prefix = raw(space) + raw(node)
        out = []
        with self.txn.cursor(db=self.db["links"]) as cur:
            if cur.set_range(prefix):
                for key in cur.iternext(values=False):
                    if not key.startswith(prefix):
                        break
                    out.append((unraw(key[32:48]), bytes(key[48:]).decode()))
        return out

    def clear_space_tree(self, space: str, keep: Container[str] = ()) -> None:
        """Drops the mirror of a space (nodes, manifests, entries, and the clean pages
        of files not in `keep`); keeps chunks and dirty pages."""
        self.tree_changed = True
        prefix = raw(space)
        # clean pages copy what the mirror says a file holds: they go with it, but for
        # the files whose version the caller knows is unchanged
        kept = {raw(node) for node in keep}
        self._delete_pages(
            [k for k in self._page_keys(prefix, state=CLEAN) if k[16:32] not in kept]
        )
        entries = []
        with self.txn.cursor(db=self.db["chunkmeta"]) as cur:
            if cur.set_range(prefix):
                for key in cur.iternext(values=False):
                    if not bytes(key).startswith(prefix):
                        break
                    if len(key) == 32 and bytes(key[16:]) not in kept:
                        entries.append(bytes(key))
        for key in entries:
            self._drop_pages_entry(key)
        for name in ("nodes", "manifests", "children", "links", "applied"):
            with self.txn.cursor(db=self.db[name]) as cur:
                if not cur.set_range(prefix):
                    continue
                while cur.key().startswith(prefix):
                    if not cur.delete():
                        break

    # ------------------------------------------------------------------ dirty pages

    def page(self, space: str, node: str, page_no: int) -> bytes | bytearray | None:
        blob = self.pages_in(space, node, page_no, page_no)[page_no]
        return None if blob is None else bytes(blob) if isinstance(blob, memoryview) else blob

    def page_view(self, space: str, node: str, page_no: int) -> memoryview | None:
        """The sealed page in place in a `read(views=True)` transaction (see
        `chunk_view`) when LMDB holds it; else a view of a copy."""
        blob = self.pages_in(space, node, page_no, page_no)[page_no]
        return None if blob is None else memoryview(blob)

    def pages_in(
        self, space: str, node: str, first: int, last: int
    ) -> dict[int, bytes | bytearray | memoryview | None]:
        """The sealed pages `first` to `last` of the file (None where it has none), those
        in the spool read a run of slots at a time. In a `read(views=True)` transaction
        those LMDB holds come as views in place (see `chunk_view`)."""
        return self.sealed_pages(self.page_values(space, node, first, last))

    def page_values(
        self, space: str, node: str, first: int, last: int
    ) -> dict[int, bytes | memoryview | None]:
        """The `pages` values of pages `first` to `last`: sealed pages or spool records."""
        prefix = raw(space) + raw(node)
        return {p: self._value("pages", prefix + u64(p)) for p in range(first, last + 1)}

    def sealed_pages(
        self, values: dict[int, bytes | memoryview | None], into: mmap.mmap | None = None
    ) -> dict[int, bytes | bytearray | memoryview | None]:
        """The sealed pages `values` (of `page_values`) hold or name; those in the spool
        as views into `into` when given (see Spool.read). Touches the spool only, not
        the transaction: another thread may run it. A slot read back carries its
        record's tag: should it hold anything but that page, it fails to open."""
        out: dict[int, bytes | bytearray | memoryview | None] = {}
        spooled: dict[int, tuple[int, int, bytes]] = {}
        for page_no, value in values.items():
            record = decode_record(value) if value is not None else None
            if record is None:
                out[page_no] = value
            else:
                out[page_no] = self._unwritten.get(record[0])
                if out[page_no] is None:
                    spooled[page_no] = record
        if spooled:
            if self.spool is None:
                raise StoreError("the store names page spool slots, but has no spool")
            blobs = self.spool.read(
                [(slot, length) for slot, length, _ in spooled.values()], into
            )
            for page_no, (slot, _, tag) in spooled.items():
                blob = out[page_no] = blobs[slot]
                blob[-TAG_BYTES:] = tag
        return out

    def put_page(self, space: str, node: str, page_no: int, sealed: bytes | bytearray) -> None:
        """Stores a dirty page (a clean one there before becomes dirty); a full-size one
        goes to a free spool slot (no committed record names it), written before the
        transaction commits."""
        key = raw(space) + raw(node) + u64(page_no)
        self._free(self.txn.get(key, db=self.db["pages"]))
        value: bytes | bytearray = sealed
        if self.spool is not None and len(sealed) >= SPOOL_FROM:
            slot = self._alloc_slot()
            self._unwritten[slot] = sealed
            if len(self._unwritten) >= RUN_SLOTS:
                self.write_spool()
            value = encode_record(slot, sealed)
        self.txn.put(key, value, db=self.db["pages"])
        self.txn.put(key, b"", db=self.db["pagekeys"])

    def write_spool(self) -> None:
        """Writes the pages put in the spool so far (the rest of them at the commit)."""
        if self._unwritten:
            assert self.spool is not None
            self.spool.write(list(self._unwritten.items()))
            self._unwritten.clear()
            self.spooled = True

    def _alloc_slot(self) -> int:
        """A free spool slot. One freed by transaction F is taken only once F is durable
        (LMDB's metasync=False: the commit after F makes it so), and once no reader of
        this process holds a snapshot before F (it could still read the slot). Else a
        new slot at the spool's end."""
        limit = min(self.txn.id() - 2, self.readers.oldest())
        with self.txn.cursor(db=self.db["freeslots"]) as cur:
            if cur.first():
                key = bytes(cur.key())
                if from_u64(key[:8]) <= limit:
                    cur.delete()
                    return from_u64(key[8:])
        slot = self.meta_int("spool_slots")
        self.set_meta_int("spool_slots", slot + 1)
        return slot

    def _free(self, value: bytes | None) -> None:
        """Frees the spool slot a `pages` value being replaced or deleted names."""
        record = decode_record(value) if value is not None else None
        if record is not None:
            self.txn.put(u64(self.txn.id()) + u64(record[0]), b"", db=self.db["freeslots"])

    def _pages(self, prefix: bytes, start: int = 0) -> list[tuple[bytes, bytes]]:
        """(key, state) of the pages under `prefix` (a space, or a space and a node)
        from page `start` (with a node)."""
        out = []
        with self.txn.cursor(db=self.db["pagekeys"]) as cur:
            if cur.set_range(prefix + (u64(start) if len(prefix) == 32 else b"")):
                for view, value in cur:
                    key = bytes(view)  # a view in a `read(views=True)` transaction
                    if not key.startswith(prefix):
                        break
                    out.append((key, bytes(value)))
        return out

    def _page_keys(
        self, prefix: bytes, start: int = 0, state: bytes | None = None
    ) -> list[bytes]:
        """Keys of `_pages`, only those in `state` if given."""
        return [k for k, s in self._pages(prefix, start) if state is None or s == state]

    def page_numbers(self, space: str, node: str, start: int = 0) -> list[int]:
        """The file's pages, dirty and clean."""
        return [from_u64(key[32:]) for key in self._page_keys(raw(space) + raw(node), start)]

    def dirty_page_numbers(self, space: str, node: str) -> list[int]:
        """The file's pages written since its last commit."""
        keys = self._page_keys(raw(space) + raw(node), state=b"")
        return [from_u64(key[32:]) for key in keys]

    def del_pages(self, space: str, node: str, start: int = 0) -> int:
        """Deletes the file's pages from page `start` on; all of them also end the
        clean pages' cache entry."""
        keys = self._page_keys(raw(space) + raw(node), start)
        self._delete_pages(keys)
        if start == 0:
            self._drop_pages_entry(raw(space) + raw(node))
        return len(keys)

    def _delete_pages(self, keys: list[bytes]) -> None:
        for key in keys:
            value = self.txn.pop(key, db=self.db["pages"])  # maps it in (see MapPages)
            self._free(value)
            self.txn.delete(key, db=self.db["pagekeys"])
            if value is not None:
                self._mapped(len(value))

    def del_dirty_pages(self, space: str, node: str) -> int:
        """Deletes the file's dirty pages; returns how many clean ones are left."""
        prefix = raw(space) + raw(node)
        pages = self._pages(prefix)
        dirty = [key for key, state in pages if state != CLEAN]
        self._delete_pages(dirty)
        if len(dirty) == len(pages):
            self._drop_pages_entry(prefix)
        return len(pages) - len(dirty)

    def keep_pages(self, space: str, node: str, size: int) -> int:
        """Makes every page of the file clean, its content as just committed: kept as
        the file's cached copy (one cache entry, counted as `size` bytes or its pages'
        if fewer, evicted like a chunk) instead of a second copy as chunks. Returns the
        number of pages."""
        prefix = raw(space) + raw(node)
        keys = self._page_keys(prefix)
        for key in keys:
            self.txn.put(key, CLEAN, db=self.db["pagekeys"])
        self._drop_pages_entry(prefix)
        size = min(size, len(keys) * PAGE_SIZE)
        if keys:
            now = time.time_ns()
            self.txn.put(prefix, ChunkMeta(now, size, 0).encode(), db=self.db["chunkmeta"])
            self.txn.put(u64(now) + prefix, b"", db=self.db["lru"])
            self.set_meta_int("cache_bytes", self.meta_int("cache_bytes") + size)
        return len(keys)

    def drop_clean_pages(self, space: str, node: str) -> int:
        """Deletes the file's clean pages (its dirty ones stay) and their cache entry."""
        prefix = raw(space) + raw(node)
        keys = self._page_keys(prefix, state=CLEAN)
        self._delete_pages(keys)
        self._drop_pages_entry(prefix)
        return len(keys)

    def held_bytes(self, node: Node) -> int:
        """Bytes of the file readable without the server: its committed content in the
        chunk cache (below its floor), plus its pages (an estimate, at most its size)."""
        manifest = decode_manifest(self.manifest_bytes(node.space, node.id))
        held = sum(n for c, n in manifest if self.chunk_meta(node.space, c) is not None)
        if node.flags & (Flag.DIRTY | Flag.PAGED):
            held = min(held, node.floor)
            held += len(self.page_numbers(node.space, node.id)) * PAGE_SIZE
        return min(held, node.size)

    def touch_pages(self, space: str, node: str) -> None:
        key = raw(space) + raw(node)
        value = self.txn.get(key, db=self.db["chunkmeta"])
        if value is not None:
            self._touch(key, ChunkMeta.decode(value))

    def pages_entry(self, space: str, node: str) -> ChunkMeta | None:
        """The cache entry of the file's clean pages, if it has one."""
        value = self.txn.get(raw(space) + raw(node), db=self.db["chunkmeta"])
        return ChunkMeta.decode(value) if value is not None else None

    def _drop_pages_entry(self, prefix: bytes) -> int:
        value = self.txn.pop(prefix, db=self.db["chunkmeta"])
        if value is None:
            return 0
        meta = ChunkMeta.decode(value)
        self.txn.delete(u64(meta.atime_ns) + prefix, db=self.db["lru"])
        self.set_meta_int("cache_bytes", self.meta_int("cache_bytes") - meta.size)
        return meta.size

    def index_pages(self) -> int:
        """Fills `pagekeys` from `pages` (a store written before it existed)."""
        count = 0
        with self.txn.cursor(db=self.db["pages"]) as cur:
            for key in cur.iternext(values=False):
                self.txn.put(bytes(key), b"", db=self.db["pagekeys"])
                count += 1
        return count

    def dirty_bytes(self) -> int:
        return self.txn.stat(self.db["pages"])["entries"] * 128 * 1024

    # ------------------------------------------------------------------ journal

    def journal_append(self, entry: Pending) -> int:
        seq = self.meta_int("journal_seq") + 1
        self.set_meta_int("journal_seq", seq)
        self.txn.put(u64(seq), entry.encode(), db=self.db["journal"])
        return seq

    def journal_put(self, seq: int, entry: Pending) -> None:
        """Rewrites a journal entry in place (conflict resolution)."""
        self.txn.put(u64(seq), entry.encode(), db=self.db["journal"])

    def journal(self, limit: int | None = None) -> list[tuple[int, Pending]]:
        out = []
        with self.txn.cursor(db=self.db["journal"]) as cur:
            for key, value in cur:
                out.append((from_u64(key), Pending.decode(value)))
                if limit is not None and len(out) >= limit:
                    break
        return out

    def journal_delete(self, seqs: list[int]) -> None:
        for seq in seqs:
            self.txn.delete(u64(seq), db=self.db["journal"])

    def journal_len(self) -> int:
        return self.txn.stat(self.db["journal"])["entries"]

    # ------------------------------------------------------------------ chunk cache

    def chunk_view(self, space: str, chunk_id: str) -> memoryview | None:
        """The cached blob in place, in a `read(views=True)` transaction: opening a
        chunk straight from the map saves copying it out first (a warm re-read copied
        each of its bytes once more that way; fresh memory is dear here). Outside one,
        a view of a copy."""
        value = self._value("chunks", raw(space) + bytes.fromhex(chunk_id))
        return None if value is None else memoryview(value)

    def chunk_meta(self, space: str, chunk_id: str) -> ChunkMeta | None:
        value = self.txn.get(raw(space) + bytes.fromhex(chunk_id), db=self.db["chunkmeta"])
        return ChunkMeta.decode(value) if value is not None else None

    def put_chunk(self, space: str, chunk_id: str, blob: bytes, pins: int = 0) -> bool:
        """Caches a sealed chunk; False if it was there already, and then it counts as
        just used (a save that keeps it must not see the same burst evict it first)."""
        key = raw(space) + bytes.fromhex(chunk_id)
        value = self.txn.get(key, db=self.db["chunkmeta"])
        if value is not None:
            self._touch(key, ChunkMeta.decode(value))
            return False
        now = time.time_ns()
        self.txn.put(key, blob, db=self.db["chunks"])
        self.txn.put(key, ChunkMeta(now, len(blob), pins).encode(), db=self.db["chunkmeta"])
        self.txn.put(u64(now) + key, b"", db=self.db["lru"])
        self.set_meta_int("cache_bytes", self.meta_int("cache_bytes") + len(blob))
        return True

    def touch_chunk(self, space: str, chunk_id: str) -> None:
        key = raw(space) + bytes.fromhex(chunk_id)
        value = self.txn.get(key, db=self.db["chunkmeta"])
        if value is not None:
            self._touch(key, ChunkMeta.decode(value))

    def _touch(self, key: bytes, meta: ChunkMeta) -> None:
        now = time.time_ns()
        self.txn.delete(u64(meta.atime_ns) + key, db=self.db["lru"])
        self.txn.put(u64(now) + key, b"", db=self.db["lru"])
        self.txn.put(key, ChunkMeta(now, meta.size, meta.pins).encode(), db=self.db["chunkmeta"])

    def pin_chunk(self, space: str, chunk_id: str, delta: int) -> None:
        key = raw(space) + bytes.fromhex(chunk_id)
        value = self.txn.get(key, db=self.db["chunkmeta"])
        if value is None:
            return
        meta = ChunkMeta.decode(value)
        self.txn.put(
            key,
            ChunkMeta(meta.atime_ns, meta.size, max(0, meta.pins + delta)).encode(),
            db=self.db["chunkmeta"],
        )

    def delete_chunk(self, space: str, chunk_id: str) -> int:
        key = raw(space) + bytes.fromhex(chunk_id)
        value = self.txn.pop(key, db=self.db["chunkmeta"])
        if value is None:
            return 0
        meta = ChunkMeta.decode(value)
        self.txn.delete(key, db=self.db["chunks"])  # maps the value in (see MapPages)
        self._mapped(meta.size)
        self.txn.delete(u64(meta.atime_ns) + key, db=self.db["lru"])
        self.set_meta_int("cache_bytes", self.meta_int("cache_bytes") - meta.size)
        return meta.size

    def cache_bytes(self) -> int:
        return self.meta_int("cache_bytes")

    def pinned_bytes(self) -> int:
        total = 0
        with self.txn.cursor(db=self.db["chunkmeta"]) as cur:
            for value in cur.iternext(keys=False):
                meta = ChunkMeta.decode(value)
                if meta.pins:
                    total += meta.size
        return total

    def evict(self, cap: int) -> int:
        """Deletes least recently used unpinned chunks until the cache holds at most
        `cap` bytes (or only pinned ones are left). Returns bytes freed."""
        used = self.cache_bytes()
        freed = 0
        if used <= cap:
            return 0
        victims: list[bytes] = []
        with self.txn.cursor(db=self.db["lru"]) as cur:
            for key in cur.iternext(values=False):
                if used - freed <= cap:
                    break
                chunk_key = bytes(key[8:])
                meta = ChunkMeta.decode(self.txn.get(chunk_key, db=self.db["chunkmeta"]))
                if meta.pins:
                    continue
                victims.append(chunk_key)
                freed += meta.size
        for key in victims:
            if len(key) == 32:  # a file's clean pages
                self.drop_clean_pages(unraw(key[:16]), unraw(key[16:]))
            else:
                self.delete_chunk(unraw(key[:16]), key[16:].hex())
        return freed

    # ------------------------------------------------------------------ own commits

    def mark_applied(self, space: str, seqs: list[int]) -> None:
        for seq in seqs:
            self.txn.put(raw(space) + u64(seq), b"", db=self.db["applied"])

    def take_applied(self, space: str, seq: int) -> bool:
        """Whether `seq` is one of this device's own applied commits (forgetting it)."""
        return self.txn.pop(raw(space) + u64(seq), db=self.db["applied"]) is not None

    # ------------------------------------------------------------------ pins

    def pinned(self, space: str, node: str) -> bool:
        return self.txn.get(raw(space) + raw(node), db=self.db["pins"]) is not None

    def set_pinned(self, space: str, node: str, pinned: bool) -> None:
        key = raw(space) + raw(node)
        if pinned:
            self.txn.put(key, b"", db=self.db["pins"])
        else:
            self.txn.delete(key, db=self.db["pins"])
