"""Real programs on a real mount: git, SQLite in WAL mode, tar, rsync and cp -al.

These programs use the file system the way users' tools do (temp files renamed over
others, fsync, mmap'd shared memory, hard links, many small files, utimes), so they
catch what single-syscall tests miss. Each compares its result with the source or
asks the program itself to verify it (git fsck, PRAGMA integrity_check).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.mount.conftest import Cluster

# a real source tree from the interpreter's standard library: ~40 files in a few folders
SOURCE_TREE = Path(json.__file__).parent.parent / "email"


def run(args: Sequence[str | Path], cwd: Path | None = None, **env: str) -> str:
    """Runs a program; fails the test with its output when it exits non-zero."""
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} exited {result.returncode}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}"
    )
    return result.stdout


def diff_trees(a: Path, b: Path) -> None:
    result = subprocess.run(["diff", "-r", str(a), str(b)], capture_output=True, text=True)
    assert result.returncode == 0, f"trees differ:\n{result.stdout}{result.stderr}"


_COUNT_ROWS = (
    "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]);"
    "print(c.execute('SELECT count(*) FROM t').fetchone()[0])"
)

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.org",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.org",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_programs_git_init_commit_gc_fsck_log(mnt: Path):
    repo = mnt / "repo"
    git = ["git", "-C", repo]
    run(["git", "init", "-q", "-b", "main", repo], **GIT_ENV)
    for i in range(5):
        (repo / f"file{i}.txt").write_text(f"content {i}\n" * (i + 1) * 100)
        (repo / "sub").mkdir(exist_ok=True)
        (repo / "sub" / f"blob{i}.bin").write_bytes(os.urandom(50_000 + i))
        run([*git, "add", "-A"], **GIT_ENV)
        run([*git, "commit", "-q", "-m", f"commit {i}"], **GIT_ENV)
    # an edit, a rename and a delete in one commit
    (repo / "file0.txt").write_text("rewritten\n")
    run([*git, "mv", "file1.txt", "renamed.txt"], **GIT_ENV)
    run([*git, "rm", "-q", "sub/blob0.bin"], **GIT_ENV)
    run([*git, "commit", "-q", "-a", "-m", "edit, rename, delete"], **GIT_ENV)

    # gc packs the loose objects (temp files, renames, unlinks of many objects)
    run([*git, "gc", "-q", "--aggressive", "--prune=now"], **GIT_ENV)
    assert list((repo / ".git" / "objects" / "pack").glob("*.pack"))
    run([*git, "fsck", "--full", "--strict"], **GIT_ENV)
    log = run([*git, "log", "--format=%s"], **GIT_ENV).splitlines()
    assert log == ["edit, rename, delete", *(f"commit {i}" for i in reversed(range(5)))]
    assert run([*git, "status", "--porcelain"], **GIT_ENV) == ""
    # a clone out of the mount has the same content
    clone = mnt / "clone"
    run(["git", "clone", "-q", repo, clone], **GIT_ENV)
    assert (clone / "renamed.txt").read_text() == "content 1\n" * 200
    assert (clone / "file0.txt").read_text() == "rewritten\n"
    assert not (clone / "sub" / "blob0.bin").exists()
    run(["git", "-C", clone, "fsck", "--full"], **GIT_ENV)


def _integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def test_programs_sqlite_wal_transactions_survive_remount(cluster: Cluster):
    (home,) = cluster.account()
    m = cluster.mount(home)
    db = m.path / "app.db"
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, blob BLOB)")
        conn.execute("CREATE INDEX t_name ON t(name)")
        expected = {}
        for tx in range(20):
            conn.execute("BEGIN")
            for j in range(50):
                key = tx * 50 + j
                payload = os.urandom(200 + key % 3000)
                conn.execute("INSERT INTO t VALUES (?, ?, ?)", (key, f"n{key % 97}", payload))
                expected[key] = payload
            if tx % 4 == 3:  # updates and deletes rewrite pages in the middle of the file
                conn.execute("DELETE FROM t WHERE id % 7 = ?", (tx % 7,))
                for key in [k for k in expected if k % 7 == tx % 7]:
                    del expected[key]
                conn.execute("UPDATE t SET name = name || 'x' WHERE id % 5 = 0")
            conn.execute("COMMIT")
            if tx == 10:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # a second connection sees the same data through the shared-memory index
        other = sqlite3.connect(db)
        try:
            assert other.execute("SELECT count(*) FROM t").fetchone()[0] == len(expected)
        finally:
            other.close()
        # so does another process, while the WAL still holds commits (shared mmap of -shm)
        conn.execute("INSERT INTO t VALUES (99999, 'wal', x'01')")
        expected[99999] = b"\x01"
        assert (m.path / "app.db-wal").stat().st_size > 0
        count = run([sys.executable, "-c", _COUNT_ROWS, db])
        assert int(count) == len(expected)
    finally:
        conn.close()  # the last close checkpoints and removes the -wal and -shm files
    assert _integrity(db) == "ok"
    # the sqlite3 CLI agrees, when installed
    if shutil.which("sqlite3"):
        out = run(["sqlite3", db, "PRAGMA integrity_check; SELECT count(*) FROM t;"])
        assert out.split() == ["ok", str(len(expected))]

    m.stop()
    m.start()
    assert _integrity(db) == "ok"
    conn = sqlite3.connect(db)
    try:
        rows = dict(conn.execute("SELECT id, blob FROM t"))
        assert rows == expected
        # and it stays writable after the remount
        conn.execute("INSERT INTO t VALUES (100000, 'after', x'00')")
        conn.commit()
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def test_programs_tar_extract_source_tree(mnt: Path, tmp_path: Path):
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(SOURCE_TREE, arcname="email", filter=_no_pycache)
    # the reference: the same archive extracted onto the local disk
    local = tmp_path / "local"
    local.mkdir()
    run(["tar", "-xf", archive, "-C", local])
    run(["tar", "-xf", archive, "-C", mnt])
    diff_trees(local / "email", mnt / "email")
    _assert_same_metadata(local / "email", mnt / "email", mtimes=True)
    # and tar reading it back from the mount produces the same listing
    listing = run(["tar", "-tvf", archive])
    packed = tmp_path / "back.tar"
    run(["tar", "-cf", packed, "-C", mnt, "email"])
    assert sorted(run(["tar", "-tvf", packed]).splitlines()) == sorted(listing.splitlines())


def test_programs_rsync_archive_onto_mount(mnt: Path, tmp_path: Path):
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed")
    src = tmp_path / "src"
    shutil.copytree(SOURCE_TREE, src, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    os.symlink("big.bin", src / "link")
    os.chmod(src / "big.bin", 0o640)
    run(["rsync", "-a", f"{src}/", mnt / "dst"])
    diff_trees(src, mnt / "dst")
    _assert_same_metadata(src, mnt / "dst", mtimes=True)
    assert os.readlink(mnt / "dst" / "link") == "big.bin"
    # a second run after local edits transfers the delta in place and with temp files
    (src / "big.bin").write_bytes(os.urandom(1024) + (src / "big.bin").read_bytes()[1024:])
    # rsync's quick check compares size and whole-second mtime: make the edit visible to it
    os.utime(src / "big.bin", (1_600_000_000, 1_600_000_000))
    (src / "new.txt").write_text("new\n")
    os.unlink(src / "charset.py")
    run(["rsync", "-a", "--delete", f"{src}/", mnt / "dst"])
    diff_trees(src, mnt / "dst")
    # --inplace with the delta algorithm rewrites ranges in the middle of the old file
    data = bytearray((src / "big.bin").read_bytes())
    data[1_500_000:1_500_100] = os.urandom(100)
    (src / "big.bin").write_bytes(bytes(data) + b"tail")
    os.utime(src / "big.bin", (1_600_000_100, 1_600_000_100))
    run(["rsync", "-a", "--inplace", "--no-whole-file", f"{src}/", mnt / "dst"])
    diff_trees(src, mnt / "dst")
    _assert_same_metadata(src, mnt / "dst", mtimes=True)


def test_programs_cp_al_hard_links_share_inodes(mnt: Path):
    src = mnt / "orig"
    shutil.copytree(SOURCE_TREE, src, ignore=shutil.ignore_patterns("__pycache__"))
    run(["cp", "-al", src, mnt / "linked"])
    diff_trees(src, mnt / "linked")
    files = [p for p in src.rglob("*") if p.is_file()]
    assert len(files) > 20
    for path in files:
        twin = mnt / "linked" / path.relative_to(src)
        a, b = path.stat(), twin.stat()
        assert a.st_ino == b.st_ino, path
        assert a.st_nlink == b.st_nlink == 2, path
    # a write through one name shows through the other; unlinking one keeps the other
    target = files[0]
    twin = mnt / "linked" / target.relative_to(src)
    with open(twin, "ab") as f:
        f.write(b"# appended through the link\n")
    assert target.read_bytes() == twin.read_bytes()
    os.unlink(target)
    assert twin.stat().st_nlink == 1
    assert twin.read_bytes().endswith(b"# appended through the link\n")
    # a second generation of links: three names for each remaining file
    run(["cp", "-al", mnt / "linked", mnt / "linked2"])
    for path in files[1:]:
        rel = path.relative_to(src)
        assert (mnt / "linked2" / rel).stat().st_nlink == 3
        assert (mnt / "linked2" / rel).stat().st_ino == path.stat().st_ino
    shutil.rmtree(mnt / "orig")
    for path in files[1:]:
        assert (mnt / "linked2" / path.relative_to(src)).stat().st_nlink == 2


def _no_pycache(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if "__pycache__" in info.name else info


def _assert_same_metadata(a: Path, b: Path, mtimes: bool) -> None:
    """Same names, kinds, sizes, permission bits and (optionally) mtimes."""
    for root, dirs, files in os.walk(a):
        for name in dirs + files:
            pa = Path(root) / name
            pb = b / pa.relative_to(a)
            sa, sb = os.lstat(pa), os.lstat(pb)
            assert sa.st_mode == sb.st_mode, (pb, oct(sa.st_mode), oct(sb.st_mode))
            if os.path.isfile(pa) and not os.path.islink(pa):
                assert sa.st_size == sb.st_size, pb
            if mtimes and not os.path.isdir(pa) and not os.path.islink(pa):
                assert sa.st_mtime_ns // 1000 == sb.st_mtime_ns // 1000, pb
