"""Where a chunk's plaintext comes from: a small in-memory LRU of decoded chunks, else
the sealed copy in the local store, else the server, fetched once however many readers
wait (single-flight), stored sealed and opened in a worker thread. A random read of a
few KiB of a cached, uncompressed chunk opens only the blocks that hold it
(`get_range`), once the chunk was opened whole and its blocks tagged. A sequential
reader also names the chunks past its prefetch window (`read_ahead`); the next
download tells the server, which starts reading them from its disk.

The store's chunk cache has a hard byte cap: inserting evicts least recently used
unpinned chunks first, and a chunk that cannot fit is used without being cached. A
download that comes while the cache writer is far behind (the local disk busy) is used,
and fetched again to be cached once reads pause (`_refill`).
Pinned chunks are never evicted; dirty data lives elsewhere (pages) and is never
counted here.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable

import trio

from backend.base import Backend, BackendError, is_transient
from backend.base import NotFound as BackendNotFound
from backend.http import HttpBackend
from backend.wrappers import layer
from cache.codec import BlockTags, ChunkCodec, CorruptChunk, run_cpu
from cache.errors import Corrupt, NoSpace, Offline
from cache.store import Store, StoreFull, Txn
from loft.protocol import MAX_BLOB_BYTES, MAX_READ_AHEAD_IDS

log = logging.getLogger(__name__)

DECODED_BYTES = 48 * 1024 * 1024
#: Past this many bytes of queued cache inserts, a downloaded chunk is not cached and a
#: chunk this device sent (`keep`) waits for the cache writer's next burst.
UNWRITTEN_BYTES = 16 * 1024 * 1024
TOUCH_EVERY = 30.0
#: Chunks whose block tags are kept for range reads, the most recently used this many:
#: 1 KiB of tags for a 2 MiB chunk, so at most about 4 MiB for 8 GiB of chunks.
TAGGED_CHUNKS = 4096
FETCH_TIMEOUT = 5.0
#: Downloads not cached because the cache writer was behind, the most recent this many:
#: fetched again and cached once the mount has been quiet for REFILL_QUIET seconds.
REFILL_CHUNKS = 4096
REFILL_QUIET = 1.0
REFILL_TRIES = 3


class Connectivity:
    """Whether the server answered lately. Readers fail fast while offline."""

    def __init__(self) -> None:
        self.online = True
        self.since = time.time()
        self.reason = ""
        self._changed = trio.Event()

    def up(self) -> None:
        if not self.online:
            log.info("server reachable again")
            self.online, self.since, self.reason = True, time.time(), ""
            self._changed.set()
            self._changed = trio.Event()

    def down(self, reason: str) -> None:
        if self.online:
            log.warning("server unreachable: %s", reason)
            self.online, self.since = False, time.time()
            self._changed.set()
            self._changed = trio.Event()
        self.reason = reason

    async def wait_change(self) -> None:
        await self._changed.wait()


class ChunkSource:
    def __init__(
        self,
        store: Store,
        backend: Backend,
        codec_of: Callable[[str], ChunkCodec],
        cap: int,
        connectivity: Connectivity,
    ) -> None:
        self.store = store
        self.backend = backend
        self.codec_of = codec_of
        self.cap = cap
        self.net = connectivity
        self._decoded: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._decoded_bytes = 0
        self._inflight: dict[tuple[str, str], trio.Event] = {}
        self._touched: dict[tuple[str, str], float] = {}
        self._unwritten: dict[tuple[str, str], bytes] = {}
        self._unwritten_bytes = 0
        self._writing: dict[tuple[str, str], bytes] = {}
        self._unwritten_event = trio.Event()
        #: set each time the cache writer takes its queue (None: no writer runs)
        self._taken: trio.Event | None = None
        #: chunks read from the cache whose access time is not yet recorded
        self._untouched: set[tuple[str, str]] = set()
        #: the same for files read from their clean pages (see Txn.keep_pages)
        self._untouched_pages: set[tuple[str, str]] = set()
        #: downloads the writer was too far behind to cache (see _refill)
        self._skipped: OrderedDict[tuple[str, str], int] = OrderedDict()  # -> tries
        #: the last cache write failed for want of space (see _write_items)
        self._store_full = False
        self._skipped_event = trio.Event()
        #: trio.current_time() of the last download started, for _refill's quiet
        self._last_fetch = 0.0
        #: chunks fetched again and cached by _refill
        self.refilled = 0
        #: block tags of cached uncompressed chunks opened whole (see get_range), under
        #: a key of this process: the store never holds them, nor anything to forge them
        self._tags: OrderedDict[tuple[str, str], BlockTags] = OrderedDict()
        self._tag_key = os.urandom(32)
        #: reads answered from a cached chunk's blocks, without opening it whole
        self.block_reads = 0
        self._prefetch_send, self._prefetch_recv = trio.open_memory_channel[tuple[str, str]](64)
        #: per space, chunks a sequential reader will want after the prefetch window:
        #: the next download from that space names them to the server (`read_ahead`)
        self._ahead: dict[str, list[str]] = {}
        self.fetched_bytes = 0
        try:
            self._http: HttpBackend | None = layer(backend, HttpBackend)
        except LookupError:
            self._http = None

    # ------------------------------------------------------------------ reads

    async def get(self, space: str, chunk_id: str, *, tag: bool = False) -> bytes:
        """The plaintext of a chunk. Raises Offline, Corrupt. With `tag`, a chunk opened
        whole from the local cache has its blocks tagged too, for `get_range`."""
        key = (space, chunk_id)
        while True:
            hit = self._decoded.get(key)
            if hit is not None:
                self._decoded.move_to_end(key)
                return hit
            event = self._inflight.get(key)
            if event is None:
                break
            await event.wait()  # the one fetch under way; then look again
        event = self._inflight[key] = trio.Event()
        try:
            plain = await self._load(space, chunk_id, tag)
            self._remember(key, plain)
            return plain
        finally:
            del self._inflight[key]
            event.set()

    async def _load(self, space: str, chunk_id: str, tag: bool) -> bytes:
        key = (space, chunk_id)
        codec = self.codec_of(space)
        blob = self._unwritten.get(key) or self._writing.get(key)
        try:
            if blob is not None:
                opened = await codec.open_async(chunk_id, blob), None
            else:
                # read and open in one worker thread: reading a cached chunk faults the
                # map's pages in from disk, which must not stall the trio thread
                opened = await run_cpu(self._open_cached, codec, space, chunk_id, tag)
            if opened is not None:
                plain, tags = opened
                if tags is not None:
                    self._tags[key] = tags
                    if len(self._tags) > TAGGED_CHUNKS:
                        self._tags.popitem(last=False)
                self._touch(space, chunk_id)
                return plain
        except CorruptChunk as exc:
            log.warning(
                "cached copy of chunk %s is corrupt (%s); fetching it again",
                chunk_id,
                exc.reason,
            )
            with self.store.write() as t:
                t.delete_chunk(space, chunk_id)
        self._last_fetch = trio.current_time()
        blob = await self.fetch(space, chunk_id)
        try:
            plain = await codec.open_async(chunk_id, blob)
        except CorruptChunk as exc:
            log.error("chunk %s from the server is corrupt: %s", chunk_id, exc.reason)
            raise Corrupt(f"chunk {chunk_id} is corrupt: {exc.reason}") from None
        self.cache(space, chunk_id, blob)
        return plain

    def _open_cached(
        self, codec: ChunkCodec, space: str, chunk_id: str, tag: bool
    ) -> tuple[bytes, BlockTags | None] | None:
        """The plaintext of a chunk in the local cache, None if it is not there, and
        with `tag` the tags of its blocks, taken in the same read of the blob. The
        cache admits only blobs whose content was checked against their id (downloads,
        pins) or that this device sealed (uploads), so only their seal is checked; in a
        store that may hold blobs cached before that rule, everything is."""
        with self.store.read(views=True) as t:
            blob = t.chunk_view(space, chunk_id)
            if blob is None:
                return None
            plain = codec.open(chunk_id, blob, check_content=not self.store.chunks_checked)
            return plain, codec.block_tags(blob, self._tag_key) if tag else None

    async def get_range(self, space: str, chunk_id: str, lo: int, hi: int) -> bytes:
        """Plaintext bytes [lo, hi) of a chunk, for a random read. Once the chunk was
        opened whole from the local cache (which tags its blocks, if it is not
        compressed), they come from the blocks of the cached blob that hold them: a 4
        KiB read then decrypts 32 KiB, not a 2 MiB chunk. Otherwise, or if the blob
        changed since, the chunk is taken whole (`get`)."""
        key = (space, chunk_id)
        tags = self._tags.get(key)
        if tags is not None and key not in self._decoded:
            codec = self.codec_of(space)
            try:
                # inline: one or two 32 KiB blocks cost ~20 us, less than a thread hop,
                # and a fault on them is one small read of the map
                with self.store.read(views=True) as t:
                    blob = t.chunk_view(space, chunk_id)
                    part = None if blob is None else codec.open_range(
                        chunk_id, blob, tags, self._tag_key, lo, hi
                    )  # fmt: skip
            except CorruptChunk as exc:
                log.warning("cached chunk %s failed a range read: %s", chunk_id, exc.reason)
                part = None  # `get` checks the whole blob, and fetches it again
            if part is not None:
                self._tags.move_to_end(key)
                self.block_reads += 1
                self._touch(space, chunk_id)
                return part
            del self._tags[key]
        plain = await self.get(space, chunk_id, tag=True)
        return plain[lo:hi]

    async def fetch(self, space: str, chunk_id: str) -> bytes:
        """The sealed blob from the server; Offline once the server sent nothing for
        FETCH_TIMEOUT (see _get_while_heard)."""
        if not self.net.online and time.time() - self.net.since < 2.0:
            raise Offline(f"offline ({self.net.reason}) and chunk {chunk_id} is not cached")
        try:
            blob = await self._get_while_heard(space, chunk_id)
        except trio.TooSlowError:
            self.net.down("a chunk download timed out")
            raise Offline(f"the server did not send chunk {chunk_id} in time") from None
        except BackendNotFound:
            log.error("chunk %s is missing on the server", chunk_id)
            raise Corrupt(f"chunk {chunk_id} is missing on the server") from None
        except BackendError as exc:
            if is_transient(exc):
                self.net.down(str(exc))
                raise Offline(f"cannot fetch chunk {chunk_id}: {exc}") from None
            raise
        self.net.up()
        self.fetched_bytes += len(blob)
        return blob

    async def _get_while_heard(self, space: str, chunk_id: str) -> bytes:
        """`get_chunk`, or TooSlowError once FETCH_TIMEOUT passed in which the server
        sent no byte of any download. On a slow link the downloads side by side (and a
        read queued behind them for a transfer slot) each take longer than that, and
        that is no sign of an unreachable server: with a deadline on the whole download,
        a cold read over a 2.5 Mbit/s relay never completed (the test of this). Where
        the backend does not say when it last heard from the server, the deadline
        covers the download."""
        started = trio.current_time()
        out: list[bytes] = []
        failed: list[Exception] = []

        def heard() -> float:
            last = self._http.last_byte if self._http is not None else None
            return started if last is None else max(started, last)

        async with trio.open_nursery() as nursery:

            async def get() -> None:
                try:
                    ahead = self._ahead.pop(space, ())
                    out.append(await self.backend.get_chunk(space, chunk_id, ahead))
                except Exception as exc:  # raised below, outside the nursery's group
                    failed.append(exc)
                nursery.cancel_scope.cancel()

            async def watch() -> None:
                while trio.current_time() - heard() <= FETCH_TIMEOUT:  # noqa: ASYNC110
                    await trio.sleep_until(heard() + FETCH_TIMEOUT + 0.05)
                nursery.cancel_scope.cancel()

            nursery.start_soon(get)
            nursery.start_soon(watch)
        if failed:
            raise failed[0]
        if not out:  # the watch cancelled the download
            raise trio.TooSlowError
        return out[0]

    def cache(self, space: str, chunk_id: str, blob: bytes) -> None:
        """Keeps a sealed chunk locally if it fits under the cap; only blobs that passed
        `open` or were sealed here (see _open_cached). Inserts are written in
        bursts, one transaction each (a synced commit per chunk would cost more than
        the download); until then `_unwritten` serves them."""
        if len(blob) > self.cap:
            return
        if self._unwritten_bytes > UNWRITTEN_BYTES:
            # the writer is far behind (the local disk is busy): rather than hold more
            # in memory or make the reader wait, fetch this one again later (_refill)
            self._skipped[(space, chunk_id)] = 0
            self._skipped.move_to_end((space, chunk_id))
            if len(self._skipped) > REFILL_CHUNKS:
                self._skipped.popitem(last=False)
            self._skipped_event.set()
            return
        self._unwritten[(space, chunk_id)] = blob
        self._unwritten_bytes += len(blob)
        self._unwritten_event.set()

    async def keep(self, space: str, chunk_id: str, blob: bytes) -> None:
        """`cache` for a chunk this device sealed from a file's dirty pages and sent:
        once the save commits, the pages go and this is the file's only local copy, so
        rather than skip it when the writer is behind, wait for the writer's next burst.
        (A 1 GiB save left 60 MiB of the file uncached here before this.)"""
        while self._unwritten_bytes > UNWRITTEN_BYTES and self._taken is not None:
            await self._taken.wait()
        self.cache(space, chunk_id, blob)

    def _write_items(
        self,
        items: dict[tuple[str, str], bytes],
        touched: set[tuple[str, str]],
        touched_pages: set[tuple[str, str]] = frozenset(),
    ) -> None:
        """Writes queued inserts and access times in one transaction, evicting to stay
        under the cap."""
        if not items and not touched and not touched_pages:
            return
        try:
            with self.store.write() as t:
                for space, chunk_id in touched:
                    t.touch_chunk(space, chunk_id)
                for space, node_id in touched_pages:
                    t.touch_pages(space, node_id)
                added = [t.put_chunk(space, chunk_id, blob)
                         for (space, chunk_id), blob in items.items()]
                if any(added):
                    t.evict(self.cap)
            self._store_full = False
        except StoreFull:
            self._store_full = True
            log.warning("local store full; %d chunks not cached", len(items))

    async def _run_cache_writer(self) -> None:
        self._taken = trio.Event()
        try:
            await self._write_bursts()
        finally:
            self._taken.set()
            self._taken = None
            # A save's kept chunks may still be queued, its pages already gone: write
            # them before the store closes (an unmount right after a save).
            items, self._unwritten, self._unwritten_bytes = self._unwritten, {}, 0
            touched, self._untouched = self._untouched, set()
            pages, self._untouched_pages = self._untouched_pages, set()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._write_items, items, touched, pages)

    async def _write_bursts(self) -> None:
        while True:
            await self._unwritten_event.wait()
            self._unwritten_event = trio.Event()
            await trio.sleep(0.02)  # let a burst gather
            items, self._unwritten, self._unwritten_bytes = self._unwritten, {}, 0
            self._taken.set()
            self._taken = trio.Event()
            touched, self._untouched = self._untouched, set()
            pages, self._untouched_pages = self._untouched_pages, set()
            # the commit (copy into the map, fsync) runs off the trio thread: it was a
            # third of a cold read's time there; readers find these blobs in _writing
            self._writing = items
            try:
                await trio.to_thread.run_sync(self._write_items, items, touched, pages)
            finally:
                self._writing = {}

    def _remember(self, key: tuple[str, str], plain: bytes) -> None:
        self._decoded[key] = plain
        self._decoded_bytes += len(plain)
        while self._decoded_bytes > DECODED_BYTES and len(self._decoded) > 1:
            _, old = self._decoded.popitem(last=False)
            self._decoded_bytes -= len(old)

    def forget(self, space: str, chunk_id: str) -> None:
        self._tags.pop((space, chunk_id), None)
        old = self._decoded.pop((space, chunk_id), None)
        if old is not None:
            self._decoded_bytes -= len(old)

    def _touch(self, space: str, chunk_id: str) -> None:
        """Records a cache hit for eviction order, with the cache writer's next batch:
        a synced transaction per hit cost a re-read of a cached file ~200 us a chunk on
        the trio thread. (A crash loses only some recency, never data.)"""
        if self._due((space, chunk_id)):
            self._untouched.add((space, chunk_id))
            self._unwritten_event.set()

    def touch_pages(self, space: str, node_id: str) -> None:
        """`_touch` for a file read from its clean pages."""
        if self._due((space, node_id)):
            self._untouched_pages.add((space, node_id))
            self._unwritten_event.set()

    def _due(self, key: tuple[str, str]) -> bool:
        """Whether an access is due a record (none in the last TOUCH_EVERY seconds)."""
        now = time.monotonic()
        if now - self._touched.get(key, 0.0) < TOUCH_EVERY:
            return False
        self._touched[key] = now
        return True

    # ------------------------------------------------------------------ prefetch

    def prefetch(self, space: str, chunk_ids: list[str]) -> None:
        """Asks the background fetchers for these chunks; drops requests when busy."""
        for chunk_id in chunk_ids:
            if (space, chunk_id) in self._decoded or (space, chunk_id) in self._inflight:
                continue
            try:
                self._prefetch_send.send_nowait((space, chunk_id))
            except trio.WouldBlock:
                return

    def read_ahead(self, space: str, chunk_ids: list[str]) -> None:
        """Chunks a sequential reader will want after those it prefetches: the server
        is told with the next download from the space (the GET's read-ahead header),
        so that it reads them from its disk before they are asked for. Those cached
        here are left out; the newest MAX_READ_AHEAD_IDS are kept."""
        with self.store.read() as t:
            wanted = [
                c for c in chunk_ids
                if (space, c) not in self._decoded
                and (space, c) not in self._inflight
                and not self._held(t, (space, c))
            ]  # fmt: skip
        if wanted:
            queued = self._ahead.setdefault(space, [])
            queued += wanted
            del queued[:-MAX_READ_AHEAD_IDS]

    def _held(self, t: Txn, key: tuple[str, str]) -> bool:
        """Whether the local cache has the chunk, or will once the writer's queue (or
        the burst it is writing) is in."""
        return key in self._unwritten or key in self._writing or t.chunk_meta(*key) is not None

    async def run_prefetchers(self, workers: int = 8, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(self._prefetcher)
            nursery.start_soon(self._run_cache_writer)
            nursery.start_soon(self._refill)
            task_status.started()

    async def _refill(self) -> None:
        """Caches what a read used but could not cache (see `cache`): a file read once
        is then whole in the cache, for offline use and the next read, as it would be
        had the local disk kept up. Each chunk is fetched again once the mount has not
        started a download for REFILL_QUIET seconds (a read going on comes first), at
        the writer's pace, and only while it fits under the cap without evicting
        anything: in a cache smaller than what was read, it would push out chunks read
        after it."""
        while True:
            await self._skipped_event.wait()
            self._skipped_event = trio.Event()
            while self._skipped:
                if not self.net.online:
                    await self.net.wait_change()
                    continue
                quiet = self._last_fetch + REFILL_QUIET - trio.current_time()
                if quiet > 0 or self._inflight:
                    await trio.sleep(max(quiet, REFILL_QUIET / 4))
                    continue
                key, tries = self._skipped.popitem(last=False)
                space, chunk_id = key
                pending = self._unwritten_bytes + sum(map(len, self._writing.values()))
                with self.store.read() as t:
                    if self._held(t, key):
                        continue  # read again since, or pinned: cached or on its way
                    room = self.cap - t.cache_bytes() - pending
                if room < 2 * MAX_BLOB_BYTES or self._store_full:
                    self._skipped.clear()
                    break
                try:
                    # not through `fetch`: a refill that fails says nothing of the
                    # connection to readers (no Offline for them), it is tried again
                    # later, at most REFILL_TRIES times
                    blob = await self._get_while_heard(space, chunk_id)
                    await self.codec_of(space).open_async(chunk_id, blob)  # as downloads
                except (trio.TooSlowError, BackendError, CorruptChunk) as exc:
                    log.debug("refill of chunk %s failed: %s", chunk_id, exc)
                    transient = isinstance(exc, trio.TooSlowError) or (
                        isinstance(exc, BackendError) and is_transient(exc)
                    )
                    if transient and tries + 1 < REFILL_TRIES:
                        self._skipped[key] = tries + 1
                        await trio.sleep(REFILL_QUIET * 4)
                    continue
                await self.keep(space, chunk_id, blob)
                self.refilled += 1

    async def _prefetcher(self) -> None:
        async for space, chunk_id in self._prefetch_recv:
            try:
                await self.get(space, chunk_id)
            except (Offline, Corrupt, NoSpace, BackendError) as exc:
                # a reader that wants this chunk meets the same error itself
                log.debug("prefetch of %s skipped: %s", chunk_id, exc)
