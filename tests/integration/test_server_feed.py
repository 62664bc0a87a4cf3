"""The change feed, restarts and crash atomicity against a real server process."""

from __future__ import annotations

import statistics
import threading
import time

from loft.protocol import ROOT_NODE
from tests.api import Api, create, mkdir
from tests.serverproc import ServerProcess


def test_long_poll_wakes_quickly_on_another_devices_commit(server: ServerProcess):
    """The parked poll is woken by the commit itself, not by a timer: its answer
    comes within milliseconds of the commit's acknowledgement. Measured from the
    acknowledgement, so that the commit's own disk sync does not count; judged on the
    median, so that one scheduling hiccup on a busy machine does not decide it."""
    with Api(server.url) as api:
        laptop = api.signup()
        phone = api.login(laptop.name)
        after_ack: list[float] = []
        for i in range(5):
            head = api.get(phone, f"/v1/spaces/{laptop.home}").json()["head"]
            answer: dict = {}

            def poll(head: int = head, answer: dict = answer) -> None:
                with Api(server.url) as mine:
                    answer.update(mine.changes(phone, {laptop.home: head}, wait=30))
                    answer["at"] = time.monotonic()

            t = threading.Thread(target=poll)
            t.start()
            time.sleep(0.3)  # the poll is parked
            api.commit_ok(laptop, laptop.home, [mkdir(ROOT_NODE, f"d{i}")])
            acknowledged = time.monotonic()
            t.join(10)
            assert not t.is_alive()
            after_ack.append(answer["at"] - acknowledged)
            changes = answer["spaces"][laptop.home]["changes"]
            assert [c["name"] for c in changes] == [f"d{i}"]
        assert statistics.median(after_ack) < 0.05, after_ack
        assert max(after_ack) < 1, after_ack


def test_long_poll_times_out_empty(api: Api):
    u = api.signup()
    started = time.monotonic()
    body = api.changes(u, {u.home: 0}, wait=0.5)
    assert 0.5 <= time.monotonic() - started < 2
    assert body["spaces"][u.home] == {"changes": [], "cursor": 0, "more": False}


def test_feed_paginates_ten_thousand_entries(api: Api):
    u = api.signup()
    for start in range(0, 10_000, 2_500):
        api.commit_ok(
            u, u.home, [mkdir(ROOT_NODE, f"n{i:05}") for i in range(start, start + 2_500)]
        )
    seen: list[int] = []
    cursor, pages = 0, 0
    while True:
        page = api.changes(u, {u.home: cursor}, limit=3000)["spaces"][u.home]
        seen += [c["seq"] for c in page["changes"]]
        cursor, pages = page["cursor"], pages + 1
        if not page["more"]:
            break
    assert seen == list(range(1, 10_001)) and pages == 4


def test_feed_reports_spaces_not_asked_for(api: Api):
    u = api.signup()
    assert api.changes(u, {})["unknown_spaces"] == [u.home]


def test_everything_committed_survives_restart(server: ServerProcess):
    with Api(server.url) as api:
        u = api.signup()
        ref = api.put_chunk(u, u.home, b"durable")
        api.commit_ok(u, u.home, [create(ROOT_NODE, "keep", [ref])])
        before = api.tree(u, u.home)
    server.kill()  # not even a clean shutdown
    server.start()
    with Api(server.url) as api:
        assert api.tree(u, u.home) == before
        assert api.get_batch(u, u.home, [ref[0]]) == {ref[0]: b"durable"}
        assert api.get(u, "/v1/devices").status_code == 200


def test_sigkill_during_batch_commit_is_all_or_nothing(server: ServerProcess):
    with Api(server.url) as api:
        u = api.signup()
    outcomes = []
    # A 5,000-op commit takes ~0.4 s here: kill before, during and after it.
    for attempt, delay in enumerate([0.02, 0.2, 0.3, 0.4, 0.5, 2.0]):
        ops = [mkdir(ROOT_NODE, f"a{attempt}-{i}") for i in range(5000)]

        def send(ops: list = ops) -> None:
            try:
                with Api(server.url) as mine:
                    mine.commit(u, u.home, ops)
            except Exception:  # the server dies under it
                pass

        t = threading.Thread(target=send)
        t.start()
        time.sleep(delay)
        server.kill()
        t.join()
        server.start()
        with Api(server.url) as api:
            names = {p for p in api.tree(u, u.home) if p.startswith(f"a{attempt}-")}
            head = api.get(u, f"/v1/spaces/{u.home}").json()["head"]
            seqs = [
                c["seq"]
                for c in api.changes(u, {u.home: 0}, limit=5000)["spaces"][u.home]["changes"]
            ]
        assert len(names) in (0, 5000)
        assert seqs == list(range(1, min(head, 5000) + 1))
        outcomes.append(len(names))
    assert outcomes[0] == 0 and outcomes[-1] == 5000, outcomes
