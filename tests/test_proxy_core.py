"""Integration tests of the proxy core (issue 2): the real daemon, a fake worker, real HTTP.

Keep-alive on both sides, request and response framing, every error status
the sidecar answers itself (with its body), the client-side limits and
timeouts, backpressure with a slow reader, client disconnects, a unix-socket
worker, `sidecar check`, header hygiene, x-request-id and the admin port.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import (
    DEFAULT_ROUTES,
    LAST_CHUNK,
    LOOPBACK,
    MODEL,
    Blast,
    Close,
    Daemon,
    FakeWorker,
    RawClient,
    RawResponse,
    Send,
    Stall,
    WorkerIO,
    WorkerRequest,
    chat_body,
    chat_completion,
    chat_route,
    chat_stream_events,
    chunk,
    daemon_config,
    free_port,
    http_response,
    json_reply,
    metric_samples,
    openai_handler,
    post,
    raw_exchange,
    request_bytes,
    response_head,
    run_cli,
    sse_reply,
)

MiB = 1024 * 1024

# A chat route whose worker timeouts are short, for tests that wait for them.
SHORT_ROUTE = chat_route(
    "short",
    match={"path": "/short/v1/chat/completions", "methods": ["POST"]},
    upstream={"response_timeout": "300ms", "idle_timeout": "300ms"},
)


@pytest.fixture(scope="module")
def proxy(module_worker: FakeWorker, make_module_daemon: Callable[..., Daemon]) -> Daemon:
    """One daemon for the module, in front of `module_worker`."""
    return make_module_daemon(worker=module_worker, routes=[*DEFAULT_ROUTES[:2], SHORT_ROUTE,
                                                            DEFAULT_ROUTES[2]])



def error_of(response: RawResponse) -> dict[str, Any]:
    """The OpenAI-shaped error object of a response (asserting its shape)."""
    assert response.header("content-type") == "application/json", response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert isinstance(error["code"], str) and error["code"]
    return error


def models_handler(request: Any) -> bytes:
    return http_response(200, json.dumps({"object": "list", "path": request.target}).encode())


# ============================================================================ keep-alive, framing


def test_keepalive_reuse_on_both_sides(worker: FakeWorker, make_daemon: Callable[..., Daemon]) -> None:
    worker.default = openai_handler("vllm")
    daemon = make_daemon(worker=worker)
    with RawClient(daemon.address) as client:
        for i in range(4):
            client.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=i % 2 == 1)))
            response = client.read_response()
            assert response.status == 200 and response.complete
            assert response.header("connection") != "close"
        # queued before the request is sent: a GET that reached the worker first went to the
        # default handler, which failed on its empty body and dropped the connection (the
        # daemon then retried on a second one)
        worker.reply(models_handler)
        client.send(request_bytes("GET", "/v1/models"))
        assert client.read_response().status == 200
    requests = worker.wait_requests(5)
    assert worker.accepted == 1, "the daemon opened more than one worker connection"
    assert {r.connection for r in requests} == {requests[0].connection}
    assert [r.index for r in requests] == [0, 1, 2, 3, 4]


def test_pipelined_requests_are_answered_in_order(w: FakeWorker, proxy: Daemon) -> None:
    w.reply(models_handler, models_handler, models_handler)
    with RawClient(proxy.address) as client:
        client.send(b"".join(request_bytes("GET", f"/v1/models?n={i}") for i in range(3)))
        paths = [client.read_response().json()["path"] for _ in range(3)]
    assert paths == ["/v1/models?n=0", "/v1/models?n=1", "/v1/models?n=2"]


def test_pipelined_requests_with_bodies_of_both_framings(w: FakeWorker, proxy: Daemon) -> None:
    # Content-Length bodies are read past h11, chunked ones through it: in one send, every
    # body goes to its own request and every next head is found where the body ends
    temps = [0.1, 0.2, 0.3, 0.4]
    w.reply(*[json_reply(chat_completion(f"answer {i}")) for i in range(len(temps))])
    with RawClient(proxy.address) as client:
        client.send(b"".join(
            request_bytes("POST", "/v1/chat/completions", chat_body(temperature=t), chunked=i == 2)
            for i, t in enumerate(temps)
        ))
        answers = [client.read_response().json()["choices"][0]["message"]["content"]
                   for _ in temps]
    assert answers == [f"answer {i}" for i in range(len(temps))]
    requests = w.wait_requests(len(temps))
    assert [r.json()["temperature"] for r in requests] == temps


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_passthrough_request_body_both_framings(w: FakeWorker, proxy: Daemon, chunked: bool) -> None:
    body = bytes(range(256)) * 1000  # binary, 256 KB
    w.reply(http_response(200, b"{}"))
    with RawClient(proxy.address) as client:
        client.send(request_bytes("POST", "/v1/embeddings", body,
                                  [("content-type", "application/octet-stream")], chunked=chunked))
        assert client.read_response().status == 200
    (request,) = w.wait_requests(1)
    assert request.body == body
    if chunked:
        assert request.header("transfer-encoding") == "chunked"
        assert request.header("content-length") is None
    else:
        assert request.header("content-length") == str(len(body))


def test_upload_of_many_tiny_chunks_lets_other_clients_in(w: FakeWorker, proxy: Daemon) -> None:
    # 40,000 one-byte chunks cost h11 an event each; meanwhile the event loop must serve
    # others (and the body's running size must not be re-added per chunk: that was
    # quadratic, 30 s of blocked loop for this upload)
    pieces = 40_000
    w.default = lambda request: http_response(200, request.target.encode())
    framed = b"".join(b"1\r\n" + bytes([65 + i % 26]) + b"\r\n" for i in range(pieces))
    head = (b"POST /v1/files HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    with RawClient(proxy.address, timeout=60) as uploader, RawClient(proxy.address) as other:
        uploader.send(head + framed + LAST_CHUNK)
        other.send(request_bytes("GET", "/v1/models"))
        assert other.read_response().body == b"/v1/models"
        assert uploader.read_response().body == b"/v1/files"
    first, second = w.wait_requests(2)
    assert first.target == "/v1/models", "the upload held the event loop until it was sent"
    assert len(second.body) == pieces


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_openai_request_body_both_framings_reach_the_worker_length_framed(
    w: FakeWorker, proxy: Daemon, chunked: bool
) -> None:
    w.reply(json_reply(chat_completion()))
    with RawClient(proxy.address) as client:
        client.send(request_bytes("POST", "/v1/chat/completions", chat_body(temperature=0.5),
                                  chunked=chunked))
        assert client.read_response().status == 200
    (request,) = w.wait_requests(1)
    assert request.header("content-length") == str(len(request.body))
    assert request.header("transfer-encoding") is None
    sent = request.json()
    assert sent["temperature"] == 0.5 and sent["model"] == MODEL


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_passthrough_response_body_every_framing(w: FakeWorker, proxy: Daemon, framing: str) -> None:
    body = bytes(range(256)) * 2000  # 512 KB
    if framing == "length":
        w.reply(http_response(200, body, [("content-type", "application/octet-stream")]))
    elif framing == "chunked":
        w.reply([Send(response_head(200, [("transfer-encoding", "chunked")]))]
                + [Send(chunk(body[i:i + 70000])) for i in range(0, len(body), 70000)]
                + [Send(b"0\r\n\r\n")])
    else:
        w.reply([Send(response_head(200, [("connection", "close")])), Send(body[:1000]),
                 Send(body[1000:]), Close()])
    with RawClient(proxy.address) as client:
        client.send(request_bytes("GET", "/v1/files/x"))
        response = client.read_response()
    assert response.status == 200
    assert response.complete
    assert response.body == body


def test_worker_connection_close_is_honoured_and_the_client_kept(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    daemon = make_daemon(worker=worker)
    worker.reply(http_response(200, b"{}", [("connection", "close")]), models_handler)
    with RawClient(daemon.address) as client:
        client.send(request_bytes("GET", "/v1/models"))
        first = client.read_response()
        assert first.status == 200 and first.header("connection") is None
        client.send(request_bytes("GET", "/v1/models"))
        assert client.read_response().status == 200
    a, b = worker.wait_requests(2)
    assert a.connection != b.connection


def test_http10_client_gets_an_unframed_stream_then_close(w: FakeWorker, proxy: Daemon) -> None:
    # h11 frames the head (no chunked coding for HTTP/1.0, Connection: close); the sidecar's
    # own headers are spliced in beside its framing headers, each exactly once
    w.reply(sse_reply(chat_stream_events(["a", "b"])))
    with RawClient(proxy.address) as client:
        client.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=True),
                                  [("x-request-id", "old-client")]).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        response = client.read_response()
        assert client.closed_by_peer()
    assert response.status == 200 and response.complete
    names = [name for name, _ in response.headers]
    assert len(names) == len(set(names)), names
    assert response.header("transfer-encoding") is None and response.header("connection") == "close"
    assert response.header("content-type") == "text/event-stream"
    assert response.header("x-request-id") == "old-client"
    assert response.raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.sse()[-1] == "[DONE]"


def test_every_response_header_once_with_h11_framing(w: FakeWorker, proxy: Daemon) -> None:
    body = json.dumps(chat_completion()).encode()
    w.reply(http_response(200, body, [("content-type", "application/json"), *WORKER_E2E]),
            sse_reply(chat_stream_events(["a"])))
    with RawClient(proxy.address) as client:
        client.send(request_bytes("POST", "/v1/chat/completions", chat_body()))
        document = client.read_response()
        client.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=True)))
        stream = client.read_response()
    for response in (document, stream):
        names = [name for name, _ in response.headers]
        assert len(names) == len(set(names)), names
        assert response.status == 200 and response.complete and response.header("x-request-id")
    assert document.header("content-length") == str(len(document.body))
    assert document.header("transfer-encoding") is None
    for name, value in WORKER_E2E:
        assert document.header(name) == value
    assert stream.header("transfer-encoding") == "chunked" and stream.header("content-length") is None


def test_empty_fixed_length_answers_end_at_once_and_the_connections_stay(
    w: FakeWorker, proxy: Daemon
) -> None:
    w.reply(http_response(200, b"", [("content-type", "text/plain")]),
            http_response(404, b"", [("content-type", "text/plain")]), models_handler)
    with RawClient(proxy.address) as client:
        for target in ("/v1/files/x", "/v1/files/y"):
            client.send(request_bytes("GET", target))
            response = client.read_response(5)
            assert response.complete and response.body == b""
            assert response.header("content-length") == "0"
        client.send(request_bytes("GET", "/v1/models"))
        assert client.read_response().status == 200
    a, b, c = w.wait_requests(3)
    assert a.connection == b.connection == c.connection


def test_head_request_answer_has_no_body_and_the_connection_stays(w: FakeWorker, proxy: Daemon) -> None:
    w.reply([Send(response_head(200, [("content-length", "5"), ("content-type", "text/plain")]))],
            models_handler)
    with RawClient(proxy.address) as client:
        client.send(request_bytes("HEAD", "/v1/files/x"))
        head = client.read_response(head_only_body=True)
        client.send(request_bytes("GET", "/v1/models"))
        after = client.read_response()
    assert head.status == 200 and head.header("content-length") == "5"
    assert after.status == 200 and after.json()["path"] == "/v1/models"
    a, b = w.wait_requests(2)
    assert a.connection == b.connection  # the worker's connection was reused too


def test_worker_bytes_past_its_content_length_are_dropped_with_its_connection(
    w: FakeWorker, proxy: Daemon
) -> None:
    body = json.dumps(chat_completion()).encode()
    junk = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    w.reply([Send(response_head(200, [("content-type", "application/json"),
                                      ("content-length", str(len(body)))]) + body + junk)],
            json_reply(chat_completion()))
    with RawClient(proxy.address) as client:
        client.send(request_bytes("POST", "/v1/chat/completions", chat_body()))
        first = client.read_response()
        client.send(request_bytes("POST", "/v1/chat/completions", chat_body()))
        second = client.read_response()
    assert first.status == 200 and first.json()["choices"] == chat_completion()["choices"]
    assert second.status == 200
    a, b = w.wait_requests(2)
    assert a.connection != b.connection  # never read the junk as the next answer


# ============================================================================ errors before the head


def test_404_no_route(w: FakeWorker, proxy: Daemon) -> None:
    for target in ("/nothing", "/v2/chat/completions", "/v1/../v1/chat/completions",
                   "/v1//models", "/v1/chat%2Fcompletions"):
        response = post(proxy, chat_body(), target=target)
        assert response.status == 404, target
        assert error_of(response)["code"] == "not_found"
    assert w.requests == []


def test_404_keeps_the_connection_when_there_is_no_body_to_skip(w: FakeWorker, proxy: Daemon) -> None:
    """Pipelined: a body-less 404 is followed by the next request on the same connection; a
    404 with a body it did not read closes the connection (nothing after it is answered)."""
    w.default = openai_handler()
    with RawClient(proxy.address) as client:
        client.send(request_bytes("GET", "/nothing") + request_bytes("HEAD", "/nothing/either")
                    + request_bytes(body=chat_body()) + request_bytes("POST", "/nothing", {"x": 1})
                    + request_bytes(body=chat_body()))
        statuses = [client.read_response(head_only_body=i == 1).status for i in range(4)]
        assert statuses == [404, 404, 200, 404]
        assert client.closed_by_peer(3)
    assert len(w.requests) == 1


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"", b"\xff\xfe\x00",
                                  b'{"model": "m", "stream": "true"}', b'{"stream": 1}'])
@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v1/completions"])
def test_400_bad_json_on_openai_routes_is_never_forwarded(
    w: FakeWorker, proxy: Daemon, body: bytes, target: str
) -> None:
    response = post(proxy, body, target=target)
    assert response.status == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert w.requests == []
    assert proxy.ledger_for(response.header("x-request-id"))["outcome"] == "bad_request"


@pytest.mark.parametrize("coding", ["gzip", "GZIP", "identity, gzip", "br", "x-gzip"])
@pytest.mark.parametrize("compressed", [True, False], ids=["compressed", "plain-labelled"])
def test_a_content_encoded_body_on_a_json_route_is_refused_never_forwarded(
    w: FakeWorker, proxy: Daemon, coding: str, compressed: bool
) -> None:
    # the body cannot be read as JSON; a plain one under that label must not be read as
    # JSON either (and forwarded, re-encoded, still saying it is compressed)
    body = json.dumps(chat_body(stream=True)).encode()
    if compressed:
        body = gzip.compress(body)
    response = post(proxy, body, headers=[("content-encoding", coding)])
    assert response.status == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and "Content-Encoding" in error["message"]
    assert w.requests == []
    assert proxy.ledger_for(response.header("x-request-id"))["outcome"] == "bad_request"


@pytest.mark.parametrize("label", ["identity", "utf-8", "UTF-8, identity"])
def test_a_content_encoding_that_names_no_coding_is_no_coding(
    w: FakeWorker, proxy: Daemon, label: str
) -> None:
    # (`utf-8` is a charset sent in the wrong header; workers ignore it, so does sidecar)
    w.reply(openai_handler())
    response = post(proxy, chat_body(), headers=[("content-encoding", label)])
    assert response.status == 200
    assert w.wait_requests(1)[0].json()["model"] == MODEL


def test_a_content_encoded_body_on_a_passthrough_route_is_forwarded_as_it_is(
    w: FakeWorker, proxy: Daemon
) -> None:
    w.reply(http_response(200, b"{}"))
    body = gzip.compress(b'{"input": "hi"}')
    response = post(proxy, body, target="/v1/embeddings", headers=[("content-encoding", "gzip")])
    assert response.status == 200
    (request,) = w.wait_requests(1)
    assert request.body == body and request.header("content-encoding") == "gzip"


def test_bad_json_on_a_passthrough_route_is_forwarded(w: FakeWorker, proxy: Daemon) -> None:
    w.reply(http_response(422, b'{"detail":"bad"}'))
    response = post(proxy, b"{not json", target="/v1/embeddings")
    assert response.status == 422 and response.body == b'{"detail":"bad"}'
    assert w.wait_requests(1)[0].body == b"{not json"


def test_413_declared_length_without_contacting_the_worker(w: FakeWorker, proxy: Daemon) -> None:
    for target in ("/v1/chat/completions", "/v1/embeddings"):
        with RawClient(proxy.address) as client:
            client.send(f"POST {target} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                        f"content-length: {2 * MiB}\r\n\r\n".encode() + b"{" * 1000)
            response = client.read_response()
            assert response.status == 413, target
            assert error_of(response)["code"] == "request_too_large"
            assert client.closed_by_peer(2.0)
    assert w.requests == [] and w.accepted == 0


@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v1/embeddings"])
def test_413_chunked_body_over_the_limit(w: FakeWorker, proxy: Daemon, target: str) -> None:
    w.default = http_response(200, b"{}")
    body = b"[" + b"1," * (MiB // 2 + 1000) + b"1]"  # a bit over 1 MiB
    with RawClient(proxy.address) as client:
        client.send(request_bytes("POST", target, body, chunked=True))
        response = client.read_response()
    assert response.status == 413, response.raw[:300]
    assert error_of(response)["code"] == "request_too_large"
    assert w.requests == []  # a passthrough body may have started to flow: never completed
    assert w.wait_until(lambda: all(c.peer_closed for c in w.connections), 2.0), \
        "a worker connection that carried part of the body was left open"


@pytest.mark.parametrize(
    "head",
    [
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\n" + b"x-big: " + b"a" * 20000 + b"\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\n"
        + b"".join(b"x-h%d: %s\r\n" % (i, b"b" * 100) for i in range(200)) + b"\r\n",
        b"GET /v1/models?" + b"q" * 20000 + b" HTTP/1.1\r\nhost: x\r\n\r\n",
    ],
    ids=["one-header", "many-headers", "long-target"],
)
def test_oversize_heads_are_refused(w: FakeWorker, proxy: Daemon, head: bytes) -> None:
    with RawClient(proxy.address) as client:
        client.send(head)
        response = client.read_response()
        assert response.status in (431, 400)
        error_of(response)
        assert client.closed_by_peer(2.0)
    assert w.requests == []


def test_oversize_head_that_never_ends_is_cut_off(w: FakeWorker, proxy: Daemon) -> None:
    with RawClient(proxy.address) as client:
        client.send(b"GET /v1/models HTTP/1.1\r\nx-a: ")
        try:
            for _ in range(40):  # 40 x 1 KiB, without ever ending the head
                client.send(b"a" * 1024)
        except OSError:
            pass  # closed under us: that is the point
        raw = client.read_until_close(3.0)
    assert raw.startswith(b"HTTP/1.1 431") or raw.startswith(b"HTTP/1.1 400") or raw == b""
    assert w.requests == []


SMUGGLING = {
    "absolute-form": b"GET http://127.0.0.1:1/v1/models HTTP/1.1\r\nhost: x\r\n\r\n",
    "authority-form": b"OPTIONS 127.0.0.1:1 HTTP/1.1\r\nhost: x\r\n\r\n",
    "connect": b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nhost: 127.0.0.1:1\r\n\r\n",
    "cl-and-te": b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n"
                 b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    "two-lengths": b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n"
                   b"content-length: 3\r\n\r\n{}",
    "te-gzip": b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
               b"0\r\n\r\n",
    "te-identity": b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ntransfer-encoding: identity\r\n\r\n",
    "obs-fold": b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-a: 1\r\n  continued\r\n\r\n",
    "space-before-colon": b"GET /v1/models HTTP/1.1\r\nhost: x\r\ncontent-length : 0\r\n\r\n",
    "bad-request-line": b"GET  /v1/models HTTP/1.1\r\nhost: x\r\n\r\n",
}


@pytest.mark.parametrize("raw", list(SMUGGLING.values()), ids=list(SMUGGLING))
def test_refused_heads_get_400_are_closed_and_never_forwarded(
    w: FakeWorker, proxy: Daemon, raw: bytes
) -> None:
    w.default = models_handler
    with RawClient(proxy.address) as client:
        client.send(raw)
        response = client.read_response()
        assert response.status == 400, response.raw
        error_of(response)
        assert client.closed_by_peer(2.0)
    assert w.requests == []


def test_502_worker_unreachable(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(daemon_config(f"http://127.0.0.1:{free_port()}"))
    for body in (chat_body(), chat_body(stream=True)):
        response = post(daemon, body)
        assert response.status == 502
        error = error_of(response)
        assert error["code"] == "upstream_unavailable"
        assert response.header("x-request-id")
        record = daemon.ledger_for(response.header("x-request-id"))
        assert record["outcome"] == "upstream_error" and record["status"] == 502
    response = post(daemon, b"", target="/v1/models")
    assert response.status == 502 and error_of(response)["code"] == "upstream_unavailable"
    # a passthrough request whose body was never read: the answer says the connection closes
    with RawClient(daemon.address) as client:
        client.send(request_bytes("GET", "/v1/models", None)
                    + request_bytes("GET", "/v1/models", None))
        response = client.read_response()
        assert response.status == 502 and response.header("connection") == "close"
        assert client.closed_by_peer(2.0)


def test_504_response_timeout_before_head(w: FakeWorker, proxy: Daemon) -> None:
    w.reply([Stall()])
    started = time.monotonic()
    response = post(proxy, chat_body(stream=True), target="/short/v1/chat/completions")
    elapsed = time.monotonic() - started
    assert response.status == 504
    assert error_of(response)["code"] == "upstream_timeout"
    assert 0.2 < elapsed < 3.0  # response_timeout is 300 ms (loose bounds)
    (request,) = w.requests
    assert w.wait_connection_closed(request, 1.0), "the timed-out worker connection was not closed"


def test_worker_non_2xx_is_passed_through_with_status_and_body(w: FakeWorker, proxy: Daemon) -> None:
    body = b'{"error":{"message":"model not found","type":"NotFoundError","code":404}}'
    w.reply(http_response(404, body), http_response(429, b'{"detail":"slow down"}',
                                                     [("retry-after", "3")]))
    response = post(proxy, chat_body(stream=True))
    assert response.status == 404 and response.body == body
    record = proxy.ledger_for(response.header("x-request-id"))
    assert record["outcome"] == "upstream_http_error"
    assert record["client_stream"] is True and record["upstream_stream"] is False  # JSON came
    response = post(proxy, chat_body())
    assert response.status == 429 and response.body == b'{"detail":"slow down"}'
    assert response.header("retry-after") == "3"


# ============================================================================ client-side timeouts


@pytest.fixture
def strict(worker: FakeWorker, make_daemon: Callable[..., Daemon]) -> Daemon:
    worker.default = models_handler
    return make_daemon(worker=worker, limits={"header_timeout": "500ms", "body_timeout": "500ms",
                                              "keepalive_timeout": "500ms"})


def test_slow_loris_head_is_cut_off_at_header_timeout(strict: Daemon, worker: FakeWorker) -> None:
    started = time.monotonic()
    with RawClient(strict.address) as client:
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        closed = False
        for _ in range(60):  # one header byte every 100 ms: never enough to finish the head
            try:
                client.send(b"x")
            except OSError:
                closed = True
                break
            if client.closed_by_peer(0.1):
                closed = True
                break
        assert closed, "the daemon kept a slow-loris connection open"
        rest = client.read_until_close(2.0)
    elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 3.0
    raw = bytes(client.buffer) + rest
    assert raw == b"" or raw.startswith(b"HTTP/1.1 408")
    assert worker.requests == []


def test_slow_body_is_cut_off_at_body_timeout(strict: Daemon, worker: FakeWorker) -> None:
    with RawClient(strict.address) as client:
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        started = time.monotonic()
        response = client.read_response(5.0)
        assert response.status == 408
        assert client.closed_by_peer(2.0)
    assert 0.3 < time.monotonic() - started < 3.0
    assert worker.requests == []


def test_silent_and_idle_connections_are_closed(strict: Daemon, worker: FakeWorker) -> None:
    with RawClient(strict.address) as silent, RawClient(strict.address) as idle:
        idle.send(request_bytes("GET", "/v1/models"))
        assert idle.read_response().status == 200
        assert silent.closed_by_peer(3.0)
        assert idle.closed_by_peer(3.0)
        assert silent.buffer == b"" or bytes(silent.buffer).startswith(b"HTTP/1.1 408")
        assert idle.buffer == b""  # nothing written on an idle keep-alive connection


def test_expect_100_continue(strict: Daemon, worker: FakeWorker) -> None:
    worker.default = openai_handler()
    body = json.dumps(chat_body()).encode()
    with RawClient(strict.address) as client:
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                    b"\r\nexpect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(body))
        assert client.read_until(b"\r\n\r\n", 2.0).startswith(b"HTTP/1.1 100")
        client.send(body)
        response = client.read_response()
    assert response.status == 200
    assert worker.wait_requests(1)[0].header("expect") is None


def test_max_connections_refuses_at_once(worker: FakeWorker, make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(worker=worker, limits={"max_connections": 2})
    worker.default = models_handler
    with RawClient(daemon.address) as a, RawClient(daemon.address) as b:
        a.send(request_bytes("GET", "/v1/models"))
        assert a.read_response().status == 200
        b.send(request_bytes("GET", "/v1/models"))
        assert b.read_response().status == 200
        with RawClient(daemon.address) as c:
            response = c.read_response(2.0)
            assert response.status == 503
            error_of(response)
            assert c.closed_by_peer(2.0)
    # the slots come back once the connections close
    deadline = time.monotonic() + 5
    while True:
        with RawClient(daemon.address) as d:
            d.send(request_bytes("GET", "/v1/models"))
            if d.read_response().status == 200:
                break
        assert time.monotonic() < deadline, "connection slots were not released"


# ============================================================================ backpressure, disconnects


def test_slow_reader_memory_bound_and_worker_throttled(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    total = 200 * MiB
    daemon = make_daemon(worker=worker, upstream={"idle_timeout": "500ms"})
    worker.reply(models_handler)
    assert post(daemon, b"", "/v1/models").status == 200  # warm up the allocator and the pool
    baseline = daemon.rss_kib()
    worker.reply([Send(response_head(200, [("content-type", "application/octet-stream"),
                                           ("content-length", str(total))])),
                  Blast(total, 256 * 1024)])
    with RawClient(daemon.address, rcvbuf=64 * 1024) as client:
        client.send(request_bytes("GET", "/v1/big"))
        client.read_until(b"\r\n\r\n")
        client.read_exactly(MiB)
        sent = worker.wait_quiet(0.3)  # the worker cannot write any more: it is throttled
        assert sent < 64 * MiB, f"worker wrote {sent} bytes to a client that read 1 MiB"
        growth = daemon.rss_kib() - baseline
        assert growth < 30 * 1024, f"RSS grew by {growth} KiB"
        # a paused client is not a silent worker: wait past idle_timeout, the stream goes on
        time.sleep(1.0)
        client.read_exactly(8 * MiB, timeout=10)
        assert worker.wait_until(lambda: worker.bytes_sent > sent, 5.0)
        assert daemon.rss_kib() - baseline < 30 * 1024
    assert worker.wait_peer_closed(1, timeout=1.0), "the worker connection outlived the client"
    assert worker.bytes_sent < total


@pytest.mark.parametrize(("route", "idle_timeout"),
                         [("chat", "400ms"), ("passthrough", "400ms"), ("chat", "60s")])
def test_a_client_that_takes_nothing_for_send_timeout_is_gone(
    worker: FakeWorker, make_daemon: Callable[..., Daemon], route: str, idle_timeout: str
) -> None:
    """Backpressure is not the worker's silence (idle_timeout does not fire), but a client
    that takes no byte for send_timeout has left: the worker connection is closed, the
    client's dropped, and the ledger says client_disconnect with what was seen. On time
    whatever idle_timeout is."""
    daemon = make_daemon(worker=worker, upstream={"idle_timeout": idle_timeout},
                         limits={"send_timeout": "1500ms"})
    event = chat_stream_events(["x" * 2000])[1]
    worker.reply([Send(response_head(200, [("content-type", "text/event-stream"),
                                           ("transfer-encoding", "chunked")])),
                  *(Send(chunk(event) * 64) for _ in range(400))])
    target = "/v1/chat/completions" if route == "chat" else "/v1/raw/stream"
    with RawClient(daemon.address, rcvbuf=16 * 1024) as client:
        client.send(request_bytes("POST", target, chat_body(stream=True),
                                  headers=[("x-request-id", f"stuck-{route}-{idle_timeout}")]))
        client.read_until(b"\r\n\r\n")
        started = time.monotonic()
        assert worker.wait_peer_closed(1, timeout=4.0), "a stuck client held the worker"
        assert time.monotonic() - started >= 1.2, "cut before send_timeout"
        assert client.closed_by_peer(5.0)
    record = daemon.ledger_for(f"stuck-{route}-{idle_timeout}")
    assert (record["outcome"], record["status"]) == ("client_disconnect", 200)


def test_a_client_that_reads_slowly_is_not_cut_by_send_timeout(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    """send_timeout is for a client that takes nothing: one that takes some every fifth of
    a second, far slower than the worker writes (held back all the while), keeps its
    stream for as long as it reads, over twice send_timeout here."""
    daemon = make_daemon(worker=worker, upstream={"idle_timeout": "400ms"},
                         limits={"send_timeout": "2s"})
    event = chat_stream_events(["x" * 2000])[1]
    worker.reply([Send(response_head(200, [("content-type", "text/event-stream"),
                                           ("transfer-encoding", "chunked")])),
                  *(Send(chunk(event) * 64) for _ in range(400))])
    with RawClient(daemon.address, rcvbuf=16 * 1024) as client:
        client.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=True),
                                  headers=[("x-request-id", "slow-reader")]))
        client.read_until(b"\r\n\r\n")
        client.sock.settimeout(2.0)
        until = time.monotonic() + 5.0
        while time.monotonic() < until:
            assert client.sock.recv(32 * 1024)  # from the socket itself, 160 KiB a second
            time.sleep(0.2)
        assert not worker.wait_peer_closed(1, timeout=0.1), "a reading client was cut"
        assert all(r["request_id"] != "slow-reader" for r in daemon.ledger())


def test_worker_connection_a_slow_client_held_back_is_pooled_reading(
    w: FakeWorker, proxy: Daemon
) -> None:
    # the answer's one big write pauses the client's transport, which pauses the worker
    # connection's reading, in the same call that ends the response: the connection goes
    # back to the pool, and must read there (its EOF, its next response) all the same
    big = chat_completion("x" * (8 * MiB))
    w.reply(json_reply(big), json_reply(chat_completion("second")))
    with RawClient(proxy.address, rcvbuf=64 * 1024) as client:
        client.send(request_bytes("POST", "/v1/chat/completions", chat_body()))
        response = client.read_response(timeout=10)
        assert response.status == 200 and len(response.body) > 8 * MiB
    started = time.monotonic()
    second = post(proxy, chat_body())
    assert second.status == 200, second.body[:200]
    assert second.json()["choices"][0]["message"]["content"] == "second"
    assert time.monotonic() - started < 1.0
    first_request, second_request = w.wait_requests(2)
    assert second_request.connection == first_request.connection, "the pool was not used"


@pytest.mark.parametrize("route", ["chat", "passthrough"])
def test_client_disconnect_mid_stream_closes_the_worker_connection(
    w: FakeWorker, proxy: Daemon, route: str
) -> None:
    events = chat_stream_events()
    w.reply([*sse_reply(events[:2], end=False), Stall()])
    target = "/v1/chat/completions" if route == "chat" else "/v1/stream"
    rid = f"disconnect-{route}"
    client = RawClient(proxy.address)
    client.send(request_bytes("POST", target, chat_body(stream=True), [("x-request-id", rid)]))
    client.read_until(b"\r\n\r\n")
    client.read_until(b'"content":"Hel"')
    client.close()
    (request,) = w.requests
    assert w.wait_connection_closed(request, 1.0), \
        "worker connection still open 1 s after the client left"
    record = proxy.ledger_for(rid)
    assert record["outcome"] == "client_disconnect"


def test_client_that_leaves_at_done_before_the_body_ends_had_a_whole_answer(
    w: FakeWorker, proxy: Daemon
) -> None:
    """SDKs close at `data: [DONE]`; a worker may send the body's last chunk later (or
    never): the client had the whole answer, so the request is `ok`, with its usage."""
    events = chat_stream_events()
    w.reply([*sse_reply(events, end=False), Stall()])  # [DONE], but no last chunk
    client = RawClient(proxy.address)
    client.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=True),
                              [("x-request-id", "left-at-done")]))
    client.read_until(b"data: [DONE]\n\n")
    client.close()
    (request,) = w.requests
    assert w.wait_connection_closed(request, 1.0)
    record = proxy.ledger_for("left-at-done")
    assert (record["outcome"], record["status"]) == ("ok", 200), record
    assert (record["prompt_tokens"], record["completion_tokens"]) == (11, 3), record


@pytest.mark.parametrize("client_stream", [True, False])
def test_client_that_leaves_after_the_finish_but_before_the_usage_left_early(
    w: FakeWorker, proxy: Daemon, client_stream: bool
) -> None:
    """A finish_reason is not the stream's end (the usage chunk and `[DONE]` follow it): a
    client that leaves there (`if finish_reason: break`) left before its answer was whole,
    and a non-streaming client that leaves while the aggregation waits for the rest got
    nothing; neither is `ok` (the ledger would bill it without its prompt tokens)."""
    events = chat_stream_events()  # role, content x3, finish, usage, [DONE]
    w.reply([*sse_reply(events[:-2], end=False), Stall()])
    rid = f"left-at-finish-{client_stream}"
    client = RawClient(proxy.address)
    client.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=client_stream),
                              [("x-request-id", rid)]))
    (request,) = w.wait_requests(1)
    if client_stream:
        client.read_until(b'"finish_reason":"stop"')
    else:
        time.sleep(0.3)  # the worker's events are in; the document waits for the rest
    client.close()
    assert w.wait_connection_closed(request, 1.0)
    record = proxy.ledger_for(rid)
    assert (record["outcome"], record["status"]) == (
        "client_disconnect", 200 if client_stream else 499), record


def test_client_disconnect_before_the_head_closes_the_worker_connection(
    w: FakeWorker, proxy: Daemon
) -> None:
    w.reply([Stall()])
    client = RawClient(proxy.address)
    client.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=True),
                              [("x-request-id", "gone-early")]))
    (request,) = w.wait_requests(1)
    client.close()
    assert w.wait_connection_closed(request, 1.0)
    assert proxy.ledger_for("gone-early")["outcome"] == "client_disconnect"


def test_client_reset_mid_stream_closes_the_worker_connection(w: FakeWorker, proxy: Daemon) -> None:
    w.reply([*sse_reply(chat_stream_events()[:2], end=False), Stall()])
    client = RawClient(proxy.address)
    client.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=True)))
    client.read_until(b'"content":"Hel"')
    client.reset()
    (request,) = w.requests
    assert w.wait_connection_closed(request, 1.0)


# ============================================================================ unix-socket worker


def test_unix_socket_worker(tmp_path: Path, make_daemon: Callable[..., Daemon]) -> None:
    path = tmp_path / "worker.sock"
    with FakeWorker(unix_path=path, tcp=False) as worker:
        worker.default = openai_handler("llamacpp")
        daemon = make_daemon(daemon_config(worker.unix_url))
        response = post(daemon, chat_body(stream=True, include_usage=True))
        assert response.status == 200
        chunks = response.sse_json()
        assert chunks[-1] == "[DONE]"
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1] if c["choices"])
        assert text == "Hello!"
        assert worker.connections[0].transport == "unix"
        assert worker.requests[0].header("host")  # a Host header is always sent
        ready = httpx.get(daemon.admin_url + "/readyz", timeout=5)
        assert ready.status_code == 200
        assert not worker.errors


# ============================================================================ worker-side HTTP


class EarlyAnswerWorker:
    """A raw worker that answers an upload after its first bytes: a 413 with `Connection:
    close`, then a half-close that reads and drops the rest (RFC 9112 9.6's lingering
    close; one that closes with the upload unread resets the connection, and the kernel
    may drop the answer with it: no proxy can pass that on)."""

    ANSWER = (b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\n"
              b"content-length: 27\r\nconnection: close\r\nx-request-id: worker-own\r\n\r\n"
              b'{"detail":"upload too big"}')

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data or len(data) < 2000:
                data += conn.recv(65536)
            conn.sendall(self.ANSWER)
            conn.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                while conn.recv(65536):
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_worker_answering_an_upload_early_is_passed_through(
    make_daemon: Callable[..., Daemon], framing: str
) -> None:
    """RFC 9112 9.5: the worker's early answer (here a 413 sent after the first 2 KB of a
    3 MiB upload, then a close) is the answer, not a 502 from the write that found the
    connection closed; the client's connection closes after it (its body was not read)."""
    worker = EarlyAnswerWorker()
    try:
        daemon = make_daemon(daemon_config(worker.url, limits={"max_request_body": "8MiB"}))
        body = b"x" * (3 << 20)
        rid = f"early-{framing}"
        framing_header = (("content-length", str(len(body))) if framing == "length"
                          else ("transfer-encoding", "chunked"))
        with RawClient(daemon.address, timeout=10) as client:
            client.send(request_bytes("POST", "/v1/files", None, [("x-request-id", rid), framing_header]))
            with contextlib.suppress(OSError):  # the daemon may stop reading the upload
                for i in range(0, len(body), 65536):
                    piece = body[i : i + 65536]
                    client.send(piece if framing == "length" else b"%x\r\n%s\r\n" % (len(piece), piece))
                if framing == "chunked":
                    client.send(b"0\r\n\r\n")
            response = client.read_response(10)
            assert client.closed_by_peer(5)
        assert response.status == 413, response.raw[:300]
        assert response.body == b'{"detail":"upload too big"}'
        assert [v for k, v in response.headers if k == "x-request-id"] == [rid]  # not the worker's
        record = daemon.ledger_for(rid)
        assert (record["outcome"], record["status"]) == ("upstream_http_error", 413), record
    finally:
        worker.close()


def test_worker_content_length_beside_chunked_is_not_forwarded(w: FakeWorker, proxy: Daemon) -> None:
    """RFC 9112 6.3: Transfer-Encoding overrides Content-Length, and a proxy must not forward
    that length: the client gets the chunked body whole, framed by sidecar."""
    head = response_head(200, [("content-type", "text/plain"), ("content-length", "3"),
                               ("transfer-encoding", "chunked")])
    w.reply([Send(head + chunk(b"hello") + chunk(b" world") + LAST_CHUNK)],
            [Send(response_head(400, [("content-type", "application/json"), ("content-length", "4"),
                                      ("transfer-encoding", "chunked")]) + chunk(b'{"e":1}') + LAST_CHUNK)])
    response = post(proxy, {"x": 1}, target="/v1/anything")
    assert response.status == 200 and response.complete, response.raw
    assert response.body == b"hello world" and response.header("content-length") is None
    response = post(proxy, chat_body())
    assert response.status == 400 and response.complete and response.body == b'{"e":1}', response.raw
    assert response.header("content-length") is None


# ============================================================================ unix-socket listener


def test_unix_socket_listener(worker: FakeWorker, tmp_path: Path, make_daemon: Callable[..., Daemon]) -> None:
    """`listen: unix:/path`: reachable by other users (mode 0666: the directory decides), a
    stale socket file is replaced, and a socket a running daemon answers on is not."""
    worker.default = openai_handler()
    path = tmp_path / "sidecar.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nothing answers: what a crashed daemon leaves behind
    umask = os.umask(0o077)  # what systemd's UMask= would give the daemon, tighter
    try:
        daemon = make_daemon(worker=worker, listen=f"unix:{path}")
    finally:
        os.umask(umask)
    assert daemon.unix_path == str(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666, oct(os.stat(path).st_mode)
    response = raw_exchange(str(path), request_bytes(body=chat_body()))
    assert response.startswith(b"HTTP/1.1 200 "), response[:200]
    second = tmp_path / "second.yaml"
    second.write_text(json.dumps(daemon_config(worker.url, listen=f"unix:{path}")))
    result = run_cli("run", "-c", str(second), timeout=20)
    assert result.returncode == 1 and "already in use" in result.stderr, result
    assert raw_exchange(str(path), request_bytes(body=chat_body())).startswith(b"HTTP/1.1 200 ")


# ============================================================================ sidecar check


def test_check_good_configs(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(json.dumps(daemon_config("http://127.0.0.1:8000")))
    result = run_cli("check", "-c", str(good))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    bundled = run_cli("check", "-c", "config/sidecar.yaml")
    assert bundled.returncode == 0, bundled.stderr


def test_check_bad_config_prints_every_problem_with_its_key_path(tmp_path: Path) -> None:
    bad = daemon_config("ftp://nowhere")
    bad["upstream"]["idle_timeout"] = "soon"
    bad["limits"]["max_request_body"] = "lots"
    bad["bogus_key"] = 1
    bad["routes"] = [
        {"name": "a", "match": {"path": "v1/chat"}, "dialect": "openai-chat"},
        {"name": "b", "match": {"path_prefix": "/v1/"}, "dialect": "klingon"},
        {"name": "c", "match": {"path": "/x"}, "dialect": "passthrough", "upstream_stream": "maybe"},
    ]
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(bad))
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 2
    # the problems are check's output and its diagnostics: on stdout and on stderr
    assert result.stdout == result.stderr
    out = result.stdout
    for key in ("upstream.url", "upstream.idle_timeout", "limits.max_request_body", "bogus_key",
                "routes[0].match.path", "routes[1].dialect", "routes[2].upstream_stream"):
        assert key in out, f"{key} missing from:\n{out}"
    assert 'routes[0].match.path: must start with "/"' in out
    # once when both go to the same place
    merged = run_cli("check", "-c", str(path), merged=True)
    assert merged.returncode == 2 and merged.stdout == out


def test_check_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    assert run_cli("check", "-c", str(tmp_path / "nope.yaml")).returncode == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text("listen: [unclosed\n")
    result = run_cli("check", "-c", str(broken))
    assert result.returncode == 2 and result.stderr.strip()


@pytest.mark.parametrize("command", ["run", "check", "demo"])
def test_an_empty_config_path_is_refused_not_replaced_by_the_default(command: str) -> None:
    # `-c "$UNSET_VARIABLE"` must not quietly run the bundled config
    result = run_cli(command, "-c", "", timeout=15)
    assert result.returncode == 2, result
    assert result.stderr == f"sidecar {command}: -c/--config needs a file path\n"
    assert result.stdout == ""


def test_run_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream: {url: 'http://127.0.0.1:1'}\nlimits: {max_connections: 0}\n")
    result = run_cli("run", "-c", str(bad), timeout=15)
    assert result.returncode == 2
    assert "limits.max_connections" in result.stderr


# ============================================================================ headers, request id


CLIENT_HOP = [
    ("connection", "keep-alive, x-hop-client"),
    ("keep-alive", "timeout=30"),
    ("te", "trailers"),
    ("proxy-connection", "keep-alive"),
    ("proxy-authorization", "Basic cHJveHk6cGFzcw=="),
    ("trailer", "x-t"),
    ("x-hop-client", "1"),
]
CLIENT_E2E = [
    ("authorization", "Bearer sk-test-secret-1234"),
    ("cookie", "session=abc"),
    ("x-api-key", "key-5678"),
    ("x-custom", "kept"),
    ("accept", "application/json"),
]
WORKER_HOP = [
    ("connection", "x-hop-worker"),
    ("keep-alive", "timeout=5, max=100"),
    ("proxy-authenticate", "Basic"),
    ("trailer", "x-t"),
    ("upgrade", "h2c"),
    ("x-hop-worker", "1"),
]
WORKER_E2E = [("x-worker-custom", "kept"), ("set-cookie", "a=b"), ("x-ratelimit-remaining", "9")]


@pytest.mark.parametrize("target", ["/v1/embeddings", "/v1/chat/completions"])
def test_hop_by_hop_headers_dropped_both_ways(w: FakeWorker, proxy: Daemon, target: str) -> None:
    body = json.dumps(chat_completion()).encode()
    w.reply(http_response(200, body, [("content-type", "application/json"), *WORKER_HOP, *WORKER_E2E]))
    with RawClient(proxy.address) as client:
        client.send(request_bytes("POST", target, chat_body(), [*CLIENT_HOP, *CLIENT_E2E]))
        response = client.read_response()
    assert response.status == 200
    (request,) = w.wait_requests(1)
    names = request.header_names()
    for name, _ in CLIENT_HOP:
        assert name not in names, f"{name} reached the worker"
    for name, value in CLIENT_E2E:
        assert request.header(name) == value, f"{name} changed or dropped"
    assert request.header("host") and request.header("host") != "sidecar.test"
    got = response.header_names()
    for name, _ in WORKER_HOP:
        if name == "connection":
            assert "x-hop-worker" not in (response.header("connection") or "")
        else:
            assert name not in got, f"{name} reached the client"
    for name, value in WORKER_E2E:
        assert response.header(name) == value


UPGRADES = {
    "websocket": ("GET", "/v1/realtime", None, False,
                  [("connection", "Upgrade"), ("upgrade", "websocket"),
                   ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                   ("sec-websocket-version", "13")]),
    "h2c-chunked-chat": ("POST", "/v1/chat/completions", chat_body(), True,
                         [("connection", "Upgrade, HTTP2-Settings"), ("upgrade", "h2c"),
                          ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")]),
}


@pytest.mark.parametrize("case", list(UPGRADES))
def test_an_upgrade_request_is_declined_and_the_connection_kept(
    w: FakeWorker, proxy: Daemon, case: str
) -> None:
    method, target, body, chunked, headers = UPGRADES[case]
    w.default = lambda request: (models_handler(request) if request.method == "GET"
                                 else openai_handler()(request))
    with RawClient(proxy.address) as client:
        for _ in range(2):  # (curl --http2 on http:// asks for h2c this way)
            client.send(request_bytes(method, target, body, headers, chunked=chunked))
            response = client.read_response()
            assert response.status == 200
            assert response.header("connection") is None, response.headers
    for request in w.wait_requests(2):
        assert not {"connection", "upgrade", "http2-settings"} & request.header_names()
        assert request.target == target


def test_secrets_appear_in_no_log_ledger_or_metric(w: FakeWorker, proxy: Daemon) -> None:
    w.reply(openai_handler())
    response = post(proxy, chat_body(), headers=[("authorization", "Bearer sk-very-secret-42"),
                                                  ("x-api-key", "xk-secret-43"),
                                                  ("cookie", "sid=secret-44")])
    assert response.status == 200
    (request,) = w.wait_requests(1)
    assert request.header("authorization") == "Bearer sk-very-secret-42"
    proxy.ledger_for(response.header("x-request-id"))
    metrics = httpx.get(proxy.admin_url + "/metrics", timeout=5).text
    everything = "\n".join(proxy.lines) + proxy.ledger_path.read_text() + metrics
    for secret in ("sk-very-secret-42", "xk-secret-43", "secret-44"):
        assert secret not in everything


def test_secrets_appear_in_no_log_ledger_or_metric_when_the_request_fails(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    # every way a request can fail, at debug level, with secrets in headers and the query
    daemon = make_daemon(worker=worker, log_level="debug",
                         routes=[*DEFAULT_ROUTES[:2], SHORT_ROUTE, DEFAULT_ROUTES[2]])
    secrets = {"authorization": "Bearer sk-fail-secret-51", "cookie": "sid=fail-secret-52",
               "x-api-key": "fail-secret-53", "proxy-authorization": "Basic fail-secret-54",
               "api-key": "fail-secret-55"}
    query = "?api_key=fail-secret-56"
    headers = list(secrets.items())
    # (a request on a pooled connection closed before its answer is sent again once)
    worker.reply(http_response(401, b'{"error": "bad key"}'), [Close()], [Close()], [Stall()])
    answers = [
        post(daemon, chat_body(), "/v1/chat/completions" + query, headers),  # worker's 401
        post(daemon, chat_body(), "/v1/chat/completions" + query, headers),  # 502
        post(daemon, chat_body(), "/short/v1/chat/completions" + query, headers),  # 504
        post(daemon, b"{", "/v1/chat/completions" + query, headers),  # 400
        post(daemon, b"x" * (2 * MiB), "/v1/chat/completions" + query, headers),  # 413
        post(daemon, chat_body(), "/nowhere" + query, headers),  # 404
    ]
    assert [a.status for a in answers] == [401, 502, 504, 400, 413, 404]
    head = "".join(f"{k}: {v}\r\n" for k, v in headers).encode()
    refused = raw_exchange(daemon.address, b"POST /v1/chat/completions" + query.encode()
                           + b" HTTP/1.1\r\nHost: x\r\n" + head
                           + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}")
    assert refused.startswith(b"HTTP/1.1 400 ")
    daemon.wait_ledger(len(answers) + 1)
    metrics = httpx.get(daemon.admin_url + "/metrics", timeout=5).text
    everything = "\n".join(daemon.lines) + daemon.ledger_path.read_text() + metrics
    for secret in [*secrets.values(), query]:
        assert secret.split()[-1] not in everything
    assert "api_key" not in everything


def test_request_id_taken_from_the_client(w: FakeWorker, proxy: Daemon) -> None:
    w.reply(openai_handler())
    response = post(proxy, chat_body(stream=True), headers=[("X-Request-ID", "client-id-77")])
    assert response.header("x-request-id") == "client-id-77"
    (request,) = w.wait_requests(1)
    assert [v for k, v in request.headers if k == "x-request-id"] == ["client-id-77"]
    assert proxy.ledger_for("client-id-77")["status"] == 200


def test_request_id_generated_when_absent(w: FakeWorker, proxy: Daemon) -> None:
    w.reply(openai_handler(), openai_handler())
    first = post(proxy, chat_body())
    second = post(proxy, chat_body(stream=True))
    ids = [first.header("x-request-id"), second.header("x-request-id")]
    assert all(ids) and ids[0] != ids[1]
    requests = w.wait_requests(2)
    assert [r.header("x-request-id") for r in requests] == ids
    for rid in ids:
        assert proxy.ledger_for(rid)["request_id"] == rid


def test_request_id_on_errors_the_sidecar_answers(w: FakeWorker, proxy: Daemon) -> None:
    response = post(proxy, chat_body(), target="/nope", headers=[("x-request-id", "err-1")])
    assert response.status == 404 and response.header("x-request-id") == "err-1"
    response = post(proxy, b"{", headers=[("x-request-id", "err-2")])
    assert response.status == 400 and response.header("x-request-id") == "err-2"


def test_query_string_forwarded_unchanged(w: FakeWorker, proxy: Daemon) -> None:
    w.reply(models_handler)
    target = "/v1/models?a=1&b=%2F%2e&c=caf%C3%A9&&d"
    with RawClient(proxy.address) as client:
        client.send(request_bytes("GET", target))
        assert client.read_response().status == 200
    assert w.wait_requests(1)[0].target == target


# ============================================================================ admin port


def test_admin_healthz_readyz_metrics(worker: FakeWorker, make_daemon: Callable[..., Daemon]) -> None:
    worker.default = openai_handler()
    daemon = make_daemon(worker=worker)
    admin = daemon.admin_url
    assert httpx.get(admin + "/healthz", timeout=5).status_code == 200
    assert httpx.get(admin + "/readyz", timeout=5).status_code == 200
    for stream in (False, True, True):
        assert post(daemon, chat_body(stream=stream, include_usage=stream or None)).status == 200
    daemon.wait_ledger(3)
    response = httpx.get(admin + "/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    samples = metric_samples(response.text)
    requests_ok = sum(v for (name, labels), v in samples.items()
                      if name == "sidecar_requests_total" and ("route", "chat") in labels
                      and ("outcome", "ok") in labels)
    assert requests_ok == 3
    tokens = {dict(labels)["kind"]: v for (name, labels), v in samples.items()
              if name == "sidecar_tokens_total" and ("model", MODEL) in labels}
    assert tokens["prompt"] == 33 and tokens["completion"] == 9
    cost = [v for (name, labels), v in samples.items() if name == "sidecar_cost_total"]
    assert cost and sum(cost) == pytest.approx(3 * 17e-6)
    assert samples[("sidecar_active_streams", frozenset())] == 0
    assert any(name.startswith("sidecar_time_to_first_byte_seconds") for name, _ in samples)
    assert "sidecar_upstream_errors" in families
    # a failure shows up by code
    worker.reply([Send(response_head(200, [("content-type", "text/event-stream"),
                                           ("transfer-encoding", "chunked")])),
                  Send(chunk(chat_stream_events()[0])), Close()])
    post(daemon, chat_body(stream=True))
    daemon.wait_ledger(4)
    samples = metric_samples(httpx.get(admin + "/metrics", timeout=5).text)
    assert samples[("sidecar_upstream_errors_total",
                    frozenset({("code", "upstream_disconnected")}))] == 1
    assert httpx.head(admin + "/healthz", timeout=5).status_code == 200
    missing = httpx.get(admin + "/nope", timeout=5)
    assert missing.status_code == 404 and missing.reason_phrase == "Not Found"


def test_readyz_503_when_the_worker_refuses(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(daemon_config(f"http://127.0.0.1:{free_port()}"))
    assert httpx.get(daemon.admin_url + "/healthz", timeout=5).status_code == 200
    not_ready = httpx.get(daemon.admin_url + "/readyz", timeout=5)
    assert not_ready.status_code == 503 and not_ready.reason_phrase == "Service Unavailable"


def test_readyz_follows_the_worker(worker: FakeWorker, make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(worker=worker)
    assert httpx.get(daemon.admin_url + "/readyz", timeout=5).status_code == 200
    worker.stop_listening()
    assert httpx.get(daemon.admin_url + "/readyz", timeout=5).status_code == 503
    assert httpx.get(daemon.admin_url + "/healthz", timeout=5).status_code == 200


def test_readyz_asks_every_worker_the_routes_send_to(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    """A route's own `upstream:` is a worker too: /readyz is 200 only when every worker the
    routes send to accepts (the top-level one counts only when a route uses it)."""
    worker.default = openai_handler()
    dead = f"http://127.0.0.1:{free_port()}"
    only_routes = make_daemon(daemon_config(dead, routes=[
        {"name": "chat", "match": {"path": "/v1/chat/completions"}, "dialect": "openai-chat",
         "upstream": {"url": worker.url}}]))
    assert post(only_routes, chat_body()).status == 200
    assert httpx.get(only_routes.admin_url + "/readyz", timeout=5).status_code == 200
    one_dead = make_daemon(daemon_config(worker.url, routes=[
        {"name": "chat", "match": {"path": "/v1/chat/completions"}, "dialect": "openai-chat"},
        {"name": "other", "match": {"path_prefix": "/other/"}, "dialect": "passthrough",
         "upstream": {"url": dead}}]))
    ready = httpx.get(one_dead.admin_url + "/readyz", timeout=5)
    assert ready.status_code == 503 and dead.removeprefix("http://") in ready.text


def test_admin_head_has_no_body_and_405_says_allow(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(daemon_config(f"http://127.0.0.1:{free_port()}"))
    for path in ("/healthz", "/metrics", "/readyz"):
        raw = raw_exchange((LOOPBACK, daemon.admin_port), request_bytes("HEAD", path), timeout=2.0)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"content-length: " in head.lower() and body == b"", (path, raw)
    refused = httpx.post(daemon.admin_url + "/metrics", timeout=5)
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize("workers", [1, 2])
def test_admin_answers_a_client_that_half_closed_after_its_request(
    worker: FakeWorker, make_daemon: Callable[..., Daemon], workers: int
) -> None:
    """A health check written as `printf 'GET /readyz ...' | nc -N host port` shuts its
    sending side down right after the request: the answers that take a moment (/readyz
    probes the worker, /metrics asks the worker processes) are still written."""
    daemon = make_daemon(worker=worker, workers=workers)
    for path, status in (("/healthz", 200), ("/readyz", 200), ("/metrics", 200)):
        with socket.create_connection((LOOPBACK, daemon.admin_port), timeout=10) as sock:
            sock.sendall(request_bytes("GET", path))
            sock.shutdown(socket.SHUT_WR)
            raw = b""
            while data := sock.recv(65536):
                raw += data
        assert raw.startswith(b"HTTP/1.1 %d " % status), (path, raw)


@pytest.mark.parametrize("workers", [1, 2])
def test_admin_port_on_a_unix_socket(
    worker: FakeWorker, make_daemon: Callable[..., Daemon], tmp_path: Path, workers: int
) -> None:
    """`admin_listen: unix:/path` serves the same pages; /readyz follows the worker there too."""
    path = str(tmp_path / "admin.sock")
    daemon = make_daemon(worker=worker, workers=workers, admin_listen=f"unix:{path}")
    assert daemon.admin_unix_path == path

    def get(page: str) -> httpx.Response:
        with httpx.Client(transport=httpx.HTTPTransport(uds=path), timeout=5) as client:
            return client.get(f"http://admin{page}")

    assert get("/healthz").status_code == 200
    assert get("/readyz").status_code == 200
    metrics = get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "sidecar_build_info" in metrics.text
    assert get("/nope").status_code == 404
    worker.stop_listening()
    assert get("/readyz").status_code == 503
    assert get("/healthz").status_code == 200


def test_admin_port_is_separate_from_client_traffic(w: FakeWorker, proxy: Daemon) -> None:
    raw = raw_exchange(proxy.address, request_bytes("GET", "/metrics"), timeout=2.0)
    assert raw.startswith(b"HTTP/1.1 404")
    assert w.requests == []


def test_sigterm_exits_0(worker: FakeWorker, make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(worker=worker)
    assert daemon.stop() == 0


def test_504_when_the_worker_floods_interim_answers(w: FakeWorker, proxy: Daemon) -> None:
    """Interim (1xx) answers are no response head: a worker that sends them without pause
    (so that reading never has to wait) is still cut at response_timeout, and its
    connection closed."""

    async def flood(request: WorkerRequest, io: WorkerIO) -> None:
        while io.open and not io.info.peer_closed:
            await io.send(b"HTTP/1.1 100 Continue\r\n\r\n" * 500)

    w.reply(flood)
    started = time.monotonic()
    response = post(proxy, chat_body(stream=True), target="/short/v1/chat/completions")
    elapsed = time.monotonic() - started
    assert response.status == 504, response.raw[:300]
    assert error_of(response)["code"] == "upstream_timeout"
    assert elapsed < 5.0  # response_timeout is 300 ms (loose bound)
    (request,) = w.requests
    assert w.wait_connection_closed(request, 2.0), "the flooding worker's connection was not closed"
