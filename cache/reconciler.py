"""The reconciler: keeps the mirror in step with the server.

It builds a space's first mirror from a tree snapshot, then long-polls the change feed
and applies each answer in one transaction, telling the layer above (the mount) which
nodes and entries changed so it can drop the kernel's caches.

Local work goes first: while the journal is not empty nothing is applied (the flusher's
commits may conflict, and its conflict handling decides what survives); remote content
changes to a file with local unflushed writes are skipped (its commit will conflict and
become a conflicted copy). Once nothing is pending, the mirror equals the server's
tree plus this device's unjournaled writes. After a conflict the space is rebuilt from
a snapshot, which is simpler than replaying what the conflict undid.
"""

from __future__ import annotations

import logging
import time

import trio

from backend.base import Backend, BackendError, is_transient
from cache.records import KIND_OF_NAME, NO_FLOOR, SPECIALS, Flag, Node, encode_manifest
from cache.replica import Invalidation, Replica
from cache.store import Txn
from loft.protocol import Change, NodeState, TreeNode

log = logging.getLogger(__name__)

LONG_POLL = 25.0
PAGE = 1000


def node_from_state(space: str, state: NodeState, ctime_ns: int) -> Node:
    return Node(
        space,
        state.node,
        KIND_OF_NAME[state.kind],
        version=state.version,
        size=state.size,
        mode=state.attrs.mode,
        uid=state.attrs.uid,
        gid=state.attrs.gid,
        mtime_ns=state.attrs.mtime_ns,
        ctime_ns=ctime_ns,
        rdev=state.rdev,
        special=SPECIALS.index(state.special or ""),
        target=state.target or "",
        xattrs=dict(state.attrs.xattrs),
    )


class Reconciler:
    def __init__(self, replica: Replica, backend: Backend) -> None:
        self.replica = replica
        self.store = replica.store
        self.backend = backend
        self.caught_up = trio.Event()
        self.applied = 0

    def spaces(self) -> list[str]:
        with self.store.read() as t:
            return list(t.spaces())

    def cursors(self) -> dict[str, int]:
        with self.store.read() as t:
            return {s: t.meta_int(f"cursor:{s}", -1) for s in t.spaces()}

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        started = False
        delay = 0.5
        while True:
            try:
                for space, cursor in self.cursors().items():
                    if cursor < 0 or space in self.replica.state.needs_resync:
                        await self.replica.wait_idle()
                        await self.resync(space)
                if not started:
                    task_status.started()
                    started = True
                await self.poll_once(LONG_POLL)
                delay = 0.5
            except BackendError as exc:
                if not is_transient(exc):
                    raise
                self.replica.net.down(str(exc))
                if not started:
                    task_status.started()  # offline start: serve what the store has
                    started = True
                with trio.move_on_after(delay):
                    await self.replica.net.wait_change()
                delay = min(delay * 2, 5.0)

    async def poll_once(self, wait: float) -> bool:
        """One long-poll; applies the answer if nothing local is pending. Returns whether
        the mirror is caught up with the server."""
        await self._wait_journal_empty()
        cursors = self.cursors()
        answer = await self.backend.changes(cursors, wait=wait, limit=PAGE)
        self.replica.net.up()
        with self.store.read() as t:
            if t.journal_len():
                return False  # local ops first; this answer is asked for again later
        more = False
        for space, page in answer.spaces.items():
            if page.changes:
                inv = self.apply(space, page.changes, page.cursor)
                self.replica.notify(inv)
            more = more or page.more
        if not more:
            self.caught_up.set()
        return not more

    async def _wait_journal_empty(self) -> None:
        while True:
            with self.store.read() as t:
                if not t.journal_len():
                    return
            await self.replica.wait_idle()

    # ------------------------------------------------------------------ snapshot

    async def resync(self, space: str) -> None:
        """Rebuilds the space's mirror from a server snapshot (when nothing is pending)."""
        nodes: list[TreeNode] = []
        first = await self.backend.tree(space, limit=PAGE)
        nodes += first.nodes
        after = first.next
        while after:
            page = await self.backend.tree(space, at=first.seq, after=after, limit=PAGE)
            nodes += page.nodes
            after = page.next
        self.replica.net.up()
        if not self.replica.idle():
            return  # local work arrived meanwhile; try again when it is committed
        held = {n for s, n in self.replica.state.held if s == space}
        versions = {tree_node.state.node: tree_node.state.version for tree_node in nodes}
        with self.store.write() as t:
            kept = {n: t.node(space, n) for n in held}
            gone = {n for n, node in kept.items() if node is not None and n not in versions}
            manifests = {n: t.manifest_bytes(space, n) for n in gone}
            # files whose pages copy a version the server still has keep them
            paged = {n.id for n in t.nodes(space)
                     if n.flags & Flag.PAGED and versions.get(n.id) == n.version}
            t.clear_space_tree(space, keep=paged | gone)
            for tree_node in nodes:
                state = tree_node.state
                fresh = node_from_state(space, state, state.attrs.mtime_ns)
                if state.node in paged:
                    fresh = fresh.but(flags=fresh.flags | Flag.PAGED)
                t.put_node(fresh)
                t.put_manifest_bytes(space, state.node, encode_manifest(state.chunks or []))
                for entry in tree_node.entries:
                    t.add_entry(space, entry.parent, entry.name, state.node)
            for node_id in gone:
                # open but gone: readable until closed, as it was
                t.put_node(kept[node_id])
                t.put_manifest_bytes(space, node_id, manifests[node_id])
            t.set_meta_int(f"cursor:{space}", first.seq)
        self.replica.state.needs_resync.discard(space)
        self.replica.content.forget_all()
        log.info("mirrored space %s at seq %d (%d nodes)", space, first.seq, len(nodes))
        self.replica.notify(([(space, "*")], []))

    # ------------------------------------------------------------------ changes

    def apply(self, space: str, changes: list[Change], cursor: int) -> Invalidation:
        nodes: list[tuple[str, str]] = []
        entries: list[tuple[str, str, str]] = []
        orphans: list[str] = []
        with self.store.write() as t:
            for change in changes:
                self._apply_one(t, space, change, nodes, entries, orphans)
            t.set_meta_int(f"cursor:{space}", cursor)
            t.set_meta_int("last_sync_ms", int(time.time() * 1000))
        self.applied += len(changes)
        for node_id, _ in nodes:
            self.replica.content.forget(space, node_id)
        for node_id in orphans:
            self.replica.collect_orphan(space, node_id)
        return [(space, n) for n, _ in nodes], entries

    def _apply_one(
        self, t: Txn, space: str, c: Change, nodes: list, entries: list, orphans: list
    ) -> None:
        if t.take_applied(space, c.seq):
            return  # this device's own commit, applied when it was committed
        ctime = int(c.time * 1e9)
        if c.state is not None:
            self._apply_state(t, space, c, ctime, nodes)
        if c.op in ("mkdir", "create", "symlink", "special", "link") or (
            c.op == "restore" and c.parent is not None
        ):
            if t.child(space, c.parent, c.name) is None:
                t.add_entry(space, c.parent, c.name, c.node)
                entries.append((space, c.parent, c.name))
        elif c.op in ("unlink", "rmdir"):
            if t.child(space, c.parent, c.name) == c.node:
                t.remove_entry(space, c.parent, c.name)
                entries.append((space, c.parent, c.name))
            orphans.append(c.node)
        elif c.op == "move":
            self._apply_move(t, space, c, entries, orphans)

    def _apply_state(self, t: Txn, space: str, c: Change, ctime: int, nodes: list) -> None:
        state = c.state
        assert state is not None
        node = t.node(space, c.node)
        if node is not None and node.version >= state.version:
            return  # our own commit coming back, or older than what we have
        if node is not None and node.flags & Flag.DIRTY:
            log.info("remote change to %s skipped: it has local writes", c.node)
            return
        fresh = node_from_state(space, state, ctime)
        flags = node.flags & ~Flag.DIRTY if node is not None else Flag.NONE
        if state.chunks is None and node is not None:
            # setattr: content unchanged
            fresh = fresh.but(size=node.size)
        else:
            t.put_manifest_bytes(space, c.node, encode_manifest(state.chunks or []))
            if flags & Flag.PAGED:
                t.drop_clean_pages(space, c.node)  # they hold the content replaced
                flags &= ~Flag.PAGED
        if node is not None:
            fresh = fresh.but(flags=flags, floor=NO_FLOOR, gen=node.gen + 1)
        t.put_node(fresh)
        nodes.append((c.node, state.version))

    @staticmethod
    def _apply_move(t: Txn, space: str, c: Change, entries: list, orphans: list) -> None:
        if t.child(space, c.parent, c.name) == c.node:
            t.remove_entry(space, c.parent, c.name)
        if c.exchange and c.replaced:
            if t.child(space, c.new_parent, c.new_name) == c.replaced:
                t.remove_entry(space, c.new_parent, c.new_name)
            if t.child(space, c.parent, c.name) is None:
                t.add_entry(space, c.parent, c.name, c.replaced)
        current = t.child(space, c.new_parent, c.new_name)
        if current is not None and current != c.node:
            t.remove_entry(space, c.new_parent, c.new_name)
            orphans.append(current)
        if current != c.node:
            t.add_entry(space, c.new_parent, c.new_name, c.node)
        entries += [(space, c.parent, c.name), (space, c.new_parent, c.new_name)]
