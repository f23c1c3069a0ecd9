"""anthropic-messages and openai-responses end to end: the real daemon, a fake worker, the real SDKs.

The worker answers each request from its own `stream` flag (SSE or one JSON
document), as the Anthropic API and OpenAI Responses API do. The clients are
the real `anthropic` and `openai` SDKs (test dependencies); byte-level checks
use the harness's raw client.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import openai
import orjson
import pytest

from tests.harness import (
    LAST_CHUNK,
    Close,
    Daemon,
    FakeWorker,
    RawClient,
    Reset,
    Send,
    Sleep,
    Stall,
    Step,
    WorkerRequest,
    chunk,
    free_port,
    json_reply,
    metric_samples,
    metrics_text,
    post,
    response_head,
    sse_payloads,
    sse_reply,
)

CLAUDE = "claude-like"
GPT = "gpt-like"
PRICES = {CLAUDE: {"prompt": 3.0, "completion": 15.0, "cached_prompt": 0.3, "cache_write": 3.75},
          GPT: {"prompt": 1.0, "completion": 2.0, "cached_prompt": 0.5, "reasoning": 4.0},
          # rows that leave prices out: SPEC's defaults (cached_prompt and cache_write -> prompt,
          # reasoning -> completion), and one with a `reasoning` price Anthropic never uses
          "claude-plain": {"prompt": 2.0, "completion": 10.0},
          "claude-cached": {"prompt": 2.0, "completion": 10.0, "cached_prompt": 0.5, "reasoning": 99.0},
          "gpt-plain": {"prompt": 1.0, "completion": 2.0},
          # used by the metrics test alone, so that its counters are its own
          "claude-metrics": {"prompt": 3.0, "completion": 15.0, "cached_prompt": 0.3, "cache_write": 3.75},
          "gpt-metrics": {"prompt": 1.0, "completion": 2.0, "cached_prompt": 0.5, "reasoning": 4.0}}


def _route(name: str, path: str, dialect: str, mode: str) -> dict[str, Any]:
    return {"name": name, "match": {"path": path, "methods": ["POST"]}, "dialect": dialect,
            "upstream_stream": mode}


ROUTES = [
    _route(f"{dialect}-{mode}", f"{prefix}/v1/{tail}", dialect, mode)
    for dialect, tail in (("anthropic-messages", "messages"), ("openai-responses", "responses"))
    for mode, prefix in (("auto", ""), ("never", "/never"), ("always", "/always"))
] + [
    {**_route(f"{dialect}-dead", f"/dead/v1/{tail}", dialect, "auto"),
     "upstream": {"url": f"http://127.0.0.1:{free_port()}"}}
    for dialect, tail in (("anthropic-messages", "messages"), ("openai-responses", "responses"))
] + [
    {**_route(f"{dialect}-beat", f"/beat/v1/{tail}", dialect, "auto"), "heartbeat": "100ms",
     "upstream": {"idle_timeout": "5s"}}
    for dialect, tail in (("anthropic-messages", "messages"), ("openai-responses", "responses"))
]
_ids = itertools.count(1)


def request_id() -> str:
    return f"req-e2e-{next(_ids)}"


@pytest.fixture(scope="module")
def daemon(module_worker: FakeWorker, make_module_daemon: Callable[..., Daemon]) -> Daemon:
    return make_module_daemon(worker=module_worker, routes=ROUTES, pricing={"models": PRICES})


@pytest.fixture
def worker(module_worker: FakeWorker) -> Iterator[FakeWorker]:
    module_worker.reset()
    yield module_worker
    assert not module_worker.errors, module_worker.errors


# =============================================================================================
# Anthropic Messages
# =============================================================================================

MESSAGE: dict[str, Any] = {
    "id": "msg_01XYZ",
    "type": "message",
    "role": "assistant",
    "model": CLAUDE,
    "content": [
        {"type": "thinking", "thinking": "The user greets me.", "signature": "EqQBCgIYAhIM"},
        {"type": "text", "text": "Hello! How can I help?"},
        {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris", "days": [1, 2]}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 120, "output_tokens": 42, "cache_read_input_tokens": 1000,
              "cache_creation_input_tokens": 20},
}
#: 120*3 + 1000*0.3 + 20*3.75 + 42*15 = 1365 per million
MESSAGE_COST = 1365 / 1e6


def ev(kind: str, obj: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(obj)}\n\n".encode()


def anthropic_events(message: dict[str, Any]) -> list[bytes]:
    """The message as the Anthropic API streams it: small deltas, a ping, usage at both ends."""
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**usage, "output_tokens": 1}}
    out = [ev("message_start", {"type": "message_start", "message": start}), ev("ping", {"type": "ping"})]
    for index, block in enumerate(message["content"]):
        def delta(d: dict[str, Any], index: int = index) -> bytes:
            return ev("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})

        if block["type"] == "text":
            out.append(ev("content_block_start", {"type": "content_block_start", "index": index,
                                                  "content_block": {"type": "text", "text": ""}}))
            text = block["text"]
            out += [delta({"type": "text_delta", "text": text[i:i + 5]}) for i in range(0, len(text), 5)]
        elif block["type"] == "thinking":
            out.append(ev("content_block_start", {"type": "content_block_start", "index": index,
                                                  "content_block": {"type": "thinking", "thinking": ""}}))
            out.append(delta({"type": "thinking_delta", "thinking": block["thinking"]}))
            out.append(delta({"type": "signature_delta", "signature": block["signature"]}))
        else:
            out.append(ev("content_block_start", {"type": "content_block_start", "index": index,
                                                  "content_block": {**block, "input": {}}}))
            raw = json.dumps(block["input"])
            out += [delta({"type": "input_json_delta", "partial_json": raw[i:i + 7]}) for i in range(0, len(raw), 7)]
        out.append(ev("content_block_stop", {"type": "content_block_stop", "index": index}))
    out.append(ev("message_delta", {"type": "message_delta",
                                    "delta": {"stop_reason": message["stop_reason"],
                                              "stop_sequence": message["stop_sequence"]},
                                    "usage": {"output_tokens": usage["output_tokens"]}}))
    out.append(ev("message_stop", {"type": "message_stop"}))
    return out


def anthropic_worker(message: dict[str, Any] = MESSAGE, cut_after: int | None = None
                     ) -> Callable[[WorkerRequest], list[Step]]:
    """Answers like the Anthropic API from the request's `stream`; `cut_after` events, then RST."""
    def handle(request: WorkerRequest) -> list[Step]:
        if request.json().get("stream") is True:
            events = anthropic_events(message)
            if cut_after is not None:
                return [*sse_reply(events[:cut_after], end=False), Reset()]
            return sse_reply(events)
        return json_reply(message)
    return handle


def anthropic_client(daemon: Daemon, prefix: str = "") -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="sk-ant-test", base_url=daemon.url + prefix, max_retries=0, timeout=10)


def ask() -> dict[str, Any]:
    return {"model": CLAUDE, "max_tokens": 256, "messages": [{"role": "user", "content": "Hello"}]}

def anthropic_stream_error(daemon: Daemon, rid: str) -> tuple[str, list[str]]:
    """An anthropic SDK stream that must raise (`APIStatusError`): its error's text and the
    types of the events it yielded before."""
    seen: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as info,
        anthropic_client(daemon).messages.stream(**ask(), extra_headers={"x-request-id": rid}) as stream,
    ):
        seen.extend(event.type for event in stream)
    return str(info.value), seen


def expected_message() -> dict[str, Any]:
    out = copy.deepcopy(MESSAGE)
    out["usage"]["cost"] = pytest.approx(MESSAGE_COST)
    return out


def check_anthropic_ledger(daemon: Daemon, rid: str, *, client_stream: bool, upstream_sse: bool,
                           outcome: str = "ok") -> dict[str, Any]:
    record = daemon.ledger_for(rid)
    assert record["dialect"] == "anthropic-messages"
    assert record["outcome"] == outcome
    assert record["client_stream"] is client_stream and record["upstream_stream"] is upstream_sse
    assert record["model"] == CLAUDE and record["request_model"] == CLAUDE
    assert record["prompt_tokens"] == 120 + 1000 + 20
    assert record["cached_tokens"] == 1000 and record["reasoning_tokens"] is None
    if outcome == "ok":
        assert record["completion_tokens"] == 42
        assert record["cost"] == pytest.approx(MESSAGE_COST)
        assert record["usage_estimated"] is False
    return record


def test_anthropic_stream_with_the_sdk(daemon: Daemon, worker: FakeWorker) -> None:
    worker.default = anthropic_worker()
    rid = request_id()
    client = anthropic_client(daemon)
    deltas = []
    with client.messages.stream(**ask(), extra_headers={"x-request-id": rid}) as stream:
        for event in stream:
            if event.type == "message_delta":
                deltas.append(event.usage.to_dict())
        final = stream.get_final_message()
    assert [b.to_dict() for b in final.content] == MESSAGE["content"]
    assert final.stop_reason == "tool_use" and final.id == MESSAGE["id"]
    assert final.usage.input_tokens == 120 and final.usage.output_tokens == 42
    assert deltas == [{"output_tokens": 42, "cost": pytest.approx(MESSAGE_COST)}]
    (request,) = worker.requests
    sent = request.json()
    assert sent["stream"] is True and "stream_options" not in sent
    # the client's credential reaches the worker unchanged (this SDK sends it as a bearer token)
    assert "sk-ant-test" in (request.header("x-api-key") or request.header("authorization") or "")
    check_anthropic_ledger(daemon, rid, client_stream=True, upstream_sse=True)


def test_anthropic_stream_bytes_pass_through(daemon: Daemon, worker: FakeWorker) -> None:
    worker.default = anthropic_worker()
    response = post(daemon, {**ask(), "stream": True}, "/v1/messages")
    assert response.status == 200 and response.header("content-type") == "text/event-stream"
    sent = anthropic_events(MESSAGE)
    delta_at = len(sent) - 2
    body = response.body
    assert body.startswith(b"".join(sent[:delta_at]))  # every event before it: the worker's own bytes
    assert body.endswith(sent[-1])
    middle = body[len(b"".join(sent[:delta_at])):-len(sent[-1])]
    assert middle.startswith(b"event: message_delta\n")
    obj = json.loads(sse_payloads(middle)[0])
    assert obj["usage"] == {"output_tokens": 42, "cost": pytest.approx(MESSAGE_COST)}


def test_anthropic_named_events_without_a_type_in_their_data_work_with_the_sdk(
    daemon: Daemon, worker: FakeWorker
) -> None:
    """A worker that names its events but leaves `type` out of their data: the SDK reads the
    data's type (it fails on these events as they came), so they go out with it written in."""
    untyped = []
    for raw in anthropic_events(MESSAGE):
        head, _, data = raw.partition(b"data: ")
        obj = json.loads(data)
        del obj["type"]
        untyped.append(head + b"data: " + json.dumps(obj).encode() + b"\n\n")
    worker.reply(sse_reply(untyped))
    with anthropic_client(daemon).messages.stream(**ask()) as stream:
        final = stream.get_final_message()
    assert [b.to_dict() for b in final.content] == MESSAGE["content"]
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 42


def test_anthropic_json_with_the_sdk(daemon: Daemon, worker: FakeWorker) -> None:
    worker.default = anthropic_worker()
    rid = request_id()
    raw = anthropic_client(daemon).messages.with_raw_response.create(
        **ask(), extra_headers={"x-request-id": rid})
    message = raw.parse()
    assert message.to_dict() == expected_message()
    assert raw.headers["x-sidecar-cost"] == "0.001365"
    assert worker.requests[0].json().get("stream", False) is False
    check_anthropic_ledger(daemon, rid, client_stream=False, upstream_sse=False)


def test_anthropic_json_to_sse(daemon: Daemon, worker: FakeWorker) -> None:
    """upstream_stream: never: the worker answers one document, the SDK streams it."""
    worker.default = anthropic_worker()
    rid = request_id()
    with anthropic_client(daemon, "/never").messages.stream(**ask(), extra_headers={"x-request-id": rid}) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert worker.requests[0].json()["stream"] is False
    assert [b.to_dict() for b in final.content] == MESSAGE["content"]
    assert final.usage.output_tokens == 42 and final.stop_reason == "tool_use"
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    check_anthropic_ledger(daemon, rid, client_stream=True, upstream_sse=False)
    raw = post(daemon, {**ask(), "stream": True}, "/never/v1/messages")
    for payload, block in zip(sse_payloads(raw.body), raw.body.split(b"\n\n"), strict=False):
        assert block.startswith(b"event: " + json.loads(payload)["type"].encode() + b"\n")


def test_anthropic_json_to_sse_of_a_document_without_usage(daemon: Daemon, worker: FakeWorker) -> None:
    """The events the sidecar writes carry a usage (the SDK's stream helper reads it)."""
    document = {k: v for k, v in MESSAGE.items() if k != "usage"}
    worker.default = json_reply(document)
    with anthropic_client(daemon, "/never").messages.stream(**ask()) as stream:
        final = stream.get_final_message()
    assert [b.to_dict() for b in final.content] == MESSAGE["content"]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (0, 0)


def test_anthropic_sse_to_json(daemon: Daemon, worker: FakeWorker) -> None:
    """upstream_stream: always: the worker streams, the SDK gets one message."""
    worker.default = anthropic_worker()
    rid = request_id()
    raw = anthropic_client(daemon, "/always").messages.with_raw_response.create(
        **ask(), extra_headers={"x-request-id": rid})
    assert raw.parse().to_dict() == expected_message()
    assert raw.headers["x-sidecar-cost"] == "0.001365"
    sent = worker.requests[0].json()
    assert sent["stream"] is True and "stream_options" not in sent
    check_anthropic_ledger(daemon, rid, client_stream=False, upstream_sse=True)


def test_anthropic_worker_killed_mid_stream(daemon: Daemon, worker: FakeWorker) -> None:
    worker.default = anthropic_worker(cut_after=6)
    rid = request_id()
    error, seen = anthropic_stream_error(daemon, rid)
    assert "upstream_disconnected" in error
    assert "message_stop" not in seen
    check_anthropic_ledger(daemon, rid, client_stream=True, upstream_sse=True, outcome="upstream_error")
    # the bytes: the events that arrived, then the error frame, then nothing
    response = post(daemon, {**ask(), "stream": True}, "/v1/messages")
    assert response.complete  # the body is ended cleanly
    sent = anthropic_events(MESSAGE)[:6]
    assert response.body.startswith(b"".join(sent))
    tail = response.body[len(b"".join(sent)):]
    assert tail.startswith(b"event: error\n")
    (frame,) = sse_payloads(tail)
    assert json.loads(frame) == {"type": "error", "error": {
        "type": "api_error", "message": json.loads(frame)["error"]["message"], "code": "upstream_disconnected"}}
    assert b"message_stop" not in response.body and b"stop_reason\": \"tool_use" not in response.body


def test_anthropic_aggregate_failure_is_a_502(daemon: Daemon, worker: FakeWorker) -> None:
    worker.default = anthropic_worker(cut_after=6)
    with pytest.raises(anthropic.InternalServerError) as info:
        anthropic_client(daemon, "/always").messages.create(**ask())
    assert info.value.status_code == 502
    assert info.value.body == {"type": "error", "error": {
        "type": "api_error", "message": info.value.body["error"]["message"], "code": "upstream_disconnected"}}


def test_anthropic_bad_json_is_a_400_in_the_dialect_shape(daemon: Daemon, worker: FakeWorker) -> None:
    response = post(daemon, b'{"model": ', "/v1/messages")
    assert response.status == 400
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_request_error"
    assert worker.requests == []


def test_anthropic_worker_error_event_is_forwarded(daemon: Daemon, worker: FakeWorker) -> None:
    error = ev("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    worker.default = sse_reply([*anthropic_events(MESSAGE)[:3], error])
    rid = request_id()
    assert "overloaded_error" in anthropic_stream_error(daemon, rid)[0]
    assert daemon.ledger_for(rid)["outcome"] == "upstream_error"


def test_anthropic_untyped_error_document_is_never_a_success(daemon: Daemon, worker: FakeWorker) -> None:
    """A 2xx document `{"error": {...}}` with no type: the worker's failure, as the same data
    in a stream is. A streaming client (JSON -> SSE) gets `event: error` (the SDK raises), never
    a message_start ... message_stop; a non-streaming one a 502; the ledger `upstream_error`."""
    worker.default = json_reply({"error": {"code": 500, "message": "boom", "type": "server_error"}})
    rid = request_id()
    assert "boom" in anthropic_stream_error(daemon, rid)[0]
    assert daemon.ledger_for(rid)["outcome"] == "upstream_error"
    response = post(daemon, {**ask(), "stream": True}, "/v1/messages")
    assert b"message_stop" not in response.body and response.body.startswith(b"event: error\n")
    with pytest.raises(anthropic.InternalServerError) as failed:
        anthropic_client(daemon).messages.create(**ask())
    assert failed.value.status_code == 502
    assert failed.value.body == {"type": "error", "error": {"type": "api_error", "message": "boom", "code": 500}}


LLAMACPP_ERROR = {"code": 500, "message": "the slot was lost", "type": "server_error"}


def test_anthropic_worker_error_event_of_another_type_is_forwarded_as_it_is(
    daemon: Daemon, worker: FakeWorker
) -> None:
    """llama.cpp's Messages failure: `event: error` over data whose type is its own
    (`server_error`). It is the worker's error: out as it came (the SDK raises with the
    worker's message), no error frame of the sidecar's after it, and an aggregating client
    gets a 502 with the worker's message in an Anthropic error object."""
    error = ev("error", LLAMACPP_ERROR)
    worker.default = sse_reply([*anthropic_events(MESSAGE)[:3], error])
    rid = request_id()
    response = post(daemon, {**ask(), "stream": True}, "/v1/messages", headers=[("x-request-id", rid)])
    assert response.body.endswith(error)
    assert b"upstream_incomplete" not in response.body
    assert daemon.ledger_for(rid)["outcome"] == "upstream_error"
    with pytest.raises(anthropic.InternalServerError) as info:
        anthropic_client(daemon, "/always").messages.create(**ask())
    assert info.value.status_code == 502
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["message"] == "the slot was lost"


# =============================================================================================
# OpenAI Responses
# =============================================================================================

RESPONSE: dict[str, Any] = {
    "id": "resp_abc",
    "object": "response",
    "created_at": 1_741_476_542,
    "model": GPT,
    "status": "completed",
    "error": None,
    "incomplete_details": None,
    "instructions": None,
    "parallel_tool_calls": True,
    "tool_choice": "auto",
    "tools": [],
    "output": [
        {"id": "rs_1", "type": "reasoning", "summary": [{"type": "summary_text", "text": "Simple greeting."}]},
        {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "Hi! What can I do for you?", "annotations": [],
                      "logprobs": []}]},
    ],
    "usage": {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 16}, "output_tokens": 87,
              "output_tokens_details": {"reasoning_tokens": 40}, "total_tokens": 123},
}
#: (36-16)*1 + 16*0.5 + (87-40)*2 + 40*4 = 282 per million
RESPONSE_COST = 282 / 1e6


def responses_events(doc: dict[str, Any], *, numbered: bool = True) -> list[bytes]:
    """The response as the Responses API streams it (`sequence_number` when `numbered`)."""
    pending = {**doc, "status": "in_progress", "output": [], "usage": None}
    events: list[dict[str, Any]] = [{"type": "response.created", "response": pending},
                                    {"type": "response.in_progress", "response": pending}]
    for index, item in enumerate(doc["output"]):
        if item["type"] == "message":
            events.append({"type": "response.output_item.added", "output_index": index,
                           "item": {**item, "status": "in_progress", "content": []}})
            for ci, part in enumerate(item["content"]):
                at = {"item_id": item["id"], "output_index": index, "content_index": ci}
                events.append({"type": "response.content_part.added", **at,
                               "part": {**part, "text": "", "annotations": [], "logprobs": []}})
                text = part["text"]
                events += [{"type": "response.output_text.delta", **at, "delta": text[i:i + 4], "logprobs": []}
                           for i in range(0, len(text), 4)]
                events.append({"type": "response.output_text.done", **at, "text": text, "logprobs": []})
                events.append({"type": "response.content_part.done", **at, "part": part})
        else:
            events.append({"type": "response.output_item.added", "output_index": index,
                           "item": {**item, "summary": []}})
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    events.append({"type": "response.completed", "response": doc})
    out = []
    for i, event in enumerate(events):
        if numbered:
            event = {**event, "sequence_number": i}
        out.append(ev(event["type"], event))
    return out


def responses_worker(doc: dict[str, Any] = RESPONSE, *, numbered: bool = True, cut_after: int | None = None
                     ) -> Callable[[WorkerRequest], list[Step]]:
    def handle(request: WorkerRequest) -> list[Step]:
        if request.json().get("stream") is True:
            events = responses_events(doc, numbered=numbered)
            if cut_after is not None:
                return [*sse_reply(events[:cut_after], end=False), Reset()]
            return sse_reply(events)
        return json_reply(doc)
    return handle


def openai_client(daemon: Daemon, prefix: str = "") -> openai.OpenAI:
    return openai.OpenAI(api_key="sk-test", base_url=daemon.url + prefix + "/v1", max_retries=0, timeout=10)


def expected_response() -> dict[str, Any]:
    out = copy.deepcopy(RESPONSE)
    out["usage"]["cost"] = pytest.approx(RESPONSE_COST)
    return out


def check_responses_ledger(daemon: Daemon, rid: str, *, client_stream: bool, upstream_sse: bool,
                           outcome: str = "ok") -> dict[str, Any]:
    record = daemon.ledger_for(rid)
    assert record["dialect"] == "openai-responses" and record["outcome"] == outcome
    assert record["client_stream"] is client_stream and record["upstream_stream"] is upstream_sse
    if outcome == "ok":
        assert (record["prompt_tokens"], record["completion_tokens"]) == (36, 87)
        assert (record["cached_tokens"], record["reasoning_tokens"]) == (16, 40)
        assert record["cost"] == pytest.approx(RESPONSE_COST) and record["model"] == GPT
    return record


def test_responses_stream_with_the_sdk(daemon: Daemon, worker: FakeWorker) -> None:
    worker.default = responses_worker()
    rid = request_id()
    events = list(openai_client(daemon).responses.create(
        model=GPT, input="Hello", stream=True, extra_headers={"x-request-id": rid}))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created"
    completed = events[-1]
    assert isinstance(completed, openai.types.responses.ResponseCompletedEvent)
    assert completed.response.to_dict() == expected_response()
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hi! What can I do for you?"
    sent = worker.requests[0].json()
    assert sent["stream"] is True and "stream_options" not in sent
    check_responses_ledger(daemon, rid, client_stream=True, upstream_sse=True)


def test_responses_json_with_the_sdk(daemon: Daemon, worker: FakeWorker) -> None:
    worker.default = responses_worker()
    rid = request_id()
    raw = openai_client(daemon).responses.with_raw_response.create(
        model=GPT, input="Hello", extra_headers={"x-request-id": rid})
    assert raw.parse().to_dict() == expected_response()
    assert raw.headers["x-sidecar-cost"] == "0.000282"
    check_responses_ledger(daemon, rid, client_stream=False, upstream_sse=False)


def test_responses_json_to_sse(daemon: Daemon, worker: FakeWorker) -> None:
    """upstream_stream: never: the SDK's stream helper rebuilds the response from our events."""
    worker.default = responses_worker()
    rid = request_id()
    with openai_client(daemon, "/never").responses.stream(
            model=GPT, input="Hello", extra_headers={"x-request-id": rid}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert worker.requests[0].json()["stream"] is False
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == "Hi! What can I do for you?"
    assert final.usage is not None and final.usage.to_dict() == expected_response()["usage"]
    check_responses_ledger(daemon, rid, client_stream=True, upstream_sse=False)


def test_responses_sse_to_json(daemon: Daemon, worker: FakeWorker) -> None:
    worker.default = responses_worker()
    rid = request_id()
    raw = openai_client(daemon, "/always").responses.with_raw_response.create(
        model=GPT, input="Hello", extra_headers={"x-request-id": rid})
    assert raw.parse().to_dict() == expected_response()
    assert worker.requests[0].json()["stream"] is True
    check_responses_ledger(daemon, rid, client_stream=False, upstream_sse=True)


def countless_usage_events(tail: str) -> list[bytes]:
    """The dialect's stream whose usage objects count nothing (`{}`): no usage reported."""
    if tail == "responses":
        return responses_events({**RESPONSE, "usage": {}})
    out = []
    for event in anthropic_events(MESSAGE):
        obj = json.loads(sse_payloads(event)[0])
        if obj["type"] == "message_start":
            obj["message"]["usage"] = {}
        elif obj["type"] == "message_delta":
            obj["usage"] = {}
        out.append(ev(obj["type"], obj))
    return out


@pytest.mark.parametrize("client_stream", [True, False])
@pytest.mark.parametrize("tail", ["messages", "responses"])
def test_a_usage_object_without_counts_is_estimated_for_the_ledger_alone(
    daemon: Daemon, worker: FakeWorker, tail: str, client_stream: bool
) -> None:
    """Usage objects that count nothing are no usage: the estimate from the stream prices the
    ledger line only; the client's usage object stays the worker's, with no cost in it (an
    invented one would disagree with the absent x-sidecar-cost)."""
    worker.default = sse_reply(countless_usage_events(tail))
    rid = request_id()
    body = {**ask(), "stream": True} if client_stream else ask()
    response = post(daemon, body, ("" if client_stream else "/always") + "/v1/" + tail,
                    headers=[("x-request-id", rid)])
    assert response.status == 200
    if client_stream:
        last = [json.loads(p) for p in sse_payloads(response.body)
                if '"usage"' in p and json.loads(p)["type"] in ("message_delta", "response.completed")]
        (final,) = last
        usage = final["usage"] if tail == "messages" else final["response"]["usage"]
    else:
        assert response.header("x-sidecar-cost") is None
        usage = response.json()["usage"]
    assert usage == {}
    record = daemon.ledger_for(rid)
    assert record["outcome"] == "ok" and record["usage_estimated"] is True
    assert record["completion_tokens"] and record["cost"]


def test_responses_unnumbered_worker_is_numbered(daemon: Daemon, worker: FakeWorker) -> None:
    worker.default = responses_worker(numbered=False)
    with openai_client(daemon).responses.stream(model=GPT, input="Hello") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == "Hi! What can I do for you?"


@pytest.mark.parametrize("numbered", [True, False])
def test_responses_worker_killed_mid_stream(daemon: Daemon, worker: FakeWorker, numbered: bool) -> None:
    cut = 7  # created, in_progress, reasoning added+done, message added, part added, one delta
    worker.default = responses_worker(numbered=numbered, cut_after=cut)
    rid = request_id()
    events = list(openai_client(daemon).responses.create(
        model=GPT, input="Hello", stream=True, extra_headers={"x-request-id": rid}))
    assert len(events) == cut + 1
    failed = events[-1]
    assert isinstance(failed, openai.types.responses.ResponseFailedEvent)
    assert failed.sequence_number == cut
    assert failed.response.status == "failed"
    assert (failed.response.id, failed.response.model, failed.response.created_at) == (
        RESPONSE["id"], GPT, RESPONSE["created_at"])
    error = failed.response.to_dict()["error"]
    assert error["code"] == "upstream_disconnected" and error["message"]
    output = failed.response.to_dict()["output"]
    assert [item["id"] for item in output] == ["rs_1", "msg_1"]
    assert output[1]["content"][0]["text"] == "Hi! "  # the output so far
    assert not any(e.type == "response.completed" for e in events)
    check_responses_ledger(daemon, rid, client_stream=True, upstream_sse=True, outcome="upstream_error")
    response = post(daemon, {"model": GPT, "input": "x", "stream": True}, "/v1/responses")
    assert response.complete
    tail = response.body.rsplit(b"\n\n", 2)[-2] + b"\n\n"
    assert tail.startswith(b"event: response.failed\n")
    assert b"response.completed" not in response.body


def test_responses_stream_helper_sees_a_failure_before_any_event(
    daemon: Daemon, worker: FakeWorker
) -> None:
    """The worker's JSON answer (never route) breaks after its head: the streaming client gets
    a synthesized response.created, then response.failed, so the SDK's stream helper, which
    follows the response's state, yields a ResponseFailedEvent instead of raising."""
    head = response_head(200, [("content-type", "application/json"), ("content-length", "400")])
    worker.reply([Send(head + b'{"id": "resp_x", "object": "resp'), Close()])
    with openai_client(daemon, "/never").responses.stream(model=GPT, input="Hello") as stream:
        events = list(stream)
    assert [e.type for e in events] == ["response.created", "response.failed"]
    assert [e.sequence_number for e in events] == [0, 1]
    failed = events[-1]
    assert isinstance(failed, openai.types.responses.ResponseFailedEvent)
    assert failed.response.id == events[0].response.id
    assert failed.response.to_dict()["error"]["code"] == "upstream_disconnected"


def test_responses_aggregate_failure_is_a_502(daemon: Daemon, worker: FakeWorker) -> None:
    worker.default = responses_worker(cut_after=5)
    with pytest.raises(openai.InternalServerError) as info:
        openai_client(daemon, "/always").responses.create(model=GPT, input="Hello")
    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_disconnected"  # the SDK unwraps {"error": {...}}


def test_responses_failed_document_is_a_502_with_the_error_object(
    daemon: Daemon, worker: FakeWorker
) -> None:
    """A worker's JSON `response` with `status: "failed"` reaches a non-streaming client as an
    aggregated `response.failed` does: a 502 with the OpenAI error object, not the response."""
    failed = {**RESPONSE, "status": "failed", "output": [],
              "error": {"code": "server_error", "message": "the slot was lost"}}
    events = responses_events(failed)
    events[-1] = ev("response.failed", {"type": "response.failed", "response": failed,
                                        "sequence_number": len(events) - 1})

    def handle(request: WorkerRequest) -> list[Step]:
        return sse_reply(events) if request.json().get("stream") is True else json_reply(failed)

    worker.default = handle
    bodies = []
    for prefix in ("", "/always"):  # the worker's document; its stream, aggregated
        rid = request_id()
        with pytest.raises(openai.InternalServerError) as info:
            openai_client(daemon, prefix).responses.create(
                model=GPT, input="Hello", extra_headers={"x-request-id": rid})
        assert info.value.status_code == 502 and "x-sidecar-cost" not in info.value.response.headers
        bodies.append(info.value.response.json())
        assert daemon.ledger_for(rid)["outcome"] == "upstream_error"
    assert bodies[0] == bodies[1] == {"error": {"message": "the slot was lost", "type": "upstream_error",
                                                "code": "server_error", "param": None}}


def test_responses_unnamed_worker_error_is_the_workers_error(daemon: Daemon, worker: FakeWorker) -> None:
    """llama.cpp's Responses failure: `data: {"error": {...}}`, no event name, no type. The
    streaming client gets it (the SDK raises with the worker's message); an aggregating
    client gets a 502 with the worker's message, not the sidecar's `upstream_incomplete`."""
    error = b"data: " + orjson.dumps({"error": LLAMACPP_ERROR}) + b"\n\n"
    worker.default = sse_reply([*responses_events(RESPONSE)[:2], error])
    with pytest.raises(openai.APIError) as streamed:
        for _ in openai_client(daemon).responses.create(model=GPT, input="Hello", stream=True):
            pass
    assert "the slot was lost" in str(streamed.value)
    rid = request_id()
    with pytest.raises(openai.InternalServerError) as info:
        openai_client(daemon, "/always").responses.create(
            model=GPT, input="Hello", extra_headers={"x-request-id": rid})
    assert info.value.status_code == 502
    assert info.value.body["message"] == "the slot was lost"
    assert daemon.ledger_for(rid)["outcome"] == "upstream_error"


# =============================================================================================
# Both: a reset after the stream's last event, errors before the head in each dialect's shape
# =============================================================================================


def test_a_reset_after_the_last_event_takes_nothing_from_the_stream(
    daemon: Daemon, worker: FakeWorker
) -> None:
    """`message_stop` and `response.completed` end their streams: a worker that resets its
    connection instead of ending the body after them has failed nobody."""
    everything = len(anthropic_events(MESSAGE))
    worker.default = anthropic_worker(cut_after=everything)
    client = anthropic_client(daemon)
    with client.messages.stream(**ask()) as stream:
        kinds = [event.type for event in stream]
        message = stream.get_final_message()
    assert kinds[-1] == "message_stop" and "error" not in kinds
    assert [b.to_dict() for b in message.content] == MESSAGE["content"]
    aggregated = anthropic_client(daemon, "/always").messages.create(**ask())
    assert aggregated.to_dict() == expected_message()

    worker.default = responses_worker(cut_after=len(responses_events(RESPONSE)))
    stream_events = list(openai_client(daemon).responses.create(model=GPT, input="Hi", stream=True))
    assert stream_events[-1].type == "response.completed"
    assert [e.type for e in stream_events].count("response.failed") == 0
    response = openai_client(daemon, "/always").responses.create(model=GPT, input="Hello")
    assert response.status == "completed" and response.output_text
    outcomes = [r["outcome"] for r in daemon.ledger()[-4:]]
    assert outcomes == ["ok"] * 4, daemon.ledger()[-4:]


# =============================================================================================
# Both: errors before the head, in each dialect's shape
# =============================================================================================


@pytest.mark.parametrize("tail", ["messages", "responses"])
def test_errors_before_the_head(daemon: Daemon, worker: FakeWorker, tail: str) -> None:
    body = {"model": "m", "input": "x", "stream": True}
    unreachable = post(daemon, body, f"/dead/v1/{tail}")
    too_large = post(daemon, {**body, "pad": "x" * (1 << 20)}, f"/v1/{tail}")
    assert (unreachable.status, too_large.status) == (502, 413)
    for response, code, anthropic_type in ((unreachable, "upstream_unavailable", "api_error"),
                                           (too_large, "request_too_large", "request_too_large")):
        obj = response.json()
        if tail == "messages":
            assert obj["type"] == "error" and obj["error"]["type"] == anthropic_type
        assert (obj["error"]["code"], bool(obj["error"]["message"])) == (code, True)
    assert worker.requests == []


@pytest.mark.parametrize("tail", ["messages", "responses"])
@pytest.mark.parametrize(
    ("extra", "status"),
    [("Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", 400),  # SPEC's refused framing
     ("Content-Length: 2\r\nX-Pad: " + "x" * (70 * 1024) + "\r\n", 431)],  # past max_header_bytes
)
def test_a_refused_head_speaks_the_dialect_of_its_path(
    daemon: Daemon, worker: FakeWorker, tail: str, extra: str, status: int
) -> None:
    """A head refused before routing is still an error before the head on that API's path:
    an Anthropic client gets the Anthropic error object (SPEC: the type from the status)."""
    head = f"POST /v1/{tail}?beta=true HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}\r\n"
    with RawClient(daemon.address) as client:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            client.send(head.encode() + b"{}")
        response = client.read_response()
    assert response.status == status
    obj = response.json()
    if tail == "messages":
        assert obj["type"] == "error" and obj["error"]["type"] == "invalid_request_error", obj
    else:
        assert obj["error"]["type"] == "invalid_request_error", obj
    assert obj["error"]["code"] in ("invalid_request", "headers_too_large") and obj["error"]["message"]
    assert worker.requests == []


@pytest.mark.parametrize("tail", ["messages", "responses"])
@pytest.mark.parametrize("client_stream", [True, False, None])
def test_never_asks_the_worker_without_stream_options(
    daemon: Daemon, worker: FakeWorker, tail: str, client_stream: bool | None
) -> None:
    """`never`: the worker is asked `stream: false` with no `stream_options` (SPEC), on every
    dialect, whatever the client's `stream` said; a client's own `stream_options` included."""
    worker.default = anthropic_worker() if tail == "messages" else responses_worker()
    body: dict[str, Any] = {**ask(), "stream_options": {"include_usage": True}} if tail == "messages" \
        else {"model": GPT, "input": "Hi", "stream_options": {"include_obfuscation": False}}
    if client_stream is not None:
        body["stream"] = client_stream
    response = post(daemon, body, f"/never/v1/{tail}")
    assert response.status == 200
    (request,) = worker.requests
    sent = request.json()
    assert sent["stream"] is False and "stream_options" not in sent, sent
    assert {k: v for k, v in sent.items() if k != "stream"} == \
        {k: v for k, v in body.items() if k not in ("stream", "stream_options")}


def test_anthropic_tool_input_cut_by_max_tokens_is_aggregated_as_far_as_it_came(
    daemon: Daemon, worker: FakeWorker
) -> None:
    """A tool input cut off by max_tokens is a normal end (Anthropic documents it): the
    message is whole but for the member cut in its middle, as SDKs read such a stream."""
    message = {**MESSAGE, "stop_reason": "max_tokens"}
    events = anthropic_events(message)
    pieces = [i for i, e in enumerate(events) if b'"input_json_delta"' in e]
    events = [e for i, e in enumerate(events) if i not in pieces[3:]]  # '{"city": "Paris", "da'
    worker.default = sse_reply(events)
    response = post(daemon, ask(), "/always/v1/messages")
    assert response.status == 200, response.body
    document = response.json()
    assert document["stop_reason"] == "max_tokens"
    assert document["content"][:2] == MESSAGE["content"][:2]
    assert document["content"][2] == {**MESSAGE["content"][2], "input": {"city": "Paris"}}


def test_anthropic_unparsable_tool_input_aggregated_is_a_502(daemon: Daemon, worker: FakeWorker) -> None:
    events = anthropic_events(MESSAGE)
    bad = ev("content_block_delta", {"type": "content_block_delta", "index": 2,
                                     "delta": {"type": "input_json_delta", "partial_json": "{oops"}})
    stop = next(i for i, e in enumerate(events) if b'"content_block_stop", "index": 2' in e)
    worker.default = sse_reply([*events[:stop], bad, *events[stop:]])
    response = post(daemon, ask(), "/always/v1/messages")
    assert response.status == 502
    assert response.json()["error"]["code"] == "upstream_protocol_error"


# =============================================================================================
# Both: the worker's actual answer decides, on every upstream_stream mode
# =============================================================================================


def named_by_type(body: bytes) -> list[dict[str, Any]]:
    """Every event of a stream the sidecar wrote: each has one `event:` line, equal to its
    data's `type` (SPEC); their data, in order."""
    out = []
    for block in body.split(b"\n\n"):
        lines = block.split(b"\n")
        data = [line for line in lines if line.startswith(b"data:")]
        if not data:
            continue
        obj = json.loads(b"\n".join(line[5:] for line in data))
        names = [line for line in lines if line.startswith(b"event:")]
        assert names == [b"event: " + obj["type"].encode()], block
        out.append(obj)
    return out


def anthropic_answer(message: dict[str, Any], sse: bool) -> list[Step]:
    return sse_reply(anthropic_events(message)) if sse else json_reply(message)


def responses_answer(doc: dict[str, Any], sse: bool) -> list[Step]:
    return sse_reply(responses_events(doc, numbered=False)) if sse else json_reply(doc)


@pytest.mark.parametrize("worker_sse", [True, False], ids=["worker-sse", "worker-json"])
@pytest.mark.parametrize("client_stream", [True, False], ids=["client-stream", "client-json"])
@pytest.mark.parametrize("prefix", ["", "/never", "/always"])
@pytest.mark.parametrize("tail", ["messages", "responses"])
def test_the_workers_actual_answer_decides_on_every_mode(
    daemon: Daemon, worker: FakeWorker, tail: str, prefix: str, client_stream: bool, worker_sse: bool
) -> None:
    """SPEC: whatever was asked, the worker's actual answer (its Content-Type) decides: a
    streaming client gets named events (and, on openai-responses, numbered from 0 when the
    worker numbers nothing) ending in the stream's terminator with the cost in it; a
    non-streaming client one document with the cost and `x-sidecar-cost`; the ledger says
    what the worker answered."""
    if tail == "messages":
        worker.default = anthropic_answer(MESSAGE, worker_sse)
        body: dict[str, Any] = {**ask(), "stream": client_stream}
        cost, header = MESSAGE_COST, "0.001365"
    else:
        worker.default = responses_answer(RESPONSE, worker_sse)
        body = {"model": GPT, "input": "Hello", "stream": client_stream}
        cost, header = RESPONSE_COST, "0.000282"
    rid = request_id()
    response = post(daemon, body, f"{prefix}/v1/{tail}", headers=[("x-request-id", rid)])
    assert response.status == 200, response.body
    if client_stream:
        assert response.header("content-type") == "text/event-stream"
        assert response.header("x-sidecar-cost") is None
        events = named_by_type(response.body)
        if tail == "messages":
            assert events[-1]["type"] == "message_stop"
            (delta,) = [e for e in events if e["type"] == "message_delta"]
            assert delta["usage"]["cost"] == pytest.approx(cost)
        else:
            assert events[-1]["type"] == "response.completed"
            assert events[-1]["response"]["usage"]["cost"] == pytest.approx(cost)
            assert [e["sequence_number"] for e in events] == list(range(len(events)))
    else:
        assert response.header("x-sidecar-cost") == header
        expected = expected_message() if tail == "messages" else expected_response()
        assert response.json() == expected
    check = check_anthropic_ledger if tail == "messages" else check_responses_ledger
    check(daemon, rid, client_stream=client_stream, upstream_sse=worker_sse)


# =============================================================================================
# Both: the price rows' defaults
# =============================================================================================

#: (model, price row) -> the exact cost of MESSAGE's usage (120 input, 1000 cache read,
#: 20 cache creation, 42 output) or RESPONSE's (36 input of which 16 cached, 87 output of
#: which 40 reasoning), as SPEC's formulas give it
DEFAULT_PRICE_CASES = [
    # (120 + 1000 + 20) x 2 + 42 x 10: cached_prompt and cache_write default to prompt
    ("messages", "claude-plain", "0.0027"),
    # 120 x 2 + 1000 x 0.5 + 20 x 2 + 42 x 10: cache_write defaults to prompt, not to
    # cached_prompt; `reasoning` is not used (thinking is part of output)
    ("messages", "claude-cached", "0.0012"),
    # (36 - 16) x 1 + 16 x 1 + (87 - 40) x 2 + 40 x 2: cached at prompt, reasoning at completion
    ("responses", "gpt-plain", "0.00021"),
]


@pytest.mark.parametrize("worker_sse", [True, False], ids=["worker-sse", "worker-json"])
@pytest.mark.parametrize("client_stream", [True, False], ids=["client-stream", "client-json"])
@pytest.mark.parametrize(("tail", "model", "cost"), DEFAULT_PRICE_CASES)
def test_a_price_row_without_cache_or_reasoning_prices_uses_the_specs_defaults(
    daemon: Daemon, worker: FakeWorker, tail: str, model: str, cost: str, client_stream: bool,
    worker_sse: bool,
) -> None:
    if tail == "messages":
        worker.default = anthropic_answer({**MESSAGE, "model": model}, worker_sse)
        body: dict[str, Any] = {**ask(), "model": model, "stream": client_stream}
    else:
        worker.default = responses_answer({**RESPONSE, "model": model}, worker_sse)
        body = {"model": model, "input": "Hello", "stream": client_stream}
    rid = request_id()
    response = post(daemon, body, f"/v1/{tail}", headers=[("x-request-id", rid)])
    assert response.status == 200, response.body
    if client_stream:
        final = named_by_type(response.body)[-2 if tail == "messages" else -1]
        usage = final["usage"] if tail == "messages" else final["response"]["usage"]
    else:
        assert response.header("x-sidecar-cost") == cost
        usage = response.json()["usage"]
    assert usage["cost"] == pytest.approx(float(cost))
    record = daemon.ledger_for(rid)
    assert record["model"] == model and record["cost"] == pytest.approx(float(cost))


# =============================================================================================
# Both: no route is a 404 in the dialect's shape
# =============================================================================================


@pytest.mark.parametrize("tail", ["messages", "responses"])
def test_no_route_is_a_404_in_the_shape_of_the_paths_dialect(
    daemon: Daemon, worker: FakeWorker, tail: str
) -> None:
    """SPEC: no route -> 404, and on anthropic-messages errors before the head carry
    `not_found_error` for a 404 (the routes take POST only: a GET matches none, and the
    README gives it the shape of the first route whose path matches)."""
    with RawClient(daemon.address) as client:
        client.send(b"GET /v1/" + tail.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        response = client.read_response()
    assert response.status == 404
    obj = response.json()
    if tail == "messages":
        assert obj["type"] == "error" and obj["error"]["type"] == "not_found_error", obj
    else:
        assert set(obj) == {"error"}, obj
    assert obj["error"]["code"] and obj["error"]["message"]
    assert worker.requests == []


# =============================================================================================
# Both: every failure code reaches the SDKs as SPEC's error frame
# =============================================================================================

FAILURE_ENDINGS: dict[str, tuple[list[Step], str, str]] = {
    # failure: (what the worker does after some events, the code, the ledger outcome)
    "fin": ([Close()], "upstream_disconnected", "upstream_error"),
    "reset": ([Reset()], "upstream_disconnected", "upstream_error"),
    "broken-chunk": ([Send(b"zz\r\nnot a chunk\r\n"), Stall()], "upstream_protocol_error",
                     "upstream_error"),
    "idle": ([Stall()], "upstream_timeout", "upstream_timeout"),  # idle_timeout: 1s
    "no-terminator": ([Send(b"0\r\n\r\n")], "upstream_incomplete", "upstream_error"),
}


@pytest.mark.parametrize("failure", list(FAILURE_ENDINGS))
def test_every_failure_reaches_the_anthropic_sdk_as_an_error_event(
    daemon: Daemon, worker: FakeWorker, failure: str
) -> None:
    """The stream helper raises with the sidecar's code; the bytes end with SPEC's `event:
    error` frame and nothing after it; an aggregating client gets 502 (504 for the timeout)."""
    ending, code, outcome = FAILURE_ENDINGS[failure]
    reply = [*sse_reply(anthropic_events(MESSAGE)[:6], end=False), *ending]
    worker.reply(reply, reply, reply)
    rid = request_id()
    assert code in anthropic_stream_error(daemon, rid)[0]
    assert daemon.ledger_for(rid)["outcome"] == outcome
    response = post(daemon, {**ask(), "stream": True}, "/v1/messages")
    assert response.status == 200 and response.complete
    events = named_by_type(response.body)
    assert events[-1] == {"type": "error", "error": {
        "type": "api_error", "message": events[-1]["error"]["message"], "code": code}}
    assert response.body.endswith(b"\n\n") and response.body.count(b"event: error") == 1
    assert not any(e["type"] == "message_stop" for e in events)
    aggregated = post(daemon, ask(), "/always/v1/messages")
    assert aggregated.status == (504 if failure == "idle" else 502)
    assert aggregated.json()["error"] == {"type": "api_error", "code": code,
                                          "message": aggregated.json()["error"]["message"]}


@pytest.mark.parametrize("numbered_from", [None, 0, 7], ids=["unnumbered", "from-0", "from-7"])
@pytest.mark.parametrize("failure", list(FAILURE_ENDINGS))
def test_every_failure_reaches_the_openai_sdk_as_response_failed(
    daemon: Daemon, worker: FakeWorker, failure: str, numbered_from: int | None
) -> None:
    """The SDK yields the sidecar's `response.failed` (same id, model and created_at as the
    stream's response.created) with the failure's code, numbered after the worker's last
    event (a worker numbering from 7 keeps its numbers) or, with an unnumbered worker, every
    event from 0; an aggregating client gets 502 (504 for the timeout)."""
    ending, code, outcome = FAILURE_ENDINGS[failure]
    events = responses_events(RESPONSE, numbered=numbered_from is not None)[:7]
    if numbered_from:  # a worker whose numbers do not start at 0
        objs = [json.loads(sse_payloads(e)[0]) for e in events]
        events = [ev(o["type"], {**o, "sequence_number": numbered_from + i})
                  for i, o in enumerate(objs)]
    reply = [*sse_reply(events, end=False), *ending]
    worker.reply(reply, reply)
    rid = request_id()
    got = list(openai_client(daemon).responses.create(
        model=GPT, input="Hello", stream=True, extra_headers={"x-request-id": rid}))
    first = numbered_from or 0
    assert [e.sequence_number for e in got] == list(range(first, first + len(events) + 1))
    failed = got[-1]
    assert isinstance(failed, openai.types.responses.ResponseFailedEvent)
    assert failed.response.status == "failed"
    assert failed.response.to_dict()["error"]["code"] == code
    assert (failed.response.id, failed.response.model, failed.response.created_at) == (
        RESPONSE["id"], GPT, RESPONSE["created_at"])
    assert daemon.ledger_for(rid)["outcome"] == outcome
    aggregated = post(daemon, {"model": GPT, "input": "Hello"}, "/always/v1/responses")
    assert aggregated.status == (504 if failure == "idle" else 502)
    assert aggregated.json()["error"]["code"] == code


# =============================================================================================
# Both: heartbeats reach the SDKs as comments, events and numbering untouched
# =============================================================================================


@pytest.mark.parametrize("with_ids", [False, True], ids=["plain", "worker-ids"])
def test_heartbeats_are_comments_the_sdks_skip(daemon: Daemon, worker: FakeWorker, with_ids: bool) -> None:
    """heartbeat: 100ms on /beat: the worker pauses between events (and, JSON -> SSE, before
    its document): the SDKs read every event as the worker meant it and ignore the
    heartbeats, also once a worker `id:` line set a last event ID."""
    def paused(events: list[bytes]) -> list[Step]:
        if with_ids:
            events = [b"id: %d\n" % i + e for i, e in enumerate(events)]
        steps = sse_reply(events[:2], end=False)
        for e in events[2:5]:
            steps += [Sleep(0.3), Send(chunk(e))]
        return [*steps, *(Send(chunk(e)) for e in events[5:]), Send(LAST_CHUNK)]

    worker.reply(paused(anthropic_events(MESSAGE)))
    raw = post(daemon, {**ask(), "stream": True}, "/beat/v1/messages")
    assert b": keep-alive" in raw.body
    worker.reply(paused(anthropic_events(MESSAGE)))
    with anthropic_client(daemon, "/beat").messages.stream(**ask()) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[-1] == "message_stop" and [b.to_dict() for b in final.content] == MESSAGE["content"]

    worker.reply(paused(responses_events(RESPONSE, numbered=False)))
    events = list(openai_client(daemon, "/beat").responses.create(model=GPT, input="Hello", stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.completed"
    assert events[-1].response.to_dict() == expected_response()

    document = json.dumps(RESPONSE).encode()
    worker.reply([Send(response_head(200, [("content-type", "application/json"),
                                           ("content-length", str(len(document)))])),
                  Sleep(0.4), Send(document)])
    with openai_client(daemon, "/beat").responses.stream(model=GPT, input="Hello") as stream:
        numbers = [e.sequence_number for e in stream]
        final_response = stream.get_final_response()
    assert numbers == list(range(len(numbers)))
    assert final_response.output_text == "Hi! What can I do for you?"


# =============================================================================================
# Both: metrics
# =============================================================================================


def test_metrics_count_these_dialects_tokens_cost_outcomes_and_error_codes(
    daemon: Daemon, worker: FakeWorker
) -> None:
    """SPEC's /metrics: tokens by model and kind (Anthropic's prompt is input + cache read +
    cache creation, its cache read `cached` and its creation `cache_write`; Responses' cached
    and reasoning from the details), cost by model, requests by route and outcome, upstream
    errors by code. Models of their own, so that the counters are this test's alone."""
    def samples() -> dict[Any, float]:
        return metric_samples(metrics_text(daemon))

    before = samples()
    worker.default = anthropic_worker({**MESSAGE, "model": "claude-metrics"})
    post(daemon, {**ask(), "stream": True}, "/v1/messages")
    post(daemon, ask(), "/v1/messages")
    worker.default = responses_worker({**RESPONSE, "model": "gpt-metrics"})
    post(daemon, {"model": GPT, "input": "Hello", "stream": True}, "/v1/responses")
    worker.default = anthropic_worker({**MESSAGE, "model": "claude-metrics"}, cut_after=6)
    post(daemon, {**ask(), "stream": True}, "/v1/messages")
    after = samples()

    def grew(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    tokens = "sidecar_tokens_total"
    # two whole anthropic requests and one cut after message_start (its usage counts: the
    # ledger records what was seen)
    assert grew(tokens, model="claude-metrics", kind="prompt") == 3 * (120 + 1000 + 20)
    assert grew(tokens, model="claude-metrics", kind="cached") == 3 * 1000
    assert grew(tokens, model="claude-metrics", kind="cache_write") == 3 * 20
    assert grew(tokens, model="claude-metrics", kind="reasoning") == 0
    assert grew(tokens, model="gpt-metrics", kind="prompt") == 36
    assert grew(tokens, model="gpt-metrics", kind="cached") == 16
    assert grew(tokens, model="gpt-metrics", kind="completion") == 87
    assert grew(tokens, model="gpt-metrics", kind="reasoning") == 40
    assert grew("sidecar_cost_total", model="gpt-metrics", currency="USD") == pytest.approx(RESPONSE_COST)
    assert grew("sidecar_cost_total", model="claude-metrics", currency="USD") >= 2 * MESSAGE_COST
    requests = "sidecar_requests_total"
    assert grew(requests, route="anthropic-messages-auto", outcome="ok", status="200") == 2
    assert grew(requests, route="anthropic-messages-auto", outcome="upstream_error", status="200") == 1
    assert grew(requests, route="openai-responses-auto", outcome="ok", status="200") == 1
    assert grew("sidecar_upstream_errors_total", code="upstream_disconnected") == 1


# =============================================================================================
# Both: an event that nothing names is not passed on
# =============================================================================================


@pytest.mark.parametrize("tail", ["messages", "responses"])
def test_an_event_nothing_names_is_not_passed_on(daemon: Daemon, worker: FakeWorker, tail: str) -> None:
    """A worker event with no `event:` line and no `type` in its data (`data: {}`) would go
    out unnamed (SPEC: every event sidecar writes has an `event:` line equal to its data's
    `type`) and, from a worker that numbers nothing, unnumbered (SPEC: sidecar numbers
    every event it writes from 0); the openai SDK would yield it as an event whose type is
    None. It is not passed on; its `id:` line reaches the client with the next event."""
    odd = b"id: 7\ndata: {}\n\n"
    events = anthropic_events(MESSAGE) if tail == "messages" else responses_events(RESPONSE, numbered=False)
    stream = [*events[:3], odd, *events[3:]]
    worker.reply(sse_reply(stream), sse_reply(stream))
    body: dict[str, Any] = {**ask(), "stream": True} if tail == "messages" else \
        {"model": GPT, "input": "Hello", "stream": True}
    response = post(daemon, body, f"/v1/{tail}")
    assert response.status == 200
    assert b"data: {}" not in response.body and b"id: 7\nevent: " in response.body
    written = named_by_type(response.body)
    assert len(written) == len(events)
    if tail == "messages":
        with anthropic_client(daemon).messages.stream(**ask()) as stream_helper:
            final = stream_helper.get_final_message()
        assert [b.to_dict() for b in final.content] == MESSAGE["content"]
    else:
        assert [e["sequence_number"] for e in written] == list(range(len(events)))
        got = list(openai_client(daemon).responses.create(model=GPT, input="Hello", stream=True))
        assert all(e.type for e in got) and [e.sequence_number for e in got] == list(range(len(events)))
