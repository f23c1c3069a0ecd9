"""A finished request is freed by reference counting, never left for the cyclic collector.

What it is for: a request's objects (its exchange, response pump, body handler,
translator, h11 state and the bodies they hold) must go the moment the request is
over. Objects caught in a reference cycle wait for a cyclic collection instead,
which the daemon runs rarely (see `runtime.tune_gc`): until then every finished
request's bodies stay in memory and each new request's objects land in cold
memory rather than in the blocks the last one just freed.

How: the daemon's own `Service` (real listening socket, real worker connection
pool) runs in this test's event loop, in front of a real fake worker
(tests.harness, its own thread, loopback sockets); clients on blocking sockets in
threads make requests of every shape the daemon handles (JSON, relayed stream,
JSON -> SSE, SSE -> JSON, a worker that dies mid-stream, a client that leaves
mid-stream or before the worker's head, errors before the head, every timeout,
keep-alive) with the cyclic collector switched off, and then no exchange, pump,
handler or translator of theirs may be alive. Idle keep-alive connections hold
nothing of their last request either.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time
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
    free_port,
    json_reply,
    openai_handler,
    request_bytes,
    sse_reply,
)

REQUEST_TYPES = (Exchange, ResponsePump, BodyHandler, StreamTranslator, DocumentTranslator)


#: Request objects some earlier test in this process still holds: not this test's to judge
#: (kept referenced here, so no new object can take one's identity).
_BEFORE: list[object] = []


def alive() -> list[str]:
    """This test's request objects still alive (the collector is off: cycles would keep
    them); an exchange says how far it got."""
    before = {id(o) for o in _BEFORE}
    left = [o for o in gc.get_objects() if isinstance(o, REQUEST_TYPES) and id(o) not in before]
    return sorted(
        f"Exchange(outcome={o.outcome}, finished={o._finished}, client closed={o.client.closed}"
        f", eof={o.client.eof})" if isinstance(o, Exchange) else type(o).__name__
        for o in left
    )


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    _BEFORE[:] = [o for o in gc.get_objects() if isinstance(o, REQUEST_TYPES)]
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        _BEFORE.clear()


async def exchange(port: int, data: bytes, *, leave_after: int | None = None) -> bytes:
    """Send `data` on a new connection and read until the daemon closes it (or, with
    `leave_after`, close it ourselves once that many bytes came). A blocking socket in a
    thread: a client of its own, outside the daemon's event loop."""
    return await asyncio.to_thread(_exchange, port, data, leave_after)


def _exchange(port: int, data: bytes, leave_after: int | None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        got = b""
        while True:
            more = sock.recv(65536)
            got += more
            if not more or (leave_after is not None and len(got) >= leave_after):
                return got


def _send_and_leave(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        time.sleep(0.1)


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
                chat_route("dead", match={"path": "/dead/v1/chat/completions"},
                           upstream={"url": f"http://127.0.0.1:{free_port()}"}),
                chat_route("slow", match={"path": "/slow/v1/chat/completions"},
                           upstream={"url": worker.url, "response_timeout": "200ms",
                                     "idle_timeout": "200ms"}),
                {"name": "rest", "match": {"path_prefix": "/v1/"}, "dialect": "passthrough"},
            ],
            limits={"header_timeout": "300ms"},
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
        count = len(worker.requests) + 1
        await exchange(port, closing(chat, chat_body(stream=True)), leave_after=1)
        await worker_hung_up(worker, count)
        assert await wait_until_empty() == []
        worker.reply([Stall()])  # ... before the worker's head: the exchange's task is cancelled
        await asyncio.to_thread(_send_and_leave, port, closing(chat, chat_body(stream=True)))
        await worker_hung_up(worker, count + 1)
        assert await wait_until_empty() == []

        # answers given before any response head, and a passthrough route
        worker.reply(json_reply({"error": "busy"}, status=503))
        bad_json = request_bytes("POST", chat, b"{nope", [("connection", "close")])
        refused = [
            await exchange(port, bad_json),
            await exchange(port, closing("/dead" + chat, chat_body())),
            await exchange(port, closing(chat, chat_body(stream=True))),
        ]
        worker.reply(json_reply({"data": []}))
        models = request_bytes("GET", "/v1/models", None, [("connection", "close")])
        refused.append(await exchange(port, models))
        assert [a.split(b" ", 2)[1] for a in refused] == [b"400", b"502", b"503", b"200"]
        assert await wait_until_empty() == []

        # every timeout: no response head, silence mid-stream, a client's head too slow
        worker.reply([Stall()])
        late = await exchange(port, closing("/slow" + chat, chat_body()))
        worker.reply([*sse_reply(events[:2], end=False), Stall()])
        silent = await exchange(port, closing("/slow" + chat, chat_body(stream=True)))
        slow_head = await exchange(port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        assert late.split(b" ", 2)[1] == b"504" and b'"upstream_timeout"' in silent
        assert slow_head.split(b" ", 2)[1] == b"408"
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


async def worker_hung_up(worker: FakeWorker, count: int) -> None:
    """Wait until the daemon closed the worker connection of the `count`th request (SPEC: at
    once when the client goes away), however busy the machine is."""
    request = (await asyncio.to_thread(worker.wait_requests, count))[count - 1]
    assert await asyncio.to_thread(worker.wait_connection_closed, request)


async def wait_until_empty() -> list[str]:
    """The request objects alive once the loop has run what the last response left to do."""
    deadline = asyncio.get_running_loop().time() + 2.0  # well inside keepalive_timeout
    while (left := alive()) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    return left
