"""Accounts and devices: sign-up, pre-login, login, token checks, device list/revoke.

The server never sees the password or any key that opens data: the client sends an
auth key derived from the password, of which only a slow hash (scrypt) is kept. Tokens
are random and stored as their SHA-256.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
import uuid

import trio

from loft.protocol import (
    Device,
    DeviceList,
    ErrorCode,
    KdfParams,
    LoginRequest,
    LoginResponse,
    PreloginRequest,
    PreloginResponse,
    Role,
    SignupRequest,
    UserKey,
)
from server.errors import ApiError, not_found, unauthorized
from server.http import Caller, Request, Response, json_response
from server.spaces import create_space_rows, role_of

# The slow hash of auth keys. The auth key is already a 256-bit secret, so this guards
# only against a stolen database being used to log in; ~40 ms here.
AUTH_HASH = {"n": 2**14, "r": 8, "p": 1, "maxmem": 64 * 1024 * 1024}
# What pre-login answers for an unknown name (the salt is derived from the name).
DECOY_KDF = {"n": 2**15, "r": 8, "p": 1}
LAST_SEEN_EVERY = 60.0


def _auth_hash(auth_key: bytes, salt: bytes) -> bytes:
    return hashlib.scrypt(auth_key, salt=salt, dklen=32, **AUTH_HASH)


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _new_device(conn: sqlite3.Connection, user_id: int, name: str, now: float) -> tuple[str, str]:
    token = "lft_" + secrets.token_urlsafe(32)
    device_id = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO devices (id, user_id, name, token_hash, created, last_seen)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (device_id, user_id, name, _token_hash(token), now, now),
    )
    return device_id, token


# ------------------------------------------------------------------------- endpoints


async def signup(ctx, req: Request) -> Response:
    body: SignupRequest = req.model
    salt = secrets.token_bytes(16)
    auth_hash = await trio.to_thread.run_sync(_auth_hash, body.auth_key, salt)
    home = str(uuid.uuid4())

    def tx(conn: sqlite3.Connection) -> LoginResponse:
        now = time.time()
        if conn.execute("SELECT 1 FROM users WHERE name = ?", (body.name,)).fetchone():
            raise ApiError(409, ErrorCode.USER_EXISTS, f"the name {body.name!r} is taken")
        cur = conn.execute(
            "INSERT INTO users (name, auth_hash, auth_salt, kdf, public_key,"
            " wrapped_private_key, quota_bytes, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                body.name,
                auth_hash,
                salt,
                body.kdf.model_dump_json(),
                body.public_key,
                body.wrapped_private_key,
                ctx.config.default_quota,
                now,
            ),
        )
        user_id = cur.lastrowid
        assert user_id is not None
        create_space_rows(conn, home, user_id, "home", body.home_space_key, now)
        device_id, token = _new_device(conn, user_id, body.device_name, now)
        return LoginResponse(
            user_id=user_id,
            user=body.name,
            device_id=device_id,
            token=token,
            public_key=body.public_key,
            wrapped_private_key=body.wrapped_private_key,
            home_space=home,
        )

    return json_response(await ctx.db.write(tx), status=201)


async def prelogin(ctx, req: Request) -> Response:
    body: PreloginRequest = req.model

    def tx(conn: sqlite3.Connection) -> str | None:
        row = conn.execute("SELECT kdf FROM users WHERE name = ?", (body.name,)).fetchone()
        return row[0] if row else None

    kdf_json = await ctx.db.read(tx)
    if kdf_json is not None:
        kdf = KdfParams.model_validate_json(kdf_json)
    else:
        # Same shape for unknown names, and the same answer every time, so that
        # accounts cannot be probed.
        salt = hmac.new(ctx.secret, b"decoy-salt:" + body.name.encode(), "sha256").digest()
        kdf = KdfParams(salt=salt[:16], **DECOY_KDF)
    return json_response(PreloginResponse(kdf=kdf))


async def login(ctx, req: Request) -> Response:
    body: LoginRequest = req.model

    def lookup(conn: sqlite3.Connection) -> tuple | None:
        return conn.execute(
            "SELECT id, auth_hash, auth_salt, public_key, wrapped_private_key"
            " FROM users WHERE name = ?",
            (body.name,),
        ).fetchone()

    row = await ctx.db.read(lookup)
    salt = row[2] if row else ctx.secret[:16]
    computed = await trio.to_thread.run_sync(_auth_hash, body.auth_key, salt)
    if row is None or not hmac.compare_digest(computed, row[1]):
        raise ApiError(401, ErrorCode.BAD_CREDENTIALS, "wrong user name or password")
    user_id = row[0]

    def tx(conn: sqlite3.Connection) -> LoginResponse:
        device_id, token = _new_device(conn, user_id, body.device_name, time.time())
        home = conn.execute(
            "SELECT s.id FROM spaces s JOIN memberships m ON m.space_id = s.id"
            " WHERE m.user_id = ? AND s.owner = ? AND m.mount_parent IS NULL"
            " ORDER BY s.created LIMIT 1",
            (user_id, user_id),
        ).fetchone()[0]
        return LoginResponse(
            user_id=user_id,
            user=body.name,
            device_id=device_id,
            token=token,
            public_key=row[3],
            wrapped_private_key=row[4],
            home_space=home,
        )

    return json_response(await ctx.db.write(tx))


async def logout(ctx, req: Request) -> Response:
    await _revoke(ctx, req.user, req.user.device_id)
    return Response(204)


async def list_devices(ctx, req: Request) -> Response:
    me = req.user

    def tx(conn: sqlite3.Connection) -> DeviceList:
        rows = conn.execute(
            "SELECT id, name, created, last_seen, revoked FROM devices WHERE user_id = ?"
            " ORDER BY created",
            (me.user_id,),
        ).fetchall()
        return DeviceList(
            devices=[
                Device(
                    id=r[0],
                    name=r[1],
                    created=r[2],
                    last_seen=r[3],
                    revoked=r[4],
                    current=r[0] == me.device_id,
                )
                for r in rows
            ]
        )

    return json_response(await ctx.db.read(tx))


async def revoke_device(ctx, req: Request) -> Response:
    await _revoke(ctx, req.user, req.params["device"])
    return Response(204)


async def _revoke(ctx, me: Caller, device_id: str) -> None:
    def tx(conn: sqlite3.Connection) -> None:
        cur = conn.execute(
            "UPDATE devices SET revoked = ? WHERE id = ? AND user_id = ? AND revoked IS NULL",
            (time.time(), device_id, me.user_id),
        )
        if (
            cur.rowcount == 0
            and not conn.execute(
                "SELECT 1 FROM devices WHERE id = ? AND user_id = ?", (device_id, me.user_id)
            ).fetchone()
        ):
            raise not_found("no such device")

    await ctx.db.write(tx)


async def user_key(ctx, req: Request) -> Response:
    name = req.params["user"]

    def tx(conn: sqlite3.Connection) -> bytes | None:
        row = conn.execute("SELECT public_key FROM users WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    key = await ctx.db.read(tx)
    if key is None:
        raise not_found("no such user")
    return json_response(UserKey(name=name, public_key=key))


# ------------------------------------------------------------------------- tokens


async def authenticate(
    ctx, authorization: str | None, space_id: str | None = None
) -> tuple[Caller, Role | None]:
    """The caller a bearer token belongs to, and their role in `space_id` (None: not a
    member, or no space asked for), in one read. 401 for a missing, unknown or revoked
    token."""
    if not authorization or not authorization.startswith("Bearer "):
        raise unauthorized()
    token_hash = _token_hash(authorization[7:].strip())

    def tx(conn: sqlite3.Connection) -> tuple[tuple | None, Role | None]:
        row = conn.execute(
            "SELECT d.id, d.user_id, u.name, d.last_seen FROM devices d"
            " JOIN users u ON u.id = d.user_id"
            " WHERE d.token_hash = ? AND d.revoked IS NULL",
            (token_hash,),
        ).fetchone()
        if row is None or space_id is None:
            return row, None
        return row, role_of(conn, space_id, row[1])

    row, role = await ctx.db.read(tx)
    if row is None:
        raise unauthorized("unknown or revoked device token")
    now = time.time()
    if now - row[3] > LAST_SEEN_EVERY:
        await ctx.db.write(_touch_device, row[0], now)
    return Caller(user_id=row[1], user_name=row[2], device_id=row[0]), role


def _touch_device(conn: sqlite3.Connection, device_id: str, now: float) -> None:
    conn.execute("UPDATE devices SET last_seen = ? WHERE id = ?", (now, device_id))
