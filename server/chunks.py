"""Chunk endpoints: which are missing, put one, get one, batch put, batch get.

A chunk body is a sealed blob; the server checks only its transport digest (BLAKE3 of
the body) and its size. A put is acknowledged after the blob is durable in the blob
store and recorded in the metadata store (refs 0, touched now: GC leaves it alone for
the grace period, time enough for the commit that references it).
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from functools import partial

import blake3
import trio

from loft.protocol import (
    DIGEST_HEADER,
    FRAME_DIGEST_BYTES,
    FRAME_HEAD,
    FRAME_MISSING,
    MAX_BATCH_BODY_BYTES,
    MAX_BLOB_BYTES,
    MAX_READ_AHEAD_IDS,
    READ_AHEAD_HEADER,
    ChunkIds,
    ErrorCode,
    PutResult,
)
from server.errors import ApiError
from server.http import Request, Response, json_response

_HEX_ID = re.compile(r"^[0-9a-f]{64}$")
#: read-ahead hints being acted on at once (each one thread, see get_chunk)
ADVISING = 4
_advising = threading.BoundedSemaphore(ADVISING)


def _chunk_id(req: Request) -> str:
    chunk_id = req.params["chunk"]
    if not _HEX_ID.match(chunk_id):
        raise ApiError(400, ErrorCode.INVALID, "a chunk id is 64 lowercase hex digits")
    return chunk_id


def _record(conn: sqlite3.Connection, rows: list[tuple[str, bytes, int]], now: float) -> None:
    conn.executemany(
        "INSERT INTO chunks (space_id, id, size, touched) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (space_id, id) DO UPDATE SET touched = excluded.touched",
        [(space, cid, size, now) for space, cid, size in rows],
    )


class ChunkRecorder:
    """Group commit of chunk rows: puts arriving together share one transaction (one
    fsync) instead of queueing for one each. A caller returns once its rows are durable.
    """

    def __init__(self, db) -> None:
        self.db = db
        self._rows: list[tuple[str, bytes, int]] = []
        self._lock = trio.Lock()
        self._queued = 0
        self._written = 0

    async def record(self, rows: list[tuple[str, bytes, int]]) -> None:
        self._rows.extend(rows)
        self._queued += 1
        ticket = self._queued
        async with self._lock:
            if self._written >= ticket:
                return  # an earlier writer took our rows along
            batch, self._rows = self._rows, []
            upto = self._queued
            try:
                await self.db.write(_record, batch, time.time())
            except BaseException:
                self._rows[:0] = batch  # whoever writes next retries them
                raise
            self._written = upto


async def put_chunk(ctx, req: Request) -> Response:
    space, chunk_id = req.params["space"], _chunk_id(req)
    body = req.body
    if len(body) > MAX_BLOB_BYTES:
        raise ApiError(413, ErrorCode.TOO_LARGE, f"a chunk is at most {MAX_BLOB_BYTES} bytes")
    digest = req.headers.get(DIGEST_HEADER)
    if digest is None:
        raise ApiError(400, ErrorCode.INVALID, f"the {DIGEST_HEADER} header is required")
    def verify_and_store() -> bool:
        if blake3.blake3(body).hexdigest() != digest.lower():
            return False
        ctx.blobs.put(space, chunk_id, body)
        return True

    if not await trio.to_thread.run_sync(verify_and_store):
        raise ApiError(400, ErrorCode.DIGEST_MISMATCH, "the body does not match its digest")
    await ctx.chunk_rows.record([(space, bytes.fromhex(chunk_id), len(body))])
    return json_response(PutResult(stored=1, bytes=len(body)), status=201)


async def get_chunk(ctx, req: Request) -> Response:
    space, chunk_id = req.params["space"], _chunk_id(req)
    blob = await trio.to_thread.run_sync(ctx.blobs.get, space, chunk_id)
    if blob is None:
        raise ApiError(404, ErrorCode.CHUNK_NOT_FOUND, f"no chunk {chunk_id}")
    ahead = _read_ahead(req)
    if ahead and _advising.acquire(blocking=False):
        # after the blob asked for, and without waiting: the answer goes out while the
        # disk reads the next ones. At most ADVISING at once: past that, hints are
        # dropped rather than queued or given more threads.
        try:
            trio.lowlevel.start_thread_soon(
                partial(ctx.blobs.advise, space, ahead), lambda _: _advising.release()
            )
        except RuntimeError:  # no thread to be had: the hint is dropped
            _advising.release()
    return Response(200, blob, "application/octet-stream")


def _read_ahead(req: Request) -> list[str]:
    """The chunk ids of a GET's read-ahead header (see READ_AHEAD_HEADER): the first
    MAX_READ_AHEAD_IDS well-formed ones. A hint never fails the GET it rides on (a
    client may know other limits than this server), so anything else is ignored."""
    value = req.headers.get(READ_AHEAD_HEADER, "")
    ids = [part.strip() for part in value.split(",")]
    return list(dict.fromkeys(i for i in ids if _HEX_ID.match(i)))[:MAX_READ_AHEAD_IDS]


def parse_frames(body: bytes) -> list[tuple[bytes, memoryview]]:
    """Splits a batch-put body into (id, blob) pairs, checking every digest."""
    view = memoryview(body)
    items: list[tuple[bytes, memoryview]] = []
    pos = 0
    while pos < len(view):
        if pos + FRAME_HEAD.size + FRAME_DIGEST_BYTES > len(view):
            raise ApiError(400, ErrorCode.INVALID, "truncated frame header")
        chunk_id, length = FRAME_HEAD.unpack_from(view, pos)
        pos += FRAME_HEAD.size
        digest = bytes(view[pos : pos + FRAME_DIGEST_BYTES])
        pos += FRAME_DIGEST_BYTES
        if length > MAX_BLOB_BYTES:
            raise ApiError(413, ErrorCode.TOO_LARGE, f"a chunk is at most {MAX_BLOB_BYTES} bytes")
        if pos + length > len(view):
            raise ApiError(400, ErrorCode.INVALID, "truncated frame body")
        blob = view[pos : pos + length]
        pos += length
        if blake3.blake3(blob).digest() != digest:
            raise ApiError(
                400, ErrorCode.DIGEST_MISMATCH, f"chunk {chunk_id.hex()} does not match its digest"
            )
        items.append((chunk_id, blob))
    if len(items) > 10_000:
        raise ApiError(413, ErrorCode.TOO_LARGE, "at most 10000 chunks per batch")
    return items


async def put_batch(ctx, req: Request) -> Response:
    space = req.params["space"]

    def parse_and_store() -> list[tuple[bytes, memoryview]]:
        items = parse_frames(req.body)
        ctx.blobs.put_many(space, [(c.hex(), b) for c, b in items])
        return items

    items = await trio.to_thread.run_sync(parse_and_store)
    await ctx.chunk_rows.record([(space, c, len(b)) for c, b in items])
    return json_response(
        PutResult(stored=len(items), bytes=sum(len(b) for _, b in items)), status=201
    )


async def get_batch(ctx, req: Request) -> Response:
    space = req.params["space"]
    ids = list(dict.fromkeys(req.model.ids))

    def sizes(conn: sqlite3.Connection) -> int:
        total = 0
        for i in range(0, len(ids), 500):
            part = [bytes.fromhex(c) for c in ids[i : i + 500]]
            total += conn.execute(
                f"SELECT coalesce(sum(size), 0) FROM chunks WHERE space_id = ?"
                f" AND id IN ({','.join('?' * len(part))})",
                (space, *part),
            ).fetchone()[0]
        return total

    if await ctx.db.read(sizes) > MAX_BATCH_BODY_BYTES:
        raise ApiError(
            413,
            ErrorCode.TOO_LARGE,
            f"ask for at most {MAX_BATCH_BODY_BYTES} bytes of chunks at once",
        )

    def load() -> bytes:
        out = bytearray()
        for chunk_id in ids:
            blob = ctx.blobs.get(space, chunk_id)
            raw_id = bytes.fromhex(chunk_id)
            if blob is None:
                out += FRAME_HEAD.pack(raw_id, FRAME_MISSING)
            else:
                out += FRAME_HEAD.pack(raw_id, len(blob))
                out += blob
        return bytes(out)

    return Response(200, await trio.to_thread.run_sync(load), "application/octet-stream")


async def missing(ctx, req: Request) -> Response:
    """Which of the ids the space lacks. Present ones are touched: the caller is about to
    commit a reference to them, so GC must wait a grace period more."""
    space = req.params["space"]
    body: ChunkIds = req.model

    def tx(conn: sqlite3.Connection) -> ChunkIds:
        wanted = list(dict.fromkeys(body.ids))
        present: set[bytes] = set()
        now = time.time()
        for i in range(0, len(wanted), 500):
            part = [bytes.fromhex(c) for c in wanted[i : i + 500]]
            marks = ",".join("?" * len(part))
            present.update(
                r[0]
                for r in conn.execute(
                    f"SELECT id FROM chunks WHERE space_id = ? AND id IN ({marks})", (space, *part)
                )
            )
            conn.execute(
                f"UPDATE chunks SET touched = ? WHERE space_id = ? AND id IN ({marks})",
                (now, space, *part),
            )
        return ChunkIds(ids=[c for c in wanted if bytes.fromhex(c) not in present])

    return json_response(await ctx.db.write(tx))
