"""Worker failures through the real daemon (issue 3): error frames, errors before the head, retries.

For every way a worker can fail after the client's response head was sent
(close, reset, broken chunked framing, broken Content-Length framing, silence
past idle_timeout, a clean end with no terminator, data that is not JSON),
the openai SDK raises an APIError with the SPEC's code, and the raw bytes
end with one synthetic error frame: no `"finish_reason":"stop"`, no
`[DONE]`, no half-received event, and the broken worker connection closed.
Before the head the same failures are 502/504 with an OpenAI-shaped body.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.harness import (
    LAST_CHUNK,
    MODEL,
    Call,
    Close,
    Daemon,
    FakeWorker,
    RawClient,
    RawResponse,
    Reset,
    Send,
    Sleep,
    Stall,
    Step,
    WorkerIO,
    WorkerRequest,
    chat_body,
    chat_completion,
    chat_route,
    chat_stream_events,
    chunk,
    daemon_config,
    http_response,
    json_reply,
    openai_handler,
    post,
    request_bytes,
    response_head,
    text_completion,
)

EV = chat_stream_events()  # role, "Hel", "lo", "!", finish(stop), usage, [DONE]
SSE = ("content-type", "text/event-stream")
HEAD_CHUNKED = response_head(200, [SSE, ("transfer-encoding", "chunked")])
HALF_EVENT = b'data: {"id":"chatcmpl-abc123","choices":[{"index":0,"delta":{"content":"HALF'
MESSAGES = [{"role": "user", "content": "hi"}]


def head_length(n: int, content_type: tuple[str, str] = SSE) -> bytes:
    return response_head(200, [content_type, ("content-length", str(n))])


def started(*events: bytes) -> list[Step]:
    """A chunked SSE head and these events, each its own chunk."""
    return [Send(HEAD_CHUNKED), *(Send(chunk(e)) for e in events)]


# name -> (script, the error frame's code)
AFTER_HEAD: dict[str, tuple[list[Step], str]] = {
    "close": ([*started(EV[0], EV[1]), Close()], "upstream_disconnected"),
    "reset": ([*started(EV[0], EV[1]), Reset()], "upstream_disconnected"),
    "close-inside-event": ([*started(EV[0], EV[1]), Send(chunk(HALF_EVENT)), Close()],
                           "upstream_disconnected"),
    "close-inside-chunk": ([*started(EV[0], EV[1]), Send(b"%x\r\n" % 500 + HALF_EVENT), Close()],
                           "upstream_disconnected"),
    "bad-chunk-size": ([*started(EV[0], EV[1]), Sleep(0.05), Send(b"zz\r\n" + EV[2] + b"\r\n"),
                        Stall()], "upstream_protocol_error"),
    "bad-chunk-end": ([*started(EV[0], EV[1]), Sleep(0.05),
                       Send(b"%x\r\n" % len(EV[2]) + EV[2] + b"XX"), Stall()],
                      "upstream_protocol_error"),
    "short-content-length": ([Send(head_length(100_000)), Send(EV[0]), Send(EV[1]), Close()],
                             "upstream_disconnected"),
    "content-length-ends-inside-event": (
        [Send(head_length(len(EV[0]) + len(EV[1]) + 20)), Send(EV[0] + EV[1] + EV[2] + EV[3]),
         Stall()],
        "upstream_incomplete",
    ),
    "silent": ([*started(EV[0], EV[1]), Stall()], "upstream_timeout"),
    "no-terminator": ([*started(EV[0], EV[1]), Send(LAST_CHUNK)], "upstream_incomplete"),
    # a body framed by the connection's end (HTTP/1.0, or no framing header at all): a close
    # before the terminator is a disconnect (nothing tells it from a crash), half event or not
    "close-delimited": ([Send(response_head(200, [SSE])), Send(EV[0]), Send(EV[1]), Close()],
                        "upstream_disconnected"),
    "close-delimited-inside-event": (
        [Send(b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"), Send(EV[0]),
         Send(EV[1]), Send(HALF_EVENT), Close()], "upstream_disconnected"),
    # lines SSE does not define break its framing: an HTML error page inside the stream is
    # never passed on, and the events after it (even a clean [DONE]) do not make it a success
    "html-inside-stream": (
        [*started(EV[0], EV[1]), Sleep(0.05),
         Send(chunk(b"<html><body>502 Bad Gateway HALF</body></html>\r\n\r\n")),
         *(Send(chunk(e)) for e in EV[2:]), Send(LAST_CHUNK), Stall()],
        "upstream_protocol_error"),
    "binary-junk-same-read": (
        [Send(HEAD_CHUNKED), Send(chunk(EV[0]) + chunk(EV[1]) + chunk(b"\x00\x01HALF\xff\n\n")
                                  + chunk(EV[2])), Stall()], "upstream_protocol_error"),
    "not-json": ([*started(EV[0], EV[1]), Sleep(0.05), Send(chunk(b"data: {oops\n\n")),
                  Send(chunk(EV[2])), Stall()], "upstream_protocol_error"),
    "not-a-chunk-object": ([*started(EV[0], EV[1]), Sleep(0.05), Send(chunk(b"data: [1, 2]\n\n")),
                            Send(chunk(EV[2])), Stall()], "upstream_protocol_error"),
    # bytes that cannot start a size line (an HTML page with LF line ends, bare-LF framing), or a
    # chunk's end, break the framing as they arrive: whatever the worker does next (closes, or
    # says nothing more) does not make it a disconnect or a timeout
    "html-for-a-chunk-then-close": (
        [*started(EV[0], EV[1]), Sleep(0.05), Send(b"<html>\n<body>502 Bad Gateway HALF</body>\n"),
         Close()], "upstream_protocol_error"),
    "html-for-a-chunk-then-silent": (
        [*started(EV[0], EV[1]), Sleep(0.05), Send(b"<html>\n<body>502 Bad Gateway HALF</body>\n"),
         Stall()], "upstream_protocol_error"),
    "bare-lf-chunk-size-then-close": (
        [*started(EV[0], EV[1]), Sleep(0.05), Send(b"%x\n" % len(EV[2]) + EV[2] + b"\n"), Close()],
        "upstream_protocol_error"),
    # a line that is no SSE field line with no blank line after it (an HTML page, a plain-text
    # traceback) broke the stream as much as a whole garbage event: what ends it next (the
    # body's end, a close, a silence) is not the failure the client is told
    "html-without-blank-line-then-end": (
        [*started(EV[0], EV[1]), Sleep(0.05),
         Send(chunk(b"<html><body>502 Bad Gateway HALF</body></html>\n")), Send(LAST_CHUNK), Stall()],
        "upstream_protocol_error"),
    "html-without-line-end-then-close": (
        [*started(EV[0], EV[1]), Sleep(0.05), Send(chunk(b"<html><body>502 Bad Gateway HALF")),
         Close()], "upstream_protocol_error"),
    "traceback-without-line-end-then-silent": (
        [*started(EV[0], EV[1]), Sleep(0.05), Send(chunk(b"Internal Server Error HALF")), Stall()],
        "upstream_protocol_error"),
    # the same breakages arriving in the same read as the good events before them
    "bad-chunk-size-same-read": (
        [Send(HEAD_CHUNKED), Send(chunk(EV[0]) + chunk(EV[1]) + b"zz\r\n" + EV[2] + b"\r\n"),
         Stall()], "upstream_protocol_error"),
    "bad-chunk-end-same-read": (
        [Send(HEAD_CHUNKED), Send(chunk(EV[0]) + chunk(EV[1]) + b"%x\r\n" % len(EV[2]) + EV[2]
                                  + b"XX"), Stall()], "upstream_protocol_error"),
    "not-json-same-read": (
        [Send(HEAD_CHUNKED), Send(chunk(EV[0]) + chunk(EV[1]) + chunk(b"data: {oops\n\n")
                                  + chunk(EV[2])), Stall()], "upstream_protocol_error"),
    "not-json-same-chunk": (
        [Send(HEAD_CHUNKED), Send(chunk(EV[0] + EV[1] + b"data: {oops\n\n" + EV[2])), Stall()],
        "upstream_protocol_error"),
}

# name -> (script, status, code): the worker fails before its response head is complete
BEFORE_HEAD: dict[str, tuple[list[Step], int, str]] = {
    "close": ([Close()], 502, "upstream_disconnected"),
    "reset": ([Reset(settle=0)], 502, "upstream_disconnected"),
    "garbage": ([Send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), Stall()], 502, "upstream_protocol_error"),
    "bad-status-line": ([Send(b"HTTP/1.1 2OO OK\r\n\r\n"), Stall()], 502, "upstream_protocol_error"),
    "partial-head-close": ([Send(b"HTTP/1.1 200 OK\r\ncontent-type: text/ev"), Close()], 502,
                           "upstream_disconnected"),
    "partial-head-silent": ([Send(b"HTTP/1.1 200 OK\r\n"), Stall()], 504, "upstream_timeout"),
    "silent": ([Stall()], 504, "upstream_timeout"),
    # a control byte in a header value: h11 reads it, but HTTP parsers downstream (Node's
    # llhttp: undici, fetch, the openai and anthropic SDKs) refuse the whole response head
    "control-byte-in-a-header-value": (
        [Send(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-junk: a\x01b\r\n"
              b"transfer-encoding: chunked\r\n\r\n" + chunk(EV[0])), Stall()],
        502, "upstream_protocol_error"),
    "delete-byte-in-a-header-value": (
        [Send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-junk: a\x7f\r\n"
              b"content-length: 2\r\n\r\n{}"), Stall()],
        502, "upstream_protocol_error"),
}


@pytest.fixture(scope="module")
def proxy(module_worker: FakeWorker, make_module_daemon: Callable[..., Daemon]) -> Daemon:
    """No pooling (every request on a fresh worker connection: no retries); short timeouts."""
    return make_module_daemon(
        worker=module_worker,
        upstream={"idle_timeout": "500ms", "response_timeout": "500ms", "max_idle_connections": 0},
        routes=[chat_route(),
                chat_route("always", match={"path": "/always/v1/chat/completions"},
                           upstream_stream="always"),
                {"name": "completions", "match": {"path": "/v1/completions"},
                 "dialect": "openai-completions"},
                {"name": "rest", "match": {"path_prefix": "/v1/"}, "dialect": "passthrough"}],
    )



def sdk(daemon: Daemon, prefix: str = "") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}{prefix}/v1", api_key="sk-test", max_retries=0,
                         timeout=10)


def all_worker_connections_closed(w: FakeWorker, timeout: float = 2.0) -> bool:
    return w.wait_until(lambda: all(c.peer_closed or c.closed_by_us for c in w.connections), timeout)


def assert_error_frame_ending(response: RawResponse, code: str) -> dict[str, Any]:
    """The body ends with exactly one synthetic error frame, after which nothing; never a success."""
    assert response.status == 200
    assert response.complete, "the HTTP body was not ended cleanly after the error frame"
    body = response.body
    assert b"[DONE]" not in body, body
    assert b'"finish_reason":"stop"' not in body, body
    assert b"HALF" not in body, "a half-received event was forwarded"
    payloads = response.sse_json()
    frame = payloads[-1]
    assert frame["error"]["code"] == code, frame
    assert frame["error"]["type"] == "upstream_error"
    assert isinstance(frame["error"]["message"], str) and frame["error"]["message"]
    assert frame["choices"] == [{"index": 0, "delta": {}, "finish_reason": "error"}]
    assert frame["object"] == "chat.completion.chunk"
    assert (frame["id"], frame["created"], frame["model"]) == ("chatcmpl-abc123", 1_700_000_000, MODEL)
    assert sum(1 for p in payloads if isinstance(p, dict) and "error" in p) == 1
    assert body.endswith(b"\n\n")
    return frame


# ============================================================================ after the head


@pytest.mark.parametrize("name", list(AFTER_HEAD))
def test_failure_after_head_raw_bytes(w: FakeWorker, proxy: Daemon, name: str) -> None:
    script, code = AFTER_HEAD[name]
    w.reply(script)
    rid = f"after-{name}"
    with RawClient(proxy.address) as client:
        client.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=True),
                                  [("x-request-id", rid)]))
        response = client.read_response(5.0)
    assert_error_frame_ending(response, code)
    contents = [p["choices"][0]["delta"].get("content") for p in response.sse_json()[:-1]
                if p["choices"]]
    assert contents[:2] == ["", "Hel"], "the events before the failure were not forwarded"
    assert "!" not in contents, "an event after the failure was forwarded"
    assert all_worker_connections_closed(w), "the broken worker connection was left open"
    record = proxy.ledger_for(rid)
    assert record["outcome"] == ("upstream_timeout" if code == "upstream_timeout" else "upstream_error")
    assert record["status"] == 200


@pytest.mark.parametrize("client_stream", [True, False], ids=["relayed", "aggregated"])
def test_an_event_over_max_event_size_is_refused_whichever_way_it_is_read(
    worker: FakeWorker, make_daemon: Callable[..., Daemon], client_stream: bool
) -> None:
    # content events alike but for their text are taken without parsing (the fast lane):
    # a longer one in its own chunk must be refused all the same
    daemon = make_daemon(worker=worker, limits={"max_event_size": 600},
                         routes=[chat_route(upstream_stream="always")])
    events = chat_stream_events(("a", "b", "c", "x" * 700, "d"))
    worker.reply([Send(HEAD_CHUNKED), *(Send(chunk(e)) for e in events), Send(LAST_CHUNK)])
    response = post(daemon, chat_body(stream=client_stream))
    if client_stream:
        assert response.sse_json()[-1]["error"]["code"] == "upstream_protocol_error"
        assert b"x" * 700 not in response.body
    else:
        assert_openai_error(response, 502, "upstream_protocol_error")


@pytest.mark.parametrize("client_stream", [True, False], ids=["relayed", "aggregated"])
def test_events_in_the_read_that_breaks_the_stream_are_still_counted(
    worker: FakeWorker, make_daemon: Callable[..., Daemon], client_stream: bool
) -> None:
    # the usage event and garbage after it in one read: the usage is the worker's either way
    daemon = make_daemon(worker=worker, routes=[chat_route(upstream_stream="always")])
    events = chat_stream_events()
    worker.reply([Send(HEAD_CHUNKED), *(Send(chunk(e)) for e in events[:-2]),
                  Send(chunk(events[-2] + b"<html>\n\n")), Stall()])
    rid = f"garbage-after-usage-{client_stream}"
    response = post(daemon, chat_body(stream=client_stream), headers=[("x-request-id", rid)])
    assert response.status == (200 if client_stream else 502)
    record = daemon.ledger_for(rid)
    assert (record["outcome"], record["usage_estimated"]) == ("upstream_error", False), record
    assert (record["prompt_tokens"], record["completion_tokens"]) == (11, 3), record


def test_idle_timeout_counts_silence_not_the_stream(w: FakeWorker, proxy: Daemon) -> None:
    """Tokens 100 ms apart for 1.1 s (more than twice the 500 ms idle timeout) are no silence,
    however the tokens are taken (the worker connection only marks that a read happened;
    the pump's timer looks at least every eighth of the timeout); the stall after them is
    reported once 500 ms of it have passed, and not much later."""
    token = EV[2]  # "lo", the same bytes each time: after the first, the fast lane takes them
    # (11: a timer that looked only once per timeout would notice the stall ~0.4 s late)
    tokens = [step for _ in range(11) for step in (Sleep(0.1), Send(chunk(token)))]
    w.reply([*started(EV[0], EV[1]), *tokens, Stall()])
    with RawClient(proxy.address) as client:
        client.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=True)))
        seen = b""
        last_token_at = error_at = 0.0
        while b"upstream_timeout" not in seen:
            piece = client.recv_some(timeout=5.0)
            assert piece, seen
            seen += piece
            if b'"lo"' in piece:
                last_token_at = time.monotonic()
            if b"upstream_timeout" in piece:
                error_at = time.monotonic()
    assert seen.count(b'"content":"lo"') == 11 and b"[DONE]" not in seen
    # noticed after 500 ms of silence (libuv's timers are to the millisecond), at most an
    # eighth (62.5 ms) late, plus timer slack
    assert 0.49 <= error_at - last_token_at < 0.5 + 0.0625 + 0.15, error_at - last_token_at


@pytest.mark.parametrize("name", list(AFTER_HEAD))
def test_failure_after_head_sdk_raises(w: FakeWorker, proxy: Daemon, name: str) -> None:
    script, code = AFTER_HEAD[name]
    w.reply(script)
    seen: list[Any] = []
    stream = sdk(proxy).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError) as info:
        for item in stream:
            seen.append(item)
    assert info.value.code == code
    assert not isinstance(info.value, openai.APIConnectionError)
    assert [c.choices[0].delta.content for c in seen] == ["", "Hel"]
    assert not any(c.choices[0].finish_reason for c in seen)


def test_failure_after_head_of_a_json_worker(w: FakeWorker, proxy: Daemon) -> None:
    """JSON -> SSE: the client's head went out when the worker's did; the document is cut."""
    doc = json.dumps(chat_completion()).encode()
    w.reply([Send(head_length(len(doc), ("content-type", "application/json"))), Send(doc[:40]),
             Close()])
    response = post(proxy, chat_body(stream=True))
    frame = response.sse_json()[-1]
    assert frame["error"]["code"] == "upstream_disconnected"
    assert b"[DONE]" not in response.body and response.complete
    assert frame["id"] == f"chatcmpl-{response.header('x-request-id')}"
    assert frame["model"] == MODEL


def test_failure_with_nothing_forwarded_yet_uses_the_request_for_the_frame(
    w: FakeWorker, proxy: Daemon
) -> None:
    w.reply([*started(), Close()])
    response = post(proxy, chat_body(stream=True, model="asked-model"),
                    headers=[("x-request-id", "frame-ids")])
    frame = response.sse_json()[-1]
    assert frame["id"] == "chatcmpl-frame-ids"
    assert frame["model"] == "asked-model"
    assert isinstance(frame["created"], int) and frame["created"] > 1_600_000_000
    assert frame["error"]["code"] == "upstream_disconnected"


@pytest.mark.parametrize("worker", ["sse", "json"])
def test_completions_frame_with_nothing_forwarded_has_spec_id(
    w: FakeWorker, proxy: Daemon, worker: str
) -> None:
    """SPEC: with no chunk from the worker the frame's id is `chatcmpl-` + the request id, on
    `openai-completions` too (its frame's object is `text_completion`: README)."""
    if worker == "sse":
        w.reply([*started(), Close()])
    else:
        doc = json.dumps(text_completion()).encode()
        w.reply([Send(head_length(len(doc), ("content-type", "application/json"))),
                 Send(doc[:20]), Close()])
    response = post(proxy, {"model": "asked-model", "prompt": "hi", "stream": True},
                    target="/v1/completions", headers=[("x-request-id", "frame-ids")])
    frame = response.sse_json()[-1]
    assert frame["object"] == "text_completion"
    assert frame["id"] == "chatcmpl-frame-ids"
    assert frame["model"] == "asked-model"
    assert frame["error"]["code"] == "upstream_disconnected"
    assert b"[DONE]" not in response.body


# ================================================= a break after the stream's last event

# name -> what the worker does after a whole stream ([DONE] included) instead of ending its body
AFTER_DONE: dict[str, list[Step]] = {
    "close": [Close()],
    "reset": [Reset()],
    "silent": [Stall()],
    "bad-chunk-size": [Send(b"zz\r\n"), Stall()],
    "junk-chunk": [Send(chunk(b"<html>502</html>\r\n\r\n")), Send(LAST_CHUNK), Stall()],
}


@pytest.mark.parametrize("name", list(AFTER_DONE))
@pytest.mark.parametrize("client_stream", [True, False], ids=["stream", "aggregated"])
def test_a_break_after_done_takes_nothing_from_the_stream(
    w: FakeWorker, proxy: Daemon, name: str, client_stream: bool
) -> None:
    """After `[DONE]` the stream is whole: a close, reset, silence or broken framing after it
    adds no error frame after `[DONE]` (nor makes the aggregated answer a 502), and the ledger
    says ok. The broken worker connection is still closed, never pooled."""
    w.reply([*started(*EV), *AFTER_DONE[name]])
    rid = f"after-done-{name}-{client_stream}"
    target = "/v1/chat/completions" if client_stream else "/always/v1/chat/completions"
    response = post(proxy, chat_body(stream=client_stream, include_usage=client_stream or None),
                    target, headers=[("x-request-id", rid)])
    assert response.status == 200 and response.complete, response.body
    if client_stream:
        payloads = response.sse()
        assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1, payloads
        assert b'"error"' not in response.body
    else:
        document = response.json()
        assert document["choices"][0]["message"]["content"] == "Hello!"
        assert response.header("x-sidecar-cost") is not None
    assert all_worker_connections_closed(w), "the broken worker connection was left open"
    record = proxy.ledger_for(rid)
    assert (record["outcome"], record["status"], record["completion_tokens"]) == ("ok", 200, 3)


def test_a_worker_silent_after_done_does_not_hold_the_client_until_idle_timeout(
    w: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    """The body's end is waited for a moment after `[DONE]`, not `idle_timeout` (here 30 s),
    and no heartbeat follows `[DONE]`."""
    daemon = make_daemon(
        worker=w, upstream={"idle_timeout": "30s"},
        routes=[chat_route(heartbeat="100ms"),
                chat_route("always", match={"path": "/always/v1/chat/completions"},
                           upstream_stream="always")],
    )
    # the events in their own chunks; or in one write with the head, framed by the close
    in_one_write = [Send(response_head(200, [SSE]) + b"".join(EV)), Stall()]
    for (client_stream, target), script in itertools.product(
        ((True, "/v1/chat/completions"), (False, "/always/v1/chat/completions")),
        ([*started(*EV), Stall()], in_one_write),
    ):
        w.reply(script)
        rid = f"silent-after-done-{client_stream}-{len(script)}"
        response = post(daemon, chat_body(stream=client_stream), target,
                        headers=[("x-request-id", rid)], timeout=10)
        assert response.status == 200 and response.complete, response.body
        if client_stream:
            assert response.body.endswith(b"data: [DONE]\n\n"), response.body
        else:
            assert response.json()["choices"][0]["message"]["content"] == "Hello!"
        assert daemon.ledger_for(rid)["outcome"] == "ok"
        assert all_worker_connections_closed(w), "the silent worker connection was left open"


def test_a_slow_client_after_done_keeps_a_healthy_worker_connection(
    w: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    """The wait for the body's end after `[DONE]` counts only while the worker is read: a
    client too slow to take a big last event holds the worker back, and the worker's end of
    body, sent a moment after `[DONE]`, is still read and its connection pooled."""
    daemon = make_daemon(worker=w, upstream={"idle_timeout": "30s"},
                         limits={"max_event_size": "16MiB"})
    big = chat_stream_events(("x" * 6_000_000,))
    content = next(e for e in big if b"xxxx" in e)
    finish_and_done = b"".join(chunk(e) for e in big[big.index(content) + 1:])
    for rid in ("slow-1", "slow-2"):
        w.reply([Send(HEAD_CHUNKED + b"%x\r\n" % len(content) + content[:-20]), Sleep(0.2),
                 Send(content[-20:] + b"\r\n" + finish_and_done), Sleep(0.2), Send(LAST_CHUNK)])
        with RawClient(daemon.address, timeout=10, rcvbuf=4096) as client:
            client.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=True),
                                      [("x-request-id", rid)]))
            time.sleep(1.5)  # longer than the wait for the body's end, in which nothing is read
            response = client.read_response(10)
        assert response.complete and response.sse()[-1] == "[DONE]"
        assert daemon.ledger_for(rid)["outcome"] == "ok"
    assert len(w.connections) == 1, "the worker connection was not reused"


def test_a_break_after_the_finish_chunk_but_before_done_is_still_a_failure(
    w: FakeWorker, proxy: Daemon
) -> None:
    # only [DONE] ends an openai stream: the usage chunk may still be coming after the finish
    finish = next(i for i, e in enumerate(EV) if b'"finish_reason":"stop"' in e)
    cut_chunked = [*started(*EV[: finish + 1]), Reset()]
    # a body framed by the close: nothing tells a clean end from a crash but [DONE]
    cut_at_close = [Send(response_head(200, [SSE])), *(Send(e) for e in EV[:-1]), Close()]
    for name, script in (("chunked", cut_chunked), ("close-delimited", cut_at_close)):
        for client_stream in (True, False):
            w.reply(script)
            rid = f"before-done-{name}-{client_stream}"
            target = "/v1/chat/completions" if client_stream else "/always/v1/chat/completions"
            response = post(proxy, chat_body(stream=client_stream), target,
                            headers=[("x-request-id", rid)])
            if client_stream:
                frame = response.sse_json()[-1]
                assert frame["error"]["code"] == "upstream_disconnected", response.body
            else:
                assert response.status == 502, response.body
                assert response.json()["error"]["code"] == "upstream_disconnected"
            assert proxy.ledger_for(rid)["outcome"] == "upstream_error"


# ============================================================================ before the head


def assert_openai_error(response: RawResponse, status: int, code: str) -> None:
    assert response.status == status, response.raw[:500]
    assert response.header("content-type") == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("name", list(BEFORE_HEAD))
def test_failure_before_head(w: FakeWorker, proxy: Daemon, name: str, stream: bool) -> None:
    script, status, code = BEFORE_HEAD[name]
    w.reply(script)
    rid = f"before-{name}-{stream}"
    response = post(proxy, chat_body(stream=stream), headers=[("x-request-id", rid)])
    assert_openai_error(response, status, code)
    assert len(w.requests) == 1
    assert all_worker_connections_closed(w)
    record = proxy.ledger_for(rid)
    assert record["status"] == status
    assert record["outcome"] == ("upstream_timeout" if status == 504 else "upstream_error")


def test_failure_before_head_sdk(w: FakeWorker, proxy: Daemon) -> None:
    w.reply([Close()], [Stall()])
    with pytest.raises(openai.APIStatusError) as info:
        sdk(proxy).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert info.value.status_code == 502 and info.value.code == "upstream_disconnected"
    with pytest.raises(openai.APIStatusError) as info:
        sdk(proxy).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert info.value.status_code == 504 and info.value.code == "upstream_timeout"


# ============================================================================ non-streaming clients


@pytest.mark.parametrize("name", list(AFTER_HEAD))
def test_aggregated_stream_failure_is_an_http_error(w: FakeWorker, proxy: Daemon, name: str) -> None:
    script, code = AFTER_HEAD[name]
    w.reply(script)
    rid = f"aggregated-{name}"
    response = post(proxy, chat_body(), target="/always/v1/chat/completions",
                    headers=[("x-request-id", rid)])
    status = 504 if code == "upstream_timeout" else 502
    assert_openai_error(response, status, code)
    assert b"Hel" not in response.body
    assert all_worker_connections_closed(w)
    assert proxy.ledger_for(rid)["status"] == status


def test_aggregated_stream_failure_sdk(w: FakeWorker, proxy: Daemon) -> None:
    w.reply(AFTER_HEAD["reset"][0])
    with pytest.raises(openai.APIStatusError) as info:
        sdk(proxy, "/always").chat.completions.create(model=MODEL, messages=MESSAGES)
    assert info.value.status_code == 502
    assert info.value.code == "upstream_disconnected"


def test_json_document_cut_for_a_non_streaming_client(w: FakeWorker, proxy: Daemon) -> None:
    doc = json.dumps(chat_completion()).encode()
    w.reply([Send(head_length(len(doc), ("content-type", "application/json"))), Send(doc[:40]),
             Close()],
            [Send(head_length(len(doc), ("content-type", "application/json"))), Send(b"{" + doc[1:30]),
             Send(b"x" * (len(doc) - 30))])
    assert_openai_error(post(proxy, chat_body()), 502, "upstream_disconnected")
    assert_openai_error(post(proxy, chat_body()), 502, "upstream_protocol_error")


def test_passthrough_failure_after_head_breaks_the_client_framing(w: FakeWorker, proxy: Daemon) -> None:
    w.reply([Send(response_head(200, [("content-length", "1000")])), Send(b"x" * 100), Close()])
    with RawClient(proxy.address) as client:
        client.send(request_bytes("GET", "/v1/files/1"))
        response = client.read_response(5.0)
        assert response.status == 200
        assert not response.complete, "a cut passthrough body was presented as complete"
        assert client.closed_by_peer(2.0)


@pytest.mark.parametrize("value", [b"a\x01b", b"\x1b[31m", b"a\x7f", b"\x08"])
def test_a_worker_head_with_a_control_byte_never_reaches_the_client(
    w: FakeWorker, proxy: Daemon, value: bytes
) -> None:
    """RFC 9110 5.5: control bytes make a field value invalid; h11 reads them, Node's llhttp
    (undici, fetch, every Node SDK) refuses the whole head ("Invalid header value char"). On a
    passthrough route too the worker's head is not written on: 502, as for any malformed head."""
    w.reply([Send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-junk: " + value
                  + b"\r\ncontent-length: 2\r\n\r\n{}"), Stall()])
    rid = "ctl-byte-" + value.hex()
    with RawClient(proxy.address) as client:
        client.send(request_bytes("GET", "/v1/files/1", headers=[("x-request-id", rid)]))
        response = client.read_response(5.0)
    assert response.status == 502, response.raw[:300]
    assert value not in response.raw
    assert response.json()["error"]["code"] == "upstream_protocol_error"
    assert all_worker_connections_closed(w)
    assert proxy.ledger_for(rid)["outcome"] == "upstream_error"


# ============================================================================ response_timeout


class SlowReadingWorker:
    """A worker (raw sockets, a thread) that reads the request body 512 KiB every 50 ms, or
    never (`reads=False`), then answers at once: a busy worker taking a large request."""

    def __init__(self, reads: bool = True) -> None:
        self.reads = reads
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                if not self.reads:
                    time.sleep(5)
                    return
                left = length - len(body)
                while left > 0:
                    time.sleep(0.05)
                    tick = min(left, 524288)
                    while tick > 0:
                        got = len(conn.recv(tick))
                        if not got:
                            return
                        tick -= got
                        left -= got
                doc = json.dumps(chat_completion("read it all")).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n" % len(doc) + doc)
                time.sleep(0.5)

    def close(self) -> None:
        self.listener.close()


def test_response_timeout_counts_from_the_request_sent(make_daemon: Callable[..., Daemon]) -> None:
    """SPEC: response_timeout is "request sent -> response head received". A 20 MB request
    that a busy worker takes about 2 s to read is not a worker silent for 1.5 s: the worker
    answers as soon as it has it, and the client gets that answer, not a 504. (What the
    kernel holds once sidecar's buffer is empty, a few MB, counts: well under 1.5 s here.)"""
    worker = SlowReadingWorker()
    try:
        daemon = make_daemon(daemon_config(worker.url, upstream={"response_timeout": "1500ms"},
                                           limits={"max_request_body": "32MiB"}))
        body = chat_body(messages=[{"role": "user", "content": "y" * 20_000_000}])
        started_at = time.monotonic()
        response = post(daemon, body, timeout=20)
        assert response.status == 200, response.body[:300]
        assert response.json()["choices"][0]["message"]["content"] == "read it all"
        assert time.monotonic() - started_at > 1.7, "the worker read the body faster than planned"
    finally:
        worker.close()


def test_a_worker_that_never_reads_the_request_still_times_out(
    make_daemon: Callable[..., Daemon]
) -> None:
    worker = SlowReadingWorker(reads=False)
    try:
        daemon = make_daemon(daemon_config(worker.url, upstream={"response_timeout": "700ms"},
                                           limits={"max_request_body": "20MiB"}))
        body = chat_body(messages=[{"role": "user", "content": "y" * 9_000_000}])
        started_at = time.monotonic()
        response = post(daemon, body, timeout=20)
        assert response.status == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
        assert time.monotonic() - started_at < 3.5
    finally:
        worker.close()


# ============================================================================ retry once


@pytest.fixture
def pooled(worker: FakeWorker, make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon(worker=worker, upstream={"response_timeout": "1s"})


def _ok(text: str) -> list[Step]:
    return json_reply(chat_completion(text))


@pytest.mark.parametrize("how", [Close, Reset])
def test_dead_pooled_connection_is_retried_once_on_a_new_one(
    worker: FakeWorker, pooled: Daemon, how: type[Step]
) -> None:
    worker.reply(_ok("first"), [how()], _ok("second"))
    assert post(pooled, chat_body()).json()["choices"][0]["message"]["content"] == "first"
    response = post(pooled, chat_body(), headers=[("x-request-id", "retried")])
    assert response.status == 200
    assert response.json()["choices"][0]["message"]["content"] == "second"
    first, dead, retry = worker.wait_requests(3)
    assert dead.connection == first.connection, "the second request did not use the pooled connection"
    assert retry.connection != dead.connection
    assert retry.body == dead.body
    assert retry.header("x-request-id") == dead.header("x-request-id") == "retried"


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_retried_passthrough_upload_is_framed_again(
    worker: FakeWorker, pooled: Daemon, chunked: bool
) -> None:
    # a streamed (passthrough) body is sent again with the framing its head announces: a
    # chunked head followed by the decoded body would make the worker read the body's own
    # bytes as HTTP, here a smuggled second request
    body = b"0\r\n\r\nGET /v1/admin HTTP/1.1\r\nhost: x\r\n\r\n" + bytes(range(256)) * 40
    worker.reply(http_response(200, b"first"), [Close()], http_response(200, b"second"))
    with RawClient(pooled.address) as client:
        client.send(request_bytes("GET", "/v1/models"))
        assert client.read_response().body == b"first"
        client.send(request_bytes("POST", "/v1/files", body,
                                  [("content-type", "application/octet-stream")], chunked=chunked))
        response = client.read_response()
        assert response.status == 200 and response.body == b"second"
    first, dead, retry = worker.wait_requests(3)
    assert dead.connection == first.connection and retry.connection != dead.connection
    assert retry.body == dead.body == body
    assert retry.header("transfer-encoding") == ("chunked" if chunked else None)
    time.sleep(0.3)
    assert len(worker.requests) == 3, "the worker read a request the client never sent"


@pytest.mark.parametrize("pipelined", [False, True], ids=["alone", "pipelined"])
def test_retried_passthrough_upload_whose_end_was_read_before_the_worker_was_found_gone(
    worker: FakeWorker, pooled: Daemon, pipelined: bool
) -> None:
    # The pooled connection carried the head and the start of a chunked upload, then the
    # worker dropped it (a keep-alive timeout racing the request); the client's last chunk
    # came after. The request is sent again, whole, on a new connection and answered: the
    # body's end, already read from the client, is not waited for again until body_timeout
    # (a 408), nor taken for a client that left when a pipelined request follows it (a 499
    # and the connection closed, the pipelined request never answered).
    async def drop_at_the_next_head(io: WorkerIO) -> None:
        assert await io.wait_received(b"\r\n\r\n", timeout=5)
        await io.reset(settle=0)

    worker.reply([Send(http_response(200, b"first")), Call(drop_at_the_next_head)],
                 http_response(200, b"second"), http_response(200, b"third"))
    fds = Path(f"/proc/{pooled.pid}/fd")
    with RawClient(pooled.address) as client:
        client.send(request_bytes("GET", "/v1/models"))
        assert client.read_response().body == b"first"
        pooled_fds = len(list(fds.iterdir()))
        client.send(b"POST /v1/files HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n" + chunk(b"part one, "))
        # the daemon saw the reset (and closed that connection) before the body's end comes
        deadline = time.monotonic() + 5
        while len(list(fds.iterdir())) >= pooled_fds and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(list(fds.iterdir())) < pooled_fds
        client.send(LAST_CHUNK + (request_bytes("GET", "/v1/models") if pipelined else b""))
        started = time.monotonic()
        response = client.read_response()
        assert (response.status, response.body) == (200, b"second")
        assert time.monotonic() - started < 1.5, "answered only after body_timeout"
        if pipelined:
            assert client.read_response().body == b"third"
    first, retry, *_ = worker.wait_requests(3 if pipelined else 2)
    assert retry.connection != first.connection
    assert retry.body == b"part one, "


def test_retry_happens_only_once(worker: FakeWorker, pooled: Daemon) -> None:
    worker.reply(_ok("first"), [Close()], [Close()], _ok("never"))
    post(pooled, chat_body())
    response = post(pooled, chat_body())
    assert response.status == 502
    assert response.json()["error"]["code"] == "upstream_disconnected"
    assert len(worker.requests) == 3


def test_retry_takes_a_new_connection_not_another_pooled_one(
    worker: FakeWorker, pooled: Daemon
) -> None:
    """SPEC: the request is "sent again, once, on a new connection". With two connections
    in the pool and a worker that has dropped both, the retry must not take the second
    pooled one (it would die the same way and the client get a 502)."""

    def handler(request: WorkerRequest) -> list[Step]:
        if request.index > 0:  # the worker dropped every kept-alive connection
            return [Close()]
        return [Sleep(0.3), *_ok("fresh")]  # slow: the two warm-up requests take two connections

    worker.default = handler
    with ThreadPoolExecutor(2) as pool:
        warm = list(pool.map(lambda _: post(pooled, chat_body()), range(2)))
    assert [r.status for r in warm] == [200, 200]
    first, second = worker.wait_requests(2)
    assert first.connection != second.connection, "the warm-up did not fill the pool with two"
    response = post(pooled, chat_body())
    assert response.status == 200, response.body
    assert response.json()["choices"][0]["message"]["content"] == "fresh"
    dead, retry = worker.wait_requests(4)[2:]
    assert dead.index == 1, "the request did not use a pooled connection"
    assert retry.index == 0, "the retry went to another pooled connection"
    assert len(worker.requests) == 4


def test_no_retry_after_a_response_byte(worker: FakeWorker, pooled: Daemon) -> None:
    worker.reply(_ok("first"), [Send(b"HTTP/1.1 200 OK\r\n"), Close()], _ok("never"))
    post(pooled, chat_body())
    response = post(pooled, chat_body(stream=True))
    assert response.status == 502
    assert response.json()["error"]["code"] == "upstream_disconnected"
    assert len(worker.requests) == 2


def test_no_retry_on_a_fresh_connection(worker: FakeWorker, pooled: Daemon) -> None:
    worker.reply([Close()], _ok("never"))
    response = post(pooled, chat_body())
    assert response.status == 502
    assert len(worker.requests) == 1


def test_pooled_connection_closed_while_idle_is_not_used(worker: FakeWorker, pooled: Daemon) -> None:
    worker.reply([*_ok("first"), Close()], _ok("second"))
    post(pooled, chat_body())
    assert worker.wait_until(lambda: worker.connections and worker.connections[0].closed_by_us)
    response = post(pooled, chat_body())
    assert response.json()["choices"][0]["message"]["content"] == "second"
    first, second = worker.wait_requests(2)
    assert first.connection != second.connection
    assert worker.incomplete == []


def test_pooled_connection_sent_bytes_while_idle_is_closed_at_once(
    worker: FakeWorker, pooled: Daemon
) -> None:
    """Bytes no request asked for on an idle pooled connection: it is closed then (not
    buffered until pool_idle_timeout, nor reused), and the next request gets a new one."""
    worker.reply([*_ok("first"), Sleep(0.3), Send(b"junk" * 65536)], _ok("second"))
    post(pooled, chat_body())
    assert worker.wait_peer_closed(1, timeout=2.0), "the pooled connection held the junk"
    response = post(pooled, chat_body())
    assert response.json()["choices"][0]["message"]["content"] == "second"
    first, second = worker.wait_requests(2)
    assert first.connection != second.connection


def test_llamacpp_style_close_after_each_stream(worker: FakeWorker, pooled: Daemon) -> None:
    worker.default = lambda request: [*openai_handler("llamacpp")(request), Close()]
    client = sdk(pooled)
    for _ in range(3):
        chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello!"
    assert len(worker.wait_requests(3)) == 3


def test_bytes_after_a_complete_response_are_never_taken_as_the_next_one(
    worker: FakeWorker, pooled: Daemon
) -> None:
    smuggled = http_response(200, b'{"smuggled":true}')
    worker.reply([Send(http_response(200, json.dumps(chat_completion("first")).encode()) + smuggled)],
                 _ok("second"), _ok("third"))
    assert post(pooled, chat_body()).json()["choices"][0]["message"]["content"] == "first"
    second = post(pooled, chat_body())
    assert b"smuggled" not in second.body
    assert second.status == 200
    assert second.json()["choices"][0]["message"]["content"] == "second"


def test_a_worker_that_is_down_gives_502_not_a_hang(make_daemon: Callable[..., Daemon]) -> None:
    from tests.harness import free_port

    daemon = make_daemon(daemon_config(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(openai.APIStatusError) as info:
        sdk(daemon).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert info.value.status_code == 502 and info.value.code == "upstream_unavailable"
