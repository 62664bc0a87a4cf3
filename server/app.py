"""The ASGI application: lifespan (open stores, start GC) and dispatch.

Dispatch order for every request: route match (404/405) → device token (401) →
membership of the `{space}` in the path (404 for non-members, so existence is not
revealed; 403 below the route's role) → body size (413) → body validation (400) →
handler. ApiError becomes its JSON answer; store failures a 503/507 without details;
anything else is a bug: logged with its traceback, answered with a bare 500.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from pydantic import BaseModel, ValidationError

from loft.protocol import ErrorCode
from server import gc
from server.accounts import authenticate
from server.blobs import DirectoryBlobStore
from server.chunks import ChunkRecorder
from server.db import Database
from server.errors import ApiError, BlobStoreError, StorageFull, StoreError, not_found
from server.http import (
    ROLE_RANK,
    Request,
    Response,
    Router,
    error_response,
    parse_query,
    validation_error,
)
from server.notify import Notifier
from server.openapi import build
from server.routes import ROUTES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    default_quota: int = 1 << 40
    #: How long an unreferenced chunk is kept (uploads in flight commit within it).
    gc_grace: float = 6 * 3600.0
    gc_interval: float = 600.0


@dataclass
class Context:
    config: ServerConfig
    db: Database
    blobs: DirectoryBlobStore
    notifier: Notifier
    secret: bytes
    openapi: bytes
    chunk_rows: ChunkRecorder


def _secret(conn: sqlite3.Connection) -> bytes:
    row = conn.execute("SELECT value FROM meta WHERE key = 'secret'").fetchone()
    if row:
        return bytes.fromhex(row[0])
    secret = secrets.token_bytes(32)
    conn.execute("INSERT INTO meta (key, value) VALUES ('secret', ?)", (secret.hex(),))
    return secret


class App:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.router = Router(ROUTES)
        self.ctx: Context | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Context]:
        """Opens the stores and runs the background collector for the app's lifetime."""
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(self.config.data_dir / "meta.sqlite")
        try:
            ctx = Context(
                config=self.config,
                db=db,
                blobs=DirectoryBlobStore(self.config.data_dir / "blobs"),
                notifier=Notifier(),
                secret=db.write_sync(_secret),
                openapi=json.dumps(build(ROUTES)).encode(),
                chunk_rows=ChunkRecorder(db),
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    gc.run_collector, db, ctx.blobs, self.config.gc_grace, self.config.gc_interval
                )
                self.ctx = ctx
                try:
                    yield ctx
                finally:
                    self.ctx = None
                    nursery.cancel_scope.cancel()
        finally:
            db.close()

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            body = _Body(receive)
            response = await self._dispatch(scope, body)
            try:
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status,
                        "headers": [
                            (b"content-type", response.content_type.encode()),
                            (b"content-length", str(len(response.body)).encode()),
                            *response.headers,
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": response.body})
            except trio.BusyResourceError:
                # The client hung up while the answer went out. hypercorn (0.18) then
                # half-closes the socket from its reading task without the send lock,
                # so the last send of the answer can find the socket busy. Nothing is
                # left to tell a client that has gone.
                log.debug("client left during the answer to %s %s", scope["method"],
                          scope["path"])

    async def _lifespan(self, receive, send) -> None:
        await receive()  # lifespan.startup
        try:
            async with self.running():
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
        except (StoreError, OSError) as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})

    async def _dispatch(self, scope: dict[str, Any], body: _Body) -> Response:
        ctx = self.ctx
        assert ctx is not None, "the app serves only while running()"
        try:
            return await self._handle(ctx, scope, body)
        except ApiError as err:
            response = error_response(err)
            # Answered before the body was read: a client still sending it would see a
            # reset instead of the answer, so read and drop the rest first (bounded).
            if not await body.drain():
                response.headers.append((b"connection", b"close"))
            return response
        except StorageFull as exc:
            log.warning("%s", exc)
            return error_response(ApiError(507, ErrorCode.INTERNAL, "the server is out of space"))
        except (StoreError, BlobStoreError) as exc:
            log.error("storage failure on %s %s: %s", scope["method"], scope["path"], exc)
            return error_response(ApiError(503, ErrorCode.INTERNAL, "storage unavailable"))
        except Exception:
            log.exception("bug while serving %s %s", scope["method"], scope["path"])
            return error_response(ApiError(500, ErrorCode.INTERNAL, "internal error"))

    async def _handle(self, ctx: Context, scope: dict[str, Any], body: _Body) -> Response:
        route, params = self.router.match(scope["method"], scope["path"])
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        req = Request(
            method=scope["method"],
            path=scope["path"],
            params=params,
            query=parse_query(scope.get("query_string", b"")),
            headers=headers,
            body=b"",
        )
        if route.auth:
            req.caller, req.role = await authenticate(
                ctx, headers.get("authorization"), params.get("space")
            )
        if route.role is not None:
            if req.role is None:
                raise not_found("no such space")
            if ROLE_RANK[req.role] < ROLE_RANK[route.role]:
                raise ApiError(
                    403,
                    ErrorCode.FORBIDDEN,
                    f"this needs the {route.role} role; you are {req.role}",
                )
        req.body = await body.read(headers, route.body_limit)
        if isinstance(route.body, type) and issubclass(route.body, BaseModel):
            try:
                req.model = route.body.model_validate_json(req.body)
            except ValidationError as exc:
                raise validation_error(exc) from None
        return await route.handler(ctx, req)


class _Body:
    """The request body, read at most once. An error answered before the body was read
    first drains it (bounded), because a client still sending would miss the answer."""

    DRAIN_BYTES = 80 * 1024 * 1024
    DRAIN_SECONDS = 10.0
    DRAIN_IDLE = 0.5

    def __init__(self, receive) -> None:
        self.receive = receive
        self.done = False

    async def read(self, headers: dict[str, str], limit: int) -> bytes:
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, ErrorCode.INVALID, "bad content-length")
            if int(declared) > limit:
                raise ApiError(413, ErrorCode.TOO_LARGE, f"the body is over {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.done = True
                raise ApiError(400, ErrorCode.INVALID, "client went away")
            part = message.get("body", b"")
            size += len(part)
            if not message.get("more_body", False):
                self.done = True
            if size > limit:
                raise ApiError(413, ErrorCode.TOO_LARGE, f"the body is over {limit} bytes")
            chunks.append(part)
            if self.done:
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def drain(self) -> bool:
        """Reads and drops what is left of the body; False if it was not all read: over
        DRAIN_BYTES or DRAIN_SECONDS, or nothing arrived for DRAIN_IDLE (a client that
        declared a body but waits for the answer before sending it)."""
        left = self.DRAIN_BYTES
        with trio.move_on_after(self.DRAIN_SECONDS):
            while not self.done and left > 0:
                with trio.move_on_after(self.DRAIN_IDLE) as idle:
                    message = await self.receive()
                if idle.cancelled_caught:
                    break
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    self.done = True
                left -= len(message.get("body", b""))
        return self.done
