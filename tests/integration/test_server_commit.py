"""Chunks, commits and trees against a real server process."""

from __future__ import annotations

import os
import threading
import time

from loft.protocol import ROOT_NODE
from tests.api import Api, create, mkdir, new_id, update
from tests.serverproc import ServerProcess


def test_chunk_upload_commit_tree(api: Api):
    u = api.signup()
    a = api.put_chunk(u, u.home, b"hello ")
    b = api.put_chunk(u, u.home, b"world")
    docs = mkdir(ROOT_NODE, "docs")
    f = create(docs["node"], "greeting.txt", [a, b])
    res = api.commit_ok(u, u.home, [docs, f])
    assert (res["first_seq"], res["last_seq"], res["seqs"]) == (1, 2, [1, 2])
    tree = api.tree(u, u.home)
    assert set(tree) == {"docs", "docs/greeting.txt"}
    assert tree["docs/greeting.txt"]["size"] == 11
    assert tree["docs/greeting.txt"]["chunks"] == [list(a), list(b)]
    got = api.get_batch(u, u.home, [a[0], b[0], "0" * 64])
    assert got == {a[0]: b"hello ", b[0]: b"world", "0" * 64: None}
    r = api.get(u, f"/v1/spaces/{u.home}/chunks/{a[0]}")
    assert r.status_code == 200 and r.content == b"hello "


def test_missing_reports_only_absent_chunks(api: Api):
    u = api.signup()
    a = api.put_chunk(u, u.home, b"present")
    r = api.post(u, f"/v1/spaces/{u.home}/chunks/missing", json={"ids": [a[0], "ab" * 32]})
    assert r.json() == {"ids": ["ab" * 32]}


def test_batch_put_then_commit(api: Api):
    u = api.signup()
    refs = api.put_batch(u, u.home, [os.urandom(4096) for _ in range(50)])
    ops = [create(ROOT_NODE, f"f{i}", [ref]) for i, ref in enumerate(refs)]
    api.commit_ok(u, u.home, ops)
    assert len(api.tree(u, u.home)) == 50


def test_two_commits_on_one_base_exactly_one_wins(server: ServerProcess):
    with Api(server.url) as api:
        u = api.signup()
        f = create(ROOT_NODE, "shared.txt", [api.put_chunk(u, u.home, b"v0")])
        base = api.commit_ok(u, u.home, [f])["last_seq"]
        contents = [api.put_chunk(u, u.home, f"v{i}".encode()) for i in range(1, 9)]
    results: list[int] = []
    barrier = threading.Barrier(len(contents))

    def race(ref):
        with Api(server.url) as mine:
            barrier.wait()
            r = mine.commit(u, u.home, [update(f["node"], base, [ref])])
            results.append(r.status_code)
            if r.status_code == 409:
                detail = r.json()["details"][0]
                assert detail["code"] == "stale_base" and detail["current"] > base

    threads = [threading.Thread(target=race, args=(c,)) for c in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] + [409] * (len(contents) - 1)


def test_rejected_batch_reports_each_op_and_applies_nothing(api: Api):
    u = api.signup()
    api.commit_ok(u, u.home, [mkdir(ROOT_NODE, "taken")])
    head = api.get(u, f"/v1/spaces/{u.home}").json()["head"]
    ok = mkdir(ROOT_NODE, "fine")
    r = api.commit(
        u, u.home, [ok, mkdir(ROOT_NODE, "taken"), create(ROOT_NODE, "x", [("cd" * 32, 5)])]
    )
    assert r.status_code == 409
    body = r.json()
    assert body["code"] == "conflict"
    assert [d["code"] for d in body["details"]] == ["ok", "name_taken", "missing_chunks"]
    assert api.get(u, f"/v1/spaces/{u.home}").json()["head"] == head
    assert set(api.tree(u, u.home)) == {"taken"}


def test_commit_retry_with_same_id_is_not_applied_twice(api: Api):
    u = api.signup()
    op = mkdir(ROOT_NODE, "once")
    cid = new_id()
    first = api.commit(u, u.home, [op], commit_id=cid).json()
    again = api.commit(u, u.home, [op], commit_id=cid).json()
    assert again["replayed"] and again["last_seq"] == first["last_seq"]
    assert api.get(u, f"/v1/spaces/{u.home}").json()["head"] == first["last_seq"]


def test_move_link_unlink_rmdir(api: Api):
    u = api.signup()
    a, b = mkdir(ROOT_NODE, "a"), mkdir(ROOT_NODE, "b")
    f = create(a["node"], "f", [api.put_chunk(u, u.home, b"data")])
    seq = api.commit_ok(u, u.home, [a, b, f])["last_seq"]
    api.commit_ok(
        u,
        u.home,
        [
            {"op": "link", "node": f["node"], "parent": b["node"], "name": "hard"},
            {
                "op": "move",
                "node": f["node"],
                "parent": a["node"],
                "name": "f",
                "new_parent": ROOT_NODE,
                "new_name": "top",
            },
        ],
    )
    assert set(api.tree(u, u.home)) == {"a", "b", "b/hard", "top"}
    # rmdir of a non-empty folder is refused; a move into its own subtree too
    r = api.commit(
        u, u.home, [{"op": "rmdir", "node": b["node"], "parent": ROOT_NODE, "name": "b"}]
    )
    assert r.json()["details"][0]["code"] == "not_empty"
    r = api.commit(
        u,
        u.home,
        [
            {
                "op": "move",
                "node": a["node"],
                "parent": ROOT_NODE,
                "name": "a",
                "new_parent": a["node"],
                "new_name": "x",
            }
        ],
    )
    assert r.json()["details"][0]["code"] == "cycle"
    # unlinking one of two names keeps the node; the last one sends it to the trash
    api.commit_ok(
        u,
        u.home,
        [{"op": "unlink", "node": f["node"], "parent": ROOT_NODE, "name": "top", "base": seq}],
    )
    assert set(api.tree(u, u.home)) == {"a", "b", "b/hard"}
    api.commit_ok(
        u,
        u.home,
        [
            {"op": "unlink", "node": f["node"], "parent": b["node"], "name": "hard", "base": seq},
            {"op": "rmdir", "node": b["node"], "parent": ROOT_NODE, "name": "b"},
        ],
    )
    assert set(api.tree(u, u.home)) == {"a"}
    trash = api.get(u, f"/v1/spaces/{u.home}/trash").json()["items"]
    assert {(t["name"], t["node"]) for t in trash} >= {("hard", f["node"])}


def test_rename_over_and_exchange(api: Api):
    u = api.signup()
    x = create(ROOT_NODE, "x", [api.put_chunk(u, u.home, b"x")])
    y = create(ROOT_NODE, "y", [api.put_chunk(u, u.home, b"y")])
    api.commit_ok(u, u.home, [x, y])
    move = {
        "op": "move",
        "node": x["node"],
        "parent": ROOT_NODE,
        "name": "x",
        "new_parent": ROOT_NODE,
        "new_name": "y",
    }
    assert api.commit(u, u.home, [move]).json()["details"][0]["code"] == "name_taken"
    res = api.commit_ok(u, u.home, [{**move, "exchange": True}, {**move, "name": "y"}])
    assert res["seqs"][1] is None  # renaming onto itself changes nothing
    tree = api.tree(u, u.home)
    assert tree["x"]["node"] == y["node"] and tree["y"]["node"] == x["node"]
    api.commit_ok(u, u.home, [{**move, "name": "y", "new_name": "x", "replace": y["node"]}])
    assert {p: s["node"] for p, s in api.tree(u, u.home).items()} == {"x": x["node"]}


def test_delete_against_newer_edit_is_refused(api: Api):
    u = api.signup()
    f = create(ROOT_NODE, "f", [api.put_chunk(u, u.home, b"1")])
    base = api.commit_ok(u, u.home, [f])["last_seq"]
    api.commit_ok(u, u.home, [update(f["node"], base, [api.put_chunk(u, u.home, b"2")])])
    r = api.commit(
        u,
        u.home,
        [{"op": "unlink", "node": f["node"], "parent": ROOT_NODE, "name": "f", "base": base}],
    )
    assert r.status_code == 409 and r.json()["details"][0]["code"] == "stale_base"


def test_versions_restore_and_tree_at_seq(api: Api):
    u = api.signup()
    v1 = api.put_chunk(u, u.home, b"first")
    f = create(ROOT_NODE, "doc", [v1])
    s1 = api.commit_ok(u, u.home, [f])["last_seq"]
    s2 = api.commit_ok(u, u.home, [update(f["node"], s1, [api.put_chunk(u, u.home, b"2nd")])])[
        "last_seq"
    ]
    versions = api.get(u, f"/v1/spaces/{u.home}/nodes/{f['node']}/versions").json()
    assert [(v["version"], v["current"]) for v in versions["versions"]] == [(s2, True), (s1, False)]
    assert api.tree(u, u.home, at=s1)["doc"]["chunks"] == [list(v1)]
    api.commit_ok(
        u,
        u.home,
        [{"op": "unlink", "node": f["node"], "parent": ROOT_NODE, "name": "doc", "base": s2}],
    )
    assert api.tree(u, u.home) == {}
    api.commit_ok(u, u.home, [{"op": "restore", "node": f["node"], "version": s1}])
    doc = api.tree(u, u.home)["doc"]
    assert doc["chunks"] == [list(v1)] and doc["size"] == 5
    old = api.get(u, f"/v1/spaces/{u.home}/nodes/{f['node']}/versions/{s1}").json()
    assert old["chunks"] == [list(v1)]


def test_quota_counts_current_versions(tmp_path):
    small = ServerProcess(tmp_path / "small", "--quota", "100").start()
    try:
        with Api(small.url) as api:
            u = api.signup()
            big = api.put_chunk(u, u.home, b"x" * 80)
            more = api.put_chunk(u, u.home, b"y" * 30)
            f = create(ROOT_NODE, "a", [big])
            base = api.commit_ok(u, u.home, [f])["last_seq"]
            r = api.commit(u, u.home, [create(ROOT_NODE, "b", [more])])
            assert r.json()["details"][0]["code"] == "quota_exceeded"
            # replacing the content frees what the old version used
            api.commit_ok(u, u.home, [update(f["node"], base, [more])])
            api.commit_ok(u, u.home, [create(ROOT_NODE, "b", [more])])
    finally:
        small.stop()
    assert not small.log_problems()


def test_gc_collects_only_unreferenced_chunks(tmp_path):
    srv = ServerProcess(tmp_path / "gc", "--gc-grace", "0.2", "--gc-interval", "0.2").start()
    try:
        with Api(srv.url) as api:
            u = api.signup()
            kept = api.put_chunk(u, u.home, b"kept")
            dropped = api.put_chunk(u, u.home, b"dropped")
            api.commit_ok(u, u.home, [create(ROOT_NODE, "k", [kept])])
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                got = api.get_batch(u, u.home, [kept[0], dropped[0]])
                if got[dropped[0]] is None:
                    break
                time.sleep(0.1)
            assert got == {kept[0]: b"kept", dropped[0]: None}
    finally:
        srv.stop()
    assert not srv.log_problems()
