"""What `loft status` reports, computed from the store (opened read-only, so it works
while a mount runs) and from `state.json`, which a running session rewrites every
second with what only it knows: whether the server answers, since when, and which
files have writes not yet journaled.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import trio

from cache.records import Flag, Kind, Node
from cache.store import Store, Txn

STATE_FILE = "state.json"
CONFLICT_MARK = " (conflicted copy "


@dataclass
class Pending:
    operations: int = 0
    files: int = 0
    bytes: int = 0


@dataclass
class Status:
    user: str
    server: str
    device: str
    running: bool
    mountpoint: str | None
    online: bool | None
    since: float | None
    reason: str
    last_sync: float | None
    pending: Pending = field(default_factory=Pending)
    conflicts: int = 0
    cache_used: int = 0
    cache_cap: int | None = None
    pinned_bytes: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state(home: Path) -> dict | None:
    """The running session's state, or None when no session runs."""
    try:
        state = json.loads((home / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state if pid_alive(state.get("pid", 0)) else None


def pending_of(t: Txn, unjournaled: list[tuple[str, str]]) -> Pending:
    nodes: set[tuple[str, str]] = set(unjournaled)
    journal = t.journal()
    for _, p in journal:
        nodes.add((p.space, p.node))
    size = 0
    files = 0
    for space, node_id in nodes:
        node = t.node(space, node_id)
        if node is not None and node.kind == Kind.FILE:
            files += 1
            if node.flags & Flag.DIRTY or node.flags & Flag.LOCAL:
                size += node.size
    return Pending(operations=len(journal), files=files, bytes=size)


def conflicts(t: Txn) -> int:
    count = 0
    for space in t.spaces():
        for node in t.nodes(space):
            if node.kind == Kind.FILE and any(CONFLICT_MARK in name
                                              for _, name in t.entries_of(space, node.id)):
                count += 1
    return count


def status(home: Path, config) -> Status:
    state = read_state(home)
    store = Store(home / "store", readonly=True)
    try:
        with store.read() as t:
            unjournaled = [tuple(k) for k in (state or {}).get("unjournaled", [])]
            result = Status(
                user=config.user, server=config.server, device=config.device_name,
                running=state is not None, mountpoint=(state or {}).get("mountpoint"),
                online=(state or {}).get("online"), since=(state or {}).get("since"),
                reason=(state or {}).get("reason", ""),
                last_sync=t.meta_int("last_sync_ms", 0) / 1000 or None,
                pending=pending_of(t, unjournaled), conflicts=conflicts(t),
                cache_used=t.cache_bytes(), cache_cap=(state or {}).get("cache_cap"),
                pinned_bytes=t.pinned_bytes(),
            )
    finally:
        store.close()
    return result


def file_state(t: Txn, node: Node, pending: bool) -> tuple[str, int]:
    """(state, cached bytes) of one node: conflict, pending, cached, partial or
    online-only."""
    cached = t.held_bytes(node)
    if any(CONFLICT_MARK in name for _, name in t.entries_of(node.space, node.id)):
        return "conflict", cached
    if pending or node.flags & (Flag.DIRTY | Flag.LOCAL):
        return "pending", cached
    if node.kind != Kind.FILE or cached >= node.size:
        return "cached", cached
    return ("partial" if cached else "online-only"), cached


async def run_state_writer(home: Path, replica, extra: dict,
                           task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Rewrites state.json every second for `loft status` (atomically, by rename)."""
    path = home / STATE_FILE
    task_status.started()
    try:
        while True:
            net = replica.net
            state = {"pid": os.getpid(), "online": net.online, "since": net.since,
                     "reason": net.reason, "updated": time.time(),
                     "unjournaled": [list(k) for k in replica.state.unjournaled], **extra}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(path)
            await trio.sleep(1.0)
    finally:
        path.unlink(missing_ok=True)
