"""Spaces and memberships: list, create, members add/remove. A space's key is sealed to
each member's public key by the client; the server stores those blobs and nothing more.
"""

from __future__ import annotations

import sqlite3
import time
import uuid

from loft.protocol import (
    ROOT_NODE,
    CreateSpaceRequest,
    ErrorCode,
    Member,
    MemberAddRequest,
    MemberList,
    Role,
    SpaceInfo,
    SpaceList,
)
from server.errors import ApiError, not_found
from server.http import Request, Response, json_response


def create_space_rows(
    conn: sqlite3.Connection, space_id: str, owner: int, name: str, wrapped_key: bytes, now: float
) -> None:
    """Inserts a space, the owner's membership and the root directory (version 0)."""
    conn.execute(
        "INSERT INTO spaces (id, owner, name, head, created) VALUES (?, ?, ?, 0, ?)",
        (space_id, owner, name, now),
    )
    conn.execute(
        "INSERT INTO memberships (space_id, user_id, role, wrapped_key) VALUES (?, ?, 'owner', ?)",
        (space_id, owner, wrapped_key),
    )
    conn.execute(
        "INSERT INTO nodes (space_id, id, kind, version, created_seq) VALUES (?, ?, 'dir', 0, 0)",
        (space_id, ROOT_NODE),
    )
    conn.execute(
        "INSERT INTO versions (space_id, node, seq, time, device, size, mode, uid, gid,"
        " mtime_ns, xattrs, content_seq) VALUES (?, ?, 0, ?, '', 0, ?, 0, 0, ?, '{}', 0)",
        (space_id, ROOT_NODE, now, 0o755, int(now * 1e9)),
    )


def role_of(conn: sqlite3.Connection, space_id: str, user_id: int) -> Role | None:
    row = conn.execute(
        "SELECT role FROM memberships WHERE space_id = ? AND user_id = ?", (space_id, user_id)
    ).fetchone()
    return row[0] if row else None


_SPACE_COLUMNS = (
    "SELECT s.id, s.name, u.name, m.role, m.wrapped_key, s.head, m.mount_parent, m.mount_name"
    " FROM memberships m JOIN spaces s ON s.id = m.space_id JOIN users u ON u.id = s.owner"
)


def _space_info(row: tuple) -> SpaceInfo:
    return SpaceInfo(
        id=row[0],
        name=row[1],
        owner=row[2],
        role=row[3],
        wrapped_key=row[4],
        head=row[5],
        mount_parent=row[6],
        mount_name=row[7],
    )


async def list_spaces(ctx, req: Request) -> Response:
    def tx(conn: sqlite3.Connection) -> SpaceList:
        rows = conn.execute(
            _SPACE_COLUMNS + " WHERE m.user_id = ? ORDER BY s.created", (req.user.user_id,)
        ).fetchall()
        return SpaceList(spaces=[_space_info(r) for r in rows])

    return json_response(await ctx.db.read(tx))


async def get_space(ctx, req: Request) -> Response:
    def tx(conn: sqlite3.Connection) -> SpaceInfo:
        row = conn.execute(
            _SPACE_COLUMNS + " WHERE m.user_id = ? AND s.id = ?",
            (req.user.user_id, req.params["space"]),
        ).fetchone()
        return _space_info(row)

    return json_response(await ctx.db.read(tx))


async def create_space(ctx, req: Request) -> Response:
    body: CreateSpaceRequest = req.model
    space_id = str(uuid.uuid4())

    def tx(conn: sqlite3.Connection) -> SpaceInfo:
        create_space_rows(
            conn, space_id, req.user.user_id, body.name, body.wrapped_key, time.time()
        )
        row = conn.execute(
            _SPACE_COLUMNS + " WHERE m.user_id = ? AND s.id = ?", (req.user.user_id, space_id)
        ).fetchone()
        return _space_info(row)

    return json_response(await ctx.db.write(tx), status=201)


async def list_members(ctx, req: Request) -> Response:
    def tx(conn: sqlite3.Connection) -> MemberList:
        rows = conn.execute(
            "SELECT u.name, m.role FROM memberships m JOIN users u ON u.id = m.user_id"
            " WHERE m.space_id = ? ORDER BY u.name",
            (req.params["space"],),
        ).fetchall()
        return MemberList(members=[Member(user=r[0], role=r[1]) for r in rows])

    return json_response(await ctx.db.read(tx))


async def add_member(ctx, req: Request) -> Response:
    body: MemberAddRequest = req.model
    space_id = req.params["space"]

    def tx(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT id FROM users WHERE name = ?", (body.user,)).fetchone()
        if row is None:
            raise not_found("no such user")
        current = role_of(conn, space_id, row[0])
        if current == "owner":
            raise ApiError(409, ErrorCode.CONFLICT, "the owner's role cannot change")
        conn.execute(
            "INSERT INTO memberships (space_id, user_id, role, wrapped_key) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (space_id, user_id) DO UPDATE SET role = excluded.role,"
            " wrapped_key = excluded.wrapped_key",
            (space_id, row[0], body.role, body.wrapped_key),
        )
        return row[0]

    user_id = await ctx.db.write(tx)
    ctx.notifier.notify_user(user_id)
    return json_response(Member(user=body.user, role=body.role))


async def remove_member(ctx, req: Request) -> Response:
    space_id, name = req.params["space"], req.params["user"]

    def tx(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT id FROM users WHERE name = ?", (name,)).fetchone()
        if row is None or role_of(conn, space_id, row[0]) is None:
            raise not_found("no such member")
        if row[0] != req.user.user_id and req.role != "owner":
            raise ApiError(403, ErrorCode.FORBIDDEN, "only the owner removes other members")
        if role_of(conn, space_id, row[0]) == "owner":
            raise ApiError(409, ErrorCode.CONFLICT, "the owner cannot leave their space")
        conn.execute(
            "DELETE FROM memberships WHERE space_id = ? AND user_id = ?", (space_id, row[0])
        )
        return row[0]

    user_id = await ctx.db.write(tx)
    ctx.notifier.notify_user(user_id)
    return Response(204)
