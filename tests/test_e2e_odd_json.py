"""Hostile but legal JSON from workers and clients, end to end, on whichever build runs.

`pip install .` installs sidecar compiled by mypyc (setup.py), and compiled code checks
types at run time: a value parsed from a worker's or a client's JSON (any shape) that
reaches a parameter, attribute or local annotated narrower raises a TypeError where
Python goes on; a bytes slice that runs backwards raises SystemError. In the daemon that
is a 500, a stream cut without its error frame, or a traceback in the log. Here the real
daemon (the compiled one when the suite runs on the compiled build, tests/run.sh) and a
fake worker speak over loopback, every dialect in every direction (SSE relayed, SSE
aggregated into one document, a JSON document as JSON or replayed as SSE), with fields
of the wrong JSON type, integers past 64 bits, deep nesting, and the cases that broke
one build or both. Each request must be answered as SPEC says (200, or 502 with the
dialect's error; 400 for a client's bad request; never a 500), the answer must be well
formed, the ledger must have its line, and the daemon must log no error or traceback.

The translators' own fuzz tests (tests/test_fuzz_translators.py) feed the same kind of
JSON in-process; these check what the client and the ledger get through the whole daemon.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import (
    Close,
    Daemon,
    FakeWorker,
    RawClient,
    RawResponse,
    Send,
    Step,
    chunk,
    http_response,
    post,
    request_bytes,
    response_head,
    serving,
    sse_events,
    sse_reply,
)

MODEL = "odd-model"
PATHS = {
    "openai-chat": "/v1/chat/completions",
    "openai-completions": "/v1/completions",
    "anthropic-messages": "/v1/messages",
    "openai-responses": "/v1/responses",
}
ROUTES = [
    *({"name": dialect, "match": {"path": path, "methods": ["POST"]}, "dialect": dialect,
       "upstream_stream": "auto"} for dialect, path in PATHS.items()),
    {"name": "rest", "match": {"path_prefix": "/v1/"}, "dialect": "passthrough"},
]
U64 = 2**64 - 1  # the largest integer orjson reads as one
BIG = 10**30  # past 64 bits: read exactly, as the worker wrote it
_ids = itertools.count()


@pytest.fixture(scope="module")
def daemon(module_worker: FakeWorker, make_module_daemon: Any) -> Daemon:
    return make_module_daemon(
        worker=module_worker,
        routes=ROUTES,
        pricing={"currency": "USD", "models": {MODEL: {"prompt": 1.0, "completion": 2.0}}},
    )


@pytest.fixture
def w(module_worker: FakeWorker) -> Iterator[FakeWorker]:
    yield from serving(module_worker)


def dumps(obj: Any) -> bytes:
    """JSON as a worker writes it (the standard library writes integers of any size)."""
    return json.dumps(obj, separators=(",", ":")).encode()


def data(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else dumps(obj)) + b"\n\n"


def typed(obj: Any) -> bytes:
    """A typed event (Anthropic, Responses): `event:` line = the data's type when it is one."""
    kind = obj.get("type") if isinstance(obj, dict) else None
    head = b"event: %s\n" % kind.encode() if isinstance(kind, str) else b""
    return head + data(obj)


def nested(depth: int, inner: bytes = b"1") -> bytes:
    return b"[" * depth + inner + b"]" * depth


def ask(
    daemon: Daemon, w: FakeWorker, dialect: str, steps: list[Step], *, stream: bool,
    body: dict[str, Any] | bytes | None = None,
) -> tuple[RawResponse, dict[str, Any]]:
    """One request on `dialect`'s route answered by `steps`: the response and its ledger line,
    once the daemon has logged the request (and nothing at error level, nor a traceback)."""
    rid = f"odd-{next(_ids)}"
    logged = len(daemon.logs)
    w.reply(steps)
    if body is None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        if stream and dialect.startswith("openai-c"):
            body["stream_options"] = {"include_usage": True}
    response = post(daemon, body, PATHS.get(dialect, dialect), headers=[("x-request-id", rid)])
    record = daemon.ledger_for(rid)
    assert daemon.wait_log(lambda e: e.get("request_id") == rid and "status" in e), rid
    errors = [e for e in daemon.logs[logged:] if e.get("level") in ("error", "critical") or "exc" in e]
    assert not errors, errors
    return response, record


def check_answer(dialect: str, response: RawResponse, record: dict[str, Any]) -> list[Any]:
    """What SPEC allows for a worker's answer, whatever it held: 200, or 502 with the dialect's
    error object (never a 500); a stream of whole events, each JSON (typed ones named by their
    type), nothing after an error; a JSON object otherwise. Returns the payloads."""
    assert response.complete, response.raw[-300:]
    assert response.status in (200, 502), response.raw[-300:]
    assert record["status"] == response.status
    if response.header("content-type") == "text/event-stream":
        assert response.status == 200
        payloads: list[Any] = []
        for name, text in sse_events(response.body):
            if text == "[DONE]":
                assert dialect.startswith("openai-c")
                payloads.append(text)
                continue
            obj = json.loads(text)
            assert isinstance(obj, dict), text
            if not dialect.startswith("openai-c"):
                assert name == obj.get("type"), (name, text[:200])
            payloads.append(obj)
        ended = [i for i, p in enumerate(payloads) if _is_error(dialect, p)]
        if ended and record["outcome"] != "ok":
            assert ended[0] == len(payloads) - 1, payloads[-3:]  # nothing after the error
        return payloads
    obj = response.json()
    assert isinstance(obj, dict)
    if response.status == 502:
        error = obj.get("error")
        assert isinstance(error, dict), obj
        if dialect == "anthropic-messages":
            assert obj["type"] == "error"
    return [obj]


def _is_error(dialect: str, payload: Any) -> bool:
    if not isinstance(payload, dict):
        return False
    if dialect.startswith("openai-c"):
        return payload.get("error") is not None
    return payload.get("type") in ("error", "response.failed")


# =============================================================================================
# Worker streams and documents of every dialect, with one odd thing each
# =============================================================================================

ODD = ["5", 2.5, [1], {"a": [1]}, True, -1, U64, BIG, None]


def _chat_chunk(**over: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "created": 1_700_000_000,
                           "model": MODEL,
                           "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
    obj.update(over)
    return obj


def _chat_finish(**over: Any) -> dict[str, Any]:
    obj = _chat_chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}],
                      usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    obj.update(over)
    return obj


def _chat_stream(*odd: bytes) -> list[bytes]:
    return [data(_chat_chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}}])),
            *odd, data(_chat_chunk()), data(_chat_finish()), b"data: [DONE]\n\n"]


def _chat_streams() -> dict[str, list[bytes]]:
    streams: dict[str, list[bytes]] = {}
    for i, value in enumerate(ODD):
        streams[f"usage-{i}"] = _chat_stream(data(_chat_finish(usage=value)))
        streams[f"usage-fields-{i}"] = _chat_stream(data(_chat_finish(usage={
            "prompt_tokens": value, "completion_tokens": value, "total_tokens": value,
            "prompt_tokens_details": {"cached_tokens": value},
            "completion_tokens_details": value})))
        streams[f"choices-{i}"] = _chat_stream(data(_chat_chunk(choices=value)))
        streams[f"delta-{i}"] = _chat_stream(data(_chat_chunk(
            choices=[{"index": 0, "delta": value, "finish_reason": None}])))
        streams[f"content-{i}"] = _chat_stream(data(_chat_chunk(
            choices=[{"index": 0, "delta": {"content": value}}])))
        streams[f"index-{i}"] = _chat_stream(data(_chat_chunk(
            choices=[{"index": value, "delta": {"content": "x"}}])))
        streams[f"finish-{i}"] = _chat_stream(data(_chat_chunk(
            choices=[{"index": 0, "delta": {}, "finish_reason": value}])))
        streams[f"tool-calls-{i}"] = _chat_stream(data(_chat_chunk(choices=[{"index": 0, "delta": {
            "tool_calls": [{"index": value, "id": value, "function": {"name": value, "arguments": value}}]}}])))
        streams[f"identity-{i}"] = [data({"id": value, "created": value, "model": value,
                                          "choices": [{"index": 0, "delta": {"content": "a"}}]}),
                                    data({"choices": [{"index": 0, "delta": {"content": "b"}}]}),
                                    data({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
                                    b"data: [DONE]\n\n"]
        streams[f"error-{i}"] = _chat_stream(data({"error": value}))
        streams[f"error-object-{i}"] = _chat_stream(data({"error": {"message": value, "code": value}}))
    streams["not-an-object"] = _chat_stream(data([1, 2]))
    streams["deep-600"] = _chat_stream(data(dumps(_chat_chunk())[:-1] + b',"x":' + nested(600) + b"}"))
    streams["deep-100000"] = _chat_stream(data(dumps(_chat_chunk())[:-1] + b',"x":' + nested(100_000) + b"}"))
    return streams


def _anthropic_stream(*odd: Any, usage: Any = None) -> list[bytes]:
    start_usage = {"input_tokens": 3, "output_tokens": 1} if usage is None else usage
    return [typed(e) for e in (
        {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                              "model": MODEL, "content": [], "usage": start_usage}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        *odd,
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}},
        {"type": "message_stop"},
    )]


def _anthropic_streams() -> dict[str, list[bytes]]:
    streams: dict[str, list[bytes]] = {}
    for i, value in enumerate(ODD):
        streams[f"start-usage-{i}"] = _anthropic_stream(usage=value)
        streams[f"usage-fields-{i}"] = _anthropic_stream(usage={
            "input_tokens": value, "output_tokens": value, "cache_read_input_tokens": value,
            "cache_creation_input_tokens": value})
        streams[f"delta-usage-{i}"] = _anthropic_stream(
            {"type": "message_delta", "delta": value, "usage": value})
        streams[f"block-start-{i}"] = _anthropic_stream(
            {"type": "content_block_start", "index": value, "content_block": value})
        streams[f"delta-{i}"] = _anthropic_stream(
            {"type": "content_block_delta", "index": 0, "delta": value})
        streams[f"delta-fields-{i}"] = _anthropic_stream(
            {"type": "content_block_delta", "index": value, "delta": {"type": value, "text": value}})
        streams[f"tool-{i}"] = _anthropic_stream(
            {"type": "content_block_start", "index": 1,
             "content_block": {"type": "tool_use", "id": value, "name": value, "input": value}},
            {"type": "content_block_delta", "index": 1,
             "delta": {"type": "input_json_delta", "partial_json": dumps(value).decode()}})
        streams[f"type-{i}"] = _anthropic_stream({"type": value, "index": 0})
        streams[f"error-{i}"] = _anthropic_stream({"type": "error", "error": value})
        streams[f"error-fields-{i}"] = _anthropic_stream(
            {"type": "error", "error": {"type": value, "message": value, "code": value}})
    streams["message-not-an-object"] = [typed({"type": "message_start", "message": [1]})]
    streams["usage-sum-past-64-bits"] = _anthropic_stream(usage={
        "input_tokens": U64, "output_tokens": 1, "cache_read_input_tokens": U64})
    streams["deep-600"] = _anthropic_stream({"type": "ping", "x": json.loads(nested(600))})
    return streams


def _responses_stream(*odd: Any, final: Any = None, numbered: bool = True) -> list[bytes]:
    response = {"id": "resp_1", "object": "response", "created_at": 1, "model": MODEL,
                "status": "in_progress", "output": []}
    events: list[Any] = [
        {"type": "response.created", "response": response},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {"type": "message", "id": "m1", "role": "assistant", "content": []}},
        {"type": "response.content_part.added", "output_index": 0, "content_index": 0,
         "item_id": "m1", "part": {"type": "output_text", "text": ""}},
        {"type": "response.output_text.delta", "output_index": 0, "content_index": 0,
         "item_id": "m1", "delta": "hi"},
        *odd,
        final if final is not None else {
            "type": "response.completed",
            "response": {**response, "status": "completed",
                         "usage": {"input_tokens": 3, "output_tokens": 2}}},
    ]
    if numbered:
        events = [{**e, "sequence_number": n} if isinstance(e, dict) and "sequence_number" not in e
                  else e for n, e in enumerate(events)]
    return [typed(e) for e in events]


def _responses_streams() -> dict[str, list[bytes]]:
    streams: dict[str, list[bytes]] = {}
    failed = {"id": "resp_1", "object": "response", "created_at": 1, "model": MODEL,
              "status": "failed", "output": []}
    for i, value in enumerate(ODD):
        streams[f"sequence-{i}"] = _responses_stream(
            {"type": "response.output_text.delta", "output_index": 0, "content_index": 0,
             "delta": "x", "sequence_number": value}, numbered=False)
        streams[f"delta-{i}"] = _responses_stream(
            {"type": "response.output_text.delta", "output_index": value, "content_index": value,
             "delta": value})
        streams[f"part-{i}"] = _responses_stream(
            {"type": "response.content_part.added", "output_index": 0, "content_index": value,
             "part": value})
        streams[f"item-{i}"] = _responses_stream(
            {"type": "response.output_item.added", "output_index": value, "item": value})
        streams[f"lifecycle-{i}"] = _responses_stream({"type": "response.in_progress", "response": value})
        streams[f"usage-{i}"] = _responses_stream(final={
            "type": "response.completed", "response": {
                **failed, "status": "completed", "usage": {
                    "input_tokens": value, "output_tokens": value,
                    "input_tokens_details": {"cached_tokens": value},
                    "output_tokens_details": value}}})
        streams[f"terminal-{i}"] = _responses_stream(final={"type": "response.completed", "response": value})
        streams[f"failed-error-{i}"] = _responses_stream(final={
            "type": "response.failed", "response": {**failed, "error": value}})
        streams[f"error-{i}"] = _responses_stream({"type": "error", "code": value, "message": value})
    streams["deep-600"] = _responses_stream({"type": "response.in_progress", "x": json.loads(nested(600))})
    return streams


def _documents() -> list[tuple[str, str, dict[str, Any]]]:
    """(dialect, case, document): documents with odd fields, each to the dialect of its shape."""
    docs: dict[str, dict[str, Any]] = {}
    chat = {"id": "c1", "object": "chat.completion", "created": 1, "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
               "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
               "usage": {"input_tokens": 3, "output_tokens": 2}}
    response = {"id": "resp_1", "object": "response", "created_at": 1, "model": MODEL,
                "status": "completed",
                "output": [{"type": "message", "id": "m1", "role": "assistant",
                            "content": [{"type": "output_text", "text": "hi"}]}],
                "usage": {"input_tokens": 3, "output_tokens": 2}}
    for i, value in enumerate(ODD):
        for key in ("choices", "usage", "model", "created", "id", "error", "object"):
            docs[f"chat-{key}-{i}"] = {**chat, key: value}
        docs[f"chat-message-{i}"] = {**chat, "choices": [{"index": value, "message": value,
                                                          "finish_reason": value, "text": value}]}
        docs[f"chat-usage-fields-{i}"] = {**chat, "usage": {"prompt_tokens": value,
                                                            "completion_tokens": value,
                                                            "prompt_tokens_details": value}}
        for key in ("content", "usage", "type", "model", "stop_reason", "error"):
            docs[f"message-{key}-{i}"] = {**message, key: value}
        docs[f"message-blocks-{i}"] = {**message, "content": [
            value, {"type": "tool_use", "id": value, "name": value, "input": value},
            {"type": "thinking", "thinking": value, "signature": value}]}
        for key in ("output", "usage", "status", "error", "model", "created_at"):
            docs[f"response-{key}-{i}"] = {**response, key: value}
        docs[f"response-items-{i}"] = {**response, "output": [
            value, {"type": "message", "id": value, "content": [value, {"type": "output_text", "text": value}]},
            {"type": "function_call", "name": value, "arguments": value},
            {"type": "reasoning", "summary": [value, {"text": value}]}]}
    dialects = {"chat": ("openai-chat", "openai-completions"), "message": ("anthropic-messages",),
                "response": ("openai-responses",)}
    return [(dialect, case, doc) for case, doc in docs.items()
            for dialect in dialects[case.partition("-")[0]]]


STREAMS = {
    "openai-chat": _chat_streams(),
    "anthropic-messages": _anthropic_streams(),
    "openai-responses": _responses_streams(),
}
DOCUMENTS = _documents()


@pytest.mark.parametrize("stream", [False, True], ids=["aggregated", "relayed"])
@pytest.mark.parametrize(
    ("dialect", "case"),
    [(dialect, case) for dialect, cases in STREAMS.items() for case in cases],
)
def test_odd_worker_streams(daemon: Daemon, w: FakeWorker, dialect: str, case: str, stream: bool) -> None:
    response, record = ask(daemon, w, dialect, sse_reply(STREAMS[dialect][case]), stream=stream)
    check_answer(dialect, response, record)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "replayed"])
@pytest.mark.parametrize(("dialect", "document"),
                         [pytest.param(d, doc, id=f"{d}-{case}") for d, case, doc in DOCUMENTS])
def test_odd_worker_documents(
    daemon: Daemon, w: FakeWorker, dialect: str, document: dict[str, Any], stream: bool
) -> None:
    reply = [Send(http_response(200, dumps(document)))]
    response, record = ask(daemon, w, dialect, reply, stream=stream)
    check_answer(dialect, response, record)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "replayed"])
@pytest.mark.parametrize("dialect", PATHS)
@pytest.mark.parametrize("depth", [300, 100_000])
def test_deeply_nested_worker_documents(
    daemon: Daemon, w: FakeWorker, dialect: str, depth: int, stream: bool
) -> None:
    """Nested deeper than orjson writes (254) or reads (1,024): a protocol error, never a crash
    (compiled code raises no RecursionError)."""
    body = b'{"model":"odd-model","usage":{"x":' + nested(depth) + b'},"choices":' + nested(depth) + b"}"
    response, record = ask(daemon, w, dialect, [Send(http_response(200, body))], stream=stream)
    check_answer(dialect, response, record)
    assert record["outcome"] == "upstream_error"


@pytest.mark.parametrize(("depth", "exact", "detail"), [
    (300, False, "the worker's JSON is nested too deeply to write"),
    # a run of 19 digits: read by the standard library (exact integers), which reads 600 deep;
    # Python's RecursionError came at ~500 levels, mypyc's never (another message)
    (300, True, "the worker's document is nested too deeply to write"),
    (600, True, "the worker's document is nested too deeply to write"),
])
def test_a_document_nested_deeper_than_orjson_writes_says_so_alike(
    daemon: Daemon, w: FakeWorker, depth: int, exact: bool, detail: str
) -> None:
    seed = b',"seed":1234567890123456789012' if exact else b""
    body = b'{"model":"odd-model"' + seed + b',"x":' + nested(depth) + b"}"
    response, record = ask(daemon, w, "openai-chat", [Send(http_response(200, body))], stream=False)
    assert (response.status, record["outcome"]) == (502, "upstream_error")
    error = response.json()["error"]
    assert (error["code"], error["message"].rpartition(": ")[2]) == ("upstream_protocol_error", detail)


# =============================================================================================
# What broke a build (each found by this module or by tests/test_fuzz_translators.py)
# =============================================================================================


@pytest.mark.parametrize("error", ["boom", 5, [1], {"message": 7}, True])
def test_a_failed_responses_stream_with_an_odd_error_is_a_502(
    daemon: Daemon, w: FakeWorker, error: Any
) -> None:
    """`response.failed` whose `response.error` is not an object, aggregated: the 502 with the
    OpenAI error object (the compiled build raised a TypeError: a local annotated as a dict)."""
    final = {"type": "response.failed", "response": {
        "id": "resp_1", "object": "response", "created_at": 1, "model": MODEL, "status": "failed",
        "output": [], "error": error}}
    response, record = ask(daemon, w, "openai-responses", sse_reply(_responses_stream(final=final)),
                           stream=False)
    assert response.status == 502
    assert record["outcome"] == "upstream_error"
    body = response.json()
    message = error.get("message") if isinstance(error, dict) else None
    assert body["error"]["type"] == "upstream_error"
    assert body["error"]["message"] == (message or "the worker's response failed")


# A first event whose text template (the fast lane's, sidecar.fastlane) cuts it so that its
# prefix and suffix overlap in a later event (`"x":{"y":"b"},"content":` + `},"content":"Z"...`):
# that event has no string between them, and the cut ran backwards (Python: b"", mypyc:
# SystemError). Such a template is never learnt; the later event is read the general way.
_OVERLAP_HEAD = b'{"id":"c1","object":"chat.completion.chunk","created":1700000000,"model":"odd-model",'
_OVERLAP_FIRST = _OVERLAP_HEAD + b'"choices":[{"delta":{"x":{"y":"b"},"content":"LIT"},"content":"Z"}]}'


@pytest.mark.parametrize("framing", ["chunked", "close"])
@pytest.mark.parametrize(
    "second",
    [
        # the overlap itself: not JSON (a brace short), a protocol error
        _OVERLAP_HEAD + b'"choices":[{"delta":{"x":{"y":"b"},"content":"Z"}]}',
        # the same, closed: JSON, passed on
        _OVERLAP_HEAD + b'"choices":[{"delta":{"x":{"y":"b"},"content":"Z"}}]}',
    ],
    ids=["broken", "whole"],
)
def test_a_text_template_whose_ends_overlap_is_never_used(
    daemon: Daemon, w: FakeWorker, framing: str, second: bytes
) -> None:
    events = [data(_OVERLAP_FIRST), data(second), data(_chat_finish()), b"data: [DONE]\n\n"]
    response, record = ask(daemon, w, "openai-chat", sse_reply(events, framing=framing), stream=True)
    payloads = check_answer("openai-chat", response, record)
    assert payloads[0]["choices"][0]["delta"]["content"] == "LIT"
    if second.endswith(b"}}]}"):
        assert record["outcome"] == "ok"
        assert payloads[1]["choices"][0]["delta"] == {"x": {"y": "b"}, "content": "Z"}
        assert payloads[-1] == "[DONE]"
    else:
        assert record["outcome"] == "upstream_error"
        assert payloads[-1]["error"]["code"] == "upstream_protocol_error"


def test_an_sse_retry_past_int_digits_is_an_sse_field_like_any(daemon: Daemon, w: FakeWorker) -> None:
    """`retry:` of more digits than int() converts (4,300): a reconnection time as any, not a
    ValueError out of the parser (a traceback; the stream then waited for idle_timeout)."""
    events = _chat_stream()
    events[1] = b"retry: " + b"9" * 5000 + b"\n" + events[1]
    response, record = ask(daemon, w, "openai-chat", sse_reply(events), stream=True)
    payloads = check_answer("openai-chat", response, record)
    assert record["outcome"] == "ok"
    assert payloads[-1] == "[DONE]"


@pytest.mark.parametrize("stream", [False, True], ids=["aggregated", "relayed"])
def test_a_chunk_created_that_is_not_an_integer_is_not_the_workers(
    daemon: Daemon, w: FakeWorker, stream: bool
) -> None:
    """`created: true` is no creation time: chunks that lack one (and the document) get the
    request's (Python read `true` as the int it subclasses, mypyc as 1: both wrote nonsense)."""
    events = [data({"id": "c1", "created": True, "model": MODEL,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": "a"}}]}),
              data({"choices": [{"index": 0, "delta": {"content": "b"}}]}),
              data({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
              b"data: [DONE]\n\n"]
    response, record = ask(daemon, w, "openai-chat", sse_reply(events), stream=stream)
    payloads = check_answer("openai-chat", response, record)
    filled = payloads[1:-1] if stream else payloads
    for payload in filled:
        created = payload["created"]
        assert type(created) is int and created > 1_600_000_000, payload


@pytest.mark.parametrize("stream", [False, True], ids=["aggregated", "relayed"])
def test_sequence_numbers_past_64_bits(daemon: Daemon, w: FakeWorker, stream: bool) -> None:
    """A worker that numbers its events up to 2**64 - 1 and stops mid-stream: the sidecar's
    own events continue after it (2**64, which orjson cannot write as an int), with the
    error frame; the error frame never fails (a traceback, the client left hanging)."""
    events = _responses_stream(numbered=False)[:-1]  # no terminal event: upstream_incomplete
    events[-1] = typed({"type": "response.output_text.delta", "output_index": 0, "content_index": 0,
                        "delta": "x", "sequence_number": U64})
    events.append(typed({"type": "response.output_text.delta", "output_index": 0,
                         "content_index": 0, "delta": "y"}))
    response, record = ask(daemon, w, "openai-responses", sse_reply(events), stream=stream)
    payloads = check_answer("openai-responses", response, record)
    assert record["outcome"] == "upstream_error"
    if stream:
        assert [p["sequence_number"] for p in payloads[-3:]] == [U64, U64 + 1, U64 + 2]
        assert payloads[-1]["type"] == "response.failed"
        assert payloads[-1]["response"]["error"]["code"] == "upstream_incomplete"
    else:
        assert response.status == 502


@pytest.mark.parametrize("stream", [False, True], ids=["aggregated", "relayed"])
def test_usage_summed_past_64_bits_is_in_the_ledger(daemon: Daemon, w: FakeWorker, stream: bool) -> None:
    """Anthropic's prompt_tokens is input + cache read + cache creation: past 64 bits when the
    worker's counts are near it. The ledger line is written all the same, exactly (orjson
    refused the integer: the line was lost and an error logged)."""
    stream_events = STREAMS["anthropic-messages"]["usage-sum-past-64-bits"]
    response, record = ask(daemon, w, "anthropic-messages", sse_reply(stream_events), stream=stream)
    check_answer("anthropic-messages", response, record)
    assert record["outcome"] == "ok"
    assert record["prompt_tokens"] == 2 * U64
    assert record["cached_tokens"] == U64


# =============================================================================================
# The client's side
# =============================================================================================

ODD_REQUESTS: list[tuple[str, Any, int]] = [
    # (what, body, the status when the worker answers a plain stream)
    ("stream-string", {"model": MODEL, "stream": "true"}, 400),
    ("stream-number", {"model": MODEL, "stream": 1}, 400),
    ("stream-null", {"model": MODEL, "stream": None}, 200),
    *((f"stream-options-{i}", {"model": MODEL, "stream": True, "stream_options": v}, 200)
      for i, v in enumerate([*ODD, {"include_usage": "yes"}, {"include_usage": 1}])),
    *((f"model-{i}", {"model": v, "stream": True}, 200) for i, v in enumerate(ODD)),
    ("array", [1, 2], 400),
    ("string", "x", 400),
    ("deep-300", b'{"model":"odd-model","stream":true,"x":' + nested(300) + b"}", 200),
    ("deep-100000", b'{"model":"odd-model","stream":true,"x":' + nested(100_000) + b"}", 400),
    ("big-int", b'{"model":"odd-model","stream":true,"seed":' + b"1" * 30 + b"}", 200),
]


@pytest.mark.parametrize("dialect", PATHS)
@pytest.mark.parametrize(("what", "body", "status"), ODD_REQUESTS, ids=[r[0] for r in ODD_REQUESTS])
def test_odd_client_requests(
    daemon: Daemon, w: FakeWorker, dialect: str, what: str, body: Any, status: int
) -> None:
    reply = {
        "openai-chat": _chat_stream(),
        "openai-completions": [data({"id": "c", "object": "text_completion", "created": 1, "model": MODEL,
                                     "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]}),
                               b"data: [DONE]\n\n"],
        "anthropic-messages": _anthropic_stream(),
        "openai-responses": _responses_stream(),
    }[dialect]
    raw = body if isinstance(body, bytes) else dumps(body)
    response, record = ask(daemon, w, dialect, sse_reply(reply), stream=True, body=raw)
    assert response.status == status, response.body[:300]
    assert record["status"] == status
    if status == 400:
        assert record["outcome"] == "bad_request"
    else:
        check_answer(dialect, response, record)
        assert record["outcome"] == "ok"
        forwarded = json.loads(w.wait_requests(1)[-1].body)
        if isinstance(body, dict) and "seed" not in body:
            assert forwarded["model"] == body["model"]


@pytest.mark.parametrize("side", ["client", "worker"])
def test_a_content_length_of_thousands_of_digits(daemon: Daemon, w: FakeWorker, side: str) -> None:
    """A Content-Length past what int() converts (4,300 digits; h11 calls int() on it): the
    client's request is refused (400, or 413: larger than any body), the worker's answer is a
    protocol error (502); never a ValueError out of h11 (a traceback, and no answer)."""
    digits = "9" * 5000
    logged = len(daemon.logs)
    if side == "client":
        with RawClient(daemon.address) as client:
            client.send(request_bytes("POST", PATHS["openai-chat"], b"{}",
                                      [("content-length", digits)]))
            response = client.read_response()
        assert response.status in (400, 413), response.raw[:300]
    else:
        w.reply([Send(response_head(200, [("content-type", "application/json"),
                                          ("content-length", digits)])), Close()])
        response = post(daemon, {"model": MODEL, "messages": []}, PATHS["openai-chat"])
        assert response.status == 502, response.raw[:300]
        assert response.json()["error"]["code"] == "upstream_protocol_error"
    assert daemon.wait_log(lambda e: e.get("status") == response.status and "request_id" in e)
    errors = [e for e in daemon.logs[logged:] if e.get("level") in ("error", "critical") or "exc" in e]
    assert not errors, errors


def test_passthrough_takes_any_bytes(daemon: Daemon, w: FakeWorker) -> None:
    """The passthrough route reads no JSON: odd shapes pass as they came, both ways."""
    body = b'{"stream":"yes","model":[1],"x":' + nested(100_000) + b"}"
    answer = data(nested(100_000)) + data(b'{"usage":{"prompt_tokens":"x"}}')
    w.reply([Send(http_response(200, answer, [("content-type", "text/event-stream")], chunked=True))])
    response = post(daemon, body, "/v1/anything")
    assert response.status == 200
    assert response.body == answer
    assert w.wait_requests(1)[-1].body == body


def test_chunked_events_of_the_template_with_odd_payloads(daemon: Daemon, w: FakeWorker) -> None:
    """The fast lane (whole chunks of the text template, sidecar.fastlane) with strings that
    are escapes, empty or no string at all: passed as the general path passes them, up to
    the one that is no JSON (a protocol error)."""
    template = dumps(_chat_chunk(choices=[{"index": 0, "delta": {"content": "x"}}]))
    texts = [b'"x"', b'"a"', b'""', b'"\\ud83d"', b'"\\ude00"', b'"\\u0000"', b'"a\\"b"', b"5", b'"x']
    events = [data(template.replace(b'"x"', text)) for text in texts]
    steps: list[Step] = [Send(response_head(200, [("content-type", "text/event-stream"),
                                                  ("transfer-encoding", "chunked")]))]
    steps += [Send(chunk(e)) for e in events]
    response, record = ask(daemon, w, "openai-chat", steps, stream=True)
    payloads = check_answer("openai-chat", response, record)
    assert record["outcome"] == "upstream_error"
    assert payloads[-1]["error"]["code"] == "upstream_protocol_error"
    contents = [p["choices"][0]["delta"]["content"] for p in payloads[:-1]]
    assert contents == ["x", "a", "", "\ud83d", "\ude00", "\x00", 'a"b', 5]
