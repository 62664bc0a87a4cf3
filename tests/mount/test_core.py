"""The POSIX core without a kernel: a real session (real server), the core driven
directly, as the pyfuse3 adapter would."""

from __future__ import annotations

import errno
import os

import pytest

from cache.errors import Corrupt, NotFound, Offline
from cache.session import Session
from cache.store import StoreFull
from fs.core import ROOT_INODE, Core, NameTooLong, NoAttribute
from fs.errors import errno_of
from tests.mount.conftest import Cluster

# Closing a session while the reconciler's long-poll is sending its request body leaves
# httpx's request-body generator unfinalized (backend/http.py over httpcore on trio);
# the garbage collector then reports it. Not a mount problem; reported to the backend.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def home(cluster: Cluster):
    (home,) = cluster.account()
    return home


@pytest.fixture
def two_devices(cluster: Cluster):
    return cluster.account(devices=2)


def _accept(limit: int, seen: list):
    def reply(name: bytes, attrs, next_id: int) -> bool:
        if len(seen) >= limit:
            return False
        seen.append((name, attrs.ino, next_id))
        return True

    return reply


async def test_core_inode_numbers_are_stable_and_forget_releases(home):
    async with Session.open(home) as session:
        core = Core(session.replica, home)
        attrs = core.mkdir(ROOT_INODE, b"d", 0o755, 0, 0)
        assert attrs.ino > ROOT_INODE
        assert core.lookup(ROOT_INODE, b"d").ino == attrs.ino
        core.forget([(attrs.ino, 2)])
        with pytest.raises(NotFound):
            core.key_of(attrs.ino)
        assert core.lookup(ROOT_INODE, b"d").ino == attrs.ino  # same number again
        assert Core(session.replica).lookup(ROOT_INODE, b"d").ino == attrs.ino  # remount
        core.forget([(ROOT_INODE, 1)])
        assert core.getattr(ROOT_INODE).ino == ROOT_INODE


async def test_core_keep_cache_only_while_content_unchanged(home):
    async with Session.open(home) as session:
        core = Core(session.replica, home)
        fh, attrs = core.create(ROOT_INODE, b"f", 0o644, os.O_WRONLY, 0, 0)
        await core.write(fh, 0, b"abc")
        core.release(fh)
        fh, keep = await core.open(attrs.ino, os.O_RDONLY)
        assert not keep  # written since it was opened
        core.release(fh)
        fh, keep = await core.open(attrs.ino, os.O_RDONLY)
        assert keep
        assert await core.read(fh, 0, 10) == b"abc"
        core.release(fh)
        await core.setattr(attrs.ino, size=1)
        fh, keep = await core.open(attrs.ino, os.O_RDONLY)
        assert not keep
        core.release(fh)


async def test_core_readdir_offsets_never_skip_or_repeat(home):
    async with Session.open(home) as session:
        core = Core(session.replica, home)
        for i in range(10):
            core.forget([(core.mkdir(ROOT_INODE, f"e{i}".encode(), 0o755, 0, 0).ino, 1)])
        fh = core.opendir(ROOT_INODE)
        first: list = []
        core.readdir(fh, 0, _accept(5, first))
        assert [n for n, _, _ in first[:2]] == [b".", b".."]
        first = first[2:]
        core.rmdir(ROOT_INODE, b"e5")
        core.mkdir(ROOT_INODE, b"e0a", 0o755, 0, 0)
        rest: list = []
        core.readdir(fh, first[-1][2], _accept(100, rest))
        names = [n for n, _, _ in first + rest]
        assert names == [f"e{i}".encode() for i in range(10)]
        core.releasedir(fh)
        # each accepted entry counted as a lookup: the kernel may forget each once
        core.forget([(ino, 1) for _, ino, _ in first + rest])


def _listed(core: Core, ino: int) -> dict:
    """name: attrs of a whole listing, without the dots."""
    seen: list = []
    fh = core.opendir(ino)
    core.readdir(fh, 0, lambda name, attrs, next_id: seen.append((name, attrs)) or True)
    core.releasedir(fh)
    return dict(seen[2:])


async def test_core_relists_an_unchanged_directory_from_memory_and_sees_every_change(home):
    async with Session.open(home) as session:
        core = Core(session.replica, home)
        core.present_entries_as(lambda attrs: [attrs])  # as the adapter: its own objects
        d = core.mkdir(ROOT_INODE, b"d", 0o755, 0, 0)
        fh, f = core.create(d.ino, b"f", 0o644, os.O_RDWR, 0, 0)
        core.mkdir(d.ino, b"sub", 0o755, 0, 0)
        first = _listed(core, d.ino)
        assert set(first) == {b"f", b"sub"} and first[b"f"][0].size == 0
        again = _listed(core, d.ino)
        assert again[b"f"] is first[b"f"]  # kept, not rebuilt
        await core.write(fh, 0, b"12345")
        assert _listed(core, d.ino)[b"f"][0].size == 5
        core.rmdir(d.ino, b"sub")
        assert set(_listed(core, d.ino)) == {b"f"}
        # a change the core did not make (the reconciler applies remote ones the same way)
        space, d_node = core.key_of(d.ino)
        session.replica.mkdir(space, d_node, "from elsewhere")
        listed = _listed(core, d.ino)
        assert set(listed) == {b"f", b"from elsewhere"}
        core.link(f.ino, ROOT_INODE, b"f2")
        assert _listed(core, d.ino)[b"f"][0].nlink == 2
        core.release(fh)


async def test_core_listing_gives_colliding_nodes_distinct_numbers(home, monkeypatch):
    # every node hashes to one number: the kept listing built both entries with it
    monkeypatch.setattr("fs.core._hash_ino", lambda key: 1000)
    async with Session.open(home) as session:
        core = Core(session.replica, home)
        d = core.mkdir(ROOT_INODE, b"d", 0o755, 0, 0)
        space, d_node = core.key_of(d.ino)
        for name in ("x", "y"):
            session.replica.mkdir(space, d_node, name)
        listed = _listed(core, d.ino)
        assert len({attrs.ino for attrs in listed.values()} | {d.ino}) == 3
        for name, attrs in listed.items():
            assert core.lookup(d.ino, name).ino == attrs.ino  # the number it was counted as


async def test_core_unlinked_file_lives_until_released_and_forgotten(home):
    async with Session.open(home) as session:
        core = Core(session.replica, home)
        r = session.replica
        fh, attrs = core.create(ROOT_INODE, b"gone", 0o644, os.O_RDWR, 0, 0)
        await core.write(fh, 0, b"bytes")
        core.unlink(ROOT_INODE, b"gone")
        assert core.getattr(attrs.ino).nlink == 0
        assert await core.read(fh, 0, 100) == b"bytes"
        core.release(fh)
        assert core.getattr(attrs.ino).size == 5  # still known to the kernel
        key = core.key_of(attrs.ino)
        core.forget([(attrs.ino, 1)])
        await session.sync()
        with pytest.raises(NotFound):
            r.node(*key)


async def test_core_reads_as_of_the_version_the_kernel_knows_until_it_hears_of_a_cut(
    two_devices,
):
    """A remote change cuts a file short after the kernel last heard of its size. A read
    within that size gets the version the kernel knows (a short answer there would make
    the kernel fill its pages with zeros and keep them as the file's), until the kernel
    is given the new attributes."""
    home_a, home_b = two_devices
    x0 = os.urandom(300_000)
    async with Session.open(home_a) as a, Session.open(home_b) as b:
        writer = Core(a.replica, home_a)
        fh, written = writer.create(ROOT_INODE, b"doc", 0o644, os.O_WRONLY, 0, 0)
        await writer.write(fh, 0, x0)
        writer.release(fh)
        await a.sync()
        await b.sync()
        core = Core(b.replica, home_b)
        b.replica.listeners.append(core.remote_change)
        ino = core.lookup(ROOT_INODE, b"doc").ino  # the kernel hears of 300,000 bytes
        fh, _ = await core.open(ino, os.O_RDONLY)
        assert await core.read(fh, 0, 1 << 20) == x0
        await writer.setattr(written.ino, size=10)
        await a.sync()
        await b.sync()  # applied on B; the kernel has not asked since
        assert b.replica.node(*core.key_of(ino)).size == 10
        assert await core.read(fh, 0, 1 << 20) == x0
        assert await core.read(fh, 131072, 131072) == x0[131072:262144]
        assert core.getattr(ino).size == 10  # now it knows
        assert await core.read(fh, 0, 1 << 20) == x0[:10]
        core.release(fh)


async def test_core_space_wide_invalidation_names_every_known_inode(home):
    async with Session.open(home) as session:
        core = Core(session.replica, home)
        d = core.mkdir(ROOT_INODE, b"d", 0o755, 0, 0)
        _, f = core.create(d.ino, b"f", 0o644, os.O_RDONLY, 0, 0)
        inodes, entries = core.kernel_targets(([(session.replica.home, "*")], []))
        assert set(inodes) == {ROOT_INODE, d.ino, f.ino}
        assert set(entries) == {(ROOT_INODE, b"d"), (d.ino, b"f")}
        space, node = core.key_of(f.ino)
        inodes, entries = core.kernel_targets(
            ([(space, node)], [(space, core.key_of(d.ino)[1], "f")])
        )
        assert inodes == [f.ino] and entries == [(d.ino, b"f")]


async def test_core_xattrs_and_names(home):
    async with Session.open(home) as session:
        core = Core(session.replica, home)
        with pytest.raises(NameTooLong):
            core.mkdir(ROOT_INODE, b"n" * 256, 0o755, 0, 0)
        d = core.mkdir(ROOT_INODE, b"d", 0o755, 0, 0)
        with pytest.raises(NoAttribute):
            core.getxattr(d.ino, b"user.none")
        core.setxattr(d.ino, b"user.k", b"v")
        assert core.getxattr(d.ino, b"user.k") == b"v"
        assert core.getxattr(d.ino, b"user.loft.state") == b"pending"
        await session.sync()
        assert core.getxattr(d.ino, b"user.loft.state") == b"cached"


def test_errors_table_maps_domain_errors():
    assert errno_of(NotFound("x")) == errno.ENOENT
    assert errno_of(NameTooLong("x")) == errno.ENAMETOOLONG
    assert errno_of(Offline("x")) == errno.EIO
    assert errno_of(Corrupt("x")) == errno.EIO
    assert errno_of(StoreFull("x")) == errno.ENOSPC
    assert errno_of(NoAttribute("x")) == errno.ENODATA
    assert errno_of(ValueError("bug")) is None


def test_errors_guard_turns_bugs_into_logged_eio(allow_error_logs, caplog):
    import pyfuse3

    from fs.errors import errnos

    with pytest.raises(pyfuse3.FUSEError) as info, errnos("read"):
        raise KeyError("a bug")
    assert info.value.errno == errno.EIO
    assert any("a bug" in r.exc_text or "read failed" in r.getMessage() for r in caplog.records)
    with pytest.raises(pyfuse3.FUSEError) as info, errnos("lookup"):
        raise NotFound("x")
    assert info.value.errno == errno.ENOENT
