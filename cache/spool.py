"""The page spool: full-size sealed pages, kept outside LMDB in one file of fixed slots.

A write into the mount stores its sealed pages before it returns. In LMDB a 1 GiB copy
put 1 GiB through the page cache (fresh pages, then written back and synced per write):
3-3.5 s of kernel time on this project's machine, most of the copy's cost. Here the
large pages go straight to the disk with O_DIRECT from one reused buffer per thread,
and LMDB holds only a small record per page (slot, length, the sealed page's tag).

Slots are PAGE_SIZE plus 4 KiB (a sealed page and its overhead, aligned). Which slots
are free is kept in LMDB (see `Txn.put_page`): a slot is written only while no
committed record names it, so a crash leaves every committed page intact, and a freed
slot is reused only once no reader can still see a record of it and the freeing is
durable (see `Txn._alloc_slot`). A record also names the tag of what its slot must
hold, so a mismatch is caught as a corrupt page, never returned as data.

Filesystems without O_DIRECT (tmpfs) get buffered reads and writes, synced the same way.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
from pathlib import Path

from cache.records import PAGE_SIZE

#: O_DIRECT wants buffers, offsets and lengths aligned to the device's logical blocks
ALIGN = 4096
SLOT_BYTES = PAGE_SIZE + ALIGN
#: Sealed pages at least this long go to the spool; shorter ones (a small file's only
#: page, a file's last one) stay in LMDB, where a write of a few KiB costs one commit.
SPOOL_FROM = 32 * 1024
#: First byte of a `pages` value that is a spool record, not a sealed page (whose first
#: byte is its format version, 1)
SPOOLED = 0xFE
#: The most slots one read or write covers (4.2 MiB)
RUN_SLOTS = 32
_RECORD = struct.Struct(">BQI16s")
RECORD_BYTES = _RECORD.size
TAG_BYTES = 16


def encode_record(slot: int, sealed: bytes | bytearray | memoryview) -> bytes:
    return _RECORD.pack(SPOOLED, slot, len(sealed), bytes(sealed[-TAG_BYTES:]))


def decode_record(value: bytes | memoryview) -> tuple[int, int, bytes] | None:
    """(slot, length, tag) of a spool record; None for a sealed page held inline."""
    if len(value) != RECORD_BYTES or value[0] != SPOOLED:
        return None
    _, slot, length, tag = _RECORD.unpack(value)
    return slot, length, tag


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class SpoolError(OSError):
    """The spool could not be read or written."""


class Spool:
    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        flags = (os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o600)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.fd = os.open(path, flags, 0o600)  # tmpfs: no O_DIRECT
        #: per thread, an aligned buffer runs of slots pass through
        self._buffers = threading.local()

    def _buffer(self, nbytes: int) -> mmap.mmap:
        buf = getattr(self._buffers, "buf", None)
        if buf is None or len(buf) < nbytes:
            # the old one goes when the last view of it does
            buf = self._buffers.buf = mmap.mmap(-1, nbytes)
        return buf

    def write(self, items: list[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Writes sealed pages to their slots, a run of consecutive slots at a time."""
        for run in _runs(sorted(items, key=lambda item: item[0])):
            buf = self._buffer(len(run) * SLOT_BYTES)
            end = 0
            for i, (_, sealed) in enumerate(run):
                if len(sealed) > SLOT_BYTES:
                    raise ValueError(f"a sealed page of {len(sealed)} bytes fits no slot")
                at = i * SLOT_BYTES
                buf[at : at + len(sealed)] = sealed
                end = at + _aligned(len(sealed)) if i == len(run) - 1 else at + SLOT_BYTES
                buf[at + len(sealed) : end] = bytes(end - at - len(sealed))  # no stale bytes
            view = memoryview(buf)
            try:
                written = os.pwrite(self.fd, view[:end], run[0][0] * SLOT_BYTES)
            finally:
                view.release()
            if written != end:  # a regular file takes less only when its disk is full
                raise SpoolError(errno.ENOSPC, f"short write to the page spool ({written}/{end})")

    def read(
        self, items: list[tuple[int, int]], into: mmap.mmap | None = None
    ) -> dict[int, bytearray | memoryview]:
        """The sealed pages in the slots `items` names (slot, length), by slot; a run of
        consecutive slots in one read. With `into` (`spool_span` bytes at least), views
        into it, valid while its owner leaves it be; else copies."""
        out: dict[int, bytearray | memoryview] = {}
        at = 0
        for run in _runs(sorted(set(items))):
            n = (len(run) - 1) * SLOT_BYTES + _aligned(run[-1][1])
            buf = into if into is not None else self._buffer(n)
            view = memoryview(buf)[at : at + n] if into is not None else memoryview(buf)[:n]
            got = os.preadv(self.fd, [view], run[0][0] * SLOT_BYTES)
            for i, (slot, length) in enumerate(run):
                if got < i * SLOT_BYTES + length:
                    raise SpoolError(errno.EIO, f"page spool slot {slot} is short")
                piece = view[i * SLOT_BYTES : i * SLOT_BYTES + length]
                out[slot] = piece if into is not None else bytearray(piece)
            if into is None:
                view.release()
            at += len(run) * SLOT_BYTES
        return out

    def sync(self) -> None:
        """Makes the slots written so far durable (before a record names them)."""
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def spool_span(values: dict) -> int:
    """The bytes a buffer for `Spool.read` of the pages `values` (`pages` values by page
    number) name needs: 0 when they are all in LMDB."""
    named = sum(1 for v in values.values() if v is not None and decode_record(v) is not None)
    return named * SLOT_BYTES


def _runs(items: list) -> list[list]:
    """`items` (sorted by slot, their first field) in runs of consecutive slots, each at
    most RUN_SLOTS long."""
    runs: list[list] = []
    for item in items:
        if runs and item[0] == runs[-1][-1][0] + 1 and len(runs[-1]) < RUN_SLOTS:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs
