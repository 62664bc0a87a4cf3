"""The flusher: turns journal entries into chunk uploads and commits.

A batch is a run of journal entries of one space, in order: up to MAX_OPS ops and about
MAX_CONTENT bytes of file content, so ten thousand small new files take a few commits,
not ten thousand. A `create` followed by its `content` is sent as one op. Bases come
from the nodes when the batch is built; a batch ends before an op whose base would be
a version made earlier in the same batch.

Crash safety: before a commit is sent, its exact request and what it stands for are
stored (meta "inflight"); after a restart the same request is sent again, and the
server answers a commit id it has applied without applying it twice. Chunks are
content-addressed, so re-uploading is harmless, and `missing` skips what the server has.

Conflicts (the server refused an op) are resolved so that nothing is dropped:
- an edit on a stale base (another device edited the file) or of a file deleted
  remotely becomes a new file "name (conflicted copy DEVICE DATE).ext" next to it;
- a name another device took is renamed the same way;
- a delete of a file edited remotely is dropped (the edit wins);
- a rename of a file moved remotely becomes a copy at our destination (both kept);
- an attribute change on a stale base is re-sent on the current version.
Afterwards the space is marked for a resync, which rebuilds the mirror from a server
snapshot once nothing is pending.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Container
from dataclasses import dataclass, field

import trio

from backend.base import Backend, BackendError, CommitConflict, is_transient
from cache.chunker import Chunker
from cache.codec import ChunkCodec, run_cpu
from cache.content import Layout, NeedChunk, SyncReader, changed_ranges, rechunk
from cache.records import (
    NO_FLOOR,
    PAGE_SIZE,
    SPECIALS,
    Flag,
    Kind,
    Node,
    Pending,
    decode_manifest,
    encode_manifest,
)
from cache.replica import Replica
from cache.spool import RUN_SLOTS
from cache.tasks import gather
from loft.protocol import (
    ROOT_NODE,
    Attrs,
    CommitRequest,
    CommitResponse,
    OpCode,
    OpResult,
)

log = logging.getLogger(__name__)

MAX_OPS = 2000
GATHER_SECONDS = 0.05
#: Files up to this size are sealed whole and their chunks sent with the batch's others.
SMALL_FILE = 4 * 1024 * 1024
MAX_CONTENT = 256 * 1024 * 1024
#: Chunks travel in framed batches of about this size, three batches in flight (each
#: batch is one `missing` call, one request and one round of syncs on the server).
#: With ~2 MiB chunks, 8 MiB and four chunks queued at each stage put a 10 GiB save's
#: peak RSS at 267-311 MB when saves also wrote their chunks to the local cache; 4 MiB
#: and two queued gave 231 MB against 267 in one A/B, stored in the same time (145 s).
#: Since a save written whole keeps its pages instead, 8 MiB and two queued: 1 GiB
#: saves waited 3.80-4.05 s after close against 4.36-4.87 s with 4 MiB, peak RSS
#: 192-196 MB against 180-183 MB (four pairs each; four queued made no difference).
GROUP_BYTES = 8 * 1024 * 1024
#: Chunks queued between the cutting thread, the sealers and the senders.
QUEUED = 2
#: Sealing tasks behind one cutting thread (each takes a CPU token of `run_cpu`).
SEALERS = os.cpu_count() or 1
VERSIONED = {"mkdir", "create", "symlink", "special", "content", "setattr"}
NEEDS_BASE = {"content", "setattr", "unlink"}


class QuotaBlocked(Exception):
    pass


def conflict_name(name: str, device: str, when: float | None = None) -> str:
    stamp = time.strftime("%Y-%m-%d %H%M%S", time.localtime(when or time.time()))
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    label = f" (conflicted copy {device} {stamp})"
    room = 255 - len(label.encode()) - len(ext.encode()) - (1 if ext else 0)
    stem = stem.encode()[: max(room, 1)].decode(errors="ignore")
    return f"{stem}{label}.{ext}" if ext else f"{stem}{label}"


def attrs_of(node: Node) -> Attrs:
    return Attrs(
        mode=node.mode, uid=node.uid, gid=node.gid, mtime_ns=node.mtime_ns, xattrs=node.xattrs
    )


@dataclass
class Item:
    """One op of a batch and the journal entries it stands for."""

    op: dict
    entries: list[tuple[int, Pending]]
    #: for content-bearing ops: the node's gen when its content was read, and the result
    gen: int | None = None
    manifest: list | None = None
    #: the file's pages hold all of that content: once committed they stay as its
    #: cached copy (see KeepLocal)
    keep_pages: bool = False


@dataclass
class KeepLocal:
    """How a save keeps its content on this device once committed, so that the file
    stays readable offline: as the chunks it sends (`chunks`), or, when its pages hold
    the whole file (written whole: a new file, a copy, a rewrite), as those pages
    (`pages`), which saves writing it to the local store a second time. Neither for a
    file larger than a quarter of the cache."""

    chunks: bool
    pages: bool = False


@dataclass
class Batch:
    space: str
    items: list[Item] = field(default_factory=list)
    commit_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def request(self) -> CommitRequest:
        return CommitRequest.model_validate(
            {"commit_id": self.commit_id, "ops": [i.op for i in self.items]}
        )

    def encode(self) -> bytes:
        return json.dumps(
            {
                "space": self.space,
                "commit_id": self.commit_id,
                "items": [
                    {
                        "op": i.op,
                        "entries": [[s, p.encode().decode()] for s, p in i.entries],
                        "gen": i.gen,
                        "manifest": i.manifest,
                        "keep_pages": i.keep_pages,
                    }
                    for i in self.items
                ],
            }
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Batch:
        raw = json.loads(data)
        return cls(
            raw["space"],
            [
                Item(
                    i["op"],
                    [(s, Pending.decode(p.encode())) for s, p in i["entries"]],
                    i["gen"],
                    i["manifest"],
                    i.get("keep_pages", False),
                )
                for i in raw["items"]
            ],
            raw["commit_id"],
        )


class Flusher:
    def __init__(self, replica: Replica, backend: Backend, codec_of, chunker: Chunker) -> None:
        self.replica = replica
        self.store = replica.store
        self.backend = backend
        self.codec_of = codec_of
        self.chunker = chunker
        self.status = ""
        self.uploaded_bytes = 0

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        delay = 0.5
        while True:
            await self.replica.wait_journal()
            # let a burst gather: a create, its writes and its close then travel as one op
            await trio.sleep(GATHER_SECONDS)
            try:
                await self.flush_once()
                delay = 0.5
                self.status = ""
            except BackendError as exc:
                if not is_transient(exc):
                    raise
                self.replica.net.down(str(exc))
                self.status = f"waiting for the server: {exc}"
                with trio.move_on_after(delay):
                    await self.replica.net.wait_change()
                delay = min(delay * 2, 10.0)
            except QuotaBlocked as exc:
                self.status = str(exc)
                log.warning("uploads paused: %s", exc)
                await trio.sleep(30)

    # ------------------------------------------------------------------ one round

    async def flush_once(self) -> None:
        with self.store.read() as t:
            stored = t.meta("inflight")
        batch = Batch.decode(stored) if stored else await self._build()
        if batch is None:
            return
        if not stored:
            with self.store.write() as t:
                t.set_meta("inflight", batch.encode())
        try:
            response = await self.backend.commit(batch.space, batch.request())
        except CommitConflict as exc:
            self.replica.net.up()
            self._resolve(batch, exc.results)
            return
        self.replica.net.up()
        self._apply(batch, response)

    # ------------------------------------------------------------------ building

    async def _build(self) -> Batch | None:
        # files closed since the burst began go with their creates (see close_written)
        self.replica.journal_closed()
        with self.store.read() as t:
            window = t.journal(limit=MAX_OPS)
            if not window:
                return None
            space = window[0][1].space
            nodes = {p.node: t.node(p.space, p.node) for _, p in window if p.space == space}
            # a file unlinked here (kept only for open handles): its content is nobody's
            nameless = {n for n in nodes if not t.entries_of(space, n)}
        batch = Batch(space)
        versioned: set[str] = set()
        #: per node, the op of this batch that sends its attributes as they are now
        carriers: dict[str, Item] = {}
        consumed: set[int] = set()
        content_bytes = 0
        small_uploads: list[tuple[str, bytes, bool]] = []
        for index, (seq, p) in enumerate(window):
            if p.space != space:
                break
            if seq in consumed:
                continue
            node = nodes.get(p.node)
            if p.op == "setattr" and p.node in carriers:
                # attributes are read from the node when the batch is built, so the op
                # already carrying them covers this one (tar: create, write, chmod, utime)
                carriers[p.node].entries.append((seq, p))
                continue
            if p.op in NEEDS_BASE and p.node in versioned:
                break
            if p.op in ("create", "content") and node is not None and node.flags & Flag.DIRTY:
                if content_bytes and content_bytes + node.size > MAX_CONTENT:
                    break
                content_bytes += node.size
            entries = [(seq, p)]
            if p.op == "create":
                follow = self._merge_content(window[index + 1 :], p)
                if follow is not None:
                    entries.append(follow)
                    consumed.add(follow[0])
            item = None if p.op == "content" and p.node in nameless else await self._item(
                space, p, node, entries, small_uploads)
            if item is None:
                # the node is gone locally (or nameless) and the op means nothing any more
                with self.store.write() as t:
                    t.journal_delete([seq])
                self.replica.journal_done([p])
                self.replica.collect_orphan(space, p.node)
                continue
            batch.items.append(item)
            if p.op in VERSIONED:
                versioned.add(p.node)
                carriers[p.node] = item
        await self._send_small(space, small_uploads)
        return batch if batch.items else None

    @staticmethod
    def _merge_content(
        rest: list[tuple[int, Pending]], create: Pending
    ) -> tuple[int, Pending] | None:
        for seq, p in rest:
            if p.node != create.node or p.space != create.space or p.op == "setattr":
                continue  # a setattr joins the create anyway (see _build)
            return (seq, p) if p.op == "content" else None
        return None

    async def _item(
        self,
        space: str,
        p: Pending,
        node: Node | None,
        entries: list[tuple[int, Pending]],
        small_uploads: list[tuple[str, bytes, bool]],
    ) -> Item | None:
        base = node.version if node else 0
        if p.op in ("mkdir", "create", "symlink", "special"):
            if node is None:
                return None
            op: dict = {
                "op": p.op,
                "node": p.node,
                "parent": p.parent,
                "name": p.name,
                "attrs": attrs_of(node).model_dump(mode="json"),
            }
            item = Item(op, entries)
            writing = (space, p.node) in self.replica.state.unjournaled
            if p.op == "create" and len(entries) == 1 and writing:
                # still being written (its content is not journaled yet): the name goes
                # now, empty, and the content once the file is closed or quiet, rather than
                # a half-written copy now and the whole again later
                op["content"] = {"size": 0, "chunks": []}
            elif p.op == "create":
                await self._content(item, node, small_uploads)
                op["content"] = {"size": sum(n for _, n in item.manifest), "chunks": item.manifest}
            elif p.op == "symlink":
                op["target"] = node.target
            elif p.op == "special":
                op["special"] = SPECIALS[node.special]
                op["rdev"] = node.rdev
            return item
        if p.op == "content":
            if node is None or node.kind != Kind.FILE:
                return None
            item = Item(
                {
                    "op": "update",
                    "node": p.node,
                    "base": base,
                    "attrs": attrs_of(node).model_dump(mode="json"),
                },
                entries,
            )
            await self._content(item, node, small_uploads)
            item.op["content"] = {"size": sum(n for _, n in item.manifest), "chunks": item.manifest}
            return item
        if p.op == "setattr":
            if node is None:
                return None
            return Item(
                {
                    "op": "setattr",
                    "node": p.node,
                    "base": base,
                    "attrs": attrs_of(node).model_dump(mode="json"),
                },
                entries,
            )
        if p.op == "move":
            return Item(
                {
                    "op": "move",
                    "node": p.node,
                    "parent": p.parent,
                    "name": p.name,
                    "new_parent": p.new_parent,
                    "new_name": p.new_name,
                    "replace": p.replace,
                    "exchange": p.exchange,
                },
                entries,
            )
        if p.op == "link":
            return Item({"op": "link", "node": p.node, "parent": p.parent, "name": p.name}, entries)
        if p.op == "unlink":
            return Item(
                {"op": "unlink", "node": p.node, "parent": p.parent, "name": p.name, "base": base},
                entries,
            )
        if p.op == "rmdir":
            return Item(
                {"op": "rmdir", "node": p.node, "parent": p.parent, "name": p.name}, entries
            )
        raise ValueError(f"unknown journal op {p.op}")

    # ------------------------------------------------------------------ content

    async def _content(
        self, item: Item, node: Node, small_uploads: list[tuple[str, bytes, bool]]
    ) -> None:
        """Uploads what the server lacks of the node's current content (a small file's
        chunks are queued on `small_uploads`, sent with the batch's others) and records
        the manifest, attributes and gen of that content on the item, and whether its
        pages are to stay as its cached copy.

        The node, its base manifest and its dirty pages are read in one read transaction
        held by the worker thread for the whole re-chunking: a file written while an
        earlier save uploads must be committed as one state it really had, never as
        newer pages over an older size."""
        key = (node.space, node.id)
        self.replica.saving.add(key)  # no page held back until the snapshot is read
        try:
            self.replica.store_held([key])  # part of what is saved
            codec = self.codec_of(node.space)
            extra: dict[str, bytes] = {}
            while True:
                keep = KeepLocal(chunks=node.size <= self.replica.chunks.cap // 4)
                try:
                    if node.size <= SMALL_FILE:
                        snapshot, manifest = await self._collect(
                            node, codec, extra, keep, small_uploads
                        )
                    else:
                        snapshot, manifest = await self._upload(node, codec, extra, keep)
                    break
                except NeedChunk as need:
                    extra[need.chunk_id] = await self.replica.chunks.get(
                        node.space, need.chunk_id
                    )
        finally:
            self.replica.saving.discard(key)
        item.gen = snapshot.gen
        item.op["attrs"] = attrs_of(snapshot).model_dump(mode="json")
        item.manifest = [list(c) for c in manifest]
        item.keep_pages = keep.pages

    def _rechunk(
        self, node: Node, codec: ChunkCodec, extra: dict[str, bytes], keep: KeepLocal, emit
    ) -> tuple[Node, list]:
        """In a worker thread: the node as it is now and its new manifest, read in one
        transaction. (The node record outlives this: its journal entry holds it.) The
        dirty pages are opened in place in the map (a views transaction): a 1 GiB save
        no longer copies 1 GiB out of it first. Decides `keep` before it emits a chunk:
        pages that hold the whole file stay, and its chunks are not kept."""
        with self.store.read(views=True) as t:
            now = t.node(node.space, node.id) or node
            layout = Layout.of(decode_manifest(t.manifest_bytes(node.space, node.id)))
            if not now.flags & Flag.DIRTY:
                return now, layout.chunks
            pages = -(-now.size // PAGE_SIZE)
            held = [p for p in t.page_numbers(node.space, node.id) if p < pages]
            if keep.chunks and pages and len(held) == pages:
                keep.chunks, keep.pages = False, True
            ranges = changed_ranges(now, layout, t.dirty_page_numbers(node.space, node.id))
            reader = SyncReader(t, self.replica.sealer, now, layout, codec.open, extra)
            try:
                return now, rechunk(reader, layout, self.chunker, now.size, ranges, emit)
            finally:
                reader.close()  # before the transaction ends

    async def _upload(
        self, node: Node, codec: ChunkCodec, extra: dict[str, bytes], keep: KeepLocal
    ):
        result: list = []

        def cut(emit) -> None:
            result.append(self._rechunk(node, codec, extra, keep, emit))

        await self._pipeline(node.space, codec, cut, keep)
        return result[0]

    async def _pipeline(self, space: str, codec: ChunkCodec, cut, keep: KeepLocal) -> None:
        """Runs `cut(emit)` in a worker thread and uploads what it emits. `emit(piece)`
        names the piece and returns its id at once; the pieces are sealed (compressed
        and encrypted, the dear part) on every core behind it, then sent in groups."""
        pieces_send, pieces_recv = trio.open_memory_channel[tuple[bytes, memoryview]](QUEUED)
        blobs_send, blobs_recv = trio.open_memory_channel[tuple[str, bytes]](QUEUED)

        def emit(piece: memoryview) -> str:
            raw_id = codec.raw_id(piece)
            trio.from_thread.run(pieces_send.send, (raw_id, piece))
            return raw_id.hex()

        def work() -> None:
            try:
                cut(emit)
            finally:
                trio.from_thread.run_sync(pieces_send.close)

        async def seal(out) -> None:
            async with out:
                async for raw_id, piece in pieces_recv:
                    blob = await run_cpu(codec.seal_as, raw_id, piece)
                    await out.send((raw_id.hex(), blob))

        async def seal_all() -> None:
            async with blobs_send:
                await gather(*[lambda o=blobs_send.clone(): seal(o) for _ in range(SEALERS)])

        await gather(
            lambda: trio.to_thread.run_sync(work),
            seal_all,
            lambda: self.upload_stream(space, blobs_recv, keep),
        )

    async def _collect(self, node: Node, codec: ChunkCodec, extra: dict[str, bytes],
                       keep: KeepLocal, out: list[tuple[str, bytes, bool]]):
        """Re-chunks and seals a small file in a worker thread; its new chunks go on
        `out`, each with whether to keep it locally (and stay off it if the thread fails
        halfway)."""
        sealed: list[tuple[str, bytes]] = []

        def emit(piece: bytes) -> str:
            chunk_id, blob = codec.seal(piece)
            sealed.append((chunk_id, blob))
            return chunk_id

        result = await trio.to_thread.run_sync(self._rechunk, node, codec, extra, keep, emit)
        out.extend((chunk_id, blob, keep.chunks) for chunk_id, blob in sealed)
        return result

    async def _send_small(self, space: str, items: list[tuple[str, bytes, bool]]) -> None:
        """Sends small files' chunks in framed groups, three at a time."""
        groups: list[list[tuple[str, bytes]]] = [[]]
        kept: set[str] = set()
        size = 0
        for chunk_id, blob, keep in items:
            if len(groups[-1]) >= 256 or size >= GROUP_BYTES:
                groups.append([])
                size = 0
            groups[-1].append((chunk_id, blob))
            size += len(blob)
            if keep:
                kept.add(chunk_id)
        limiter = trio.CapacityLimiter(3)

        async def send(group: list[tuple[str, bytes]]) -> None:
            async with limiter:
                await self._send_group(space, group, kept)

        await gather(*[lambda g=g: send(g) for g in groups if g])

    async def upload_file(self, space: str, path) -> list[tuple[str, int]]:
        """Chunks, seals and uploads a local file as it is read; returns its manifest.
        Memory stays bounded by a few chunks whatever the file's size."""
        manifest: list[tuple[str, int]] = []

        def cut(emit) -> None:
            with open(path, "rb") as f:
                for piece in self.chunker.iter_chunks(f):
                    manifest.append((emit(piece), len(piece)))

        await self._pipeline(space, self.codec_of(space), cut, KeepLocal(chunks=False))
        return manifest

    async def upload_stream(self, space: str, recv, keep: KeepLocal) -> None:
        """Sends chunks in groups (one `missing` call per group), two groups at a time."""
        groups_send, groups_recv = trio.open_memory_channel[list[tuple[str, bytes]]](0)

        async def collect() -> None:
            group: list[tuple[str, bytes]] = []
            size = 0
            async with groups_send:
                async for chunk_id, blob in recv:
                    group.append((chunk_id, blob))
                    size += len(blob)
                    if len(group) >= 64 or size >= GROUP_BYTES:
                        await groups_send.send(group)
                        group, size = [], 0
                if group:
                    await groups_send.send(group)

        async def send_groups() -> None:
            async for group in groups_recv:
                # `keep` is settled before the first chunk is cut (see _rechunk)
                await self._send_group(space, group, dict(group) if keep.chunks else ())

        await gather(collect, send_groups, send_groups, send_groups)

    async def _send_group(
        self, space: str, group: list[tuple[str, bytes]], keep: Container[str]
    ) -> None:
        """Sends what the server lacks of `group`, then keeps the chunks named in `keep`
        in the local cache."""
        unique = dict(group)
        missing = set(await self.backend.missing(space, list(unique)))
        # one framed request per group: the server writes and syncs the blobs together
        await self.backend.put_chunks(space, [(c, b) for c, b in unique.items() if c in missing])
        self.uploaded_bytes += sum(len(b) for c, b in unique.items() if c in missing)
        for chunk_id, blob in unique.items():
            if chunk_id in keep:
                await self.replica.chunks.keep(space, chunk_id, blob)

    # ------------------------------------------------------------------ results

    def _apply(self, batch: Batch, response: CommitResponse) -> None:
        done: list[Pending] = []
        rewritten: list[tuple[str, str]] = []
        touched: list[tuple[str, str]] = []
        kept_pages = False
        with self.store.write() as t:
            for item, seq in zip(batch.items, response.seqs, strict=True):
                p = item.entries[0][1]
                node = t.node(batch.space, p.node)
                done += [e for _, e in item.entries]
                t.journal_delete([s for s, _ in item.entries])
                if (
                    node is None
                    or seq is None
                    or item.op["op"]
                    not in ("mkdir", "create", "symlink", "special", "update", "setattr")
                ):
                    continue
                node = node.but(version=seq, flags=node.flags & ~Flag.LOCAL)
                if item.manifest is not None:
                    t.put_manifest_bytes(
                        batch.space, p.node, encode_manifest([tuple(c) for c in item.manifest])
                    )
                    if node.gen == item.gen:
                        clean = node.flags & ~(Flag.DIRTY | Flag.PAGED)
                        if item.keep_pages and t.keep_pages(batch.space, p.node, node.size):
                            clean |= Flag.PAGED
                            kept_pages = True
                        elif t.del_dirty_pages(batch.space, p.node):
                            # clean pages from an earlier save still copy the content
                            # where they are (truncations drop those past the cut)
                            clean |= node.flags & Flag.PAGED
                        node = node.but(flags=clean, floor=NO_FLOOR)
                    else:
                        rewritten.append((batch.space, p.node))
                t.put_node(node)
                touched.append((batch.space, p.node))
            if kept_pages:
                t.evict(self.replica.chunks.cap)
            t.del_meta("inflight")
            t.set_meta_int("last_sync_ms", int(time.time() * 1000))
            # these changes are applied here already: the feed must not replay them (a
            # replayed move would put an entry back at a name freed since)
            t.mark_applied(batch.space, [s for s in response.seqs if s is not None])
        self.replica.journal_done(done)
        for space, node_id in rewritten:
            # written again while uploading: journal the newer content (after journal_done,
            # which forgets the content entry just committed)
            if not self.replica.state.pending[(space, node_id)]["content"]:
                self.replica.state.unjournaled[(space, node_id)] = 0.0
        for space, node_id in touched:
            self.replica.content.forget(space, node_id)
        for item in batch.items:
            for _, p in item.entries:
                for node_id in (p.node, p.replace):
                    if node_id:
                        self.replica.collect_orphan(batch.space, node_id)

    def _resolve(self, batch: Batch, results: list[OpResult]) -> None:
        space = batch.space
        device = self.replica.device_name
        dropped: list[Pending] = []
        # a conflicted copy takes the pages the writer wrote so far
        self.replica.store_held([(space, batch.items[r.index].entries[0][1].node) for r in results])
        with self.store.write() as t:
            for result in results:
                if result.code == OpCode.OK:
                    continue
                item = batch.items[result.index]
                seq, p = item.entries[0]
                op, code = item.op["op"], result.code
                log.info("commit conflict on %s %s: %s", op, p.node, code)
                if code == OpCode.QUOTA_EXCEEDED:
                    t.del_meta("inflight")
                    raise QuotaBlocked(f"over quota: {result.message}")
                if code == OpCode.MISSING_CHUNKS:
                    continue  # the next round asks `missing` again and uploads
                if op in ("mkdir", "create", "symlink", "special", "link"):
                    if code == OpCode.NODE_EXISTS:
                        dropped += self._drop(t, item)
                    elif code == OpCode.NAME_TAKEN:
                        self._rename_entry(
                            t, space, seq, p, p.parent, conflict_name(p.name, device)
                        )
                    elif code in (OpCode.NO_SUCH_NODE, OpCode.NOT_A_DIRECTORY):
                        self._rename_entry(
                            t, space, seq, p, ROOT_NODE, conflict_name(p.name, device)
                        )
                    else:
                        dropped += self._drop(t, item)
                elif op == "update":
                    node = t.node(space, p.node)
                    named = node is not None and t.entries_of(space, p.node)
                    if named and code in (OpCode.STALE_BASE, OpCode.NO_SUCH_NODE):
                        keep_name = code == OpCode.NO_SUCH_NODE
                        self._conflicted_copy(t, space, node, item, keep_name)
                    dropped += self._drop(t, item)
                elif op == "setattr" and code == OpCode.STALE_BASE and result.current:
                    node = t.node(space, p.node)
                    if node is not None:
                        t.put_node(node.but(version=result.current))
                elif op == "move" and code == OpCode.NAME_TAKEN:
                    new = p.__class__(
                        **{**p.__dict__, "new_name": conflict_name(p.new_name or "", device)}
                    )
                    self._move_local_entry(
                        t, space, p.node, p.new_parent, p.new_name, new.new_parent, new.new_name
                    )
                    t.journal_put(seq, new)
                elif op == "move" and code == OpCode.NO_SUCH_ENTRY and not p.exchange:
                    self._copy_for_move(t, space, p, item)
                    dropped += self._drop(t, item)
                else:
                    dropped += self._drop(t, item)
            t.del_meta("inflight")
        self.replica.journal_done(dropped)
        self.replica.state.needs_resync.add(space)

    def _drop(self, t, item: Item) -> list[Pending]:
        t.journal_delete([s for s, _ in item.entries])
        return [p for _, p in item.entries]

    def _rename_entry(self, t, space: str, seq: int, p: Pending, parent: str, name: str) -> None:
        self._move_local_entry(t, space, p.node, p.parent, p.name, parent, name)
        t.journal_put(seq, Pending(**{**p.__dict__, "parent": parent, "name": name}))

    @staticmethod
    def _move_local_entry(t, space: str, node: str, parent, name, new_parent, new_name) -> None:
        if t.child(space, parent, name) == node:
            t.remove_entry(space, parent, name)
        if t.child(space, new_parent, new_name) is None:
            t.add_entry(space, new_parent, new_name, node)

    def _conflicted_copy(self, t, space: str, node: Node, item: Item, keep_name: bool) -> None:
        """Commits the local content of `node` as a new file next to it."""
        entries = t.entries_of(space, node.id)
        parent, name = entries[0] if entries else (ROOT_NODE, "untitled")
        copy = Node(
            space,
            str(uuid.uuid4()),
            Kind.FILE,
            size=sum(n for _, n in item.manifest),
            mode=node.mode,
            uid=node.uid,
            gid=node.gid,
            mtime_ns=node.mtime_ns,
            ctime_ns=node.ctime_ns,
            flags=Flag.LOCAL,
            xattrs=node.xattrs,
        )
        if item.keep_pages:
            # The chunks it sent were not cached (its pages were to stay): the pages
            # are the only local copy of the edit, and go to the copy, sealed under its
            # id, as written since (the flusher cuts them again and finds the chunks
            # on the server).
            sealer = self.replica.sealer
            numbers = t.page_numbers(space, node.id)
            for i in range(0, len(numbers), RUN_SLOTS):  # a run of spool slots per read
                part = numbers[i : i + RUN_SLOTS]
                sealed = t.pages_in(space, node.id, part[0], part[-1])
                for page_no in part:
                    plain = sealer.open(node.id, page_no, sealed[page_no])
                    t.put_page(space, copy.id, page_no, sealer.seal(copy.id, page_no, plain))
            copy = copy.but(size=node.size, floor=node.floor, flags=Flag.LOCAL | Flag.DIRTY)
        t.put_node(copy)
        t.put_manifest_bytes(space, copy.id, encode_manifest([tuple(c) for c in item.manifest]))
        if keep_name and t.child(space, parent, name) == node.id:
            # deleted on the server: the edit takes the name back
            t.remove_entry(space, parent, name)
            copy_name = name
        else:
            copy_name = conflict_name(name, self.replica.device_name)
        t.add_entry(space, parent, copy_name, copy.id)
        self.replica.journal(t, Pending("create", space, copy.id, parent=parent, name=copy_name))
        # the original goes back to what the server has (the resync fills it in)
        t.del_pages(space, node.id)
        t.put_node(
            node.but(
                flags=node.flags & ~(Flag.DIRTY | Flag.PAGED),
                floor=NO_FLOOR,
                gen=node.gen + 1,
                size=Layout.of(decode_manifest(t.manifest_bytes(space, node.id))).size,
            )
        )
        log.warning("conflict: kept this device's version of %r as %r", name, copy_name)

    def _copy_for_move(self, t, space: str, p: Pending, item: Item) -> None:
        node = t.node(space, p.node)
        if node is None or node.kind != Kind.FILE:
            return
        copy = node.but(id=str(uuid.uuid4()), version=0, flags=Flag.LOCAL)
        t.put_node(copy)
        t.put_manifest_bytes(space, copy.id, t.manifest_bytes(space, node.id))
        if t.child(space, p.new_parent, p.new_name) == node.id:
            t.remove_entry(space, p.new_parent, p.new_name)
        t.add_entry(space, p.new_parent, p.new_name, copy.id)
        self.replica.journal(
            t, Pending("create", space, copy.id, parent=p.new_parent, name=p.new_name)
        )
