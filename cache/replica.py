"""One device's replica of its spaces: POSIX-shaped operations on the local store.

Every namespace change is one LMDB transaction that updates the mirror and appends a
`Pending` entry to the journal, so it is durable and queued before the call returns.
File writes land as sealed dirty pages; the file is journaled ("content") at flush
(close/fsync) or after a quiet period, and the flusher uploads it later.

The mount (fs/) calls these methods; tests call them directly. Identifiers are
(space, node id); the home space's root is `ROOT_NODE`.

No checkpoint may fall between reading a node and writing it back in the same
transaction: all transactions here are synchronous blocks. Content changes of one
node are serialized by a per-node trio lock because preparing pages may await (a
partial page needs its base bytes).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import trio

from cache.chunks import ChunkSource, Connectivity
from cache.codec import DirtySealer
from cache.content import Content, HeldPage
from cache.errors import (
    Exists,
    InvalidArgument,
    InvalidName,
    IsADirectory,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    ReadOnly,
)
from cache.records import (
    PAGE_SIZE,
    SPECIALS,
    Flag,
    Kind,
    Node,
    Pending,
    encode_manifest,
)
from cache.store import Store, StoreFull, Txn
from loft.protocol import ROOT_NODE, check_name

log = logging.getLogger(__name__)

QUIET_SECONDS = 2.0
#: how long the content of a file closed after writing waits to be journaled, together
#: with every other file closed meanwhile (one synced transaction for a burst of closes)
CLOSE_LINGER = 0.02
#: Writes at least this large may hold their last page back (see Replica.write); a
#: small file's one write never does.
HOLD_FROM = 64 * 1024

#: (space, node) pairs whose kernel caches must be dropped, and (space, parent, name)
#: entries whose kernel lookups must be dropped.
Invalidation = tuple[list[tuple[str, str]], list[tuple[str, str, str]]]


def _nlink(t: Txn, node: Node) -> int:
    """Entries leading to the node (1 for directories, 0 once unlinked)."""
    return 1 if node.kind == Kind.DIR else len(t.entries_of(node.space, node.id))


def now_ns() -> int:
    return time.time_ns()


@dataclass
class ReplicaState:
    """What the services share, in memory: rebuilt from the store at open."""

    #: journal entries per node, by op
    pending: dict[tuple[str, str], Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter)
    )
    #: nodes written since they were last journaled, with the time of the last write
    unjournaled: dict[tuple[str, str], float] = field(default_factory=dict)
    #: those of them whose writer closed a descriptor, in the order of the closes, and
    #: whether that ended the handle: those are journaled within CLOSE_LINGER (see
    #: close_written), the others at their release (see flushed)
    closed: dict[tuple[str, str], bool] = field(default_factory=dict)
    #: open handles per node (a node without entries lives while held)
    held: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: spaces whose mirror must be rebuilt from a snapshot once nothing is pending
    needs_resync: set[str] = field(default_factory=set)


class Replica:
    def __init__(
        self,
        store: Store,
        chunks: ChunkSource,
        sealer: DirtySealer,
        home: str,
        device_name: str,
        connectivity: Connectivity,
        *,
        read_only: bool = False,
    ) -> None:
        self.store = store
        self.chunks = chunks
        self.sealer = sealer
        self.home = home
        self.device_name = device_name
        self.net = connectivity
        self.read_only = read_only
        self.content = Content(
            store, sealer, chunks.get, chunks.prefetch, chunks.get_range, chunks.read_ahead,
            chunks.touch_pages,
        )
        self.state = ReplicaState()
        #: files a save is reading now: their writes hold no page back (the save's
        #: snapshot of the store must have every byte its size covers)
        self.saving: set[tuple[str, str]] = set()
        self._locks: dict[tuple[str, str], trio.Lock] = defaultdict(trio.Lock)
        self._journal_event = trio.Event()
        self._quiet_event = trio.Event()
        self._closed_event = trio.Event()
        self.listeners: list[Callable[[Invalidation], None]] = []
        self._rebuild_state()

    # ------------------------------------------------------------------ state

    def _rebuild_state(self) -> None:
        with self.store.read() as t:
            for _, p in t.journal():
                self.state.pending[(p.space, p.node)][p.op] += 1
            dirty = [n for space in t.spaces() for n in t.nodes(space) if n.flags & Flag.DIRTY]
        for node in dirty:
            if not self._content_pending((node.space, node.id)):
                self.state.unjournaled[(node.space, node.id)] = 0.0  # journal at once

    def _content_pending(self, key: tuple[str, str]) -> bool:
        """The journal holds a content entry for the node (which will send its writes
        as they are when the flusher reads them)."""
        counts = self.state.pending.get(key)
        return bool(counts and counts["content"])

    def journal(self, t: Txn, entry: Pending) -> None:
        """Appends to the journal inside the caller's transaction. A file closed after
        writing whose content close_written has not journaled yet gets its content
        entry first, so that the journal keeps the order of events: a save through a
        temporary name is create, content, rename, and travels as one create."""
        key = (entry.space, entry.node)
        if key in self.state.closed:
            del self.state.closed[key]
            written = self.state.unjournaled.pop(key, None) is not None
            if written and not self._content_pending(key):
                self._append(t, Pending("content", *key))
        self._append(t, entry)

    def _append(self, t: Txn, entry: Pending) -> None:
        t.journal_append(entry)
        self.state.pending[(entry.space, entry.node)][entry.op] += 1
        self._journal_event.set()

    def journal_done(self, entries: list[Pending]) -> None:
        """Forgets journal entries the flusher has committed (after its transaction)."""
        for p in entries:
            counts = self.state.pending[(p.space, p.node)]
            counts[p.op] -= 1
            if counts[p.op] <= 0:
                del counts[p.op]
            if not counts:
                del self.state.pending[(p.space, p.node)]
        if self.idle():
            self._quiet_event.set()
            self._quiet_event = trio.Event()

    async def wait_journal(self) -> None:
        """Returns once the journal may have entries."""
        while True:
            with self.store.read() as t:
                if t.journal_len():
                    return
            await self._journal_event.wait()
            self._journal_event = trio.Event()

    def idle(self) -> bool:
        """Nothing local waits to be committed: no journal, no unjournaled writes."""
        if self.state.unjournaled:
            return False
        with self.store.read() as t:
            return t.journal_len() == 0

    async def wait_idle(self) -> None:
        while not self.idle():
            await self._quiet_event.wait()

    def has_pending(self, space: str, node: str) -> bool:
        return (
            bool(self.state.pending.get((space, node))) or (space, node) in self.state.unjournaled
        )

    def notify(self, inv: Invalidation) -> None:
        if inv[0] or inv[1]:
            for listener in self.listeners:
                listener(inv)

    # ------------------------------------------------------------------ lookups

    def node(self, space: str, node_id: str) -> Node:
        with self.store.read() as t:
            node = t.node(space, node_id)
        if node is None:
            raise NotFound(f"no node {node_id}")
        return node

    def lookup(self, space: str, parent: str, name: str) -> Node:
        with self.store.read() as t:
            return self._entry(t, space, parent, name)

    def readdir(
        self, space: str, parent: str, after: str | None = None
    ) -> list[tuple[str, Node, int]]:
        """(name, node, link count) of each entry, in name order, from one snapshot."""
        with self.store.read() as t:
            self._dir(t, space, parent)
            out = []
            for name, child in t.children(space, parent, after):
                node = t.node(space, child)
                if node is not None:
                    out.append((name, node, _nlink(t, node)))
            return out

    def nlink(self, node: Node) -> int:
        """Entries leading to the node (1 for directories, 0 once unlinked)."""
        if node.kind == Kind.DIR:
            return 1  # without opening a transaction
        with self.store.read() as t:
            return _nlink(t, node)

    def cached_bytes(self, node: Node) -> int:
        """Bytes of the file readable without the server (see Txn.held_bytes)."""
        with self.store.read() as t:
            return t.held_bytes(node)

    def path_of(self, space: str, node_id: str) -> str | None:
        """A path of the node (its first entry), or None if it has none."""
        parts = []
        with self.store.read() as t:
            current = node_id
            while current != ROOT_NODE:
                entries = t.entries_of(space, current)
                if not entries:
                    return None
                parent, name = entries[0]
                parts.append(name)
                current = parent
        return "/".join(reversed(parts))

    def resolve(self, path: str, space: str | None = None) -> Node:
        """The node at a slash-separated path from the space's root."""
        space = space or self.home
        node = self.node(space, ROOT_NODE)
        for part in [p for p in path.split("/") if p]:
            node = self.lookup(space, node.id, part)
        return node

    # ------------------------------------------------------------------ namespace

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnly("the replica is read-only")

    @staticmethod
    def _name(name: str) -> str:
        try:
            return check_name(name)
        except ValueError as exc:
            raise InvalidName(str(exc)) from None

    @staticmethod
    def _dir(t: Txn, space: str, node_id: str) -> Node:
        node = t.node(space, node_id)
        if node is None:
            raise NotFound(node_id)
        if node.kind != Kind.DIR:
            raise NotADirectory(node_id)
        return node

    @staticmethod
    def _entry(t: Txn, space: str, parent: str, name: str) -> Node:
        """The node named `name` in directory `parent`."""
        child = t.child(space, parent, name)
        node = t.node(space, child) if child else None
        if node is None:
            raise NotFound(name)
        return node

    def _touch_dir(self, t: Txn, parent: Node) -> None:
        t.put_node(parent.but(mtime_ns=now_ns(), ctime_ns=now_ns()))

    def _new_node(
        self,
        space: str,
        parent: str,
        name: str,
        kind: Kind,
        op: str,
        *,
        mode: int,
        uid: int,
        gid: int,
        target: str = "",
        special: int = 0,
        rdev: int = 0,
        manifest: list[tuple[str, int]] | None = None,
    ) -> Node:
        self._writable()
        name = self._name(name)
        stamp = now_ns()
        size = sum(n for _, n in manifest) if manifest else len(target.encode())
        node = Node(
            space,
            str(uuid.uuid4()),
            kind,
            mode=mode & 0o7777,
            uid=uid,
            gid=gid,
            mtime_ns=stamp,
            ctime_ns=stamp,
            flags=Flag.LOCAL,
            target=target,
            size=size,
            special=special,
            rdev=rdev,
        )
        with self.store.write() as t:
            parent_node = self._dir(t, space, parent)
            if t.child(space, parent, name) is not None:
                raise Exists(name)
            t.put_node(node)
            if manifest:
                t.put_manifest_bytes(space, node.id, encode_manifest(manifest))
            t.add_entry(space, parent, name, node.id)
            self._touch_dir(t, parent_node)
            self.journal(t, Pending(op, space, node.id, parent=parent, name=name))
        return node

    def create_uploaded(
        self, space: str, parent: str, name: str, manifest: list[tuple[str, int]], mode: int = 0o644
    ) -> Node:
        """A new file whose chunks are already on the server (an import)."""
        node = self._new_node(
            space, parent, name, Kind.FILE, "create", mode=mode, uid=0, gid=0, manifest=manifest
        )
        return node

    def mkdir(
        self, space: str, parent: str, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0
    ) -> Node:
        return self._new_node(space, parent, name, Kind.DIR, "mkdir", mode=mode, uid=uid, gid=gid)

    def create(
        self, space: str, parent: str, name: str, mode: int = 0o644, uid: int = 0, gid: int = 0
    ) -> Node:
        return self._new_node(space, parent, name, Kind.FILE, "create", mode=mode, uid=uid, gid=gid)

    def symlink(
        self, space: str, parent: str, name: str, target: str, uid: int = 0, gid: int = 0
    ) -> Node:
        if not target or len(target.encode()) > 4096:
            raise InvalidArgument("a symlink target is 1 to 4096 bytes")
        return self._new_node(
            space,
            parent,
            name,
            Kind.SYMLINK,
            "symlink",
            mode=0o777,
            uid=uid,
            gid=gid,
            target=target,
        )

    def mknod(
        self,
        space: str,
        parent: str,
        name: str,
        special: str,
        mode: int = 0o644,
        rdev: int = 0,
        uid: int = 0,
        gid: int = 0,
    ) -> Node:
        return self._new_node(
            space,
            parent,
            name,
            Kind.SPECIAL,
            "special",
            mode=mode,
            uid=uid,
            gid=gid,
            special=SPECIALS.index(special),
            rdev=rdev,
        )

    def link(self, space: str, node_id: str, parent: str, name: str) -> Node:
        self._writable()
        name = self._name(name)
        with self.store.write() as t:
            node = t.node(space, node_id)
            if node is None:
                raise NotFound(node_id)
            if node.kind == Kind.DIR:
                raise NotPermitted("directories cannot have hard links")
            parent_node = self._dir(t, space, parent)
            if t.child(space, parent, name) is not None:
                raise Exists(name)
            t.add_entry(space, parent, name, node_id)
            node = node.but(ctime_ns=now_ns())
            t.put_node(node)
            self._touch_dir(t, parent_node)
            self.journal(t, Pending("link", space, node_id, parent=parent, name=name))
        return node

    def unlink(self, space: str, parent: str, name: str) -> Node:
        self._writable()
        with self.store.write() as t:
            parent_node = self._dir(t, space, parent)
            node = self._entry(t, space, parent, name)
            if node.kind == Kind.DIR:
                raise IsADirectory(name)
            t.remove_entry(space, parent, name)
            self._touch_dir(t, parent_node)
            self.journal(t, Pending("unlink", space, node.id, parent=parent, name=name))
        return node

    def rmdir(self, space: str, parent: str, name: str) -> Node:
        self._writable()
        with self.store.write() as t:
            parent_node = self._dir(t, space, parent)
            node = self._entry(t, space, parent, name)
            if node.kind != Kind.DIR:
                raise NotADirectory(name)
            if t.has_children(space, node.id):
                raise NotEmpty(name)
            t.remove_entry(space, parent, name)
            self._touch_dir(t, parent_node)
            self.journal(t, Pending("rmdir", space, node.id, parent=parent, name=name))
        return node

    def rename(
        self,
        space: str,
        parent: str,
        name: str,
        new_parent: str,
        new_name: str,
        *,
        noreplace: bool = False,
        exchange: bool = False,
    ) -> Node | None:
        """Moves an entry; returns the node it replaced (now without that entry)."""
        self._writable()
        new_name = self._name(new_name)
        with self.store.write() as t:
            src_dir = self._dir(t, space, parent)
            dst_dir = self._dir(t, space, new_parent)
            node = self._entry(t, space, parent, name)
            target_id = t.child(space, new_parent, new_name)
            target = t.node(space, target_id) if target_id else None
            if target_id == node.id:
                return None  # same node: POSIX says do nothing
            if node.kind == Kind.DIR:
                self._refuse_cycle(t, space, node.id, new_parent)
            if exchange:
                if target is None:
                    raise NotFound(new_name)
                if target.kind == Kind.DIR:
                    self._refuse_cycle(t, space, target.id, parent)
                t.remove_entry(space, parent, name)
                t.remove_entry(space, new_parent, new_name)
                t.add_entry(space, parent, name, target.id)
                t.add_entry(space, new_parent, new_name, node.id)
            else:
                if target is not None:
                    if noreplace:
                        raise Exists(new_name)
                    if node.kind == Kind.DIR and target.kind != Kind.DIR:
                        raise NotADirectory(new_name)
                    if node.kind != Kind.DIR and target.kind == Kind.DIR:
                        raise IsADirectory(new_name)
                    if target.kind == Kind.DIR and t.has_children(space, target.id):
                        raise NotEmpty(new_name)
                    t.remove_entry(space, new_parent, new_name)
                t.remove_entry(space, parent, name)
                t.add_entry(space, new_parent, new_name, node.id)
            t.put_node(node.but(ctime_ns=now_ns()))
            self._touch_dir(t, src_dir)
            if new_parent != parent:
                self._touch_dir(t, dst_dir)
            self.journal(
                t,
                Pending(
                    "move",
                    space,
                    node.id,
                    parent=parent,
                    name=name,
                    new_parent=new_parent,
                    new_name=new_name,
                    replace=target.id if target else None,
                    exchange=exchange,
                ),
            )
        return None if exchange else target

    @staticmethod
    def _refuse_cycle(t: Txn, space: str, moving: str, new_parent: str) -> None:
        current = new_parent
        while current != ROOT_NODE:
            if current == moving:
                raise InvalidArgument("cannot move a directory into itself")
            entries = t.entries_of(space, current)
            if not entries:
                return
            current = entries[0][0]

    # ------------------------------------------------------------------ attributes

    def setattr(
        self,
        space: str,
        node_id: str,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        mtime_ns: int | None = None,
    ) -> Node:
        given = {"mode": None if mode is None else mode & 0o7777, "uid": uid, "gid": gid,
                 "mtime_ns": mtime_ns}
        return self._change_attrs(space, node_id,
                                  lambda node: {k: v for k, v in given.items() if v is not None})

    def set_xattr(self, space: str, node_id: str, name: str, value: bytes | None) -> Node:
        """Sets (or with None removes) an extended attribute. Raises NotFound when
        removing one that is not there."""

        def change(node: Node) -> dict:
            xattrs = dict(node.xattrs)
            if value is None:
                if name not in xattrs:
                    raise NotFound(name)
                del xattrs[name]
            else:
                xattrs[name] = value
            return {"xattrs": xattrs}

        return self._change_attrs(space, node_id, change)

    def _change_attrs(self, space: str, node_id: str, change: Callable[[Node], dict]) -> Node:
        """Applies `change(node)` (attribute values) and journals one setattr for it;
        setattrs queued for one node collapse, since each sends the node's attributes as
        they are when it is committed."""
        self._writable()
        with self.store.write() as t:
            node = t.node(space, node_id)
            if node is None:
                raise NotFound(node_id)
            node = node.but(ctime_ns=now_ns(), **change(node))
            t.put_node(node)
            if not self.state.pending[(space, node_id)]["setattr"]:
                self.journal(t, Pending("setattr", space, node_id))
        return node

    # ------------------------------------------------------------------ content

    async def read(self, space: str, node_id: str, offset: int, size: int) -> bytes | memoryview:
        node = self.node(space, node_id)
        if node.kind == Kind.DIR:
            raise IsADirectory(node_id)
        return await self.content.read(node, offset, size)

    async def write(self, space: str, node_id: str, offset: int, data: bytes) -> int:
        self._writable()
        if not data:
            return 0
        key = (space, node_id)
        async with self._locks[key]:
            node = self.node(space, node_id)
            if node.kind != Kind.FILE:
                raise IsADirectory(node_id)
            end = offset + len(data)
            last = (end - 1) // PAGE_SIZE
            old = self.content.held.get(key)
            # A large write that ends inside its last page, at the end of the file, holds
            # that page back: a writer whose buffer is not page-aligned has each 1 MiB
            # write split in two by the kernel (direct I/O), and the second, a few bytes,
            # would otherwise read the page back, seal and store all of it again.
            hold = end >= node.size and end % PAGE_SIZE != 0 and (
                len(data) >= HOLD_FROM or (old is not None and old.page_no == last)
            )
            pages, held = await self.content.prepare_write(node, offset, data, hold=hold)
            if self.content.held.get(key) is not old:
                old = None  # stored meanwhile (a close of another descriptor)
            if held is not None and key in self.saving:
                # a save began meanwhile: this page goes to the store with the write
                sealed = self.content.seal_held(node.but(size=max(node.size, end)), held)
                if sealed is not None:
                    pages[held.page_no] = sealed
                held = None
            first = offset // PAGE_SIZE
            with self.store.write() as t:
                node = t.node(space, node_id)
                if node is None:
                    raise NotFound(node_id)
                for page_no, sealed in pages.items():
                    t.put_page(space, node_id, page_no, sealed)
                stamp = now_ns()
                node = node.but(
                    size=max(node.size, end),
                    mtime_ns=stamp,
                    ctime_ns=stamp,
                    gen=node.gen + 1,
                    flags=node.flags | Flag.DIRTY,
                )
                t.put_node(node)
                if old is not None and not first <= old.page_no <= last:
                    self._put_held(t, node, old)  # the writer moved on
            if held is not None:
                self.content.held[key] = held
            else:
                self.content.held.pop(key, None)
        self._written(space, node_id)
        return len(data)

    def _put_held(self, t: Txn, node: Node, held: HeldPage) -> None:
        sealed = self.content.seal_held(node, held)
        if sealed is not None:
            t.put_page(node.space, node.id, held.page_no, sealed)

    def store_held(self, keys: Iterable[tuple[str, str]]) -> None:
        """Stores the pages held back of these files (see write): before their content
        is read for a save, cut, or their writer's close returns."""
        held = self._held_of(keys)
        if held:
            with self.store.write() as t:
                self._store_held_in(t, held)
            self._forget_held(held)

    def _held_of(self, keys: Iterable[tuple[str, str]]) -> list[tuple[tuple[str, str], HeldPage]]:
        return [(key, h) for key in keys if (h := self.content.held.get(key)) is not None]

    def _store_held_in(self, t: Txn, held: list[tuple[tuple[str, str], HeldPage]]) -> None:
        """Stores held pages in `t`. Each node counts as written again (gen): a save
        whose snapshot lacked the page must not mark the file clean."""
        for key, h in held:
            node = t.node(*key)
            if node is not None:
                self._put_held(t, node, h)
                t.put_node(node.but(gen=node.gen + 1, flags=node.flags | Flag.DIRTY))

    def _forget_held(self, held: list[tuple[tuple[str, str], HeldPage]]) -> None:
        """After the commit that stored them: a write since may hold a newer page."""
        for key, h in held:
            if self.content.held.get(key) is h:
                del self.content.held[key]

    async def truncate(self, space: str, node_id: str, size: int) -> Node:
        self._writable()
        async with self._locks[(space, node_id)]:
            self.store_held([(space, node_id)])
            node = self.node(space, node_id)
            if node.kind == Kind.DIR:
                raise IsADirectory(node_id)
            if node.kind != Kind.FILE:
                raise InvalidArgument("only files can be truncated")
            keep, pages = (
                await self.content.prepare_truncate(node, size) if size < node.size else (None, {})
            )
            with self.store.write() as t:
                node = t.node(space, node_id)
                if node is None:
                    raise NotFound(node_id)
                floor = node.floor
                if keep is not None:
                    t.del_pages(space, node_id, keep)
                    floor = min(floor, size)
                for page_no, sealed in pages.items():
                    t.put_page(space, node_id, page_no, sealed)
                stamp = now_ns()
                node = node.but(
                    size=size,
                    floor=floor,
                    mtime_ns=stamp,
                    ctime_ns=stamp,
                    gen=node.gen + 1,
                    flags=node.flags | Flag.DIRTY,
                )
                t.put_node(node)
        self._written(space, node_id)
        return node

    def _written(self, space: str, node_id: str) -> None:
        """A write or truncation committed: the file is being written (again), so its
        content is journaled at the next close or once it is quiet."""
        self.state.unjournaled[(space, node_id)] = time.monotonic()
        self.state.closed.pop((space, node_id), None)

    def flush(self, space: str, node_id: str) -> None:
        """Journals the file's content now if it has unjournaled writes (fsync)."""
        self.journal_writes([(space, node_id)])

    def journal_writes(self, keys: Iterable[tuple[str, str]]) -> None:
        """Journals the content of those files that have unjournaled writes, in one
        transaction. Raises StoreFull, and then the files stay as they were."""
        keys = list(dict.fromkeys(key for key in keys if key in self.state.unjournaled))
        todo = [key for key in keys if not self._content_pending(key)]
        held = self._held_of(keys)
        if todo or held:
            with self.store.write() as t:
                self._store_held_in(t, held)  # the content journaled includes them
                todo = [key for key in todo if t.node(*key) is not None]
                for key in todo:
                    t.journal_append(Pending("content", *key))
            self._forget_held(held)
        # no checkpoint from the commit to here: nothing was journaled in between
        for key in keys:
            del self.state.unjournaled[key]
            self.state.closed.pop(key, None)
        for key in todo:
            self.state.pending[key]["content"] += 1
        if todo:
            self._journal_event.set()

    def journal_all(self) -> None:
        """Journals every file with unjournaled writes, as its close would (sync,
        unmount)."""
        self.journal_writes(self.state.unjournaled)

    def journal_closed(self, also: Iterable[tuple[str, str]] = ()) -> None:
        """Journals now what close_written left for the quiet journaler, and the files
        `also`; on a full disk they wait for the journaler's next round."""
        try:
            released = [key for key, ended in self.state.closed.items() if ended]
            self.journal_writes([*released, *also])
        except StoreFull as exc:
            log.warning("written files wait to be journaled: %s", exc)

    def close_written(self, space: str, node_id: str) -> None:
        """A handle that wrote the file was closed: its content is journaled within
        CLOSE_LINGER, with the other files closed meanwhile (or before any later op on
        the file, see journal), rather than in a synced transaction of its own before
        close(2) returns. The writes are in the store already; on a system crash in
        those milliseconds (LMDB's metasync=False: the last commit may roll back) the
        device keeps what a crash keeps of any unsynced file, and a DIRTY node without
        a journaled content is journaled when the replica opens (_rebuild_state)."""
        key = (space, node_id)
        try:
            self.store_held([key])
        except StoreFull as exc:  # a release reports nothing: journaling stores it later
            log.warning("the last page written to %s waits for space: %s", node_id, exc)
        if key in self.state.unjournaled:
            self.state.closed[key] = True
            self._closed_event.set()

    def flushed(self, space: str, node_id: str) -> None:
        """close(2) of one descriptor of a handle that wrote the file (FUSE's flush),
        which other descriptors of the same open file may outlive: a child that
        inherited it (`cmd > log`, make) or a dup. The content waits for the handle's
        release (close_written) or the quiet period: journaling it here uploaded half a
        file whenever a child closed its copy while the parent went on writing. An op
        on the file before then journals the content first, as for a closed file
        (journal): close, then rename, is still one save."""
        key = (space, node_id)
        self.store_held([key])
        if key in self.state.unjournaled:
            self.state.closed.setdefault(key, False)

    def fsync(self, space: str, node_id: str) -> None:
        """Makes the file's writes durable locally (each write is a synced transaction,
        and journaling stores a page held back) and queues them for upload."""
        self.flush(space, node_id)

    async def run_quiet_journaler(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Journals files closed after writing (see close_written) and files nobody has
        written to for QUIET_SECONDS."""
        task_status.started()
        while True:
            with trio.move_on_after(QUIET_SECONDS / 4):
                await self._closed_event.wait()
                await trio.sleep(CLOSE_LINGER)  # let the burst of closes gather
            # no checkpoint from here to the journaling: a close after the new event
            # sets it, a close before is in `closed`
            self._closed_event = trio.Event()
            cutoff = time.monotonic() - QUIET_SECONDS
            self.journal_closed(
                [key for key, last in self.state.unjournaled.items() if last <= cutoff]
            )

    # ------------------------------------------------------------------ handles

    def hold(self, space: str, node_id: str) -> None:
        self.state.held[(space, node_id)] += 1

    def release(self, space: str, node_id: str) -> None:
        key = (space, node_id)
        self.state.held[key] -= 1
        if self.state.held[key] <= 0:
            del self.state.held[key]
            self.collect_orphan(space, node_id)

    def collect_orphan(self, space: str, node_id: str) -> None:
        """Drops a node that has no entry, no open handle and nothing pending."""
        if (
            node_id == ROOT_NODE
            or self.state.held.get((space, node_id))
            or self.has_pending(space, node_id)
        ):
            return
        with self.store.write() as t:
            node = t.node(space, node_id)
            if node is not None and not t.entries_of(space, node_id):
                t.del_node(space, node_id)
        self.content.forget(space, node_id)
