"""Reading a file's pages back from the spool as a save does (SyncReader): the
read-ahead thread's pages are the ones the next read asks for, or are not used."""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path

from cache.codec import DirtySealer
from cache.content import READ_AHEAD_FROM, Layout, SyncReader
from cache.records import PAGE_SIZE, Flag, Kind, Node
from cache.spool import Spool
from cache.store import Store

SPACE = str(uuid.uuid4())


def test_reads_with_and_without_read_ahead_give_the_file(tmp_path: Path):
    sealer = DirtySealer(os.urandom(32))
    store = Store(tmp_path / "store")
    node_id = str(uuid.uuid4())
    size = 40 * PAGE_SIZE * 8 + 12_345  # 40 MiB and a short last page
    content = bytearray(random.Random(3).randbytes(size))
    hole = 77  # a page never written: zeros
    content[hole * PAGE_SIZE : (hole + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
    with store.write() as t:
        for page_no in range(-(-size // PAGE_SIZE)):
            if page_no != hole:
                page = content[page_no * PAGE_SIZE : (page_no + 1) * PAGE_SIZE]
                t.put_page(SPACE, node_id, page_no, sealer.seal(node_id, page_no, page))
    node = Node(SPACE, node_id, Kind.FILE, size=size, floor=0, flags=Flag.DIRTY)

    def no_chunk(chunk_id: str, blob: bytes) -> bytes:
        raise AssertionError("no base chunk is read")

    with store.read(views=True) as t:
        reader = SyncReader(t, sealer, node, Layout.of([]), no_chunk, {})
        direct: list[int] = []
        read_pages = reader._read_pages
        reader._read_pages = lambda first, last: direct.append(first) or read_pages(first, last)
        # consecutive reads of one length at unaligned offsets, as the re-chunker makes
        # them, and a jump between (the read-ahead is then not the pages asked for)
        n = max(READ_AHEAD_FROM, 6 << 20) + 17
        spans = [(0, n), (n, n), (2 * n, n), (size - 3 * n, n), (size - 2 * n, n), (size - n, n)]
        for offset, length in spans:
            out = bytearray(length)
            reader.read_into(memoryview(out), offset)
            assert out == content[offset : offset + length], (offset, length)
        reader.close()
    # the reads that follow a large one come from its read-ahead; the jump does not
    assert direct == [0, (size - 3 * n) // PAGE_SIZE], direct
    store.close()


def test_a_longer_run_than_before_grows_the_thread_buffer(tmp_path: Path):
    # two runs in one read, the second longer: its buffer is grown while the first
    # run's views are still about
    spool = Spool(tmp_path / "pages.spool")
    pages = {slot: os.urandom(PAGE_SIZE + 29) for slot in (0, 2, 3, 4)}
    for item in pages.items():
        spool.write([item])  # one slot at a time: the buffer holds one slot
    got = spool.read([(slot, len(page)) for slot, page in pages.items()])
    assert {slot: bytes(blob) for slot, blob in got.items()} == pages
    spool.close()
