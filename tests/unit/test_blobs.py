"""The server's blob folder: what `advise` does to the page cache, seen with mincore."""

from __future__ import annotations

import ctypes
import mmap
import os
import time

import pytest

from server.blobs import DirectoryBlobStore

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]

SPACE = "0" * 32


def resident(path) -> int:
    """Pages of the file in the page cache (mincore over a shared read-only map)."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            pages = -(-size // mmap.PAGESIZE)
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


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
