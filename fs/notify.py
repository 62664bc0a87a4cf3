"""Kernel invalidations for remote changes, sent from one background task.

The replica calls `listen` (a `Replica.listeners` entry) from wherever it applies a
remote change, possibly inside a request's call chain. Sending the invalidation there
could deadlock the mount (the kernel may wait for the very request in flight), so
`listen` only queues; `run` sends, in order, outside every handler and lock:
`invalidate_inode` (attributes and pages) in a worker thread, because it can block
until a read of that inode completes, which needs the trio thread; and
`invalidate_entry_async`, which pyfuse3 queues to its own thread.

If the queue overflows, the next batch invalidates everything the kernel knows.
"""

from __future__ import annotations

import logging

import pyfuse3
import trio

from cache.replica import Invalidation
from fs.core import Core

log = logging.getLogger(__name__)

QUEUE = 1024


def _invalidate_inodes(inodes: list[int]) -> None:
    """Runs in a worker thread: drops attributes and cached pages of each inode."""
    for ino in inodes:
        try:
            pyfuse3.invalidate_inode(ino)
        except OSError as exc:  # FileNotFoundError: the kernel has forgotten it
            log.debug("invalidate_inode(%d): %s", ino, exc)


class KernelNotifier:
    def __init__(self, core: Core) -> None:
        self.core = core
        self._send, self._recv = trio.open_memory_channel[Invalidation](QUEUE)
        self._overflow = False
        self.sent = 0

    def listen(self, inv: Invalidation) -> None:
        """Queues an invalidation; never blocks, never touches the kernel."""
        try:
            self._send.send_nowait(inv)
        except trio.WouldBlock:
            self._overflow = True

    def _everything(self) -> Invalidation:
        return [(space, "*") for space in self.core.known_spaces()], []

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for inv in self._recv:
            if self._overflow:
                self._overflow = False
                inv = self._everything()
            inodes, entries = self.core.kernel_targets(inv)
            for parent, name in entries:
                pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
            if inodes:
                await trio.to_thread.run_sync(_invalidate_inodes, inodes)
            self.sent += len(inodes) + len(entries)
            log.debug("invalidated %d inodes, %d entries", len(inodes), len(entries))
