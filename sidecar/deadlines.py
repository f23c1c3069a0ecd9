"""Deadlines on one awaited future: a lighter `asyncio.timeout` for the per-request waits.

I/O shell helper. A connection that waits for bytes waits on one future; a
timer that fails that future with `TimeoutError` ends the wait without
cancelling the task (no Timeout object, no cancel/uncancel bookkeeping),
which matters on a path every request takes several times.
"""

from __future__ import annotations

import asyncio


def time_out(waiter: asyncio.Future[None]) -> None:
    """Timer callback: the wait on `waiter` ends with TimeoutError."""
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def arm(
    loop: asyncio.AbstractEventLoop, deadline: float | None, waiter: asyncio.Future[None]
) -> asyncio.TimerHandle | None:
    """A timer failing `waiter` at `deadline` (loop time); None when there is no deadline.
    Cancel it once the wait is over."""
    return None if deadline is None else loop.call_at(deadline, time_out, waiter)
