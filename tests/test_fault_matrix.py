"""Every failure at every point (issue 9): a fault-injecting worker against the real daemon.

The matrix is failure x cut point x dialect x upstream_stream mode x streaming or
non-streaming client. A *cut point* is where in the worker's response the
failure happens: in the middle of the response head, after the head and `k`
whole events (an event boundary), or in the middle of event `k` (inside its
`data:` payload). Cut points run up to and including the event that makes the
stream a success (the openai finish chunk, anthropic `message_stop`,
`response.completed`), so the worker never completes a stream in any cell. A
worker asked for one JSON document is cut in its head, after its head, after
its first byte and in its middle.

The failures: clean FIN, RST, a broken chunk-size line, a Content-Length body
cut short, a stall past idle_timeout (response_timeout inside the head), bytes
that are not SSE (not HTTP inside the head, not JSON for a document; also with no
blank line after them before the body ends), a data:
that is not JSON, an event over limits.max_event_size, a clean end with neither
[DONE] nor a finish_reason (a truncated document for JSON), and a worker
4xx/5xx with an HTML body (at the head only). After a protocol error the
worker goes on with the rest of a successful stream, terminator included, so a
daemon that kept reading would forward a success.

For every cell: the client never sees a success after the failure (a 2xx
document, `[DONE]`, a finish_reason, `message_stop`, `response.completed`, or
a stream that just ends without the error frame: those are *false successes*,
counted and printed); it gets SPEC's error frame (streaming, the worker's head
arrived) or error status (otherwise) with the right code; no worker event
that was cut in half reaches it, no worker bytes appear in an error message;
the ledger has exactly one line with the right outcome and status; and the
broken worker connection is never reused (no later request on it) and, when
the worker left it open, is closed by the daemon.

One daemon per (dialect, mode), all sharing one fake worker that finds each
cell's script by the x-request-id the daemon forwards; cells run concurrently.
"""

from __future__ import annotations

import collections
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    LAST_CHUNK,
    Call,
    Close,
    Daemon,
    FakeWorker,
    RawClient,
    RawResponse,
    Reset,
    WorkerIO,
    WorkerRequest,
    chunk,
    daemon_config,
    request_bytes,
    response_head,
    sse_events,
)

REQ_MODEL = "req-model"
WORKER_MODEL = "wrk-model"
CREATED = 1_700_000_000
IDLE = 1.5  # upstream.idle_timeout (margin for a loaded CI box: a slow worker thread is not a stall)
RESPONSE_TIMEOUT = 3.0  # upstream.response_timeout
MAX_EVENT = 4096  # limits.max_event_size
LEAK = "WORKERLEAK"  # in every garbage byte string the worker sends: must never reach a client
NOT_SSE_GARBAGE = b"<html><body>" + LEAK.encode() + b" 502 Bad Gateway</body></html>\r\n\r\n"
PEER_CLOSE_WAIT = 6.0  # how long a worker that left its connection open waits for the daemon
CONCURRENCY = 32
MODES = ("auto", "always", "never")

# =============================================================================================
# What each dialect's worker sends
# =============================================================================================


def _data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _named(kind: str, obj: dict[str, Any]) -> bytes:
    return f"event: {kind}\n".encode() + _data({"type": kind, **obj})


def marker(i: int) -> str:
    """The content of worker event `i`: seen by a client only if the event was forwarded."""
    return f"MK{i:02d}Q"


@dataclass
class DialectCase:
    """One dialect as the matrix drives it."""

    name: str
    path: str
    request: Callable[[bool], dict[str, Any]]
    events: list[bytes]  # a successful worker stream
    success_index: int  # events[success_index] is the one that makes the stream a success
    document: bytes  # a successful worker JSON document
    id_prefix: str = ""


def _chat_events() -> list[bytes]:
    base = {"id": "chatcmpl-wrk", "object": "chat.completion.chunk", "created": CREATED,
            "model": WORKER_MODEL}

    def ev(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        return _data({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                           "finish_reason": finish}], **extra})

    events = [ev({"role": "assistant", "content": ""})]
    events += [ev({"content": marker(i)}) for i in (1, 2, 3)]
    events.append(ev({"content": ""}, "stop"))
    events.append(_data({**base, "choices": [],
                         "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}))
    events.append(b"data: [DONE]\n\n")
    return events


def _completion_events() -> list[bytes]:
    base = {"id": "cmpl-wrk", "object": "text_completion", "created": CREATED, "model": WORKER_MODEL}
    events = [_data({**base, "choices": [{"index": 0, "text": marker(i), "logprobs": None,
                                          "finish_reason": None}]}) for i in (0, 1, 2)]
    events.append(_data({**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                              "finish_reason": "stop"}]}))
    events.append(_data({**base, "choices": [],
                         "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}))
    events.append(b"data: [DONE]\n\n")
    return events


def _anthropic_events() -> list[bytes]:
    start = {"id": "msg_wrk", "type": "message", "role": "assistant", "model": WORKER_MODEL,
             "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": 5, "output_tokens": 1}}
    events = [_named("message_start", {"message": start}),
              _named("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})]
    events += [_named("content_block_delta", {"index": 0, "delta": {"type": "text_delta",
                                                                    "text": marker(i)}})
               for i in (2, 3, 4)]
    events.append(_named("content_block_stop", {"index": 0}))
    events.append(_named("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                           "usage": {"output_tokens": 3}}))
    events.append(_named("message_stop", {}))
    return events


RESPONSE = {"id": "resp_wrk", "object": "response", "created_at": CREATED, "model": WORKER_MODEL,
            "status": "in_progress", "output": [], "usage": None, "error": None}


def _responses_events() -> list[bytes]:
    seq = iter(range(100))
    item = {"type": "message", "id": "msg_wrk", "status": "in_progress", "role": "assistant",
            "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    ids = {"item_id": "msg_wrk", "output_index": 0, "content_index": 0}

    def ev(kind: str, **fields: Any) -> bytes:
        return _named(kind, {**fields, "sequence_number": next(seq)})

    events = [ev("response.created", response=RESPONSE),
              ev("response.in_progress", response=RESPONSE),
              ev("response.output_item.added", output_index=0, item=item),
              ev("response.content_part.added", part=part, **ids)]
    events += [ev("response.output_text.delta", delta=marker(i), **ids) for i in (4, 5, 6)]
    text = marker(4) + marker(5) + marker(6)
    done_part = {**part, "text": text}
    events += [ev("response.output_text.done", text=text, **ids),
               ev("response.content_part.done", part=done_part, **ids),
               ev("response.output_item.done", output_index=0,
                  item={**item, "status": "completed", "content": [done_part]})]
    final = {**RESPONSE, "status": "completed",
             "output": [{**item, "status": "completed", "content": [done_part]}],
             "usage": {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8}}
    events.append(ev("response.completed", response=final))
    return events


def _doc(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


DIALECTS: list[DialectCase] = [
    DialectCase(
        "openai-chat", "/v1/chat/completions",
        lambda stream: {"model": REQ_MODEL, "messages": [{"role": "user", "content": "hi"}],
                        "stream": stream},
        _chat_events(), 4,
        _doc({"id": "chatcmpl-wrkdoc", "object": "chat.completion", "created": CREATED,
              "model": WORKER_MODEL,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": marker(0)},
                           "logprobs": None, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}),
        "chatcmpl-",
    ),
    DialectCase(
        "openai-completions", "/v1/completions",
        lambda stream: {"model": REQ_MODEL, "prompt": "hi", "stream": stream},
        _completion_events(), 3,
        _doc({"id": "cmpl-wrkdoc", "object": "text_completion", "created": CREATED,
              "model": WORKER_MODEL,
              "choices": [{"index": 0, "text": marker(0), "logprobs": None, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}),
        "chatcmpl-",  # SPEC's fallback id, on both OpenAI dialects
    ),
    DialectCase(
        "anthropic-messages", "/v1/messages",
        lambda stream: {"model": REQ_MODEL, "max_tokens": 16,
                        "messages": [{"role": "user", "content": "hi"}], "stream": stream},
        _anthropic_events(), 7,
        _doc({"id": "msg_wrkdoc", "type": "message", "role": "assistant", "model": WORKER_MODEL,
              "content": [{"type": "text", "text": marker(0)}], "stop_reason": "end_turn",
              "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 3}}),
    ),
    DialectCase(
        "openai-responses", "/v1/responses",
        lambda stream: {"model": REQ_MODEL, "input": "hi", "stream": stream},
        _responses_events(), 10,
        _doc({**RESPONSE, "status": "completed",
              "output": [{"type": "message", "id": "msg_wrk", "status": "completed",
                          "role": "assistant",
                          "content": [{"type": "output_text", "text": marker(0), "annotations": []}]}],
              "usage": {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8}}),
    ),
]
for _case in DIALECTS:  # the success event really is where the case says it is
    _ev = _case.events[_case.success_index]
    assert b'"finish_reason":"stop"' in _ev or b"message_stop" in _ev or b"response.completed" in _ev

# =============================================================================================
# Cells: what the worker does, and what the client must see
# =============================================================================================

DISCONNECTED = "upstream_disconnected"
TIMEOUT = "upstream_timeout"
PROTOCOL = "upstream_protocol_error"
INCOMPLETE = "upstream_incomplete"

FAILURES = ("fin", "rst", "bad_chunk", "cl_short", "stall", "not_sse", "not_sse_unended", "not_json",
            "oversize",
            "no_terminator", "html")
HTML_STATUSES = (400, 404, 429, 500, 502, 503)


@dataclass(frozen=True)
class Cut:
    """Where the failure happens: "head" (inside the head), "boundary" (after `k` whole
    events; for a document k=0 is right after the head) or "mid" (inside event k's data;
    for a document: after `k` bytes of it, k > 0)."""

    where: str
    k: int = 0

    def __str__(self) -> str:
        return self.where if self.where == "head" else f"{self.where}{self.k}"


@dataclass
class Cell:
    """One cell of the matrix and, once run, what happened."""

    id: str
    dialect: DialectCase
    mode: str
    client_stream: bool
    sse: bool  # the worker answers SSE (else one JSON document)
    failure: str
    cut: Cut
    html_status: int = 0
    expected_codes: frozenset[str] = frozenset()
    response: RawResponse | None = None
    error: str | None = None
    problems: list[str] = field(default_factory=list)
    false_success: bool = False

    @property
    def label(self) -> str:
        client = "stream" if self.client_stream else "json"
        extra = f"/{self.html_status}" if self.failure == "html" else ""
        return (f"{self.dialect.name}/{self.mode}/client={client}/"
                f"{self.failure}{extra}@{self.cut}")

    @property
    def outcome(self) -> str:
        if self.failure == "ok":
            return "ok"
        if self.failure == "html":
            return "upstream_http_error"
        return "upstream_timeout" if self.expected_codes == {TIMEOUT} else "upstream_error"

    @property
    def keeps_connection_open(self) -> bool:
        """The worker leaves its side open after the failure: the daemon must close it."""
        return self.failure not in ("fin", "rst", "cl_short", "html")


def data_span(event: bytes) -> tuple[int, int]:
    """Offsets of the JSON payload of the (single) `data:` line of a worker event."""
    start = event.index(b"data: ") + 6
    return start, event.index(b"\n", start)


def mid_offset(event: bytes) -> int:
    start, end = data_span(event)
    return start + (end - start) // 2


class WaitPeerClosed:
    """Keep the connection open until the daemon closes it (or `timeout`)."""

    def __init__(self, timeout: float = PEER_CLOSE_WAIT) -> None:
        self.timeout = timeout

    async def run(self, io: WorkerIO) -> None:
        await io.wait_peer_closed(self.timeout)


def _script(cell: Cell) -> list[Any]:
    """The worker's steps for one cell (bytes are sent as they are)."""
    case, cut, failure = cell.dialect, cell.cut, cell.failure
    if failure == "html":
        body = (b"<html><head><title>%d</title></head><body><h1>upstream says no</h1>"
                b"<pre>Traceback: /srv/worker/app.py line 42</pre></body></html>" % cell.html_status)
        return [response_head(cell.html_status, [("content-type", "text/html"),
                                                 ("content-length", str(len(body)))]) + body]
    content_type = "text/event-stream" if cell.sse else "application/json"
    events = case.events if cell.sse else [case.document]
    if failure == "ok":  # a healthy follow-up request
        return [response_head(200, [("content-type", content_type), ("transfer-encoding", "chunked")]),
                *(chunk(e) for e in events), LAST_CHUNK]
    length_framed = failure == "cl_short"
    framing = (("content-length", str(sum(map(len, events)))) if length_framed
               else ("transfer-encoding", "chunked"))
    head = response_head(200, [("content-type", content_type), framing])

    def framed(data: bytes) -> bytes:
        return data if length_framed else chunk(data)

    ending: list[Any] = {"fin": [Close()], "rst": [Reset()], "cl_short": [Close()],
                         "stall": [WaitPeerClosed()]}.get(failure, [])
    if cut.where == "head":
        if failure == "not_sse":  # bytes that are not HTTP where a header line should be
            return [head[: head.index(b"\r\n") + 2] + b"\x00\x01" + LEAK.encode() + b" <html>\r\n\r\n",
                    WaitPeerClosed()]
        return [head[: len(head) // 2], *ending]
    steps: list[Any] = [head]
    if cell.sse:
        steps += [framed(e) for e in events[: cut.k]]
        half = events[cut.k][: mid_offset(events[cut.k])] if cut.where == "mid" else b""
        rest = events[cut.k + (cut.where == "mid"):]
    else:
        doc = case.document
        half = doc[: cut.k] if cut.where == "mid" else b""
        rest = []
    if half:
        steps.append(framed(half))
    tail = [framed(e) for e in rest]  # the rest of a successful stream, sent after a bad event
    if ending:
        return [*steps, *ending]
    if failure == "bad_chunk":
        return [*steps, b"zz" + LEAK.encode() + b"\r\n" + b"x" * 40 + b"\r\n", *tail, LAST_CHUNK,
                WaitPeerClosed()]
    if failure == "not_sse":
        return [*steps, chunk(NOT_SSE_GARBAGE), LAST_CHUNK, WaitPeerClosed()]
    if failure == "not_sse_unended":  # the same page with no blank line after it, then the end
        return [*steps, chunk(NOT_SSE_GARBAGE.rstrip()), LAST_CHUNK, WaitPeerClosed()]
    if failure == "not_json":
        if cell.sse:
            bad = b"\x00" + LEAK.encode() + b"\n\n" if half else b"data: {" + LEAK.encode() + b"\n\n"
        else:
            bad = b"<" + LEAK.encode() + b">"
        return [*steps, chunk(bad), *tail, LAST_CHUNK, WaitPeerClosed()]
    if failure == "oversize":
        pad = LEAK.encode() + b"p" * (MAX_EVENT + 1024)
        bad = pad + b"\n\n" if half else b'data: {"pad":"' + pad + b'"}\n\n'
        return [*steps, chunk(bad), *tail, LAST_CHUNK, WaitPeerClosed()]
    if failure == "no_terminator":
        return [*steps, LAST_CHUNK, WaitPeerClosed()]
    raise AssertionError(f"unknown failure {failure}")


def cells_for(case: DialectCase, mode: str, client_stream: bool) -> list[Cell]:
    sse = {"auto": client_stream, "always": True, "never": False}[mode]
    if sse:
        body_cuts = [Cut("boundary", k) for k in range(case.success_index + 1)]
        body_cuts += [Cut("mid", k) for k in range(case.success_index + 1)]
    else:
        body_cuts = [Cut("boundary", 0), Cut("mid", 1), Cut("mid", len(case.document) // 2)]
    head = Cut("head")
    plan: list[tuple[str, Cut, frozenset[str]]] = []
    for failure in FAILURES:
        if failure == "html":
            continue
        cuts = list(body_cuts)
        if failure in ("fin", "rst", "stall", "not_sse"):
            cuts.insert(0, head)
        if failure == "oversize" and not sse:
            continue  # a document is not cut into events
        if failure == "not_sse_unended" and sse:
            # after half an event the page would only end that event's data line
            cuts = [c for c in cuts if c.where == "boundary"]
        for cut in cuts:
            codes = {
                "fin": {DISCONNECTED}, "rst": {DISCONNECTED}, "cl_short": {DISCONNECTED},
                "stall": {TIMEOUT}, "bad_chunk": {PROTOCOL}, "not_json": {PROTOCOL},
                "oversize": {PROTOCOL}, "no_terminator": {INCOMPLETE},
                # garbage in an event stream breaks its framing (sidecar's parser is strict
                # about field names, where WHATWG would ignore the lines)
                "not_sse": {PROTOCOL}, "not_sse_unended": {PROTOCOL},
            }[failure]
            if failure == "no_terminator" and not sse:
                codes = {PROTOCOL, INCOMPLETE}  # a cleanly framed but truncated document
            plan.append((failure, cut, frozenset(codes)))
    out = [Cell("", case, mode, client_stream, sse, f, c, expected_codes=codes)
           for f, c, codes in plan]
    out += [Cell("", case, mode, client_stream, sse, "html", head, html_status=status)
            for status in HTML_STATUSES]
    return out


# =============================================================================================
# Checking one cell
# =============================================================================================


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def success_seen(cell: Cell, events: list[tuple[str | None, str]]) -> str | None:
    """What in a streamed body claims success, or None."""
    name = cell.dialect.name
    forwarded = cell.cut.k if cell.cut.where != "head" else 0  # whole worker events sent
    for kind, data in events:
        obj = _loads(data)
        if data.strip() == "[DONE]":
            return "data: [DONE]"
        if not isinstance(obj, dict):
            continue
        if name.startswith("openai-") and name != "openai-responses":
            for choice in obj.get("choices") or []:
                if isinstance(choice, dict) and choice.get("finish_reason") not in (None, "error"):
                    return f"finish_reason {choice.get('finish_reason')!r}"
        elif name == "anthropic-messages":
            kind = obj.get("type", kind)
            if kind == "message_stop":
                return "message_stop"
            delta = obj.get("delta")
            # the worker's own message_delta, forwarded before the cut, may carry stop_reason
            if (kind == "message_delta" and isinstance(delta, dict) and delta.get("stop_reason")
                    and forwarded <= cell.dialect.success_index - 1):
                return "message_delta with a stop_reason"
        else:
            kind = obj.get("type", kind)
            if kind in ("response.completed", "response.incomplete"):
                return kind
    return None


def check_error_frame(cell: Cell, events: list[tuple[str | None, str]], request_id: str) -> str | None:
    """The last event is SPEC's synthetic error frame with an expected code; its code."""
    if not events:
        cell.problems.append("streamed body has no event at all (no error frame)")
        return None
    kind, data = events[-1]
    obj = _loads(data)
    if not isinstance(obj, dict):
        cell.problems.append(f"last event is not a JSON object: {data[:200]!r}")
        return None
    name = cell.dialect.name
    worker_chunk = cell.sse and cell.cut.where != "head" and cell.cut.k > 0
    if name in ("openai-chat", "openai-completions"):
        error = obj.get("error")
        choices = obj.get("choices")
        if not isinstance(error, dict) or not isinstance(choices, list) or len(choices) != 1:
            cell.problems.append(f"last event is not an openai error frame: {data[:300]}")
            return None
        choice = choices[0]
        if choice.get("finish_reason") != "error" or choice.get("index") != 0:
            cell.problems.append(f"error frame choice is {choice}")
        if name == "openai-chat" and choice.get("delta") != {}:
            cell.problems.append(f"error frame delta is {choice.get('delta')!r}")
        expected_object = "chat.completion.chunk" if name == "openai-chat" else "text_completion"
        if obj.get("object") != expected_object:
            cell.problems.append(f"error frame object is {obj.get('object')!r}")
        if error.get("type") != "upstream_error":
            cell.problems.append(f"error frame type is {error.get('type')!r}")
        want_id = ("chatcmpl-wrk" if name == "openai-chat" else "cmpl-wrk") if worker_chunk \
            else cell.dialect.id_prefix + request_id
        want_model = WORKER_MODEL if worker_chunk else REQ_MODEL
        if obj.get("id") != want_id or obj.get("model") != want_model:
            cell.problems.append(f"error frame id/model {obj.get('id')!r}/{obj.get('model')!r}, "
                                 f"expected {want_id!r}/{want_model!r}")
        if worker_chunk and obj.get("created") != CREATED:
            cell.problems.append(f"error frame created {obj.get('created')!r} is not the worker's")
        if not isinstance(obj.get("created"), int):
            cell.problems.append("error frame has no integer created")
        return _message_and_code(cell, error)
    if name == "anthropic-messages":
        if kind != "error" or obj.get("type") != "error" or not isinstance(obj.get("error"), dict):
            cell.problems.append(f"last event is not an anthropic error event: {kind} {data[:300]}")
            return None
        if obj["error"].get("type") != "api_error":
            cell.problems.append(f"error event type is {obj['error'].get('type')!r}")
        return _message_and_code(cell, obj["error"])
    # openai-responses
    response = obj.get("response")
    if kind != "response.failed" or obj.get("type") != "response.failed" or not isinstance(response, dict):
        cell.problems.append(f"last event is not response.failed: {kind} {data[:300]}")
        return None
    if response.get("status") != "failed" or not isinstance(response.get("error"), dict):
        cell.problems.append(f"response.failed carries status/error {response.get('status')!r} "
                             f"{response.get('error')!r}")
        return None
    created_sent = cell.sse and cell.cut.where != "head" and cell.cut.k > 0
    if created_sent:
        for key, want in (("id", RESPONSE["id"]), ("model", WORKER_MODEL), ("created_at", CREATED)):
            if response.get(key) != want:
                cell.problems.append(f"response.failed {key} {response.get(key)!r}, expected {want!r}")
        numbers = [(_loads(d) or {}).get("sequence_number") for _, d in events]
        if numbers != list(range(len(numbers))):
            cell.problems.append(f"sequence numbers {numbers}")
    return _message_and_code(cell, response["error"])


def _message_and_code(cell: Cell, error: dict[str, Any]) -> str | None:
    message = error.get("message")
    if not isinstance(message, str) or not message:
        cell.problems.append(f"error has no message: {error}")
    code = error.get("code")
    if code not in cell.expected_codes:
        cell.problems.append(f"error code {code!r}, expected one of {sorted(cell.expected_codes)}")
    return code


def check_error_body(cell: Cell, response: RawResponse) -> None:
    """A non-2xx error the sidecar answered itself: the dialect's error object."""
    try:
        obj = response.json()
    except ValueError:
        cell.problems.append(f"error body is not JSON: {response.body[:200]!r}")
        return
    if cell.dialect.name == "anthropic-messages":
        if obj.get("type") != "error" or not isinstance(obj.get("error"), dict):
            cell.problems.append(f"not an anthropic error body: {obj}")
            return
        if obj["error"].get("type") != "api_error":
            cell.problems.append(f"anthropic error type {obj['error'].get('type')!r}")
        _message_and_code(cell, obj["error"])
    else:
        if set(obj) != {"error"} or not isinstance(obj["error"], dict):
            cell.problems.append(f"not an openai error body: {obj}")
            return
        if obj["error"].get("type") != "upstream_error":
            cell.problems.append(f"openai error type {obj['error'].get('type')!r}")
        _message_and_code(cell, obj["error"])


def check_cell(cell: Cell) -> None:
    """Everything the client saw (the ledger and the pool are checked afterwards)."""
    response = cell.response
    if response is None:
        cell.problems.append(f"no response: {cell.error}")
        return
    request_id = cell.id
    if response.header("x-request-id") != request_id:
        cell.problems.append(f"x-request-id {response.header('x-request-id')!r}")
    if cell.failure == "ok":
        if response.status != 200 or not response.complete:
            cell.problems.append(f"healthy follow-up got {response.status}: {response.body[:300]!r}")
        return
    if cell.failure == "html":
        if response.status != cell.html_status:
            cell.problems.append(f"status {response.status}, the worker said {cell.html_status}")
            cell.false_success = 200 <= response.status < 300
        if b"upstream says no" not in response.body:
            cell.problems.append(f"the worker's body was not passed through: {response.body[:200]!r}")
        return
    if not response.complete:
        cell.problems.append("the response body was not ended cleanly")
    raw = response.raw
    if LEAK.encode() in raw:
        cell.problems.append(f"worker bytes leaked to the client: {raw[-600:]!r}")
    expect_frame = cell.client_stream and cell.cut.where != "head" and cell.failure != "rst"
    if 200 <= response.status < 300:
        if not cell.client_stream:
            cell.false_success = True
            cell.problems.append(f"FALSE SUCCESS: status {response.status} for a failed response")
            return
        events = sse_events(response.body)
        success = success_seen(cell, events)
        if success is not None:
            cell.false_success = True
            cell.problems.append(f"FALSE SUCCESS: the client saw {success}")
        code = check_error_frame(cell, events, request_id)
        if code is None and success is None:
            cell.false_success = True
            cell.problems.append("FALSE SUCCESS: the stream ended without an error frame")
        if sum(1 for e in events if _is_error_event(cell, e)) > 1:
            cell.problems.append("more than one error frame")
        # a worker event that was cut in half (or came after the cut) never reaches the client,
        # and every whole event before the cut does (relayed as it arrives; an RST may
        # legitimately destroy bytes the daemon had not read yet)
        first_unsent = cell.cut.k if cell.sse else 0
        if cell.sse and cell.failure != "rst":
            lost = [i for i in range(first_unsent) if marker(i).encode() in cell.dialect.events[i]
                    and marker(i).encode() not in response.body]
            if lost:
                cell.problems.append(f"whole worker events {lost} before the cut never reached "
                                     "the client")
        for i in range(first_unsent, 100):
            if marker(i).encode() in response.body:
                cell.problems.append(f"worker event {i} (at or after the cut) reached the client")
        if not cell.sse and marker(0).encode() in response.body:
            cell.problems.append("content of a truncated document reached the client")
        return
    if expect_frame:
        cell.problems.append(f"status {response.status} after the worker's head arrived "
                             "(expected 200 and an error frame)")
    want = 504 if cell.expected_codes == {TIMEOUT} else 502
    if response.status != want:
        cell.problems.append(f"status {response.status}, expected {want}")
    check_error_body(cell, response)


def _is_error_event(cell: Cell, event: tuple[str | None, str]) -> bool:
    kind, data = event
    obj = _loads(data)
    if not isinstance(obj, dict):
        return False
    return (kind == "error" or kind == "response.failed" or obj.get("type") == "error"
            or (isinstance(obj.get("error"), dict) and "choices" in obj))


# =============================================================================================
# Running the matrix
# =============================================================================================


def daemon_for(case: DialectCase, mode: str, worker: FakeWorker, directory: Path) -> Daemon:
    config = daemon_config(
        worker.url,
        upstream={"idle_timeout": f"{int(IDLE * 1000)}ms",
                  "response_timeout": f"{int(RESPONSE_TIMEOUT * 1000)}ms",
                  "max_idle_connections": 16},
        limits={"max_event_size": MAX_EVENT, "max_connections": 512, "keepalive_timeout": "5s"},
        pricing={"currency": "USD", "models": {REQ_MODEL: {"prompt": 1.0, "completion": 2.0},
                                               WORKER_MODEL: {"prompt": 1.0, "completion": 2.0}}},
        routes=[{"name": f"{case.name}-{mode}", "match": {"path": case.path, "methods": ["POST"]},
                 "dialect": case.name, "upstream_stream": mode}],
    )
    return Daemon(config, directory, name=f"{case.name}-{mode}")


def run_cell(cell: Cell, daemon: Daemon) -> None:
    body = cell.dialect.request(cell.client_stream)
    data = request_bytes("POST", cell.dialect.path, body, [("x-request-id", cell.id)])
    try:
        with RawClient(daemon.address, timeout=15) as client:
            client.send(data)
            cell.response = client.read_response(15)
    except (AssertionError, OSError) as exc:
        cell.error = f"{type(exc).__name__}: {exc}"[:500]
    check_cell(cell)


@pytest.fixture(scope="module")
def fault_worker() -> Iterator[tuple[FakeWorker, dict[str, Cell]]]:
    cells: dict[str, Cell] = {}

    async def handler(request: WorkerRequest, io: WorkerIO) -> None:
        cell = cells.get(request.header("x-request-id") or "")
        if cell is None:
            worker._error(f"unknown cell {request.header('x-request-id')}")
            return
        asked = request.json().get("stream") is True
        if asked != cell.sse:
            cell.problems.append(f"the worker was asked stream={asked}, expected {cell.sse}")
        for step in _script(cell):
            if isinstance(step, bytes):
                await io.send(step)
            else:
                await step.run(io)

    worker = FakeWorker().start()
    worker.default = handler
    try:
        yield worker, cells
    finally:
        worker.stop()


def test_fault_matrix(fault_worker: tuple[FakeWorker, dict[str, Cell]], tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    worker, registry = fault_worker
    started = time.monotonic()
    daemons: dict[tuple[str, str], Daemon] = {}
    cells: list[tuple[Cell, Daemon]] = []
    try:
        for case in DIALECTS:
            for mode in MODES:
                daemons[case.name, mode] = daemon_for(case, mode, worker, tmp_path)
        threads = [threading.Thread(target=d.start, args=(60,)) for d in daemons.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for (name, mode), daemon in daemons.items():
            assert daemon.alive() and daemon.port, f"daemon {name}/{mode} did not start"
            case = next(c for c in DIALECTS if c.name == name)
            for client_stream in (True, False):
                for cell in cells_for(case, mode, client_stream):
                    cell.id = f"cell-{len(cells):05d}"
                    registry[cell.id] = cell
                    cells.append((cell, daemon))
        # interleave daemons so that every one of them is busy at once
        random.Random(9).shuffle(cells)
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(lambda item: run_cell(*item), cells))

        after = followups(daemons, len(cells))
        for cell, _ in after:
            registry[cell.id] = cell
        for cell, daemon in after:  # one at a time: each may pick up a pooled connection
            run_cell(cell, daemon)
        check_ledgers(cells + after, daemons)
        check_worker_connections(cells + after, worker)
        healthy_problems = [f"{c.label}: {c.problems}" for c, _ in after if c.problems]
        log_errors = [line for d in daemons.values() for line in d.errors()]
    finally:
        for daemon in daemons.values():
            daemon.stop()

    false_successes = [c for c, _ in cells if c.false_success]
    failed = [c for c, _ in cells if c.problems]
    summary = collections.Counter(
        (c.failure, c.cut.where, c.dialect.name, c.mode, c.client_stream) for c in failed
    )
    with capsys.disabled():
        print(f"\nfault matrix: {len(cells)} cells (failure x cut point x dialect x "
              f"upstream_stream x client), {len(false_successes)} false successes, "
              f"{len(failed)} cells with problems, {time.monotonic() - started:.1f}s")
        for counts in sorted(collections.Counter(c.failure for c, _ in cells).items()):
            print(f"  {counts[0]}: {counts[1]} cells")
    report = []
    seen: set[Any] = set()
    for cell in failed:
        key = (cell.failure, cell.cut.where, cell.dialect.name, cell.mode, cell.client_stream)
        if key in seen:
            continue
        seen.add(key)
        report.append(f"{cell.label} [{cell.id}] (+{summary[key] - 1} similar): "
                      + "; ".join(cell.problems[:4]))
    (tmp_path / "matrix-report.txt").write_text(
        "\n".join(f"{c.label} [{c.id}]: " + " | ".join(c.problems) for c in failed))
    assert not worker.errors, worker.errors
    assert not healthy_problems, healthy_problems
    assert not log_errors, "daemons logged errors:\n" + "\n".join(log_errors[:20])
    assert not false_successes and not failed, (
        f"{len(false_successes)} false successes, {len(failed)} failing cells of {len(cells)}:\n"
        + "\n".join(report[:80])
    )


def check_ledgers(cells: list[tuple[Cell, Daemon]], daemons: dict[tuple[str, str], Daemon]) -> None:
    """Exactly one ledger line per cell, with the right outcome, status and dialect."""
    per_daemon = collections.Counter(id(d) for _, d in cells)
    records: dict[int, list[dict[str, Any]]] = {}
    for daemon in daemons.values():
        want = per_daemon[id(daemon)]
        deadline = time.monotonic() + 10
        while len(daemon.ledger()) < want and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # a duplicate line would come right after
        records[id(daemon)] = daemon.ledger()
    for cell, daemon in cells:
        mine = [r for r in records[id(daemon)] if r.get("request_id") == cell.id]
        if len(mine) != 1:
            cell.problems.append(f"{len(mine)} ledger lines")
            continue
        record = mine[0]
        if record.get("outcome") != cell.outcome:
            cell.problems.append(f"ledger outcome {record.get('outcome')!r}, expected {cell.outcome!r}")
        if cell.response is not None and record.get("status") != cell.response.status:
            cell.problems.append(f"ledger status {record.get('status')}, "
                                 f"client saw {cell.response.status}")
        if record.get("dialect") != cell.dialect.name:
            cell.problems.append(f"ledger dialect {record.get('dialect')!r}")
        if record.get("client_stream") is not cell.client_stream:
            cell.problems.append(f"ledger client_stream {record.get('client_stream')!r}")


def check_worker_connections(cells: list[tuple[Cell, Daemon]], worker: FakeWorker) -> None:
    """A broken worker connection carries no later request and is closed by the daemon."""
    by_id = {c.id: c for c, _ in cells}
    with worker._cond:
        requests = list(worker.requests)
        connections = {c.id: c for c in worker.connections}
    seen = set()
    for request in requests:
        cell = by_id.get(request.header("x-request-id") or "")
        if cell is None:
            continue
        seen.add(cell.id)
        if cell.failure in ("html", "ok"):
            continue
        conn = connections[request.connection]
        if conn.requests > request.index + 1:
            cell.problems.append(f"the broken worker connection {conn.id} carried another request")
        if cell.keeps_connection_open and not conn.peer_closed:
            cell.problems.append(f"the daemon left the broken worker connection {conn.id} open")
    for cell, _ in cells:
        if cell.id not in seen:
            cell.problems.append("the request never reached the worker")


def followups(daemons: dict[tuple[str, str], Daemon], first: int) -> list[tuple[Cell, Daemon]]:
    """Healthy requests after the matrix: each daemon still serves, and a broken connection
    put back in its pool would be picked up by one of them (check_worker_connections)."""
    out = []
    for (name, mode), daemon in daemons.items():
        case = next(c for c in DIALECTS if c.name == name)
        for client_stream in (True, False, True, False):
            sse = {"auto": client_stream, "always": True, "never": False}[mode]
            cell = Cell(f"cell-{first + len(out):05d}", case, mode, client_stream, sse, "ok", Cut("head"))
            out.append((cell, daemon))
    return out


# =============================================================================================
# Nothing leaks out: the daemon's own error messages carry no worker bytes
# =============================================================================================

SECRET = "WORKER-SECRET-7f3a"


def _tool_stream(partial_json: str) -> list[bytes]:
    start = {"id": "msg_w", "type": "message", "role": "assistant", "model": WORKER_MODEL,
             "content": [], "usage": {"input_tokens": 1}}
    return [_named("message_start", {"message": start}),
            _named("content_block_start", {"index": 0, "content_block": {
                "type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}}),
            _named("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta",
                                                                "partial_json": partial_json}}),
            _named("content_block_stop", {"index": 0}),
            _named("message_delta", {"delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 2}}),
            _named("message_stop", {})]


SSE_HEAD = response_head(200, [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")])
LEAK_CASES: dict[str, tuple[str, bool, bytes]] = {
    # name: (dialect, client_stream, what the worker sends)
    "header-garbage": ("openai-chat", False,
                       b"HTTP/1.1 200 OK\r\nx-" + SECRET.encode() + b" \x01\r\n\r\n"),
    "status-garbage": ("openai-chat", True, b"HTTP/1.1 2" + SECRET.encode() + b"\r\n\r\n"),
    "chunk-size-garbage": ("openai-chat", True, SSE_HEAD + SECRET.encode() + b"\r\n"),
    "event-not-json": ("openai-chat", False, SSE_HEAD + chunk(b"data: {" + SECRET.encode() + b"\n\n")),
    "document-not-json": ("openai-chat", False,
                          response_head(200, [("content-type", "application/json"),
                                              ("content-length", "30")])
                          + (b"{" + SECRET.encode() + b"}").ljust(30)),
    "anthropic-tool-input-not-json": (
        "anthropic-messages", False,
        SSE_HEAD + b"".join(chunk(e) for e in _tool_stream('{"password": "' + SECRET)) + LAST_CHUNK),
    "responses-event-not-json": ("openai-responses", True,
                                 SSE_HEAD + chunk(b"event: response.created\ndata: ["
                                                  + SECRET.encode() + b"\n\n")),
}


@pytest.mark.parametrize("case", sorted(LEAK_CASES))
def test_error_messages_never_echo_worker_bytes(
    case: str, worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    dialect_name, client_stream, raw = LEAK_CASES[case]
    dialect = next(d for d in DIALECTS if d.name == dialect_name)
    worker.default = [raw, WaitPeerClosed(3.0)]
    daemon = make_daemon(worker=worker, upstream={"idle_timeout": "1s", "response_timeout": "1s"},
                         routes=[{"name": "r", "match": {"path": dialect.path}, "dialect": dialect_name,
                                  "upstream_stream": "always"}])
    with RawClient(daemon.address) as client:
        client.send(request_bytes("POST", dialect.path, dialect.request(client_stream)))
        response = client.read_response()
    assert response.status in (200, 502), response.raw
    assert SECRET.encode() not in response.raw, response.raw
    assert b"upstream_" in response.body, response.body  # it is the daemon's error, with a code


# =============================================================================================
# The client leaves: the worker connection is closed at once, on every dialect and mode
# =============================================================================================


@dataclass
class LeaveCell:
    """A client that leaves while its request is in flight (`when`: before the worker's head,
    or after it and some of its body)."""

    id: str
    dialect: DialectCase
    mode: str
    client_stream: bool
    when: str
    worker_sent: threading.Event = field(default_factory=threading.Event)
    problems: list[str] = field(default_factory=list)

    @property
    def sse(self) -> bool:
        return {"auto": self.client_stream, "always": True, "never": False}[self.mode]

    def script(self) -> list[Any]:
        case = self.dialect
        if self.when == "before_head":
            body: list[bytes] = []
        elif self.sse:
            head = response_head(200, [("content-type", "text/event-stream"),
                                       ("transfer-encoding", "chunked")])
            body = [head, *(chunk(e) for e in case.events[:3])]
        else:
            head = response_head(200, [("content-type", "application/json"),
                                       ("transfer-encoding", "chunked")])
            body = [head, chunk(case.document[:20])]
        return [*body, Call(lambda io: self.worker_sent.set()), WaitPeerClosed(20.0)]


def leave_cells() -> list[LeaveCell]:
    return [LeaveCell(f"leave-{case.name}-{mode}-{int(client_stream)}-{when}", case, mode,
                      client_stream, when)
            for case in DIALECTS for mode in MODES for client_stream in (True, False)
            for when in ("before_head", "after_head")]


def test_a_client_leaving_closes_the_worker_connection_at_once_on_every_dialect_and_mode(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    """SPEC: when the client goes away mid-response, the worker connection is closed at once
    (the worker stops generating) and the ledger records what was seen. The timeouts are
    far away (30 s), so only the client leaving can close the worker connection."""
    cells = {cell.id: cell for cell in leave_cells()}

    async def handler(request: WorkerRequest, io: WorkerIO) -> None:
        for step in cells[request.header("x-request-id") or ""].script():
            if isinstance(step, bytes):
                await io.send(step)
            else:
                await step.run(io)

    worker.default = handler
    daemon = make_daemon(
        worker=worker,
        upstream={"idle_timeout": "30s", "response_timeout": "30s"},
        pricing={"currency": "USD", "models": {WORKER_MODEL: {"prompt": 1.0, "completion": 2.0}}},
        limits={"max_connections": 256},
        routes=[{"name": f"{case.name}-{mode}", "match": {"path": f"/{mode}{case.path}"},
                 "dialect": case.name, "upstream_stream": mode}
                for case in DIALECTS for mode in MODES],
    )

    def run(cell: LeaveCell) -> None:
        body = cell.dialect.request(cell.client_stream)
        with RawClient(daemon.address, timeout=10) as client:
            client.send(request_bytes("POST", f"/{cell.mode}{cell.dialect.path}", body,
                                      [("x-request-id", cell.id)]))
            if not cell.worker_sent.wait(10):
                cell.problems.append("the worker never got the request")
                return
            if cell.when == "after_head" and cell.client_stream:
                client.read_until(b"\r\n\r\n")  # the head went out with the worker's
                if cell.sse:  # relayed as it came: the last whole event reached the client
                    last = cell.dialect.events[2]
                    client.read_until(marker(2).encode() if marker(2).encode() in last
                                      else b'"sequence_number":2')
            else:
                time.sleep(0.3)  # let the daemon read what the worker sent
        # the client has left (closed); the worker connection must follow
        request = next(r for r in worker.requests if r.header("x-request-id") == cell.id)
        if not worker.wait_connection_closed(request, 5.0):
            cell.problems.append("the worker connection is still open 5 s after the client left")
        record = daemon.ledger_for(cell.id)
        head_sent = cell.when == "after_head" and cell.client_stream
        want = ("client_disconnect", 200 if head_sent else 499, cell.dialect.name)
        got = (record["outcome"], record["status"], record["dialect"])
        if got != want:
            cell.problems.append(f"ledger {got}, expected {want}")
        if cell.when == "after_head" and cell.sse and record["model"] != WORKER_MODEL:
            cell.problems.append(f"ledger model {record['model']!r}: not what the stream said")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(run, cells.values()))
    problems = [f"{cell.id}: {cell.problems}" for cell in cells.values() if cell.problems]
    assert not problems, "\n".join(problems)
