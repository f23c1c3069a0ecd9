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
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness import (
    Daemon,
    FakeWorker,
    RawClient,
    RawResponse,
    Stall,
    WorkerRequest,
    chat_body,
    chat_stream_events,
    chunk,
    free_port,
    http_response,
    metric_samples,
    metrics_text,
    openai_handler,
    request_bytes,
    sse_reply,
)

ROUTES: list[dict[str, Any]] = [
    {"name": "chat", "match": {"path": "/v1/chat/completions", "methods": ["POST"]},
     "dialect": "openai-chat", "upstream_stream": "auto"},
    {"name": "dead", "match": {"path_prefix": "/v1/dead/"}, "dialect": "passthrough",
     "upstream": {"url": f"http://127.0.0.1:{free_port()}"}},  # nobody listens there: 502
    {"name": "public", "match": {"path_prefix": "/v1/public/"}, "dialect": "passthrough"},
]


def answer(request: WorkerRequest) -> Any:
    """Chat requests like a real worker; anything else: a JSON echo of the request."""
    if request.target.startswith("/v1/chat/completions"):
        return openai_handler()(request)
    body = json.dumps({"target": request.target, "method": request.method,
                       "body": request.body.decode("latin-1")}).encode()
    return http_response(200, body)


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
    module_worker.reset()
    module_worker.default = answer
    yield module_worker
    errors = list(module_worker.errors)
    module_worker.reset()
    assert not errors, errors


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
        refused_413, not_found_404, upstream_502, upstream_504, pipelined_then_close,
        pipelined_then_fin, pipelined_then_reset, http10_client, refused_503,
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
