"""The changed-range re-chunker against a full content-defined pass."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import pytest

from cache.chunker import Chunker
from cache.content import Layout, changed_ranges, rechunk
from cache.records import NO_FLOOR, PAGE_SIZE, Kind, Node

CHUNKER = Chunker()


@dataclass
class BytesReader:
    data: bytes
    node: Node

    def read_into(self, out: memoryview, offset: int) -> None:
        out[:] = self.data[offset : offset + len(out)]


def ids(data: bytes) -> list[tuple[str, int]]:
    return [(hashlib.sha256(data[o : o + n]).hexdigest(), n) for o, n in CHUNKER.cut(data)]


def run(old: bytes, new: bytes, dirty_pages: list[int], floor: int = NO_FLOOR):
    layout = Layout.of(ids(old))
    node = Node(
        "00000000-0000-0000-0000-000000000001",
        "00000000-0000-0000-0000-000000000002",
        Kind.FILE,
        size=len(new),
        floor=floor,
    )
    emitted: list[bytes] = []

    def emit(piece: bytes) -> str:
        emitted.append(bytes(piece))
        return hashlib.sha256(piece).hexdigest()

    ranges = changed_ranges(node, layout, dirty_pages)
    manifest = rechunk(BytesReader(new, node), layout, CHUNKER, len(new), ranges, emit)
    return manifest, emitted


def pages_of(lo: int, hi: int) -> list[int]:
    return list(range(lo // PAGE_SIZE, (hi - 1) // PAGE_SIZE + 1))


@pytest.fixture(scope="module")
def base() -> bytes:
    return random.Random(7).randbytes(24 * 1024 * 1024)


def test_rechunk_one_byte_overwrite_emits_one_chunk(base: bytes):
    at = len(base) // 2
    new = base[:at] + bytes([base[at] ^ 0xFF]) + base[at + 1 :]
    manifest, emitted = run(base, new, pages_of(at, at + 1))
    assert manifest == ids(new)
    assert len(emitted) <= 2 and len(emitted) == sum(1 for c in manifest if c not in ids(base))


def test_rechunk_append_and_overwrite_match_full_pass(base: bytes):
    rng = random.Random(1)
    new = bytearray(base) + rng.randbytes(3_000_000)
    for at in (10, 5_000_000, 17_000_000):
        new[at : at + 100] = rng.randbytes(100)
    dirty = sorted(
        set(pages_of(10, 110) + pages_of(5_000_000, 5_000_100) + pages_of(17_000_000, 17_000_100))
    )
    manifest, emitted = run(base, bytes(new), dirty)
    assert manifest == ids(bytes(new))
    assert len(emitted) <= 8  # three edited chunks, the old last one and the appended ones


def test_rechunk_truncate_then_extend_reads_zeros(base: bytes):
    cut = 10_000_123
    new = base[:cut] + bytes(2_000_000)
    manifest, _ = run(base, new, [], floor=cut)
    assert manifest == ids(new)


def test_rechunk_new_file_is_a_full_pass(base: bytes):
    manifest, emitted = run(b"", base[:5_000_000], pages_of(0, 5_000_000))
    assert manifest == ids(base[:5_000_000]) and len(emitted) == len(manifest)


def test_rechunk_unchanged_file_emits_nothing(base: bytes):
    manifest, emitted = run(base, base, [])
    assert manifest == ids(base) and emitted == []


@pytest.mark.parametrize("seed", range(6))
def test_rechunk_random_edits_match_full_pass(base: bytes, seed: int):
    rng = random.Random(seed)
    old = base[: rng.randrange(1, len(base))]
    new = bytearray(old)
    dirty: set[int] = set()
    for _ in range(rng.randrange(1, 6)):
        at = rng.randrange(0, len(new) + 1000)
        n = rng.randrange(1, 400_000)
        if at > len(new):
            new += bytes(at - len(new))
            dirty.update(pages_of(len(old), at + 1) if at > len(old) else [])
        new[at : at + n] = rng.randbytes(n)
        dirty.update(pages_of(at, at + n))
    floor = NO_FLOOR
    if rng.random() < 0.3:
        floor = rng.randrange(0, len(old))
        new[floor : len(old)] = bytes(len(old) - floor)
        dirty = {p for p in dirty}
    manifest, _ = run(old, bytes(new), sorted(dirty), floor=floor)
    assert manifest == ids(bytes(new))
