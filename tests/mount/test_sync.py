"""Two devices of one account, two mounts, one server: changes show up on the other
mount within seconds, through the kernel's caches (entries, attributes, pages)."""

from __future__ import annotations

import json
import os
import subprocess
import time

from tests.mount.conftest import LOFT, Cluster, _env, wait_for

VISIBLE_WITHIN = 2.0


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_mount_two_devices_see_each_others_changes(cluster: Cluster):
    home_a, home_b = cluster.account(devices=2)
    a = cluster.mount(home_a).path
    b = cluster.mount(home_b).path

    # a new file; B has looked for it before (no stale negative entry may hide it)
    assert not (b / "notes.txt").exists()
    (a / "notes.txt").write_bytes(b"first")
    assert wait_for(lambda: _read(b / "notes.txt") == b"first", VISIBLE_WITHIN)

    # new content: B has the old bytes in its page cache and the old size cached
    assert _read(b / "notes.txt") == b"first"
    assert (b / "notes.txt").stat().st_size == 5
    with open(a / "notes.txt", "wb") as f:
        f.write(b"second version")
    assert wait_for(lambda: _read(b / "notes.txt") == b"second version", VISIBLE_WITHIN)
    assert (b / "notes.txt").stat().st_size == len(b"second version")

    # a change made on B goes the other way
    with open(b / "notes.txt", "ab") as f:
        f.write(b" + B")
    assert wait_for(lambda: _read(a / "notes.txt") == b"second version + B", VISIBLE_WITHIN)

    # folders, renames, attributes and deletes
    (a / "docs").mkdir()
    (a / "docs" / "x").write_bytes(b"x")
    assert wait_for(lambda: os.listdir(b / "docs") == ["x"], VISIBLE_WITHIN)
    os.rename(a / "docs" / "x", a / "y")
    assert wait_for(lambda: os.listdir(b / "docs") == [] and _read(b / "y") == b"x", VISIBLE_WITHIN)
    os.chmod(a / "y", 0o600)
    assert wait_for(lambda: (b / "y").stat().st_mode & 0o777 == 0o600, VISIBLE_WITHIN)
    os.unlink(a / "y")
    assert wait_for(lambda: not (b / "y").exists(), VISIBLE_WITHIN)
    assert sorted(os.listdir(b)) == ["docs", "notes.txt"]


def test_mount_remote_change_while_file_open(cluster: Cluster):
    home_a, home_b = cluster.account(devices=2)
    a = cluster.mount(home_a).path
    b = cluster.mount(home_b).path
    data = os.urandom(1 << 20)
    (a / "big").write_bytes(data)
    assert wait_for(lambda: _read(b / "big") == data, 5.0)
    with open(b / "big", "rb") as reader:
        assert reader.read(10) == data[:10]
        new = os.urandom(1 << 20)
        (a / "big").write_bytes(new)
        assert wait_for(lambda: _read(b / "big") == new, VISIBLE_WITHIN)
        # the handle opened before the change reads the new pages too
        assert wait_for(lambda: os.pread(reader.fileno(), 64, 4096) == new[4096:4160], 2.0)


def test_mount_concurrent_edits_keep_both_versions(cluster: Cluster):
    home_a, home_b = cluster.account(devices=2)
    a = cluster.mount(home_a).path
    b = cluster.mount(home_b).path
    (a / "shared.txt").write_bytes(b"base")
    assert wait_for(lambda: _read(b / "shared.txt") == b"base", VISIBLE_WITHIN)
    # both save before either sees the other's change: one becomes a conflicted copy
    (a / "shared.txt").write_bytes(b"from A")
    (b / "shared.txt").write_bytes(b"from B")

    def both_versions(root) -> bool:
        contents = sorted(_read(root / n) for n in os.listdir(root))
        return contents == [b"from A", b"from B"]

    assert wait_for(lambda: both_versions(a) and both_versions(b), 15.0)
    names = os.listdir(a)
    assert "shared.txt" in names
    copy = next(n for n in names if "conflicted copy" in n)
    assert os.getxattr(a / copy, "user.loft.state") in (b"conflict", b"pending")
    assert sorted(os.listdir(b)) == sorted(names)


def test_mount_a_forked_child_closing_its_copy_does_not_upload_half_a_file(cluster: Cluster):
    """`cmd > log` and make: children inherit the descriptor and close it (FUSE's
    flush) while another process goes on writing through it. The file travels when
    its last descriptor closes (release), not at every close of one of them, which
    made other devices see, and the server keep, a version with half the file."""
    (home,) = cluster.account()
    a = cluster.mount(home).path
    first, rest = b"first half\n" * 1000, b"second half\n" * 1000
    fd = os.open(a / "log.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, first)
        child = os.fork()
        if child == 0:
            os.close(fd)
            os._exit(0)
        os.waitpid(child, 0)
        time.sleep(0.5)  # the writer thinks: longer than a close lingers, less than quiet
        os.write(fd, rest)
    finally:
        os.close(fd)

    def loft(*args: str) -> str:
        result = subprocess.run([*LOFT, *args], env=_env(home), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout

    loft("sync", "--wait", "--timeout", "30")
    history = json.loads(loft("versions", str(a / "log.txt"), "--json"))["versions"]
    sizes = [v["size"] for v in history]
    assert sizes[0] == len(first) + len(rest), sizes
    assert len(first) not in sizes, sizes
