"""Client replica benchmark: end-to-end upload and download of a large file through a
real `loft serve` on 127.0.0.1, two devices of one account.

Measures (MB = 10^6 bytes):
- upload, import: a local file chunked, sealed and uploaded as it is read, then synced;
- upload, writes: the same bytes written through the replica (sealed dirty pages),
  flushed and synced, as the mount does;
- download: a second device with an empty cache reads the whole file in 8 MiB reads.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cache.session import Session, login, signup  # noqa: E402
from loft.protocol import ROOT_NODE  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402

TARGETS = {"upload, import": 250, "upload, writes": 250, "download": 300}


def make_file(path: Path, size: int) -> None:
    rng = random.Random(1)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(rng.randbytes(n))
            left -= n


async def run(tmp: Path, size: int) -> dict[str, float]:
    os.environ["LOFT_TEST_FAST_KDF"] = "1"
    server = ServerProcess(tmp / "server").start()
    results: dict[str, float] = {}
    try:
        await signup(tmp / "a", server.url, "bench", "pw", "a")
        await login(tmp / "b", server.url, "bench", "pw", "b")
        src = tmp / "src.bin"
        make_file(src, size)
        async with Session.open(tmp / "a", cache_size=256 << 20) as a:
            started = time.perf_counter()
            await a.import_file(src, ROOT_NODE, "imported.bin")
            await a.sync()
            results["upload, import"] = size / (time.perf_counter() - started) / 1e6
            r = a.replica
            started = time.perf_counter()
            node = r.create(r.home, ROOT_NODE, "written.bin")
            with open(src, "rb") as f:
                pos = 0
                while block := f.read(1 << 20):
                    await r.write(r.home, node.id, pos, block)
                    pos += len(block)
            r.flush(r.home, node.id)
            await a.sync()
            results["upload, writes"] = size / (time.perf_counter() - started) / 1e6
        async with Session.open(tmp / "b", cache_size=256 << 20) as b:
            await b.sync()
            node = b.replica.resolve("imported.bin")
            started = time.perf_counter()
            pos = 0
            while pos < size:
                data = await b.replica.read(b.replica.home, node.id, pos, 8 << 20)
                pos += len(data)
            results["download"] = size / (time.perf_counter() - started) / 1e6
    finally:
        server.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB")
    args = parser.parse_args(argv)
    size = (256 if args.quick else 1024) << 20
    with tempfile.TemporaryDirectory(prefix="loft-bench-") as tmp:
        results = trio.run(run, Path(tmp), size)
    print(f"\nclient replica, {size >> 20} MiB file, local server (MB/s)")
    print(f"{'workload':<18}{'MB/s':>8}{'target':>9}")
    for name, value in results.items():
        target = TARGETS[name]
        verdict = "PASS" if value >= target else "MISS"
        print(f"{name:<18}{value:>8.0f}{'>= ' + str(target):>9}  {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
