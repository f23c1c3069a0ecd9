"""`Wakeup`: a wait ends at a wake (False) or at its own deadline (True), never at the
deadline of an earlier wait whose timer it inherited, and never later than its own."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from sidecar.deadlines import Wakeup


def _run(test: Callable[[asyncio.AbstractEventLoop, Wakeup], Awaitable[None]]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        wakeup = Wakeup(loop)
        try:
            await test(loop, wakeup)
        finally:
            wakeup.close()

    asyncio.run(main())


def test_a_wake_ends_the_wait() -> None:
    async def test(loop: asyncio.AbstractEventLoop, wakeup: Wakeup) -> None:
        loop.call_later(0.01, wakeup.wake)
        assert await wakeup.wait(loop.time() + 5) is False
        loop.call_later(0.01, wakeup.wake)
        assert await wakeup.wait(None) is False

    _run(test)


def test_the_deadline_ends_the_wait() -> None:
    async def test(loop: asyncio.AbstractEventLoop, wakeup: Wakeup) -> None:
        start = loop.time()
        assert await wakeup.wait(start + 0.05) is True
        assert loop.time() - start >= 0.04
        assert await wakeup.wait(loop.time() - 1) is True  # already passed

    _run(test)


def test_a_later_wait_is_not_ended_by_an_earlier_waits_timer() -> None:
    async def test(loop: asyncio.AbstractEventLoop, wakeup: Wakeup) -> None:
        start = loop.time()
        loop.call_later(0.01, wakeup.wake)
        assert await wakeup.wait(start + 0.05) is False  # its timer is left set at +0.05
        assert await wakeup.wait(start + 0.2) is True
        assert loop.time() - start >= 0.19
        loop.call_later(0.01, wakeup.wake)
        assert await wakeup.wait(start + 0.3) is False
        # no wait pending when the timer left at +0.3 goes off; the next one still waits
        await asyncio.sleep(0.15)
        loop.call_later(0.05, wakeup.wake)
        assert await wakeup.wait(loop.time() + 5) is False

    _run(test)


def test_an_earlier_deadline_than_the_timer_left_set() -> None:
    async def test(loop: asyncio.AbstractEventLoop, wakeup: Wakeup) -> None:
        loop.call_later(0.01, wakeup.wake)
        assert await wakeup.wait(loop.time() + 60) is False
        start = loop.time()
        assert await wakeup.wait(start + 0.05) is True
        assert loop.time() - start < 5

    _run(test)


def test_a_wait_without_deadline_outlasts_a_timer_left_set() -> None:
    async def test(loop: asyncio.AbstractEventLoop, wakeup: Wakeup) -> None:
        loop.call_later(0.01, wakeup.wake)
        assert await wakeup.wait(loop.time() + 0.05) is False
        loop.call_later(0.15, wakeup.wake)
        start = loop.time()
        assert await wakeup.wait(None) is False
        assert loop.time() - start >= 0.14

    _run(test)


def test_a_cancelled_wait_leaves_no_waiter() -> None:
    async def test(loop: asyncio.AbstractEventLoop, wakeup: Wakeup) -> None:
        async def waiting() -> bool:
            return await wakeup.wait(loop.time() + 0.05)

        task = loop.create_task(waiting())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.08)  # the timer goes off with nobody waiting
        start = loop.time()
        assert await wakeup.wait(start + 0.05) is True
        assert loop.time() - start >= 0.04

    _run(test)


def test_close_cancels_the_timer() -> None:
    async def test(loop: asyncio.AbstractEventLoop, wakeup: Wakeup) -> None:
        loop.call_later(0.01, wakeup.wake)
        assert await wakeup.wait(loop.time() + 60) is False
        timer = wakeup._timer
        assert timer is not None
        wakeup.close()
        assert timer.cancelled() and wakeup._timer is None

    _run(test)
