"""Load generator for the benchmark: keep-alive HTTP/1.1 clients that count SSE events.

Each connection sends one pre-encoded chat request, reads the response (chunked or
Content-Length), counts `data:` events as they arrive, records time to first event and total
duration, checks the end of the response (`data: [DONE]` for streams, usage (and cost) for JSON),
then sends the next. `LoadGen` runs N such connections in the caller's event loop and exposes
counters that the runner snapshots around a measurement window.

It must never be the bottleneck: asyncio protocols, no HTTP library, no per-event JSON parsing.
It is a benchmark client, not a conforming HTTP client (no trailers, no 1xx, no pipelining).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from dataclasses import dataclass, field

import orjson

try:
    import uvloop
except ImportError:  # pragma: no cover - the venv has it
    uvloop = None  # type: ignore[assignment]


#: The headers the openai Python SDK (1.x, over httpx) sends with a chat request, between
#: Host and Content-Length, in its order and spelling.
SDK_HEADERS = (
    "Accept-Encoding: gzip, deflate\r\n"
    "Connection: keep-alive\r\n"
    "Accept: application/json\r\n"
    "Content-Type: application/json\r\n"
    "User-Agent: OpenAI/Python 1.54.4\r\n"
    "X-Stainless-Lang: python\r\n"
    "X-Stainless-Package-Version: 1.54.4\r\n"
    "X-Stainless-OS: Linux\r\n"
    "X-Stainless-Arch: x64\r\n"
    "X-Stainless-Runtime: CPython\r\n"
    "X-Stainless-Runtime-Version: 3.11.10\r\n"
    "Authorization: Bearer sk-proj-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOP\r\n"
    "X-Stainless-Async: false\r\n"
    "x-stainless-retry-count: 0\r\n"
)


@dataclass(frozen=True)
class Workload:
    """What each request asks for and how its response is checked."""

    path: str = "/v1/chat/completions"
    stream: bool = True
    tokens: int = 64
    include_usage: bool = True
    expect_events: int | None = None  # exact number of `data:` events per stream, if known
    expect_cost: bool = False  # JSON responses must carry usage.cost
    sdk_headers: bool = False  # send the header set the openai Python SDK sends (via httpx)

    def request_bytes(self, host: str) -> bytes:
        """The whole HTTP request, encoded once."""
        body: dict[str, object] = {
            "model": "m",
            "messages": [{"role": "user", "content": "Say tok a number of times."}],
            "max_tokens": self.tokens,
            "stream": self.stream,
        }
        if self.stream and self.include_usage:
            body["stream_options"] = {"include_usage": True}
        raw = orjson.dumps(body)
        if self.sdk_headers:
            head = (
                f"POST {self.path} HTTP/1.1\r\nHost: {host}\r\n{SDK_HEADERS}"
                f"Content-Length: {len(raw)}\r\n\r\n"
            )
        else:
            head = (
                f"POST {self.path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Accept: */*\r\nContent-Length: {len(raw)}\r\n\r\n"
            )
        return head.encode() + raw


@dataclass
class Counters:
    """Totals across all connections of one LoadGen."""

    events: int = 0
    responses: int = 0
    errors: int = 0
    bytes: int = 0
    ttfe_ns: list[int] = field(default_factory=list)
    duration_ns: list[int] = field(default_factory=list)
    connect_ns: list[int] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    def error(self, msg: str) -> None:
        """Count one failed response, keeping the first few messages."""
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(msg)


_HEAD, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _LENGTH = range(6)


class ClientProtocol(asyncio.Protocol):
    """One keep-alive connection; `request()` returns a future done when the response ends."""

    def __init__(self, counters: Counters, workload: Workload) -> None:
        self.c = counters
        self.w = workload
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = _HEAD
        self.left = 0
        self.tail = b""
        self.body: list[bytes] = []
        self.events = 0
        self.status = 0
        self.close_after = False
        self.fut: asyncio.Future[bool] | None = None
        self.t_sent = 0
        self.t_first = 0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.fut is not None and not self.fut.done():
            self.c.error(f"connection lost mid-response ({exc or 'EOF'})")
            self.fut.set_result(False)
        if not self.closed.done():
            self.closed.set_result(None)

    def request(self, raw: bytes) -> asyncio.Future[bool]:
        """Send one request; the future says whether the connection can be reused."""
        assert self.transport is not None
        self.fut = asyncio.get_running_loop().create_future()
        self.state = _HEAD
        self.events = 0
        self.body = []
        self.tail = b""
        self.t_first = 0
        self.t_sent = time.perf_counter_ns()
        self.transport.write(raw)
        return self.fut

    # -- response parsing -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.c.bytes += len(data)
        if self.buf:
            data = bytes(self.buf) + data
            self.buf.clear()
        pos = 0
        n = len(data)
        while pos < n:
            st = self.state
            if st == _CHUNK_DATA:
                end = pos + self.left
                if end <= n:
                    self._piece(data[pos:end])
                    self.left = 0
                    self.state = _CHUNK_CRLF
                    pos = end
                else:
                    self._piece(data[pos:])
                    self.left -= n - pos
                    return
            elif st == _CHUNK_CRLF:
                if n - pos < 2:
                    break
                pos += 2
                self.state = _CHUNK_SIZE
            elif st == _CHUNK_SIZE:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(data[pos:eol].split(b";")[0], 16)
                pos = eol + 2
                if size == 0:
                    self.state = _TRAILER
                else:
                    self.left = size
                    self.state = _CHUNK_DATA
            elif st == _HEAD:
                end = data.find(b"\r\n\r\n", pos)
                if end < 0:
                    break
                head = data[pos:end]
                pos = end + 4
                self._head(head)
            elif st == _TRAILER:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    break
                blank = eol == pos
                pos = eol + 2
                if blank:
                    self._end()
            elif st == _LENGTH:
                take = min(self.left, n - pos)
                self._piece(data[pos : pos + take])
                pos += take
                self.left -= take
                if self.left == 0:
                    self._end()
            else:  # idle: bytes nobody asked for
                self.c.error(f"unexpected bytes between responses: {data[pos : pos + 60]!r}")
                return
        if pos < n:
            self.buf += data[pos:]

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.status = int(lines[0][9:12])
        chunked = False
        length = -1
        self.close_after = lines[0].startswith(b"HTTP/1.0")
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"content-length":
                length = int(value)
            elif name == b"connection":
                self.close_after = b"close" in value.lower()
        if chunked:
            self.state = _CHUNK_SIZE
        elif length >= 0:
            self.left = length
            self.state = _LENGTH
            if length == 0:
                self._end()
        else:  # read to EOF: not supported by this client
            self.close_after = True
            self.state = _LENGTH
            self.left = 1 << 62

    def _piece(self, piece: bytes) -> None:
        n = piece.count(b"data:")
        if self.tail:
            n += (self.tail + piece[:4]).count(b"data:")
        if n:
            if not self.t_first:
                self.t_first = time.perf_counter_ns()
            self.events += n
            self.c.events += n
        if len(piece) >= 32:
            self.tail = piece[-4:]
            if self.w.stream:
                self.body = [piece[-32:]]
            else:
                self.body.append(piece)
        else:
            self.tail = (self.tail + piece)[-4:]
            self.body.append(piece)
            if self.w.stream and len(self.body) > 8:
                del self.body[:-8]

    def _end(self) -> None:
        now = time.perf_counter_ns()
        self.state = -1
        c = self.c
        body = b"".join(self.body)
        ok = self.status == 200
        if not ok:
            c.error(f"status {self.status}: {body[:200]!r}")
        elif self.w.stream:
            if not body.rstrip().endswith(b"data: [DONE]"):
                ok = False
                c.error(f"stream did not end with [DONE]: ...{body[-200:]!r}")
            elif self.w.expect_events is not None and self.events != self.w.expect_events:
                ok = False
                c.error(f"stream had {self.events} events, expected {self.w.expect_events}")
        else:
            try:
                doc = orjson.loads(body)
                usage = doc["usage"]
                if usage["completion_tokens"] != self.w.tokens:
                    raise ValueError(f"completion_tokens {usage['completion_tokens']}")
                if self.w.expect_cost and "cost" not in usage:
                    raise ValueError("no usage.cost")
            except (ValueError, KeyError, TypeError) as exc:
                ok = False
                c.error(f"bad JSON response ({exc}): {body[:200]!r}")
        if ok:
            c.responses += 1
            if self.t_first:
                c.ttfe_ns.append(self.t_first - self.t_sent)
            c.duration_ns.append(now - self.t_sent)
        fut = self.fut
        self.fut = None
        if fut is not None and not fut.done():
            fut.set_result(not self.close_after)
        if self.close_after and self.transport is not None:
            self.transport.close()


class LoadGen:
    """N keep-alive connections, each sending requests back to back until stopped."""

    def __init__(
        self,
        host: str,
        port: int,
        workload: Workload,
        conns: int,
        *,
        stagger_s: float = 0.0,
        requests_per_conn: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.workload = workload
        self.conns = conns
        self.stagger_s = stagger_s
        self.requests_per_conn = requests_per_conn
        self.counters = Counters()
        self.raw = workload.request_bytes(f"{host}:{port}")
        self._stop = False
        self._tasks: list[asyncio.Task[None]] = []
        self._protos: list[ClientProtocol] = []

    def start(self) -> None:
        """Start all connections (in the running loop)."""
        for i in range(self.conns):
            delay = self.stagger_s * i / self.conns if self.stagger_s else 0.0
            self._tasks.append(asyncio.get_running_loop().create_task(self._run(delay)))

    async def _connect(self) -> ClientProtocol:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter_ns()
        _, proto = await loop.create_connection(
            lambda: ClientProtocol(self.counters, self.workload), self.host, self.port
        )
        self.counters.connect_ns.append(time.perf_counter_ns() - t0)
        self._protos.append(proto)
        return proto

    async def _run(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        done = 0
        proto: ClientProtocol | None = None
        try:
            while not self._stop:
                if self.requests_per_conn is not None and done >= self.requests_per_conn:
                    break
                if proto is None or proto.transport is None:
                    try:
                        proto = await self._connect()
                    except OSError as exc:
                        self.counters.error(f"connect: {exc}")
                        await asyncio.sleep(0.05)
                        continue
                reusable = await proto.request(self.raw)
                done += 1
                if not reusable:
                    if proto.transport is not None:
                        proto.transport.close()
                    proto = None
        finally:
            if proto is not None and proto.transport is not None:
                proto.transport.close()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for every connection to finish its requests; False on timeout."""
        _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        return not pending

    async def abort(self) -> None:
        """Stop now: cancel the loops and reset every connection, mid-response or not."""
        self._stop = True
        for task in self._tasks:
            task.cancel()
        for proto in self._protos:
            if proto.transport is not None:
                proto.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def percentile(values: list[int], q: float) -> float:
    """The q-th percentile (0..100) of values, nearest-rank; nan when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100.0 * (len(s) - 1))))
    return float(s[k])


async def _cli(args: argparse.Namespace) -> dict[str, object]:
    wl = Workload(
        path=args.path,
        stream=not args.json,
        tokens=args.tokens,
        expect_events=(args.tokens + 3) if (not args.json and args.check_events) else None,
        expect_cost=args.expect_cost,
        sdk_headers=args.sdk_headers,
    )
    gen = LoadGen(
        args.host,
        args.port,
        wl,
        args.conns,
        stagger_s=args.stagger,
        requests_per_conn=args.requests if args.requests else None,
    )
    cpu0 = time.process_time_ns()
    t0 = time.perf_counter_ns()
    gen.start()
    if args.requests:
        finished = await gen.wait(timeout=args.duration or None)
        if not finished:
            await gen.abort()
    else:
        await asyncio.sleep(args.duration)
        await gen.abort()
    t1 = time.perf_counter_ns()
    c = gen.counters
    return {
        "events": c.events,
        "responses": c.responses,
        "errors": c.errors,
        "error_samples": c.error_samples,
        "seconds": (t1 - t0) / 1e9,
        "cpu_ns": time.process_time_ns() - cpu0,
        "ttfe_p50_ms": percentile(c.ttfe_ns, 50) / 1e6,
        "duration_max_ms": (max(c.duration_ns) / 1e6) if c.duration_ns else None,
    }


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: run a load and print a JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/v1/chat/completions")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true", help="non-streaming requests")
    ap.add_argument("--requests", type=int, default=0, help="per connection; 0 = run --duration")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--stagger", type=float, default=0.0, help="spread connection starts (s)")
    ap.add_argument("--check-events", action="store_true", help="expect tokens+3 events/stream")
    ap.add_argument("--expect-cost", action="store_true")
    ap.add_argument(
        "--sdk-headers", action="store_true", help="send the openai Python SDK's header set"
    )
    args = ap.parse_args(argv)
    runner = uvloop.run if uvloop is not None else asyncio.run
    result = runner(_cli(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
