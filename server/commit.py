"""Applying a commit: a batch of operations on one space, all or nothing.

Each op is checked against the state left by the ops before it (so one batch can mkdir a
folder and create files in it) inside a SAVEPOINT. A refused op is rolled back and
reported; the others are still checked, so the caller learns every conflict at once;
then, if any op was refused, the whole transaction rolls back (CommitRejected, 409).
Otherwise every op gets its own journal seq, the space's head moves, and the commit id is
remembered so a retry is answered without applying anything twice.

Invariants kept here:
- a live entry leads to a live node; a directory has at most one live entry;
- `nodes.version` is the seq of the node's newest version row;
- `chunks.refs` counts the version rows whose own manifest names the chunk, so a chunk is
  collectable only when no version of any node references it;
- `users.used_bytes` of the space owner is the sum of `nodes.size` over live files.
"""

from __future__ import annotations

import json
import sqlite3
import struct
from dataclasses import dataclass

from loft.protocol import (
    ROOT_NODE,
    Attrs,
    Change,
    ChunkRef,
    CommitRequest,
    CommitResponse,
    Content,
    CreateOp,
    LinkOp,
    MkdirOp,
    MoveOp,
    NodeState,
    OpCode,
    OpResult,
    RestoreOp,
    RmdirOp,
    SetattrOp,
    SpecialOp,
    SymlinkOp,
    UnlinkOp,
    UpdateOp,
)
from server.errors import CommitRejected

MANIFEST_ITEM = struct.Struct(">32sI")


def encode_manifest(chunks: list[ChunkRef]) -> bytes:
    return b"".join(MANIFEST_ITEM.pack(bytes.fromhex(c), n) for c, n in chunks)


def decode_manifest(blob: bytes | None) -> list[ChunkRef]:
    if not blob:
        return []
    return [(c.hex(), n) for c, n in MANIFEST_ITEM.iter_unpack(blob)]


class OpRefused(Exception):
    def __init__(self, code: OpCode, message: str, current: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.current = current


@dataclass
class NodeRow:
    id: str
    kind: str
    version: int
    size: int
    deleted: bool


def attrs_of(row: tuple) -> Attrs:
    """Attrs from (mode, uid, gid, mtime_ns, xattrs json)."""
    return Attrs(mode=row[0], uid=row[1], gid=row[2], mtime_ns=row[3], xattrs=json.loads(row[4]))


def _xattrs_json(attrs: Attrs) -> str:
    return json.dumps(
        {k: v for k, v in attrs.model_dump(mode="json")["xattrs"].items()}, separators=(",", ":")
    )


def apply_commit(
    conn: sqlite3.Connection, space_id: str, device_id: str, now: float, request: CommitRequest
) -> tuple[CommitResponse, int]:
    """Applies `request` to the space inside the caller's transaction. Returns the
    response and the number of journal entries added (0 for a replay)."""
    done = conn.execute(
        "SELECT first_seq, last_seq, seqs FROM commits WHERE space_id = ? AND commit_id = ?",
        (space_id, request.commit_id),
    ).fetchone()
    if done:
        seqs = json.loads(done[2])
        return CommitResponse(first_seq=done[0], last_seq=done[1], seqs=seqs, replayed=True), 0
    applier = _Applier(conn, space_id, device_id, now)
    first = applier.head + 1
    seqs = applier.apply_all(request)
    applier.finish()
    conn.execute(
        "INSERT INTO commits (space_id, commit_id, first_seq, last_seq, seqs, time)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (space_id, request.commit_id, first, applier.head, json.dumps(seqs), now),
    )
    response = CommitResponse(first_seq=first, last_seq=applier.head, seqs=seqs)
    return response, applier.head - first + 1


class _Applier:
    def __init__(self, conn: sqlite3.Connection, space_id: str, device_id: str, now: float) -> None:
        self.conn = conn
        self.space = space_id
        self.device = device_id
        self.now = now
        self.head, self.owner = conn.execute(
            "SELECT head, owner FROM spaces WHERE id = ?", (space_id,)
        ).fetchone()
        self.used, self.quota = conn.execute(
            "SELECT used_bytes, quota_bytes FROM users WHERE id = ?", (self.owner,)
        ).fetchone()
        self.changes: list[Change] = []

    # ------------------------------------------------------------------ driver

    def apply_all(self, request: CommitRequest) -> list[int | None]:
        """Applies every op; returns each op's seq (None for a no-op)."""
        results: list[OpResult] = []
        seqs: list[int | None] = []
        refused = False
        for index, op in enumerate(request.ops):
            saved = (self.head, self.used, len(self.changes))
            self.conn.execute("SAVEPOINT op")
            try:
                getattr(self, f"_{op.op}")(op)
            except OpRefused as r:
                self.conn.execute("ROLLBACK TO op")
                self.head, self.used, n = saved
                del self.changes[n:]
                refused = True
                results.append(
                    OpResult(index=index, code=r.code, message=r.message, current=r.current)
                )
            else:
                results.append(OpResult(index=index, code=OpCode.OK))
                seqs.append(self.head if self.head != saved[0] else None)
            self.conn.execute("RELEASE op")
        if refused:
            raise CommitRejected(results)
        return seqs

    def finish(self) -> None:
        self.conn.execute("UPDATE spaces SET head = ? WHERE id = ?", (self.head, self.space))
        self.conn.execute("UPDATE users SET used_bytes = ? WHERE id = ?", (self.used, self.owner))
        self.conn.executemany(
            "INSERT INTO journal (space_id, seq, change) VALUES (?, ?, ?)",
            [(self.space, c.seq, c.model_dump_json(exclude_defaults=True)) for c in self.changes],
        )

    def _next_seq(self) -> int:
        self.head += 1
        return self.head

    def _record(self, seq: int, op: str, node: str, **fields) -> None:
        self.changes.append(
            Change(seq=seq, time=self.now, device=self.device, op=op, node=node, **fields)
        )

    # ------------------------------------------------------------------ lookups

    def _node(self, node_id: str) -> NodeRow | None:
        row = self.conn.execute(
            "SELECT kind, version, size, deleted FROM nodes WHERE space_id = ? AND id = ?",
            (self.space, node_id),
        ).fetchone()
        return NodeRow(node_id, row[0], row[1], row[2], bool(row[3])) if row else None

    def _live_node(self, node_id: str) -> NodeRow:
        node = self._node(node_id)
        if node is None or node.deleted:
            raise OpRefused(OpCode.NO_SUCH_NODE, f"no node {node_id}")
        return node

    def _dir(self, node_id: str) -> NodeRow:
        node = self._live_node(node_id)
        if node.kind != "dir":
            raise OpRefused(OpCode.NOT_A_DIRECTORY, f"{node_id} is not a directory")
        return node

    def _entry(self, parent: str, name: str) -> str | None:
        row = self.conn.execute(
            "SELECT node FROM entries WHERE space_id = ? AND parent = ? AND name = ?"
            " AND deleted_seq IS NULL",
            (self.space, parent, name),
        ).fetchone()
        return row[0] if row else None

    def _expect_entry(self, parent: str, name: str, node: str) -> None:
        if self._entry(parent, name) != node:
            raise OpRefused(OpCode.NO_SUCH_ENTRY, f"{name!r} in {parent} is not {node}")

    def _expect_free(self, parent: str, name: str) -> None:
        if self._entry(parent, name) is not None:
            raise OpRefused(OpCode.NAME_TAKEN, f"{name!r} exists in {parent}")

    def _expect_base(self, node: NodeRow, base: int) -> None:
        if node.version != base:
            raise OpRefused(
                OpCode.STALE_BASE,
                f"{node.id} is at version {node.version}, not {base}",
                current=node.version,
            )

    def _live_entry_count(self, node_id: str) -> int:
        return self.conn.execute(
            "SELECT count(*) FROM entries WHERE space_id = ? AND node = ? AND deleted_seq IS NULL",
            (self.space, node_id),
        ).fetchone()[0]

    def _has_children(self, node_id: str) -> bool:
        return (
            self.conn.execute(
                "SELECT 1 FROM entries WHERE space_id = ? AND parent = ? AND deleted_seq IS NULL"
                " LIMIT 1",
                (self.space, node_id),
            ).fetchone()
            is not None
        )

    def _version_row(self, node_id: str, seq: int) -> tuple | None:
        return self.conn.execute(
            "SELECT mode, uid, gid, mtime_ns, xattrs, size, target, special, rdev, content_seq"
            " FROM versions WHERE space_id = ? AND node = ? AND seq = ?",
            (self.space, node_id, seq),
        ).fetchone()

    def _manifest(self, node_id: str, content_seq: int) -> list[ChunkRef]:
        row = self.conn.execute(
            "SELECT manifest FROM versions WHERE space_id = ? AND node = ? AND seq = ?",
            (self.space, node_id, content_seq),
        ).fetchone()
        return decode_manifest(row[0] if row else None)

    # ------------------------------------------------------------------ mutations

    def _add_entry(self, parent: str, name: str, node: str, seq: int) -> None:
        self.conn.execute(
            "INSERT INTO entries (space_id, parent, name, node, created_seq)"
            " VALUES (?, ?, ?, ?, ?)",
            (self.space, parent, name, node, seq),
        )

    def _remove_entry(self, parent: str, name: str, seq: int) -> None:
        self.conn.execute(
            "UPDATE entries SET deleted_seq = ? WHERE space_id = ? AND parent = ? AND name = ?"
            " AND deleted_seq IS NULL",
            (seq, self.space, parent, name),
        )

    def _charge(self, delta: int) -> None:
        if delta > 0 and self.used + delta > self.quota:
            over = self.used + delta - self.quota
            raise OpRefused(
                OpCode.QUOTA_EXCEEDED, f"quota of {self.quota} bytes exceeded by {over}"
            )
        self.used += delta

    @staticmethod
    def _check_size(content: Content) -> None:
        if sum(n for _, n in content.chunks) != content.size:
            raise OpRefused(OpCode.INVALID, "chunk lengths do not add up to the size")

    def _reference(self, content: Content) -> bytes:
        """Takes a reference on each distinct chunk the content names."""
        distinct = list({bytes.fromhex(c) for c, _ in content.chunks})
        present = 0
        for i in range(0, len(distinct), 500):
            part = distinct[i : i + 500]
            marks = ",".join("?" * len(part))
            present += self.conn.execute(
                f"UPDATE chunks SET refs = refs + 1 WHERE space_id = ? AND id IN ({marks})",
                (self.space, *part),
            ).rowcount
        if present != len(distinct):
            raise OpRefused(
                OpCode.MISSING_CHUNKS, f"{len(distinct) - present} referenced chunks are not stored"
            )
        return encode_manifest(content.chunks)

    def _version_like(self, node: str, seq: int, attrs: Attrs, old: tuple) -> None:
        """A new version with `attrs` and everything else (content, target, special) of
        the version row `old` (as `_version_row` reads it)."""
        self._new_version(
            node, seq, attrs, size=old[5], content_seq=old[9], target=old[6], special=old[7],
            rdev=old[8],
        )

    def _new_version(
        self,
        node: str,
        seq: int,
        attrs: Attrs,
        *,
        size: int = 0,
        content_seq: int | None = None,
        manifest: bytes | None = None,
        target: str | None = None,
        special: str | None = None,
        rdev: int = 0,
    ) -> None:
        self.conn.execute(
            "INSERT INTO versions (space_id, node, seq, time, device, size, mode, uid, gid,"
            " mtime_ns, xattrs, target, special, rdev, content_seq, manifest)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                self.space,
                node,
                seq,
                self.now,
                self.device,
                size,
                attrs.mode,
                attrs.uid,
                attrs.gid,
                attrs.mtime_ns,
                _xattrs_json(attrs),
                target,
                special,
                rdev,
                seq if content_seq is None else content_seq,
                manifest,
            ),
        )

    def _create_node(
        self,
        op,
        kind: str,
        *,
        content: Content | None = None,
        target: str | None = None,
        special: str | None = None,
        rdev: int = 0,
    ) -> None:
        if self._node(op.node) is not None:
            raise OpRefused(OpCode.NODE_EXISTS, f"node {op.node} exists")
        self._dir(op.parent)
        self._expect_free(op.parent, op.name)
        if content is not None:
            self._check_size(content)
        seq = self._next_seq()
        size = content.size if content else 0
        manifest = self._reference(content) if content and content.chunks else None
        self._charge(size)
        self.conn.execute(
            "INSERT INTO nodes (space_id, id, kind, version, size, created_seq)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (self.space, op.node, kind, seq, size, seq),
        )
        self._new_version(
            op.node,
            seq,
            op.attrs,
            size=size,
            manifest=manifest,
            target=target,
            special=special,
            rdev=rdev,
        )
        self._add_entry(op.parent, op.name, op.node, seq)
        state = NodeState(
            node=op.node,
            kind=kind,
            version=seq,
            attrs=op.attrs,
            size=size,
            chunks=content.chunks if content else [],
            target=target,
            special=special,
            rdev=rdev,
        )
        self._record(seq, op.op, op.node, parent=op.parent, name=op.name, state=state)

    # ------------------------------------------------------------------ ops

    def _mkdir(self, op: MkdirOp) -> None:
        self._create_node(op, "dir")

    def _create(self, op: CreateOp) -> None:
        self._create_node(op, "file", content=op.content)

    def _symlink(self, op: SymlinkOp) -> None:
        self._create_node(op, "symlink", target=op.target)

    def _special(self, op: SpecialOp) -> None:
        self._create_node(op, "special", special=op.special, rdev=op.rdev)

    def _update(self, op: UpdateOp) -> None:
        node = self._live_node(op.node)
        if node.kind != "file":
            raise OpRefused(
                OpCode.IS_A_DIRECTORY if node.kind == "dir" else OpCode.INVALID,
                f"{op.node} is a {node.kind}, not a file",
            )
        self._expect_base(node, op.base)
        self._check_size(op.content)
        attrs = op.attrs or attrs_of(self._version_row(op.node, node.version))
        seq = self._next_seq()
        manifest = self._reference(op.content) if op.content.chunks else None
        self._charge(op.content.size - node.size)
        self._new_version(op.node, seq, attrs, size=op.content.size, manifest=manifest)
        self.conn.execute(
            "UPDATE nodes SET version = ?, size = ? WHERE space_id = ? AND id = ?",
            (seq, op.content.size, self.space, op.node),
        )
        state = NodeState(
            node=op.node,
            kind="file",
            version=seq,
            attrs=attrs,
            size=op.content.size,
            chunks=op.content.chunks,
        )
        self._record(seq, "update", op.node, state=state)

    def _setattr(self, op: SetattrOp) -> None:
        node = self._live_node(op.node)
        self._expect_base(node, op.base)
        old = self._version_row(op.node, node.version)
        seq = self._next_seq()
        self._version_like(op.node, seq, op.attrs, old)
        self.conn.execute(
            "UPDATE nodes SET version = ? WHERE space_id = ? AND id = ?", (seq, self.space, op.node)
        )
        # chunks=None: the content is that of the previous version.
        state = NodeState(
            node=op.node,
            kind=node.kind,
            version=seq,
            attrs=op.attrs,
            size=old[5],
            chunks=None,
            target=old[6],
            special=old[7],
            rdev=old[8],
        )
        self._record(seq, "setattr", op.node, state=state)

    def _link(self, op: LinkOp) -> None:
        node = self._live_node(op.node)
        if node.kind == "dir":
            raise OpRefused(OpCode.IS_A_DIRECTORY, "directories cannot have hard links")
        self._dir(op.parent)
        self._expect_free(op.parent, op.name)
        seq = self._next_seq()
        self._add_entry(op.parent, op.name, op.node, seq)
        self._record(seq, "link", op.node, parent=op.parent, name=op.name)

    def _unlink(self, op: UnlinkOp) -> None:
        self._expect_entry(op.parent, op.name, op.node)
        node = self._live_node(op.node)
        if node.kind == "dir":
            raise OpRefused(OpCode.IS_A_DIRECTORY, f"{op.name!r} is a directory")
        self._expect_base(node, op.base)
        seq = self._next_seq()
        self._remove_entry(op.parent, op.name, seq)
        deleted = self._drop_if_orphan(node)
        self._record(seq, "unlink", op.node, parent=op.parent, name=op.name, deleted=deleted)

    def _rmdir(self, op: RmdirOp) -> None:
        self._expect_entry(op.parent, op.name, op.node)
        node = self._live_node(op.node)
        if node.kind != "dir":
            raise OpRefused(OpCode.NOT_A_DIRECTORY, f"{op.name!r} is not a directory")
        if self._has_children(op.node):
            raise OpRefused(OpCode.NOT_EMPTY, f"{op.name!r} is not empty")
        seq = self._next_seq()
        self._remove_entry(op.parent, op.name, seq)
        self._drop_if_orphan(node)
        self._record(seq, "rmdir", op.node, parent=op.parent, name=op.name, deleted=True)

    def _drop_if_orphan(self, node: NodeRow) -> bool:
        if self._live_entry_count(node.id):
            return False
        self.conn.execute(
            "UPDATE nodes SET deleted = 1 WHERE space_id = ? AND id = ?", (self.space, node.id)
        )
        self.used -= node.size
        return True

    def _move(self, op: MoveOp) -> None:
        self._expect_entry(op.parent, op.name, op.node)
        node = self._live_node(op.node)
        self._dir(op.new_parent)
        target = self._entry(op.new_parent, op.new_name)
        if (op.parent, op.name) == (op.new_parent, op.new_name) or target == op.node:
            return  # POSIX: renaming a name onto the same node does nothing
        if node.kind == "dir":
            self._refuse_cycle(op.node, op.new_parent)
        seq = self._next_seq()
        if op.exchange:
            if target is None:
                raise OpRefused(OpCode.NO_SUCH_ENTRY, f"nothing to exchange with {op.new_name!r}")
            if self._live_node(target).kind == "dir":
                self._refuse_cycle(target, op.parent)
            self._remove_entry(op.parent, op.name, seq)
            self._remove_entry(op.new_parent, op.new_name, seq)
            self._add_entry(op.parent, op.name, target, seq)
        else:
            if target is not None:
                self._replace(op, node, target, seq)
            elif op.replace is not None:
                raise OpRefused(OpCode.NO_SUCH_ENTRY, f"{op.new_name!r} to replace is gone")
            self._remove_entry(op.parent, op.name, seq)
        self._add_entry(op.new_parent, op.new_name, op.node, seq)
        self._record(seq, "move", op.node, parent=op.parent, name=op.name,
                     new_parent=op.new_parent, new_name=op.new_name, replaced=target,
                     exchange=op.exchange)

    def _replace(self, op: MoveOp, node: NodeRow, target: str, seq: int) -> None:
        """Removes the entry a rename-over replaces (POSIX rules on kinds)."""
        if op.replace != target:
            raise OpRefused(OpCode.NAME_TAKEN, f"{op.new_name!r} exists in {op.new_parent}")
        victim = self._live_node(target)
        if node.kind == "dir" and victim.kind != "dir":
            raise OpRefused(OpCode.NOT_A_DIRECTORY, f"{op.new_name!r} is not a directory")
        if node.kind != "dir" and victim.kind == "dir":
            raise OpRefused(OpCode.IS_A_DIRECTORY, f"{op.new_name!r} is a directory")
        if victim.kind == "dir" and self._has_children(target):
            raise OpRefused(OpCode.NOT_EMPTY, f"{op.new_name!r} is not empty")
        self._remove_entry(op.new_parent, op.new_name, seq)
        self._drop_if_orphan(victim)

    def _refuse_cycle(self, moving: str, new_parent: str) -> None:
        """Refuses to move directory `moving` into itself or a folder below it."""
        current = new_parent
        while current != ROOT_NODE:
            if current == moving:
                raise OpRefused(OpCode.CYCLE, "cannot move a directory into itself")
            row = self.conn.execute(
                "SELECT parent FROM entries WHERE space_id = ? AND node = ?"
                " AND deleted_seq IS NULL",
                (self.space, current),
            ).fetchone()
            if row is None:
                return
            current = row[0]
        if moving == ROOT_NODE:
            raise OpRefused(OpCode.CYCLE, "cannot move the root")

    def _restore(self, op: RestoreOp) -> None:
        node = self._node(op.node)
        if node is None:
            raise OpRefused(OpCode.NO_SUCH_NODE, f"no node {op.node}")
        if op.base is not None:
            self._expect_base(node, op.base)
        old = self._version_row(op.node, op.version)
        if old is None:
            raise OpRefused(OpCode.INVALID, f"{op.node} has no version {op.version}")
        seq = self._next_seq()
        entry: dict[str, str] = {}
        if node.deleted:
            parent, name = op.parent, op.name
            if parent is None or name is None:
                last = self.conn.execute(
                    "SELECT parent, name FROM entries WHERE space_id = ? AND node = ?"
                    " ORDER BY deleted_seq DESC LIMIT 1",
                    (self.space, op.node),
                ).fetchone()
                if last is None:
                    raise OpRefused(OpCode.NO_SUCH_ENTRY, f"{op.node} never had a name")
                parent, name = parent or last[0], name or last[1]
            self._dir(parent)
            self._expect_free(parent, name)
            self._add_entry(parent, name, op.node, seq)
            entry = {"parent": parent, "name": name}
            self._charge(old[5])
        else:
            self._charge(old[5] - node.size)
        attrs = attrs_of(old)
        self._version_like(op.node, seq, attrs, old)
        self.conn.execute(
            "UPDATE nodes SET version = ?, size = ?, deleted = 0 WHERE space_id = ? AND id = ?",
            (seq, old[5], self.space, op.node),
        )
        state = NodeState(
            node=op.node,
            kind=node.kind,
            version=seq,
            attrs=attrs,
            size=old[5],
            chunks=self._manifest(op.node, old[9]),
            target=old[6],
            special=old[7],
            rdev=old[8],
        )
        self._record(seq, "restore", op.node, state=state, **entry)
