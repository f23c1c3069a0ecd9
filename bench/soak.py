"""Soak: hours of mixed traffic through the real daemon; no RSS growth trend, no leaked sockets.

    python bench/soak.py --minutes 30 [--concurrency 16] [--interval 10]

What it is for: the long run the CI cannot afford. It starts the harness's fake
worker and the real `sidecar run` (tests/harness.py), then keeps a mix of
clients busy for `--minutes`: streaming and non-streaming chat on keep-alive
connections, JSON<->SSE translation, passthrough, clients that disconnect
mid-stream or read slowly, workers that fail mid-stream (FIN, RST, garbage,
stall), bad requests, 404s. Every `--interval` it samples the daemon's RSS
and open file descriptors (/proc/PID/fd).

At the end the traffic stops, the idle pools and keep-alive connections time
out, and the fd count must come back to its idle value (taken the same way
after the warm-up). It prints start/peak/end RSS and fd counts and the RSS
trend (least-squares slope over the second half of the run), and exits 1 if
fds leaked, the RSS trend or growth is over its bound, the daemon logged an
error, or the ledger lost a request.

What it must never do: hide a failure (any unexpected response is counted and
printed) or run in CI (it is a manual command; tests/test_resources.py has a
`-m soak` wrapper).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import (  # noqa: E402 - after the path set-up
    LAST_CHUNK,
    Close,
    Daemon,
    FakeWorker,
    RawClient,
    Reset,
    Send,
    Sleep,
    Stall,
    WorkerRequest,
    chat_body,
    chat_stream_events,
    chunk,
    daemon_config,
    http_response,
    openai_handler,
    request_bytes,
    response_head,
    sse_reply,
)

KiB = 1024
#: Bounds for a pass: the RSS slope over the second half, and end minus start (KiB).
MAX_SLOPE_KIB_PER_MIN = 512
MAX_GROWTH_KIB = 16 * 1024
POOL_IDLE = 1.0  # upstream.pool_idle_timeout: short, so the idle fd count comes back quickly
KEEPALIVE = 2.0  # limits.keepalive_timeout


def worker_handler(request: WorkerRequest) -> Any:
    """Answers by the x-soak header the client sent (the daemon forwards it)."""
    kind = request.header("x-soak") or "ok"
    body = request.json() if request.body[:1] == b"{" else {}
    stream = body.get("stream") is True
    events = chat_stream_events(("Hel", "lo", " wor", "ld"), include_usage=True)
    head = response_head(200, [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")])
    if kind == "fin":
        return [Send(head + b"".join(chunk(e) for e in events[:3])), Close()]
    if kind == "rst":
        return [Send(head + b"".join(chunk(e) for e in events[:3])), Reset()]
    if kind == "garbage":
        return [Send(head + chunk(events[0]) + b"zz\r\nnot a chunk\r\n"), Stall()]
    if kind == "stall":
        return [Send(head + chunk(events[0])), Stall()]
    if kind == "slow":
        return [Send(head), *[step for e in events for step in (Send(chunk(e)), Sleep(0.05))],
                Send(LAST_CHUNK)]
    if kind == "passthrough":
        return http_response(200, json.dumps({"object": "list", "data": []}).encode())
    if kind == "http500":
        return http_response(500, b"<html>oops</html>", [("content-type", "text/html")])
    if kind == "sse-for-json" or (stream and kind == "ok"):
        return sse_reply(events)
    return openai_handler()(request)


#: (weight, name): what a client does next.
MIX = [
    (30, "stream"), (15, "json"), (10, "translate-json-to-sse"), (10, "translate-sse-to-json"),
    (8, "passthrough"), (5, "client-disconnect"), (4, "slow-reader"), (3, "fin"), (3, "rst"),
    (3, "garbage"), (2, "stall"), (2, "http500"), (3, "bad-json"), (2, "not-found"),
]


class Load:
    """The client threads and what they saw."""

    def __init__(self, daemon: Daemon, concurrency: int) -> None:
        self.daemon = daemon
        self.concurrency = concurrency
        self.stop = threading.Event()
        self.counts: Counter[str] = Counter()
        self.problems: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True)
                        for i in range(concurrency)]
        names = [name for weight, name in MIX for _ in range(weight)]
        self.names = names

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def note(self, name: str, problem: str | None = None) -> None:
        with self.lock:
            self.counts[name] += 1
            if problem is not None:
                self.counts["problems"] += 1
                if len(self.problems) < 50:
                    self.problems.append(f"{name}: {problem}")

    def client(self, index: int) -> None:
        rng = random.Random(index)
        while not self.stop.is_set():
            try:
                with RawClient(self.daemon.address, timeout=10) as conn:
                    for _ in range(rng.randint(1, 8)):  # keep-alive: several requests per connection
                        if self.stop.is_set():
                            break
                        name = rng.choice(self.names)
                        if not self.one(conn, name):
                            break
            except (OSError, AssertionError) as exc:
                self.note("connection", f"{type(exc).__name__}: {exc}"[:300])
            except Exception as exc:  # a garbled response: count it, keep the load going
                self.note("client", f"{type(exc).__name__}: {exc}"[:300])

    def one(self, conn: RawClient, name: str) -> bool:
        """One request on `conn`; False when the connection cannot be reused."""
        target, body, soak, expect = "/v1/chat/completions", chat_body(), "ok", 200
        if name == "stream":
            body = chat_body(stream=True)
        elif name == "translate-json-to-sse":
            target, body = "/never/v1/chat/completions", chat_body(stream=True)
        elif name == "translate-sse-to-json":
            soak = "sse-for-json"
        elif name == "passthrough":
            target, body, soak = "/v1/models", None, "passthrough"
        elif name in ("client-disconnect", "slow-reader"):
            body, soak = chat_body(stream=True), "slow"
        elif name in ("fin", "rst", "garbage", "stall"):
            body, soak, expect = chat_body(stream=True), name, 200
        elif name == "http500":
            soak, expect = "http500", 500
        elif name == "bad-json":
            body, expect = b"{not json", 400  # type: ignore[assignment]
        elif name == "not-found":
            target, expect = "/nowhere", 404
        method = "GET" if body is None else "POST"
        conn.send(request_bytes(method, target, body, [("x-soak", soak)]))
        if name == "client-disconnect":
            conn.read_until(b"data: ", 10)
            conn.reset()
            self.note(name)
            return False
        if name == "slow-reader":  # a few hundred bytes at a time, with pauses
            data = b""
            while not data.endswith(b"\r\n0\r\n\r\n"):
                piece = conn.recv_some(256, timeout=10)
                if not piece:
                    break
                data += piece
                time.sleep(0.01)
            ok = data.startswith(b"HTTP/1.1 200 ") and b"data: [DONE]" in data
            self.note(name, None if ok else f"slow read got {data[-300:]!r}")
            return ok
        response = conn.read_response(10)
        problem = None
        if response.status != expect:
            problem = f"status {response.status}: {response.body[:200]!r}"
        elif name in ("fin", "rst", "garbage", "stall"):
            if b'"finish_reason":"error"' not in response.body or b"[DONE]" in response.body:
                problem = f"no error frame: {response.body[-300:]!r}"
        elif name in ("stream", "translate-json-to-sse") and b"[DONE]" not in response.body:
            problem = f"stream without [DONE]: {response.body[-300:]!r}"
        self.note(name, problem)
        closing = (response.header("connection") or "").lower() == "close"
        return response.complete and not closing


def fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def slope_per_minute(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, KiB) points, in KiB per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 60.0


def settle_fds(daemon: Daemon, timeout: float) -> int:
    """The daemon's fd count once it stops falling (idle pools and keep-alives timed out)."""
    deadline = time.monotonic() + timeout
    last = fd_count(daemon.pid)
    while time.monotonic() < deadline:
        time.sleep(POOL_IDLE + KEEPALIVE + 0.5)
        now = fd_count(daemon.pid)
        if now >= last:
            return now
        last = now
    return last


def forget_worker_history(worker: FakeWorker) -> None:
    """The fake worker records every request and connection: hours of them would fill this
    process, and its garbage collections would stall the worker's loop past idle_timeout."""
    with worker._cond:
        worker.requests.clear()
        worker.connections[:] = [c for c in worker.connections if not (c.peer_closed or c.closed_by_us)]


class LoopLag:
    """The worst scheduling delay of the fake worker's loop: a stall there is not the daemon's."""

    def __init__(self, worker: FakeWorker) -> None:
        self.worst = 0.0
        assert worker._loop is not None
        self.future = asyncio.run_coroutine_threadsafe(self.watch(), worker._loop)

    async def watch(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.05)
            self.worst = max(self.worst, time.monotonic() - before - 0.05)


def drain_logs(daemon: Daemon, errors: list[str]) -> None:
    """Keep the daemon's error lines, forget the rest (hours of access log would pile up)."""
    with daemon._cond:
        for entry in daemon.logs:
            if entry.get("level") in ("error", "critical") or "exc" in entry:
                errors.append(json.dumps(entry)[:500])
        daemon.lines.clear()
        daemon.logs.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before the start figures")
    args = parser.parse_args(argv)

    directory = Path(tempfile.mkdtemp(prefix="sidecar-soak-"))
    worker = FakeWorker().start()
    worker.default = worker_handler
    routes = [
        {"name": "chat", "match": {"path": "/v1/chat/completions", "methods": ["POST"]},
         "dialect": "openai-chat", "upstream_stream": "auto"},
        {"name": "never", "match": {"path": "/never/v1/chat/completions", "methods": ["POST"]},
         "dialect": "openai-chat", "upstream_stream": "never"},
        {"name": "rest", "match": {"path_prefix": "/v1/"}, "dialect": "passthrough"},
    ]
    config = daemon_config(
        worker.url, routes=routes,
        upstream={"idle_timeout": "1s", "response_timeout": "5s", "connect_timeout": "5s",
                  "pool_idle_timeout": f"{int(POOL_IDLE * 1000)}ms", "max_idle_connections": 32},
        limits={"keepalive_timeout": f"{int(KEEPALIVE * 1000)}ms", "max_connections": 1024,
                "header_timeout": "5s", "body_timeout": "5s"},
    )
    daemon = Daemon(config, directory, name="soak").start(30)
    errors: list[str] = []
    pid = daemon.pid
    print(f"soak: daemon pid {pid}, {args.minutes:g} min, {args.concurrency} clients, "
          f"dir {directory}", flush=True)
    idle_fds_before = fd_count(pid)
    load = Load(daemon, args.concurrency)
    lag = LoopLag(worker)
    started = time.monotonic()
    load.start()
    end = started + args.minutes * 60.0
    time.sleep(min(args.warmup, max(args.minutes * 60.0 / 4, 1.0)))
    samples: list[tuple[float, int, int]] = []  # (seconds since start, RSS KiB, fds)

    def sample() -> None:
        samples.append((time.monotonic() - started, daemon.rss_kib(), fd_count(pid)))
        drain_logs(daemon, errors)
        forget_worker_history(worker)

    sample()
    try:
        while time.monotonic() < end:
            time.sleep(max(0.0, min(args.interval, end - time.monotonic())))
            sample()
            t, rss, fds = samples[-1]
            with load.lock:
                done = sum(v for k, v in load.counts.items() if k not in ("problems", "connection"))
            print(f"  {t / 60:6.1f} min  RSS {rss} KiB  fds {fds}  requests {done}  "
                  f"problems {load.counts['problems']}  worker loop worst stall "
                  f"{lag.worst * 1000:.0f} ms", flush=True)
    finally:
        load.join()
    busy_seconds = time.monotonic() - started
    end_rss = daemon.rss_kib()
    idle_fds_after = settle_fds(daemon, 60.0)
    rss_after = daemon.rss_kib()
    drain_logs(daemon, errors)
    alive = daemon.alive()
    daemon.stop()
    lag.future.cancel()
    worker.stop()
    ledger_lines = 0
    if daemon.ledger_path is not None and daemon.ledger_path.exists():
        with daemon.ledger_path.open() as f:
            ledger_lines = sum(1 for _ in f)

    counts = dict(load.counts)
    requests = sum(v for k, v in counts.items() if k not in ("problems", "connection"))
    start_rss = samples[0][1]
    peak_rss = max(max(s[1] for s in samples), end_rss)
    half = [(t, rss) for t, rss, _ in samples if t >= samples[-1][0] / 2]
    slope = slope_per_minute(half)
    peak_fds = max(s[2] for s in samples)
    print(f"\nsoak done: {busy_seconds / 60:.1f} min, {requests} requests "
          f"({requests / busy_seconds:.0f}/s), {counts.get('problems', 0)} problems")
    print(f"  mix: {json.dumps({k: v for k, v in sorted(counts.items())})}")
    print(f"  RSS KiB: start {start_rss} (after warm-up), peak {peak_rss}, end {end_rss}, "
          f"idle after {rss_after}; trend over the second half {slope:+.0f} KiB/min")
    print(f"  fds: idle before {idle_fds_before}, start {samples[0][2]}, peak {peak_fds}, "
          f"end {samples[-1][2]}, idle after {idle_fds_after}")
    print(f"  ledger lines {ledger_lines} (requests that reached the daemon: {requests})")
    print(f"  the fake worker's loop stalled at most {lag.worst * 1000:.0f} ms "
          "(a stall near idle_timeout, 1 s, makes upstream_timeout frames that are not the daemon's)")
    failures = []
    if idle_fds_after > idle_fds_before:
        failures.append(f"fds leaked: {idle_fds_after} open when idle, {idle_fds_before} before")
    if slope > MAX_SLOPE_KIB_PER_MIN:
        failures.append(f"RSS grows {slope:.0f} KiB/min (bound {MAX_SLOPE_KIB_PER_MIN})")
    if end_rss - start_rss > MAX_GROWTH_KIB:
        failures.append(f"RSS grew {end_rss - start_rss} KiB (bound {MAX_GROWTH_KIB})")
    if counts.get("problems"):
        failures.append("unexpected responses:\n    " + "\n    ".join(load.problems[:20]))
    if errors:
        failures.append("the daemon logged errors:\n    " + "\n    ".join(errors[:20]))
    if not alive:
        failures.append("the daemon died")
    if ledger_lines < requests:
        failures.append(f"ledger has {ledger_lines} lines for {requests} requests")
    for failure in failures:
        print("FAIL: " + failure)
    if not failures:
        print("PASS: no RSS growth trend, no leaked file descriptors")
    with contextlib.suppress(OSError):
        (directory / "soak.yaml").unlink()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
