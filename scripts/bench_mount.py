"""Benchmark of the mount: Loft side by side with rclone mount and the native disk, in one run.

Three sides do the same work, one after the other, on this machine:
- native: a temporary folder on the local disk (ext4);
- rclone: `rclone serve webdav` of a local folder on 127.0.0.1, mounted as device A and
  device B with `rclone mount --vfs-cache-mode full --vfs-write-back 0s`, each with its
  own cache folder (the remote is defined by environment variables and an empty config);
- Loft: `loft serve`, one account, device A and device B mounted from separate LOFT_HOMEs.

Workloads (device A writes, device B reads):
- a big random file written with 1 MiB writes, until every byte is on the server;
- its cold sequential read on device B (empty cache), the re-read from the local cache
  with the page cache dropped (each side's median of three rounds, the sides in turn),
  the re-read with the page cache, fio random 4 KiB reads;
- many 4 KiB new files until all are stored; `ls -l` of them on B (first and cached) and a
  stat of every name;
- a 1-byte overwrite and an 8-byte insertion at the start of the big file: bytes the
  server received, next to rclone's and rsync's "Literal data" for the same edit;
- change-to-visible latency A -> B over small edits;
- with --full, a 10 GiB file through Loft with its RSS and the size of its client store;
- last, untar of the Python standard library until stored (with a time cap: a side that
  has not finished by then is reported with its rate so far).

Every ratio is rclone's cost divided by Loft's for the same work (wall time, or bytes
sent for edits): above 1, Loft is better. Figures in MB are 10^6 bytes.

Usage: python scripts/bench_mount.py [--quick | --full] [--charts DIR] [--json FILE]
Runs as root (it mounts and drops the page cache); everything lives in a temporary
folder that is removed at the end, after every mount and process is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import math
import os
import re
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from probes import Target, machine_cpu, percentile, process_cpu, warn_if_busy

MiB = 1 << 20
GiB = 1 << 30
LOFT = [sys.executable, "-m", "loft"]
PASSWORD = "bench password"
BIG = "big.bin"
INSERTION = b"INSERTED"
#: Upper bound on any single wait; a side that takes longer has failed.
WAIT_SECONDS = 1200.0
RSS_TARGET = 300e6
#: The warm re-read is taken as each side's median over this many rounds, the sides in
#: turn: on this shared machine one read of rclone's ranged 2.3-4.6 s between runs.
WARM_ROUNDS = 3


class BenchError(Exception):
    """A side could not do a workload; the message says why."""


class Unfinished(BenchError):
    """A side had stored only `done` of the files when its time ran out."""

    def __init__(self, done: int, message: str) -> None:
        super().__init__(message)
        self.done = done


# ------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    file_bytes: int
    small_files: int
    #: at most this many files of the standard library (0: all of them)
    tree_files: int
    #: how long each side may take to store the tree
    tree_seconds: float
    latency_edits: int
    fio_seconds: int
    #: 0: rclone's latency is not measured, only its configuration reported
    rclone_latency_timeout: float
    huge_bytes: int
    cache_size: str

    @classmethod
    def of(cls, args: argparse.Namespace) -> Settings:
        if args.quick:
            return cls(256 * MiB, 500, 200, 20.0, 20, 2, 0.0, GiB, args.cache_size)
        return cls(GiB, 10_000, 0, 150.0, 100, 8, 20.0, 10 * GiB, args.cache_size)


# ------------------------------------------------------------------------- results


@dataclass
class Row:
    name: str
    native: str = "-"
    rclone: str = "-"
    loft: str = "-"
    #: rclone's cost ÷ Loft's (time or bytes): above 1, Loft is better
    ratio: float | None = None
    target: Target | None = None
    #: what the target judges when it is not the ratio
    value: float | None = None
    #: MB/s of each side, for the throughput chart
    rates: dict[str, float] = field(default_factory=dict)

    @property
    def judged(self) -> float | None:
        return self.value if self.value is not None else self.ratio

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "-"
        if self.judged is None or math.isnan(self.judged):
            return "n/a"
        return "PASS" if self.target.met(self.judged) else "MISS"

    def ratio_text(self) -> str:
        if self.ratio is None or math.isnan(self.ratio):
            return "-"
        return f"{self.ratio:,.0f}x" if self.ratio >= 100 else f"{self.ratio:.2f}x"

    def cells(self) -> tuple[str, ...]:
        target = self.target.text if self.target else "-"
        return (
            self.name, self.native, self.rclone, self.loft, self.ratio_text(), target,
            self.verdict,
        )  # fmt: skip


HEADERS = ("workload", "native", "rclone", "Loft", "rclone/Loft", "target", "result")


def _detail(text: str) -> None:
    print(f"  {text}", flush=True)


def _secs(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:,.1f} kB"


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:,.0f} MB/s ({_secs(seconds)})"




def _size_label(size: int) -> str:
    return f"{size / GiB:g} GiB" if size >= GiB else f"{size // MiB} MiB"


# ------------------------------------------------------------------------- /proc probes






def _vm(pid: int, key: str) -> int:
    """A figure of /proc/PID/status in bytes (VmHWM, VmRSS, RssAnon...); 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss(pid: int) -> None:
    """Makes VmHWM start again from the current RSS (Linux >= 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _disk_usage(folder: Path) -> int:
    """Bytes allocated on disk under `folder` (like du)."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _apparent_size(folder: Path) -> tuple[int, int]:
    """(files, bytes) of the regular files under `folder`."""
    files = size = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(dirpath, name)).st_size
                files += 1
    return files, size


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].replace("\\040", " ") for line in f]


def _mounted(path: Path) -> bool:
    """Whether `path` is a mount point (also when its FUSE daemon has died)."""
    return str(path) in _mount_points()


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(folder: Path) -> None:
    """Flushes the file system holding `folder` to its disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


class Peak(threading.Thread):
    """Samples a process's anonymous memory (RssAnon) and, optionally, a folder's disk
    usage, keeping the maxima. VmHWM gives the peak of the whole RSS, which also counts
    file pages mapped into the process (LMDB's map)."""

    def __init__(self, pid: int, folder: Path | None = None, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.folder, self.every = pid, folder, every
        self.anon = self.disk = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        self.anon = max(self.anon, _vm(self.pid, "RssAnon"))
        if self.folder is not None:
            self.disk = max(self.disk, _disk_usage(self.folder))

    def run(self) -> None:
        while not self._stop_event.wait(self.every):
            self.sample()

    def __enter__(self) -> Peak:
        _reset_peak_rss(self.pid)
        self.sample()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_event.set()
        self.join()
        self.sample()
        self.hwm = _vm(self.pid, "VmHWM")

    def text(self) -> str:
        return f"{_mb(self.hwm)} (anon {_mb(self.anon)})"


class TcpReceived(threading.Thread):
    """Bytes a server received on its established TCP connections to `port` while
    running: tcp_info bytes_received (via `ss`) sampled every 50 ms; a connection that
    closes keeps its last sample (one that lives less than 50 ms is missed).

    The samples come from one shell loop started on entry, before the measured edit
    opens its file: a process spawned while the edit holds the file would close its
    inherited copy of the descriptor at exec, which FUSE reports to the mount as a
    flush of the file (a close), every 50 ms."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self._command = ["ss", "-tinH", "state", "established", f"( sport = :{port} )"]
        self._loop: subprocess.Popen[str] | None = None
        self._base: dict[str, int] = {}
        self._last: dict[str, int] = {}

    @staticmethod
    def _parse(out: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        peer = None
        for line in out.splitlines():
            if line and not line[0].isspace():
                peer = line.split()[-1]
                counts[peer] = 0
            elif peer is not None and (m := re.search(r"bytes_received:(\d+)", line)):
                counts[peer] = int(m.group(1))
        return counts

    def _sample(self) -> dict[str, int]:
        return self._parse(
            subprocess.run(self._command, capture_output=True, text=True, check=True).stdout
        )

    def run(self) -> None:
        assert self._loop is not None and self._loop.stdout is not None
        sample: list[str] = []
        for line in self._loop.stdout:
            if line.rstrip("\n") == "--":
                self._last.update(self._parse("".join(sample)))
                sample = []
            else:
                sample.append(line)

    def __enter__(self) -> TcpReceived:
        self._base = self._sample()
        self._last = dict(self._base)
        script = f"while :; do {shlex.join(self._command)}; echo --; sleep 0.05; done"
        self._loop = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, text=True)
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        self._loop.terminate()
        self._loop.wait()
        self.join()
        self._last.update(self._sample())

    @property
    def received(self) -> int:
        return sum(n - self._base.get(peer, 0) for peer, n in self._last.items())


# ------------------------------------------------------------------------- data


def random_stream(total: int, seed: int, block: int = MiB) -> Iterator[memoryview]:
    """`total` pseudo-random bytes in `block`-sized views of one reused buffer (AES-CTR
    keystream: ~2.8 GB/s, incompressible, and different for every seed)."""
    key = seed.to_bytes(32, "big")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    zeros = bytes(block)
    buf = bytearray(block + 15)
    view = memoryview(buf)
    while total > 0:
        n = min(block, total)
        encryptor.update_into(zeros[:n], buf)
        yield view[:n]
        total -= n


def read_blocks(path: Path, block: int = MiB) -> Iterator[memoryview]:
    """`path` in views of one reused buffer: use each before asking for the next."""
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            yield view[:n]


def write_stream(path: Path, chunks: Iterable[memoryview | bytes], fsync: bool = False) -> int:
    written = 0
    with open(path, "wb", buffering=0) as f:
        for chunk in chunks:
            written += f.write(chunk)
        if fsync:
            os.fsync(f.fileno())
    return written


def read_all(path: Path) -> int:
    """Reads `path` sequentially in 1 MiB reads; returns the bytes read."""
    return sum(len(b) for b in read_blocks(path))


def same_content(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(4 * MiB), fb.read(4 * MiB)
            if x != y:
                return False
            if not x:
                return True


def stdlib_files(limit: int) -> tuple[Path, list[str], dict[str, int]]:
    """The regular files of this interpreter's standard library (no site-packages,
    bytecode or build config), sorted; the first `limit` of them if `limit`."""
    base = Path(sysconfig.get_paths()["stdlib"])
    names: list[str] = []
    for dirpath, dirnames, filenames in os.walk(base):
        rel = os.path.relpath(dirpath, base)
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in ("site-packages", "__pycache__") and not d.startswith("config-")
        )  # fmt: skip
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.endswith(".pyc") or os.path.islink(path) or not os.path.isfile(path):
                continue
            names.append(os.path.normpath(os.path.join(rel, name)))
    names = names[:limit] if limit else names
    return base, names, {n: os.path.getsize(base / n) for n in names}


# ------------------------------------------------------------------------- processes


def _unmount(path: Path) -> None:
    """fusermount3 -u, retried while the mount is busy; -uz as the last resort."""
    for _ in range(40):
        if not _mounted(path):
            return
        if subprocess.run(["fusermount3", "-u", str(path)], capture_output=True).returncode == 0:
            return
        time.sleep(0.25)
    subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _stop_pid(pid: int, timeout: float) -> None:
    """Waits for a process that is not our child to exit; SIGTERM, then SIGKILL."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)


def _wait_for(check: Callable[[], bool], timeout: float, what: str, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def _start(
    cmd: list[str], log: Path, env: dict[str, str] | None = None, pipe: bool = False
) -> subprocess.Popen[bytes]:
    """Starts `cmd` in its own session (so Ctrl-C reaches only us and we stop it in
    order), stderr (and stdout unless `pipe`) to `log`."""
    with open(log, "ab") as f:
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if pipe else f, stderr=f,
            env=env, start_new_session=True,
        )  # fmt: skip


def _log_problems(path: Path, marks: tuple[str, ...]) -> list[str]:
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    return [f"{path.name}: {line}" for line in lines if any(m in line for m in marks)]


class Side:
    """Where one contender's device A writes (`a`) and device B reads (`b`)."""

    name = ""
    a: Path
    b: Path

    def pids(self) -> dict[str, int]:
        return {}

    def mark(self) -> None:
        """Called as a workload starts: `wait_stored` waits for uploads after this."""

    def wait_stored(self, expected: dict[str, int], limit: float = WAIT_SECONDS) -> None:
        """Returns once the server has what device A wrote since `mark`: `expected` maps
        the paths written (under `a`) to their sizes. Raises Unfinished after `limit`."""
        raise NotImplementedError

    def ready_b(self, cold: bool) -> None:
        """Makes device B see everything stored so far; `cold`: with an empty cache."""


class Native(Side):
    name = "native"

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        self.a = self.b = folder

    def wait_stored(self, expected: dict[str, int], limit: float = WAIT_SECONDS) -> None:
        _syncfs(self.a)


class Loft(Side):
    name = "Loft"

    def __init__(self, root: Path, stack: contextlib.ExitStack, cache_size: str) -> None:
        self.root = root
        self.data = root / "server-data"
        self.data.mkdir(parents=True)
        self.server_log = root / "server.log"
        command = [*LOFT, "serve", "--data", str(self.data), "--port", "0"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.server = _start(command, self.server_log, env, pipe=True)
        stack.callback(self._stop_server)
        assert self.server.stdout is not None
        ready, _, _ = select.select([self.server.stdout], [], [], 30.0)
        line = self.server.stdout.readline().decode() if ready else ""
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            raise BenchError(f"loft serve did not start: {line!r}\n{self.server_log.read_text()}")
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        password = root / "password"
        password.write_text(PASSWORD + "\n")
        self.homes = {dev: root / f"home-{dev}" for dev in "ab"}
        self.mounts = {dev: root / f"mnt-{dev}" for dev in "ab"}
        self.mount_pids: dict[str, int] = {}
        for dev, verb in (("a", "signup"), ("b", "login")):
            account = [self.url, "bench", "--password-file", str(password)]
            self.cli(dev, verb, *account, "--device", f"device-{dev}")
            self.mounts[dev].mkdir()
            stack.callback(self._unmount, dev)
            self.cli(dev, "mount", str(self.mounts[dev]), "--cache-size", cache_size)
            self.mount_pids[dev] = int((self.homes[dev] / "mount.pid").read_text())
        self.a, self.b = self.mounts["a"], self.mounts["b"]

    def cli(self, dev: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        env = {**os.environ, "LOFT_HOME": str(self.homes[dev]), "LOFT_TEST_FAST_KDF": "1"}
        return subprocess.run(
            [*LOFT, *args], env=env, capture_output=True, text=True, timeout=timeout
        )

    def check(self, dev: str, *args: str, timeout: float = 120.0) -> str:
        result = self.cli(dev, *args, timeout=timeout)
        if result.returncode != 0:
            raise BenchError(f"loft {' '.join(args)} (device {dev}): {result.stderr.strip()}")
        return result.stdout

    def sync(self, dev: str, limit: float = WAIT_SECONDS) -> None:
        """`loft sync --wait`; Unfinished (with the files stored so far unknown: -1)."""
        result = self.cli(dev, "sync", "--wait", "--timeout", str(limit), timeout=limit + 60)
        if result.returncode != 0:
            raise Unfinished(-1, f"loft sync --wait (device {dev}): {result.stderr.strip()}")

    def pending_files(self, dev: str) -> int:
        return json.loads(self.check(dev, "status", "--json"))["pending"]["files"]

    def versions(self, path: Path) -> int:
        return len(json.loads(self.check("a", "versions", str(path), "--json"))["versions"])

    def pids(self) -> dict[str, int]:
        assert self.server.pid is not None
        mounts = {f"mount {dev.upper()}": pid for dev, pid in self.mount_pids.items()}
        return mounts | {"server": self.server.pid}

    def wait_stored(self, expected: dict[str, int], limit: float = WAIT_SECONDS) -> None:
        try:
            self.sync("a", limit)
        except Unfinished as exc:
            done = len(expected) - self.pending_files("a")
            raise Unfinished(done, f"{done:,} of {len(expected):,} files stored") from exc

    def ready_b(self, cold: bool) -> None:
        self.sync("b")

    def blob_bytes(self) -> tuple[int, int]:
        return _apparent_size(self.data / "blobs")

    def _unmount(self, dev: str) -> None:
        _unmount(self.mounts[dev])
        pid = self.mount_pids.pop(dev, None)
        if pid is not None:
            _stop_pid(pid, 30.0)

    def _stop_server(self) -> None:
        _stop_process(self.server)
        if self.server.stdout:
            self.server.stdout.close()

    def problems(self) -> list[str]:
        marks = (" ERROR ", "Traceback", " CRITICAL ")
        logs = [self.server_log] + [home / "mount.log" for home in self.homes.values()]
        return [line for log in logs for line in _log_problems(log, marks)]


class Rclone(Side):
    name = "rclone"
    REMOTE = "loftbench"
    _COPIED = re.compile(rb"INFO  : (.+?): Copied \(")

    def __init__(self, root: Path, stack: contextlib.ExitStack) -> None:
        self.root = root
        self.store = root / "webdav-store"
        self.store.mkdir(parents=True)
        config = root / "rclone.conf"
        config.touch()
        self.server_log = root / "webdav.log"
        serve = ["rclone", "serve", "webdav", str(self.store), "--addr", "127.0.0.1:0"]
        self.server = _start([*serve, "--config", str(config)], self.server_log)
        stack.callback(_stop_process, self.server)

        def started() -> bool:
            if self.server.poll() is not None:
                raise BenchError(f"rclone serve webdav exited: {self.server_log.read_text()}")
            return "started on http://" in self.server_log.read_text()

        _wait_for(started, 30.0, "rclone serve webdav")
        match = re.search(r"started on (http://127\.0\.0\.1:(\d+)/?)", self.server_log.read_text())
        assert match is not None
        self.url, self.port = match.group(1), int(match.group(2))
        prefix = f"RCLONE_CONFIG_{self.REMOTE.upper()}_"
        self.env = os.environ | {
            "RCLONE_CONFIG": str(config),
            prefix + "TYPE": "webdav",
            prefix + "URL": self.url,
            prefix + "VENDOR": "other",
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.a, self.b = root / "mnt-a", root / "mnt-b"
        self._log_offset = 0
        self._copies: dict[str, int] = {}
        self._marked: dict[str, int] = {}
        for dev in "ab":
            (root / f"mnt-{dev}").mkdir()
            stack.callback(self._unmount, dev)
            self._mount(dev)

    def _mount(self, dev: str, fresh_cache: bool = True) -> None:
        cache = self.root / f"cache-{dev}"
        if fresh_cache:
            shutil.rmtree(cache, ignore_errors=True)
        mnt = self.a if dev == "a" else self.b
        options = ["--vfs-cache-mode", "full", "--vfs-write-back", "0s", "-v"]
        log = ["--cache-dir", str(cache), "--log-file", str(self.root / f"rclone-{dev}.log")]
        command = ["rclone", "mount", f"{self.REMOTE}:", str(mnt), *options, *log]
        proc = self.procs[dev] = _start(command, self.root / f"rclone-{dev}.out", self.env)

        def ready() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"rclone mount exited with status {proc.returncode}")
            return _mounted(mnt)

        _wait_for(ready, 30.0, f"rclone mount of device {dev}")

    def _unmount(self, dev: str) -> None:
        proc = self.procs.pop(dev, None)
        _unmount(self.a if dev == "a" else self.b)
        if proc is not None:
            _stop_process(proc)

    def remount_b(self, fresh_cache: bool) -> None:
        """A new rclone mount of device B: it has no change notification over WebDAV, so
        without this it would not list new names for --dir-cache-time (5 minutes)."""
        self._unmount("b")
        self._mount("b", fresh_cache)

    def pids(self) -> dict[str, int]:
        mounts = {f"mount {dev.upper()}": p.pid for dev, p in self.procs.items()}
        return mounts | {"webdav": self.server.pid}

    def _read_log(self) -> None:
        """Counts device A's finished uploads per path ("x: Copied (new)", "Copied
        (replaced existing)") in the new complete lines of its log."""
        with open(self.root / "rclone-a.log", "rb") as f:
            f.seek(self._log_offset)
            text = f.read()
        cut = text.rfind(b"\n") + 1
        self._log_offset += cut
        for match in self._COPIED.finditer(text[:cut]):
            name = match.group(1).decode()
            self._copies[name] = self._copies.get(name, 0) + 1

    def mark(self) -> None:
        self._read_log()
        self._marked = dict(self._copies)

    def wait_stored(self, expected: dict[str, int], limit: float = WAIT_SECONDS) -> None:
        """Every path is uploaded once more than at `mark` (by device A's log) and has
        its size in the WebDAV server's folder."""
        pending = dict(expected)

        def all_there() -> bool:
            self._read_log()
            for name, size in list(pending.items()):
                if self._copies.get(name, 0) <= self._marked.get(name, 0):
                    continue
                with contextlib.suppress(OSError):
                    if os.stat(self.store / name).st_size == size:
                        del pending[name]
            return not pending

        try:
            _wait_for(all_there, limit, f"{len(expected):,} uploads by rclone", step=0.05)
        except BenchError:
            done = len(expected) - len(pending)
            raise Unfinished(done, f"{done:,} of {len(expected):,} files stored") from None

    def ready_b(self, cold: bool) -> None:
        self.remount_b(fresh_cache=cold)

    def problems(self) -> list[str]:
        logs = [self.root / name for name in ("rclone-a.log", "rclone-b.log", "webdav.log")]
        return [line for log in logs for line in _log_problems(log, (" ERROR ",))]


# ------------------------------------------------------------------------- the benchmark


@dataclass
class Bench:
    settings: Settings
    root: Path
    native: Native
    rclone: Rclone
    loft: Loft
    rows: list[Row] = field(default_factory=list)
    source: Path = Path()
    _notes: list[str] = field(default_factory=list)

    @property
    def sides(self) -> tuple[Side, Side, Side]:
        return (self.native, self.rclone, self.loft)

    def note(self, text: str) -> None:
        """Adds `text` to the line `each` prints for the side at work."""
        self._notes.append(text)

    def each(
        self, work: Callable[[Side], float], sides: Sequence[Side] | None = None
    ) -> dict[str, float | None]:
        """Runs `work` (which returns the seconds its figure stands for) on every side and
        prints a line with that, the notes, and the CPU its processes used (in cores);
        a side that fails gets None and a line saying why. Each side starts with no dirty
        pages on the machine (sync)."""
        out: dict[str, float | None] = {}
        for side in sides or self.sides:
            self._notes.clear()
            # what the previous side left in the page cache is written out first, outside
            # the timing: its writeback would otherwise land in this side's synced writes
            os.sync()
            pids = side.pids()
            cpu_before = {k: process_cpu(p) for k, p in pids.items()}
            side.mark()
            machine_before, started = machine_cpu(), time.perf_counter()
            try:
                out[side.name] = work(side)
            except BenchError as exc:
                _detail(f"{side.name}: FAILED: {exc}")
                out[side.name] = None
                continue
            wall = time.perf_counter() - started
            cpu = {k: (process_cpu(p) - cpu_before[k]) / wall for k, p in pids.items()}
            busy = (machine_cpu() - machine_before) / wall
            used = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if v >= 0.005) or "-"
            notes = "".join(f"; {n}" for n in self._notes)
            _detail(
                f"{side.name}: {_secs(out[side.name] or 0.0)}{notes}; CPU (cores): {used}; "
                f"whole machine {busy:.2f} of {os.cpu_count()}"
            )
        return out


def _timed_row(
    name: str,
    times: dict[str, float | None],
    fmt: Callable[[float], str],
    target: Target | None = None,
    nbytes: int = 0,
) -> Row:
    def cell(side: str) -> str:
        t = times.get(side, math.nan)
        return "failed" if t is None else ("-" if math.isnan(t) else fmt(t))

    r, lo = times.get("rclone"), times.get("Loft")
    ratio = r / lo if r and lo else None
    rates = {k: nbytes / v / 1e6 for k, v in times.items() if v} if nbytes else {}
    return Row(name, cell("native"), cell("rclone"), cell("Loft"), ratio, target, rates=rates)


# --------------------------------------------------------------- big file: write, reads


def bench_big_file(bench: Bench) -> None:
    size = bench.settings.file_bytes
    label = _size_label(size)
    bench.source = bench.root / "source.bin"
    write_stream(bench.source, random_stream(size, seed=1), fsync=True)

    print(f"\nwrite a {label} random file (1 MiB writes) until every byte is stored", flush=True)
    peaks: dict[str, Peak] = {}

    def write(side: Side) -> float:
        started = time.perf_counter()
        pid = side.pids().get("mount A")
        with Peak(pid) if pid else contextlib.nullcontext() as peak:
            write_stream(side.a / BIG, read_blocks(bench.source), fsync=side is bench.native)
            written = time.perf_counter() - started
            side.wait_stored({BIG: size})
        took = time.perf_counter() - started
        bench.note(f"writes {_secs(written)}, then the wait {_secs(took - written)}")
        if peak is not None:
            peaks[side.name] = peak
            bench.note(f"mount A peak RSS {peak.text()}")
        return took

    times = bench.each(write)
    target = Target(1.5, ">= 1.5")
    bench.rows.append(
        _timed_row(f"write {label} until stored", times, _rate_of(size), target, size)
    )
    store = _disk_usage(bench.loft.homes["a"] / "store")
    _detail(
        f"Loft: {bench.loft.versions(bench.loft.a / BIG)} version(s) of {BIG} committed; "
        f"device A store {_mb(store)} on disk (cache cap {bench.settings.cache_size}); "
        f"server blobs {_mb(bench.loft.blob_bytes()[1])}"
    )
    bench.rows.append(_rss_row(f"peak RSS of mount A, {label} write", peaks))

    print("\ncold sequential read on device B (empty cache, page cache dropped)", flush=True)
    for side in (bench.rclone, bench.loft):
        side.ready_b(cold=True)
    peaks = {}

    def read(side: Side) -> float:
        drop_caches()
        started = time.perf_counter()
        pid = side.pids().get("mount B")
        with Peak(pid) if pid else contextlib.nullcontext() as peak:
            if read_all(side.b / BIG) != size:
                raise BenchError("short read")
        if peak is not None:
            peaks[side.name] = peak
            bench.note(f"mount B peak RSS {peak.text()}")
        return time.perf_counter() - started

    times = bench.each(read)
    target = Target(1.2, ">= 1.2")
    bench.rows.append(_timed_row(f"cold read {label} on B", times, _rate_of(size), target, size))
    bench.rows.append(_rss_row("peak RSS of mount B, cold read", peaks))

    print(f"\nre-read from the local cache, page cache dropped ({WARM_ROUNDS} rounds)", flush=True)
    times = _median_of([bench.each(read) for _ in range(WARM_ROUNDS)])
    name, target = "warm re-read (page cache dropped)", Target(2.0, ">= 2")
    bench.rows.append(_timed_row(name, times, _rate_of(size), target, size))

    print("\nre-read with the page cache", flush=True)

    def reread(side: Side) -> float:
        started = time.perf_counter()
        read_all(side.b / BIG)
        return time.perf_counter() - started

    times = bench.each(reread)
    bench.rows.append(_timed_row("re-read (page cache)", times, _rate_of(size), nbytes=size))
    for side in (bench.rclone, bench.loft):
        if not same_content(side.b / BIG, bench.source):
            raise BenchError(f"{side.name}: device B READ WRONG BYTES of {BIG}")
    _detail("device B's copies match the source byte for byte")


def _median_of(rounds: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Each side's median over rounds that ran every side in turn; a side that failed in
    any round failed."""
    out: dict[str, float | None] = {}
    for side in rounds[0]:
        seen = [r.get(side) for r in rounds]
        out[side] = None if any(t is None for t in seen) else statistics.median(seen)
    return out


def _rate_of(size: int) -> Callable[[float], str]:
    return lambda seconds: _rate(size, seconds)


def _rss_row(name: str, peaks: dict[str, Peak]) -> Row:
    loft, rclone = peaks.get("Loft"), peaks.get("rclone")
    return Row(
        name, rclone=rclone.text() if rclone else "-", loft=loft.text() if loft else "failed",
        target=Target(RSS_TARGET, "< 300 MB", at_least=False),
        value=float(loft.hwm) if loft else math.nan,
    )  # fmt: skip


def bench_fio(bench: Bench) -> None:
    s = bench.settings
    print(
        f"\nfio: random 4 KiB reads of the cached file on B, {s.fio_seconds} s, 1 job "
        "(psync, buffered; fio drops the file's pages first)",
        flush=True,
    )
    iops: dict[str, float] = {}

    def run(side: Side) -> float:
        options = "--name=rand4k --rw=randread --bs=4k --ioengine=psync --readonly"
        command = [
            "fio", *options.split(), f"--filename={side.b / BIG}", f"--size={s.file_bytes}",
            "--invalidate=1", f"--runtime={s.fio_seconds}", "--time_based",
            "--output-format=json",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise BenchError(f"fio: {result.stderr.strip()[-300:]}")
        job = json.loads(result.stdout)["jobs"][0]["read"]
        iops[side.name] = job["iops"]
        bench.note(f"{job['iops']:,.0f} IOPS, mean latency {job['clat_ns']['mean'] / 1e3:,.0f} us")
        return s.fio_seconds

    bench.each(run)
    r, lo = iops.get("rclone"), iops.get("Loft")
    cells = (f"{iops[n]:,.0f}" if n in iops else "failed" for n in ("native", "rclone", "Loft"))
    ratio = lo / r if r and lo else None
    bench.rows.append(Row("fio random 4 KiB reads (IOPS)", *cells, ratio=ratio))


# ------------------------------------------------------------------------- small files


def bench_small_files(bench: Bench) -> None:
    n = bench.settings.small_files
    print(f"\n{n:,} new 4 KiB files until all are stored", flush=True)
    data = memoryview(os.urandom(4096 * n))
    names = [f"small/f{i:05d}" for i in range(n)]

    def write(side: Side) -> float:
        started = time.perf_counter()
        (side.a / "small").mkdir()
        for i, name in enumerate(names):
            with open(side.a / name, "wb", buffering=0) as f:
                f.write(data[i * 4096 : (i + 1) * 4096])
        written = time.perf_counter() - started
        side.wait_stored(dict.fromkeys(names, 4096))
        took = time.perf_counter() - started
        bench.note(f"writes {_secs(written)}, then the wait {_secs(took - written)}")
        return took

    times = bench.each(write)
    name, target = f"{n:,} x 4 KiB files until stored", Target(20.0, ">= 20")
    bench.rows.append(
        _timed_row(name, times, lambda t: f"{n / t:,.0f} files/s ({_secs(t)})", target)
    )

    print(f"\n`ls -l` of the {n:,} files on device B, then a stat of every name", flush=True)
    for side in (bench.rclone, bench.loft):
        side.ready_b(cold=False)
    laps: dict[str, list[float]] = {}

    def ls(side: Side) -> float:
        drop_caches()
        folder = side.b / "small"
        mine = laps.setdefault(side.name, [])
        for _ in range(2):
            started = time.perf_counter()
            out = subprocess.run(["ls", "-l", str(folder)], capture_output=True, check=True)
            mine.append(time.perf_counter() - started)
            listed = out.stdout.count(b"\n") - 1
            if listed != n:
                raise BenchError(f"ls -l listed {listed:,} files, not {n:,}")
        started = time.perf_counter()
        for name in names:
            os.stat(side.b / name)
        mine.append(time.perf_counter() - started)
        bench.note(f"ls -l cached {_secs(mine[1])}; stat x {n:,} {_secs(mine[2])}")
        return mine[0]

    bench.each(ls)
    for i, (label, target) in enumerate((
        (f"ls -l {n:,} files on B, first", Target(1.0, ">= 1")),
        (f"ls -l {n:,} files on B, cached", Target(1.0, ">= 1")),
        (f"stat {n:,} names on B (after ls)", None),
    )):  # fmt: skip
        times = {s.name: laps[s.name][i] if len(laps.get(s.name, ())) == 3 else None
                 for s in bench.sides}  # fmt: skip
        bench.rows.append(_timed_row(label, times, _secs, target))


# ------------------------------------------------------------------------- edits


def _rsync_literal(new: Path, old: Path) -> int:
    """rsync's "Literal data" for bringing `old` up to `new` (local, delta transfer on,
    the quick check off so that a same-size edit is looked at)."""
    command = ["rsync", "--no-whole-file", "--ignore-times", "--stats", str(new), str(old)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    match = re.search(r"Literal data: ([\d,]+)", out)
    if not match:
        raise BenchError(f"no 'Literal data' in rsync's output:\n{out}")
    return int(match.group(1).replace(",", ""))


def _edit_round(
    bench: Bench,
    label: str,
    edit: Callable[[Path], None],
    before: Path,
    after: Path,
    rsync_bytes: int,
) -> Row:
    """One edit of the big file on device A of rclone and of Loft, then a check that
    device B reads the new content: the row of bytes sent (a MISS if B does not)."""
    sent: dict[str, int] = {}
    new_size = after.stat().st_size

    def run(side: Side) -> float:
        port = bench.loft.port if side is bench.loft else bench.rclone.port
        loft = side is bench.loft
        if loft:
            blobs_before = bench.loft.blob_bytes()
            versions = bench.loft.versions(side.a / BIG)
        started = time.perf_counter()
        with TcpReceived(port) as tcp:
            edit(side.a / BIG)
            side.wait_stored({BIG: new_size})
        took = time.perf_counter() - started
        if loft:
            after = bench.loft.blob_bytes()
            files, sent["Loft"] = after[0] - blobs_before[0], after[1] - blobs_before[1]
            new_versions = bench.loft.versions(side.a / BIG) - versions
            bench.note(
                f"{new_versions} version(s) committed, {files} new blob(s) of "
                f"{sent['Loft']:,} B; the server received {tcp.received:,} B over HTTP"
            )
        else:
            sent["rclone"] = tcp.received
            bench.note(f"the WebDAV server received {tcp.received:,} B")
        return took

    bench.each(run, (bench.rclone, bench.loft))
    _detail(f"rsync --no-whole-file: Literal data {rsync_bytes:,} B")
    r, lo = sent.get("rclone"), sent.get("Loft")
    ratio = r / lo if r and lo else (math.inf if r and lo == 0 else None)
    row = Row(
        f"bytes sent, {label}", native=f"rsync {_mb(rsync_bytes)}",
        rclone=_mb(r) if r is not None else "failed", loft=_mb(lo) if lo is not None else "failed",
        ratio=ratio, target=Target(100.0, ">= 100 (1/100)"),
    )  # fmt: skip
    for side in (bench.rclone, bench.loft):
        side.ready_b(cold=False)
        if same_content(side.b / BIG, after):
            _detail(f"{side.name}: device B reads the edited file byte for byte")
            continue
        stale = same_content(side.b / BIG, before)
        _detail(
            f"{side.name}: DEVICE B DOES NOT READ THE EDITED FILE RIGHT"
            + (": it still reads the content from before the edit" if stale else "")
        )
        if side is bench.loft:
            _explain_loft_mismatch(bench, after)
            row.loft += " (upload incomplete)"
            row.value = 0.0
        else:
            row.rclone += " (B reads other bytes)"
    return row


def bench_edits(bench: Bench) -> None:
    size = bench.settings.file_bytes
    print(f"\nsmall edits of the {_size_label(size)} file on device A", flush=True)
    # Native copies of the content after each edit, and rsync's destination.
    edited, inserted = bench.root / "edit1.bin", bench.root / "edit2.bin"
    rsync_dir = bench.root / "rsync"
    rsync_dir.mkdir()
    shutil.copyfile(bench.source, rsync_dir / BIG)
    shutil.copyfile(bench.source, edited)
    with open(edited, "r+b") as f:
        flipped = bytes([f.read(1)[0] ^ 0xFF])
        f.seek(0)
        f.write(flipped)
    write_stream(inserted, itertools.chain([INSERTION], read_blocks(edited)))

    def overwrite_byte(path: Path) -> None:
        with open(path, "r+b", buffering=0) as f:
            f.write(flipped)

    def insert_bytes(path: Path) -> None:
        # What an editor's save amounts to: the whole file again, 8 bytes longer.
        with open(path, "r+b", buffering=0) as f:
            f.write(INSERTION)
            for block in read_blocks(edited):
                f.write(block)

    rounds = (
        ("1-byte overwrite at offset 0", overwrite_byte, bench.source, edited),
        ("8-byte insertion at offset 0", insert_bytes, edited, inserted),
    )
    for label, edit, before, after in rounds:
        print(f"\n{label}", flush=True)
        literal = _rsync_literal(after, rsync_dir / BIG)
        bench.rows.append(_edit_round(bench, label, edit, before, after, literal))


def _explain_loft_mismatch(bench: Bench, expected: Path) -> None:
    """Says what device A and the server hold when B reads something else."""
    loft = bench.loft
    state = json.loads(loft.check("a", "status", str(loft.a / BIG), "--json"))
    pending = json.loads(loft.check("a", "status", "--json"))["pending"]
    _detail(
        f"Loft: B reads {os.path.getsize(loft.b / BIG):,} B, expected "
        f"{expected.stat().st_size:,} B; on A the file is {state['state']!r} at version "
        f"{state['version']} while `loft status` counts {pending} pending and `loft sync "
        "--wait` returned: a write A made is not on the server"
    )
    time.sleep(3)
    loft.sync("a")
    loft.sync("b")
    again = same_content(loft.b / BIG, expected)
    _detail(f"Loft: 3 s and another sync later, B reads the right bytes: {again}")
    if not again:
        # Get A's content to the server as a user would (a write queues the file again),
        # so that the parts after this one start clean.
        with open(loft.a / BIG, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(last)
        loft.sync("a")


# ------------------------------------------------------------------------- latency


def _visible(path: Path, content: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read() == content
    except OSError:
        return False


def bench_latency(bench: Bench) -> None:
    s = bench.settings
    print(
        f"\nchange-to-visible latency A -> B: {s.latency_edits} rewrites of a 64-byte file "
        "(from the write on A until B reads the new content)",
        flush=True,
    )
    name = "latency.txt"
    loft = bench.loft
    samples: list[float] = []
    first = b"start".ljust(64)
    (loft.a / name).write_bytes(first)
    _wait_for(lambda: _visible(loft.b / name, first), 30.0, "the first file on B")
    for i in range(s.latency_edits):
        content = f"edit {i}".encode().ljust(64)
        started = time.perf_counter()
        with open(loft.a / name, "wb") as f:
            f.write(content)
        _wait_for(lambda c=content: _visible(loft.b / name, c), 30.0, f"edit {i} on B", 0.002)
        samples.append(time.perf_counter() - started)
        time.sleep(0.05)
    p50, p99 = percentile(samples, 50), percentile(samples, 99)
    _detail(
        f"Loft: p50 {_secs(p50)}, p99 {_secs(p99)}, max {_secs(max(samples))} "
        f"over {len(samples)} edits"
    )
    rclone_cell = "up to 5 min (config)"
    if s.rclone_latency_timeout:
        rclone_cell = _rclone_latency(bench.rclone, name, s.rclone_latency_timeout)
    bench.rows += [
        Row(f"change visible on B, p50 ({len(samples)} edits)", rclone=rclone_cell,
            loft=_secs(p50), target=Target(1.0, "< 1 s", at_least=False), value=p50),
        Row("change visible on B, p99", rclone=rclone_cell, loft=_secs(p99),
            target=Target(2.0, "< 2 s", at_least=False), value=p99),
    ]  # fmt: skip


def _rclone_latency(rclone: Rclone, name: str, timeout: float) -> str:
    """One edit through rclone: B has read the file, A rewrites it, B polls."""
    first = b"start".ljust(64)
    rclone.mark()
    (rclone.a / name).write_bytes(first)
    rclone.wait_stored({name: 64})
    rclone.remount_b(fresh_cache=False)
    _wait_for(lambda: _visible(rclone.b / name, first), 30.0, "the first file on B")
    content = b"edit".ljust(64)
    started = time.perf_counter()
    (rclone.a / name).write_bytes(content)
    try:
        _wait_for(lambda: _visible(rclone.b / name, content), timeout, "the edit on B", 0.01)
        cell = _secs(time.perf_counter() - started)
    except BenchError:
        cell = f"> {timeout:.0f} s"
    _detail(
        f"rclone: one edit, visible on B after {cell} (no change notification over WebDAV; "
        "B lists a folder again after --dir-cache-time, 5 min by default)"
    )
    return cell


# ------------------------------------------------------------------------- 10 GiB


def bench_huge(bench: Bench) -> None:
    size = bench.settings.huge_bytes
    loft = bench.loft
    label = _size_label(size)
    print(f"\nLoft alone: a {label} random file until stored, then a cold read on B", flush=True)
    free = shutil.disk_usage(bench.root).free
    if free < 4 * size:
        _detail(f"skipped: {_mb(free)} free on disk, {_mb(4 * size)} wanted")
        return
    started = time.perf_counter()
    with Peak(loft.mount_pids["a"], loft.homes["a"] / "store", every=1.0) as peak_a:
        write_stream(loft.a / "huge.bin", random_stream(size, seed=10))
        written = time.perf_counter() - started
        loft.sync("a")
    took = time.perf_counter() - started
    _detail(
        f"Loft: writes {_secs(written)}, stored after {_secs(took)}; mount A peak RSS "
        f"{peak_a.text()}, store up to {_mb(peak_a.disk)} on disk"
    )
    loft.sync("b")
    drop_caches()
    started = time.perf_counter()
    with Peak(loft.mount_pids["b"], loft.homes["b"] / "store", every=1.0) as peak_b:
        got = read_all(loft.b / "huge.bin")
    read = time.perf_counter() - started
    if got != size:
        raise BenchError(f"short read of huge.bin: {got:,} B")
    _detail(
        f"Loft: cold read {_secs(read)}; mount B peak RSS {peak_b.text()}, store up to "
        f"{_mb(peak_b.disk)} on disk (cache cap {bench.settings.cache_size})"
    )
    rss = Target(RSS_TARGET, "RSS < 300 MB", at_least=False)
    bench.rows += [
        Row(f"{label}: write until stored", loft=_rate(size, took)),
        Row(f"{label}: peak RSS / store, mount A", loft=f"{peak_a.text()} / {_mb(peak_a.disk)}",
            target=rss, value=peak_a.hwm),
        Row(f"{label}: cold read on B", loft=_rate(size, read)),
        Row(f"{label}: peak RSS / store, mount B", loft=f"{peak_b.text()} / {_mb(peak_b.disk)}",
            target=rss, value=peak_b.hwm),
    ]  # fmt: skip


# ------------------------------------------------------------------------- source tree


def bench_tree(bench: Bench) -> None:
    limit = bench.settings.tree_seconds
    base, names, sizes = stdlib_files(bench.settings.tree_files)
    tar, listing = bench.root / "tree.tar", bench.root / "tree.list"
    listing.write_text("\n".join(names) + "\n")
    command = ["tar", "-cf", str(tar), "-C", str(base), "--no-recursion", "-T", str(listing)]
    subprocess.run(command, check=True)
    print(
        f"\nuntar the Python standard library ({len(names):,} files, "
        f"{_mb(sum(sizes.values()))}, from {base}) until stored; at most {limit:.0f} s each",
        flush=True,
    )
    expected = {f"tree/{n}": size for n, size in sizes.items()}
    cells: dict[str, str] = {}

    def untar(side: Side) -> float:
        started = time.perf_counter()
        (side.a / "tree").mkdir()
        command = ["tar", "-xf", str(tar), "-C", str(side.a / "tree"), "--no-same-owner"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise BenchError(f"tar: {result.stderr.strip()[-300:]}")
        written = time.perf_counter() - started
        try:
            side.wait_stored(expected, limit=max(1.0, limit - written))
        except Unfinished as exc:
            took = time.perf_counter() - started
            if exc.done <= 0:
                raise
            # the time all of them would take at the rate so far
            projected = took * len(names) / exc.done
            bench.note(
                f"stopped waiting at {took:.0f} s: {exc} ({exc.done / took:.1f} files/s); "
                "the figure is the time all would take at that rate"
            )
            cells[side.name] = (
                f"{exc.done / took:,.1f} files/s (stopped at {took:.0f} s: "
                f"{exc.done:,} of {len(names):,} stored)"
            )
            return projected
        took = time.perf_counter() - started
        cells[side.name] = f"{len(names) / took:,.0f} files/s ({_secs(took)})"
        return took

    times = bench.each(untar)
    row = _timed_row(f"untar {len(names):,} files until stored", times, str)
    row.native, row.rclone, row.loft = (
        cells.get(n, "failed") for n in ("native", "rclone", "Loft")
    )
    bench.rows.append(row)


# ------------------------------------------------------------------------- output


def table(rows: Sequence[Row]) -> str:
    cells = [r.cells() for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADERS)]
    line = "  ".join(f"{{:{w}}}" for w in widths)
    out = [line.format(*HEADERS), line.format(*("-" * w for w in widths))]
    return "\n".join(out + [line.format(*c) for c in cells])


def markdown(rows: Sequence[Row]) -> str:
    out = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    out += ["| " + " | ".join(c.replace("|", "/") for c in r.cells()) + " |" for r in rows]
    return "\n".join(out)


def write_markdown(path: Path, mode: str, rows: Sequence[Row], caption: str) -> None:
    """Puts the table between this mode's markers in `path`, leaving the rest of the
    document alone; appends the marked block if the markers are not there yet."""
    start, end = f"<!-- bench_mount {mode}: start -->", f"<!-- bench_mount {mode}: end -->"
    block = f"{start}\n{caption}\n\n{markdown(rows)}\n{end}"
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = f"{text.rstrip()}\n\n{block}\n" if text.strip() else block + "\n"
    path.write_text(text)


def charts(rows: Sequence[Row], folder: Path, title: str, mode: str) -> list[Path]:
    """PNG charts: the rclone ÷ Loft ratios against their targets; MB/s per side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    made = []
    ratios = [r for r in rows if r.ratio and math.isfinite(r.ratio)][::-1]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(ratios) + 1.8))
    colours = {"PASS": "#2e8b57", "MISS": "#c0392b"}
    ax.barh([r.name for r in ratios], [r.ratio for r in ratios],
            color=[colours.get(r.verdict, "#95a5a6") for r in ratios])  # fmt: skip
    for y, r in enumerate(ratios):
        ax.text(r.ratio * 1.06, y, r.ratio_text(), va="center", fontsize=8)
        if r.target is not None and r.value is None:
            ax.plot([r.target.value] * 2, [y - 0.42, y + 0.42], color="black", lw=2.5)
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("rclone ÷ Loft, time or bytes (> 1: Loft is better); black bars: targets")
    ax.set_title(f"{title}: green PASS, red MISS, grey no target", fontsize=10)
    fig.tight_layout()
    suffix = "" if mode == "default" else f"-{mode}"
    made.append(folder / f"bench-mount-ratios{suffix}.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)

    rated = [r for r in rows if r.rates]
    if rated:
        fig, ax = plt.subplots(figsize=(10, 4.2))
        for i, side in enumerate(("native", "rclone", "Loft")):
            xs = [j + (i - 1) * 0.27 for j in range(len(rated))]
            bars = ax.bar(xs, [r.rates.get(side, 0) for r in rated], 0.27, label=side)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(rated)), [r.name for r in rated], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("MB/s (log scale)")
        ax.set_title(f"{title}: big-file throughput", fontsize=10)
        ax.legend()
        fig.tight_layout()
        made.append(folder / f"bench-mount-throughput{suffix}.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    return made


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    rclone = subprocess.run(["rclone", "version"], capture_output=True, text=True).stdout
    return (
        f"{models[0] if models else 'unknown CPU'}, {os.cpu_count()} CPUs, "
        f"{mem / GiB:.1f} GiB RAM, Linux {os.uname().release}, Python {sys.version.split()[0]}, "
        f"{rclone.splitlines()[0] if rclone else 'rclone ?'}"
    )


# ------------------------------------------------------------------------- main


def _ensure_tools() -> None:
    """Installs the Debian packages the benchmark runs (as root), like scripts/_bootstrap.sh."""
    wanted = {"rclone": "rclone", "fio": "fio", "rsync": "rsync", "fusermount3": "fuse3",
              "ss": "iproute2", "tar": "tar"}  # fmt: skip
    missing = sorted({pkg for exe, pkg in wanted.items() if shutil.which(exe) is None})
    if not missing:
        return
    print(f"installing {' '.join(missing)}", file=sys.stderr, flush=True)
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    quiet = {"env": env, "check": True, "stdout": subprocess.DEVNULL}
    subprocess.run(["apt-get", "update", "-qq"], **quiet)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], **quiet
    )


#: The workloads in the order they run. The tree goes last: a side that misses its time
#: cap keeps uploading in the background. fio and the edits work on the big file.
PARTS: dict[str, Callable[[Bench], None]] = {
    "big": bench_big_file,
    "fio": bench_fio,
    "small": bench_small_files,
    "edits": bench_edits,
    "latency": bench_latency,
    "huge": bench_huge,
    "tree": bench_tree,
}


def run(bench: Bench, parts: Sequence[str]) -> None:
    """The chosen workloads in turn; one that fails says why and the others still run."""
    started = time.perf_counter()
    bench.loft.sync("a")
    _detail(
        f"`loft sync --wait` with nothing to do takes {_secs(time.perf_counter() - started)} "
        "(part of every Loft 'until stored' figure)"
    )
    warn_if_busy()
    for name in parts:
        try:
            PARTS[name](bench)
        except BenchError as exc:
            print(f"  {name} FAILED: {exc}", flush=True)


def _remove(root: Path) -> None:
    """Deletes the work folder, never while anything is still mounted inside it."""
    for point in _mount_points():
        if point.startswith(f"{root}/"):
            print(f"warning: {point} is still mounted: lazy unmount", file=sys.stderr)
            subprocess.run(["fusermount3", "-uz", point], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="256 MiB, 500 small files, 200-file tree, 20 edits (< 3 min)",
    )
    size.add_argument("--full", action="store_true", help="also the 10 GiB file (part huge)")
    parser.add_argument("--cache-size", default="4G", help="Loft's --cache-size (4G)")
    parser.add_argument("--charts", type=Path, help="write PNG charts of the ratios here")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    parser.add_argument("--tmp", type=Path, help="parent of the work folder (default: $TMPDIR)")
    parser.add_argument(
        "--only", type=lambda text: text.split(","), default=None,
        help=f"run only these parts ({','.join(PARTS)}); fio and edits bring big along",
    )  # fmt: skip
    args = parser.parse_args(argv)  # fmt: skip
    settings = Settings.of(args)
    chosen = set(args.only or [p for p in PARTS if p != "huge" or args.full])
    if unknown := chosen - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    if chosen & {"fio", "edits"}:
        chosen.add("big")
    if os.geteuid() != 0:
        print("bench_mount: run as root (it mounts and drops the page cache)", file=sys.stderr)
        return 2
    _ensure_tools()

    started = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _sigterm)
    root = Path(tempfile.mkdtemp(prefix="loft-bench-mount-", dir=args.tmp))
    stack = contextlib.ExitStack()
    bench = loft = rclone = None
    problems: list[str] = []
    failure = ""
    try:
        print(f"working in {root}; {machine()}", flush=True)
        native = Native(root / "native")
        rclone = Rclone(root / "rclone", stack)
        print(f"rclone: webdav {rclone.url}, mounts {rclone.a} and {rclone.b}", flush=True)
        loft = Loft(root / "loft", stack, settings.cache_size)
        print(f"Loft: server {loft.url}, mounts {loft.a} and {loft.b}", flush=True)
        bench = Bench(settings, root, native, rclone, loft)
        run(bench, [p for p in PARTS if p in chosen])
    except KeyboardInterrupt:
        failure = "interrupted"
    except BenchError as exc:
        failure = f"setup failed: {exc}"
    finally:
        # Every mount and process goes, even on Ctrl-C (ignored from here on).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("\nunmounting and stopping the servers", flush=True)
        try:
            stack.close()
        finally:
            problems = (loft.problems() if loft else []) + (rclone.problems() if rclone else [])
            _remove(root)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)
    if failure or bench is None:
        print(f"\n{failure}", *problems[:20], sep="\n  ", file=sys.stderr, flush=True)
        return 130 if failure == "interrupted" else 1

    mode = "quick" if args.quick else "full" if args.full else "default"
    if args.only:
        mode += "-" + "-".join(sorted(chosen))
    title = f"Loft vs rclone mount ({mode})"
    elapsed = time.perf_counter() - started
    print(f"\n{table(bench.rows)}")
    print(f"\n({elapsed:.0f} s; {machine()})", flush=True)
    if args.markdown:
        flags = ["--quick"] * args.quick + ["--full"] * args.full
        flags += [f"--only {','.join(args.only)}"] if args.only else []
        caption = (
            f"`{' '.join(['scripts/bench_mount.py', *flags])}`, "
            f"{time.strftime('%Y-%m-%d %H:%M')}, {elapsed:.0f} s; {machine()}"
        )
        write_markdown(args.markdown, mode, bench.rows, caption)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in bench.rows], indent=1, default=str))
    if args.charts:
        try:
            for path in charts(bench.rows, args.charts, title, mode):
                print(f"chart: {path}")
        except ImportError:
            print("charts need matplotlib: .venv/bin/pip install -e '.[bench]'", file=sys.stderr)
    if problems:
        print("\nlog problems:", *problems[:20], sep="\n  ", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
