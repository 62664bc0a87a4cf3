"""Content-defined chunking (FastCDC) of file contents.

Promises:
- The chunks of a byte string are a function of its content and the size parameters
  only: cutting the whole content at once and streaming it through `Chunker.iter_chunks`
  give the same boundaries.
- Every chunk but the last is between `min_size` and `max_size` bytes; no chunk is larger
  than `MAX_CHUNK_PLAINTEXT`.
- An edit changes only the chunks around it: an insertion near the start of a file
  changes one or two chunks, not all of them.

The cutting runs in pyfastcdc's compiled extension, which releases the GIL, so callers
may cut in a worker thread while trio runs. Importing this module fails with
`ChunkerUnavailable` when that extension is missing: the pure-Python fallback manages a
few MB/s and would silently make every upload crawl.

Exceptions::

    ImportError
     └── ChunkerUnavailable   (at import: no compiled pyfastcdc)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import BinaryIO

from loft.protocol import MAX_CHUNK_PLAINTEXT

log = logging.getLogger(__name__)


class ChunkerUnavailable(ImportError):
    """pyfastcdc's compiled extension cannot be imported."""


try:
    # Import the extension itself: the package silently falls back to pure Python.
    from pyfastcdc.cy import FastCDC
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ChunkerUnavailable(
        "pyfastcdc's compiled extension (pyfastcdc.cy) cannot be imported; reinstall "
        "pyfastcdc from a wheel for this platform or with a C compiler available"
    ) from exc

# Sizes chosen with scripts/bench_codec.py (2 vCPU Xeon, pyfastcdc 0.3.1, max 4 MiB): six
# files of 64 MiB random data; "changed" = chunk ids after the edit that were not there
# before (means; the maximum over the six files was 1 in every cell). FastCDC's mean chunk
# comes out near avg + min.
#
#   min / avg     mean chunk   8-byte insert @100    1-byte overwrite ~mid   CDC MB/s
#   64K / 256K     0.30 MiB    1 chunk, 0.37 MiB     1 chunk, 0.33 MiB         3,980
#   128K / 512K    0.60 MiB    1 chunk, 0.86 MiB     1 chunk, 0.51 MiB         4,070
#   256K / 1M      1.23 MiB    1 chunk, 1.33 MiB     1 chunk, 1.66 MiB         4,060
#   512K / 1M      1.33 MiB    1 chunk, 1.38 MiB     1 chunk, 1.51 MiB         5,250
#   256K / 2M      2.17 MiB    1 chunk, 2.38 MiB     1 chunk, 2.73 MiB         3,690  <-
#
# Every choice keeps an edit local and cuts at ~4 GB/s, ~8x faster than the codec behind
# it, so the choice is chunk count against bytes re-sent per edit. 256 KiB / 2 MiB keeps
# a 1 GiB file near 470 chunks and re-sends ~2.5 MiB per small edit. Each chunk is one
# request both ways, and on 2 cores both the mount and the server spend much of their
# time per request (~1,000 small requests/s per server process). Against 256 KiB / 1 MiB
# (~830 chunks; the read-ahead kept its bytes), alternated on fresh clusters, a cold
# 1 GiB read took 2.96-4.24 s against 3.79-5.86 s, with less CPU on both sides (mount
# 2.1-3.0 against 2.7-4.0 s, server 1.5-2.2 against 2.2-2.9 s), and the mount spent
# 7.3-9.0 against 7.1-11.1 CPU-s storing a 1 GiB file. The extra ~1 MiB per small edit
# stays within the "about one chunk" a small edit may send.
MIN_SIZE = 256 * 1024
AVG_SIZE = 2 * 1024 * 1024
MAX_SIZE = MAX_CHUNK_PLAINTEXT

#: How much `iter_chunks` reads at a time.
READ_SIZE = 16 * 1024 * 1024


class Chunker:
    """Cuts byte strings and files into content-defined chunks.

    One instance may be shared by threads: it holds only its parameters, and each call
    keeps its own cursor.
    """

    def __init__(
        self, min_size: int = MIN_SIZE, avg_size: int = AVG_SIZE, max_size: int = MAX_SIZE
    ) -> None:
        if not 0 < min_size <= avg_size <= max_size <= MAX_CHUNK_PLAINTEXT:
            raise ValueError(
                f"need 0 < min_size <= avg_size <= max_size <= {MAX_CHUNK_PLAINTEXT}, got "
                f"{min_size} / {avg_size} / {max_size}"
            )
        self.min_size = min_size
        self.avg_size = avg_size
        self.max_size = max_size
        self._cdc = FastCDC(avg_size, min_size=min_size, max_size=max_size)

    def cut(self, data: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
        """Returns the (offset, length) of each chunk of `data`, in order, covering it
        exactly. Empty data has no chunks."""
        return [(c.offset, c.length) for c in self._cdc.cut_buf(data)]

    def chunks(self, data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
        """Yields views of the chunks of `data` as they are cut (the boundaries of
        `cut`), so a consumer can start on the first chunk before the last is found."""
        for c in self._cdc.cut_buf(data):
            yield c.data

    def iter_chunks(self, f: BinaryIO, read_size: int = READ_SIZE) -> Iterator[memoryview]:
        """Yields the chunks of the rest of `f`, reading it `read_size` bytes at a time.

        The boundaries are those `cut` gives for the whole content. Each yielded view
        stays valid after the generator moves on (every read fills a fresh buffer), so
        callers may hand chunks to worker threads; a view keeps its buffer (up to
        `read_size + max_size` bytes) alive until it is released.
        """
        if read_size < self.max_size:
            raise ValueError(f"read_size must be at least max_size ({self.max_size})")
        carry: memoryview = memoryview(b"")
        eof = False
        while not eof:
            buf = bytearray(len(carry) + read_size)
            buf[: len(carry)] = carry
            filled = len(carry)
            carry.release()
            view = memoryview(buf)
            while filled < len(buf):
                n = f.readinto(view[filled:])
                if not n:
                    eof = True
                    break
                filled += n
            data = view[:filled]
            rest = 0
            for chunk in self._cdc.cut_buf(data):
                # A cut depends on at most max_size bytes from the chunk's start, so it is
                # final once that much is buffered, or when the file has ended.
                if not eof and chunk.offset + self.max_size > filled:
                    rest = chunk.offset
                    break
                yield chunk.data
            else:
                rest = filled
            carry = data[rest:]
        carry.release()
