"""Benchmark of the chunk pipeline: CDC, chunk ids, zstd and AES-GCM (cache.chunker and
cache.codec), and the comparison of chunk size parameters behind cache.chunker's choice.

Prints two tables:
- seal (CDC + id + compress + encrypt) and open (decrypt + decompress + verify) in MB/s
  of plaintext, on one thread and on a two-thread pool over chunks, per zstd level, on
  "realistic" data: alternating runs of random bytes and Python source, half each;
- per min/avg chunk size: mean chunk size, chunks and MiB changed by an 8-byte insertion
  near the start and by a 1-byte overwrite in the middle (means over several random
  files and edit positions), and CDC throughput.

Usage: python scripts/bench_codec.py [--quick] [--levels -1,1,3]
MB/s are 10^6 bytes per second; each figure is the best of `--repeat` runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3

from cache.chunker import AVG_SIZE, MIN_SIZE, Chunker
from cache.codec import LEVEL, ChunkCodec

log = logging.getLogger(__name__)

MiB = 1024 * 1024
PARAMS: Sequence[tuple[int, int]] = (
    (64 * 1024, 256 * 1024),
    (128 * 1024, 512 * 1024),
    (256 * 1024, 1 * MiB),
    (512 * 1024, 1 * MiB),
    (256 * 1024, 2 * MiB),
    (512 * 1024, 2 * MiB),
)


def _source_corpus(limit: int) -> bytes:
    """Up to `limit` bytes of the standard library's Python source."""
    parts: list[bytes] = []
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        parts.append(data)
        total += len(data)
        if total >= limit:
            break
    return b"".join(parts)[:limit]


def mixed_data(size: int, seed: int = 1) -> bytes:
    """`size` bytes alternating random runs and source-code runs of 64 KiB to 2 MiB."""
    rng = random.Random(seed)
    corpus = _source_corpus(min(size // 2, 96 * MiB))
    out = bytearray()
    pos = 0
    text_turn = False
    while len(out) < size:
        n = min(rng.randint(64 * 1024, 2 * MiB), size - len(out))
        if text_turn:
            if pos + n > len(corpus):
                pos = rng.randrange(0, max(1, len(corpus) - n))
            out += corpus[pos : pos + n]
            pos += n
        else:
            out += rng.randbytes(n)
        text_turn = not text_turn
    return bytes(out)


def _best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def codec_table(data: bytes, levels: Sequence[int], repeat: int) -> None:
    chunker = Chunker()
    key = os.urandom(32)
    mb = len(data) / 1e6
    views = [memoryview(data)[o : o + n] for o, n in chunker.cut(data)]
    cdc = _best(lambda: chunker.cut(data), repeat)
    print(
        f"\ncodec: {len(data) / MiB:.0f} MiB half random / half source, "
        f"{len(views)} chunks (mean {len(data) / len(views) / MiB:.2f} MiB); "
        f"CDC alone {mb / cdc:,.0f} MB/s"
    )
    print(
        f"{'level':>5} {'stored/plain':>12} {'seal 1T':>9} {'seal 2T':>9} "
        f"{'open 1T':>9} {'open 2T':>9}"
    )
    with ThreadPoolExecutor(2) as pool:
        for level in levels:
            codec = ChunkCodec(key, os.urandom(32), level=level)

            def seal_1t(codec: ChunkCodec = codec) -> list[tuple[str, bytes]]:
                return [codec.seal(c) for c in chunker.chunks(data)]

            def seal_2t(codec: ChunkCodec = codec) -> list[tuple[str, bytes]]:
                # CDC runs on this thread while the pool seals the chunks cut so far.
                return list(pool.map(codec.seal, chunker.chunks(data)))

            sealed = seal_2t()
            ids = [s[0] for s in sealed]
            blobs = [s[1] for s in sealed]
            stored = sum(len(b) for b in blobs) / len(data)

            def open_1t(
                codec: ChunkCodec = codec, ids: list[str] = ids, blobs: list[bytes] = blobs
            ) -> None:
                for i, b in zip(ids, blobs, strict=True):
                    codec.open(i, b)

            def open_2t(
                codec: ChunkCodec = codec, ids: list[str] = ids, blobs: list[bytes] = blobs
            ) -> None:
                for _ in pool.map(codec.open, ids, blobs):
                    pass

            s1 = _best(seal_1t, repeat)
            s2 = _best(seal_2t, repeat)
            o1 = _best(open_1t, repeat)
            o2 = _best(open_2t, repeat)
            mark = " *" if level == LEVEL else ""
            print(
                f"{level:>5} {stored:>12.3f} {mb / s1:>9,.0f} {mb / s2:>9,.0f} "
                f"{mb / o1:>9,.0f} {mb / o2:>9,.0f}{mark}"
            )
    print("(MB/s of plaintext; seal = CDC + id + compress + encrypt; * = cache.codec.LEVEL)")


def _ids(chunker: Chunker, data: bytes) -> dict[bytes, int]:
    view = memoryview(data)
    return {blake3.blake3(view[o : o + n]).digest(): n for o, n in chunker.cut(data)}


def params_table(size: int, trials: int, repeat: int) -> None:
    rng = random.Random(2)
    files = [rng.randbytes(size) for _ in range(trials)]
    print(
        f"\nchunk sizes: {size / MiB:.0f} MiB random data, {trials} files; changed = chunk ids "
        "not present before the edit (mean over files)"
    )
    print(
        f"{'min / avg':>11} {'mean chunk':>11} {'8-byte insert @100':>21} "
        f"{'1-byte overwrite @mid':>22} {'CDC MB/s':>9}"
    )
    for min_size, avg_size in PARAMS:
        chunker = Chunker(min_size, avg_size)
        ins_n, ins_b, ow_n, ow_b, counts = [], [], [], [], []
        for data in files:
            before = _ids(chunker, data)
            counts.append(len(before))
            inserted = data[:100] + rng.randbytes(8) + data[100:]
            pos = size // 2 + rng.randrange(-MiB, MiB)
            over = data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :]
            for edited, nums, sizes in ((inserted, ins_n, ins_b), (over, ow_n, ow_b)):
                new = [n for k, n in _ids(chunker, edited).items() if k not in before]
                nums.append(len(new))
                sizes.append(sum(new) / MiB)
        cdc = _best(lambda c=chunker: c.cut(files[0]), repeat)
        mean_chunk = size / statistics.mean(counts) / MiB
        mark = " *" if (min_size, avg_size) == (MIN_SIZE, AVG_SIZE) else ""
        label = f"{min_size // 1024}K / {avg_size // 1024}K"
        print(
            f"{label:>11} {mean_chunk:>7.2f} MiB "
            f"{statistics.mean(ins_n):>6.1f} ch, {statistics.mean(ins_b):>5.2f} MiB "
            f"(max {max(ins_n)}) "
            f"{statistics.mean(ow_n):>4.1f} ch, {statistics.mean(ow_b):>5.2f} MiB "
            f"(max {max(ow_n)}) {size / 1e6 / cdc:>8,.0f}{mark}"
        )
    print("(* = cache.chunker's MIN_SIZE / AVG_SIZE; max chunk 4 MiB throughout)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB instead of 256 MiB")
    parser.add_argument("--levels", default="-1,1,3", help="zstd levels to compare")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (best kept)")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    size = (64 if args.quick else 256) * MiB
    started = time.perf_counter()
    codec_table(mixed_data(size), levels, args.repeat)
    params_table(64 * MiB, 3 if args.quick else 6, args.repeat)
    print(f"\n({time.perf_counter() - started:.1f} s, {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
