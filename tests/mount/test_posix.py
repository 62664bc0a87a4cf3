"""POSIX operations through a real FUSE mount, with real syscalls."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mount.conftest import wait_for

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(src: Path, dst: Path, flags: int) -> None:
    at_fdcwd = -100
    if _libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def raises_errno(code: int):
    class _Check:
        def __enter__(self):
            return self

        def __exit__(self, typ, exc, tb):
            assert exc is not None, f"expected errno {errno.errorcode[code]}"
            assert isinstance(exc, OSError), exc
            assert exc.errno == code, f"{exc} (wanted {errno.errorcode[code]})"
            return True

    return _Check()


def test_mount_file_write_read_stat(mnt: Path):
    path = mnt / "hello.txt"
    path.write_bytes(b"hello world")
    assert path.read_bytes() == b"hello world"
    st = path.stat()
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == 11
    assert st.st_nlink == 1
    assert st.st_uid == os.getuid()
    with open(path, "r+b") as f:
        f.seek(6)
        f.write(b"WORLD")
    assert path.read_bytes() == b"hello WORLD"
    assert path.stat().st_ino == st.st_ino


def test_mount_directories_and_listing(mnt: Path):
    (mnt / "d").mkdir(mode=0o750)
    assert stat.S_IMODE((mnt / "d").stat().st_mode) == 0o750 & ~_umask()
    names = {f"f{i:04}" for i in range(600)}
    for name in names:
        (mnt / "d" / name).write_bytes(name.encode())
    assert set(os.listdir(mnt / "d")) == names
    listing = subprocess.run(["ls", "-a", mnt / "d"], capture_output=True, text=True).stdout
    assert listing.split()[:2] == [".", ".."]
    assert (mnt / "d" / "..").stat().st_ino == mnt.stat().st_ino
    with os.scandir(mnt / "d") as it:
        entries = {e.name: e for e in it}
    assert entries["f0007"].is_file()
    assert entries["f0007"].stat().st_size == 5
    with raises_errno(errno.ENOTEMPTY):
        os.rmdir(mnt / "d")
    with raises_errno(errno.EEXIST):
        os.mkdir(mnt / "d")
    with raises_errno(errno.ENOTDIR):
        os.listdir(mnt / "d" / "f0001")
    with raises_errno(errno.EISDIR):
        os.unlink(mnt / "d")
    with raises_errno(errno.ENOENT):
        os.stat(mnt / "d" / "missing")
    for name in names:
        os.unlink(mnt / "d" / name)
    os.rmdir(mnt / "d")
    assert os.listdir(mnt) == []


def test_mount_names_too_long_and_unicode(mnt: Path):
    with raises_errno(errno.ENAMETOOLONG):
        (mnt / ("x" * 256)).write_bytes(b"")
    (mnt / ("y" * 255)).write_bytes(b"ok")
    nfd = "cafe\u0301"
    (mnt / nfd).write_bytes(b"nfd")
    assert (mnt / "caf\u00e9").read_bytes() == b"nfd"
    assert "caf\u00e9" in os.listdir(mnt)


def test_mount_rename_replace_noreplace_exchange(mnt: Path):
    (mnt / "a").write_bytes(b"A")
    (mnt / "b").write_bytes(b"B")
    (mnt / "sub").mkdir()
    os.rename(mnt / "a", mnt / "sub" / "a2")
    assert (mnt / "sub" / "a2").read_bytes() == b"A"
    assert not (mnt / "a").exists()
    with raises_errno(errno.EEXIST):
        renameat2(mnt / "sub" / "a2", mnt / "b", RENAME_NOREPLACE)
    renameat2(mnt / "sub" / "a2", mnt / "b", RENAME_EXCHANGE)
    assert (mnt / "b").read_bytes() == b"A"
    assert (mnt / "sub" / "a2").read_bytes() == b"B"
    renameat2(mnt / "b", mnt / "c", RENAME_NOREPLACE)
    os.replace(mnt / "sub" / "a2", mnt / "c")  # over an existing file
    assert (mnt / "c").read_bytes() == b"B"
    assert os.listdir(mnt / "sub") == []
    with raises_errno(errno.ENOENT):
        renameat2(mnt / "c", mnt / "nothing", RENAME_EXCHANGE)
    with raises_errno(errno.EINVAL):
        os.rename(mnt / "sub", mnt / "sub" / "inside")
    (mnt / "sub2").mkdir()
    (mnt / "sub2" / "x").write_bytes(b"")
    with raises_errno(errno.ENOTEMPTY):
        os.rename(mnt / "sub", mnt / "sub2")
    os.unlink(mnt / "sub2" / "x")
    os.rename(mnt / "sub", mnt / "sub2")  # over an empty directory
    assert sorted(os.listdir(mnt)) == ["c", "sub2"]


def test_mount_links_and_symlinks(mnt: Path):
    (mnt / "f").write_bytes(b"data")
    os.link(mnt / "f", mnt / "g")
    assert (mnt / "f").stat().st_nlink == 2
    assert (mnt / "f").stat().st_ino == (mnt / "g").stat().st_ino
    (mnt / "g").write_bytes(b"changed")
    assert (mnt / "f").read_bytes() == b"changed"
    os.unlink(mnt / "f")
    assert (mnt / "g").stat().st_nlink == 1
    os.symlink("g", mnt / "s")
    assert os.readlink(mnt / "s") == "g"
    assert (mnt / "s").read_bytes() == b"changed"
    assert stat.S_ISLNK(os.lstat(mnt / "s").st_mode)
    assert os.lstat(mnt / "s").st_size == 1
    os.symlink("/nowhere/at/all", mnt / "dangling")
    assert os.readlink(mnt / "dangling") == "/nowhere/at/all"
    (mnt / "d").mkdir()
    with raises_errno(errno.EPERM):
        os.link(mnt / "d", mnt / "d2")


def test_mount_special_files(mnt: Path):
    os.mkfifo(mnt / "fifo", 0o640)
    assert stat.S_ISFIFO((mnt / "fifo").stat().st_mode)
    os.mknod(mnt / "fifo2", stat.S_IFIFO | 0o600)
    assert stat.S_ISFIFO((mnt / "fifo2").stat().st_mode)
    os.mknod(mnt / "sock", stat.S_IFSOCK | 0o600)
    assert stat.S_ISSOCK((mnt / "sock").stat().st_mode)
    os.mknod(mnt / "plain", stat.S_IFREG | 0o600)
    assert stat.S_ISREG((mnt / "plain").stat().st_mode)
    if os.geteuid() == 0:
        os.mknod(mnt / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        st = (mnt / "null").stat()
        assert stat.S_ISCHR(st.st_mode)
        assert os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    # a FIFO on the mount works as a pipe (the kernel runs it)
    writer = subprocess.Popen(
        [sys.executable, "-c", f"open({str(mnt / 'fifo')!r}, 'w').write('through')"]
    )
    try:
        with open(mnt / "fifo") as f:
            assert f.read() == "through"
    finally:
        writer.wait(10)


def test_mount_setattr_chmod_chown_utime_truncate(mnt: Path):
    path = mnt / "f"
    path.write_bytes(b"0123456789")
    os.chmod(path, 0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    if os.geteuid() == 0:
        os.chown(path, 1234, 5678)
        assert (path.stat().st_uid, path.stat().st_gid) == (1234, 5678)
        os.chown(path, 0, 0)
    os.utime(path, ns=(1_000_000_000, 1_500_000_000_123))
    assert path.stat().st_mtime_ns == 1_500_000_000_123
    os.truncate(path, 4)
    assert path.read_bytes() == b"0123"
    os.truncate(path, 8)
    assert path.read_bytes() == b"0123\0\0\0\0"
    with open(path, "r+b") as f:
        os.ftruncate(f.fileno(), 2)
        assert os.fstat(f.fileno()).st_size == 2
    assert path.read_bytes() == b"01"
    os.utime(path, ns=(0, 0))
    os.utime(path)  # now (the kernel's coarse clock)
    assert abs(path.stat().st_mtime_ns - time.time_ns()) < 2e9


def test_mount_append_and_trunc(mnt: Path):
    path = mnt / "log"
    path.write_bytes(b"one\n")
    with open(path, "ab") as f:
        f.write(b"two\n")
    a = os.open(path, os.O_WRONLY | os.O_APPEND)
    b = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(a, b"three\n")
        os.write(b, b"four\n")  # its own offset is stale: O_APPEND writes at the end
        os.write(a, b"five\n")
    finally:
        os.close(a)
        os.close(b)
    assert path.read_bytes() == b"one\ntwo\nthree\nfour\nfive\n"
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert path.stat().st_size == 0
    path.write_bytes(b"x" * 1000)
    with open(path, "wb") as f:  # O_TRUNC through open(2)
        f.write(b"short")
    assert path.read_bytes() == b"short"


def test_mount_reader_sees_what_a_write_only_handle_wrote(mnt: Path):
    # write-only handles bypass the page cache (direct I/O): a reader that holds the
    # file open with its pages cached, the last one partial, still reads the new bytes
    path = mnt / "shared-log"
    path.write_bytes(b"a" * 5000)
    with open(path, "rb", buffering=0) as r:
        assert r.read() == b"a" * 5000
        w = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(w, b"B" * 100, 10)
            os.pwrite(w, b"C" * 3000, 5000)
        finally:
            os.close(w)
        assert os.fstat(r.fileno()).st_size == 8000
        assert os.pread(r.fileno(), 8192, 0) == b"a" * 10 + b"B" * 100 + b"a" * 4890 + b"C" * 3000
    assert path.read_bytes() == b"a" * 10 + b"B" * 100 + b"a" * 4890 + b"C" * 3000


def test_mount_sparse_file(mnt: Path):
    path = mnt / "sparse"
    with open(path, "wb") as f:
        f.write(b"head")
        f.seek(5 * 1024 * 1024)
        f.write(b"tail")
    assert path.stat().st_size == 5 * 1024 * 1024 + 4
    with open(path, "rb") as f:
        assert f.read(4) == b"head"
        f.seek(3 * 1024 * 1024)
        assert f.read(4096) == bytes(4096)
        f.seek(5 * 1024 * 1024)
        assert f.read() == b"tail"


def test_mount_mmap_write_read(mnt: Path):
    path = mnt / "mapped"
    path.write_bytes(bytes(3 * 4096))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[4096:4101] = b"hello"
        m.flush()
        assert m[4096:4101] == b"hello"
    with open(path, "rb") as f:
        f.seek(4096)
        assert f.read(5) == b"hello"
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[4096:4101] == b"hello"
        assert len(m) == 3 * 4096


def test_mount_unlinked_file_stays_readable_through_handle(mnt: Path):
    path = mnt / "doomed"
    path.write_bytes(b"still here")
    with open(path, "r+b") as f:
        os.unlink(path)
        assert not path.exists()
        assert os.fstat(f.fileno()).st_nlink == 0
        assert f.read() == b"still here"
        f.write(b"!")
        f.seek(0)
        assert f.read() == b"still here!"
    (mnt / "target").write_bytes(b"old")
    (mnt / "new").write_bytes(b"new")
    with open(mnt / "target", "rb") as f:
        os.replace(mnt / "new", mnt / "target")  # rename over an open file
        assert f.read() == b"old"
    assert (mnt / "target").read_bytes() == b"new"


def test_mount_xattrs(mnt: Path):
    path = mnt / "x"
    path.write_bytes(b"abc")
    os.setxattr(path, "user.color", b"blue")
    assert os.getxattr(path, "user.color") == b"blue"
    assert {"user.color", "user.loft.state", "user.loft.cached_bytes"} <= set(os.listxattr(path))
    assert os.getxattr(path, "user.loft.state") in (b"pending", b"cached")
    os.removexattr(path, "user.color")
    with raises_errno(errno.ENODATA):
        os.getxattr(path, "user.color")
    with raises_errno(errno.ENODATA):
        os.removexattr(path, "user.color")
    with raises_errno(errno.EPERM):
        os.setxattr(path, "user.loft.state", b"cached")
    with raises_errno(errno.EPERM):
        os.removexattr(path, "user.loft.state")
    with raises_errno(errno.EOPNOTSUPP):
        os.setxattr(path, "trusted.thing", b"1")
    # other namespaces are unsupported, not merely empty: `ls -l` then stops asking
    # each file for its SELinux label and ACL after the first
    for name in ("security.selinux", "system.posix_acl_access"):
        with raises_errno(errno.EOPNOTSUPP):
            os.getxattr(path, name)
    (mnt / "dir").mkdir()
    os.setxattr(mnt / "dir", "user.tag", b"")
    assert os.getxattr(mnt / "dir", "user.tag") == b""
    assert os.getxattr(mnt / "dir", "user.loft.state") in (b"pending", b"cached")
    assert wait_for(lambda: os.getxattr(mnt / "dir", "user.loft.state") == b"cached", 15)


def test_mount_loft_state_after_upload(shared_mount, mnt: Path):
    path = mnt / "synced"
    data = os.urandom(300_000)
    path.write_bytes(data)
    assert wait_for(lambda: os.getxattr(path, "user.loft.state") == b"cached", timeout=15)
    assert int(os.getxattr(path, "user.loft.cached_bytes")) == len(data)


def test_mount_statfs(mnt: Path):
    st = os.statvfs(mnt)
    assert st.f_namemax == 255
    assert st.f_bavail > 0
    assert st.f_blocks >= st.f_bavail
    assert st.f_bsize == 4096


def test_mount_locks_are_local(mnt: Path):
    path = mnt / "locked"
    path.write_bytes(b"")
    with open(path, "r+b") as a, open(path, "r+b") as b:
        fcntl.flock(a.fileno(), fcntl.LOCK_EX)
        with pytest.raises(BlockingIOError):
            fcntl.flock(b.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(a.fileno(), fcntl.LOCK_UN)
        fcntl.flock(b.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(a.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # same process: allowed


def test_mount_fsync_and_big_copy(mnt: Path, tmp_path: Path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(12 * 1024 * 1024 + 17))
    dst = mnt / "copy.bin"
    with open(src, "rb") as s, open(dst, "wb") as d:
        while block := s.read(1 << 20):
            d.write(block)
        d.flush()
        os.fsync(d.fileno())
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_size == src.stat().st_size


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
