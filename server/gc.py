"""Garbage collection of chunks no version references.

A chunk is collectable when its refs count is 0 and it was last touched (put, or named
in a which-are-missing check) longer ago than the grace period. The metadata row goes
first, in a transaction, then the blob: a commit racing the collector either sees the
row (and takes a reference, so the row is not deleted) or does not (and is refused
with missing_chunks, so the client uploads again). No commit can reference a chunk
whose blob is gone.
"""

from __future__ import annotations

import logging
import sqlite3
import time

import trio

from server.errors import BlobStoreError

log = logging.getLogger(__name__)

BATCH = 1000


def _claim(conn: sqlite3.Connection, cutoff: float) -> list[tuple[str, bytes]]:
    rows = conn.execute(
        "SELECT space_id, id FROM chunks WHERE refs = 0 AND touched < ? LIMIT ?", (cutoff, BATCH)
    ).fetchall()
    conn.executemany("DELETE FROM chunks WHERE space_id = ? AND id = ? AND refs = 0", rows)
    return rows


async def collect_once(db, blobs, grace: float) -> int:
    """Deletes unreferenced chunks older than `grace` seconds; returns how many."""
    total = 0
    while True:
        rows = await db.write(_claim, time.time() - grace)
        if not rows:
            return total

        def delete(rows: list[tuple[str, bytes]] = rows) -> None:
            for space, chunk_id in rows:
                blobs.delete(space, chunk_id.hex())

        try:
            await trio.to_thread.run_sync(delete)
        except BlobStoreError as exc:
            log.warning("GC could not delete blobs (they are orphans now): %s", exc)
        total += len(rows)
        if len(rows) < BATCH:
            return total


async def run_collector(
    db, blobs, grace: float, interval: float, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    task_status.started()
    while True:
        await trio.sleep(interval)
        collected = await collect_once(db, blobs, grace)
        if collected:
            log.info("GC collected %d unreferenced chunks", collected)
