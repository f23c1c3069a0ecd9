"""Every wait is bounded: whatever a peer sends (nothing, a drip of bytes, malformed bytes,
bytes that never complete a line), each state in which sidecar waits on it ends within the
timeout SPEC (or the README, where SPEC is silent) names for it, with the status, error
code, ledger outcome and connection handling it names.

The real daemon runs with short timeouts (300 ms) and raw-socket peers play the client and
the worker. A wait must end within CAP (a generous multiple of its timeout): this is not a
timing benchmark, it says "bounded at all". Waits that must end *at once* (bytes that can
never become a valid head, a chunk size past `max_request_body`) are checked on a daemon
whose timeouts are long (30 s), so ending at the timeout would fail them.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import (
    Blast,
    Daemon,
    Drip,
    FakeWorker,
    RawClient,
    Send,
    Stall,
    Step,
    chat_body,
    chat_route,
    daemon_config,
    request_bytes,
    serving,
)

SHORT = "300ms"
#: A wait of 300 ms ends well within this (10x): "bounded", not a benchmark.
CAP = 3.0
#: Timeouts of the "at once" daemon: ending at one of them fails the test.
LONG = "30s"
PASS = [{"name": "rest", "match": {"path_prefix": "/v1/files"}, "dialect": "passthrough"}]
ROUTES = [chat_route(), *PASS]


@pytest.fixture(scope="module")
def short(module_worker: FakeWorker, make_module_daemon: Callable[..., Daemon]) -> Daemon:
    """Every timeout 300 ms."""
    return make_module_daemon(daemon_config(
        module_worker.url,
        upstream={"connect_timeout": SHORT, "response_timeout": SHORT, "idle_timeout": SHORT},
        limits={"header_timeout": SHORT, "body_timeout": SHORT, "keepalive_timeout": SHORT,
                "send_timeout": SHORT},
        routes=ROUTES))


@pytest.fixture(scope="module")
def patient(module_worker: FakeWorker, make_module_daemon: Callable[..., Daemon]) -> Daemon:
    """Every timeout 30 s: a wait that ends at its timeout fails a CAP-bounded check."""
    return make_module_daemon(daemon_config(
        module_worker.url,
        upstream={"response_timeout": LONG, "idle_timeout": LONG},
        limits={"header_timeout": LONG, "body_timeout": LONG, "keepalive_timeout": LONG,
                "send_timeout": LONG},
        routes=ROUTES))


@pytest.fixture
def w(module_worker: FakeWorker) -> Iterator[FakeWorker]:
    yield from serving(module_worker)


class Dripper:
    """Sends `piece` every `every` seconds on `client` from a thread until stopped or the
    daemon closes (a slow-loris peer)."""

    def __init__(self, client: RawClient, piece: bytes, every: float = 0.05) -> None:
        self.client, self.piece, self.every = client, piece, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self.client.sock.send(self.piece)
            except OSError:
                return

    def __enter__(self) -> Dripper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(2)


HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"


def answered_and_closed(client: RawClient, status: int) -> None:
    response = client.read_response(CAP)
    assert response.status == status, response.raw[:300]
    assert client.closed_by_peer(CAP), "the connection stayed open"


# ================================================================ the client's head


@pytest.mark.parametrize("drip", [None, b"x", b"\r\nx-a: b"], ids=["silent", "drip-value", "drip-lines"])
def test_a_head_that_never_ends_is_cut_at_header_timeout(short: Daemon, drip: bytes | None) -> None:
    with RawClient(short.address) as client:
        if drip is None:
            answered_and_closed(client, 408)
            return
        client.send(HEAD + b"x-slow: ")
        with Dripper(client, drip):
            answered_and_closed(client, 408)


def test_a_request_line_dripped_without_a_line_end_is_cut(short: Daemon) -> None:
    with RawClient(short.address) as client:
        client.send(b"GET /v1/files/")
        with Dripper(client, b"a"):
            answered_and_closed(client, 408)


#: Client heads that can never become one that is served, as they start (never a blank
#: line); `{rid}` is an x-request-id line where the bytes before the break allow one.
BAD_CLIENT_HEADS = {
    "cr-only": b"GET /v1/files/1 HTTP/1.1\rHost: x\rx-a: b\r\r",
    "tls-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "nul-in-request-line": b"GET /v1/files/\x00 HTTP/1.1\r\n",
    "ctl-in-method": b"P\x01ST /v1/chat/completions HTTP/1.1\r\n",
    "bad-version": b"GET /v1/files/1 HTTP/1.1x\r\n",
    "nul-in-value": HEAD + b"{rid}x-a: b\x00",
    "vt-in-value": HEAD + b"{rid}x-a: b\x0b",
    "ctl-in-name": HEAD + b"{rid}x-\x01a: b\r\n",
    "bare-cr-in-value": HEAD + b"{rid}x-a: b\rc: d\r\n",
    "space-before-colon": HEAD + b"{rid}x-a : b\r\n",
    "folded": HEAD + b"{rid} folded\r\n",
}


def no_request_reached_the_worker(daemon: Daemon, w: FakeWorker) -> None:
    """A request sent now is the first (and only) one the worker has seen in this test."""
    w.default = [Send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")]
    with RawClient(daemon.address) as client:
        client.send(request_bytes("GET", "/v1/files/marker"))
        assert client.read_response(CAP).status == 200
    assert [r.target for r in w.wait_requests(1)] == ["/v1/files/marker"]


@pytest.mark.parametrize("name", BAD_CLIENT_HEADS)
def test_client_head_bytes_no_head_may_hold_are_400_at_once(
    patient: Daemon, w: FakeWorker, name: str
) -> None:
    """SPEC: bad heads are refused with 400 and the connection closed, never forwarded; the
    README: as soon as the bytes arrive, not at `header_timeout` (30 s here, the client
    keeps its connection open and sends nothing more)."""
    rid = f"bad-client-head-{name}"
    data = BAD_CLIENT_HEADS[name].replace(b"{rid}", f"x-request-id: {rid}\r\n".encode())
    with RawClient(patient.address) as client:
        client.send(data)
        response = client.read_response(CAP)
        assert client.closed_by_peer(CAP), "the connection stayed open"
    assert response.status == 400, response.raw[:300]
    assert response.json()["error"]["code"] == "invalid_request"
    request_id = response.header("x-request-id")
    assert request_id is not None
    if b"{rid}" in BAD_CLIENT_HEADS[name]:
        assert request_id == rid
    record = patient.ledger_for(request_id)
    assert (record["outcome"], record["status"], record["route"]) == ("bad_request", 400, None)
    no_request_reached_the_worker(patient, w)


GOOD_CLIENT_HEADS = {
    "crlf": b"GET /v1/files/1 HTTP/1.1\r\nhost: x\r\n\r\n",
    "lf-only": b"GET /v1/files/1 HTTP/1.1\nhost: x\n\n",
    "blank-lines-first": b"\r\n\n\r\nGET /v1/files/1 HTTP/1.1\r\nhost: x\r\n\r\n",
    "odd-value-bytes": b"GET /v1/files/1?a=%00 HTTP/1.1\r\nhost: x\r\nx-a:\t\x01\x7f\x80\xff b \r\n\r\n",
    "pipelined": b"GET /v1/files/1 HTTP/1.1\r\nhost: x\r\n\r\nGET /v1/files/2 HTTP/1.1\r\nhost: x\r\n\r\n",
    "body": request_bytes("POST", "/v1/files/up", b"{}"),
}


@pytest.mark.parametrize("name", GOOD_CLIENT_HEADS)
@pytest.mark.parametrize("piece", [1, 3])
def test_a_valid_client_head_dripped_is_served(
    patient: Daemon, w: FakeWorker, name: str, piece: int
) -> None:
    """What refuses a client head as its bytes arrive refuses none that, come whole, is
    served, whichever reads bring it; pipelined requests and keep-alive are unchanged."""
    w.default = [Send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")]
    data = GOOD_CLIENT_HEADS[name]
    with RawClient(patient.address) as client:
        for at in range(0, len(data), piece):
            client.send(data[at : at + piece])
            time.sleep(0.001)  # (apart: most pieces arrive as reads of their own)
        for _ in range(data.count(b" HTTP/1.1")):
            response = client.read_response(CAP)
            assert (response.status, response.body) == (200, b"{}"), response.raw[:300]
        client.send(request_bytes("GET", "/v1/files/again"))  # the connection is kept
        assert client.read_response(CAP).status == 200


# ================================================================ the client's body


@pytest.mark.parametrize("drip", [None, b"{"], ids=["silent", "drip"])
def test_a_sized_body_that_never_ends_is_cut_at_body_timeout(short: Daemon, drip: bytes | None) -> None:
    with RawClient(short.address) as client:
        client.send(HEAD + b"content-length: 100000\r\n\r\n")
        with contextlib.ExitStack() as stack:
            if drip:
                stack.enter_context(Dripper(client, drip))
            answered_and_closed(client, 408)


CHUNKED = HEAD + b"transfer-encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("sent, drip", [
    (b"", None), (b"", b"0"), (b"5", b"0"), (b"5;ext=", b"a"), (b"ffff\r\nab", b"c"),
    (b"5\r\nabcde\r\n", None), (b"0\r\n", b"x"), (b"0\r\nx-trailer: ", b"a"),
], ids=["silent", "size-zeros", "size-then-zeros", "extension", "data", "between",
        "trailer-name", "trailer-value"])
@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v1/files/up"])
def test_a_chunked_body_that_never_ends_is_cut_at_body_timeout(
    short: Daemon, w: FakeWorker, sent: bytes, drip: bytes | None, target: str
) -> None:
    w.default = [Stall()]
    head = CHUNKED.replace(b"/v1/chat/completions", target.encode())
    with RawClient(short.address) as client:
        client.send(head + sent)
        with contextlib.ExitStack() as stack:
            if drip:
                stack.enter_context(Dripper(client, drip))
            response = client.read_response(CAP)
            assert response.status in (408, 413), response.raw[:300]
            assert client.closed_by_peer(CAP)


@pytest.mark.parametrize("size", [b"100001", b"ffffffffffffffffffff", b"100001;a=b"])
@pytest.mark.parametrize("expect", [False, True])
@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v1/files/up"])
def test_a_chunk_size_line_past_max_request_body_is_413_at_once(
    patient: Daemon, w: FakeWorker, size: bytes, expect: bool, target: str
) -> None:
    """README: a chunked body is cut "with a 413 as soon as a chunk's size line declares more
    than [max_request_body] (as nginx does), not at body_timeout" (1 MiB here; 30 s)."""
    w.default = [Stall()]
    head = CHUNKED.replace(b"/v1/chat/completions", target.encode())
    if expect:
        head = head[:-2] + b"expect: 100-continue\r\n\r\n"
    rid = f"big-chunk-{size[:8].decode()}-{expect}-{target[4:8]}"
    head = head[:-2] + f"x-request-id: {rid}\r\n\r\n".encode()
    with RawClient(patient.address) as client:
        client.send(head)
        if expect:
            assert client.read_until(b"\r\n\r\n", CAP).startswith(b"HTTP/1.1 100 ")
        client.send(size + b"\r\n")
        answered_and_closed(client, 413)
    record = patient.ledger_for(rid)
    assert record["status"] == 413


@pytest.mark.parametrize("framing", [b"content-length: 10", b"transfer-encoding: chunked"])
@pytest.mark.parametrize("target", [b"/v1/chat/completions", b"/v1/files/up"])
def test_expect_100_continue_with_no_body_after_it_is_cut_at_body_timeout(
    short: Daemon, w: FakeWorker, framing: bytes, target: bytes
) -> None:
    w.default = [Stall()]
    head = HEAD.replace(b"/v1/chat/completions", target)
    with RawClient(short.address) as client:
        client.send(head + framing + b"\r\nexpect: 100-continue\r\n\r\n")
        assert client.read_until(b"\r\n\r\n", CAP).startswith(b"HTTP/1.1 100 ")
        answered_and_closed(client, 408)


# ================================================================ keep-alive idle


def test_a_kept_alive_connection_is_closed_at_keepalive_timeout(short: Daemon, w: FakeWorker) -> None:
    w.default = [Send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")]
    with RawClient(short.address) as client:
        client.send(request_bytes("GET", "/v1/files/1"))
        assert client.read_response(CAP).status == 200
        assert client.closed_by_peer(CAP)
        assert client.buffer == b""


def test_a_kept_alive_connection_dripping_a_head_is_cut(short: Daemon, w: FakeWorker) -> None:
    w.default = [Send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")]
    with RawClient(short.address) as client:
        client.send(request_bytes("GET", "/v1/files/1"))
        assert client.read_response(CAP).status == 200
        client.send(b"GET /v1/files/2 HTTP/1.1\r\nx: ")
        with Dripper(client, b"a"):
            answered_and_closed(client, 408)


# ================================================================ the worker's head


def worker_answer(daemon: Daemon, w: FakeWorker, steps: list[Step], *, stream: bool = False,
                  target: str = "/v1/chat/completions", rid: str = "") -> RawClient:
    w.reply(steps)
    client = RawClient(daemon.address)
    headers = [("x-request-id", rid)] if rid else []
    if target.startswith("/v1/files"):
        client.send(request_bytes("GET", target, headers=headers))
    else:
        client.send(request_bytes("POST", target, chat_body(stream=stream), headers=headers))
    return client


HEAD_DRIPS = {
    "silent": [Stall()],
    "drip-status": [Drip(b"HTTP/1.1 200 OK" + b"x" * 400, 1, 0.02), Stall()],
    "drip-header": [Send(b"HTTP/1.1 200 OK\r\nx-a: "), Drip(b"a" * 400, 1, 0.02), Stall()],
    "drip-blank-lines": [Send(b"HTTP/1.1 200 OK\r\n"), Drip(b"x-a: b\r\n" * 200, 7, 0.02), Stall()],
    "cr-at-the-end": [Send(b"HTTP/1.1 200 OK\r"), Stall()],
    "interim-forever": [Drip(b"HTTP/1.1 100 Continue\r\n\r\n" * 60, 25, 0.03), Stall()],
}


@pytest.mark.parametrize("name", HEAD_DRIPS)
@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v1/files/1"])
def test_a_worker_head_that_never_completes_is_504_at_response_timeout(
    short: Daemon, w: FakeWorker, name: str, target: str
) -> None:
    rid = f"head-drip-{name}-{target[4:8]}"
    with worker_answer(short, w, HEAD_DRIPS[name], target=target, rid=rid) as client:
        response = client.read_response(CAP)
    assert response.status == 504, response.raw[:300]
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert short.ledger_for(rid)["outcome"] == "upstream_timeout"


BAD_HEADS = {
    "cr-only": b"HTTP/1.1 200 OK\rcontent-type: application/json\r\r",
    "nul-in-status": b"HTTP/1.1 200 O\x00K",
    "nul-in-name": b"HTTP/1.1 200 OK\r\ncontent\x00-type: x",
    "ctl-in-value": b"HTTP/1.1 200 OK\r\nx-a: b\x01",
    "esc-in-status": b"HTTP/1.1 2\x1b",
    "bad-version": b"HTTP/1.1x",
    "nul-in-version": b"HTTP/\x00",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nx-a : b\r\n",
    "lf-in-status": b"HTTP/1.1 200 \x0bOK\r\n",
    "bare-cr-in-value": b"HTTP/1.1 200 OK\r\nx-a: b\rc",
    "no-name": b"HTTP/1.1 200 OK\r\n@a: b\r\n",
    # the next head's bytes that come in the read of an interim answer
    "interim-then-cr-only": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\rcontent-type: x\r\r",
    "interim-then-nul": b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nx-a: \x00",
}


@pytest.mark.parametrize("name", BAD_HEADS)
@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v1/files/1"])
def test_worker_head_bytes_no_head_may_hold_are_502_at_once(
    patient: Daemon, w: FakeWorker, name: str, target: str
) -> None:
    """SPEC: bytes that break HTTP framing are `upstream_protocol_error`, a 502 before the
    client's head; the README: not at `response_timeout` (30 s here)."""
    rid = f"bad-head-{name}-{target[4:8]}"
    with worker_answer(patient, w, [Send(BAD_HEADS[name]), Stall()], target=target,
                       rid=rid) as client:
        response = client.read_response(CAP)
    assert response.status == 502, response.raw[:300]
    assert response.json()["error"]["code"] == "upstream_protocol_error"
    assert patient.ledger_for(rid)["outcome"] == "upstream_error"
    assert w.wait_peer_closed(1, CAP)


GOOD_HEADS = {
    "crlf": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n",
    "lf-only": b"HTTP/1.1 200 OK\ncontent-type: application/json\n",
    "no-reason": b"HTTP/1.1 200\r\ncontent-type: application/json\r\n",
    "folded": b"HTTP/1.1 200 OK\r\nx-a: b\r\n  c\r\ncontent-type: application/json\r\n",
    "tab-and-obs-text": b"HTTP/1.1 200 O\tK\r\nx-a:\tb\x80\xff c\r\ncontent-type: application/json\r\n",
    "control-in-reason": b"HTTP/1.1 200 O\x01K\x7f\r\ncontent-type: application/json\r\n",
    "interim-first": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-type: application/json\r\n",
}


@pytest.mark.parametrize("name", GOOD_HEADS)
@pytest.mark.parametrize("piece", [1, 3])
def test_a_valid_worker_head_dripped_is_served(
    patient: Daemon, w: FakeWorker, name: str, piece: int
) -> None:
    """What refuses a head as its bytes arrive refuses none that, come whole, is served."""
    head = GOOD_HEADS[name] + b"content-length: 2" + (b"\n\n" if name == "lf-only" else b"\r\n\r\n")
    with worker_answer(patient, w, [Drip(head + b"{}", piece)], target="/v1/files/1") as client:
        response = client.read_response(CAP * 3)
    assert (response.status, response.body) == (200, b"{}"), response.raw[:300]


# ================================================================ the worker's body


def sized(body_len: int, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: " + content_type
            + b"\r\ncontent-length: %d\r\n\r\n" % body_len)


CHUNKED_HEAD_JSON = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
CHUNKED_HEAD_SSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
CLOSE_HEAD_SSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"
CLOSE_HEAD_JSON = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n"

BODY_STALLS = {
    "json-sized": sized(1000) + b'{"id":',
    "json-chunked": CHUNKED_HEAD_JSON + b'6\r\n{"id":\r\n',
    "json-chunked-in-size": CHUNKED_HEAD_JSON + b"6",
    "json-chunked-in-trailer": CHUNKED_HEAD_JSON + b"0\r\nx-a: b",
    "json-close": CLOSE_HEAD_JSON + b'{"id":',
    "sse-sized": sized(1000, b"text/event-stream") + b'data: {"id"',
    "sse-chunked": CHUNKED_HEAD_SSE + b"5\r\ndata:\r\n",
    "sse-chunked-in-size": CHUNKED_HEAD_SSE + b"1",
    "sse-close": CLOSE_HEAD_SSE + b"data: {",
}


@pytest.mark.parametrize("name", BODY_STALLS)
@pytest.mark.parametrize("stream", [False, True])
def test_a_worker_body_that_stalls_ends_at_idle_timeout(
    short: Daemon, w: FakeWorker, name: str, stream: bool
) -> None:
    rid = f"body-stall-{name}-{stream}"
    with worker_answer(short, w, [Send(BODY_STALLS[name]), Stall()], stream=stream,
                       rid=rid) as client:
        response = client.read_response(CAP)
    if response.status == 200:
        assert b"upstream_timeout" in response.body, response.raw[:500]
        assert b"[DONE]" not in response.body
    else:
        assert response.status == 504, response.raw[:300]
    assert short.ledger_for(rid)["outcome"] == "upstream_timeout"
    assert w.wait_peer_closed(1, CAP)


BIG = 3 * 1024 * 1024
BODY_FLOODS = {
    "chunk-size-digits": CHUNKED_HEAD_SSE + b"0" * BIG,
    "chunk-extension": CHUNKED_HEAD_SSE + b"5;" + b"a" * BIG,
    "trailer": CHUNKED_HEAD_SSE + b"0\r\nx-a: " + b"a" * BIG,
    "sse-line": CLOSE_HEAD_SSE + b"data: " + b"a" * BIG,
    "sse-comment": CLOSE_HEAD_SSE + b": " + b"a" * BIG,
}


@pytest.mark.parametrize("name", BODY_FLOODS)
def test_a_worker_body_line_that_never_ends_is_a_protocol_error(
    patient: Daemon, w: FakeWorker, name: str
) -> None:
    """A line with no end (a drip never silent for idle_timeout would keep it going for
    ever) is bounded by its size: `upstream_protocol_error`, not a wait."""
    rid = f"flood-{name}"
    with worker_answer(patient, w, [Send(BODY_FLOODS[name]), Stall()], stream=True,
                       rid=rid) as client:
        response = client.read_response(CAP * 2)
    if response.status == 200:
        assert b"upstream_protocol_error" in response.body, response.raw[:500]
    else:
        assert response.status == 502, response.raw[:300]
    assert patient.ledger_for(rid)["outcome"] == "upstream_error"


# ================================================================ the client's reads, heartbeats


def test_a_heartbeat_does_not_keep_a_silent_worker_alive(
    make_module_daemon: Callable[..., Daemon], module_worker: FakeWorker, w: FakeWorker
) -> None:
    """Heartbeats go to the client while the worker is silent; `idle_timeout` still ends it."""
    daemon = make_module_daemon(daemon_config(
        module_worker.url, upstream={"idle_timeout": SHORT},
        routes=[chat_route(heartbeat="50ms")]))
    rid = "heartbeat-silent"
    with worker_answer(daemon, w, [Send(CHUNKED_HEAD_SSE + b"5\r\n: x\n\n\r\n"), Stall()],
                       stream=True, rid=rid) as client:
        response = client.read_response(CAP)
    assert b"upstream_timeout" in response.body, response.raw[:500]
    assert daemon.ledger_for(rid)["outcome"] == "upstream_timeout"


def test_a_client_that_stops_reading_a_stream_is_dropped_at_send_timeout(
    short: Daemon, w: FakeWorker
) -> None:
    rid = "unread-stream"
    event = b"data: " + b"x" * 4000 + b"\n\n"
    w.reply([Send(CLOSE_HEAD_SSE), Blast(64 * 1024 * 1024, 4002, event[:4002]), Stall()])
    with RawClient(short.address, rcvbuf=4096) as client:
        client.send(request_bytes("GET", "/v1/files/sse", headers=[("x-request-id", rid)]))
        record = short.ledger_for(rid, timeout=CAP * 2)
    assert record["outcome"] == "client_disconnect"
    assert w.wait_peer_closed(1, CAP)


# ================================================================ SIGTERM


def _drain_scenarios() -> dict[str, Callable[[Daemon, FakeWorker], list[RawClient]]]:
    def silent_worker(daemon: Daemon, worker: FakeWorker) -> list[RawClient]:
        client = worker_answer(daemon, worker, [Stall()], stream=True)
        worker.wait_requests(1)
        return [client]

    def stalled_body(daemon: Daemon, worker: FakeWorker) -> list[RawClient]:
        client = worker_answer(daemon, worker, [Send(CHUNKED_HEAD_SSE + b"5\r\ndata:\r\n"), Stall()],
                               stream=True)
        client.read_until(b"\r\n\r\n", CAP)
        return [client]

    def dripping_head(daemon: Daemon, worker: FakeWorker) -> list[RawClient]:
        client = RawClient(daemon.address)
        client.send(HEAD + b"x-slow: ")
        Dripper(client, b"a")
        return [client]

    def dripping_body(daemon: Daemon, worker: FakeWorker) -> list[RawClient]:
        client = RawClient(daemon.address)
        client.send(HEAD + b"content-length: 100000\r\n\r\n")
        Dripper(client, b"a")
        return [client]

    def not_reading(daemon: Daemon, worker: FakeWorker) -> list[RawClient]:
        event = b"data: " + b"x" * 4000 + b"\n\n"
        worker.reply([Send(CLOSE_HEAD_SSE), Blast(64 * 1024 * 1024, 4002, event[:4002]), Stall()])
        client = RawClient(daemon.address, rcvbuf=4096)
        client.send(request_bytes("GET", "/v1/files/sse"))
        worker.wait_quiet(0.2)
        return [client]

    def kept_alive(daemon: Daemon, worker: FakeWorker) -> list[RawClient]:
        worker.reply([Send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")])
        client = RawClient(daemon.address)
        client.send(request_bytes("GET", "/v1/files/1"))
        assert client.read_response(CAP).status == 200
        return [client]

    def refused_still_sending(daemon: Daemon, worker: FakeWorker) -> list[RawClient]:
        client = RawClient(daemon.address)
        client.send(HEAD + b"content-length: 99999999\r\n\r\n")
        assert client.read_response(CAP).status == 413
        Dripper(client, b"a")
        return [client]

    def admin_silent(daemon: Daemon, worker: FakeWorker) -> list[RawClient]:
        return [RawClient(("127.0.0.1", daemon.admin_port))]

    return {f.__name__: f for f in (silent_worker, stalled_body, dripping_head, dripping_body,
                                     not_reading, kept_alive, refused_still_sending,
                                     admin_silent)}


DRAIN = _drain_scenarios()


@pytest.mark.parametrize("name", DRAIN)
@pytest.mark.parametrize("short_drain", [True, False], ids=["drain-300ms", "drain-30s"])
def test_sigterm_ends_whatever_the_peers_do(
    make_daemon: Callable[..., Daemon], worker: FakeWorker, name: str, short_drain: bool
) -> None:
    """SIGTERM lets what is in flight finish up to `drain_timeout`; with a long one, each
    peer is still let go at its own timeout (300 ms here), so the process exits in time."""
    each = LONG if short_drain else SHORT
    daemon = make_daemon(daemon_config(
        worker.url, drain_timeout=SHORT if short_drain else LONG,
        upstream={"response_timeout": each, "idle_timeout": each},
        limits={"header_timeout": each, "body_timeout": each, "keepalive_timeout": each,
                "send_timeout": each},
        routes=ROUTES))
    clients = DRAIN[name](daemon, worker)
    try:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.proc is not None
        assert daemon.proc.wait(CAP * 2) == 0
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("kept_alive", [False, True])
def test_blank_lines_dripped_before_a_request_line_do_not_hold_a_connection(
    short: Daemon, w: FakeWorker, kept_alive: bool
) -> None:
    """RFC 9112 2.2 lets a client send empty lines before a request line; an endless drip
    of them is still a connection idle (closed at `keepalive_timeout` or `header_timeout`)."""
    w.default = [Send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")]
    with RawClient(short.address) as client:
        if kept_alive:
            client.send(request_bytes("GET", "/v1/files/1"))
            assert client.read_response(CAP).status == 200
        with Dripper(client, b"\r\n"):
            assert client.closed_by_peer(CAP)


# ================================================================ connecting to the worker


def test_a_unix_socket_worker_that_never_accepts_is_bounded_by_connect_timeout(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A unix socket whose accept queue is full: the connect waits (or fails at once), and
    ends within `connect_timeout` with a 504 (a timeout) or a 502 (refused)."""
    path = str(tmp_path / "w.sock")
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket(socket.AF_UNIX))
        listener.bind(path)
        listener.listen(0)
        for _ in range(4):
            filler = stack.enter_context(socket.socket(socket.AF_UNIX))
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError, OSError):
                filler.connect(path)
        daemon = make_daemon(daemon_config(
            f"unix:{path}", upstream={"connect_timeout": SHORT, "response_timeout": LONG},
            routes=ROUTES))
        with RawClient(daemon.address) as client:
            client.send(request_bytes("POST", "/v1/chat/completions", chat_body(),
                                      headers=[("x-request-id", "unix-full")]))
            response = client.read_response(CAP)
        assert response.status in (502, 504), response.raw[:300]
        code = response.json()["error"]["code"]
        assert code == ("upstream_timeout" if response.status == 504 else "upstream_unavailable")


def test_a_pooled_connection_whose_worker_went_silent_ends_at_response_timeout(
    short: Daemon, w: FakeWorker
) -> None:
    """A kept-alive worker connection reused while its worker hangs (no FIN, no answer) is
    not retried (nothing says it is dead) and ends at `response_timeout`: a 504."""
    w.reply([Send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")], [Stall()])
    with RawClient(short.address) as client:
        client.send(request_bytes("GET", "/v1/files/1"))
        assert client.read_response(CAP).status == 200
        client.send(request_bytes("GET", "/v1/files/2", headers=[("x-request-id", "pooled-hang")]))
        response = client.read_response(CAP)
    assert response.status == 504, response.raw[:300]
    requests = w.wait_requests(2)
    assert requests[0].connection == requests[1].connection  # the pooled one was reused
    assert short.ledger_for("pooled-hang")["outcome"] == "upstream_timeout"
