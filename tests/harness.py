"""Shared integration-test infrastructure: a programmable fake worker, the real daemon, raw clients.

What it is for: tests that start the real `sidecar run` process and a fake LLM
worker on loopback sockets and speak real HTTP/1.1 to both, down to the byte.

- `FakeWorker` is an HTTP/1.1 server on 127.0.0.1:0 (and optionally a unix
  socket) running its own asyncio loop in a background thread. Each request it
  receives is answered by a *handler* the test gives it: a list of `Step`s
  (send raw bytes, sleep, drip bytes one by one, blast a large body, close with
  FIN, reset with RST, stall) or a function of the request returning one. It
  records every request (method, target, headers, body, raw head) and every
  connection (accepted, closed by the peer), so a test can check keep-alive
  reuse and that the daemon closed a worker connection. Waiting is event
  driven: `FakeWorker.wait_until(predicate)` wakes on every change.
- Response builders (`http_response`, `json_reply`, `sse_reply`, ...) and
  OpenAI-shaped payloads in the flavours of real workers (`chat_stream_events`
  with `flavor="vllm" | "sglang" | "llamacpp" | "ollama" | "tgi"`,
  `chat_completion`, `text_completion_events`, ...), plus `openai_handler`, a
  handler that answers like a real worker from the request's own `stream`,
  `stream_options` and `n`.
- `Daemon` writes a YAML config (from a dict, see `daemon_config`) into a
  directory, starts `python -m sidecar run -c cfg` as a subprocess, learns its
  ports from the "listening on ..." log line, and exposes its URLs, ledger, log
  lines, RSS and signals.
- `RawClient` / `raw_exchange` / `read_response` for byte-level client checks.

A typical test (fixtures from tests/conftest.py)::

    def test_usage_hidden(worker, make_daemon):
        worker.default = openai_handler("vllm")          # answers like vLLM
        daemon = make_daemon(worker=worker, upstream={"idle_timeout": "1s"})
        response = post(daemon, chat_body(stream=True))   # raw socket, whole response
        assert response.sse_json()[-1] == "[DONE]"
        (request,) = worker.wait_requests(1)
        assert request.json()["stream_options"] == {"include_usage": True}

    worker.reply([*sse_reply(events[:2], end=False), Reset()])   # a worker that dies
    worker.reply([Stall()])                                      # ... or never answers
    assert worker.wait_peer_closed(1, timeout=1.0)               # the daemon hung up

What it must never do: mock a socket or a process, or import anything from
`sidecar` (the daemon is tested from the outside, as an operator runs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
#: Default bound for every wait in this module (seconds); tests pass smaller ones where it matters.
WAIT = 10.0

# =============================================================================================
# The fake worker
# =============================================================================================


@dataclass
class WorkerRequest:
    """One request as the fake worker received it (header names lower-cased, in order)."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes
    connection: int  # WorkerConnection.id it arrived on
    index: int  # 0-based position on that connection

    def header(self, name: str) -> str | None:
        """First value of header `name` (case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_names(self) -> set[str]:
        return {k for k, _ in self.headers}

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class WorkerConnection:
    """Bookkeeping of one accepted connection (read it under the worker's lock or after a wait)."""

    id: int
    transport: str  # "tcp" or "unix"
    requests: int = 0
    peer_closed: bool = False  # the daemon sent FIN or RST
    peer_reset: bool = False
    closed_by_us: bool = False
    bytes_sent: int = 0
    opened_at: float = field(default_factory=time.monotonic)
    peer_closed_at: float | None = None


class Step:
    """One action of a handler script, run on the worker's loop against a `WorkerIO`."""

    async def run(self, io: WorkerIO) -> None:
        raise NotImplementedError


@dataclass
class Send(Step):
    """Write these bytes (one write; waits for the transport to drain)."""

    data: bytes

    async def run(self, io: WorkerIO) -> None:
        await io.send(self.data)


@dataclass
class Drip(Step):
    """Write `data` in pieces of `size` bytes, one write each (a slow or byte-by-byte worker)."""

    data: bytes
    size: int = 1
    delay: float = 0.0

    async def run(self, io: WorkerIO) -> None:
        await io.drip(self.data, self.size, self.delay)


@dataclass
class Sleep(Step):
    """Stay silent for `seconds` (the connection stays open)."""

    seconds: float

    async def run(self, io: WorkerIO) -> None:
        await io.sleep(self.seconds)


@dataclass
class Close(Step):
    """Close the connection cleanly (FIN) after what was written so far."""

    async def run(self, io: WorkerIO) -> None:
        await io.close()


@dataclass
class Reset(Step):
    """Abort the connection with a TCP RST (SO_LINGER 0) after what was written so far."""

    settle: float = 0.05  # let the peer read the bytes written before the RST drops them

    async def run(self, io: WorkerIO) -> None:
        await io.reset(self.settle)


@dataclass
class Stall(Step):
    """Say nothing until the peer closes the connection (or the worker stops)."""

    async def run(self, io: WorkerIO) -> None:
        await io.wait_peer_closed()


@dataclass
class Blast(Step):
    """Write `total` bytes of `fill` in `chunk`-sized writes, each after the transport drained.

    With a peer that stops reading, the writes block once the socket buffers
    are full: `WorkerConnection.bytes_sent` then shows how far the worker got.
    """

    total: int
    chunk: int = 64 * 1024
    fill: bytes = b"x"
    # stops early once the peer has closed (a real worker sees the disconnect and stops)

    async def run(self, io: WorkerIO) -> None:
        await io.blast(self.total, self.chunk, self.fill)


@dataclass
class Call(Step):
    """Run `fn(io)` (sync or async) on the worker's loop, e.g. to signal a test-side event."""

    fn: Callable[[WorkerIO], Any]

    async def run(self, io: WorkerIO) -> None:
        result = self.fn(io)
        if inspect.isawaitable(result):
            await result


class WorkerIO:
    """The connection as a handler sees it (runs on the worker's loop)."""

    def __init__(self, proto: _WorkerProtocol) -> None:
        self._p = proto

    @property
    def info(self) -> WorkerConnection:
        return self._p.info

    @property
    def open(self) -> bool:
        return not self._p.lost and not self._p.closing

    async def send(self, data: bytes) -> None:
        p = self._p
        if p.lost or p.closing or not data or p.transport.is_closing():
            return
        p.transport.write(data)
        p.worker._count_sent(p.info, len(data))
        await p.drained()
        # let the loop run connection_lost: a transport whose peer reset it drops writes
        # without pausing, and a loop of sends must not count bytes that never left
        await asyncio.sleep(0)

    async def drip(self, data: bytes, size: int = 1, delay: float = 0.0) -> None:
        for i in range(0, len(data), size):
            await self.send(data[i : i + size])
            await p_flush(self._p)
            await asyncio.sleep(delay)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def blast(self, total: int, chunk: int, fill: bytes) -> None:
        piece = (fill * (chunk // max(1, len(fill)) + 1))[:chunk]
        left = total
        while left > 0 and self.open and not self.info.peer_closed:
            data = piece if left >= chunk else piece[:left]
            await self.send(data)
            left -= len(data)

    async def close(self) -> None:
        p = self._p
        if p.lost or p.closing:
            return
        p.closing = True
        p.info.closed_by_us = True
        p.transport.close()
        p.worker._changed()

    async def reset(self, settle: float = 0.05) -> None:
        p = self._p
        if p.lost or p.closing:
            return
        await p_flush(p)
        if settle:
            await asyncio.sleep(settle)
        if p.lost:
            return
        sock = p.transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        p.closing = True
        p.info.closed_by_us = True
        p.transport.abort()
        p.worker._changed()

    async def wait_received(self, marker: bytes, timeout: float | None = None) -> bool:
        """Wait until the bytes that arrived after the request being answered (the start of
        the next one, still unread) hold `marker` (True), or `timeout` passes (False)."""
        p = self._p
        try:
            async with asyncio.timeout(timeout):
                while marker not in p.buffer:
                    if p.lost or p.eof or p.worker._stopping:
                        return False
                    await p.changed()
        except TimeoutError:
            return False
        return True

    async def wait_peer_closed(self, timeout: float | None = None) -> bool:
        """Wait until the peer closes (True) or `timeout` passes (False)."""
        p = self._p
        try:
            async with asyncio.timeout(timeout):
                while not (p.info.peer_closed or p.lost or p.worker._stopping):
                    await p.changed()
        except TimeoutError:
            return False
        return True


Script = Sequence[Step]
#: What answers one request: steps, raw bytes, a function of the request returning either,
#: or an async function `(request, io) -> None` that drives the connection itself.
Handler = (
    Script
    | bytes
    | Callable[[WorkerRequest], Script | bytes]
    | Callable[[WorkerRequest, WorkerIO], Awaitable[None]]
)


async def p_flush(p: _WorkerProtocol) -> None:
    """Wait until the transport's own buffer is empty (bytes handed to the kernel)."""
    while not p.lost and p.transport.get_write_buffer_size() > 0:
        await asyncio.sleep(0.001)


class _WorkerProtocol(asyncio.Protocol):
    """One accepted connection: reads requests with h11, runs their handlers, keeps alive."""

    def __init__(self, worker: FakeWorker, kind: str) -> None:
        self.worker = worker
        self.kind = kind
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buffer = bytearray()
        self.eof = False
        self.lost = False
        self.closing = False
        self.paused = False
        self.info: WorkerConnection = None  # type: ignore[assignment]
        self._waiters: list[asyncio.Future[None]] = []

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=64 * 1024)
        self.info = self.worker._accepted(self.kind)
        self.worker._protocols.add(self)
        asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self.worker._peer_closed(self.info, reset=False)
        self._wake()
        return True  # keep our side open: a handler may still write (and be ignored)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.worker._protocols.discard(self)
        if not self.info.closed_by_us:
            self.worker._peer_closed(self.info, reset=exc is not None)
        self._wake()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    # -- waiting
    def _wake(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()
        self.worker._changed()

    async def changed(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    async def drained(self) -> None:
        while self.paused and not self.lost and not self.worker._stopping:
            await self.changed()

    # -- serving
    async def _serve(self) -> None:
        io = WorkerIO(self)
        try:
            while not (self.lost or self.closing):
                request = await self._read_request()
                if request is None:
                    break
                handler = self.worker._next_handler(request)
                await self._run(handler, request, io)
                await p_flush(self)
        except Exception as exc:  # a broken script is a test bug: keep it for the test to see
            self.worker._error(f"connection {self.info.id}: {type(exc).__name__}: {exc}")
        finally:
            if not self.lost and not self.closing:
                self.closing = True
                self.info.closed_by_us = True
                self.transport.close()
            self.worker._changed()

    async def _run(self, handler: Handler, request: WorkerRequest, io: WorkerIO) -> None:
        if callable(handler):
            if inspect.iscoroutinefunction(handler):
                await handler(request, io)  # type: ignore[call-arg]
                return
            handler = handler(request)  # type: ignore[call-arg,assignment]
        if isinstance(handler, bytes | bytearray):
            await io.send(bytes(handler))
            return
        for step in handler:  # type: ignore[union-attr]
            if isinstance(step, bytes | bytearray):
                await io.send(bytes(step))
            else:
                await step.run(io)

    async def _read_request(self) -> WorkerRequest | None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        head: h11.Request | None = None
        body = bytearray()
        raw_head = b""
        fed = 0
        while True:
            if fed < len(self.buffer):
                if head is None:
                    end = self.buffer.find(b"\r\n\r\n")
                    if end >= 0:
                        raw_head = bytes(self.buffer[: end + 4])
                chunk = bytes(self.buffer[fed:])
                fed = len(self.buffer)
                conn.receive_data(chunk)
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.worker._error(f"connection {self.info.id}: unreadable request: {exc}")
                return None
            if event is h11.NEED_DATA:
                if self.eof or self.lost:
                    if head is not None or fed:
                        self.worker._cut(raw_head or bytes(self.buffer[:200]))
                    return None
                await self.changed()
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                leftover, _ = conn.trailing_data
                del self.buffer[:]
                self.buffer += leftover
                self.info.requests += 1
                request = WorkerRequest(
                    method=head.method.decode(),
                    target=head.target.decode(),
                    headers=[(k.decode().lower(), v.decode("latin-1")) for k, v in head.headers],
                    body=bytes(body),
                    raw_head=raw_head,
                    connection=self.info.id,
                    index=self.info.requests - 1,
                )
                self.worker._received(request)
                return request
            elif isinstance(event, h11.ConnectionClosed):
                return None


class FakeWorker:
    """A programmable HTTP/1.1 worker on its own asyncio loop in a background thread.

    Give it handlers with `reply(...)` (one per coming request, in order) and/or
    a fallback `default`; a request with neither gets a 599 and is recorded in
    `errors`. Use as a context manager or call `start()` / `stop()`.
    """

    def __init__(self, *, unix_path: str | os.PathLike[str] | None = None, tcp: bool = True) -> None:
        self.unix_path = os.fspath(unix_path) if unix_path is not None else None
        self.tcp = tcp
        self.default: Handler | None = None
        self.requests: list[WorkerRequest] = []
        self.connections: list[WorkerConnection] = []
        self.errors: list[str] = []
        #: heads (or first bytes) of requests whose connection closed before they were complete
        self.incomplete: list[bytes] = []
        self.port = 0
        self._cond = threading.Condition()
        self._handlers: deque[Handler] = deque()
        self._by_id: dict[int, WorkerConnection] = {}  # every connection ever, kept by reset()
        self._ids = itertools.count(1)
        self._protocols: set[_WorkerProtocol] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._stopping = False

    # -- lifecycle
    def start(self) -> FakeWorker:
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=main, name="fake-worker", daemon=True)
        self._thread.start()
        ready.wait(WAIT)
        if failure:
            raise failure[0]
        return self

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        if self.tcp:
            server = await loop.create_server(lambda: _WorkerProtocol(self, "tcp"), LOOPBACK, 0)
            self.port = server.sockets[0].getsockname()[1]
            self._servers.append(server)
        if self.unix_path is not None:
            server = await loop.create_unix_server(
                lambda: _WorkerProtocol(self, "unix"), self.unix_path
            )
            self._servers.append(server)

    def stop(self) -> None:
        """Close the listeners and every connection, stop the loop, join the thread."""
        loop = self._loop
        if loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            self._stopping = True
            for server in self._servers:
                server.close()
            for proto in list(self._protocols):
                proto.closing = True
                proto.transport.abort()
                proto._wake()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shutdown(), loop).result(WAIT)
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(WAIT)
        self._loop = None
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)

    def stop_listening(self) -> None:
        """Close the listening sockets only (new connections are refused; open ones stay)."""
        loop = self._loop
        assert loop is not None

        async def close() -> None:
            for server in self._servers:
                server.close()

        asyncio.run_coroutine_threadsafe(close(), loop).result(WAIT)

    def __enter__(self) -> FakeWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses
    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def unix_url(self) -> str:
        assert self.unix_path is not None
        return f"unix:{self.unix_path}"

    # -- programming it
    def reply(self, *handlers: Handler) -> FakeWorker:
        """Queue one handler per coming request, in order (before `default`)."""
        with self._cond:
            self._handlers.extend(handlers)
        return self

    def reset(self) -> None:
        """Forget queued handlers, the default, and everything recorded (open connections stay)."""
        with self._cond:
            self._handlers.clear()
            self.default = None
            self.requests.clear()
            self.connections.clear()
            self.errors.clear()
            self.incomplete.clear()

    # -- what it saw
    @property
    def accepted(self) -> int:
        """Connections accepted (since the last reset)."""
        with self._cond:
            return len(self.connections)

    @property
    def peer_closed(self) -> int:
        """Connections the daemon closed (FIN or RST), since the last reset."""
        with self._cond:
            return sum(1 for c in self.connections if c.peer_closed)

    @property
    def bytes_sent(self) -> int:
        with self._cond:
            return sum(c.bytes_sent for c in self.connections)

    @property
    def open_connections(self) -> int:
        """Connections still open on both sides."""
        with self._cond:
            return sum(1 for c in self.connections if not c.peer_closed and not c.closed_by_us)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        """Wait until `predicate()` is true (re-checked at every change); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_requests(self, count: int, timeout: float = WAIT) -> list[WorkerRequest]:
        """Wait until `count` requests arrived; return them all (AssertionError on timeout)."""
        if not self.wait_until(lambda: len(self.requests) >= count, timeout):
            raise AssertionError(f"worker got {len(self.requests)} requests, expected {count}")
        with self._cond:
            return list(self.requests)

    def wait_peer_closed(self, count: int = 1, timeout: float = WAIT) -> bool:
        """Wait until at least `count` connections were closed by the daemon."""
        return self.wait_until(
            lambda: sum(1 for c in self.connections if c.peer_closed) >= count, timeout
        )

    def connection_of(self, request: WorkerRequest) -> WorkerConnection:
        """The connection `request` arrived on (also one accepted before the last reset)."""
        with self._cond:
            return self._by_id[request.connection]

    def wait_connection_closed(self, request: WorkerRequest, timeout: float = WAIT) -> bool:
        """Wait until the daemon closed the connection that carried `request`.

        Use this rather than `wait_peer_closed` when the daemon may have sent the
        request on a pooled connection accepted before the last `reset()`.
        """
        info = self.connection_of(request)
        return self.wait_until(lambda: info.peer_closed, timeout)

    def wait_quiet(self, seconds: float = 0.3, timeout: float = WAIT) -> int:
        """Wait until `bytes_sent` stops growing for `seconds`; return it (writes are blocked)."""
        deadline = time.monotonic() + timeout
        last = self.bytes_sent
        since = time.monotonic()
        while time.monotonic() < deadline:
            self.wait_until(lambda last=last: self.bytes_sent != last, min(seconds, 0.05))
            now = self.bytes_sent
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= seconds:
                return now
        raise AssertionError("the worker kept writing")

    # -- called from the loop thread
    def _changed(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _accepted(self, kind: str) -> WorkerConnection:
        info = WorkerConnection(next(self._ids), kind)
        with self._cond:
            self.connections.append(info)
            self._by_id[info.id] = info
            self._cond.notify_all()
        return info

    def _peer_closed(self, info: WorkerConnection, reset: bool) -> None:
        with self._cond:
            if not info.peer_closed:
                info.peer_closed = True
                info.peer_closed_at = time.monotonic()
            info.peer_reset = info.peer_reset or reset
            self._cond.notify_all()

    def _count_sent(self, info: WorkerConnection, n: int) -> None:
        with self._cond:
            info.bytes_sent += n
            self._cond.notify_all()

    def _received(self, request: WorkerRequest) -> None:
        with self._cond:
            self.requests.append(request)
            self._cond.notify_all()

    def _cut(self, head: bytes) -> None:
        with self._cond:
            self.incomplete.append(head)
            self._cond.notify_all()

    def _error(self, message: str) -> None:
        with self._cond:
            self.errors.append(message)
            self._cond.notify_all()

    def _next_handler(self, request: WorkerRequest) -> Handler:
        with self._cond:
            if self._handlers:
                return self._handlers.popleft()
            if self.default is not None:
                return self.default
        self._error(f"no handler for {request.method} {request.target}")
        return http_response(599, b'{"error":"no handler queued"}')


# =============================================================================================
# Building worker responses
# =============================================================================================

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable", 599: "No Handler"}

HeaderList = Sequence[tuple[str, str]]


def response_head(status: int = 200, headers: HeaderList = ()) -> bytes:
    """`HTTP/1.1 status reason` + headers + blank line (headers written exactly as given)."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Whatever')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def http_response(
    status: int = 200,
    body: bytes = b"",
    headers: HeaderList = (("content-type", "application/json"),),
    *,
    chunked: bool = False,
) -> bytes:
    """A whole response, Content-Length framed (or chunked in one chunk)."""
    if chunked:
        head = response_head(status, [*headers, ("transfer-encoding", "chunked")])
        return head + (chunk(body) if body else b"") + LAST_CHUNK
    return response_head(status, [*headers, ("content-length", str(len(body)))]) + body


def json_reply(
    obj: Any, status: int = 200, headers: HeaderList = (), *, chunked: bool = False
) -> list[Step]:
    """A JSON document response (Content-Length, or chunked)."""
    body = json.dumps(obj).encode()
    return [
        Send(http_response(status, body, [("content-type", "application/json"), *headers], chunked=chunked))
    ]


def sse_reply(
    events: Sequence[bytes],
    *,
    framing: str = "chunked",
    content_type: str = "text/event-stream",
    headers: HeaderList = (),
    end: bool = True,
    pause: float = 0.0,
) -> list[Step]:
    """An SSE response, one write per event.

    `framing`: "chunked" (each event one chunk; `end` adds the last chunk),
    "length" (Content-Length of all events) or "close" (body ends with FIN).
    """
    hdrs: list[tuple[str, str]] = [("content-type", content_type), ("cache-control", "no-cache")]
    hdrs += headers
    steps: list[Step] = []
    if framing == "chunked":
        steps.append(Send(response_head(200, [*hdrs, ("transfer-encoding", "chunked")])))
        for ev in events:
            steps.append(Send(chunk(ev)))
            if pause:
                steps.append(Sleep(pause))
        if end:
            steps.append(Send(LAST_CHUNK))
    elif framing == "length":
        total = sum(len(e) for e in events)
        steps.append(Send(response_head(200, [*hdrs, ("content-length", str(total))])))
        for ev in events:
            steps.append(Send(ev))
            if pause:
                steps.append(Sleep(pause))
    elif framing == "close":
        steps.append(Send(response_head(200, [*hdrs, ("connection", "close")])))
        for ev in events:
            steps.append(Send(ev))
            if pause:
                steps.append(Sleep(pause))
        if end:
            steps.append(Close())
    else:
        raise ValueError(f"unknown framing {framing!r}")
    return steps


def sse_data(obj: Any, *, space: bool = True, eol: bytes = b"\n") -> bytes:
    """`data: <json>` + a blank line (`space=False` writes `data:<json>`, as TGI does)."""
    payload = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()
    return (b"data: " if space else b"data:") + payload + eol + eol


DONE = b"data: [DONE]\n\n"

# =============================================================================================
# OpenAI-shaped payloads, in the flavours of real workers
# =============================================================================================

MODEL = "test-model"
CREATED = 1_700_000_000
USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
FLAVORS = ("vllm", "sglang", "llamacpp", "ollama", "tgi")


def _tool_call_deltas(tool_calls: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Deltas for tool calls as vLLM streams them: id/type/name first, then arguments in pieces."""
    out: list[list[dict[str, Any]]] = []
    for i, call in enumerate(tool_calls):
        out.append(
            [{"index": i, "id": call["id"], "type": "function",
              "function": {"name": call["name"], "arguments": ""}}]
        )
        args = call["arguments"]
        for j in range(0, len(args), 7):
            out.append([{"index": i, "function": {"arguments": args[j : j + 7]}}])
    return out


def chat_stream_events(
    content: Sequence[str] = ("Hel", "lo", "!"),
    *,
    flavor: str = "vllm",
    model: str | None = MODEL,
    id: str | None = "chatcmpl-abc123",
    created: int | None = CREATED,
    usage: dict[str, Any] | None = USAGE,
    include_usage: bool = True,
    usage_on_every_chunk: bool = False,
    finish_reason: str | None = "stop",
    n: int = 1,
    tool_calls: Sequence[dict[str, Any]] = (),
    reasoning: Sequence[str] = (),
    done: bool = True,
    eol: bytes = b"\n",
) -> list[bytes]:
    """The SSE events of a chat completion stream as the given worker flavour writes them.

    vllm/sglang: role chunk, content chunks, finish chunk, separate usage chunk
    (`choices: []`) when `include_usage`; llamacpp: usage (and `timings`) on the
    finish chunk; ollama: role on every delta, `system_fingerprint`; tgi:
    `data:` without a space, `usage: null` on chunks, usage on the finish chunk.
    `n` choices are interleaved; `tool_calls` are `{"id","name","arguments"}`.
    `id`/`created`/`model` None leaves the key out; `finish_reason=None` and
    `done=False` make an unfinished stream.
    """
    if flavor not in FLAVORS:
        raise ValueError(flavor)
    base: dict[str, Any] = {}
    if id is not None:
        base["id"] = "" if flavor == "tgi" and id == "chatcmpl-abc123" else id
    base["object"] = "chat.completion.chunk"
    if created is not None:
        base["created"] = created
    if model is not None:
        base["model"] = model
    if flavor in ("llamacpp", "ollama", "tgi"):
        base["system_fingerprint"] = {"llamacpp": "b4000-abc", "ollama": "fp_ollama",
                                      "tgi": "2.4.0-native"}[flavor]
    space = flavor != "tgi"
    usage_here = include_usage and usage is not None
    events: list[bytes] = []

    def emit(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
        obj = {**base, "choices": choices}
        if flavor in ("sglang", "tgi"):
            obj["usage"] = None
        if usage_on_every_chunk and usage_here:
            obj["usage"] = usage
        if extra:
            obj.update(extra)
        events.append(sse_data(obj, space=space, eol=eol))

    def choice(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        c: dict[str, Any] = {"index": index, "delta": delta}
        if flavor in ("vllm", "sglang", "tgi"):
            c["logprobs"] = None
        c["finish_reason"] = finish
        return c

    role_everywhere = flavor in ("ollama", "tgi")
    if not role_everywhere:
        for i in range(n):
            emit([choice(i, {"role": "assistant", "content": "" if flavor != "llamacpp" else None})])
    for piece in reasoning:
        for i in range(n):
            emit([choice(i, {"reasoning_content": piece})])
    for piece in content:
        for i in range(n):
            delta: dict[str, Any] = {"content": piece if n == 1 else f"{piece}{i}"}
            if role_everywhere:
                delta = {"role": "assistant", **delta}
            emit([choice(i, delta)])
    for calls in _tool_call_deltas(tool_calls):
        for i in range(n):
            emit([choice(i, {"tool_calls": calls})])
    if finish_reason is not None:
        finish = "tool_calls" if tool_calls and finish_reason == "stop" else finish_reason
        for i in range(n):
            last = i == n - 1
            delta = {"content": ""} if flavor != "ollama" else {"role": "assistant", "content": ""}
            c = choice(i, delta, finish)
            if flavor == "vllm":
                c["stop_reason"] = None
            if flavor == "sglang":
                c["matched_stop"] = 151645
            extra: dict[str, Any] = {}
            if last and usage_here and flavor in ("llamacpp", "tgi"):
                extra["usage"] = usage
            if last and flavor == "llamacpp":
                extra["timings"] = {"prompt_n": 11, "predicted_n": 3, "predicted_ms": 1.5}
            emit([c], extra)
    if usage_here and flavor in ("vllm", "sglang", "ollama") and not usage_on_every_chunk:
        events.append(sse_data({**base, "choices": [], "usage": usage}, space=space, eol=eol))
    if done:
        events.append(b"data: [DONE]" + eol + eol if space else b"data:[DONE]" + eol + eol)
    return events


def chat_completion(
    content: str | None = "Hello!",
    *,
    model: str = MODEL,
    id: str = "chatcmpl-doc123",
    created: int = CREATED,
    usage: dict[str, Any] | None = USAGE,
    finish_reason: str = "stop",
    n: int = 1,
    tool_calls: Sequence[dict[str, Any]] = (),
    reasoning: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One `chat.completion` document (what a non-streaming worker answers)."""
    choices = []
    for i in range(n):
        message: dict[str, Any] = {"role": "assistant", "content": content if n == 1 or content is None else f"{content}{i}"}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if tool_calls:
            message["tool_calls"] = [
                {"id": c["id"], "type": "function",
                 "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in tool_calls
            ]
        choices.append({"index": i, "message": message, "logprobs": None,
                        "finish_reason": "tool_calls" if tool_calls else finish_reason})
    doc: dict[str, Any] = {"id": id, "object": "chat.completion", "created": created,
                           "model": model, "choices": choices}
    if usage is not None:
        doc["usage"] = usage
    if extra:
        doc.update(extra)
    return doc


def text_completion_events(
    texts: Sequence[str] = ("Hel", "lo"),
    *,
    model: str = MODEL,
    id: str = "cmpl-abc123",
    usage: dict[str, Any] | None = USAGE,
    include_usage: bool = True,
    finish_reason: str | None = "stop",
    done: bool = True,
) -> list[bytes]:
    """A legacy `/v1/completions` stream (vLLM style)."""
    base = {"id": id, "object": "text_completion", "created": CREATED, "model": model}
    events = [sse_data({**base, "choices": [{"index": 0, "text": t, "logprobs": None,
                                            "finish_reason": None}]}) for t in texts]
    if finish_reason is not None:
        events.append(sse_data({**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                    "finish_reason": finish_reason}]}))
    if include_usage and usage is not None:
        events.append(sse_data({**base, "choices": [], "usage": usage}))
    if done:
        events.append(DONE)
    return events


def text_completion(text: str = "Hello", *, model: str = MODEL,
                    usage: dict[str, Any] | None = USAGE) -> dict[str, Any]:
    """One `text_completion` document."""
    doc: dict[str, Any] = {"id": "cmpl-doc123", "object": "text_completion", "created": CREATED,
                           "model": model, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                        "finish_reason": "stop"}]}
    if usage is not None:
        doc["usage"] = usage
    return doc


def openai_handler(
    flavor: str = "vllm",
    *,
    content: Sequence[str] = ("Hel", "lo", "!"),
    mode: str = "auto",
    framing: str = "chunked",
    **kwargs: Any,
) -> Callable[[WorkerRequest], list[Step]]:
    """A handler that answers chat and legacy completions like a real worker would.

    `mode="auto"` streams when the request says `"stream": true` (usage only if
    `stream_options.include_usage`), `mode="json"` always answers one document,
    `mode="sse"` always streams. `n` comes from the request; `kwargs` go to the
    event/document builders (tool_calls, reasoning, usage, model, ...).
    """

    def handle(request: WorkerRequest) -> list[Step]:
        body = request.json()
        chat = "completions" not in request.target or "chat" in request.target
        stream = body.get("stream") is True if mode == "auto" else mode == "sse"
        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage")) if mode == "auto" else True
        n = int(body.get("n") or 1)
        if stream:
            if chat:
                events = chat_stream_events(content, flavor=flavor, n=n,
                                            include_usage=include_usage, **kwargs)
            else:
                events = text_completion_events(content, include_usage=include_usage, **kwargs)
            return sse_reply(events, framing=framing)
        if chat:
            return json_reply(chat_completion("".join(content), n=n, **kwargs))
        return json_reply(text_completion("".join(content), **kwargs))

    return handle


# =============================================================================================
# The daemon
# =============================================================================================


def chat_or_echo(request: WorkerRequest) -> Any:
    """Chat requests answered like a real worker; anything else: a JSON echo of the
    request's target, method and body."""
    if request.target.startswith("/v1/chat/completions") or request.target.endswith(
        "/v1/chat/completions"
    ):
        return openai_handler()(request)
    body = json.dumps({"target": request.target, "method": request.method,
                       "body": request.body.decode("latin-1")}).encode()
    return http_response(200, body)


def serving(worker: FakeWorker, default: Handler | None = None) -> Iterator[FakeWorker]:
    """A module's shared fake worker for one test (a fixture's body: `yield from`): reset,
    answering with `default`, and afterwards no error of its own."""
    worker.reset()
    if default is not None:
        worker.default = default
    yield worker
    errors = list(worker.errors)
    worker.reset()
    assert not errors, f"fake worker errors: {errors}"


def nothing_forwarded(daemon: Daemon, worker: FakeWorker) -> None:
    """No whole request reached the worker before a marker request sent now (through a
    route whose prefix is `/v1/public/`, answered 200) that must be the only one."""
    with RawClient(daemon.address) as client:
        client.send(request_bytes("GET", "/v1/public/marker"))
        assert client.read_response().status == 200
    requests = worker.wait_requests(1)
    assert [r.target for r in requests] == ["/v1/public/marker"], [r.raw_head for r in requests]


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `over`, recursing into nested dicts (lists are replaced)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


DEFAULT_ROUTES: list[dict[str, Any]] = [
    {"name": "chat", "match": {"path": "/v1/chat/completions", "methods": ["POST"]},
     "dialect": "openai-chat", "upstream_stream": "auto"},
    {"name": "completions", "match": {"path": "/v1/completions", "methods": ["POST"]},
     "dialect": "openai-completions", "upstream_stream": "auto"},
    {"name": "rest", "match": {"path_prefix": "/v1/"}, "dialect": "passthrough"},
]


def daemon_config(worker_url: str, **overrides: Any) -> dict[str, Any]:
    """A test config: loopback port 0 for both listeners, JSON logs, small timeouts.

    `overrides` are merged in (dicts recursively): `daemon_config(url,
    upstream={"idle_timeout": "300ms"}, routes=[...])`. `usage_log` is filled in by
    `Daemon` when absent.
    """
    base: dict[str, Any] = {
        "listen": f"{LOOPBACK}:0",
        "admin_listen": f"{LOOPBACK}:0",
        "log_format": "json",
        "upstream": {
            "url": worker_url,
            "connect_timeout": "1s",
            "response_timeout": "2s",
            "idle_timeout": "1s",
            "max_idle_connections": 8,
            "pool_idle_timeout": "4s",
        },
        "limits": {
            "max_request_body": "1MiB",
            "max_header_bytes": "16KiB",
            "header_timeout": "2s",
            "body_timeout": "2s",
            "keepalive_timeout": "5s",
            "max_connections": 64,
        },
        "pricing": {"currency": "USD",
                    "models": {MODEL: {"prompt": 1.0, "completion": 2.0}}},
        "drain_timeout": "1s",
        "routes": DEFAULT_ROUTES,
    }
    return deep_merge(base, overrides)


def chat_route(name: str = "chat", **fields: Any) -> dict[str, Any]:
    """A chat route dict (`fields` override, e.g. upstream_stream="never", heartbeat="200ms")."""
    route: dict[str, Any] = {"name": name,
                             "match": {"path": "/v1/chat/completions", "methods": ["POST"]},
                             "dialect": "openai-chat", "upstream_stream": "auto"}
    route.update(fields)
    return route


_LISTENING = re.compile(r"^listening on (\S+?)(?:, admin on (\S+?))?, worker (.*)$")


def _address(text: str) -> tuple[str, int] | str:
    if text.startswith("unix:"):
        return text[5:]
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class Daemon:
    """The real `sidecar run` process on a config written from a dict.

    `start()` waits for its "listening on ..." log line; `stop()` sends SIGTERM,
    waits, and kills on timeout. Every stderr line is kept in `lines` (JSON
    ones parsed into `logs`).
    """

    def __init__(self, config: dict[str, Any], directory: str | os.PathLike[str], *,
                 env: dict[str, str] | None = None, name: str = "sidecar") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        config = dict(config)
        config.setdefault("usage_log", str(self.directory / f"{name}-usage.jsonl"))
        self.config = config
        self.config_path = self.directory / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.ledger_path = Path(config["usage_log"]) if config.get("usage_log") else None
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self.logs: list[dict[str, Any]] = []
        self.host = LOOPBACK
        self.port = 0
        self.unix_path: str | None = None
        self.admin_port = 0
        self.admin_unix_path: str | None = None
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None

    # -- lifecycle
    def start(self, timeout: float = WAIT) -> Daemon:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.pop("LISTEN_FDS", None)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        if self.env:
            env.update(self.env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "-c", str(self.config_path)],
            cwd=self.directory, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read_stderr, name="daemon-stderr", daemon=True)
        self._reader.start()
        entry = self.wait_log(lambda e: str(e.get("msg", "")).startswith("listening on "), timeout)
        if entry is None:
            self.stop()
            raise RuntimeError("the daemon did not start:\n" + "\n".join(self.lines))
        match = _LISTENING.match(entry["msg"])
        assert match, entry
        listen = _address(match.group(1))
        if isinstance(listen, str):
            self.unix_path = listen
        else:
            self.host, self.port = listen
        if match.group(2):
            admin = _address(match.group(2))
            if isinstance(admin, str):
                self.admin_unix_path = admin
            else:
                self.admin_port = admin[1]
        return self

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            entry: dict[str, Any] | None = None
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
            with self._cond:
                self.lines.append(line)
                if isinstance(entry, dict):
                    self.logs.append(entry)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(2.0)
        return proc.returncode

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses
    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    # -- the process
    def send_signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def rss_kib(self) -> int:
        """Resident set size from /proc/PID/status (KiB)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- logs
    def wait_log(self, predicate: Callable[[dict[str, Any]], bool],
                 timeout: float = WAIT) -> dict[str, Any] | None:
        """The first JSON log entry matching `predicate`, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for entry in self.logs[seen:]:
                    if predicate(entry):
                        return entry
                seen = len(self.logs)
                left = deadline - time.monotonic()
                exited = self.proc is None or (self.proc.poll() is not None
                                               and not (self._reader and self._reader.is_alive()))
                if left <= 0 or exited:
                    return None
                self._cond.wait(min(left, 0.1))

    def errors(self) -> list[str]:
        """Log lines at level error/critical or carrying a traceback (bugs, unless a test wants them)."""
        with self._cond:
            return [json.dumps(e) for e in self.logs
                    if e.get("level") in ("error", "critical") or "exc" in e]

    # -- ledger
    def ledger(self) -> list[dict[str, Any]]:
        """Every ledger record written so far."""
        if self.ledger_path is None or not self.ledger_path.exists():
            return []
        text = self.ledger_path.read_text()
        text = text[: text.rfind("\n") + 1]  # a line being appended right now is not there yet
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait_ledger(self, count: int, timeout: float = WAIT) -> list[dict[str, Any]]:
        """Wait until the ledger holds `count` records (it is written when a request ends)."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.ledger()
            if len(records) >= count:
                return records
            if time.monotonic() >= deadline:
                raise AssertionError(f"ledger has {len(records)} records, expected {count}")
            time.sleep(0.01)

    def ledger_for(self, request_id: str, timeout: float = WAIT) -> dict[str, Any]:
        """The ledger record of `request_id`, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            for record in self.ledger():
                if record.get("request_id") == request_id:
                    return record
            if time.monotonic() >= deadline:
                raise AssertionError(f"no ledger record for {request_id}")
            time.sleep(0.01)


def run_cli(*args: str, cwd: str | os.PathLike[str] | None = None,
            timeout: float = 30.0, merged: bool = False) -> subprocess.CompletedProcess[str]:
    """`python -m sidecar ARGS` to completion, text output captured (`merged`: stderr
    into the same pipe as stdout, as `2>&1`)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], cwd=cwd or REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        text=True, timeout=timeout, check=False,
    )


def free_port() -> int:
    """A loopback TCP port with nothing listening on it (connections are refused)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# =============================================================================================
# Raw clients
# =============================================================================================


@dataclass
class RawResponse:
    """One HTTP response read off a socket, with its exact bytes."""

    status: int
    reason: str
    headers: list[tuple[str, str]]  # names lower-cased
    body: bytes  # de-chunked
    raw: bytes  # everything read for this response, head included
    complete: bool  # the body framing finished (False: cut off by close/timeout)
    chunks: list[bytes] = field(default_factory=list)  # the chunk payloads, when chunked

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_names(self) -> set[str]:
        return {k for k, _ in self.headers}

    def json(self) -> Any:
        return json.loads(self.body)

    def sse(self) -> list[str]:
        """The `data:` payloads of the body's events (comments skipped)."""
        return sse_payloads(self.body)

    def sse_json(self) -> list[Any]:
        """Each data payload decoded as JSON (`[DONE]` kept as the string)."""
        return [p if p == "[DONE]" else json.loads(p) for p in self.sse()]


def sse_events(body: bytes) -> list[tuple[str | None, str]]:
    """(event name, data payload) of every SSE event in `body` that has data (multi-line data
    joined with newlines; no `event:` line -> None)."""
    text = body.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    out = []
    for block in text.split("\n\n"):
        name = None
        data = []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            out.append((name, "\n".join(data)))
    return out


def sse_payloads(body: bytes) -> list[str]:
    """The data payload of every SSE event in `body` (multi-line data joined with newlines)."""
    return [data for _, data in sse_events(body)]


class RawClient:
    """A blocking client socket for byte-level exchanges with the daemon."""

    def __init__(self, address: tuple[str, int] | str, timeout: float = WAIT,
                 rcvbuf: int | None = None) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.buffer = bytearray()
        self.eof = False

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def reset(self) -> None:
        """Close with RST."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def _fill(self, timeout: float | None = None) -> bool:
        """Read more bytes into the buffer; False at EOF/reset/timeout."""
        if self.eof:
            return False
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(256 * 1024)
        except TimeoutError:
            return False
        except ConnectionResetError:
            self.eof = True
            return False
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def recv_some(self, max_bytes: int = 65536, timeout: float | None = None) -> bytes:
        """Whatever is available (at least one byte unless EOF/timeout), at most `max_bytes`."""
        if not self.buffer:
            self._fill(timeout)
        data = bytes(self.buffer[:max_bytes])
        del self.buffer[:max_bytes]
        return data

    def read_until(self, marker: bytes, timeout: float = WAIT) -> bytes:
        """Bytes up to and including `marker` (AssertionError if it never comes)."""
        deadline = time.monotonic() + timeout
        while True:
            i = self.buffer.find(marker)
            if i >= 0:
                out = bytes(self.buffer[: i + len(marker)])
                del self.buffer[: i + len(marker)]
                return out
            left = deadline - time.monotonic()
            if left <= 0 or not self._fill(max(left, 0.001)):
                raise AssertionError(f"{marker!r} not received; got {bytes(self.buffer)[:2000]!r}")

    def read_exactly(self, n: int, timeout: float = WAIT) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.buffer) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not self._fill(max(left, 0.001)):
                raise AssertionError(f"wanted {n} bytes, got {len(self.buffer)}")
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    def read_until_close(self, timeout: float = WAIT) -> bytes:
        """Everything until the daemon closes (AssertionError if it stays open past `timeout`)."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"connection still open; got {bytes(self.buffer)[:2000]!r}")
            self._fill(max(left, 0.001))
        out = bytes(self.buffer)
        self.buffer.clear()
        return out

    def closed_by_peer(self, timeout: float = WAIT) -> bool:
        """True if the daemon closes the connection within `timeout` (bytes read are kept)."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._fill(max(left, 0.001))
        return True

    def read_response(self, timeout: float = WAIT, *, head_only_body: bool = False) -> RawResponse:
        """Read one response; the body per its framing (or until close). 1xx heads are skipped.

        `head_only_body=True` for the answer to a HEAD request (no body whatever the headers).
        """
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(deadline - time.monotonic(), 0.001)

        while True:
            raw_head = self.read_until(b"\r\n\r\n", left())
            status_line, *header_lines = raw_head[:-4].decode("latin-1").split("\r\n")
            _version, status_text, *reason = status_line.split(" ", 2)
            status = int(status_text)
            headers = []
            for line in header_lines:
                name, _, value = line.partition(":")
                headers.append((name.strip().lower(), value.strip()))
            if 100 <= status < 200:
                continue
            break
        response = RawResponse(status, reason[0] if reason else "", headers, b"", raw_head, True)
        names = dict(headers)
        raw = bytearray(raw_head)
        if head_only_body or status in (204, 304):
            return response
        if names.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                try:
                    size_line = self.read_until(b"\r\n", left())
                except AssertionError:
                    raw += self.buffer
                    response.complete = False
                    break
                raw += size_line
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                try:
                    data = self.read_exactly(size + 2, left())
                except AssertionError:
                    raw += self.buffer
                    body += self.buffer
                    self.buffer.clear()
                    response.complete = False
                    break
                raw += data
                if size == 0:
                    # trailers: read until the blank line (data is just CRLF when there are none)
                    if data != b"\r\n":
                        raw += self.read_until(b"\r\n\r\n", left())
                    break
                body += data[:-2]
                response.chunks.append(data[:-2])
            response.body = bytes(body)
        elif "content-length" in names:
            n = int(names["content-length"])
            try:
                response.body = self.read_exactly(n, left())
            except AssertionError:
                response.body = bytes(self.buffer)
                self.buffer.clear()
                response.complete = False
            raw += response.body
        else:  # delimited by the close
            try:
                response.body = self.read_until_close(left())
            except AssertionError:
                response.body = bytes(self.buffer)
                self.buffer.clear()
                response.complete = False
            raw += response.body
        response.raw = bytes(raw)
        return response


def request_bytes(
    method: str = "POST",
    target: str = "/v1/chat/completions",
    body: bytes | dict[str, Any] | None = None,
    headers: HeaderList = (),
    *,
    chunked: bool = False,
    host: str = "sidecar.test",
) -> bytes:
    """A request as raw bytes (Content-Length, or chunked in two chunks), headers exactly as given."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    lines = [f"{method} {target} HTTP/1.1", f"host: {host}"]
    names = {k.lower() for k, _ in headers}
    lines += [f"{k}: {v}" for k, v in headers]
    payload = b""
    if body is not None:
        if "content-type" not in names:
            lines.append("content-type: application/json")
        if chunked:
            lines.append("transfer-encoding: chunked")
            half = len(body) // 2
            payload = (chunk(body[:half]) if half else b"") + chunk(body[half:]) + LAST_CHUNK
        elif "content-length" not in names:
            lines.append(f"content-length: {len(body)}")
            payload = body
        else:
            payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def raw_exchange(address: tuple[str, int] | str, data: bytes, timeout: float = 5.0) -> bytes:
    """Send `data`, then read until the daemon closes or `timeout` passes; all bytes read."""
    with RawClient(address, timeout=timeout) as client:
        client.send(data)
        deadline = time.monotonic() + timeout
        while not client.eof and time.monotonic() < deadline:
            client._fill(max(deadline - time.monotonic(), 0.001))
        return bytes(client.buffer)


def chat_body(stream: bool = False, *, model: str = MODEL, include_usage: bool | None = None,
              **extra: Any) -> dict[str, Any]:
    """A chat request body."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    body.update(extra)
    return body


def post(daemon: Daemon, body: dict[str, Any] | bytes, target: str = "/v1/chat/completions",
         headers: HeaderList = (), timeout: float = WAIT) -> RawResponse:
    """One POST on a fresh connection; the whole response. A daemon that answers before it
    has read the whole body (a 413) may close while the body is still being sent: the
    answer is read all the same, as HTTP clients (httpcore) do."""
    with RawClient(daemon.address, timeout=timeout) as client:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            client.send(request_bytes("POST", target, body, headers))
        return client.read_response(timeout)


def iter_chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def all_payload_objects(responses: Iterable[RawResponse]) -> list[Any]:
    return [obj for r in responses for obj in r.sse_json()]


# =============================================================================================
# Held streams (added for test_signals / test_workers / test_ledger_soak: a stream the test
# keeps open until it says so)
# =============================================================================================


def held_stream(
    events: Sequence[bytes], release: threading.Event, *, first: int = 2,
    started: threading.Event | None = None, poll: float = 0.01,
) -> Callable[[WorkerRequest, WorkerIO], Awaitable[None]]:
    """A handler that streams `events[:first]` (chunked), waits for `release`, then the rest.

    `started` is set once the first events are written. The wait polls `release`
    without blocking the worker's loop; it ends early if the daemon hangs up.
    """

    async def handle(request: WorkerRequest, io: WorkerIO) -> None:
        head = response_head(200, [("content-type", "text/event-stream"),
                                   ("transfer-encoding", "chunked")])
        await io.send(head + b"".join(chunk(e) for e in events[:first]))
        if started is not None:
            started.set()
        while not release.is_set():
            if not io.open or io.info.peer_closed:
                return
            await asyncio.sleep(poll)
        await io.send(b"".join(chunk(e) for e in events[first:]) + LAST_CHUNK)

    return handle


# -- the admin port's /metrics ----------------------------------------------------------------

MetricSamples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_text(daemon: Daemon) -> str:
    """The daemon's /metrics page."""
    response = httpx.get(daemon.admin_url + "/metrics", timeout=5)
    assert response.status_code == 200
    return response.text


def metric_samples(text: str) -> MetricSamples:
    """Every sample of a /metrics page, parsed by prometheus_client, keyed by (name, labels)."""
    out: MetricSamples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


# ============================================================================ nginx beside it

#: Debian's nginx, where it is installed (CI installs none: tests that compare with it run
#: their sidecar side alone there)
NGINX = next(
    (p for p in (shutil.which("nginx"), "/usr/sbin/nginx") if p and os.access(p, os.X_OK)), None
)

_NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
{user}
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    {http}
    upstream worker {{ server 127.0.0.1:{wport}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://worker;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            {location}
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_in_front(
    worker_port: int, directory: Path, http: str = "", location: str = ""
) -> Iterator[tuple[str, int] | None]:
    """nginx as a reverse proxy in front of the worker at `worker_port` (bench/run.py's
    shape: HTTP/1.1 to an upstream keep-alive pool; unprivileged, its files in `directory`),
    with `http` and `location` directives added; its address, or None where nginx is not
    installed."""
    if NGINX is None:
        yield None
        return
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(
        dir=directory, wport=worker_port, port=port, http=http, location=location,
        user="user root root;" if os.geteuid() == 0 else "",
    ))
    proc = subprocess.Popen(
        [NGINX, "-p", str(directory), "-e", str(directory / "nginx-error.log"), "-c", str(conf)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((LOOPBACK, port), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("nginx did not start: " + (
                        directory / "nginx-error.log").read_text(errors="replace")) from None
                time.sleep(0.02)
        yield (LOOPBACK, port)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
