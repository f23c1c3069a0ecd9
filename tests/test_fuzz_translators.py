"""Fuzzed JSON translators (issue 9): hostile worker events and documents, hostile requests.

The SSE parser, chunked decoder and config loader have their own fuzz tests
(tests/test_sse.py, tests/test_chunked.py, tests/test_config.py); the dialect
round trips on well-formed data are in tests/test_dialect_*.py. Here every
dialect's `StreamTranslator.feed` gets arbitrary SSE events carrying arbitrary
JSON (and JSON shaped like the dialect's own, with the wrong types in the
right places), its `DocumentTranslator` arbitrary documents, and `plan`
arbitrary request bodies:

- no exception escapes but the documented ones (`StreamProtocolError`,
  `sidecar.sse.SSEProtocolError`; `BadRequest` for requests);
- what they return is well formed: relay output is whole SSE events, an
  aggregated document and `DocumentTranslator.json()` are JSON, the error frame
  can always be written and is one event;
- memory stays bounded: relay-mode state does not grow with the number of
  events (openai, anthropic), or grows only with the content it must keep for
  the error frame (openai-responses); peak memory per event is a small multiple
  of the event's size.

An atheris run (bounded: ATHERIS_RUNS inputs, default 20,000, at most 30 s, a few seconds)
drives the SSE parser and the openai-chat translator with coverage guidance
when atheris is installed (it is skipped otherwise).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tracemalloc
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar import failures
from sidecar.config import Price, Pricing
from sidecar.dialects import get_dialect
from sidecar.dialects.base import RequestPlan
from sidecar.dialects.jsonio import BadRequest, StreamProtocolError
from sidecar.sse import Event, SSEParser, SSEProtocolError, encode_event

REPO = Path(__file__).resolve().parent.parent

DIALECTS = ("openai-chat", "openai-completions", "anthropic-messages", "openai-responses")
ALLOWED = (StreamProtocolError, SSEProtocolError)
PRICING = Pricing(
    "USD",
    {"m": Price(Decimal("1"), Decimal("2"), Decimal("0.5"), Decimal("4"), Decimal("3")),
     "free": Price(Decimal("0"), Decimal("0"))},
    None,
)
FAILURES = (failures.UPSTREAM_DISCONNECTED, failures.UPSTREAM_TIMEOUT,
            failures.UPSTREAM_PROTOCOL_ERROR, failures.UPSTREAM_INCOMPLETE)

# =============================================================================================
# Strategies: arbitrary JSON, and JSON in the dialects' own shapes with anything inside
# =============================================================================================

KEYS = [
    # openai
    "id", "object", "created", "model", "choices", "index", "delta", "message", "content",
    "reasoning_content", "reasoning", "tool_calls", "function", "name", "arguments", "type",
    "finish_reason", "usage", "prompt_tokens", "completion_tokens", "total_tokens",
    "prompt_tokens_details", "cached_tokens", "completion_tokens_details", "reasoning_tokens",
    "logprobs", "text", "error", "code", "role", "stop_reason", "timings",
    # anthropic
    "content_block", "partial_json", "thinking", "signature", "citation", "input", "input_tokens",
    "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "stop_sequence",
    # responses
    "response", "output", "output_index", "item", "item_id", "content_index", "summary_index",
    "part", "sequence_number", "input_tokens_details", "output_tokens_details", "status",
    "summary", "refusal", "created_at", "incomplete_details",
]
TYPES = [
    "message_start", "content_block_start", "content_block_delta", "content_block_stop",
    "message_delta", "message_stop", "ping", "error", "text_delta", "thinking_delta",
    "input_json_delta", "signature_delta", "citations_delta", "text", "thinking", "tool_use",
    "response.created", "response.in_progress", "response.queued", "response.output_item.added",
    "response.output_item.done", "response.content_part.added", "response.output_text.delta",
    "response.refusal.delta", "response.reasoning_text.delta",
    "response.reasoning_summary_text.delta", "response.reasoning_summary_part.added",
    "response.function_call_arguments.delta", "response.custom_tool_call_input.delta",
    "response.completed", "response.incomplete", "response.failed", "message", "function_call",
    "output_text", "reasoning", "chat.completion.chunk", "text_completion",
]

_scalars = (
    st.none() | st.booleans()
    | st.integers(-(2**63), 2**64)  # past int64: orjson refuses to parse some of these
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20) | st.sampled_from(TYPES) | st.sampled_from(["", "m", "free", "stop"])
    # lone UTF-16 surrogates too, which the stdlib writes as escapes (`"\\ud83d"`): JSON that
    # orjson refuses and the dialects read all the same (a JavaScript gateway's cut emoji)
    | st.text(st.characters(exclude_categories=()), max_size=6)
)
_keys = st.sampled_from(KEYS) | st.text(max_size=8)
json_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=6),
    max_leaves=40,
)


@st.composite
def shaped(draw: st.DrawFn, depth: int = 0) -> Any:
    """A dict in the dialects' vocabulary (known keys, known type names) with anything inside."""
    obj: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=7, unique=True)):
        if key == "type":
            obj[key] = draw(st.sampled_from(TYPES) | _scalars)
        elif depth < 3 and draw(st.booleans()):
            inner = shaped(depth + 1)
            obj[key] = draw(inner | st.lists(inner, max_size=3))
        else:
            obj[key] = draw(json_values)
    return obj


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()  # the stdlib writes integers of any size


payloads = st.one_of(
    shaped().map(json.dumps),
    json_values.map(json.dumps),
    st.just("[DONE]"),
    st.text(max_size=40),  # not JSON at all (or JSON by accident)
)
events = st.builds(
    lambda data, name: Event(data=data, event=name,
                             raw=encode_event(data, event=name) if data is not None else b": c\n\n"),
    payloads | st.none(),
    st.none() | st.sampled_from(TYPES) | st.text(max_size=10).filter(lambda t: "\n" not in t and "\r" not in t),
)


def plan_for(name: str, client_stream: bool, include_usage: bool, model: str | None) -> RequestPlan:
    body: dict[str, Any] = {"stream": client_stream}
    if model is not None:
        body["model"] = model
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return get_dialect(name).plan(orjson.dumps(body), "always", "req-1")


plans = st.sampled_from(DIALECTS).flatmap(
    lambda name: st.tuples(st.just(name), st.builds(
        plan_for, st.just(name), st.booleans(), st.booleans(),
        st.none() | st.sampled_from(["m", "free", "unpriced"]))))


def assert_whole_events(data: bytes) -> None:
    """`data` is zero or more whole SSE events (a parser keeps nothing back)."""
    parser = SSEParser(1 << 24)
    parser.feed(data)
    assert not parser.has_partial, data[-200:]


def assert_error_frame(frame: bytes) -> None:
    """Whole events, each a JSON object: the error event, after a synthesized
    `response.created` when a Responses stream had not told the client its response yet."""
    parser = SSEParser(1 << 24)
    out = [orjson.loads(e.data) for e in parser.feed(frame) if e.data is not None]
    assert not parser.has_partial, frame
    assert all(isinstance(obj, dict) for obj in out), frame
    assert len(out) == 1 or (len(out) == 2 and out[0].get("type") == "response.created"), frame


# =============================================================================================
# Hypothesis
# =============================================================================================

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(plans, st.booleans(), st.lists(events, max_size=25), st.sampled_from(FAILURES))
def test_stream_translators_take_any_events(
    named_plan: tuple[str, RequestPlan], aggregate: bool, stream: list[Event],
    failure: failures.Failure,
) -> None:
    name, plan = named_plan
    translator = get_dialect(name).stream(plan, PRICING, aggregate=aggregate)
    failed = False
    for event in stream:
        try:
            out = translator.feed(event)
        except ALLOWED:
            failed = True
            break
        if aggregate:
            assert out is None
        elif out is not None:
            assert isinstance(out, bytes)
            assert_whole_events(out)
    # whatever happened, the daemon can always end the stream with its error frame
    assert_error_frame(translator.error_frame(failure, "the worker went away"))
    if aggregate and not failed and (translator.complete or translator.worker_error):
        try:
            document = translator.document()
        except ALLOWED:
            return
        assert isinstance(orjson.loads(document), dict)
    assert translator.cost is None or isinstance(translator.cost, Decimal)


@FUZZ
@given(st.sampled_from(DIALECTS), st.booleans(), st.lists(events, max_size=25),
       st.lists(st.integers(1, 64), min_size=1, max_size=8))
def test_parser_and_translator_together_under_any_chunking(
    name: str, aggregate: bool, stream: list[Event], cuts: list[int]
) -> None:
    """The bytes go through the real SSE parser in arbitrary pieces, as the daemon does."""
    plan = plan_for(name, not aggregate, True, "m")
    translator = get_dialect(name).stream(plan, PRICING, aggregate=aggregate)
    parser = SSEParser(4096)
    data = b"".join(e.raw for e in stream)
    pos = 0
    i = 0
    try:
        while pos < len(data):
            piece = data[pos : pos + cuts[i % len(cuts)]]
            pos += len(piece)
            i += 1
            for event in parser.feed(piece):
                out = translator.feed(event)
                if out is not None:
                    assert_whole_events(out)
    except ALLOWED:
        pass
    assert_error_frame(translator.error_frame(failures.UPSTREAM_INCOMPLETE, "cut"))


@FUZZ
@given(plans, st.one_of(json_values.map(_json_bytes), shaped().map(_json_bytes),
                        st.binary(max_size=60)))
def test_document_translators_take_any_document(
    named_plan: tuple[str, RequestPlan], body: bytes
) -> None:
    name, plan = named_plan
    try:
        translator = get_dialect(name).document(plan, PRICING, body)
    except ALLOWED:
        return
    assert isinstance(orjson.loads(translator.json()), dict)
    sse = translator.sse()
    assert_whole_events(sse)
    parsed = [e for e in SSEParser(1 << 24).feed(sse) if e.data is not None]
    assert parsed, sse
    for event in parsed:
        if event.data != "[DONE]":
            orjson.loads(event.data)


@FUZZ
@given(st.sampled_from(DIALECTS), st.sampled_from(["auto", "always", "never"]),
       st.one_of(json_values.map(_json_bytes), shaped().map(_json_bytes), st.binary(max_size=60)))
def test_request_plans_take_any_body(name: str, mode: str, body: bytes) -> None:
    try:
        plan = get_dialect(name).plan(body, mode, "req-1")
    except BadRequest:
        return
    forwarded = orjson.loads(plan.body)
    assert isinstance(forwarded, dict)
    asked = {"auto": plan.client_stream, "always": True, "never": False}[mode]
    assert plan.asked_stream is asked
    assert forwarded.get("stream", False) is asked
    if name.startswith("openai-") and name != "openai-responses":
        assert ("stream_options" in forwarded) is asked
    else:
        assert "stream_options" not in forwarded or orjson.loads(body).get("stream_options") is not None


# =============================================================================================
# Systematic: one field of a well-formed stream or document at a time, of the wrong type
# =============================================================================================
# Random shapes seldom make a well-formed stream with one field wrong, which is what a buggy
# worker sends. Here every field (at every depth) of every event of a good stream, and of a
# good document, is in turn replaced by a value of each other JSON type, or removed.

_GOOD_STREAMS: dict[str, list[Any]] = {
    "openai-chat": [
        {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"content": "hi", "reasoning_content": "r", "tool_calls": [
             {"index": 0, "id": "t", "type": "function", "function": {"name": "f", "arguments": "{"}}]},
             "logprobs": {"content": [{"token": "hi", "logprob": -1.0}]}, "finish_reason": None}]},
        {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]},
                      "finish_reason": "tool_calls"}],
         "usage": {"prompt_tokens": 1, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 1},
                   "completion_tokens_details": {"reasoning_tokens": 1}}},
        "[DONE]",
    ],
    "openai-completions": [
        {"id": "c", "object": "text_completion", "created": 1, "model": "m",
         "choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": None}]},
        {"id": "c", "object": "text_completion", "created": 1, "model": "m",
         "choices": [{"index": 0, "text": "", "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 1, "completion_tokens": 2}},
        "[DONE]",
    ],
    "anthropic-messages": [
        {"type": "message_start", "message": {"id": "msg", "type": "message", "role": "assistant",
                                              "model": "m", "content": [], "usage": {"input_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1,
         "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
         "usage": {"output_tokens": 2, "cache_read_input_tokens": 1}},
        {"type": "message_stop"},
    ],
    "openai-responses": [
        {"type": "response.created", "sequence_number": 0, "response": {
            "id": "r", "object": "response", "created_at": 1, "model": "m", "status": "in_progress",
            "output": []}},
        {"type": "response.output_item.added", "sequence_number": 1, "output_index": 0,
         "item": {"type": "message", "id": "i", "role": "assistant", "content": []}},
        {"type": "response.content_part.added", "sequence_number": 2, "output_index": 0,
         "content_index": 0, "part": {"type": "output_text", "text": ""}},
        {"type": "response.output_text.delta", "sequence_number": 3, "output_index": 0,
         "content_index": 0, "delta": "hi"},
        {"type": "response.output_item.done", "sequence_number": 4, "output_index": 0,
         "item": {"type": "message", "id": "i", "role": "assistant",
                  "content": [{"type": "output_text", "text": "hi"}]}},
        {"type": "response.completed", "sequence_number": 5, "response": {
            "id": "r", "object": "response", "created_at": 1, "model": "m", "status": "completed",
            "output": [], "usage": {"input_tokens": 1, "output_tokens": 2}}},
    ],
}
_GOOD_DOCUMENTS: dict[str, dict[str, Any]] = {
    "openai-chat": {
        "id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi", "reasoning_content": "r",
                                             "tool_calls": [{"id": "t", "type": "function",
                                                             "function": {"name": "f", "arguments": "{}"}}]},
                     "logprobs": {"content": [{"token": "hi", "logprob": -1.0}]}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 1}}},
    "openai-completions": {
        "id": "c", "object": "text_completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2}},
    "anthropic-messages": {
        "id": "msg", "type": "message", "role": "assistant", "model": "m",
        "content": [{"type": "text", "text": "hi"}, {"type": "thinking", "thinking": "t", "signature": "s"},
                    {"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}}],
        "stop_reason": "end_turn", "usage": {"input_tokens": 1, "output_tokens": 2, "cache_read_input_tokens": 1}},
    "openai-responses": {
        "id": "r", "object": "response", "created_at": 1, "model": "m", "status": "completed",
        "output": [{"type": "message", "id": "i", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": "hi", "annotations": []}]},
                   {"type": "reasoning", "id": "rs", "summary": [{"type": "summary_text", "text": "s"}]},
                   {"type": "function_call", "id": "fc", "call_id": "c", "name": "f", "arguments": "{}"}],
        "usage": {"input_tokens": 1, "output_tokens": 2, "input_tokens_details": {"cached_tokens": 1}}},
}
#: streams that end in the worker's own failure, whose error objects get the wrong types too
_FAILED_STREAMS: dict[str, list[Any]] = {
    "openai-chat": [
        _GOOD_STREAMS["openai-chat"][0],
        {"error": {"message": "boom", "type": "server_error", "code": 500}},
    ],
    "openai-completions": [
        _GOOD_STREAMS["openai-completions"][0],
        {"error": {"message": "boom", "type": "server_error", "code": 500}},
    ],
    "anthropic-messages": [
        _GOOD_STREAMS["anthropic-messages"][0],
        {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
    ],
    "openai-responses": [
        _GOOD_STREAMS["openai-responses"][0],
        {"type": "response.failed", "sequence_number": 1, "response": {
            "id": "r", "object": "response", "created_at": 1, "model": "m", "status": "failed",
            "output": [], "error": {"code": "server_error", "message": "boom"},
            "usage": {"input_tokens": 1, "output_tokens": 0}}},
    ],
}
_STREAMS = [
    *(pytest.param(name, stream, id=name) for name, stream in _GOOD_STREAMS.items()),
    *(pytest.param(name, stream, id=f"{name}-failed") for name, stream in _FAILED_STREAMS.items()),
]
_REMOVED = object()
# each other JSON type, a negative and a huge index, the largest integer orjson reads as one
# and one past 64 bits (read exactly, as the worker wrote it: see sidecar.dialects.jsonio), a
# string of digits, and lists shaped like indexed deltas
_WRONG: list[Any] = [[1], {"a": 1}, None, 1.5, True, "x", -1, 2**62, 2**64 - 1, 10**30, "5",
                     [{"index": [1]}], [{"index": "a"}, {"index": 0}], [{"index": 10**9}], _REMOVED]


def _json_text(value: Any) -> str:
    """`value` as JSON: orjson's, or the standard library's for an integer past 64 bits."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place inside a JSON value (the value itself first)."""
    found = [prefix]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        found += _paths(inner, (*prefix, key))
    return found


def _mutated(value: Any, path: tuple[Any, ...], wrong: Any) -> Any:
    """A copy of `value` with the thing at `path` replaced by `wrong` (or removed)."""
    if not path:
        return {} if wrong is _REMOVED else wrong
    copy = orjson.loads(orjson.dumps(value))
    parent = copy
    for key in path[:-1]:
        parent = parent[key]
    if wrong is _REMOVED:
        del parent[path[-1]]
    else:
        parent[path[-1]] = wrong
    return copy


def _stream_event(name: str, payload: Any) -> Event:
    data = payload if isinstance(payload, str) else _json_text(payload)
    kind = payload.get("type") if isinstance(payload, dict) else None
    if name.startswith("openai-c") or not isinstance(kind, str) or "\n" in kind or "\r" in kind:
        kind = None
    return Event(data=data, event=kind, raw=encode_event(data, event=kind))


@pytest.mark.parametrize(("name", "good"), _STREAMS)
@pytest.mark.parametrize("aggregate", [False, True])
def test_stream_translators_take_every_field_of_the_wrong_type(
    name: str, good: list[Any], aggregate: bool
) -> None:
    plan = plan_for(name, not aggregate, True, "m")
    for at, event in enumerate(good):
        for path in _paths(event):
            for wrong in _WRONG:
                stream = [*good[:at], _mutated(event, path, wrong), *good[at + 1 :]]
                translator = get_dialect(name).stream(plan, PRICING, aggregate=aggregate)
                try:
                    for payload in stream:
                        out = translator.feed(_stream_event(name, payload))
                        if out is not None:
                            assert_whole_events(out)
                    if aggregate and (translator.complete or translator.worker_error):
                        assert isinstance(orjson.loads(translator.document()), dict)
                except ALLOWED:
                    continue
                assert_error_frame(translator.error_frame(failures.UPSTREAM_INCOMPLETE, "cut"))


@pytest.mark.parametrize("name", DIALECTS)
@pytest.mark.parametrize("client_stream", [False, True])
def test_document_translators_take_every_field_of_the_wrong_type(name: str, client_stream: bool) -> None:
    good = _GOOD_DOCUMENTS[name]
    plan = plan_for(name, client_stream, True, "m")
    for path in _paths(good):
        for wrong in _WRONG:
            try:
                translator = get_dialect(name).document(
                    plan, PRICING, _json_text(_mutated(good, path, wrong)).encode()
                )
            except ALLOWED:
                continue
            assert isinstance(orjson.loads(translator.json()), dict)
            assert_whole_events(translator.sse())


# =============================================================================================
# Memory
# =============================================================================================


def _chat_chunk(i: int) -> bytes:
    obj = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": {"content": f"tok{i} " * 8}, "finish_reason": None}],
           "usage": {"prompt_tokens": 5, "completion_tokens": i, "total_tokens": 5 + i}}
    return orjson.dumps(obj)


def _completion_chunk(i: int) -> bytes:
    obj = {"id": "c", "object": "text_completion", "created": 1, "model": "m",
           "choices": [{"index": 0, "text": f"tok{i} " * 8, "finish_reason": None}]}
    return orjson.dumps(obj)


def _anthropic_delta(i: int) -> bytes:
    obj = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"tok{i} " * 8}}
    return orjson.dumps(obj)


def _responses_delta(i: int) -> bytes:
    obj = {"type": "response.output_text.delta", "item_id": "msg", "output_index": 0,
           "content_index": 0, "delta": f"tok{i} " * 8, "sequence_number": i + 3}
    return orjson.dumps(obj)


_PRELUDE: dict[str, list[bytes]] = {
    "anthropic-messages": [
        orjson.dumps({"type": "message_start", "message": {"id": "msg", "type": "message", "role": "assistant",
                                                           "model": "m", "content": [],
                                                           "usage": {"input_tokens": 3}}}),
        orjson.dumps({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ],
    "openai-responses": [
        orjson.dumps({"type": "response.created", "sequence_number": 0,
                      "response": {"id": "r", "object": "response", "model": "m", "created_at": 1,
                                   "status": "in_progress", "output": []}}),
        orjson.dumps({"type": "response.output_item.added", "output_index": 0, "sequence_number": 1,
                      "item": {"type": "message", "id": "msg", "role": "assistant", "content": []}}),
        orjson.dumps({"type": "response.content_part.added", "output_index": 0, "content_index": 0,
                      "item_id": "msg", "sequence_number": 2,
                      "part": {"type": "output_text", "text": "", "annotations": []}}),
    ],
}
_BODY = {"openai-chat": _chat_chunk, "openai-completions": _completion_chunk,
         "anthropic-messages": _anthropic_delta, "openai-responses": _responses_delta}


def _event(data: bytes) -> Event:
    text = data.decode()
    kind = orjson.loads(data).get("type")
    return Event(data=text, event=kind, raw=encode_event(text, event=kind))


def _relay_growth(name: str, count: int) -> tuple[int, int]:
    """(traced bytes held by a relay translator after `count` content events, content bytes)."""
    plan = plan_for(name, True, True, "m")
    prelude = [_event(d) for d in _PRELUDE.get(name, [])]
    body = [_event(_BODY[name](i)) for i in range(count)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        translator = get_dialect(name).stream(plan, PRICING, aggregate=False)
        for event in prelude:
            translator.feed(event)
        for event in body:
            translator.feed(event)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del translator
    content = count * len("tok0 " * 8)
    return held, content


@pytest.mark.parametrize("name", ["openai-chat", "openai-completions", "anthropic-messages"])
def test_relay_state_does_not_grow_with_the_stream(name: str) -> None:
    small, _ = _relay_growth(name, 200)
    large, content = _relay_growth(name, 4000)
    assert large - small < 32 * 1024, (
        f"{name}: relaying 3800 more events kept {large - small} more bytes ({content} bytes of content)")


def test_responses_relay_keeps_only_the_output_it_needs() -> None:
    """openai-responses keeps the output so far (its error frame carries it): linear, small factor."""
    small, small_content = _relay_growth("openai-responses", 200)
    large, large_content = _relay_growth("openai-responses", 4000)
    per_byte = (large - small) / (large_content - small_content)
    assert per_byte < 4, f"{per_byte:.1f} bytes kept per byte of content"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans, st.booleans(), st.lists(events, min_size=1, max_size=10))
def test_peak_memory_is_a_small_multiple_of_the_input(
    named_plan: tuple[str, RequestPlan], aggregate: bool, stream: list[Event]
) -> None:
    name, plan = named_plan
    size = sum(len(e.raw) for e in stream)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        translator = get_dialect(name).stream(plan, PRICING, aggregate=aggregate)
        try:
            for event in stream:
                translator.feed(event)
            if aggregate and (translator.complete or translator.worker_error):
                translator.document()
        except ALLOWED:
            pass
        translator.error_frame(failures.UPSTREAM_DISCONNECTED, "x")
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak <= 64 * size + 256 * 1024, f"peak {peak} bytes for {size} bytes of events"


def test_an_event_that_never_ends_is_cut_at_max_event_size() -> None:
    """What the daemon feeds a translator is bounded by the parser: an endless event fails."""
    parser = SSEParser(64 * 1024)
    gc.collect()
    tracemalloc.start()
    try:
        with pytest.raises(SSEProtocolError):
            parser.feed(b"data: {")
            for _ in range(10_000):
                parser.feed(b"x" * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak


# =============================================================================================
# atheris (coverage-guided), bounded
# =============================================================================================

#: Runs in a fresh interpreter so that only sidecar's parser and dialect code is instrumented
#: (instrumenting hypothesis and pytest as well would cost minutes).
ATHERIS_SCRIPT = """
import sys
import atheris

with atheris.instrument_imports(include=["sidecar"]):
    from sidecar import failures
    from sidecar.config import Pricing
    from sidecar.dialects import get_dialect
    from sidecar.dialects.jsonio import StreamProtocolError
    from sidecar.sse import SSEParser, SSEProtocolError

DIALECT = get_dialect("openai-chat")
PLAN = DIALECT.plan(b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}',
                    "auto", "req-1")


def target(data):
    # bytes in pieces through the SSE parser into the openai-chat translator, relay or aggregate
    translator = DIALECT.stream(PLAN, Pricing(), aggregate=len(data) % 2 == 0)
    parser = SSEParser(4096)
    step = 1 + (data[0] % 17 if data else 0)
    try:
        for i in range(0, len(data), step):
            for event in parser.feed(data[i : i + step]):
                translator.feed(event)
        if translator.aggregate and (translator.complete or translator.worker_error):
            translator.document()
    except (StreamProtocolError, SSEProtocolError):
        pass
    translator.error_frame(failures.UPSTREAM_DISCONNECTED, "x")


atheris.Setup(sys.argv, target)
atheris.Fuzz()
"""
#: Seeds: a real stream, so that the fuzzer starts inside the translator's paths.
ATHERIS_SEEDS = [
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}\n\n'
    b'data: {"id":"c","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"t","function":'
    b'{"name":"f","arguments":"{}"}}]},"finish_reason":"stop"}],"usage":{"prompt_tokens":1}}\n\n'
    b"data: [DONE]\n\n",
    b": keep-alive\r\n\r\nevent: error\ndata: {\"error\":{\"message\":\"x\"}}\n\n",
]


def test_atheris_sse_parser_and_openai_translator(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    runs = os.environ.get("ATHERIS_RUNS", "20000")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(ATHERIS_SEEDS):
        (corpus / f"seed{i}").write_bytes(seed)
    result = subprocess.run(
        [sys.executable, "-c", ATHERIS_SCRIPT, f"-runs={runs}", "-max_len=4096",
         "-max_total_time=30", str(corpus)],
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    tail = (result.stdout + result.stderr)[-3000:]
    assert result.returncode == 0, tail
    assert "Done" in tail, tail


@pytest.mark.parametrize("name", DIALECTS)
def test_a_document_with_escaped_surrogates_makes_events_every_reader_takes(name: str) -> None:
    """A worker's document may escape a lone UTF-16 surrogate (`\\udf74`) or a pair's halves
    (JSON's grammar allows both). The events made from it (JSON -> SSE) carry each pair as its
    character and a lone half as U+FFFD, as the JSON answer does: JSON orjson reads too (found
    by `test_document_translators_take_any_document`)."""
    body = (rb'{"id":"\udf74","model":"m","type":"message","role":"assistant",'
            rb'"content":[{"type":"text","text":"a\udf74\ud83d\ude00"}],'
            rb'"choices":[{"index":0,"message":{"role":"assistant","content":"a\udf74\ud83d\ude00"},'
            rb'"text":"a\udf74\ud83d\ude00","finish_reason":"stop"}],"output":[]}')
    translator = get_dialect(name).document(plan_for(name, True, False, "m"), PRICING, body)
    document = orjson.loads(translator.json())
    assert document["id"] == "\ufffd"
    events = [e.data for e in SSEParser(1 << 24).feed(translator.sse()) if e.data not in (None, "[DONE]")]
    assert events
    texts = [orjson.loads(data) for data in events]  # each event's data: JSON orjson reads
    assert "\\u" not in "".join(events)  # (no escape is left for a reader to refuse)
    assert any("a\ufffd\U0001f600" in orjson.dumps(t).decode() for t in texts), events
