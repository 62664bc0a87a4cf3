"""Content-defined chunking: coverage, streaming equals whole-buffer cutting, and edits
change only the chunks around them."""

from __future__ import annotations

import io
import itertools
import random

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.chunker import Chunker
from loft.protocol import MAX_CHUNK_PLAINTEXT

MiB = 1024 * 1024


def _random(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _chunk_ids(chunker: Chunker, data: bytes) -> set[bytes]:
    view = memoryview(data)
    return {blake3.blake3(view[o : o + n]).digest() for o, n in chunker.cut(data)}


class _ShortReads(io.RawIOBase):
    """A reader whose readinto returns at most `step` bytes, like a pipe or FUSE."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = data
        self._pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        n = min(len(b), self._step, len(self._data) - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


def test_chunker_uses_compiled_fastcdc() -> None:
    assert type(Chunker()._cdc).__module__ == "pyfastcdc.cy.fastcdc"


def test_chunker_cut_covers_data_within_size_bounds() -> None:
    chunker = Chunker()
    data = _random(24 * MiB, 1)
    cuts = chunker.cut(data)
    assert cuts[0][0] == 0
    for (o1, n1), (o2, _) in itertools.pairwise(cuts):
        assert o1 + n1 == o2
    assert sum(n for _, n in cuts) == len(data)
    for _, n in cuts[:-1]:
        assert chunker.min_size <= n <= chunker.max_size <= MAX_CHUNK_PLAINTEXT
    assert len(cuts) > 5  # content-defined, not one max-size chunk after another


def test_chunker_empty_data_has_no_chunks() -> None:
    chunker = Chunker()
    assert chunker.cut(b"") == []
    assert list(chunker.iter_chunks(io.BytesIO(b""))) == []


def test_chunker_rejects_sizes_out_of_order_or_over_limit() -> None:
    with pytest.raises(ValueError):
        Chunker(max_size=MAX_CHUNK_PLAINTEXT + 1)
    with pytest.raises(ValueError):
        Chunker(min_size=2 * MiB, avg_size=1 * MiB)


def test_chunker_insertion_near_start_changes_at_most_two_chunks() -> None:
    chunker = Chunker()
    data = _random(32 * MiB, 2)
    edited = data[:100] + b"\x01\x02\x03\x04\x05\x06\x07\x08" + data[100:]
    before, after = _chunk_ids(chunker, data), _chunk_ids(chunker, edited)
    assert len(after - before) <= 2
    assert len(before) > 10


def test_chunker_overwrite_in_middle_changes_at_most_two_chunks() -> None:
    # One new chunk when the byte is inside a chunk; two when it creates a cut point (or
    # merges two chunks into one new one): CDC resynchronises at the next boundary.
    chunker = Chunker()
    data = _random(32 * MiB, 3)
    mid = len(data) // 2
    edited = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
    assert len(_chunk_ids(chunker, edited) - _chunk_ids(chunker, data)) <= 2


def test_chunker_identical_content_in_two_files_gives_shared_chunks() -> None:
    chunker = Chunker()
    common = _random(16 * MiB, 4)
    a = _random(3 * MiB, 5) + common
    b = _random(1 * MiB, 6) + common
    shared = _chunk_ids(chunker, a) & _chunk_ids(chunker, b)
    assert len(shared) >= len(_chunk_ids(chunker, common)) - 2


@pytest.mark.parametrize("read_size", [4 * MiB, 4 * MiB + 1, 9 * MiB, 16 * MiB])
def test_chunker_iter_chunks_matches_whole_buffer_cut(read_size: int) -> None:
    chunker = Chunker()
    data = _random(21 * MiB + 12345, 7)
    views = list(chunker.iter_chunks(io.BytesIO(data), read_size=read_size))
    # Views stay valid after the generator moved on (they are all held here).
    assert [bytes(v) for v in views] == [data[o : o + n] for o, n in chunker.cut(data)]


def test_chunker_iter_chunks_handles_short_reads() -> None:
    chunker = Chunker()
    data = _random(10 * MiB + 3, 8)
    chunks = [bytes(v) for v in chunker.iter_chunks(_ShortReads(data, 300_001))]  # type: ignore[arg-type]
    assert chunks == [data[o : o + n] for o, n in chunker.cut(data)]


def test_chunker_iter_chunks_rejects_read_size_below_max() -> None:
    with pytest.raises(ValueError):
        list(Chunker().iter_chunks(io.BytesIO(b"x"), read_size=MiB))


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=20_000),
    read_size=st.integers(min_value=1024, max_value=6000),
    step=st.integers(min_value=1, max_value=7000),
)
def test_chunker_streaming_boundaries_equal_whole_cut(
    data: bytes, read_size: int, step: int
) -> None:
    chunker = Chunker(min_size=64, avg_size=256, max_size=1024)
    streamed = [bytes(v) for v in chunker.iter_chunks(_ShortReads(data, step), read_size)]  # type: ignore[arg-type]
    assert streamed == [data[o : o + n] for o, n in chunker.cut(data)]
    assert b"".join(streamed) == data
