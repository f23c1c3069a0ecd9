"""The SSE wire byte by byte, on every dialect and on a passthrough route, through the real daemon.

A fake worker writes exactly the bytes each test chooses; raw sockets read exactly what the
daemon writes. What sidecar does not change reaches the client as the worker's own bytes
whatever the line ends (LF, CRLF, a bare CR, mixed), the chunking and the reads (split at
every byte, one byte per chunk, one byte per write), with a leading byte-order mark dropped;
no event waits for a later one; heartbeats go only where the worker is silent between events
and never after the stream's terminator; and every event sidecar writes on the typed
dialects is named by its data's `type`, whatever the worker sent and however it failed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness import (
    LAST_CHUNK,
    Close,
    Daemon,
    Drip,
    FakeWorker,
    RawClient,
    Reset,
    Send,
    Sleep,
    Stall,
    Step,
    WorkerIO,
    WorkerRequest,
    chunk,
    request_bytes,
    response_head,
    serving,
    sse_reply,
)

BOM = b"\xef\xbb\xbf"
MODEL = "unpriced-model"  # no price: no cost is injected, so no event has to change
TEXT = "h\u00e9llo \u20ac \U0001f600"  # 2-, 3- and 4-byte UTF-8 characters, to split inside

ROUTES = [
    {"name": "chat", "match": {"path": "/v1/chat/completions"}, "dialect": "openai-chat"},
    {"name": "completions", "match": {"path": "/v1/completions"}, "dialect": "openai-completions"},
    {"name": "messages", "match": {"path": "/v1/messages"}, "dialect": "anthropic-messages"},
    {"name": "responses", "match": {"path": "/v1/responses"}, "dialect": "openai-responses"},
    {"name": "beat-chat", "match": {"path": "/beat/v1/chat/completions"}, "dialect": "openai-chat",
     "heartbeat": "150ms"},
    {"name": "beat-messages", "match": {"path": "/beat/v1/messages"},
     "dialect": "anthropic-messages", "heartbeat": "150ms"},
    {"name": "beat-responses", "match": {"path": "/beat/v1/responses"},
     "dialect": "openai-responses", "heartbeat": "150ms"},
    {"name": "beat-raw", "match": {"path_prefix": "/beat/"}, "dialect": "passthrough",
     "heartbeat": "150ms"},
    {"name": "raw", "match": {"path_prefix": "/v1/"}, "dialect": "passthrough"},
]
EOLS = (b"\n", b"\r\n", b"\r")
SSE_HEAD = response_head(200, [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")])


@pytest.fixture(scope="module")
def daemon(module_worker: FakeWorker, make_module_daemon: Callable[..., Daemon]) -> Daemon:
    return make_module_daemon(worker=module_worker, routes=ROUTES,
                              upstream={"idle_timeout": "1s"})


@pytest.fixture
def worker(module_worker: FakeWorker) -> Iterator[FakeWorker]:
    yield from serving(module_worker)


def block(lines: list[bytes], eol: bytes) -> bytes:
    """One event: its lines, each ended by `eol`, then the blank line."""
    return b"".join(line + eol for line in lines) + eol


def data_lines(obj: dict[str, Any]) -> list[bytes]:
    """`obj` as two `data:` lines (SSE joins them with a line feed: the same JSON)."""
    text = json.dumps(obj, ensure_ascii=False).encode()
    cut = text.index(b", ") + 1
    return [b"data: " + text[:cut], b"data:" + text[cut:]]


def chat_stream() -> list[bytes]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL}

    def chunk_of(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    usage = {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    return [
        block([b"data: " + json.dumps(chunk_of({"role": "assistant", "content": ""})).encode()], b"\n"),
        block([b": a comment from the worker"], b"\r\n"),
        block([b"id: 7", b"retry: 250", *data_lines(chunk_of({"content": TEXT}))], b"\r"),
        block([b"event", b"data:" + json.dumps(chunk_of({"content": "!"})).encode()], b"\r\n"),
        block([b"data: " + json.dumps(chunk_of({}, "stop")).encode()], b"\n"),
        block([b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode()], b"\r"),
        block([b"data: [DONE]"], b"\r\n"),
    ]


def completions_stream() -> list[bytes]:
    base = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": MODEL}

    def chunk_of(text: str, finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "text": text, "finish_reason": finish}]}

    return [
        block([b": ping"], b"\r"),
        block([*data_lines(chunk_of(TEXT))], b"\r\n"),
        block([b"id: 1", b"data: " + json.dumps(chunk_of("", "length")).encode()], b"\n"),
        block([b"data: " + json.dumps({**base, "choices": [], "usage": {
            "prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}}).encode()], b"\r"),
        block([b"data:[DONE]"], b"\n"),
    ]


def typed(kind: str, obj: dict[str, Any], eol: bytes, *extra: bytes) -> bytes:
    return block([*extra, b"event: " + kind.encode(), *data_lines({"type": kind, **obj})], eol)


def messages_stream() -> list[bytes]:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
               "content": [], "usage": {"input_tokens": 2, "output_tokens": 1}}
    text_delta = {"index": 0, "delta": {"type": "text_delta", "text": TEXT}}
    return [
        typed("message_start", {"message": message}, b"\r\n"),
        typed("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}, b"\n"),
        block([b"event: ping", b'data: {"type": "ping"}'], b"\r"),
        block([b":"], b"\n"),
        typed("content_block_delta", text_delta, b"\r", b"id: 3"),
        typed("content_block_stop", {"index": 0}, b"\r\n"),
        typed("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}}, b"\n"),
        block([b"event:message_stop", b'data:{"type":"message_stop"}'], b"\r"),
    ]


def responses_stream() -> list[bytes]:
    response = {"id": "resp_1", "object": "response", "created_at": 1, "model": MODEL,
                "status": "in_progress", "output": []}
    at = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    done = {**response, "status": "completed",
            "usage": {"input_tokens": 2, "output_tokens": 3, "total_tokens": 5}}
    return [
        typed("response.created", {"response": response, "sequence_number": 0}, b"\r"),
        typed("response.output_text.delta", {**at, "delta": TEXT, "sequence_number": 1}, b"\n"),
        block([b": keep going"], b"\r\n"),
        typed("response.output_text.done", {**at, "text": TEXT, "sequence_number": 2}, b"\r\n",
              b"retry: 1000"),
        typed("response.completed", {"response": done, "sequence_number": 3}, b"\r"),
    ]


# (target, request body, the worker's stream): each stream mixes LF, CRLF and bare CR line ends,
# and carries comments, id/retry fields, `data:` without its space, data over two lines and
# multi-byte characters; nothing in it is an event the dialect changes
STREAMS: dict[str, tuple[str, dict[str, Any], list[bytes]]] = {
    "openai-chat": ("/v1/chat/completions", {
        "model": MODEL, "messages": [], "stream": True, "stream_options": {"include_usage": True}},
        chat_stream()),
    "openai-completions": ("/v1/completions", {
        "model": MODEL, "prompt": "x", "stream": True, "stream_options": {"include_usage": True}},
        completions_stream()),
    "anthropic-messages": ("/v1/messages", {
        "model": MODEL, "max_tokens": 5, "messages": [], "stream": True}, messages_stream()),
    "openai-responses": ("/v1/responses", {"model": MODEL, "input": "x", "stream": True},
                         responses_stream()),
    "passthrough": ("/v1/anything", {"stream": True}, chat_stream()),
}


def exchange(client: RawClient, target: str, body: dict[str, Any]) -> bytes:
    """One request on a kept-alive connection; the de-chunked body of its whole answer."""
    client.send(request_bytes("POST", target, body))
    response = client.read_response()
    assert response.status == 200 and response.complete, response.raw[-300:]
    return response.body


@pytest.mark.parametrize("name", list(STREAMS))
def test_unchanged_events_are_the_workers_bytes_split_anywhere(
    daemon: Daemon, worker: FakeWorker, name: str
) -> None:
    target, body, events = STREAMS[name]
    stream = b"".join(events)
    whole = BOM + stream
    replies: list[list[Step]] = [
        # two chunks, cut at every byte (inside the BOM, a CRLF, a character), each its own write
        [Send(SSE_HEAD), *(Send(chunk(part)) for part in (whole[:cut], whole[cut:]) if part),
         Send(LAST_CHUNK)]
        for cut in range(len(whole))
    ]
    # one byte per chunk, one chunk per write
    replies.append([Send(SSE_HEAD), Drip(b"".join(chunk(whole[i:i + 1]) for i in range(len(whole))),
                                         size=1), Send(LAST_CHUNK)])
    # several events per chunk (all in one), and a Content-Length body one byte per write
    replies.append([Send(SSE_HEAD + chunk(whole) + LAST_CHUNK)])
    replies.append([Send(response_head(200, [("content-type", "text/event-stream"),
                                             ("content-length", str(len(stream)))])),
                    Drip(stream, size=1)])
    worker.reply(*replies)
    with RawClient(daemon.address) as client:
        for i in range(len(replies)):
            got = exchange(client, target, body)
            assert got == stream, (i, got)


@pytest.mark.parametrize("name", list(STREAMS))
@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
def test_an_event_is_never_held_back_waiting_for_the_next(
    daemon: Daemon, worker: FakeWorker, name: str, framing: str
) -> None:
    """The worker sends its first events and half of the next, then waits until the client
    has the first ones: were they held back, it would wait in vain. (A passthrough route
    passes the half event on too: it reads no events.)"""
    target, body, events = STREAMS[name]
    stream = b"".join(events)
    first = b"".join(events[:3])
    half = len(first) + len(events[3]) // 2
    release = threading.Event()

    async def handle(request: WorkerRequest, io: WorkerIO) -> None:
        headers = [("content-type", "text/event-stream")]
        wrap: Callable[[bytes], bytes] = bytes
        if framing == "chunked":
            headers.append(("transfer-encoding", "chunked"))
            wrap = chunk
        elif framing == "length":
            headers.append(("content-length", str(len(stream))))
        else:
            headers.append(("connection", "close"))
        await io.send(response_head(200, headers) + wrap(stream[:half]))
        for _ in range(500):
            if release.is_set() or io.info.peer_closed:
                break
            await asyncio.sleep(0.01)
        await io.send(wrap(stream[half:]) + (LAST_CHUNK if framing == "chunked" else b""))
        if framing == "close":
            await io.close()

    worker.reply(handle)
    with RawClient(daemon.address) as client:
        client.send(request_bytes("POST", target, body))
        chunked = b"transfer-encoding: chunked" in client.read_until(b"\r\n\r\n").lower()
        assert chunked or name == "passthrough"  # (which passes a Content-Length on)

        def more(timeout: float = 10.0) -> bytes:
            """The body's next bytes as they come: a chunk's payload, or what arrived."""
            if not chunked:
                return client.recv_some(timeout=timeout)
            size = int(client.read_until(b"\r\n", timeout=timeout), 16)
            return client.read_exactly(size + 2, timeout=timeout)[:-2]

        expected = stream[:half] if name == "passthrough" else first
        seen = b""
        while len(seen) < len(expected):
            piece = more(timeout=3.0)
            assert piece, seen
            seen += piece
        assert seen == expected
        release.set()
        rest = b""
        while len(seen + rest) < len(stream):
            piece = more()
            assert piece, rest
            rest += piece
    assert seen + rest == stream


BEAT = b": keep-alive\n\n"


@pytest.mark.parametrize("name", ["openai-chat", "anthropic-messages", "openai-responses"])
def test_heartbeats_only_while_the_worker_is_silent_and_never_after_the_terminator(
    daemon: Daemon, worker: FakeWorker, name: str
) -> None:
    """heartbeat 150ms: silent after its first events the worker gets comment lines, and none
    while it is silent after its terminator (until its body ends); the events are its own
    bytes; on the route without a heartbeat, none."""
    target, body, events = STREAMS[name]
    stream = b"".join(events)
    script = [Send(SSE_HEAD), Send(chunk(b"".join(events[:2]))), Sleep(0.6),
              Send(chunk(b"".join(events[2:]))), Sleep(0.6), Send(LAST_CHUNK)]
    worker.reply(script, script)
    with RawClient(daemon.address) as client:
        beating = exchange(client, "/beat" + target, body)
        plain = exchange(client, target, body)
    assert plain == stream
    before, _, after = beating.partition(events[2])
    assert before.startswith(b"".join(events[:2]) + BEAT) and before.count(BEAT) >= 2, beating
    assert BEAT not in after, beating
    assert beating.replace(BEAT, b"") == stream


def many(name: str, count: int) -> list[bytes]:
    """The dialect's stream with `count` more content events of 2 KiB before its end."""
    _, _, events = STREAMS[name]
    piece = "x" * 2048
    if name in ("openai-chat", "passthrough"):
        extra = block([b"data: " + json.dumps({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}).encode()],
            b"\n")
        return [*events[:3], *[extra] * count, *events[3:]]
    if name == "openai-completions":
        extra = block([b"data: " + json.dumps({
            "id": "cmpl-1", "object": "text_completion", "created": 1, "model": MODEL,
            "choices": [{"index": 0, "text": piece, "finish_reason": None}]}).encode()], b"\n")
        return [*events[:2], *[extra] * count, *events[2:]]
    if name == "anthropic-messages":
        extra = typed("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}},
                      b"\n")
        return [*events[:5], *[extra] * count, *events[5:]]
    extra = typed("response.output_text.delta", {"item_id": "msg_1", "output_index": 0,
                                                 "content_index": 0, "delta": piece,
                                                 "sequence_number": 1}, b"\n")
    return [*events[:2], *[extra] * count, *events[2:]]


@pytest.mark.parametrize("name", list(STREAMS))
def test_a_client_that_stops_reading_is_no_silence_of_the_worker(
    daemon: Daemon, worker: FakeWorker, name: str
) -> None:
    """idle_timeout (1 s) counts only the worker's silence: a client that reads nothing for
    longer while the worker writes fast (backpressure pauses the worker) gets the whole
    stream, no timeout error; a worker that says nothing for as long gets one."""
    target, body, _ = STREAMS[name]
    events = many(name, 1500)  # 3 MiB: far more than the socket buffers between them hold
    stream = b"".join(events)
    worker.reply([Send(SSE_HEAD), *(Send(chunk(e)) for e in events), Send(LAST_CHUNK)],
                 [Send(SSE_HEAD), Send(chunk(b"".join(events[:3]))), Stall()])
    with RawClient(daemon.address, rcvbuf=4096) as client:
        client.send(request_bytes("POST", target, body))
        time.sleep(2.0)
        response = client.read_response(30.0)  # 3 MiB through a 4 KiB window: slow under load
        assert response.complete and response.body == stream
        if name == "passthrough":
            return  # (a stalled raw body is cut: tested elsewhere)
        silent = exchange(client, target, body)
    assert silent.startswith(b"".join(events[:3]))
    assert b"upstream_timeout" in silent[len(b"".join(events[:3])):]


def unnamed(event: bytes) -> bytes:
    """The event without its `event:` line (the worker names none)."""
    lines = event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return b"\n".join(line for line in lines if not line.startswith(b"event")) + b"\n"


def untyped(event: bytes) -> bytes:
    """The event with its `event:` line but no `type` in its data."""
    (name,) = [line for line in event.replace(b"\r", b"\n").split(b"\n") if line.startswith(b"event")]
    data = json.loads(b"".join(sse_payload_lines(event)))
    data.pop("type")
    return name + b"\ndata: " + json.dumps(data).encode() + b"\n\n"


def sse_payload_lines(event: bytes) -> list[bytes]:
    lines = event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return [line[5:].removeprefix(b" ") + b"\n" for line in lines if line.startswith(b"data")]


def typed_events(body: bytes) -> list[tuple[str | None, Any]]:
    """(name, data) of every event of a body with data (its blocks' data lines joined)."""
    out = []
    for text in body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n\n"):
        lines = text.split(b"\n")
        names = [line.partition(b":")[2].strip().decode() for line in lines if line.startswith(b"event")]
        data = [line.partition(b":")[2].removeprefix(b" ") for line in lines if line.startswith(b"data")]
        if data:
            out.append((names[-1] if names else None, json.loads(b"\n".join(data))))
    return out


TYPED_CASES: dict[str, Callable[[list[bytes]], list[Step]]] = {
    "as sent": lambda ev: sse_reply(ev),
    "unnamed": lambda ev: sse_reply([unnamed(e) if e.startswith(b"event") else e for e in ev]),
    "untyped": lambda ev: sse_reply([untyped(e) if e.startswith(b"event") else e for e in ev]),
    "reset": lambda ev: [*sse_reply(ev[:3], end=False), Reset()],
    "unnamed then reset": lambda ev: [*sse_reply([unnamed(e) for e in ev[:1]], end=False), Reset()],
    "not json": lambda ev: sse_reply([*ev[:2], b"event: x\ndata: {nope\n\n"]),
    "garbage": lambda ev: sse_reply([*ev[:2], b"<html>502</html>\n\n"]),
    "no terminator": lambda ev: sse_reply(ev[:-1]),
    "silent": lambda ev: [*sse_reply(ev[:2], end=False), Stall()],
    "nothing": lambda ev: sse_reply([]),
    "a cut document": lambda ev: [Send(response_head(200, [("content-type", "application/json"),
                                                           ("content-length", "99")]) + b'{"id":'),
                                  Close()],
}


@pytest.mark.parametrize("case", list(TYPED_CASES))
@pytest.mark.parametrize("name", ["anthropic-messages", "openai-responses"])
def test_every_event_sidecar_writes_is_named_by_its_type(
    daemon: Daemon, worker: FakeWorker, name: str, case: str
) -> None:
    """Whatever the worker sent (named or not, typed or not) and however it failed, every event
    with data the client gets is named by that data's `type` (SPEC: clients ignore unnamed
    events), and the stream ends with a whole event."""
    target, body, events = STREAMS[name]
    worker.reply(TYPED_CASES[case](events))
    with RawClient(daemon.address) as client:
        got = exchange(client, target, body)
    sent = typed_events(got)
    assert sent, got
    for event, data in sent:
        assert event == data.get("type"), (event, data)
    assert got.endswith((b"\n\n", b"\r\r", b"\r\n\r\n")), got[-100:]
