"""The server's blob folder: what `advise` does to the page cache, seen with mincore."""

from __future__ import annotations

import errno
import mmap
import os
import time

import pytest

from server.blobs import DirectoryBlobStore
from tests.pagecache import evict, resident

SPACE = "0" * 32


def test_advise_reads_the_named_blobs_into_the_page_cache_and_ignores_absent_ones(tmp_path):
    store = DirectoryBlobStore(tmp_path / "blobs")
    ids = [f"{i:02x}" * 32 for i in range(3)]
    store.put_many(SPACE, [(i, os.urandom(1 << 20)) for i in ids])  # durable: clean pages
    paths = [store._path(SPACE, i) for i in ids]
    for p in paths:
        evict(p)
    if any(resident(p) for p in paths):
        pytest.skip("this filesystem keeps clean pages it was told to drop (tmpfs?)")

    store.advise(SPACE, [ids[0], "ff" * 32, ids[1]])  # one absent: a hint, not an error

    full = (1 << 20) // mmap.PAGESIZE
    deadline = time.monotonic() + 10
    while [resident(p) for p in paths[:2]] != [full, full] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [resident(p) for p in paths] == [full, full, 0]
    assert store.get(SPACE, ids[0]) is not None


@pytest.mark.parametrize("direct", [True, False])
def test_blobs_of_any_length_read_back_as_written(tmp_path, direct):
    store = DirectoryBlobStore(tmp_path / "blobs")
    store.direct = store.direct and direct
    sizes = [0, 1, 4095, 4096, 4097, (2 << 20) + 3, 9 << 20]
    items = [(f"{i:02x}" * 32, os.urandom(n)) for i, n in enumerate(sizes)]
    store.put_many(SPACE, items[:3])
    for chunk_id, data in items[3:]:
        store.put(SPACE, chunk_id, memoryview(data))
    big = store._path(SPACE, items[-1][0])
    if direct and store.direct:
        assert resident(big) == 0  # written past the page cache
    elif not direct:
        assert resident(big) > 0
    for chunk_id, data in items:
        assert store.get(SPACE, chunk_id) == data
    assert not list((tmp_path / "blobs").rglob("*.tmp"))


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_a_filesystem_refusing_o_direct_gets_buffered_writes_and_no_stray_file(
    tmp_path, monkeypatch
):
    real_open = os.open

    def refusing_open(path, flags, mode=0o777, **kwargs):
        if flags & os.O_DIRECT:
            # as Linux does: the file is created before the flag is refused
            os.close(real_open(path, flags & ~os.O_DIRECT, mode, **kwargs))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    store = DirectoryBlobStore(tmp_path / "blobs")
    data = os.urandom(1 << 20)
    store.put(SPACE, "ab" * 32, data)
    assert not store.direct
    assert store.get(SPACE, "ab" * 32) == data
    assert not list((tmp_path / "blobs").rglob("*.tmp"))
