"""Starting, stopping, crashing and refusing mounts."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fs.mount import READ_AHEAD_KB, MountError, unmount
from loft.control import request_sync
from tests.mount.conftest import LOFT, Cluster, Mount, _env, _wait_gone, wait_for


def _mount_cli(home: Path, mountpoint: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LOFT, "mount", str(mountpoint), *extra],
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_mount_refuses_bad_mountpoints_and_logged_out_devices(cluster: Cluster, tmp_path):
    (home,) = cluster.account()
    missing = _mount_cli(home, tmp_path / "missing")
    assert missing.returncode != 0
    assert "does not exist" in missing.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "file").write_bytes(b"")
    result = _mount_cli(home, full)
    assert result.returncode != 0 and "not empty" in result.stderr
    result = _mount_cli(tmp_path / "nobody", tmp_path)
    assert result.returncode != 0 and "not logged in, run loft login" in result.stderr
    m = cluster.mount(home)
    again = tmp_path / "again"
    again.mkdir()
    result = _mount_cli(home, again)
    assert result.returncode != 0 and "already mounted" in result.stderr
    result = _mount_cli(home, m.path)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1  # one line, no traceback
    with pytest.raises(MountError, match="not mounted"):
        unmount(again)


def test_mount_with_relative_home_and_mountpoint(cluster: Cluster, tmp_path):
    # the mount process leaves the working directory: relative paths must not break it
    (home,) = cluster.account()
    (tmp_path / "mnt").mkdir()
    env = {**_env(home), "LOFT_HOME": os.path.relpath(home, tmp_path)}
    result = subprocess.run([*LOFT, "mount", "mnt"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    try:
        assert result.returncode == 0, result.stderr
        (tmp_path / "mnt" / "f").write_bytes(b"relative")
        assert (tmp_path / "mnt" / "f").read_bytes() == b"relative"
    finally:
        if os.path.ismount(tmp_path / "mnt"):
            unmount(tmp_path / "mnt")


def test_mount_widens_the_kernel_read_ahead(cluster: Cluster):
    (home,) = cluster.account()
    m = cluster.mount(home)
    device = os.stat(m.path).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    assert bdi.read_text().strip() == str(READ_AHEAD_KB)


def test_mount_answers_sync_on_its_control_socket(cluster: Cluster):
    home, other = cluster.account(devices=2)
    m, seen = cluster.mount(home), cluster.mount(other)
    (m.path / "f").write_bytes(b"synced" * 10_000)
    assert request_sync(home, 30) == {"ok": True}
    assert wait_for(lambda: (seen.path / "f").exists(), timeout=10)
    # nonsense, and a command that leaves before its answer, leave the mount serving
    huge = b'{"op": "sync", "timeout": 1' + b"0" * 400 + b"}\n"  # float() overflows
    for request in (b"nonsense\n", huge, b"[" * 3000 + b"\n", b'{"op": "sync"}\n'):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(home / "control.sock"))
            s.sendall(request)
            if request != b'{"op": "sync"}\n':
                answer = json.loads(s.makefile("rb").readline())
                assert answer["ok"] is False and "bad request" in answer["error"]
    (m.path / "g").write_bytes(b"again")
    result = subprocess.run([*LOFT, "sync", "--wait", "--timeout", "30"], env=_env(home),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "in sync", result.stderr
    assert wait_for(lambda: (seen.path / "g").exists(), timeout=10)
    assert (seen.path / "g").read_bytes() == b"again"


def test_mount_unmount_then_remount_keeps_everything(cluster: Cluster):
    (home,) = cluster.account()
    m = cluster.mount(home)
    (m.path / "d").mkdir()
    (m.path / "d" / "f").write_bytes(b"kept")
    os.symlink("d/f", m.path / "s")
    pid = m.pid
    unmount(m.path)
    assert not os.path.ismount(m.path)
    assert pid is not None and _wait_gone(pid, 20)
    m.pid = None
    m.start()
    assert (m.path / "d" / "f").read_bytes() == b"kept"
    assert (m.path / "s").read_bytes() == b"kept"


def test_mount_foreground_stops_on_sigterm_and_sigint(cluster: Cluster, tmp_path):
    (home,) = cluster.account()
    mountpoint = tmp_path / "fg"
    mountpoint.mkdir()
    for signum in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen(
            [*LOFT, "mount", str(mountpoint), "--foreground"],
            env=_env(home),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert wait_for(lambda: os.path.ismount(mountpoint), 20)
            (mountpoint / f"f{signum}").write_bytes(b"x")
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            assert not os.path.ismount(mountpoint)
            assert "mounted" in err and " ERROR " not in err and "Traceback" not in err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def test_mount_read_only(cluster: Cluster):
    (home,) = cluster.account()
    m = cluster.mount(home)
    (m.path / "f").write_bytes(b"data")
    m.stop()
    m.start("--read-only")
    assert (m.path / "f").read_bytes() == b"data"
    with pytest.raises(OSError) as info:
        (m.path / "g").write_bytes(b"")
    assert info.value.errno == errno.EROFS


def test_mount_sigkill_during_copy_keeps_what_was_fsynced(cluster: Cluster, tmp_path):
    (home,) = cluster.account()
    m: Mount = cluster.mount(home)
    synced = {}
    for i in range(5):
        data = os.urandom(300_000 + i)
        with open(m.path / f"synced{i}", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        synced[f"synced{i}"] = data
    (m.path / "dir").mkdir()
    os.symlink("../synced0", m.path / "dir" / "link")

    failures: list[BaseException] = []

    def big_copy() -> None:
        try:
            with open(m.path / "big", "wb") as f:
                block = os.urandom(1 << 20)
                for _ in range(2000):
                    f.write(block)
        except OSError as exc:  # the mount dies under it
            failures.append(exc)

    writer = threading.Thread(target=big_copy)
    writer.start()
    time.sleep(1.0)
    m.kill(unmount=False)  # the next mount clears the dead one
    writer.join(30)
    assert not writer.is_alive()
    assert failures, "the copy should have failed when the mount died"
    m.start()
    for name, data in synced.items():
        assert (m.path / name).read_bytes() == data
    assert os.readlink(m.path / "dir" / "link") == "../synced0"
    assert (m.path / "dir" / "link").read_bytes() == synced["synced0"]
    # the mount still works after the crash
    (m.path / "after").write_bytes(b"fine")
    assert (m.path / "after").read_bytes() == b"fine"
