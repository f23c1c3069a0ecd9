"""Deadlines on one awaited future: a lighter `asyncio.timeout` for the per-request waits.

I/O shell helper. A connection that waits for bytes waits on one future; a
timer that completes that future with True ends the wait without cancelling
the task (no Timeout object, no cancel/uncancel bookkeeping), which matters on
a path every request takes several times. A wake-up by bytes completes it with
None. The timeout is a result, not an exception set on the future: a future
holding an exception holds its traceback, whose frames hold the future, and
that cycle (with the request it reaches) would wait for the cyclic collector.
"""

from __future__ import annotations

import asyncio

#: What a connection waits on: None when woken by its peer, True when its deadline passed.
Waiter = asyncio.Future[bool | None]


def time_out(waiter: Waiter) -> None:
    """Timer callback: the wait on `waiter` ends, timed out."""
    if not waiter.done():
        waiter.set_result(True)


def arm(
    loop: asyncio.AbstractEventLoop, deadline: float | None, waiter: Waiter
) -> asyncio.TimerHandle | None:
    """A timer ending the wait on `waiter` at `deadline` (loop time) with True; None when
    there is no deadline. Cancel it once the wait is over."""
    return None if deadline is None else loop.call_at(deadline, time_out, waiter)


class Wakeup:
    """The one wait of a connection for its peer: `wait` until `wake` (bytes, EOF, a close)
    or a deadline, whichever comes first. The client and the worker connections each hold
    one; a wake with nobody waiting is nothing (the waiter looks at its buffers first)."""

    __slots__ = ("_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: Waiter | None = None

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, deadline: float | None) -> bool:
        """Wait for the next `wake`; True when `deadline` (loop time) passed first."""
        waiter = self._waiter = self._loop.create_future()
        timer = arm(self._loop, deadline, waiter)
        try:
            return await waiter is True
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
