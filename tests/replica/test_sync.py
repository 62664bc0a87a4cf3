"""Two replicas of one account stay in sync through a real server."""

from __future__ import annotations

from cache.session import Session
from loft.protocol import ROOT_NODE as ROOT


async def read_all(session: Session, path: str) -> bytes:
    r = session.replica
    node = r.resolve(path)
    return await r.read(r.home, node.id, 0, node.size + 1)


async def test_replicas_sync_create_update_rename_delete(devices):
    a_home, b_home = await devices.add("laptop"), await devices.add("desk")
    async with Session.open(a_home) as a, Session.open(b_home) as b:
        ra, rb = a.replica, b.replica
        home = ra.home
        docs = ra.mkdir(home, ROOT, "docs")
        f = ra.create(home, docs.id, "hello.txt")
        await ra.write(home, f.id, 0, b"hello world")
        ra.flush(home, f.id)
        await a.sync()
        await b.sync()
        assert await read_all(b, "docs/hello.txt") == b"hello world"
        # update on B, rename on A
        g = rb.resolve("docs/hello.txt")
        await rb.write(home, g.id, 6, b"WORLD!")
        rb.flush(home, g.id)
        await b.sync()
        await a.sync()
        assert await read_all(a, "docs/hello.txt") == b"hello WORLD!"
        ra.rename(home, docs.id, "hello.txt", ROOT, "top.txt")
        ra.symlink(home, ROOT, "link", "top.txt")
        ra.link(home, f.id, docs.id, "hard.txt")
        await a.sync()
        await b.sync()
        assert await read_all(b, "top.txt") == b"hello WORLD!"
        assert await read_all(b, "docs/hard.txt") == b"hello WORLD!"
        assert rb.resolve("link").target == "top.txt"
        rb.unlink(home, ROOT, "top.txt")
        rb.unlink(home, docs.id, "hard.txt")
        await b.sync()
        await a.sync()
        assert [n for n, *_ in ra.readdir(home, docs.id)] == []
        assert sorted(n for n, *_ in ra.readdir(home, ROOT)) == ["docs", "link"]
