"""The local store's page index and its bound on the process's resident memory."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import lmdb
import pytest

from cache.records import PAGE_SIZE, Kind, Node, raw
from cache.spool import SPOOL_FROM
from cache.store import CHUNKS_CHECKED, MAP_BUDGET, RELEASE_EVERY, Store
from loft.protocol import ROOT_NODE

SPACE = str(uuid.uuid4())


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_pages_are_listed_and_deleted_by_node(tmp_path: Path):
    store = Store(tmp_path / "store")
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    with store.write() as t:
        for n in (0, 3, 7):
            t.put_page(SPACE, a, n, b"a%d" % n)
        t.put_page(SPACE, b, 1, b"b1")
    with store.read() as t:
        assert t.page_numbers(SPACE, a) == [0, 3, 7]
        assert t.page_numbers(SPACE, a, 4) == [7]
        assert t.page_numbers(SPACE, b) == [1]
    with store.write() as t:
        assert t.del_pages(SPACE, a, 3) == 2
    with store.read() as t:
        assert t.page_numbers(SPACE, a) == [0]
        assert t.page(SPACE, a, 3) is None and t.page(SPACE, a, 0) == b"a0"
        assert t.page(SPACE, b, 1) == b"b1"
    store.close()


def test_clean_pages_are_one_cache_entry_until_written_evicted_or_dropped(tmp_path: Path):
    store = Store(tmp_path / "store")
    a, b, other = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    with store.write() as t:
        for n in range(4):
            t.put_page(SPACE, a, n, b"a%d" % n)
        t.put_page(SPACE, b, 0, b"b0")
        assert t.keep_pages(SPACE, a, 4000) == 4
        assert t.keep_pages(SPACE, b, 100) == 1
        assert t.cache_bytes() == 4100
        t.put_page(SPACE, a, 2, b"A2")  # written again: dirty, the rest stay clean
    with store.read() as t:
        assert t.page_numbers(SPACE, a) == [0, 1, 2, 3]
        assert t.dirty_page_numbers(SPACE, a) == [2]
        assert t.pages_entry(SPACE, a).size == 4000
    with store.write() as t:
        t.touch_pages(SPACE, a)  # now b is the least recently used
        t.put_chunk(SPACE, "11" * 32, b"x" * 900)
        assert t.evict(4900) == 100
        assert t.page_numbers(SPACE, b) == [] and t.pages_entry(SPACE, b) is None
        assert t.drop_clean_pages(SPACE, a) == 3  # the dirty page stays
        assert t.page_numbers(SPACE, a) == [2] and t.page(SPACE, a, 2) == b"A2"
        assert t.cache_bytes() == 900
        # a space's mirror cleared: its clean pages go, dirty ones and chunks stay
        t.put_page(SPACE, other, 0, b"o0")
        t.keep_pages(SPACE, other, 50)
        t.put_page(SPACE, a, 3, b"A3")
        t.clear_space_tree(SPACE)
        assert t.page_numbers(SPACE, other) == [] and t.pages_entry(SPACE, other) is None
        assert t.page_numbers(SPACE, a) == [2, 3]
        assert t.cache_bytes() == 900
        # counted as its size, or its pages' if fewer (the rest was evicted meanwhile)
        t.keep_pages(SPACE, a, 10 * PAGE_SIZE)
        assert t.pages_entry(SPACE, a).size == 2 * PAGE_SIZE
        # all of a file's pages deleted: its entry goes with them
        assert t.del_pages(SPACE, a) == 2
        assert t.pages_entry(SPACE, a) is None and t.cache_bytes() == 900
    store.close()


def test_a_store_without_the_page_index_gets_one_when_opened(tmp_path: Path):
    store = Store(tmp_path / "store")
    node = str(uuid.uuid4())
    with store.write() as t:
        t.put_page(SPACE, node, 2, b"x")
        t.put_page(SPACE, node, 5, b"y")
        # as written before the index existed: pages only
        t.txn.drop(t.db["pagekeys"], delete=False)
    store.close()
    store = Store(tmp_path / "store")
    with store.read() as t:
        assert t.page_numbers(SPACE, node) == [2, 5]
    store.close()


def _store_with_chunks(tmp_path: Path, mib: int) -> tuple[Store, list[str]]:
    """A store caching `mib` MiB of 1 MiB chunks: (store, chunk ids)."""
    store = Store(tmp_path / "store")
    ids = [os.urandom(32).hex() for _ in range(mib)]
    with store.write() as t:
        for chunk_id in ids:
            t.put_chunk(SPACE, chunk_id, os.urandom(64) * (1 << 14))
    return store, ids


def test_reading_many_chunks_through_the_store_does_not_stay_resident(tmp_path: Path):
    store, ids = _store_with_chunks(tmp_path, 128)
    before = _rss_file_kib()
    with store.read(views=True) as t:
        for chunk_id in ids:
            assert t.chunk_view(SPACE, chunk_id) is not None
    read_growth = _rss_file_kib() - before
    store.close()
    limit_kib = 2 * RELEASE_EVERY // 1024  # 64 MiB
    assert read_growth < limit_kib, f"{read_growth} KiB stayed mapped after reading 128 MiB"


def test_map_pages_walked_without_a_count_are_released_past_the_budget(tmp_path: Path):
    # B-tree pages that cursors walk are not counted by `touched`; keep_under bounds them
    store, ids = _store_with_chunks(tmp_path, 96)
    store.mapped.release()
    assert not store.mapped.keep_under()  # measures the floor, as the mount does at start
    before = _rss_file_kib()
    with store.read() as t:  # raw reads: nothing is counted
        walked = sum(len(v) for _, v in t.txn.cursor(db=t.db["chunks"]))
    assert walked == len(ids) << 20
    grown = _rss_file_kib() - before
    assert grown > 64 * 1024, f"only {grown} KiB mapped: the test shows nothing"
    assert not store.mapped.keep_under(budget=1 << 40)
    assert store.mapped.keep_under(budget=MAP_BUDGET)
    store.close()


def _sealed(n: int) -> bytes:
    return b"\x01" + os.urandom(n - 1)


def test_full_pages_live_in_the_spool_and_short_ones_in_lmdb(tmp_path: Path):
    store = Store(tmp_path / "store")
    node = str(uuid.uuid4())
    full, short = _sealed(PAGE_SIZE + 29), _sealed(SPOOL_FROM - 1)
    with store.write() as t:
        t.put_page(SPACE, node, 0, full)
        t.put_page(SPACE, node, 1, short)
    with store.read() as t:
        assert t.page(SPACE, node, 0) == full
        assert t.page(SPACE, node, 1) == short
        assert len(t.txn.get(t._page_keys(raw(SPACE) + raw(node))[0], db=t.db["pages"])) < 64
    assert (tmp_path / "store" / "pages.spool").stat().st_size >= len(full)
    store.close()
    reopened = Store(tmp_path / "store", readonly=True)
    with reopened.read(views=True) as t:
        assert bytes(t.page_view(SPACE, node, 0)) == full
    reopened.close()


def test_a_freed_slot_is_reused_only_past_every_reader_that_may_see_it(tmp_path: Path):
    store = Store(tmp_path / "store")
    node = str(uuid.uuid4())
    first, second = _sealed(PAGE_SIZE), _sealed(PAGE_SIZE)
    with store.write() as t:
        t.put_page(SPACE, node, 0, first)
    with store.read() as old:
        with store.write() as t:
            t.del_pages(SPACE, node)
        for n in range(4):  # transactions enough to make the freeing durable
            with store.write() as t:
                t.put_page(SPACE, node, 1 + n, second)
        # the reader's snapshot still names the first page's slot: nothing took it
        assert old.page(SPACE, node, 0) == first
    with store.write() as t:
        t.put_page(SPACE, node, 9, second)
        slots = t.meta_int("spool_slots")
    assert slots == 5  # the freed slot was taken, not a sixth one
    with store.read() as t:
        assert [t.page(SPACE, node, n) for n in (1, 2, 3, 4, 9)] == [second] * 5
    store.close()


def test_a_slot_that_holds_another_page_fails_to_open(tmp_path: Path):
    from cache.codec import CorruptPage, DirtySealer

    sealer = DirtySealer(os.urandom(32))
    store = Store(tmp_path / "store")
    node = str(uuid.uuid4())
    with store.write() as t:
        t.put_page(SPACE, node, 0, sealer.seal(node, 0, b"a" * PAGE_SIZE))
        t.put_page(SPACE, node, 1, sealer.seal(node, 1, b"b" * PAGE_SIZE))
    with store.read() as t:
        assert sealer.open(node, 0, t.page(SPACE, node, 0)) == b"a" * PAGE_SIZE
    # slot 0 overwritten with a newer seal of the same page: its record's tag differs
    store.spool.write([(0, sealer.seal(node, 0, b"c" * PAGE_SIZE))])
    with store.read() as t, pytest.raises(CorruptPage):
        sealer.open(node, 0, t.page(SPACE, node, 0))
    store.close()


def test_a_store_whose_cache_may_hold_unchecked_blobs_is_not_trusted(tmp_path: Path):
    # Before cache hits skipped the content check, `loft pin` cached server blobs
    # without checking them: a store that held chunks then keeps full checks.
    store = Store(tmp_path / "store")
    assert store.chunks_checked  # new: empty
    with store.write() as t:
        t.del_meta(CHUNKS_CHECKED)  # as an older version left it
        t.put_chunk(SPACE, "ab" * 32, b"a blob cached by an older version")
    store.close()
    store = Store(tmp_path / "store")
    assert not store.chunks_checked
    with store.write() as t:
        t.delete_chunk(SPACE, "ab" * 32)
    store.close()
    store = Store(tmp_path / "store")
    assert store.chunks_checked  # its cache was empty at open
    store.close()
    readonly = Store(tmp_path / "store", readonly=True)
    assert readonly.chunks_checked
    readonly.close()


def test_the_tree_version_moves_with_nodes_and_entries_only(tmp_path: Path):
    store = Store(tmp_path / "store")
    node = Node(SPACE, str(uuid.uuid4()), Kind.FILE)
    seen = [store.tree_version]

    def moved() -> bool:
        seen.append(store.tree_version)
        return seen[-1] != seen[-2]

    with store.write() as t:
        t.set_meta("k", b"v")
        t.put_chunk(SPACE, "cd" * 32, b"blob")
    assert not moved()
    with store.write() as t:
        t.put_node(node)
    assert moved()
    with store.write() as t:
        t.add_entry(SPACE, ROOT_NODE, "f", node.id)
    assert moved()
    with store.write() as t:
        t.remove_entry(SPACE, ROOT_NODE, "f")
    assert moved()
    with pytest.raises(RuntimeError), store.write() as t:
        t.del_node(SPACE, node.id)
        raise RuntimeError("aborted: nothing changed")
    assert not moved()
    with store.write() as t:
        t.del_node(SPACE, node.id)
    assert moved()
    store.close()


def test_caching_a_chunk_again_counts_as_using_it(tmp_path: Path):
    # A save keeps chunks it shares with older files: those must not be the burst's
    # first to go when it evicts down to the cap.
    store = Store(tmp_path / "store")
    old, other = "ab" * 32, "cd" * 32
    with store.write() as t:
        assert t.put_chunk(SPACE, old, b"x" * 100)
        assert t.put_chunk(SPACE, other, b"y" * 100)
        assert not t.put_chunk(SPACE, old, b"x" * 100)
        assert t.evict(100) == 100
        assert t.chunk_meta(SPACE, old) is not None
        assert t.chunk_meta(SPACE, other) is None
    store.close()


def test_a_store_from_before_the_page_spool_opens_read_only(tmp_path: Path):
    # `loft status` opens the store read-only; one written before the spool's free-slot
    # database existed must open too (the mount adds the database)
    Store(tmp_path / "store").close()
    env = lmdb.open(str(tmp_path / "store"), max_dbs=32)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"freeslots", txn=txn), delete=True)
    env.close()
    readonly = Store(tmp_path / "store", readonly=True)
    with readonly.read() as t:
        assert t.page_numbers(SPACE, str(uuid.uuid4())) == []
    readonly.close()
