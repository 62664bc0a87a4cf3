"""A replica in its own process, for tests that kill it or measure its memory.

python -m tests.replica.worker flood HOME COUNT SIZE
    creates COUNT files of SIZE bytes (content from `flood_content`), journals them,
    prints "journaled", then syncs and prints "synced"
python -m tests.replica.worker closed HOME COUNT SIZE
    creates COUNT files, syncs, writes them as flood does, closes them all
    (close_written) and kills itself with SIGKILL before anything could journal those closes
python -m tests.replica.worker roundtrip HOME_A HOME_B SRC DST CACHE_BYTES
    imports SRC through device A, syncs, exports it through device B (empty cache)
    to DST, and prints the peak RSS in bytes
"""

from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path

import trio

from cache.session import Session
from loft.protocol import ROOT_NODE


def flood_content(index: int, size: int) -> bytes:
    return random.Random(index).randbytes(size)


async def flood(home: Path, count: int, size: int) -> None:
    async with Session.open(home) as session:
        r = session.replica
        folder = r.mkdir(r.home, ROOT_NODE, "flood")
        for i in range(count):
            node = r.create(r.home, folder.id, f"f{i:05}")
            await r.write(r.home, node.id, 0, flood_content(i, size))
            r.flush(r.home, node.id)
        print("journaled", flush=True)
        await session.sync()
        print("synced", flush=True)


async def closed(home: Path, count: int, size: int) -> None:
    async with Session.open(home) as session:
        r = session.replica
        folder = r.mkdir(r.home, ROOT_NODE, "closed")
        nodes = [r.create(r.home, folder.id, f"f{i:05}") for i in range(count)]
        await session.sync()  # the creates are on the server: content needs its own op
        for i, node in enumerate(nodes):
            await r.write(r.home, node.id, 0, flood_content(i, size))
        for node in nodes:  # no await from here on: the journaler cannot run
            r.close_written(r.home, node.id)
        os.kill(os.getpid(), signal.SIGKILL)


async def roundtrip(home_a: Path, home_b: Path, src: Path, dst: Path, cache: int) -> None:
    async with Session.open(home_a, cache_size=cache) as a:
        await a.import_file(src, ROOT_NODE, src.name)
        await a.sync()
    async with Session.open(home_b, cache_size=cache) as b:
        await b.sync()
        node = b.replica.resolve(src.name)
        await b.export_file(node.id, dst)
    print(peak_rss(), flush=True)


def peak_rss() -> int:
    """This process's peak resident set in bytes (VmHWM). Not ru_maxrss: Linux carries
    the forking parent's high-water mark across exec into it."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return int(status["VmHWM"].split()[0]) * 1024


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "flood":
        trio.run(flood, Path(args[0]), int(args[1]), int(args[2]))
    elif command == "closed":
        trio.run(closed, Path(args[0]), int(args[1]), int(args[2]))
    elif command == "roundtrip":
        trio.run(
            roundtrip, Path(args[0]), Path(args[1]), Path(args[2]), Path(args[3]), int(args[4])
        )
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv[1:])
