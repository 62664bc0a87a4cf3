"""Real FUSE mounts of real devices against a real server process.

`Mount` runs `python -m loft mount` (background mode: it returns once the mount is
ready) with LOFT_HOME set, and always unmounts and stops the serving process in
`stop()`; fixtures call it in `finally`. A mount's log (LOFT_HOME/mount.log) with
ERROR lines or tracebacks fails the test, as the server's log does.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from cache.session import login, signup
from tests.serverproc import ServerProcess

LOFT = [sys.executable, "-m", "loft"]
PASSWORD = "correct horse"
_users = itertools.count()


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "LOFT_HOME": str(home), "LOFT_TEST_FAST_KDF": "1"}


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie waiting for init to reap it does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return False


class Mount:
    def __init__(self, home: Path, path: Path) -> None:
        self.home, self.path = home, path
        self.pid: int | None = None
        path.mkdir(parents=True, exist_ok=True)

    def start(self, *extra: str) -> Mount:
        result = subprocess.run(
            [*LOFT, "mount", str(self.path), "--cache-size", "1G", *extra],
            env=_env(self.home),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"mount failed: {result.stderr}\n{self.log()}"
        assert os.path.ismount(self.path)
        self.pid = int((self.home / "mount.pid").read_text())
        return self

    def stop(self) -> None:
        """Unmounts and waits for the serving process; kills it if it hangs."""
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
        if self.pid is not None:
            if not _wait_gone(self.pid, 20.0):
                self.kill()
                raise AssertionError(f"mount process {self.pid} did not exit after unmount")
            self.pid = None

    def kill(self, unmount: bool = True) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_gone(self.pid, 10.0)
            self.pid = None
        if unmount:
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)

    def log(self) -> str:
        path = self.home / "mount.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_problems(self) -> list[str]:
        return [
            line
            for line in self.log().splitlines()
            if " ERROR " in line or "Traceback" in line or " CRITICAL " in line
        ]


class Cluster:
    """One server; accounts with devices; mounts that are always cleaned up."""

    def __init__(self, root: Path, server: ServerProcess) -> None:
        self.root, self.server = root, server
        self.mounts: list[Mount] = []
        self.allow_problems = False

    def account(self, devices: int = 1) -> list[Path]:
        user = f"user{next(_users)}"
        homes = []
        for i in range(devices):
            home = self.root / f"{user}-dev{i}"
            action = signup if i == 0 else login
            os.environ["LOFT_TEST_FAST_KDF"] = "1"
            trio.run(action, home, self.server.url, user, PASSWORD, f"dev{i}")
            homes.append(home)
        return homes

    def mount(self, home: Path, *extra: str) -> Mount:
        m = Mount(home, self.root / f"{home.name}-mnt-{len(self.mounts)}")
        self.mounts.append(m)
        return m.start(*extra)

    def close(self) -> list[str]:
        problems = []
        for m in self.mounts:
            try:
                m.stop()
            finally:
                problems += m.log_problems()
        self.mounts.clear()
        return problems


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    os.environ["LOFT_TEST_FAST_KDF"] = "1"
    proc = ServerProcess(tmp_path_factory.mktemp("mount-server") / "data").start()
    try:
        yield proc
    finally:
        proc.stop()
    problems = proc.log_problems()
    assert not problems, "server logged errors:\n" + "\n".join(problems)


@pytest.fixture
def cluster(server, tmp_path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, server)
    try:
        yield c
    finally:
        problems = c.close()
    if problems and not c.allow_problems:
        pytest.fail("mount logged errors:\n" + "\n".join(problems))


@pytest.fixture(scope="module")
def shared_mount(server, tmp_path_factory) -> Iterator[Mount]:
    """One mount for the tests of single operations (each works in its own folder)."""
    c = Cluster(tmp_path_factory.mktemp("shared"), server)
    try:
        (home,) = c.account()
        yield c.mount(home)
    finally:
        problems = c.close()
    assert not problems, "mount logged errors:\n" + "\n".join(problems)


@pytest.fixture
def mnt(shared_mount, request) -> Path:
    """A fresh folder inside the shared mount."""
    folder = shared_mount.path / request.node.name[:100]
    folder.mkdir()
    return folder


def wait_for(check: Callable[[], bool], timeout: float = 2.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


@pytest.fixture
def own_cluster(tmp_path) -> Iterator[Cluster]:
    """A cluster with a server of its own, for tests that stop and restart the server
    (`cluster.server.stop()` / `.start()`: a restart binds the same port again)."""
    os.environ["LOFT_TEST_FAST_KDF"] = "1"
    proc = ServerProcess(tmp_path / "own-server" / "data").start()
    c = Cluster(tmp_path, proc)
    try:
        yield c
    finally:
        try:
            problems = c.close()
        finally:
            proc.stop()
    problems += proc.log_problems()
    if problems and not c.allow_problems:
        pytest.fail("mount or server logged errors:\n" + "\n".join(problems))
