"""A file's bytes on this device: the base content (its committed manifest) overlaid
with its pages (dirty ones, and clean ones: a saved file's pages kept as its cached
copy, the same bytes as the base), truncated to `size`, with base bytes at or past
`floor` reading as zeros.

Writes never shift bytes (POSIX has no insertion), so a dirty page always holds the
whole PAGE_SIZE bytes of the new content at its offset, and old chunk boundaries that
lie before a change, or after it once the content-defined cuts fall on an old boundary
again, stay valid: `rechunk` cuts only the changed ranges and reuses the old chunks
elsewhere. That is what keeps a 1-byte edit of a large file to one uploaded chunk.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cache.chunker import MAX_SIZE, Chunker
from cache.codec import DirtySealer
from cache.records import PAGE_SIZE, Flag, Node, decode_manifest
from cache.spool import spool_span
from cache.store import Store, Txn
from loft.protocol import ChunkRef

log = logging.getLogger(__name__)

GetChunk = Callable[[str, str], Awaitable[bytes]]
#: (space, chunk id, lo, hi) -> those plaintext bytes of the chunk
GetRange = Callable[[str, str, int, int], Awaitable[bytes]]

#: Layouts of replaced versions kept for `Content.retired`, the most recent this many.
RETIRED = 64

#: Chunks fetched ahead of a sequential reader: about 17 MiB at the average size (2.2
#: MiB), as sixteen 1.2 MiB chunks were before the average grew. That depth, with eight
#: fetchers and eight transfers, read 1 GiB cold in 3.1-4.2 s where half of it with four
#: took 3.9-5.2 s (alternated on fresh devices, same server).
READ_AHEAD_CHUNKS = 8
#: A re-chunking read of a file's pages this large reads the next as many in the
#: background (the spool is read from the disk, with no page cache)
READ_AHEAD_FROM = 4 * 1024 * 1024
#: Past the prefetch window, how many chunks the server is asked to read ahead from
#: its disk (no bytes move until they are asked for).
SERVER_READ_AHEAD_CHUNKS = 16


@dataclass(frozen=True)
class Layout:
    """A manifest with the offset where each chunk starts."""

    chunks: list[ChunkRef]
    starts: list[int]
    size: int

    @classmethod
    def of(cls, chunks: list[ChunkRef]) -> Layout:
        starts, pos = [], 0
        for _, n in chunks:
            starts.append(pos)
            pos += n
        return cls(chunks, starts, pos)

    def span(self, offset: int, end: int) -> range:
        """Indices of the chunks overlapping [offset, end)."""
        if offset >= end or offset >= self.size:
            return range(0)
        first = bisect.bisect_right(self.starts, offset) - 1
        last = bisect.bisect_left(self.starts, min(end, self.size))
        return range(first, last)


@dataclass
class HeldPage:
    """The last page of a file being written, held in memory while the writer is still
    on it (see Replica.write): `plain` is PAGE_SIZE bytes, zeros past what it holds."""

    page_no: int
    plain: bytearray


class Content:
    def __init__(
        self,
        store: Store,
        sealer: DirtySealer,
        get_chunk: GetChunk,
        prefetch: Callable[[str, list[str]], None],
        get_range: GetRange,
        read_ahead: Callable[[str, list[str]], None],
        touch_pages: Callable[[str, str], None],
    ) -> None:
        self.store = store
        self.sealer = sealer
        self.get_chunk = get_chunk
        self.prefetch = prefetch
        self.get_range = get_range
        self.read_ahead = read_ahead
        self.touch_pages = touch_pages
        #: each file's base layout, with the node it was first laid out for
        self._layouts: dict[tuple[str, str], tuple[Node, Layout]] = {}
        #: the same for clean versions that a change has replaced since (see `retired`)
        self._retired: dict[tuple[str, str], tuple[Node, Layout]] = {}
        self._last_end: dict[tuple[str, str], int] = {}
        #: per file being read in sequence, the chunk index up to which the server was
        #: told what comes (see _maybe_prefetch)
        self._told: dict[tuple[str, str], int] = {}
        #: per file being written, its last page when held back from the store
        self.held: dict[tuple[str, str], HeldPage] = {}

    def layout(self, node: Node) -> Layout:
        """The node's base layout, cached by version (a base changes only with it)."""
        key = (node.space, node.id)
        for cached in (self._layouts.get(key), self._retired.get(key)):
            if cached is not None and cached[0].version == node.version:
                return cached[1]
        with self.store.read() as t:
            layout = Layout.of(decode_manifest(t.manifest_bytes(node.space, node.id)))
        self._layouts[key] = (node, layout)
        return layout

    def forget(self, space: str, node: str) -> None:
        """The node's base changed: its layout is retired (kept for `retired` if that
        version was clean)."""
        key = (space, node)
        cached = self._layouts.pop(key, None)
        if cached is not None and not cached[0].flags & Flag.DIRTY:
            self._retired.pop(key, None)
            self._retired[key] = cached
            if len(self._retired) > RETIRED:
                del self._retired[next(iter(self._retired))]
        self._last_end.pop(key, None)
        self._told.pop(key, None)

    def forget_all(self) -> None:
        self._layouts.clear()
        self._retired.clear()
        self._last_end.clear()
        self._told.clear()

    def retired(self, space: str, node_id: str, version: int) -> Node | None:
        """The node of `version` of a file, a clean version a change has replaced since,
        while its layout is kept: `read` reads it as it was."""
        cached = self._retired.get((space, node_id))
        return cached[0] if cached is not None and cached[0].version == version else None

    # ------------------------------------------------------------------ reading

    async def read(self, node: Node, offset: int, size: int) -> bytes | memoryview:
        end = min(offset + size, node.size)
        if offset >= end:
            return b""
        if not node.flags & (Flag.DIRTY | Flag.PAGED):
            return await self._read_base(node, offset, end, prefetch=True)
        first, last = offset // PAGE_SIZE, (end - 1) // PAGE_SIZE
        with self.store.read() as t:
            sealed = t.pages_in(node.space, node.id, first, last)
        if not node.flags & Flag.DIRTY:
            if not any(sealed.values()):  # its clean pages were evicted
                return await self._read_base(node, offset, end, prefetch=True)
            self.touch_pages(node.space, node.id)
        held = self.held.get((node.space, node.id))
        out = bytearray()
        pos = offset
        for page_no in range(first, last + 1):
            page_start = page_no * PAGE_SIZE
            stop = min(end, page_start + PAGE_SIZE)
            blob = sealed[page_no]
            if held is not None and held.page_no == page_no:
                out += held.plain[pos - page_start : stop - page_start]
            elif blob is not None:
                page = self.sealer.open(node.id, page_no, blob)
                out += page_slice(page, pos - page_start, stop - page_start)
            else:
                out += await self._read_base(node, pos, stop, prefetch=False)
            pos = stop
        return bytes(out)

    async def _read_base(
        self, node: Node, offset: int, end: int, *, prefetch: bool
    ) -> bytes | memoryview:
        """Base bytes of [offset, end): chunks below min(floor, base size), zeros after."""
        layout = self.layout(node)
        limit = min(layout.size, node.floor)
        data_end = min(end, limit)
        parts: list[bytes | memoryview] = []
        if offset < data_end:
            span = layout.span(offset, data_end)
            if len(span) > 1:
                # fetch the span's chunks side by side; the loop below joins those fetches
                self.prefetch(node.space, [layout.chunks[i][0] for i in span][1:])
            # a read within one chunk, not where the last read of the file ended: a
            # random read, which needs only the blocks that hold its bytes
            random = (
                prefetch and len(span) == 1 and self._last_end.get((node.space, node.id)) != offset
            )
            for i in span:
                chunk_id, length = layout.chunks[i]
                start = layout.starts[i]
                lo, hi = max(offset, start) - start, min(data_end, start + length) - start
                if random and (lo, hi) != (0, length):
                    parts.append(await self.get_range(node.space, chunk_id, lo, hi))
                    continue
                plain = await self.get_chunk(node.space, chunk_id)
                parts.append(memoryview(plain)[lo:hi] if (lo, hi) != (0, length) else plain)
            if prefetch:
                self._maybe_prefetch(node, layout, span, offset, end)
        if end > max(offset, data_end):
            parts.append(bytes(end - max(offset, data_end)))
        if len(parts) == 1:
            # a read within one chunk: a view of it, not a copy (a FUSE reply takes any
            # buffer; 1 MiB copied per read was a copy of every byte read)
            return parts[0]
        return b"".join(parts)

    def _maybe_prefetch(
        self, node: Node, layout: Layout, span: range, offset: int, end: int
    ) -> None:
        key = (node.space, node.id)
        sequential = self._last_end.get(key) == offset
        self._last_end[key] = end
        if sequential and span:
            window = span.stop + READ_AHEAD_CHUNKS
            ahead = layout.chunks[span.stop : window]
            self.prefetch(node.space, [c for c, _ in ahead])
            # the chunks past the window, told to the server a window at a time: it
            # reads them from its disk while the window downloads
            told = max(self._told.get(key, 0), window)
            if told - window < READ_AHEAD_CHUNKS // 2 and told < len(layout.chunks):
                upto = window + SERVER_READ_AHEAD_CHUNKS
                self.read_ahead(node.space, [c for c, _ in layout.chunks[told:upto]])
                told = upto
            self._told[key] = told

    # ------------------------------------------------------------------ writing

    async def page_bytes(self, node: Node, page_no: int) -> bytearray:
        """The current content of one page (PAGE_SIZE bytes, zero-padded)."""
        held = self.held.get((node.space, node.id))
        if held is not None and held.page_no == page_no:
            return bytearray(held.plain)
        with self.store.read() as t:
            blob = t.page(node.space, node.id, page_no)
        if blob is not None:
            data = self.sealer.open(node.id, page_no, blob)  # short at the file's end
        else:
            start = page_no * PAGE_SIZE
            end = min(start + PAGE_SIZE, node.size)
            data = await self._read_base(node, start, end, prefetch=False)
        page = bytearray(PAGE_SIZE)
        page[: len(data)] = data
        return page

    async def prepare_write(
        self, node: Node, offset: int, data: bytes, *, hold: bool = False
    ) -> tuple[dict[int, bytearray], HeldPage | None]:
        """Sealed pages that hold `data` at `offset` (to be stored by the caller in the
        same transaction as the node's new size). A page that holds the end of the file
        is sealed only up to that end (see `page_slice`): a 4 KiB file keeps a 4 KiB
        page, not a 128 KiB one. With `hold`, the last page comes back unsealed, to be
        held instead of stored."""
        out: dict[int, bytearray] = {}
        end = offset + len(data)
        new_size = max(node.size, end)
        last = (end - 1) // PAGE_SIZE
        view = memoryview(data)
        for page_no in range(offset // PAGE_SIZE, last + 1):
            start = page_no * PAGE_SIZE
            lo, hi = max(offset, start), min(end, start + PAGE_SIZE)
            if lo == start and hi >= min(start + PAGE_SIZE, new_size):
                # the write covers the page, or its start up to the file's new end:
                # nothing of the old page survives, and the data is the page
                page: memoryview = view[lo - offset : hi - offset]
            else:
                buf = await self.page_bytes(node, page_no)
                buf[lo - start : hi - start] = view[lo - offset : hi - offset]
                page = memoryview(buf)[: new_size - start]
            if hold and page_no == last:
                plain = bytearray(PAGE_SIZE)
                plain[: len(page)] = page
                return out, HeldPage(page_no, plain)
            out[page_no] = self.sealer.seal(node.id, page_no, page)
        return out, None

    def seal_held(self, node: Node, held: HeldPage) -> bytearray | None:
        """The held page sealed as the store keeps it (up to the file's end), or None
        when the file ends before it."""
        n = min(PAGE_SIZE, node.size - held.page_no * PAGE_SIZE)
        if n <= 0:
            return None
        return self.sealer.seal(node.id, held.page_no, memoryview(held.plain)[:n])

    async def prepare_truncate(self, node: Node, size: int) -> tuple[int, dict[int, bytearray]]:
        """For shrinking to `size`: the first page to drop and the sealed partial last
        page, cut at `size` (what lies past it reads as zeros)."""
        keep = -(-size // PAGE_SIZE)
        pages: dict[int, bytearray] = {}
        if size % PAGE_SIZE and size < node.size:
            page_no = size // PAGE_SIZE
            buf = await self.page_bytes(node, page_no)
            cut = size - page_no * PAGE_SIZE
            pages[page_no] = self.sealer.seal(node.id, page_no, memoryview(buf)[:cut])
        return keep, pages


# ---------------------------------------------------------------------- re-chunking


class NeedChunk(Exception):
    """The re-chunker needs a base chunk that is not available locally."""

    def __init__(self, chunk_id: str) -> None:
        super().__init__(chunk_id)
        self.chunk_id = chunk_id


class SyncReader:
    """Reads a file's new content without awaiting: base chunks must be in `extra` or
    the local cache (else NeedChunk). Runs in a worker thread inside the read
    transaction `txn` the node and its layout were read in, so every byte it returns
    belongs to that one state of the file."""

    def __init__(
        self,
        txn: Txn,
        sealer: DirtySealer,
        node: Node,
        layout: Layout,
        open_chunk: Callable[[str, bytes], bytes],
        extra: dict[str, bytes],
    ) -> None:
        self.txn, self.sealer, self.node, self.layout = txn, sealer, node, layout
        self.open_chunk, self.extra = open_chunk, extra
        #: the spool's pages of the next range, read by a thread while the caller cuts
        #: the last one: (first, last, the thread, its result or error)
        self._ahead: tuple[int, int, threading.Thread, list] | None = None
        self._buf: mmap.mmap | None = None

    def read_into(self, out: memoryview, offset: int) -> None:
        """Fills `out` with the content from `offset` (up to the file's size at most).
        A whole page is decrypted straight into it: a 1 GiB save copied each byte twice
        more on its way to the chunker before. After a large read, the pages of the
        same length after it are read from the spool (a disk read) in the background."""
        t = self.txn
        end = offset + len(out)
        blobs: dict = {}
        if self.node.flags & (Flag.DIRTY | Flag.PAGED) and end > offset:
            first, last = offset // PAGE_SIZE, (end - 1) // PAGE_SIZE
            blobs = self._read_ahead_of(first, last) or self._read_pages(first, last)
        pos = offset
        while pos < end:
            page_no = pos // PAGE_SIZE
            base = page_no * PAGE_SIZE
            stop = min(end, base + PAGE_SIZE)
            dst = out[pos - offset : stop - offset]
            blob = blobs.get(page_no)
            if blob is None:
                dst[:] = self._base(t, pos, stop)
            elif pos == base and stop - base == self.sealer.plain_size(blob):
                self.sealer.open_into(self.node.id, page_no, blob, dst)
            else:
                page = self.sealer.open(self.node.id, page_no, blob)
                dst[:] = page_slice(page, pos - base, stop - base)
            pos = stop
        if blobs and len(out) >= READ_AHEAD_FROM:
            # from the page holding the next byte: a read ending inside a page is
            # followed by one starting in it
            self._start_read_ahead(end // PAGE_SIZE, -(-len(out) // PAGE_SIZE) + 1)

    def _buffer(self, nbytes: int) -> mmap.mmap:
        if self._buf is None or len(self._buf) < nbytes:
            self._buf = mmap.mmap(-1, nbytes)
        return self._buf

    def _read_pages(self, first: int, last: int) -> dict:
        values = self.txn.page_values(self.node.space, self.node.id, first, last)
        span = spool_span(values)
        return self.txn.sealed_pages(values, self._buffer(span) if span else None)

    def _start_read_ahead(self, first: int, count: int) -> None:
        last = min(first + count, -(-self.node.size // PAGE_SIZE)) - 1
        if last < first:
            return
        values = self.txn.page_values(self.node.space, self.node.id, first, last)
        span = spool_span(values)
        if not span:
            return  # nothing in the spool to read ahead
        buf = self._buffer(span)
        result: list = []

        def read() -> None:
            try:
                result.append(self.txn.sealed_pages(values, buf))
            except BaseException as exc:  # re-raised by the reader that takes it
                result.append(exc)

        thread = threading.Thread(target=read, name="spool read-ahead", daemon=True)
        thread.start()
        self._ahead = (first, last, thread, result)

    def _read_ahead_of(self, first: int, last: int) -> dict | None:
        """The pages read ahead, if they include those of `first` to `last`."""
        if self._ahead is None:
            return None
        ahead_first, ahead_last, thread, result = self._ahead
        self._ahead = None
        thread.join()  # its buffer is the one the next read fills
        if not ahead_first <= first <= last <= ahead_last:
            return None
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def close(self) -> None:
        """Waits for a read-ahead still running."""
        if self._ahead is not None:
            self._ahead[2].join()
            self._ahead = None

    def _base(self, t, offset: int, end: int) -> bytes:
        limit = min(self.layout.size, self.node.floor)
        data_end = min(end, limit)
        out = bytearray()
        for i in self.layout.span(offset, data_end):
            chunk_id, length = self.layout.chunks[i]
            start = self.layout.starts[i]
            plain = self.extra.get(chunk_id)
            if plain is None:
                blob = t.chunk_view(self.node.space, chunk_id)
                if blob is None:
                    raise NeedChunk(chunk_id)
                plain = self.open_chunk(chunk_id, blob)
                self.extra[chunk_id] = plain
            out += plain[max(offset, start) - start : min(data_end, start + length) - start]
        if end > max(offset, data_end):
            out += bytes(end - max(offset, data_end))
        return bytes(out)


def page_slice(page: bytes, lo: int, hi: int) -> bytes | memoryview:
    """Bytes [lo, hi) of a dirty page. A page is sealed up to the end of the file when
    it holds that end; past what it holds it reads as zeros (the file was shorter then,
    and a later extension leaves a hole there)."""
    part = memoryview(page)[lo:hi]
    if len(part) == hi - lo:
        return part
    return bytes(part) + bytes(hi - lo - len(part))


def changed_ranges(node: Node, layout: Layout, dirty_pages: list[int]) -> list[tuple[int, int]]:
    """Merged [start, end) ranges of the new content that may differ from the base.
    (Base bytes past `floor` are covered by `rechunk`, which never reuses an old chunk
    that ends past min(floor, base size).)"""
    ranges = [
        (p * PAGE_SIZE, min((p + 1) * PAGE_SIZE, node.size))
        for p in dirty_pages
        if p * PAGE_SIZE < node.size
    ]
    base_end = min(layout.size, node.floor)
    if node.size > base_end:
        ranges.append((base_end, node.size))
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def rechunk(
    reader: SyncReader,
    layout: Layout,
    chunker: Chunker,
    size: int,
    ranges: list[tuple[int, int]],
    emit: Callable[[memoryview], str],
) -> list[ChunkRef]:
    """The new manifest: old chunks where nothing changed, new cuts from the start of the
    old chunk holding each change until the cuts meet an old boundary past it. `emit`
    seals and queues a new chunk's plaintext and returns its id; the view it gets stays
    valid (its buffer is never changed), so it may be sealed later on another thread."""
    old_ends = {start + n: i for i, ((_, n), start) in
                enumerate(zip(layout.chunks, layout.starts, strict=True))}
    base_limit = min(layout.size, reader.node.floor)
    if size != layout.size:
        # The old last chunk was cut by the end of the file, not by its content: it is
        # not a boundary of the new content.
        base_limit = min(base_limit, layout.size - 1)
    out: list[ChunkRef] = []
    pos, i, r = 0, 0, 0
    while pos < size:
        next_change = ranges[r][0] if r < len(ranges) else size
        # reuse old chunks that end before the next change (and inside the base)
        while (
            i < len(layout.chunks)
            and layout.starts[i] == pos
            and pos + layout.chunks[i][1] <= min(next_change, base_limit)
        ):
            out.append(layout.chunks[i])
            pos += layout.chunks[i][1]
            i += 1
        if pos >= size:
            break
        # cut new chunks from pos until a cut lands on an old boundary past the change
        change_end = ranges[r][1] if r < len(ranges) else size
        tail: bytes | memoryview = b""
        buf_start = pos
        while True:
            # a fresh buffer each round (`emit` may still hold views of the last one):
            # the last round's uncut tail, then the content read straight after it
            have = buf_start + len(tail)
            want = min(size, have + 2 * MAX_SIZE)
            buf = bytearray(want - buf_start)
            buf[: len(tail)] = tail
            if have < want:
                reader.read_into(memoryview(buf)[len(tail) :], have)
            at_eof = want >= size
            cuts = chunker.cut(buf)
            if not at_eof:
                cuts = cuts[:-1]  # the last cut is forced by the buffer's end
            resynced = False
            consumed = 0
            view = memoryview(buf)
            for off, length in cuts:
                out.append((emit(view[off : off + length]), length))
                consumed = off + length
                end = buf_start + consumed
                while r < len(ranges) and ranges[r][1] <= end:
                    r += 1
                change_end = ranges[r][1] if r < len(ranges) and ranges[r][0] < end else end
                if (
                    end in old_ends
                    and end >= change_end
                    and end <= base_limit
                    and (r >= len(ranges) or ranges[r][0] >= end)
                ):
                    i = old_ends[end] + 1
                    resynced = True
                    break
            buf_start += consumed
            tail = view[consumed:]
            if resynced or (at_eof and not tail):
                pos = buf_start
                break
        if not resynced:
            pos = size
    return out
