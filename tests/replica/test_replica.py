"""The replica's guarantees, against a real server process."""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

import cache.chunks as chunks_module
from backend.http import HttpBackend
from cache.codec import HEADER_BYTES as HEADER
from cache.content import READ_AHEAD_CHUNKS
from cache.errors import Corrupt, Offline
from cache.keys import WrongPassword
from cache.records import Flag
from cache.session import Session, load, login
from cache.store import Store
from loft.protocol import ROOT_NODE as ROOT
from tests.pagecache import evict, resident
from tests.replica.worker import flood_content


def write_random(path: Path, size: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * 1024 * 1024)
            f.write(rng.randbytes(n))
            left -= n
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def counting_session(home: Path, **kw):
    """A session over a bare HTTP backend whose byte counters the test reads."""
    config, token, _ = load(home)
    backend = HttpBackend(config.server, token)
    return backend, Session.open(home, backend=backend, **kw)


async def write_new(replica, name: str, data: bytes):
    """Creates `name` in the home root with `data` and closes it (journals it)."""
    node = replica.create(replica.home, ROOT, name)
    await replica.write(replica.home, node.id, 0, data)
    replica.flush(replica.home, node.id)
    return node


async def until(check, step: float = 0.05):
    """Returns what `check()` returns once that is true (callers bound the wait)."""
    while True:
        if value := check():
            return value
        await trio.sleep(step)


async def shared_file(devices, tmp_path: Path, size: int, seed: int) -> tuple[Path, bytes]:
    """Two devices; the first imports `size` random bytes as data.bin and syncs. Returns
    the second device's home and the bytes."""
    a_home, b_home = await devices.add(), await devices.add()
    src = write_random(tmp_path / "data.bin", size, seed=seed)
    async with Session.open(a_home) as a:
        await a.import_file(src, ROOT, "data.bin")
        await a.sync()
    return b_home, src.read_bytes()


@asynccontextmanager
async def read_once(home: Path, data: bytes):
    """The device at `home` syncs and reads data.bin whole, checked against `data`;
    yields its session and the file's node."""
    async with Session.open(home) as b:
        await b.sync()
        assert await read_path(b, "data.bin") == data
        yield b, b.replica.resolve("data.bin")


async def read_path(session: Session, path: str) -> bytes:
    node = session.replica.resolve(path)
    return await session.replica.read(session.replica.home, node.id, 0, node.size + 1)


async def read_on_new_device(devices, path: str) -> bytes:
    """The file at `path` as a device added now reads it once synced."""
    async with Session.open(await devices.add()) as b:
        await b.sync()
        return await read_path(b, path)


async def test_replica_file_written_while_flushing_is_uploaded_once(devices):
    # the create goes while the file is still being written: it must not carry a
    # half-written copy whose last chunk (cut by the end of the data) is sent again
    home = await devices.add()
    first, second = random.Random(1).randbytes(3 << 20), random.Random(2).randbytes(3 << 20)
    backend, opened = counting_session(home)
    async with opened as a:
        r = a.replica
        node = r.create(r.home, ROOT, "growing.bin")
        await r.write(r.home, node.id, 0, first)
        with trio.fail_after(10):
            await until(lambda: not r.node(r.home, node.id).flags & Flag.LOCAL)  # created
        await r.write(r.home, node.id, len(first), second)
        r.flush(r.home, node.id)
        await a.sync()
        assert await read_path(a, "growing.bin") == first + second
        assert backend.bytes_sent < len(first + second) + 4096


async def test_replica_small_edit_of_big_file_uploads_one_chunk(devices, tmp_path):
    home = await devices.add()
    src = write_random(tmp_path / "big.bin", 300_000_000)
    backend, opened = counting_session(home)
    async with opened as a:
        r = a.replica
        node_id = await a.import_file(src, ROOT, "big.bin")
        await a.sync()
        # a 1-byte overwrite in the middle
        puts = backend.requests.get("put_chunk", 0) + backend.requests.get("put_chunks", 0)
        sent = backend.bytes_sent
        await r.write(r.home, node_id, 150_000_000, b"\x00")
        r.flush(r.home, node_id)
        await a.sync()
        chunks_sent = (
            backend.requests.get("put_chunk", 0) + backend.requests.get("put_chunks", 0) - puts
        )
        assert chunks_sent <= 1
        assert backend.bytes_sent - sent < 4.2e6 + 200_000  # one chunk plus requests
        # an 8-byte insertion at the start: the file is rewritten, as an editor saves it
        sent = backend.bytes_sent
        await r.truncate(r.home, node_id, 0)
        pos = 0
        with open(src, "rb") as f:
            await r.write(r.home, node_id, 0, b"INSERTED")
            pos = 8
            while block := f.read(8 << 20):
                if pos - 8 <= 150_000_000 < pos - 8 + len(block):
                    at = 150_000_000 - (pos - 8)
                    block = block[:at] + b"\x00" + block[at + 1 :]
                await r.write(r.home, node_id, pos, block)
                pos += len(block)
        r.flush(r.home, node_id)
        await a.sync()
        assert backend.bytes_sent - sent < 2 * 4.2e6 + 500_000  # at most two chunks
        head = await r.read(r.home, node_id, 0, 16)
        assert head[:8] == b"INSERTED"


@pytest.mark.parametrize("size", [0, 5 << 20])
async def test_replica_offline_edits_on_both_devices_keep_both(devices, server, size):
    # 5 MiB: the copy reads the edit's pages from the page spool, in more than one run
    a_home, b_home = await devices.add("laptop"), await devices.add("desk")
    pad = random.Random(size).randbytes(size)
    laptops, desks = b"laptop's edit" + pad, b"desk's edit!!" + pad
    async with Session.open(a_home) as a, Session.open(b_home) as b:
        ra, rb = a.replica, b.replica
        f = await write_new(ra, "notes.txt", b"original")
        await a.sync()
        await b.sync()
        server.stop()
        await ra.write(ra.home, f.id, 0, laptops)
        ra.flush(ra.home, f.id)
        g = rb.resolve("notes.txt")
        await rb.write(rb.home, g.id, 0, desks)
        rb.flush(rb.home, g.id)
        # offline: reads of cached data work, everything is queued
        assert await read_path(a, "notes.txt") == laptops
        server.start()
        await a.sync()
        await b.sync()
        await a.sync()
        names_a = sorted(n for n, *_ in ra.readdir(ra.home, ROOT))
        names_b = sorted(n for n, *_ in rb.readdir(rb.home, ROOT))
        assert names_a == names_b and len(names_a) == 2
        conflicted = [n for n in names_a if "conflicted copy" in n]
        assert len(conflicted) == 1 and conflicted[0].endswith(".txt")
        # the device that lost (its name is in the copy's) holds its edit locally in
        # the copy, before anything reads it there
        maker = a if "laptop" in conflicted[0] else b
        copy = maker.replica.resolve(conflicted[0])
        assert maker.replica.cached_bytes(copy) == copy.size == len(desks)
        contents = {await read_path(a, n) for n in names_a}
        assert contents == {laptops, desks}


async def test_replica_delete_against_edit_keeps_the_edit(devices, server):
    a_home, b_home = await devices.add("laptop"), await devices.add("desk")
    async with Session.open(a_home) as a, Session.open(b_home) as b:
        ra, rb = a.replica, b.replica
        await write_new(ra, "plan.md", b"v1")
        await a.sync()
        await b.sync()
        server.stop()
        ra.unlink(ra.home, ROOT, "plan.md")
        g = rb.resolve("plan.md")
        await rb.write(rb.home, g.id, 0, b"v2 edited")
        rb.flush(rb.home, g.id)
        server.start()
        await b.sync()
        await a.sync()
        await b.sync()
        for session in (a, b):
            assert await read_path(session, "plan.md") == b"v2 edited"


async def test_replica_killed_during_flush_drains_without_loss_or_duplicates(devices, tmp_path):
    home = await devices.add()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.replica.worker", "flood", str(home), "300", "50000"],
        stdout=subprocess.PIPE,
        env={**os.environ, "LOFT_TEST_FAST_KDF": "1"},
    )
    try:
        assert proc.stdout.readline().strip() == b"journaled"
        await trio.sleep(0.3)  # the flusher is uploading and committing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    async with Session.open(home) as a:
        await a.sync()
    other = await devices.add("checker")
    async with Session.open(other) as b:
        await b.sync()
        names = sorted(
            n for n, *_ in b.replica.readdir(b.replica.home, b.replica.resolve("flood").id)
        )
        assert names == [f"f{i:05}" for i in range(300)]
        for i in (0, 137, 299):
            assert await read_path(b, f"flood/f{i:05}") == flood_content(i, 50000)
        history = await b.backend.changes({b.replica.home: 0}, wait=0, limit=5000)
        creates = [c.name for c in history.spaces[b.replica.home].changes if c.op == "create"]
        assert len(creates) == len(set(creates)) == 300


@pytest.mark.parametrize("size", [10_000, 300_000])
async def test_replica_closes_not_yet_journaled_when_killed_are_uploaded_at_reopen(
    devices, size
):
    # a close journals the file's content a moment later, together with other closes;
    # a device stopped in between still has the writes, and journals them when it opens
    # (300,000 bytes: each file's last page was held back from the store until its close)
    home = await devices.add()
    done = subprocess.run(
        [sys.executable, "-m", "tests.replica.worker", "closed", str(home), "20", str(size)],
        env={**os.environ, "LOFT_TEST_FAST_KDF": "1"},
        timeout=60,
    )
    assert done.returncode == -signal.SIGKILL
    store = Store(home / "store", readonly=True)
    try:
        with store.read() as t:
            assert not [p for _, p in t.journal() if p.op == "content"]
    finally:
        store.close()
    async with Session.open(home) as a:
        await a.sync()
    other = await devices.add("checker")
    async with Session.open(other) as b:
        await b.sync()
        for i in range(20):
            assert await read_path(b, f"closed/f{i:05}") == flood_content(i, size)


async def test_replica_save_through_a_temporary_name_is_one_version(devices):
    # rsync and atomic savers: write a temporary file, close it, set its times, rename
    # it over the real name, all within the moment a close waits to be journaled. The
    # kernel's release of the handle may come after the rename (close(2) returns at
    # the flush): the odd saves see only the flush before it.
    home = await devices.add()
    async with Session.open(home) as a:
        r = a.replica
        for i in range(4):
            node = r.create(r.home, ROOT, f".save{i}.tmp")
            await r.write(r.home, node.id, 0, b"saved %d" % i)
            closed = r.flushed if i % 2 else r.close_written
            closed(r.home, node.id)
            r.setattr(r.home, node.id, mtime_ns=1_000_000_000)
            r.rename(r.home, ROOT, f".save{i}.tmp", ROOT, f"save{i}")
            if i % 2:
                r.close_written(r.home, node.id)  # the release
        await a.sync()
        history = await a.backend.changes({r.home: 0}, wait=0, limit=100)
        ops = [c.op for c in history.spaces[r.home].changes]
        assert ops.count("create") == 4 and "update" not in ops, ops
        for i in range(4):
            assert await read_path(a, f"save{i}") == b"saved %d" % i


async def test_replica_end_of_file_pages_are_sealed_short_and_read_as_zeros_past_it(
    devices,
):
    """A page holding the end of a file is kept only up to that end; past it, after an
    extension or a shrink, the file reads zeros, here and on another device."""
    home = await devices.add()
    page = 128 * 1024
    async with Session.open(home) as a:
        r = a.replica
        node = r.create(r.home, ROOT, "grows")
        await r.write(r.home, node.id, 0, b"x" * 4096)
        with a.store.read() as t:
            sealed = t.page(r.home, node.id, 0)
        assert sealed is not None and len(sealed) < 4096 + 64
        await r.write(r.home, node.id, 2 * page + 10, b"tail")
        expected = b"x" * 4096 + bytes(2 * page + 10 - 4096) + b"tail"
        assert await read_path(a, "grows") == expected
        await r.truncate(r.home, node.id, 100)
        await r.truncate(r.home, node.id, page + 50)
        expected = b"x" * 100 + bytes(page - 50)
        assert await read_path(a, "grows") == expected
        await r.write(r.home, node.id, 90, b"yy")
        expected = b"x" * 90 + b"yy" + b"x" * 8 + bytes(page - 50)
        assert await read_path(a, "grows") == expected
        r.close_written(r.home, node.id)
        await a.sync()
    assert await read_on_new_device(devices, "grows") == expected


async def test_replica_last_page_of_a_split_write_is_held_until_the_writer_moves_on(devices):
    """A writer whose buffer is not page-aligned has each 1 MiB write split by the
    kernel in two: the first part's last page is held in memory (read from there), not
    stored and then read back, sealed and stored again by the few bytes after it."""
    home = await devices.add()
    page, mib = 128 * 1024, 1 << 20
    data = random.Random(5).randbytes(3 * mib + 100_000)
    async with Session.open(home) as a:
        r = a.replica
        node = r.create(r.home, ROOT, "split")
        pos = 0
        for n in (mib - 48, 48, mib - 48, 48, mib - 48, 48 + 100_000):
            await r.write(r.home, node.id, pos, data[pos : pos + n])
            pos += n
            assert await read_path(a, "split") == data[:pos]
            with a.store.read() as t:
                stored = t.page(r.home, node.id, (pos - 1) // page) is not None
            assert stored == (pos % page == 0), pos  # a partial last page is held
        r.flushed(r.home, node.id)  # a close(2): the held page is stored
        with a.store.read() as t:
            assert t.page(r.home, node.id, 3 * mib // page) is not None
        assert await read_path(a, "split") == data
        r.close_written(r.home, node.id)
        await a.sync()
    assert await read_on_new_device(devices, "split") == data


async def test_replica_a_page_held_back_never_escapes_a_save(devices):
    """While a save reads a file, its writes hold no page back (the save's snapshot has
    every byte its size covers); a page stored outside a write counts as a change, so a
    save whose snapshot lacked it leaves the file dirty."""
    home = await devices.add()
    async with Session.open(home) as a:
        r = a.replica
        node = r.create(r.home, ROOT, "held")
        key = (r.home, node.id)
        r.saving.add(key)  # as Flusher._content does around its snapshot
        await r.write(r.home, node.id, 0, b"x" * 200_000)
        assert key not in r.content.held
        r.saving.discard(key)
        await r.write(r.home, node.id, 200_000, b"y" * 100_000)
        assert key in r.content.held
        before = r.node(*key)
        r.store_held([key])
        after = r.node(*key)
        assert after.gen > before.gen and after.flags & Flag.DIRTY
        assert await read_path(a, "held") == b"x" * 200_000 + b"y" * 100_000
        r.close_written(r.home, node.id)
        await a.sync()
    assert await read_on_new_device(devices, "held") == b"x" * 200_000 + b"y" * 100_000


async def test_replica_corrupt_blob_is_an_error_naming_the_chunk(
    devices, server, tmp_path, allow_error_logs
):
    a_home, b_home = await devices.add(), await devices.add()
    async with Session.open(a_home) as a:
        src = write_random(tmp_path / "data.bin", 3_000_000, seed=5)
        await a.import_file(src, ROOT, "data.bin")
        await a.sync()
        chunk_id = a.replica.content.layout(a.replica.resolve("data.bin")).chunks[0][0]
    blob = next(server.data_dir.glob(f"blobs/*/{chunk_id[:2]}/{chunk_id}"))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    async with Session.open(b_home) as b:
        await b.sync()
        node = b.replica.resolve("data.bin")
        with pytest.raises(Corrupt, match=chunk_id):
            await b.replica.read(b.replica.home, node.id, 0, 100)


async def cached_blob(store: Store, space: str, chunk_id: str) -> bytes:
    """The blob of a chunk once the cache writer has stored it."""

    def blob() -> bytes | None:
        with store.read() as t:
            view = t.chunk_view(space, chunk_id)
            return None if view is None else bytes(view)

    with trio.fail_after(10):
        return await until(blob, step=0.02)


async def test_replica_damaged_cached_copy_is_fetched_again(
    devices, tmp_path, allow_error_logs
):
    """A cached chunk opened in place in the map that fails its seal is dropped and
    fetched again: the reader gets the right bytes, and the cache the right blob."""
    b_home, data = await shared_file(devices, tmp_path, 3_000_000, seed=6)
    async with read_once(b_home, data) as (b, node):
        chunk_id = b.replica.content.layout(node).chunks[0][0]
        space = b.replica.home
        good = await cached_blob(b.store, space, chunk_id)
    store = Store(b_home / "store")
    with store.write() as t:
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0x01
        t.delete_chunk(space, chunk_id)
        t.put_chunk(space, chunk_id, bytes(bad))
    store.close()
    async with Session.open(b_home) as b:
        assert await read_path(b, "data.bin") == data
        assert await cached_blob(b.store, space, chunk_id) == good


async def test_replica_random_reads_open_only_the_blocks_they_need(
    devices, tmp_path, monkeypatch, allow_error_logs
):
    """Random reads of a cached, uncompressed file come from the blocks that hold them
    once each chunk was opened whole: right bytes at every offset, and a block damaged
    in the cache afterwards is caught (the chunk is fetched again), never returned."""
    monkeypatch.setattr(chunks_module, "DECODED_BYTES", 1)  # keeps one decoded chunk
    b_home, data = await shared_file(devices, tmp_path, 9_000_000, seed=7)
    async with read_once(b_home, data) as (b, node):
        r, chunks = b.replica, b.replica.chunks
        layout = r.content.layout(node)
        assert len(layout.chunks) >= 3, layout.chunks
        rng = random.Random(8)
        for _ in range(300):
            offset, size = rng.randrange(len(data)), rng.choice([1, 4096, 70_000])
            assert await r.read(r.home, node.id, offset, size) == data[offset : offset + size]
        assert chunks.block_reads > 100, chunks.block_reads

        # damage one block of the second chunk's cached blob, as the disk might
        chunk_id = layout.chunks[1][0]
        start = layout.starts[1]
        good = await cached_blob(b.store, r.home, chunk_id)
        bad = bytearray(good)
        bad[HEADER + 40_000] ^= 0x01
        with b.store.write() as t:
            t.delete_chunk(r.home, chunk_id)
            t.put_chunk(r.home, chunk_id, bytes(bad))
        # a whole chunk read takes the one decoded copy: chunk 1 is not decoded now
        await r.read(r.home, node.id, layout.starts[2], layout.chunks[2][1])
        before = chunks.block_reads
        at = start + 40_000 - 10
        assert await r.read(r.home, node.id, at, 4096) == data[at : at + 4096]
        assert chunks.block_reads == before  # not from the damaged block
        assert await cached_blob(b.store, r.home, chunk_id) == good  # fetched again


async def test_replica_sequential_cold_read_tells_the_server_what_comes_next(
    devices, tmp_path, monkeypatch
):
    """A sequential read of an uncached file names the chunks past its prefetch window
    in its downloads (the server reads them from disk early), each at most once, and
    none of the chunks it already holds; the bytes read are the file's."""
    # one decoded chunk in memory: what the first read left is held in the cache only
    monkeypatch.setattr(chunks_module, "DECODED_BYTES", 1)
    b_home, data = await shared_file(devices, tmp_path, 60_000_000, seed=11)
    backend, session = counting_session(b_home)
    async with session as b:
        await b.sync()
        r = b.replica
        node = r.resolve("data.bin")
        chunks = r.content.layout(node).chunks
        assert len(chunks) > READ_AHEAD_CHUNKS + 8, len(chunks)
        # the first half is read once, cached; the hints of a read of the whole file
        # then leave it out
        half = len(data) // 2
        got = bytearray()
        while len(got) < half:
            got += await r.read(r.home, node.id, len(got), min(1 << 20, half - len(got)))
        await until(lambda: r.chunks._unwritten_bytes == 0)
        r.content.forget(r.home, node.id)
        before = backend.read_ahead_ids
        got = bytearray()
        while len(got) < len(data):
            got += await r.read(r.home, node.id, len(got), 1 << 20)
        assert bytes(got) == data
        first_half = sum(1 for start in r.content.layout(node).starts if start < half)
        told = backend.read_ahead_ids - before
        assert 0 < told <= len(chunks) - first_half, (told, len(chunks), first_half)


async def test_replica_cache_cap_holds_while_reading_more(devices, tmp_path):
    a_home, b_home = await devices.add(), await devices.add()
    cap = 64 * 1024 * 1024
    async with Session.open(a_home) as a:
        await a.import_file(write_random(tmp_path / "movie.bin", 500_000_000), ROOT, "movie.bin")
        await a.sync()
    async with Session.open(b_home, cache_size=cap) as b:
        await b.sync()
        r = b.replica
        node = r.resolve("movie.bin")
        h = hashlib.sha256()
        peak = 0
        for offset in range(0, node.size, 4 << 20):
            h.update(await r.read(r.home, node.id, offset, 4 << 20))
            with b.store.read() as t:
                peak = max(peak, t.cache_bytes())
        assert h.hexdigest() == sha256_of(tmp_path / "movie.bin")
        assert 0 < peak <= cap


async def test_replica_saved_file_stays_readable_offline_when_the_cache_writer_lags(
    devices, server, monkeypatch, tmp_path
):
    # A save that rewrites part of a file keeps the chunks it sent in the cache, and its
    # pages go: those chunks are then the file's only local copy of that part. With the
    # cache writer's queue held to 1 MiB, rewriting 30 of 40 MB outruns it at once: the
    # save must wait for the writer, never leave chunks out, and the session must write
    # what is still queued when it closes right after the save.
    home = await devices.add()
    data = bytearray(write_random(tmp_path / "saved.bin", 40_000_000, seed=7).read_bytes())
    async with Session.open(home) as a:
        r = a.replica
        node_id = await a.import_file(tmp_path / "saved.bin", ROOT, "saved.bin")  # not cached
        await a.sync()
        assert await read_path(a, "saved.bin") == data
        ids = [c for c, _ in r.content.layout(r.node(r.home, node_id)).chunks]

        def cached() -> bool:
            with a.store.read() as t:
                return all(t.chunk_meta(r.home, c) is not None for c in ids)

        with trio.fail_after(30):
            await until(cached)
        monkeypatch.setattr(chunks_module, "UNWRITTEN_BYTES", 1 << 20)
        new = random.Random(8).randbytes(30_000_000)
        for offset in range(0, len(new), 1 << 20):
            await r.write(r.home, node_id, offset, new[offset : offset + (1 << 20)])
        data[: len(new)] = new
        r.flush(r.home, node_id)
        await a.sync()
        assert not r.node(r.home, node_id).flags & (Flag.DIRTY | Flag.PAGED)
    server.stop()
    async with Session.open(home) as a:
        with trio.fail_after(30):
            assert await read_path(a, "saved.bin") == data


async def test_replica_file_written_whole_keeps_its_pages_as_its_cached_copy(devices, server):
    """A save of a file written whole keeps its pages, clean, as its cached copy instead
    of writing the chunks it sent to the cache as well: none of them is cached, the
    pages count in the cache's bytes, and the file reads offline after a remount."""
    home = await devices.add()
    data = random.Random(9).randbytes(20_000_000)
    async with Session.open(home) as a:
        r = a.replica
        node = r.create(r.home, ROOT, "whole.bin")
        for offset in range(0, len(data), 1 << 20):
            await r.write(r.home, node.id, offset, data[offset : offset + (1 << 20)])
        r.flush(r.home, node.id)
        await a.sync()
        node = r.node(r.home, node.id)
        assert node.flags & Flag.PAGED and not node.flags & Flag.DIRTY
        ids = [c for c, _ in r.content.layout(node).chunks]
        with a.store.read() as t:
            assert not any(t.chunk_meta(r.home, c) for c in ids)
            assert t.page_numbers(r.home, node.id) == list(range(-(-len(data) // (128 << 10))))
            assert t.dirty_page_numbers(r.home, node.id) == []
            assert t.cache_bytes() >= len(data)
        assert r.cached_bytes(node) == len(data)
    server.stop()
    async with Session.open(home) as a:
        with trio.fail_after(30):
            assert await read_path(a, "whole.bin") == data


async def test_replica_kept_pages_give_way_to_a_remote_change_and_to_eviction(
    devices, tmp_path
):
    """Clean pages copy one version: a newer one from another device replaces them (the
    old bytes are never read again), and the cache cap evicts them like chunks."""
    a_home, b_home = await devices.add(), await devices.add()
    first = random.Random(10).randbytes(6_000_000)
    second = random.Random(11).randbytes(5_000_000)
    async with Session.open(a_home) as a:
        r = a.replica
        node = await write_new(r, "doc.bin", first)
        await a.sync()
        assert r.node(r.home, node.id).flags & Flag.PAGED
    async with Session.open(b_home) as b:
        await b.sync()
        rb = b.replica
        doc = rb.resolve("doc.bin")
        await rb.truncate(rb.home, doc.id, 0)
        await rb.write(rb.home, doc.id, 0, second)
        rb.flush(rb.home, doc.id)
        await b.sync()
    async with Session.open(a_home) as a:
        await a.sync()
        r = a.replica
        assert await read_path(a, "doc.bin") == second
        node = r.node(r.home, node.id)
        assert not node.flags & Flag.PAGED
        with a.store.read() as t:
            assert t.page_numbers(r.home, node.id) == []
            assert t.pages_entry(r.home, node.id) is None
    # a cache of 16 MB: each new file's pages push out the oldest
    async with Session.open(a_home, cache_size=16_000_000) as a:
        r = a.replica
        files = {f"f{i}.bin": random.Random(20 + i).randbytes(3_500_000) for i in range(6)}
        nodes = {}
        for name, data in files.items():
            nodes[name] = await write_new(r, name, data)
            await a.sync()
        with a.store.read() as t:
            assert t.cache_bytes() <= 16_000_000
            kept = [n for n in files if t.page_numbers(r.home, nodes[n].id)]
            assert kept and "f0.bin" not in kept and "f5.bin" in kept
            for name in files:
                if name not in kept:
                    assert t.pages_entry(r.home, nodes[name].id) is None
        for name, data in files.items():
            assert await read_path(a, name) == data


async def test_replica_kept_pages_stay_through_a_partial_save_and_a_resync(devices, server):
    """A later save that rewrites part of a file keeps the clean pages of the rest (the
    chunks there were never cached), and a resync keeps the pages of files whose
    version the server still has: the file reads offline after both."""
    home = await devices.add()
    data = random.Random(12).randbytes(6_000_000)
    async with Session.open(home) as a:
        r = a.replica
        node = await write_new(r, "grown.bin", data)
        await a.sync()
        await r.truncate(r.home, node.id, 9_000_000)  # a hole at the end
        r.flush(r.home, node.id)
        await a.sync()
        expected = data + bytes(3_000_000)

        def paged() -> int:
            n = r.node(r.home, node.id)
            assert n.flags & Flag.PAGED and not n.flags & Flag.DIRTY
            with a.store.read() as t:
                assert t.pages_entry(r.home, node.id) is not None
                return len(t.page_numbers(r.home, node.id))

        assert paged() == -(-len(data) // (128 << 10))
        await a.reconciler.resync(r.home)
        assert paged() == -(-len(data) // (128 << 10))
    server.stop()
    async with Session.open(home) as a:
        with trio.fail_after(30):
            assert await read_path(a, "grown.bin") == expected


async def test_replica_download_naming_chunks_to_come_has_the_server_read_them_early(
    devices, server, tmp_path
):
    """The read-ahead header end to end: a chunk GET naming other chunks makes the
    server read their blob files into its page cache; a GET naming none does not."""
    b_home, _ = await shared_file(devices, tmp_path, 20_000_000, seed=13)
    backend, session = counting_session(b_home)
    async with session as b:
        await b.sync()
        r = b.replica
        ids = [c for c, _ in r.content.layout(r.resolve("data.bin")).chunks]
        assert len(ids) >= 4, ids
        blobs = {c: next(server.data_dir.glob(f"blobs/*/{c[:2]}/{c}")) for c in ids}
        for path in blobs.values():
            evict(path)
        if any(resident(p) for p in blobs.values()):
            pytest.skip("this filesystem keeps clean pages it was told to drop (tmpfs?)")
        first, named, unnamed = ids[0], ids[1:3], ids[3:]
        await backend.get_chunk(r.home, first)

        def full(c: str) -> bool:
            return resident(blobs[c]) == -(-blobs[c].stat().st_size // mmap.PAGESIZE)

        with trio.fail_after(10):
            while not all(full(c) for c in named):
                # the server drops a hint while it acts on ADVISING others (an earlier
                # test's may still run): the GET names them again
                await backend.get_chunk(r.home, first, named)
                await trio.sleep(0.05)
        assert not any(resident(blobs[c]) for c in unnamed)


async def test_replica_file_read_while_the_cache_writer_lags_is_cached_whole_after(
    devices, server, tmp_path, monkeypatch
):
    """A download the cache writer is too far behind to take is used and fetched again
    once reads pause: the file read once is then whole in the cache, and reads offline."""
    monkeypatch.setattr(chunks_module, "UNWRITTEN_BYTES", 1 << 20)  # the writer lags at once
    monkeypatch.setattr(chunks_module, "REFILL_QUIET", 0.2)
    b_home, data = await shared_file(devices, tmp_path, 40_000_000, seed=12)
    async with read_once(b_home, data) as (b, node):
        r, chunks = b.replica, b.replica.chunks
        ids = [c for c, _ in r.content.layout(node).chunks]

        def cached() -> int:
            with b.store.read() as t:
                return sum(t.chunk_meta(r.home, c) is not None for c in ids)

        assert cached() < len(ids)  # some downloads were not cached when they came
        with trio.fail_after(30):
            await until(lambda: cached() == len(ids))
        assert chunks.refilled > 0
    server.stop()
    async with Session.open(b_home) as b:
        with trio.fail_after(30):
            assert await read_path(b, "data.bin") == data


async def test_replica_offline_uncached_read_fails_fast(devices, server, tmp_path):
    a_home, b_home = await devices.add(), await devices.add()
    async with Session.open(a_home) as a:
        await a.import_file(write_random(tmp_path / "x.bin", 2_000_000), ROOT, "x.bin")
        await a.sync()
    async with Session.open(b_home) as b:
        await b.sync()
        server.stop()
        node = b.replica.resolve("x.bin")
        with trio.fail_after(6):
            with pytest.raises(Offline):
                await b.replica.read(b.replica.home, node.id, 0, 10)
        # writes are still accepted and queued
        await write_new(b.replica, "offline.txt", b"queued")
        server.start()
        await b.sync()
    async with Session.open(a_home) as a:
        await a.sync()
        assert await read_path(a, "offline.txt") == b"queued"


class SlowLink:
    """A TCP relay on 127.0.0.1 to the server that passes the server's answers on at
    `rate` bytes a second over all its connections together, or not at all while
    frozen (a server that stopped answering, its connections still open)."""

    def __init__(self, target_port: int, rate: int) -> None:
        self.target_port, self.rate = target_port, rate
        self.port = 0
        self._turn = trio.Lock()
        self._flowing = trio.Event()
        self._flowing.set()

    def freeze(self) -> None:
        self._flowing = trio.Event()

    def thaw(self) -> None:
        self._flowing.set()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.target_port)

        async def up() -> None:
            async for data in client:
                await server.send_all(data)

        async def down() -> None:
            async for data in server:
                for i in range(0, len(data), 4096):
                    async with self._turn:
                        await self._flowing.wait()
                        await trio.sleep(4096 / self.rate)
                    await client.send_all(data[i : i + 4096])

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(up)
                nursery.start_soon(down)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await server.aclose()
            await client.aclose()


async def test_replica_cold_read_over_a_slow_link_completes_and_a_silent_one_fails(
    devices, server, tmp_path
):
    """Downloads side by side on a slow link each take longer than the fetch deadline:
    the read completes, because the server keeps sending. A server that sends nothing
    more makes the read fail with Offline within a few seconds."""
    a_home = await devices.add()
    src = write_random(tmp_path / "slow.bin", 2_500_000, seed=8)
    async with Session.open(a_home) as a:
        await a.import_file(src, ROOT, "slow.bin")
        await a.sync()
    port = int(server.url.rsplit(":", 1)[1])
    link = SlowLink(port, rate=320_000)  # ~8 s for the file: two chunks side by side
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        b_home = tmp_path / "slow-device"
        await login(b_home, f"http://127.0.0.1:{link.port}", devices.user, "correct horse", "slow")
        async with Session.open(b_home) as b:
            await b.sync()
            node = b.replica.resolve("slow.bin")
            started = trio.current_time()
            with trio.fail_after(60):
                data = await b.replica.read(b.replica.home, node.id, 0, node.size)
            assert data == src.read_bytes()
            assert trio.current_time() - started > 5.0  # longer than one fetch deadline
            a_src = write_random(tmp_path / "more.bin", 1_500_000, seed=9)
            async with Session.open(a_home) as a:
                await a.import_file(a_src, ROOT, "more.bin")
                await a.sync()
            await b.sync()
            link.freeze()
            more = b.replica.resolve("more.bin")
            with trio.fail_after(15):
                with pytest.raises(Offline):
                    await b.replica.read(b.replica.home, more.id, 0, more.size)
            link.thaw()
        nursery.cancel_scope.cancel()


async def test_replica_login_with_password_alone_and_no_plaintext_at_rest(
    devices, server, tmp_path
):
    marker = b"LOFT-PLAINTEXT-MARKER-7f3a9c" * 40_000  # compressible, 1.1 MB
    a_home = await devices.add()
    async with Session.open(a_home) as a:
        r = a.replica
        await write_new(r, "secret.txt", marker)
        g = r.create(r.home, ROOT, "unsynced.txt")
        await r.write(r.home, g.id, 0, marker[:100_000])  # dirty pages, not yet flushed
        await a.sync()
    with pytest.raises(WrongPassword):
        await login(tmp_path / "intruder", server.url, devices.user, "wrong", "x")
    b_home = await devices.add("new laptop")
    async with Session.open(b_home) as b:
        await b.sync()
        assert await read_path(b, "secret.txt") == marker
    needle = b"LOFT-PLAINTEXT-MARKER"
    for root in (server.data_dir, a_home, b_home):
        for path in root.rglob("*"):
            if path.is_file():
                assert needle not in path.read_bytes(), path


async def test_replica_one_gib_round_trip_in_bounded_memory(devices, tmp_path):
    a_home, b_home = await devices.add(), await devices.add()
    src = write_random(tmp_path / "one-gib.bin", 1 << 30, seed=9)
    dst = tmp_path / "back.bin"
    result = await trio.run_process(
        [sys.executable, "-m", "tests.replica.worker", "roundtrip", str(a_home), str(b_home),
         str(src), str(dst), str(128 << 20)],
        capture_stdout=True, env={**os.environ, "LOFT_TEST_FAST_KDF": "1"})
    peak_rss = int(result.stdout.decode().split()[-1])
    assert sha256_of(dst) == sha256_of(src)
    assert peak_rss < 400 * 1024 * 1024, f"peak RSS {peak_rss / 1e6:.0f} MB"
