"""The client-side limits of SPEC "The client side", audited on a real daemon, raw bytes.

What it is for: each limit where it bites, in the cases the other client tests
(tests/test_hostile_clients.py, tests/test_proxy_core.py) leave out:

- `body_timeout` on chunked bodies cut anywhere (mid-chunk, before the last chunk,
  inside the trailers): 408 and a closed connection, and the worker never gets a
  whole request;
- `max_header_bytes` at its boundary (a head of exactly the limit is served, one
  byte more is 431, as README says), in one write or one byte at a time, and a huge
  single header line;
- `max_connections`: after every way a connection can end (resets mid-head,
  mid-body, mid-stream, every timeout, every refusal, worker failures, pipelining,
  the 503 itself), exactly `max_connections` clients are served again and one more
  gets the 503 with the error body;
- HTTP/1.0 clients (no chunked coding, the connection closed after the answer),
  HEAD and other methods on a passthrough route, `Expect: 100-continue`, and the
  keep-alive and header timeouts of a kept-alive connection.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sidecar.server import DISCARD_TIME
from tests.harness import (
    Daemon,
    FakeWorker,
    RawClient,
    RawResponse,
    Reset,
    Send,
    Stall,
    WorkerRequest,
    chat_body,
    chat_or_echo,
    chat_stream_events,
    chunk,
    free_port,
    metric_samples,
    metrics_text,
    nothing_forwarded,
    request_bytes,
    response_head,
    serving,
    sse_reply,
)

ROUTES: list[dict[str, Any]] = [
    {"name": "chat", "match": {"path": "/v1/chat/completions", "methods": ["POST"]},
     "dialect": "openai-chat", "upstream_stream": "auto"},
    {"name": "dead", "match": {"path_prefix": "/v1/dead/"}, "dialect": "passthrough",
     "upstream": {"url": f"http://127.0.0.1:{free_port()}"}},  # nobody listens there: 502
    {"name": "public", "match": {"path_prefix": "/v1/public/"}, "dialect": "passthrough"},
    {"name": "never", "match": {"path": "/never/v1/chat/completions", "methods": ["POST"]},
     "dialect": "openai-chat", "upstream_stream": "never"},
]


def head(target: str, *lines: str, method: str = "POST", version: str = "1.1") -> bytes:
    return (f"{method} {target} HTTP/{version}\r\nhost: sidecar.test\r\n"
            + "".join(line + "\r\n" for line in lines) + "\r\n").encode("latin-1")


def error_of(response: RawResponse) -> dict[str, Any]:
    """The OpenAI-shaped error object of an answer the sidecar wrote itself."""
    assert response.header("content-type") == "application/json", response.raw
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"], body
    return dict(body["error"])


def client_connections(daemon: Daemon) -> float:
    return metric_samples(metrics_text(daemon))[("sidecar_client_connections", frozenset())]


# =============================================================================================
# max_connections: every close path gives its slot back
# =============================================================================================

LIMIT = 4
SHORT = 0.4  # header_timeout, body_timeout, response_timeout (seconds)


@pytest.fixture(scope="module")
def limited(module_worker: FakeWorker, make_module_daemon: Callable[..., Daemon]) -> Daemon:
    ms = f"{int(SHORT * 1000)}ms"
    return make_module_daemon(
        worker=module_worker, routes=ROUTES,
        upstream={"response_timeout": ms, "idle_timeout": "5s"},
        limits={"max_connections": LIMIT, "header_timeout": ms, "body_timeout": ms,
                "keepalive_timeout": "600ms", "max_request_body": "64KiB", "send_timeout": "2s"},
    )


@pytest.fixture
def lw(module_worker: FakeWorker, limited: Daemon) -> Iterator[FakeWorker]:
    yield from serving(module_worker, chat_or_echo)


def exactly_the_limit_is_served(daemon: Daemon, timeout: float = 8.0) -> None:
    """Once the connections a path left have closed (a timeout may take its time), exactly
    LIMIT clients are served at once, kept alive, and one more gets a 503 with the error
    body and is closed; afterwards the open-connections gauge is back to 0."""
    deadline = time.monotonic() + timeout
    while True:
        clients = [RawClient(daemon.address, timeout=5) for _ in range(LIMIT)]
        try:
            statuses = []
            for client in clients:
                with contextlib.suppress(OSError):  # a 503 may beat the request
                    client.send(request_bytes("GET", "/v1/public/slot"))
                statuses.append(client.read_response(5).status)
            if statuses == [200] * LIMIT:
                with RawClient(daemon.address, timeout=5) as extra:
                    with contextlib.suppress(OSError):
                        extra.send(request_bytes("GET", "/v1/public/one-too-many"))
                    response = extra.read_response(5)
                    assert response.status == 503, response.raw
                    assert error_of(response)
                    assert extra.closed_by_peer(3)
                break
            assert set(statuses) <= {200, 503}, statuses
            assert time.monotonic() < deadline, f"slots never came back: {statuses}"
        finally:
            for client in clients:
                client.close()
        time.sleep(0.05)
    no_client_connections(daemon, timeout)


def no_client_connections(daemon: Daemon, timeout: float = 8.0) -> None:
    """Wait until the daemon counts no open client connection (its gauge)."""
    deadline = time.monotonic() + timeout
    while client_connections(daemon) != 0:
        assert time.monotonic() < deadline, f"gauge stuck at {client_connections(daemon)}"
        time.sleep(0.05)


def held_events(request: WorkerRequest) -> list[Any]:
    """A stream whose first events go out and whose end never comes (the worker waits)."""
    return [*sse_reply(chat_stream_events(["a", "b"])[:2], end=False), Stall()]


def reset_mid_head(daemon: Daemon, worker: FakeWorker) -> None:
    client = RawClient(daemon.address)
    client.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-le")
    time.sleep(0.05)
    client.reset()


def reset_mid_body(daemon: Daemon, worker: FakeWorker) -> None:
    client = RawClient(daemon.address)
    client.send(head("/v1/chat/completions", "Content-Length: 100") + b'{"mod')
    time.sleep(0.05)
    client.reset()


def reset_mid_chunked_passthrough_body(daemon: Daemon, worker: FakeWorker) -> None:
    client = RawClient(daemon.address)
    cut = len(worker.incomplete)
    client.send(head("/v1/public/up", "Transfer-Encoding: chunked") + chunk(b"abc"))
    time.sleep(0.05)
    client.reset()
    assert worker.wait_until(lambda: len(worker.incomplete) > cut)  # never a whole request


def reset_mid_stream(daemon: Daemon, worker: FakeWorker) -> None:
    worker.reply(held_events)
    client = RawClient(daemon.address)
    client.send(request_bytes(body=chat_body(stream=True)))
    client.read_until(b"data: ")
    client.reset()
    assert worker.wait_connection_closed(worker.requests[-1])


def fin_mid_stream(daemon: Daemon, worker: FakeWorker) -> None:
    worker.reply(held_events)
    client = RawClient(daemon.address)
    client.send(request_bytes(body=chat_body(stream=True)))
    client.read_until(b"data: ")
    client.shutdown_write()
    assert worker.wait_connection_closed(worker.requests[-1])
    client.close()


def leave_before_the_worker_head(daemon: Daemon, worker: FakeWorker) -> None:
    worker.reply([Stall()])
    client = RawClient(daemon.address)
    count = len(worker.requests) + 1
    client.send(request_bytes(body=chat_body()))
    request = worker.wait_requests(count)[-1]
    client.close()
    assert worker.wait_connection_closed(request)


def header_timeout_silent(daemon: Daemon, worker: FakeWorker) -> None:
    with RawClient(daemon.address) as client:
        assert client.closed_by_peer(SHORT + 5)
        assert bytes(client.buffer).startswith(b"HTTP/1.1 408 ")


def header_timeout_partial_head(daemon: Daemon, worker: FakeWorker) -> None:
    with RawClient(daemon.address) as client:
        client.send(b"GET /v1/public/x HTTP/1.1\r\nhost: x\r\n")
        assert client.closed_by_peer(SHORT + 5)
        assert bytes(client.buffer).startswith(b"HTTP/1.1 408 ")


def body_timeout(daemon: Daemon, worker: FakeWorker) -> None:
    with RawClient(daemon.address) as client:
        client.send(head("/v1/public/up", "Transfer-Encoding: chunked") + chunk(b"abc"))
        assert client.read_response(SHORT + 5).status == 408
        assert client.closed_by_peer(3)


def keepalive_timeout(daemon: Daemon, worker: FakeWorker) -> None:
    with RawClient(daemon.address) as client:
        client.send(request_bytes("GET", "/v1/public/first"))
        assert client.read_response().status == 200
        assert client.closed_by_peer(5)


def refused_400(daemon: Daemon, worker: FakeWorker) -> None:
    with RawClient(daemon.address) as client:
        client.send(head("/v1/public/x", "Content-Length: 2", "Transfer-Encoding: chunked") + b"{}")
        assert client.read_response().status == 400
        assert client.closed_by_peer(3)


def refused_431(daemon: Daemon, worker: FakeWorker) -> None:
    with RawClient(daemon.address) as client:
        client.send(head("/v1/public/x", f"x-pad: {'p' * 20000}", method="GET"))
        assert client.read_response().status == 431
        assert client.closed_by_peer(3)


def refused_413(daemon: Daemon, worker: FakeWorker) -> None:
    with RawClient(daemon.address) as client:
        client.send(head("/v1/chat/completions", f"Content-Length: {1 << 20}"))
        assert client.read_response().status == 413
        assert client.closed_by_peer(3)


def not_found_404(daemon: Daemon, worker: FakeWorker) -> None:
    with RawClient(daemon.address) as client:
        client.send(request_bytes("GET", "/nowhere"))
        assert client.read_response().status == 404
        client.send(request_bytes("POST", "/nowhere", chat_body()))
        assert client.read_response().status == 404
        assert client.closed_by_peer(3)  # a body it did not read: closed


def upstream_502(daemon: Daemon, worker: FakeWorker) -> None:
    with RawClient(daemon.address) as client:
        client.send(request_bytes("GET", "/v1/dead/x"))
        assert client.read_response().status == 502


def upstream_502_body_unread(daemon: Daemon, worker: FakeWorker) -> None:
    with RawClient(daemon.address) as client:
        client.send(head("/v1/dead/upload", "Content-Length: 1000") + b"x" * 10)
        response = client.read_response()
        assert response.status == 502 and response.header("connection") == "close"
        assert client.closed_by_peer(3)


def upstream_504(daemon: Daemon, worker: FakeWorker) -> None:
    worker.reply([Stall()])
    with RawClient(daemon.address) as client:
        client.send(request_bytes(body=chat_body()))
        assert client.read_response(SHORT + 5).status == 504


PIPELINED = (request_bytes("GET", "/v1/public/a") + request_bytes(body=chat_body())
             + request_bytes("GET", "/v1/public/c"))


def pipelined_then_close(daemon: Daemon, worker: FakeWorker) -> None:
    with RawClient(daemon.address) as client:
        client.send(PIPELINED)
        assert [client.read_response().status for _ in range(3)] == [200, 200, 200]


def pipelined_then_fin(daemon: Daemon, worker: FakeWorker) -> None:
    """(README: a FIN while a request is answered is a client gone; whether the FIN finds
    an exchange running or the connection between requests is a matter of timing here.)"""
    with RawClient(daemon.address) as client:
        client.send(PIPELINED)
        client.shutdown_write()
        client.read_until_close(5)


def pipelined_then_reset(daemon: Daemon, worker: FakeWorker) -> None:
    client = RawClient(daemon.address)
    client.send(request_bytes("GET", "/v1/public/a") * 3)
    client.reset()


def http10_client(daemon: Daemon, worker: FakeWorker) -> None:
    with RawClient(daemon.address) as client:
        client.send(request_bytes("GET", "/v1/public/old").replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        assert client.read_response().status == 200
        assert client.closed_by_peer(3)


def refused_503(daemon: Daemon, worker: FakeWorker) -> None:
    no_client_connections(daemon)  # the last round's clients are gone on the daemon's side too
    clients = [RawClient(daemon.address) for _ in range(LIMIT)]
    try:
        for client in clients:
            client.send(request_bytes("GET", "/v1/public/hold"))
            assert client.read_response().status == 200
        for _ in range(3):
            with RawClient(daemon.address) as extra:
                assert extra.read_response(5).status == 503
    finally:
        for client in clients:
            client.close()


CLOSE_PATHS: dict[str, Callable[[Daemon, FakeWorker], None]] = {
    f.__name__: f for f in (
        reset_mid_head, reset_mid_body, reset_mid_chunked_passthrough_body, reset_mid_stream,
        fin_mid_stream, leave_before_the_worker_head, header_timeout_silent,
        header_timeout_partial_head, body_timeout, keepalive_timeout, refused_400, refused_431,
        refused_413, not_found_404, upstream_502, upstream_502_body_unread, upstream_504,
        pipelined_then_close, pipelined_then_fin, pipelined_then_reset, http10_client,
        refused_503,
    )
}


@pytest.mark.parametrize("path", list(CLOSE_PATHS))
def test_every_close_path_gives_its_connection_slot_back(
    limited: Daemon, lw: FakeWorker, path: str
) -> None:
    """SPEC: at max_connections a new client gets a 503 with the error body, at once. The
    count of open connections must come back to its right value whichever way one ended:
    three rounds of the path (a leak of one slot per round would show), then exactly the
    limit is served and one more refused."""
    for _ in range(3):
        CLOSE_PATHS[path](limited, lw)
    exactly_the_limit_is_served(limited)


# =============================================================================================
# The other limits: one daemon for the module
# =============================================================================================

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
KEEPALIVE_TIMEOUT = 2.5
MAX_HEADER_BYTES = 16 * 1024  # the harness's max_header_bytes
REQUEST_IDS = itertools.count()


@pytest.fixture(scope="module")
def daemon(module_worker: FakeWorker, make_module_daemon: Callable[..., Daemon]) -> Daemon:
    return make_module_daemon(
        worker=module_worker, routes=ROUTES,
        limits={"header_timeout": f"{int(HEADER_TIMEOUT * 1000)}ms",
                "body_timeout": f"{int(BODY_TIMEOUT * 1000)}ms",
                "keepalive_timeout": f"{int(KEEPALIVE_TIMEOUT * 1000)}ms",
                "max_header_bytes": MAX_HEADER_BYTES, "max_request_body": "64KiB",
                "send_timeout": "3s"},
    )


@pytest.fixture
def worker(module_worker: FakeWorker, daemon: Daemon) -> Iterator[FakeWorker]:
    yield from serving(module_worker, chat_or_echo)


def new_id() -> str:
    return f"limits-{next(REQUEST_IDS)}"


def still_in_step(client: RawClient) -> None:
    """The connection takes another request and answers it."""
    client.send(request_bytes("GET", "/v1/public/after"))
    after = client.read_response()
    assert after.status == 200 and after.json()["target"] == "/v1/public/after", after.raw


# -- body_timeout on chunked bodies -----------------------------------------------------------

CHUNKED_CUTS: dict[str, bytes] = {
    "mid-chunk": chunk(b"abc") + b"10\r\nabc",
    "mid-size-line": chunk(b"abc") + b"1",
    "no-last-chunk": chunk(b"abc") + chunk(b"def"),
    "last-chunk-without-blank-line": chunk(b"abc") + b"0\r\n",
    "mid-trailers": chunk(b"abc") + b"0\r\nx-trailer: 1\r\n",
}


@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v1/public/upload"])
@pytest.mark.parametrize("cut", list(CHUNKED_CUTS))
def test_a_chunked_body_cut_anywhere_ends_at_body_timeout(
    daemon: Daemon, worker: FakeWorker, cut: str, target: str
) -> None:
    """SPEC: body_timeout counts from the end of the head; then 408 and a closed connection.
    A dialect route forwards nothing; a passthrough route, which streams the body, leaves the
    worker a request whose chunked body never ends, on a connection the daemon closes: the
    worker never gets a whole request."""
    request_id = new_id()
    with RawClient(daemon.address) as client:
        client.send(head(target, "Transfer-Encoding: chunked", "Content-Type: application/json",
                         f"X-Request-Id: {request_id}") + CHUNKED_CUTS[cut])
        started = time.monotonic()
        assert client.closed_by_peer(BODY_TIMEOUT + 5), "the connection outlived body_timeout"
        elapsed = time.monotonic() - started
        data = bytes(client.buffer)
    assert BODY_TIMEOUT * 0.8 <= elapsed <= BODY_TIMEOUT + 3, elapsed
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert f"\r\nx-request-id: {request_id}\r\n".encode() in data, data
    assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    record = daemon.ledger_for(request_id)
    assert (record["outcome"], record["status"]) == ("bad_request", 408)
    if target.startswith("/v1/public/"):
        assert worker.wait_until(lambda: len(worker.incomplete) == 1), worker.incomplete
        assert f"x-request-id: {request_id}".encode() in worker.incomplete[0]
    else:
        assert worker.incomplete == []
    nothing_forwarded(daemon, worker)


# -- max_header_bytes -------------------------------------------------------------------------


def head_of_size(size: int, request_id: str) -> bytes:
    """A GET head of exactly `size` bytes, its final blank line included."""
    start = f"GET /v1/public/sized HTTP/1.1\r\nhost: x\r\nx-request-id: {request_id}\r\nx-pad: "
    pad = size - len(start) - 4
    data = start.encode() + b"p" * pad + b"\r\n\r\n"
    assert len(data) == size
    return data


def send_in_pieces(client: RawClient, data: bytes, delivery: str) -> None:
    """One write; 64-byte packets; or all but the last 3 bytes, then each of those alone (the
    blank line that ends the head split across packets)."""
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with contextlib.suppress(OSError):  # refused and closed before the last byte went out
        if delivery == "one-write":
            client.send(data)
        elif delivery == "small-packets":
            for i in range(0, len(data), 64):
                client.send(data[i : i + 64])
        else:
            client.send(data[:-3])
            for i in range(len(data) - 3, len(data)):
                time.sleep(0.02)
                client.send(data[i : i + 1])


DELIVERIES = ["one-write", "small-packets", "blank-line-split"]


@pytest.mark.parametrize("delivery", DELIVERIES)
def test_a_head_of_exactly_max_header_bytes_is_served(
    daemon: Daemon, worker: FakeWorker, delivery: str
) -> None:
    with RawClient(daemon.address) as client:
        send_in_pieces(client, head_of_size(MAX_HEADER_BYTES, new_id()), delivery)
        response = client.read_response()
        assert response.status == 200, response.raw
        assert response.header("connection") is None
        still_in_step(client)
    assert worker.wait_requests(2)[0].target == "/v1/public/sized"


@pytest.mark.parametrize("delivery", DELIVERIES)
def test_a_head_one_byte_over_max_header_bytes_is_431(
    daemon: Daemon, worker: FakeWorker, delivery: str
) -> None:
    """README: past max_header_bytes a head is answered 431 (a refused request with its
    ledger line) and the connection is closed; nothing reaches the worker."""
    request_id = new_id()
    with RawClient(daemon.address) as client:
        send_in_pieces(client, head_of_size(MAX_HEADER_BYTES + 1, request_id), delivery)
        response = client.read_response()
        assert client.closed_by_peer(3), "the connection stayed open after the 431"
    assert response.status == 431, response.raw
    assert error_of(response)["code"] == "headers_too_large"
    assert response.header("connection") == "close"
    assert response.header("x-request-id") == request_id
    record = daemon.ledger_for(request_id)
    assert (record["outcome"], record["status"]) == ("bad_request", 431)
    nothing_forwarded(daemon, worker)


@pytest.mark.parametrize("ended", [True, False])
def test_a_huge_single_header_line_is_431_at_once(
    daemon: Daemon, worker: FakeWorker, ended: bool
) -> None:
    """One header line of 1 MiB (a whole head, or a line that never ends): refused as soon as
    the head is past max_header_bytes, not at header_timeout, and closed."""
    line = b"x-huge: " + b"h" * (1 << 20) + (b"\r\n\r\n" if ended else b"")
    with RawClient(daemon.address) as client:
        started = time.monotonic()
        with contextlib.suppress(OSError):  # the daemon closes before it has read it all
            client.send(b"GET /v1/public/huge HTTP/1.1\r\nhost: x\r\n" + line)
        response = client.read_response(HEADER_TIMEOUT + 5)
        assert client.closed_by_peer(3)
        assert time.monotonic() - started < HEADER_TIMEOUT + 3
    assert response.status == 431, response.raw
    assert error_of(response)["code"] == "headers_too_large"
    nothing_forwarded(daemon, worker)


# -- HTTP/1.0 clients ---------------------------------------------------------------------------


def http10(data: bytes) -> bytes:
    return data.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)


@pytest.mark.parametrize("connection", [None, "keep-alive"])
@pytest.mark.parametrize("kind", ["chat", "passthrough", "no-route", "bad-json"])
def test_an_http10_client_gets_a_sized_answer_and_a_closed_connection(
    daemon: Daemon, worker: FakeWorker, kind: str, connection: str | None
) -> None:
    """HTTP/1.0 knows no chunked coding: a whole answer carries its Content-Length, says
    `Connection: close` and the connection closes after it, `Connection: keep-alive` or not
    (README: sidecar keeps no HTTP/1.0 connection alive)."""
    headers = [("connection", connection)] if connection else []
    target, body = {"chat": ("/v1/chat/completions", chat_body()),
                    "passthrough": ("/v1/public/old", None),
                    "no-route": ("/nowhere", None),
                    "bad-json": ("/v1/chat/completions", b"{nope")}[kind]
    method = "GET" if body is None else "POST"
    with RawClient(daemon.address) as client:
        # a second request behind it is never answered: the connection ends with the first
        client.send(http10(request_bytes(method, target, body, headers))
                    + request_bytes("GET", "/v1/public/never"))
        response = client.read_response()
        assert client.closed_by_peer(3), "an HTTP/1.0 connection was kept open"
        rest = bytes(client.buffer)
    assert rest == b"", rest
    assert response.status == {"chat": 200, "passthrough": 200, "no-route": 404,
                               "bad-json": 400}[kind]
    assert response.header("content-length") == str(len(response.body))
    assert response.header("transfer-encoding") is None
    assert response.header("connection") == "close"
    assert "/v1/public/never" not in [r.target for r in worker.requests]


def close_delimited(response: RawResponse) -> bytes:
    """The body of an answer to an HTTP/1.0 client that has no length: read to the close,
    never chunk-framed."""
    assert response.header("transfer-encoding") is None, response.raw
    assert response.header("content-length") is None, response.raw
    assert response.header("connection") == "close"
    return response.body


STREAM_EVENTS = chat_stream_events(["Hel", "lo"], include_usage=True)


@pytest.mark.parametrize("kind", ["relayed", "json-to-sse", "passthrough", "error-frame"])
def test_a_stream_to_an_http10_client_is_close_delimited(
    daemon: Daemon, worker: FakeWorker, kind: str
) -> None:
    """No chunked coding for HTTP/1.0: the event stream is the bytes up to the close."""
    target, body = "/v1/chat/completions", chat_body(stream=True, include_usage=True)
    if kind == "json-to-sse":
        target = "/never/v1/chat/completions"
    elif kind == "passthrough":
        target, body = "/v1/public/events", None
        worker.reply(sse_reply(STREAM_EVENTS))
    elif kind == "error-frame":
        worker.reply([*sse_reply(STREAM_EVENTS[:2], end=False), Reset()])
    method = "GET" if body is None else "POST"
    with RawClient(daemon.address) as client:
        client.send(http10(request_bytes(method, target, body)))
        response = client.read_response()
        assert client.closed_by_peer(3)
    assert response.status == 200
    payload = close_delimited(response)
    assert response.header("content-type") == "text/event-stream"
    assert not payload.startswith(b"0\r\n") and b"\r\n0\r\n" not in payload, payload
    events = response.sse_json()
    if kind == "passthrough":
        assert payload == b"".join(STREAM_EVENTS)
    elif kind == "error-frame":
        assert events[-1]["error"]["code"] == "upstream_disconnected"
        assert "[DONE]" not in events
    else:
        assert events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                       if e["choices"]) == "Hello!"
        assert events[-2]["usage"]["total_tokens"] > 0


def test_http10_head_gets_no_body_and_a_closed_connection(
    daemon: Daemon, worker: FakeWorker
) -> None:
    worker.reply([Send(response_head(200, [("content-type", "text/event-stream"),
                                           ("transfer-encoding", "chunked")]))])
    with RawClient(daemon.address) as client:
        client.send(http10(request_bytes("HEAD", "/v1/public/events")))
        response = client.read_response(head_only_body=True)
        assert client.closed_by_peer(3)
        assert bytes(client.buffer) == b""
    assert response.status == 200
    assert response.header("transfer-encoding") is None
    assert response.header("connection") == "close"


# -- HEAD and other methods on a passthrough route ----------------------------------------------

HEAD_ANSWERS: dict[str, tuple[bytes, str, str | None]] = {
    # the worker's head (it sends no body), and the framing header the client then sees
    "length": (response_head(200, [("content-type", "application/json"),
                                   ("content-length", "123")]), "content-length", "123"),
    "chunked": (response_head(200, [("content-type", "text/event-stream"),
                                    ("transfer-encoding", "chunked")]),
                "transfer-encoding", "chunked"),
    "no-content": (response_head(204, []), "content-length", None),
}


@pytest.mark.parametrize("framing", list(HEAD_ANSWERS))
def test_head_on_a_passthrough_route_has_no_body_and_the_connection_stays(
    daemon: Daemon, worker: FakeWorker, framing: str
) -> None:
    """A HEAD answer's framing headers describe the GET answer it stands for, and no body
    follows: the next request on the connection is read and answered in step."""
    worker_head, name, value = HEAD_ANSWERS[framing]
    worker.reply([Send(worker_head)])
    with RawClient(daemon.address) as client:
        client.send(request_bytes("HEAD", "/v1/public/thing"))
        response = client.read_response(head_only_body=True)
        assert response.header(name) == value, response.raw
        still_in_step(client)
    first, second = worker.wait_requests(2)
    assert first.method == "HEAD" and first.body == b""
    assert first.connection == second.connection  # the worker's connection was reused too


@pytest.mark.parametrize("length", ["0", "5"])
@pytest.mark.parametrize("method", ["DELETE", "HEAD"])
def test_a_204_never_carries_a_content_length(
    daemon: Daemon, worker: FakeWorker, method: str, length: str
) -> None:
    """RFC 9110 8.6: a server MUST NOT send Content-Length in a 204 (its body is empty
    whatever a header says). A worker that sends one is not copied: undici's `request()`
    refuses a 204 with a Content-Length other than 0 (UND_ERR_RES_CONTENT_LENGTH_MISMATCH),
    and the bytes a worker sends after the head are no body of it."""
    worker.reply([Send(response_head(204, [("content-length", length)]) + b"hello"[: int(length)])])
    with RawClient(daemon.address) as client:
        client.send(request_bytes(method, "/v1/public/thing"))
        response = client.read_response(head_only_body=True)
        assert response.status == 204
        assert response.header("content-length") is None, response.raw
        assert response.body == b""
        still_in_step(client)


@pytest.mark.parametrize("chunked", [False, True])
def test_get_with_a_body_is_forwarded_with_its_body(
    daemon: Daemon, worker: FakeWorker, chunked: bool
) -> None:
    with RawClient(daemon.address) as client:
        client.send(request_bytes("GET", "/v1/public/search", b'{"q": 1}', chunked=chunked))
        response = client.read_response()
        assert response.json() == {"target": "/v1/public/search", "method": "GET",
                                   "body": '{"q": 1}'}
        still_in_step(client)
    request = worker.wait_requests(1)[0]
    assert request.header("content-length" if not chunked else "transfer-encoding") == (
        "8" if not chunked else "chunked")


@pytest.mark.parametrize("method", ["DELETE", "OPTIONS", "PUT", "PATCH"])
def test_other_methods_on_a_passthrough_route(
    daemon: Daemon, worker: FakeWorker, method: str
) -> None:
    """Forwarded as they came, no body invented (no Content-Length or Transfer-Encoding
    added to a request that had none), and the connection stays in step."""
    with RawClient(daemon.address) as client:
        client.send(request_bytes(method, "/v1/public/item/7"))
        response = client.read_response()
        assert response.json() == {"target": "/v1/public/item/7", "method": method, "body": ""}
        still_in_step(client)
    request = worker.wait_requests(1)[0]
    assert request.header("content-length") is None
    assert request.header("transfer-encoding") is None


def test_options_asterisk_matches_no_route(daemon: Daemon, worker: FakeWorker) -> None:
    with RawClient(daemon.address) as client:
        client.send(b"OPTIONS * HTTP/1.1\r\nhost: x\r\n\r\n")
        response = client.read_response()
        assert response.status == 404 and error_of(response)["code"] == "not_found"
        still_in_step(client)


# -- Expect: 100-continue ---------------------------------------------------------------------


@pytest.mark.parametrize(("target", "status"), [("/v1/chat/completions", 413),
                                                ("/v1/public/upload", 413),
                                                ("/v1/nowhere", 404)])
def test_expect_100_continue_refused_with_a_length_closes_unread(
    daemon: Daemon, worker: FakeWorker, target: str, status: int
) -> None:
    """A request refused at its head with `Expect: 100-continue` gets no 100: its final
    answer says `Connection: close` and the connection closes (the body was never asked
    for, nor read)."""
    length = 1 << 20 if status == 413 else 10
    with RawClient(daemon.address) as client:
        client.send(head(target, f"Content-Length: {length}", "Expect: 100-continue"))
        response = client.read_response(3)
        assert client.closed_by_peer(3)
    assert b"HTTP/1.1 100" not in response.raw
    assert response.status == status
    assert response.header("connection") == "close"
    assert error_of(response)
    nothing_forwarded(daemon, worker)


@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v1/public/upload"])
def test_expect_100_continue_chunked_body_over_max_request_body(
    daemon: Daemon, worker: FakeWorker, target: str
) -> None:
    """A chunked body has no length to refuse it by: the 100 goes out, and the body is cut
    at max_request_body with a 413 and a closed connection; the worker never gets it whole."""
    with RawClient(daemon.address) as client:
        client.send(head(target, "Transfer-Encoding: chunked", "Expect: 100-continue"))
        assert client.read_until(b"\r\n\r\n", 3).startswith(b"HTTP/1.1 100 ")
        with contextlib.suppress(OSError):
            for _ in range(4):
                client.send(chunk(b"a" * 32 * 1024))
        response = client.read_response(5)
        assert client.closed_by_peer(3)
    assert response.status == 413
    assert error_of(response)["code"] == "request_too_large"
    assert response.header("connection") == "close"
    nothing_forwarded(daemon, worker)


# -- keepalive_timeout and header_timeout on a kept-alive connection ----------------------------


def test_an_idle_kept_alive_connection_is_closed_quietly_at_keepalive_timeout(
    daemon: Daemon, worker: FakeWorker
) -> None:
    """README: idle up to keepalive_timeout after a response (past header_timeout), then
    closed without a word (no 408: no request had begun)."""
    with RawClient(daemon.address) as client:
        client.send(request_bytes("GET", "/v1/public/first"))
        assert client.read_response().status == 200
        answered = time.monotonic()
        assert client.closed_by_peer(KEEPALIVE_TIMEOUT + 5)
        idle = time.monotonic() - answered
        assert bytes(client.buffer) == b""
    assert KEEPALIVE_TIMEOUT * 0.8 <= idle <= KEEPALIVE_TIMEOUT + 3, idle


def test_a_head_begun_after_header_timeout_has_header_timeout_from_its_first_byte(
    daemon: Daemon, worker: FakeWorker
) -> None:
    """README: on a kept-alive connection a head that begins after header_timeout has passed
    gets header_timeout from its first byte; not finished by then, it is refused with 408."""
    request_id = new_id()
    with RawClient(daemon.address) as client:
        client.send(request_bytes("GET", "/v1/public/first"))
        assert client.read_response().status == 200
        time.sleep(HEADER_TIMEOUT + 0.3)
        client.send(f"GET /v1/public/late HTTP/1.1\r\nx-request-id: {request_id}\r\n".encode())
        began = time.monotonic()
        assert client.closed_by_peer(HEADER_TIMEOUT + 5)
        elapsed = time.monotonic() - began
        data = bytes(client.buffer)
    assert HEADER_TIMEOUT * 0.8 <= elapsed <= HEADER_TIMEOUT + 3, elapsed
    assert data.startswith(b"HTTP/1.1 408 ") and request_id.encode() in data, data
    assert [r.target for r in worker.requests] == ["/v1/public/first"]


# -- a client refused while it is still sending -----------------------------------------------

UPLOAD = 8 * 1024 * 1024  # far more than the socket buffers hold: the sidecar must read it

REFUSED_WHILE_SENDING: dict[str, tuple[bytes, int]] = {
    "413 by its length": (head("/v1/chat/completions", f"Content-Length: {UPLOAD}"), 413),
    "404 with a body": (head("/v1/nowhere", f"Content-Length: {UPLOAD}"), 404),
    "400 smuggling head": (
        head("/v1/chat/completions", f"Content-Length: {UPLOAD}", "Transfer-Encoding: chunked"),
        400,
    ),
    "431 head": (b"POST /v1/chat/completions HTTP/1.1\r\nx-big: ", 431),
}


@pytest.mark.parametrize("case", list(REFUSED_WHILE_SENDING))
def test_a_client_refused_while_it_sends_reads_the_answer_then_a_clean_close(
    daemon: Daemon, worker: FakeWorker, case: str
) -> None:
    """A request refused before its input was read (the rest of a head, a body) is answered,
    then the sidecar closes only its side and reads and drops what the client still sends
    until the client closes too, as nginx's lingering close does: every write of the client
    succeeds, and it reads the whole answer and a clean end, never a reset (which a close
    with input unread gives, and which can reach a client before it has read the answer)."""
    first, status = REFUSED_WHILE_SENDING[case]
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(first)
        sock.sendall(b"x" * UPLOAD)  # BrokenPipeError / ConnectionResetError on a reset
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while data := sock.recv(65536):  # ConnectionResetError on a reset
            received += data
    assert received.startswith(b"HTTP/1.1 %d " % status), bytes(received[:200])
    assert b"\r\nconnection: close\r\n" in received.lower()
    nothing_forwarded(daemon, worker)


def test_a_refused_client_that_never_closes_is_let_go_after_the_discard_time(
    daemon: Daemon, worker: FakeWorker
) -> None:
    """The input of a refused client is read and dropped for DISCARD_TIME at most: one that
    neither stops sending nor closes does not hold its connection for longer. Its slot of
    `max_connections` is free as soon as it was answered."""
    with RawClient(daemon.address) as client:
        client.send(head("/v1/chat/completions", "Content-Length: 100000"))
        assert client.read_response(3).status == 413
        assert client.closed_by_peer(3)  # the answer ends with the sidecar's FIN
        let_go = time.monotonic() + DISCARD_TIME
        assert client_connections(daemon) == 0
        for _ in range(3):  # read and dropped: no reset
            client.send(b"x" * 10_000)
            time.sleep(0.2)
        time.sleep(max(let_go - time.monotonic(), 0) + 1.0)
        with pytest.raises(OSError):  # closed now: a reset answers, then the pipe is broken
            for _ in range(50):
                client.send(b"x" * 10_000)
                time.sleep(0.05)
