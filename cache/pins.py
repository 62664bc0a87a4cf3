"""Pins: files kept available offline. Pinning a path downloads every chunk of every
file under it into the local cache and counts a pin on each; pinned chunks are never
evicted. Works beside a running mount (LMDB allows a second process).

Pins cover the content a file has when it is pinned: a later version's chunks are
fetched when read, not ahead of time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from backend.base import Backend
from cache.codec import ChunkCodec, CorruptChunk, run_cpu
from cache.errors import NotFound
from cache.records import Kind, Node, decode_manifest
from cache.store import Store, Txn
from loft.protocol import ROOT_NODE

BATCH = 16

log = logging.getLogger(__name__)


def _checked(codec: ChunkCodec, blobs: dict[str, bytes | None]) -> dict[str, bytes]:
    """The blobs that open as their ids: the cache admits no other (see ChunkSource)."""
    good = {}
    for chunk_id, blob in blobs.items():
        if blob is None:
            continue
        try:
            codec.open(chunk_id, blob)
        except CorruptChunk as exc:
            log.warning("chunk %s from the server is corrupt (%s): not pinned", chunk_id,
                        exc.reason)
            continue
        good[chunk_id] = blob
    return good


def resolve(t: Txn, space: str, path: str) -> Node:
    """The node at a slash-separated workspace path (NotFound if none)."""
    node = t.node(space, ROOT_NODE)
    for part in [p for p in path.split("/") if p and p != "."]:
        child = t.child(space, node.id, part) if node else None
        node = t.node(space, child) if child else None
        if node is None:
            raise NotFound(f"no such file in the drive: {path}")
    if node is None:
        raise NotFound(f"no such file in the drive: {path}")
    return node


def files_under(t: Txn, node: Node) -> list[Node]:
    if node.kind == Kind.FILE:
        return [node]
    out = []
    for _, child_id in t.children(node.space, node.id):
        child = t.node(node.space, child_id)
        if child is not None:
            out += files_under(t, child)
    return out


async def set_pinned(store: Store, backend: Backend, codec: ChunkCodec, space: str, path: str,
                     pinning: bool,
                     on_total: Callable[[int], None] = lambda n: None,
                     on_progress: Callable[[int], None] = lambda n: None
                     ) -> tuple[int, int]:
    """Pins (downloading what is missing) or unpins everything under `path`. Returns
    (files, bytes) covered."""
    with store.read() as t:
        files = files_under(t, resolve(t, space, path))
        chunks = {c: n for f in files for c, n in decode_manifest(t.manifest_bytes(f.space, f.id))}
        wanted = [c for c in chunks if t.chunk_meta(space, c) is None] if pinning else []
    on_total(sum(chunks[c] for c in wanted))
    for i in range(0, len(wanted), BATCH):
        blobs = await backend.get_chunks(space, wanted[i:i + BATCH])
        good = await run_cpu(_checked, codec, blobs)
        with store.write() as t:
            for chunk_id, blob in good.items():
                t.put_chunk(space, chunk_id, blob)
        on_progress(sum(chunks[c] for c in blobs))
    with store.write() as t:
        for f in files:
            if t.pinned(f.space, f.id) != pinning:
                t.set_pinned(f.space, f.id, pinning)
                for chunk_id in {c for c, _ in decode_manifest(t.manifest_bytes(f.space, f.id))}:
                    t.pin_chunk(f.space, chunk_id, 1 if pinning else -1)
    return len(files), sum(chunks.values())
