"""A finished request is freed by reference counting, never left for the cyclic collector.

What it is for: a request's objects (its exchange, response pump, body handler,
translator, h11 state and the bodies they hold) must go the moment the request is
over. Objects caught in a reference cycle wait for a cyclic collection instead,
which the daemon runs rarely (see `runtime.tune_gc`): until then every finished
request's bodies stay in memory and each new request's objects land in cold
memory rather than in the blocks the last one just freed.

How: the daemon's own `Service` (real listening socket, real worker connection
pool) runs in this test's event loop, in front of a real fake worker
(tests.harness, its own thread, loopback sockets); raw clients make requests of
every shape the daemon handles (JSON, relayed stream, JSON -> SSE, SSE -> JSON, a
worker that dies mid-stream, a client that leaves mid-stream, no route, keep-alive)
with the cyclic collector switched off, and then no exchange, pump or handler of
theirs may be alive. Idle keep-alive connections hold nothing of their last request
either.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop

from sidecar.config import config_from_dict
from sidecar.daemon import Service, open_sockets
from sidecar.dialects.base import DocumentTranslator, StreamTranslator
from sidecar.exchange import Exchange
from sidecar.handlers import BodyHandler
from sidecar.pump import ResponsePump
from sidecar.systemd import Notifier
from tests.harness import (
    FakeWorker,
    Reset,
    Stall,
    chat_body,
    chat_route,
    chat_stream_events,
    daemon_config,
    openai_handler,
    request_bytes,
    sse_reply,
)

REQUEST_TYPES = (Exchange, ResponsePump, BodyHandler, StreamTranslator, DocumentTranslator)


def alive() -> list[str]:
    """The request objects still alive (the collector is off: cycles would keep them)."""
    return sorted(type(o).__name__ for o in gc.get_objects() if isinstance(o, REQUEST_TYPES))


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def exchange(port: int, data: bytes, *, leave_after: int | None = None) -> bytes:
    """Send `data` on a new connection and read until the daemon closes it (or, with
    `leave_after`, close it ourselves once that many bytes came)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    got = b""
    try:
        while True:
            more = await asyncio.wait_for(reader.read(65536), 5)
            got += more
            if not more or (leave_after is not None and len(got) >= leave_after):
                return got
    finally:
        writer.close()


def closing(target: str, body: dict[str, Any] | None) -> bytes:
    return request_bytes("POST", target, body, [("connection", "close")])


async def run_requests(worker: FakeWorker, check: Any) -> None:
    config = config_from_dict(
        daemon_config(
            worker.url,
            admin_listen=None,
            routes=[
                chat_route(),
                chat_route("never", upstream_stream="never",
                           match={"path": "/never/v1/chat/completions"}),
                chat_route("always", upstream_stream="always",
                           match={"path": "/always/v1/chat/completions"}),
            ],
        )
    )
    service = Service(config, open_sockets(config), Notifier())
    await service.start()
    port = service.sockets.listen.getsockname()[1]
    try:
        await check(port)
    finally:
        service.stopping.set()
        await service.drain()


def test_finished_requests_leave_nothing_behind(worker: FakeWorker, no_collector: None) -> None:
    worker.default = openai_handler("vllm")
    events = chat_stream_events(["Hel", "lo", "!"], include_usage=True)

    async def check(port: int) -> None:
        chat = "/v1/chat/completions"
        answers = [
            await exchange(port, closing(chat, chat_body())),
            await exchange(port, closing(chat, chat_body(stream=True, include_usage=True))),
            await exchange(port, closing("/never" + chat, chat_body(stream=True))),
            await exchange(port, closing("/always" + chat, chat_body())),
            await exchange(port, closing("/nowhere", chat_body())),
        ]
        assert [a.split(b" ", 2)[1] for a in answers] == [b"200"] * 4 + [b"404"]
        assert b'"cost"' in answers[0] and answers[1].count(b"data: ") == len(events)
        worker.reply([*sse_reply(events[:2], end=False), Reset()])  # dies mid-stream
        failed = await exchange(port, closing(chat, chat_body(stream=True)))
        assert b'"upstream_disconnected"' in failed
        worker.reply([*sse_reply(events[:2], end=False), Stall()])  # the client leaves
        await exchange(port, closing(chat, chat_body(stream=True)), leave_after=1)
        assert await wait_until_empty() == []

        # keep-alive: a connection waiting for its next request holds none of the last one
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for body in (chat_body(), chat_body(stream=True)):
            writer.write(request_bytes("POST", chat, body))
            head = await reader.readuntil(b"\r\n\r\n")
            if b"content-length" in head:
                await reader.readexactly(int(head.split(b"content-length: ")[1].split(b"\r\n")[0]))
            else:
                await reader.readuntil(b"\r\n0\r\n\r\n")
            assert await wait_until_empty() == []
        writer.close()

    uvloop.run(run_requests(worker, check))


async def wait_until_empty() -> list[str]:
    """The request objects alive once the loop has run what the last response left to do."""
    deadline = asyncio.get_running_loop().time() + 1.0  # well inside keepalive_timeout
    while (left := alive()) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    return left
