"""In-process wake-ups for long-polls: one instance. A waiter registers before it reads
the journal, so a commit that lands between its read and its wait still wakes it."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import trio


class Notifier:
    def __init__(self) -> None:
        self._waiters: dict[str, set[trio.Event]] = defaultdict(set)

    def notify_space(self, space_id: str) -> None:
        self._wake(f"s:{space_id}")

    def notify_user(self, user_id: int) -> None:
        """A membership of the user changed (a space appeared or went away)."""
        self._wake(f"u:{user_id}")

    def _wake(self, key: str) -> None:
        for event in self._waiters.pop(key, ()):
            event.set()

    @contextmanager
    def watch(self, space_ids: Iterable[str], user_id: int) -> Iterator[trio.Event]:
        """An event set at the next commit to any of the spaces or membership change."""
        event = trio.Event()
        keys = [f"s:{s}" for s in space_ids] + [f"u:{user_id}"]
        for key in keys:
            self._waiters[key].add(event)
        try:
            yield event
        finally:
            for key in keys:
                waiters = self._waiters.get(key)
                if waiters is not None:
                    waiters.discard(event)
                    if not waiters:
                        del self._waiters[key]

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())
