"""Fake OpenAI-compatible LLM worker for the benchmark: paces chunks like a batched engine.

Streaming (`"stream": true`): the response head and the first token are written as soon as the
request arrives (prefill), then every decode tick each active stream gets exactly one event, each
in its own socket write, chunked transfer encoding, frames as vLLM writes them. After
`max_tokens` content chunks come a finish chunk, a usage chunk (only with
`stream_options.include_usage`) and `data: [DONE]`, one write each. Non-streaming requests get
one `chat.completion` document with usage at the next tick. Paths starting with `/sat/` are
served unpaced: ticks run back to back as fast as the sockets take them (saturation runs), and
with `--sat-batch K` each write carries K content events (the backlog a saturated proxy reads
anyway, without making this process the bottleneck).
A path starting with `/t<ms>/` (`/t40/v1/chat/completions`) is paced at that tick instead of
the default. `GET /_stats` returns counters as JSON (events written, requests, ...).

It must never be the bottleneck: raw asyncio protocols on uvloop, no HTTP library, frames encoded
once at start-up. It is a benchmark tool, not a conforming HTTP server: it trusts its clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys

import orjson

try:
    import uvloop
except ImportError:  # pragma: no cover - the venv has it
    uvloop = None  # type: ignore[assignment]

_PREFIX = b'{"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"m","choices":'


def _frame(payload: bytes) -> bytes:
    """One chunked-transfer-encoding frame holding payload."""
    return b"%x\r\n" % len(payload) + payload + b"\r\n"


def _event(data: bytes) -> bytes:
    return _frame(b"data: " + data + b"\n\n")


CONTENT = _event(_PREFIX + b'[{"index":0,"delta":{"content":"tok"},"finish_reason":null}]}')
FINISH = _event(_PREFIX + b'[{"index":0,"delta":{},"finish_reason":"stop"}]}')
DONE_END = _event(b"[DONE]") + b"0\r\n\r\n"
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n"
    b"\r\n"
)
PROMPT_TOKENS = 10


def _usage(n: int) -> bytes:
    return b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (
        PROMPT_TOKENS,
        n,
        PROMPT_TOKENS + n,
    )


class Frames:
    """Per-length frames (usage chunk, JSON response), encoded once and cached."""

    def __init__(self) -> None:
        self._usage: dict[int, bytes] = {}
        self._json: dict[int, bytes] = {}

    def usage(self, n: int) -> bytes:
        """The usage-only chunk for a stream of n tokens."""
        frame = self._usage.get(n)
        if frame is None:
            frame = _event(_PREFIX + b'[],"usage":' + _usage(n) + b"}")
            self._usage[n] = frame
        return frame

    def json(self, n: int) -> bytes:
        """The whole non-streaming response (head and body) for n tokens."""
        resp = self._json.get(n)
        if resp is None:
            body = (
                b'{"id":"chatcmpl-x","object":"chat.completion","created":1,"model":"m",'
                b'"choices":[{"index":0,"message":{"role":"assistant","content":"'
                + b"tok" * n
                + b'"},"finish_reason":"stop"}],"usage":'
                + _usage(n)
                + b"}"
            )
            resp = (
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                % len(body)
                + body
            )
            self._json[n] = resp
        return resp


class Stats:
    """Counters the runner reads through GET /_stats."""

    def __init__(self) -> None:
        self.events = 0
        self.requests = 0
        self.streams = 0
        self.json = 0
        self.connections = 0

    def as_json(self) -> bytes:
        """The counters as a JSON document."""
        return orjson.dumps(self.__dict__)


class Ticker:
    """One decode loop at a fixed tick: one step per active stream per tick, late ticks not caught up."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick_s: float) -> None:
        self.loop = loop
        self.tick_s = tick_s
        self.active: set[WorkerProtocol] = set()
        self._next = loop.time() + tick_s
        loop.call_at(self._next, self._tick)

    def _tick(self) -> None:
        now = self.loop.time()
        # A late tick is not caught up (an engine does not run two steps at once).
        self._next = max(self._next + self.tick_s, now)
        self.loop.call_at(self._next, self._tick)
        if self.active:
            for proto in list(self.active):
                proto.step()


class Engine:
    """The decode loops: paced tickers (default tick, or `/t<ms>/` paths) and the unpaced spinner."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick_s: float, sat_batch: int = 1) -> None:
        self.loop = loop
        self.tick_s = tick_s
        self.sat_batch = max(1, sat_batch)
        self.tickers: dict[float, Ticker] = {}
        self.unpaced: set[WorkerProtocol] = set()
        self.wake = asyncio.Event()
        self.stats = Stats()
        self.frames = Frames()
        self._spinner = loop.create_task(self._spin())

    def queue_for(self, target: str) -> tuple[set[WorkerProtocol], bool]:
        """The set a request on this path joins, and whether it is paced."""
        if target.startswith("/sat/"):
            return self.unpaced, False
        tick_s = self.tick_s
        if target.startswith("/t") and "/" in target[2:]:
            ms = target[2 : target.index("/", 2)]
            if ms.isdigit():
                tick_s = int(ms) / 1000.0
        ticker = self.tickers.get(tick_s)
        if ticker is None:
            ticker = self.tickers[tick_s] = Ticker(self.loop, tick_s)
        return ticker.active, True

    async def _spin(self) -> None:
        while True:
            ready = [p for p in self.unpaced if not p.paused]
            if not ready:
                self.wake.clear()
                await self.wake.wait()
                continue
            for proto in ready:
                proto.step()
            await asyncio.sleep(0)


class WorkerProtocol(asyncio.Protocol):
    """One client connection: parses requests, then produces one response at a time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.paused = False
        self.remaining = 0
        self.tokens = 0
        self.include_usage = False
        self.streaming = False
        self.close_after = False
        self.batch = 1
        self.queue: set[WorkerProtocol] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.engine.stats.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.discard(self)
        self.transport = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.engine.wake.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next_request()

    def _next_request(self) -> None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).decode("latin-1")
        lines = head.split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        length = 0
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif name == "connection":
                self.close_after = "close" in value.lower()
        start = end + 4
        if chunked:
            body = self._dechunk(start)
            if body is None:
                return
        else:
            if len(buf) < start + length:
                return
            body = bytes(buf[start : start + length])
            del buf[: start + length]
        self.engine.stats.requests += 1
        self.busy = True
        self._handle(method, target, body)

    def _dechunk(self, pos: int) -> bytes | None:
        """Decode a chunked request body starting at pos; None until it is all here."""
        buf = self.buf
        parts: list[bytes] = []
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            pos = eol + 2
            if size == 0:
                end = buf.find(b"\r\n\r\n", pos - 2)
                if end < 0:
                    return None
                del buf[: end + 4]
                return b"".join(parts)
            if len(buf) < pos + size + 2:
                return None
            parts.append(bytes(buf[pos : pos + size]))
            pos += size + 2

    def _handle(self, method: str, target: str, body: bytes) -> None:
        engine = self.engine
        assert self.transport is not None
        if method == "GET" and target.startswith("/_stats"):
            doc = engine.stats.as_json()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                % len(doc)
                + doc
            )
            self._done()
            return
        try:
            req = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            req = {}
        self.tokens = max(1, int(req.get("max_tokens") or 16))
        self.streaming = bool(req.get("stream"))
        opts = req.get("stream_options") or {}
        self.include_usage = bool(opts.get("include_usage"))
        queue, paced = engine.queue_for(target)
        self.queue = queue
        self.batch = 1 if paced else engine.sat_batch
        if self.streaming:
            engine.stats.streams += 1
            self.transport.write(SSE_HEAD)
            self.transport.write(CONTENT)
            engine.stats.events += 1
            self.remaining = self.tokens - 1
        else:
            self.remaining = -1  # answer at the next step
        queue.add(self)
        if not paced:
            engine.wake.set()

    def step(self) -> None:
        """One decode step for this connection's response."""
        transport = self.transport
        if transport is None:
            return
        stats = self.engine.stats
        if self.remaining > 0:
            if self.batch > 1:
                k = min(self.batch, self.remaining)
                transport.write(CONTENT * k)
                stats.events += k
                self.remaining -= k
                return
            transport.write(CONTENT)
            stats.events += 1
            self.remaining -= 1
            return
        if self.remaining < 0:
            transport.write(self.engine.frames.json(self.tokens))
            stats.json += 1
        else:
            transport.write(FINISH)
            if self.include_usage:
                transport.write(self.engine.frames.usage(self.tokens))
                stats.events += 1
            transport.write(DONE_END)
            stats.events += 2
        self.queue.discard(self)
        self._done()

    def _done(self) -> None:
        self.busy = False
        if self.close_after and self.transport is not None:
            self.transport.close()
            return
        if self.buf:
            self._next_request()


async def serve(host: str, port: int, tick_s: float, sat_batch: int = 1) -> None:
    """Run the fake worker until cancelled; prints `READY <port>` once listening."""
    loop = asyncio.get_running_loop()
    engine = Engine(loop, tick_s, sat_batch)
    server = await loop.create_server(
        lambda: WorkerProtocol(engine), host, port, backlog=4096, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"READY {bound}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--tick-ms", type=float, default=20.0, help="decode tick for paced streams")
    ap.add_argument(
        "--sat-batch",
        type=int,
        default=1,
        help="content events per write on /sat/ paths (a saturated proxy reads a backlog anyway)",
    )
    args = ap.parse_args(argv)
    runner = uvloop.run if uvloop is not None else asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args.host, args.port, args.tick_ms / 1000.0, args.sat_batch))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
