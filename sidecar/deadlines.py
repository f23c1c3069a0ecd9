"""Deadlines on one awaited future: a lighter `asyncio.timeout` for the per-request waits.

I/O shell helper. A connection that waits for bytes waits on one future; a
timer that completes that future with True ends the wait without cancelling
the task (no Timeout object, no cancel/uncancel bookkeeping), which matters on
a path every request takes several times. A wake-up by bytes completes it with
False. The timeout is a result, not an exception set on the future: a future
holding an exception holds its traceback, whose frames hold the future, and
that cycle (with the request it reaches) would wait for the cyclic collector.

The timer outlives the wait it was set for: a keep-alive connection's next wait
has a later deadline, and the timer set for an earlier one, when it goes off,
is set again for the deadline of the wait then pending (if any). A timer is made
and cancelled about once per timeout period, not once per request.

`wait` hands out that future itself, not a coroutine awaiting it: the task that
awaits it suspends and resumes through one frame fewer (twice per request).
"""

from __future__ import annotations

import asyncio

#: What a connection waits on: False when woken by its peer, True when its deadline passed.
Waiter = asyncio.Future[bool]


class Wakeup:
    """The one wait of a connection for its peer: `wait` until `wake` (bytes, EOF, a close)
    or a deadline, whichever comes first. The client and the worker connections each hold
    one; a wake with nobody waiting is nothing (the waiter looks at its buffers first)."""

    __slots__ = ("_deadline", "_loop", "_timer", "_timer_at", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: Waiter | None = None
        self._deadline: float | None = None  # the pending wait's (loop time)
        #: set at `_timer_at`: never later than the pending wait's deadline (it may be an
        #: earlier wait's, sooner), or None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    def wait(self, deadline: float | None) -> Waiter:
        """The next `wake`, to await: True when `deadline` (loop time) passed first, else
        False. Once done (or cancelled with the task awaiting it) it is left here, and a
        wake or the timer finding it done does nothing, as when nobody waits."""
        waiter = self._waiter = self._loop.create_future()
        self._deadline = deadline
        if deadline is not None and (self._timer is None or self._timer_at > deadline):
            self._set_timer(deadline)
        return waiter

    def _set_timer(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(deadline, self._went_off)
        self._timer_at = deadline

    def _went_off(self) -> None:
        """The timer: the pending wait times out when it was set for that wait's deadline;
        a wait with a later one has it set again, for that."""
        self._timer = None
        waiter, deadline = self._waiter, self._deadline
        if waiter is None or waiter.done() or deadline is None:
            return
        if deadline <= self._timer_at:
            waiter.set_result(True)
        else:
            self._set_timer(deadline)

    def close(self) -> None:
        """No more waits: the timer (if one is left) is cancelled."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
