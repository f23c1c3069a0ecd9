"""What h11 alone costs per proxied request: a floor under sidecar's CPU per request.

SPEC has sidecar speak HTTP/1.1 through h11 on both sides, and it hands h11 four heads per
request (bodies go past it): it parses the client's request head, writes the worker's request
head, parses the worker's response head and writes the client's response head. This makes
exactly those four calls, with the benchmark's own heads (the load generator's request, the
fake worker's JSON response) and the headers sidecar gives h11 (framing, keep-alive, `host`; the
others are spliced in past it), in one process, hot: the same heads over and over. The daemon
runs the same code colder, among everything else it does, so any h11-based proxy pays at
least this per request. `bench/run.py` prints it beside nginx's CPU per JSON request.

    .venv/bin/python bench/h11_floor.py [--requests N]

Prints one JSON object: {"us_per_request": ..., "requests": N}. Measures only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import h11

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakeworker import Frames
from loadgen import Workload

MAX_HEAD = 65536


def heads(tokens: int = 64) -> tuple[bytes, bytes]:
    """(the load generator's request head, the fake worker's JSON response head)."""
    request = Workload(path="/v1/chat/completions", stream=False, tokens=tokens)
    raw = request.request_bytes("127.0.0.1:8080")
    response = Frames().json(tokens)
    return (
        raw[: raw.index(b"\r\n\r\n") + 4],
        response[: response.index(b"\r\n\r\n") + 4],
    )


def one_request(client_head: bytes, worker_head: bytes, body_length: bytes) -> None:
    """The four h11 calls of one proxied request, as sidecar makes them."""
    server = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    server.receive_data(client_head)
    request = server.next_event()
    assert isinstance(request, h11.Request)
    worker = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    worker.send(
        h11.Request(
            method=request.method,
            target=request.target,
            headers=[(b"content-length", b"120"), (b"host", b"127.0.0.1:8000")],
            _parsed=True,
        )
    )
    worker.receive_data(worker_head)
    response = worker.next_event()
    assert isinstance(response, h11.Response)
    server.send(
        h11.Response(
            status_code=200, headers=[(b"content-length", body_length)], reason=b"OK", _parsed=True
        )
    )


def us_per_request(requests: int) -> float:
    """Best of three timed runs of `requests` requests, in microseconds per request."""
    client_head, worker_head = heads()
    best = float("inf")
    for _ in range(3):
        for _ in range(200):  # warm
            one_request(client_head, worker_head, b"950")
        started = time.perf_counter()
        for _ in range(requests):
            one_request(client_head, worker_head, b"950")
        best = min(best, (time.perf_counter() - started) / requests * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000)
    args = ap.parse_args(argv)
    print(json.dumps({"us_per_request": round(us_per_request(args.requests), 2),
                      "requests": args.requests}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
