"""Hostile clients against the real daemon (issue 9; SPEC "The client side" is the contract).

Request smuggling vectors are refused with 400, the connection is closed and
nothing reaches the worker; slow-loris heads are cut at header_timeout and
trickling bodies at body_timeout (408 where a response can still be written);
pipelined requests are answered in order; Expect: 100-continue works; past
max_connections a new client gets a fast 503; route matching cannot be
bypassed with `//`, dot segments, encoded slashes or dots, or a query string.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    Daemon,
    FakeWorker,
    RawClient,
    RawResponse,
    Sleep,
    WorkerIO,
    WorkerRequest,
    chat_body,
    chat_completion,
    chat_or_echo,
    chat_stream_events,
    chunk,
    json_reply,
    metric_samples,
    metrics_text,
    nothing_forwarded,
    openai_handler,
    request_bytes,
    response_head,
    serving,
)

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0

ROUTES = [
    {"name": "chat", "match": {"path": "/v1/chat/completions", "methods": ["POST"]},
     "dialect": "openai-chat", "upstream_stream": "auto"},
    {"name": "public", "match": {"path_prefix": "/v1/public/"}, "dialect": "passthrough"},
]


@pytest.fixture(scope="module")
def daemon(module_worker: FakeWorker, make_module_daemon: Callable[..., Daemon]) -> Daemon:
    return make_module_daemon(
        worker=module_worker, routes=ROUTES,
        limits={"header_timeout": f"{int(HEADER_TIMEOUT * 1000)}ms",
                "body_timeout": f"{int(BODY_TIMEOUT * 1000)}ms", "keepalive_timeout": "3s",
                "send_timeout": "3s"},
    )


@pytest.fixture
def worker(module_worker: FakeWorker, daemon: Daemon) -> Iterator[FakeWorker]:
    yield from serving(module_worker, chat_or_echo)


def error_of(response: RawResponse) -> dict[str, Any]:
    """The OpenAI-shaped error object of a response the sidecar answered itself."""
    assert response.header("content-type") == "application/json", response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["code"], str) and error["code"]
    return error


# =============================================================================================
# Request smuggling: 400, closed, never forwarded
# =============================================================================================

SMUGGLED = b"GET /v1/public/smuggled HTTP/1.1\r\nhost: x\r\n\r\n"


def head(target: str, *lines: str, method: str = "POST") -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nhost: sidecar.test\r\n" + "".join(line + "\r\n" for line in lines)
            + "\r\n").encode("latin-1")


SMUGGLING: dict[str, bytes] = {
    "cl-and-te": head("{t}", "Content-Length: 4", "Transfer-Encoding: chunked") + b"0\r\n\r\n" + SMUGGLED,
    "te-and-cl": head("{t}", "Transfer-Encoding: chunked", "Content-Length: 40") + b"0\r\n\r\n" + SMUGGLED,
    "te-and-cl-zero-odd-case": head("{t}", "transfer-ENCODING: Chunked", "content-length: 0")
    + b"0\r\n\r\n" + SMUGGLED,
    "two-differing-cl": head("{t}", "Content-Length: 2", "Content-Length: 47") + b"{}" + SMUGGLED,
    "cl-list-differing": head("{t}", "Content-Length: 2, 47") + b"{}" + SMUGGLED,
    "te-gzip": head("{t}", "Transfer-Encoding: gzip") + b"0\r\n\r\n" + SMUGGLED,
    "te-identity": head("{t}", "Transfer-Encoding: identity") + b"{}" + SMUGGLED,
    "te-gzip-chunked": head("{t}", "Transfer-Encoding: gzip, chunked") + b"0\r\n\r\n" + SMUGGLED,
    "te-chunked-gzip": head("{t}", "Transfer-Encoding: chunked, gzip") + b"0\r\n\r\n" + SMUGGLED,
    "te-chunked-twice": head("{t}", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked")
    + b"0\r\n\r\n" + SMUGGLED,
    "te-chunked-and-identity": head("{t}", "Transfer-Encoding: chunked", "Transfer-Encoding: identity")
    + b"0\r\n\r\n" + SMUGGLED,
    "te-xchunked": head("{t}", "Transfer-Encoding: xchunked") + b"0\r\n\r\n" + SMUGGLED,
    "obs-fold-space": head("{t}", "Content-Length: 2", "X-Folded: a", " b") + b"{}",
    "obs-fold-tab": head("{t}", "Content-Length: 2", "X-Folded: a", "\tb") + b"{}",
    "obs-fold-te": head("{t}", "Content-Length: 2", "Transfer-Encoding:", " chunked") + b"{}",
    "space-before-colon-te": head("{t}", "Transfer-Encoding : chunked", "Content-Length: 2") + b"{}",
    "tab-before-colon-cl": head("{t}", "Content-Length\t: 2") + b"{}",
    "space-before-colon-other": head("{t}", "Content-Length: 2", "X-Api-Key : k") + b"{}",
    "cl-plus-sign": head("{t}", "Content-Length: +2") + b"{}",
    "cl-hex": head("{t}", "Content-Length: 0x2") + b"{}",
    "nul-in-header": head("{t}", "Content-Length: 2", "X-Nul: a\x00b") + b"{}",
}
ABSOLUTE_FORM: dict[str, bytes] = {
    "absolute-http": head("http://127.0.0.1/v1/chat/completions", "Content-Length: 2") + b"{}",
    "absolute-https": head("https://sidecar.test/v1/public/x", method="GET"),
    "absolute-other-host": head("http://evil.example:8000/v1/public/x", method="GET"),
    "connect": head("127.0.0.1:8000", method="CONNECT"),
    "connect-443": head("evil.example:443", method="CONNECT"),
    "authority-form-get": head("evil.example:80", method="GET"),
}


def refused(daemon: Daemon, data: bytes, status: int = 400) -> RawResponse:
    """Send `data` (with an x-request-id of its own); the daemon answers `status` with an
    error body and that id, closes the connection, and records the refused request."""
    request_id = f"refused-{next(REFUSED_IDS)}"
    line_end = data.index(b"\n") + 1
    data = data[:line_end] + f"X-Request-Id: {request_id}\r\n".encode() + data[line_end:]
    with RawClient(daemon.address, timeout=5) as client:
        with contextlib.suppress(OSError):  # closed before we finished writing
            client.send(data)
        response = client.read_response(5)
        # ... whose line is written before the client has its answer, as every request's
        assert request_id in {r["request_id"] for r in daemon.ledger()}, "no line yet"
        assert client.closed_by_peer(3), f"the daemon kept the connection open after a {status}"
    assert response.status == status, response.raw
    assert error_of(response)
    assert response.header("x-request-id") == request_id
    # a refused request is a finished request: one ledger line (SPEC "Ledger")
    record = daemon.ledger_for(request_id)
    assert (record["outcome"], record["status"], record["route"]) == ("bad_request", status, None)
    assert record["duration_ms"] >= 0 and record["ttfb_ms"] == record["duration_ms"]
    return response


REFUSED_IDS = itertools.count()


@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v1/public/echo"])
@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_smuggling_vectors_are_refused_and_never_forwarded(
    daemon: Daemon, worker: FakeWorker, name: str, target: str
) -> None:
    refused(daemon, SMUGGLING[name].replace(b"{t}", target.encode()))
    nothing_forwarded(daemon, worker)


@pytest.mark.parametrize("name", sorted(ABSOLUTE_FORM))
def test_absolute_and_authority_form_targets_are_refused(
    daemon: Daemon, worker: FakeWorker, name: str
) -> None:
    refused(daemon, ABSOLUTE_FORM[name])
    nothing_forwarded(daemon, worker)


@pytest.mark.parametrize("version", [b"2.0", b"0.9", b"3.1"])
def test_a_request_in_another_major_http_version_is_refused_with_505(
    daemon: Daemon, worker: FakeWorker, version: bytes
) -> None:
    # nginx answers 505 too; h11 would read `HTTP/2.0` and serve it as HTTP/1.1
    data = request_bytes("GET", "/v1/public/v").replace(b" HTTP/1.1\r\n", b" HTTP/" + version + b"\r\n", 1)
    response = refused(daemon, data, status=505)
    error = error_of(response)
    assert f"HTTP/{version.decode()}" in error["message"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "http_version_not_supported")
    nothing_forwarded(daemon, worker)


def test_a_head_past_max_header_bytes_is_refused_with_431(daemon: Daemon, worker: FakeWorker) -> None:
    big = head("/v1/chat/completions", *(f"X-Pad-{i}: {'p' * 200}" for i in range(100)))
    assert len(big) > 16 * 1024  # the harness's max_header_bytes
    refused(daemon, big, status=431)
    nothing_forwarded(daemon, worker)


def test_smuggling_after_a_good_request_on_the_same_connection(
    daemon: Daemon, worker: FakeWorker
) -> None:
    """A keep-alive connection that turns hostile: the first request is served, the second refused."""
    good = request_bytes("GET", "/v1/public/first")
    bad = SMUGGLING["cl-and-te"].replace(b"{t}", b"/v1/public/echo")
    with RawClient(daemon.address) as client:
        client.send(good + bad)
        assert client.read_response().status == 200
        second = client.read_response()
        assert second.status == 400
        assert client.closed_by_peer(3)
    assert [r.target for r in worker.wait_requests(1)] == ["/v1/public/first"]
    time.sleep(0.2)
    assert [r.target for r in worker.requests] == ["/v1/public/first"]


def test_identical_duplicate_content_lengths_are_one_length(daemon: Daemon, worker: FakeWorker) -> None:
    """RFC 9110 8.6: identical values may be folded into one (only *differing* ones are refused)."""
    body = json.dumps(chat_body()).encode()
    data = head("/v1/chat/completions", f"Content-Length: {len(body)}", f"Content-Length: {len(body)}",
                "Content-Type: application/json") + body
    with RawClient(daemon.address) as client:
        client.send(data)
        response = client.read_response()
    assert response.status in (200, 400), response.raw
    if response.status == 200:
        assert worker.wait_requests(1)[0].json()["messages"] == chat_body()["messages"]


# =============================================================================================
# Slow clients: header_timeout, body_timeout
# =============================================================================================


def dribble_until_closed(client: RawClient, data: bytes, interval: float, limit: float) -> float:
    """Send `data` one byte every `interval` until the daemon closes; seconds it took."""
    started = time.monotonic()
    for i in range(len(data)):
        try:
            client.send(data[i : i + 1])
        except OSError:
            return time.monotonic() - started
        if client.closed_by_peer(interval):
            return time.monotonic() - started
        if time.monotonic() - started > limit:
            break
    raise AssertionError("the daemon kept a dribbling client past the limit")


def closed_with_408_or_nothing(client: RawClient) -> None:
    rest = bytes(client.buffer)
    assert rest == b"" or rest.startswith(b"HTTP/1.1 408 "), rest


def test_slow_loris_head_is_cut_at_header_timeout(daemon: Daemon, worker: FakeWorker) -> None:
    with RawClient(daemon.address) as client:
        elapsed = dribble_until_closed(client, request_bytes("POST", "/v1/chat/completions",
                                                            chat_body()) * 4, 0.05, 10)
        closed_with_408_or_nothing(client)
    assert HEADER_TIMEOUT * 0.8 <= elapsed <= HEADER_TIMEOUT + 3, elapsed
    time.sleep(0.1)
    assert worker.requests == []


def test_slow_loris_on_a_kept_alive_connection(daemon: Daemon, worker: FakeWorker) -> None:
    """header_timeout also bounds the next head on a keep-alive connection."""
    with RawClient(daemon.address) as client:
        client.send(request_bytes("GET", "/v1/public/first"))
        assert client.read_response().status == 200
        elapsed = dribble_until_closed(client, request_bytes("GET", "/v1/public/second") * 8, 0.05, 10)
        closed_with_408_or_nothing(client)
    assert elapsed <= HEADER_TIMEOUT + 3, elapsed
    time.sleep(0.1)
    assert [r.target for r in worker.requests] == ["/v1/public/first"]


def test_next_head_is_due_header_timeout_after_the_previous_response(
    daemon: Daemon, worker: FakeWorker
) -> None:
    """SPEC: header_timeout counts from the end of the previous response; a head begun
    after a pause is due when the pause began, not a header_timeout after its first byte."""
    pause = HEADER_TIMEOUT * 0.6
    with RawClient(daemon.address) as client:
        client.send(request_bytes("GET", "/v1/public/first"))
        assert client.read_response().status == 200
        answered = time.monotonic()
        time.sleep(pause)
        client.send(b"GET /v1/public/second HTTP/1.1\r\n")
        assert client.closed_by_peer(HEADER_TIMEOUT + 3)
        elapsed = time.monotonic() - answered
        closed_with_408_or_nothing(client)
    assert HEADER_TIMEOUT * 0.8 <= elapsed < HEADER_TIMEOUT + pause * 0.5, elapsed


def test_a_kept_alive_connection_idle_past_header_timeout_is_still_served(
    daemon: Daemon, worker: FakeWorker
) -> None:
    """The idle wait for the next request is keepalive_timeout: a head that begins after
    header_timeout has its own header_timeout, counted from its first byte."""
    with RawClient(daemon.address) as client:
        client.send(request_bytes("GET", "/v1/public/first"))
        assert client.read_response().status == 200
        time.sleep(HEADER_TIMEOUT + 0.3)
        client.send(b"GET /v1/public/second HTTP/1.1\r\n")
        time.sleep(0.2)
        client.send(b"host: x\r\n\r\n")
        assert client.read_response().status == 200
    assert [r.target for r in worker.requests] == ["/v1/public/first", "/v1/public/second"]


def test_a_silent_connection_is_closed_at_header_timeout(daemon: Daemon, worker: FakeWorker) -> None:
    """Counted from the connection's start; a 408 first, as a response can still be written."""
    with RawClient(daemon.address) as client:
        started = time.monotonic()
        assert client.closed_by_peer(HEADER_TIMEOUT + 3)
        elapsed = time.monotonic() - started
        data = bytes(client.buffer)
    assert HEADER_TIMEOUT * 0.8 <= elapsed <= HEADER_TIMEOUT + 3, elapsed
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"


def test_a_head_cut_at_header_timeout_is_a_refused_request(daemon: Daemon, worker: FakeWorker) -> None:
    partial = b"POST /v1/chat/completions HTTP/1.1\r\nX-Request-Id: half-head\r\nHost: x\r\n"
    with RawClient(daemon.address) as client:
        client.send(partial)
        assert client.closed_by_peer(HEADER_TIMEOUT + 3)
        data = bytes(client.buffer)
    assert data.startswith(b"HTTP/1.1 408 ") and b"\r\nx-request-id: half-head\r\n" in data, data
    record = daemon.ledger_for("half-head")
    assert (record["outcome"], record["status"]) == ("bad_request", 408)
    assert record["duration_ms"] >= HEADER_TIMEOUT * 800


def test_head_bytes_beyond_header_timeout_are_not_an_excuse(daemon: Daemon, worker: FakeWorker) -> None:
    """A client that keeps sending blank lines and header lines forever is still cut."""
    junk = b"\r\n" * 200 + b"GET /v1/public/x HTTP/1.1\r\n" + b"x-pad: y\r\n" * 500
    with RawClient(daemon.address) as client:
        elapsed = dribble_until_closed(client, junk, 0.02, 10)
    assert elapsed <= HEADER_TIMEOUT + 3, elapsed


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v1/public/upload"])
def test_trickling_body_is_cut_at_body_timeout(
    daemon: Daemon, worker: FakeWorker, framing: str, target: str
) -> None:
    body = json.dumps(chat_body()).encode()
    if framing == "length":
        start = head(target, f"Content-Length: {len(body)}", "Content-Type: application/json")
        rest = body
    else:
        start = head(target, "Transfer-Encoding: chunked", "Content-Type: application/json")
        rest = b"".join(chunk(body[i : i + 1]) for i in range(len(body))) + b"0\r\n\r\n"
    with RawClient(daemon.address) as client:
        client.send(start)
        elapsed = dribble_until_closed(client, rest, 0.1, 10)
        data = bytes(client.buffer)
    assert BODY_TIMEOUT * 0.8 <= elapsed <= BODY_TIMEOUT + 3, elapsed
    assert data.startswith(b"HTTP/1.1 408 "), data
    status_body = data.partition(b"\r\n\r\n")[2]
    assert json.loads(status_body)["error"]["code"], status_body
    if target.startswith("/v1/chat"):
        time.sleep(0.1)
        assert worker.requests == []  # a dialect reads the whole body before forwarding
    else:
        # passthrough streams the body: whatever reached the worker, its connection is closed
        assert worker.wait_until(lambda: worker.accepted == 0 or worker.peer_closed == worker.accepted, 3)


# =============================================================================================
# Pipelining, Expect: 100-continue
# =============================================================================================


def test_pipelined_requests_are_answered_in_order(daemon: Daemon, worker: FakeWorker) -> None:
    slow_first = [Sleep(0.3), *openai_handler()(_fake_request(chat_body()))]
    worker.reply(slow_first)  # the first answer comes last from the worker's point of view
    requests = [
        request_bytes("POST", "/v1/chat/completions", chat_body(), [("x-request-id", "pipe-1")]),
        request_bytes("GET", "/v1/public/two", None, [("x-request-id", "pipe-2")]),
        request_bytes("POST", "/v1/chat/completions", chat_body(stream=True),
                      [("x-request-id", "pipe-3")]),
        request_bytes("POST", "/v1/public/four", b"abc", [("x-request-id", "pipe-4")], chunked=True),
        request_bytes("GET", "/v1/public/five?q=1", None, [("x-request-id", "pipe-5")]),
    ]
    with RawClient(daemon.address) as client:
        client.send(b"".join(requests))
        responses = [client.read_response() for _ in requests]
    assert [r.header("x-request-id") for r in responses] == [f"pipe-{i}" for i in range(1, 6)]
    assert [r.status for r in responses] == [200] * 5
    assert responses[0].json()["object"] == "chat.completion"
    assert responses[1].json()["target"] == "/v1/public/two"
    assert responses[2].sse()[-1] == "[DONE]"
    assert responses[3].json() == {"target": "/v1/public/four", "method": "POST", "body": "abc"}
    assert responses[4].json()["target"] == "/v1/public/five?q=1"


def test_blank_lines_before_a_request_line_are_ignored(daemon: Daemon, worker: FakeWorker) -> None:
    """RFC 9112 2.2: CRLF or LF lines before a request line, in the read of the request or
    in reads of their own (a CR alone, its LF in the next read), at the connection's start
    and between requests, are skipped; a CR followed by anything else is no blank line."""
    def get(n: int) -> bytes:
        return request_bytes("GET", f"/v1/public/b{n}", None, [("x-request-id", f"blank-{n}")])

    with RawClient(daemon.address) as client:
        client.send(b"\r\n\n\r\n" + get(1))
        assert client.read_response().header("x-request-id") == "blank-1"
        for piece in (b"\r", b"\n", b"\n", b"\r\n\r"):
            client.send(piece)
            time.sleep(0.05)
        client.send(b"\n" + get(2) + b"\n\r\n" + get(3))
        assert client.read_response().header("x-request-id") == "blank-2"
        assert client.read_response().header("x-request-id") == "blank-3"
        client.send(b"\r" + get(4))
        assert client.read_response().status == 400


def test_pipelined_request_after_an_error_the_sidecar_answers(daemon: Daemon, worker: FakeWorker) -> None:
    """After a 404 the daemon may close; if it does, it says so, and never serves the rest out of order."""
    with RawClient(daemon.address) as client:
        client.send(request_bytes("GET", "/nowhere", None, [("x-request-id", "p-404")])
                    + request_bytes("GET", "/v1/public/after", None, [("x-request-id", "p-ok")]))
        first = client.read_response()
        assert first.status == 404 and first.header("x-request-id") == "p-404"
        if (first.header("connection") or "").lower() == "close":
            assert client.closed_by_peer(3)
        else:
            second = client.read_response()
            assert second.status == 200 and second.header("x-request-id") == "p-ok"


def _fake_request(body: dict[str, Any]) -> WorkerRequest:
    return WorkerRequest("POST", "/v1/chat/completions", [], json.dumps(body).encode(), b"", 0, 0)


@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v1/public/upload"])
def test_expect_100_continue(daemon: Daemon, worker: FakeWorker, target: str) -> None:
    body = json.dumps(chat_body()).encode()
    with RawClient(daemon.address) as client:
        client.send(head(target, f"Content-Length: {len(body)}", "Content-Type: application/json",
                         "Expect: 100-continue"))
        interim = client.read_until(b"\r\n\r\n", 3)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
        client.send(body)
        response = client.read_response()
    assert response.status == 200
    request = worker.wait_requests(1)[0]
    assert request.header("expect") is None  # hop-by-hop: the worker is not asked again
    assert request.json() == chat_body() or request.json()["messages"] == chat_body()["messages"]


def test_expect_100_continue_body_sent_without_waiting(daemon: Daemon, worker: FakeWorker) -> None:
    body = json.dumps(chat_body()).encode()
    with RawClient(daemon.address) as client:
        client.send(head("/v1/chat/completions", f"Content-Length: {len(body)}",
                         "Content-Type: application/json", "Expect: 100-continue") + body)
        response = client.read_response()  # a 100 in between is skipped
        assert response.status == 200
        client.send(request_bytes("GET", "/v1/public/next"))
        assert client.read_response().status == 200  # the connection is still in step


@pytest.mark.parametrize("case", ["too-large", "no-route"])
def test_expect_100_continue_refused_without_reading_the_body(
    daemon: Daemon, worker: FakeWorker, case: str
) -> None:
    target, length, status = {"too-large": ("/v1/chat/completions", 50 * 1024 * 1024, 413),
                              "no-route": ("/v1/nowhere", 10, 404)}[case]
    with RawClient(daemon.address) as client:
        client.send(head(target, f"Content-Length: {length}", "Expect: 100-continue"))
        response = client.read_response(3)
    assert response.status == status
    assert b"HTTP/1.1 100" not in response.raw
    assert worker.requests == []


# =============================================================================================
# max_connections: a fast 503, never a queue
# =============================================================================================


def test_past_max_connections_new_clients_get_a_fast_503(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    limit = 4
    daemon = make_daemon(worker=worker, limits={"max_connections": limit},
                         upstream={"idle_timeout": "30s"})
    release = []

    async def streaming(request: WorkerRequest, io: WorkerIO) -> None:
        events = chat_stream_events()
        await io.send(response_head(200, [("content-type", "text/event-stream"),
                                          ("transfer-encoding", "chunked")]) + chunk(events[0]))
        while not release and io.open:
            await io.sleep(0.02)
        for event in events[1:]:
            await io.send(chunk(event))
        await io.send(b"0\r\n\r\n")

    worker.default = streaming
    busy = [RawClient(daemon.address) for _ in range(limit)]
    try:
        for client in busy:
            client.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=True)))
        for client in busy:
            client.read_until(b"data: ")  # each one is mid-stream
        for _ in range(10):
            started = time.monotonic()
            with RawClient(daemon.address, timeout=5) as extra:
                with contextlib.suppress(OSError):  # the 503 and close may beat our request
                    extra.send(request_bytes("GET", "/v1/models"))
                response = extra.read_response(5)
                assert extra.closed_by_peer(2)
            assert time.monotonic() - started < 2.0, "the 503 was not immediate"
            assert response.status == 503
            assert error_of(response)
        release.append(True)
        for client in busy:  # the streams in flight were not disturbed
            assert b"[DONE]" in client.read_until(b"0\r\n\r\n", 5)
    finally:
        release.append(True)
        for client in busy:
            client.close()
    deadline = time.monotonic() + 5
    while True:  # the slots come back
        with RawClient(daemon.address) as client:
            client.send(request_bytes("GET", "/v1/models"))
            status = client.read_response().status
        if status != 503:
            break
        assert time.monotonic() < deadline, "connection slots never came back"
        time.sleep(0.05)
    assert status in (200, 599)  # served (the worker answers /v1/models with its default)


def test_a_burst_past_max_connections_is_answered_at_once(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    """Hundreds of clients arrive while the daemon's loop is stalled (a GC pause, a busy
    moment): once it runs again every one is served or refused with 503 at once. None is
    left in SYN retransmits or reset because the listen backlog overflowed."""
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    if somaxconn < 1024:
        pytest.skip(f"net.core.somaxconn is {somaxconn}: the kernel caps every backlog below 1024")
    burst = 400
    daemon = make_daemon(worker=worker, limits={"max_connections": 64})
    socks = []
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        for _ in range(burst):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(daemon.address)
            socks.append(sock)
        time.sleep(0.3)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.send(request_bytes("GET", "/v1/public/burst"))
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    started = time.monotonic()
    seen: dict[str, int] = {}
    try:
        for sock in socks:
            sock.setblocking(True)
            sock.settimeout(max(0.05, 5.0 - (time.monotonic() - started)))
            try:
                data = sock.recv(64)
                key = data[:12].decode("latin-1") if data else "closed without an answer"
            except OSError as exc:
                key = type(exc).__name__
            seen[key] = seen.get(key, 0) + 1
    finally:
        for sock in socks:
            sock.close()
    assert set(seen) <= {"HTTP/1.1 200", "HTTP/1.1 503"}, (
        f"of {burst} clients arriving at once: {seen} (the listen backlog overflowed?)")
    assert seen.get("HTTP/1.1 503", 0) >= burst - 64


# =============================================================================================
# Route matching cannot be bypassed
# =============================================================================================

BYPASSES = [
    "//v1/chat/completions",
    "/v1//chat/completions",
    "/./v1/chat/completions",
    "/v1/./chat/completions",
    "/v1/x/../chat/completions",
    "/v1/chat%2Fcompletions",
    "/v1%2fchat/completions",
    "/v1/public/../chat/completions",  # would skip the chat dialect's JSON checks
    "/v1/public/../secret",
    "/v1/public/./secret",
    "/v1/public//secret",
    "/v1/public/..%2Fsecret",
    "/v1/public/%2e%2e/secret",
    "/v1/public/%2E%2E/secret",
    "/v1/public/.%2e/secret",
    "/v1/public%2F..%2Fsecret",
    "/v1/public\\..\\secret",
    "/v1/public/..",
    "/v1/secret?/v1/public/x",
    "/v1/secret?x=/v1/public/",
    "/v1/secret#/v1/public/",
    "/v1/publicsecret",
    "/v1/public/%73ecret",  # an encoded unreserved character: the worker decodes it
    "/v1/pub%6Cic/secret",
]


@pytest.mark.parametrize("target", BYPASSES)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_route_matching_cannot_be_bypassed(
    daemon: Daemon, worker: FakeWorker, target: str, method: str
) -> None:
    body = chat_body() if method == "POST" else None
    with RawClient(daemon.address) as client:
        client.send(request_bytes(method, target, body))
        response = client.read_response()
    assert response.status in (404, 400), (target, response.status, response.body)
    if response.status == 404:
        assert error_of(response)["code"] == "not_found"
    time.sleep(0.05)
    assert worker.requests == [], [r.target for r in worker.requests]


def test_method_mismatch_does_not_fall_through(daemon: Daemon, worker: FakeWorker) -> None:
    for method in ("GET", "PUT", "DELETE"):
        with RawClient(daemon.address) as client:
            client.send(request_bytes(method, "/v1/chat/completions", chat_body()))
            assert client.read_response().status == 404
    assert worker.requests == []


@pytest.mark.parametrize("query", ["x=1", "a=%2F..%2F&b=//c", "q=/v1/public/../secret", "", "%2e%2e"])
def test_query_string_is_forwarded_unchanged_and_does_not_change_the_route(
    daemon: Daemon, worker: FakeWorker, query: str
) -> None:
    with RawClient(daemon.address) as client:
        client.send(request_bytes("GET", f"/v1/public/x?{query}"))
        response = client.read_response()
    assert response.status == 200
    assert worker.wait_requests(1)[0].target == f"/v1/public/x?{query}"
    # the chat route with a query string is still the chat route: its JSON check applies
    with RawClient(daemon.address) as client:
        client.send(request_bytes("POST", f"/v1/chat/completions?{query}", b"{not json"))
        response = client.read_response()
    assert response.status == 400
    assert error_of(response)["type"] == "invalid_request_error"
    assert len(worker.requests) == 1


def test_a_client_that_resets_mid_head_costs_nothing(daemon: Daemon, worker: FakeWorker) -> None:
    for _ in range(20):
        client = RawClient(daemon.address)
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-le")
        client.reset()
    with RawClient(daemon.address) as client:
        client.send(request_bytes("POST", "/v1/chat/completions", chat_body()))
        assert client.read_response().status == 200


def client_connections(daemon: Daemon) -> float:
    return metric_samples(metrics_text(daemon))[("sidecar_client_connections", frozenset())]


def test_a_client_that_never_reads_its_answer_is_not_kept_for_ever(
    daemon: Daemon, worker: FakeWorker
) -> None:
    """A large answer the client never reads stays in the daemon's write buffer: when the
    kept-alive connection's keepalive_timeout ends it, the close waits for the client
    send_timeout at most, then drops the connection and what it held."""
    worker.reply(json_reply(chat_completion("x" * (8 << 20))))
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(daemon.address)
        sock.sendall(request_bytes(body=chat_body()))
        deadline = time.monotonic() + 3 + 3 + 5  # keepalive_timeout and send_timeout: 3s
        while client_connections(daemon) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert client_connections(daemon) == 0


def test_pipelined_requests_wait_for_the_client_to_read(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    """A client that pipelines requests and reads no answer is answered until its
    connection's write buffer is full, then the next request waits for it to read (send
    timeout: dropped): answers the sidecar writes itself (here 404s) never pile up."""
    daemon = make_daemon(worker=worker, limits={"send_timeout": "4s"})
    request = request_bytes("GET", "/nope")
    stop = threading.Event()

    def pipeline(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    sock.sendall(request * 256)

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(daemon.address)
        sock.settimeout(0.2)
        sender = threading.Thread(target=pipeline, args=(sock,))
        sender.start()
        try:
            counts = [-1]
            deadline = time.monotonic() + 20  # the kernel's buffers fill first (some MiB)
            while time.monotonic() < deadline:
                time.sleep(1.0)
                counts.append(len(daemon.ledger()))
                if counts[-1] == counts[-2]:
                    break
            assert counts[-1] == counts[-2], f"answers went on piling up unread: {counts}"
            deadline = time.monotonic() + 4 + 5  # send_timeout: the stuck connection is dropped
            while client_connections(daemon) and time.monotonic() < deadline:
                time.sleep(0.25)
            assert client_connections(daemon) == 0
        finally:
            stop.set()
            sender.join()
