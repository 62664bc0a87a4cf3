"""Running coroutines side by side with plain exceptions.

Trio nurseries raise an ExceptionGroup even for one failing child; the services here
want the first error itself (a BackendError the caller can classify), so `gather`
cancels the siblings and re-raises that one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio


async def gather(*jobs: Callable[[], Awaitable[object]]) -> None:
    """Runs the jobs concurrently; on the first exception cancels the rest and raises it."""
    errors: list[BaseException] = []

    async with trio.open_nursery() as nursery:

        async def run(job: Callable[[], Awaitable[object]]) -> None:
            try:
                await job()
            except Exception as exc:  # handed to the caller below
                errors.append(exc)
                nursery.cancel_scope.cancel()

        for job in jobs:
            nursery.start_soon(run, job)
    if errors:
        raise errors[0]
