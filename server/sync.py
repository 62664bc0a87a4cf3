"""Commit, the change feed (long-poll), tree snapshots, versions and the trash."""

from __future__ import annotations

import sqlite3
import time

import trio

from loft.protocol import (
    ROOT_NODE,
    ChangesRequest,
    CommitRequest,
    EntryRef,
    NodeState,
    TrashItem,
    TrashList,
    TreeNode,
    TreeResponse,
    VersionInfo,
    VersionList,
)
from server.commit import apply_commit, attrs_of, decode_manifest
from server.errors import not_found
from server.http import Request, Response, dumps, json_response, raw_json_response

TREE_PAGE = 1000


async def commit(ctx, req: Request) -> Response:
    body: CommitRequest = req.model
    space_id = req.params["space"]
    response, added = await ctx.db.write(
        apply_commit, space_id, req.user.device_id, time.time(), body
    )
    if added:
        ctx.notifier.notify_space(space_id)
    return json_response(response)


# ------------------------------------------------------------------------- changes


def _read_changes(
    conn: sqlite3.Connection, user_id: int, cursors: dict[str, int], limit: int
) -> tuple[bytes, bool]:
    """The feed's answer as JSON bytes (journal rows are spliced in as stored), and
    whether it carries anything."""
    member = {
        r[0] for r in conn.execute("SELECT space_id FROM memberships WHERE user_id = ?", (user_id,))
    }
    strangers = [s for s in cursors if s not in member]
    if strangers:
        raise not_found(f"no space {strangers[0]}")
    parts: list[bytes] = []
    anything = False
    for space_id, cursor in cursors.items():
        rows = conn.execute(
            "SELECT seq, change FROM journal WHERE space_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (space_id, cursor, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        anything = anything or bool(rows)
        last = rows[-1][0] if rows else cursor
        changes = ",".join(r[1] for r in rows)
        parts.append(
            b'"%s":{"changes":[%s],"cursor":%d,"more":%s}'
            % (space_id.encode(), changes.encode(), last, b"true" if more else b"false")
        )
    unknown = sorted(member - cursors.keys())
    anything = anything or bool(unknown)
    body = b'{"spaces":{%s},"unknown_spaces":%s}' % (b",".join(parts), dumps(unknown))
    return body, anything


async def changes(ctx, req: Request) -> Response:
    body: ChangesRequest = req.model
    cursors = dict(body.cursors)
    deadline = trio.current_time() + body.wait
    while True:
        with ctx.notifier.watch(cursors, req.user.user_id) as event:
            answer, anything = await ctx.db.read(
                _read_changes, req.user.user_id, cursors, body.limit
            )
            if anything or trio.current_time() >= deadline:
                return raw_json_response(answer)
            with trio.move_on_at(deadline):
                await event.wait()


# ------------------------------------------------------------------------- tree


def _state_at(
    conn: sqlite3.Connection, space_id: str, node: str, kind: str, at: int
) -> NodeState | None:
    row = conn.execute(
        "SELECT seq, mode, uid, gid, mtime_ns, xattrs, size, target, special, rdev, content_seq"
        " FROM versions WHERE space_id = ? AND node = ? AND seq <= ? ORDER BY seq DESC LIMIT 1",
        (space_id, node, at),
    ).fetchone()
    if row is None:
        return None
    manifest = conn.execute(
        "SELECT manifest FROM versions WHERE space_id = ? AND node = ? AND seq = ?",
        (space_id, node, row[10]),
    ).fetchone()
    return NodeState(
        node=node,
        kind=kind,
        version=row[0],
        attrs=attrs_of(row[1:6]),
        size=row[6],
        chunks=decode_manifest(manifest[0] if manifest else None),
        target=row[7],
        special=row[8],
        rdev=row[9],
    )


def _read_tree(
    conn: sqlite3.Connection, space_id: str, at: int | None, after: str | None, limit: int
) -> TreeResponse:
    head = conn.execute("SELECT head FROM spaces WHERE id = ?", (space_id,)).fetchone()[0]
    at = head if at is None or at > head else at
    live = "created_seq <= :at AND (deleted_seq IS NULL OR deleted_seq > :at)"
    after = after or None
    args = {"space": space_id, "at": at, "after": after or "", "limit": limit}
    ids = [
        r[0]
        for r in conn.execute(
            f"SELECT DISTINCT node FROM entries WHERE space_id = :space AND {live}"
            " AND node > :after ORDER BY node LIMIT :limit",
            args,
        )
    ]
    nodes: list[TreeNode] = []
    if after is None:
        nodes.append(TreeNode(state=_state_at(conn, space_id, ROOT_NODE, "dir", at), entries=[]))
    for node in ids:
        kind = conn.execute(
            "SELECT kind FROM nodes WHERE space_id = ? AND id = ?", (space_id, node)
        ).fetchone()[0]
        entries = conn.execute(
            f"SELECT parent, name FROM entries WHERE space_id = :space AND node = :node"
            f" AND {live} ORDER BY parent, name",
            {**args, "node": node},
        ).fetchall()
        state = _state_at(conn, space_id, node, kind, at)
        if state is not None:
            nodes.append(
                TreeNode(state=state, entries=[EntryRef(parent=p, name=n) for p, n in entries])
            )
    return TreeResponse(
        space=space_id, seq=at, nodes=nodes, next=ids[-1] if len(ids) == limit else None
    )


async def tree(ctx, req: Request) -> Response:
    at = req.query_int("at")
    limit = req.query_int("limit", TREE_PAGE, lo=1, hi=10_000)
    return json_response(
        await ctx.db.read(_read_tree, req.params["space"], at, req.query_str("after"), limit)
    )


# ------------------------------------------------------------------------- versions


async def versions(ctx, req: Request) -> Response:
    space_id, node = req.params["space"], req.params["node"]

    def tx(conn: sqlite3.Connection) -> VersionList:
        row = conn.execute(
            "SELECT kind, version, deleted FROM nodes WHERE space_id = ? AND id = ?",
            (space_id, node),
        ).fetchone()
        if row is None:
            raise not_found("no such node")
        rows = conn.execute(
            "SELECT seq, time, device, size, mtime_ns FROM versions WHERE space_id = ?"
            " AND node = ? ORDER BY seq DESC",
            (space_id, node),
        ).fetchall()
        return VersionList(
            node=node,
            deleted=bool(row[2]),
            versions=[
                VersionInfo(
                    version=r[0],
                    time=r[1],
                    device=r[2],
                    kind=row[0],
                    size=r[3],
                    mtime_ns=r[4],
                    current=r[0] == row[1],
                )
                for r in rows
            ],
        )

    return json_response(await ctx.db.read(tx))


async def version(ctx, req: Request) -> Response:
    space_id, node = req.params["space"], req.params["node"]
    text = req.params["version"]
    if not text.isdigit() or len(text) > 18:
        raise not_found("no such version")
    seq = int(text)

    def tx(conn: sqlite3.Connection) -> NodeState:
        row = conn.execute(
            "SELECT kind FROM nodes WHERE space_id = ? AND id = ?", (space_id, node)
        ).fetchone()
        state = _state_at(conn, space_id, node, row[0], seq) if row else None
        if state is None or state.version != seq:
            raise not_found("no such version")
        return state

    return json_response(await ctx.db.read(tx))


async def trash(ctx, req: Request) -> Response:
    space_id = req.params["space"]

    def tx(conn: sqlite3.Connection) -> TrashList:
        rows = conn.execute(
            "SELECT n.id, e.parent, e.name, e.deleted_seq, n.version, n.size FROM nodes n"
            " JOIN entries e ON e.space_id = n.space_id AND e.node = n.id"
            " WHERE n.space_id = ? AND n.deleted = 1 AND e.deleted_seq = ("
            "   SELECT max(deleted_seq) FROM entries WHERE space_id = n.space_id"
            "   AND node = n.id)"
            " ORDER BY e.deleted_seq DESC LIMIT 1000",
            (space_id,),
        ).fetchall()
        return TrashList(
            items=[
                TrashItem(
                    node=r[0], parent=r[1], name=r[2], deleted_seq=r[3], version=r[4], size=r[5]
                )
                for r in rows
            ]
        )

    return json_response(await ctx.db.read(tx))
