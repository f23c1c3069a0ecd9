"""The anthropic-messages dialect, driven with real SSE bytes through sidecar's own parser."""

from __future__ import annotations

import json
from decimal import Decimal
from itertools import pairwise
from types import MappingProxyType
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import failures
from sidecar.config import Price, Pricing
from sidecar.dialects import get_dialect
from sidecar.dialects.base import RequestPlan
from sidecar.dialects.jsonio import BadRequest, StreamProtocolError
from sidecar.sse import Event, SSEParser

DIALECT = get_dialect("anthropic-messages")
MODEL = "claude-like"
PRICING = Pricing(
    models=MappingProxyType(
        {MODEL: Price(Decimal("3"), Decimal("15"), cached_prompt=Decimal("0.3"), cache_write=Decimal("3.75"))}
    )
)


def ev(kind: str, obj: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(obj)}\n\n".encode()


def worker_stream(*, usage_start: dict[str, Any] | None = None, usage_end: dict[str, Any] | None = None) -> list[bytes]:
    """A Messages stream as the Anthropic API sends it (with a ping)."""
    start_usage = usage_start if usage_start is not None else {"input_tokens": 25, "output_tokens": 1}
    end_usage = usage_end if usage_end is not None else {"output_tokens": 15}
    return [
        ev(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_01",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": MODEL,
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": start_usage,
                },
            },
        ),
        ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ev("ping", {"type": "ping"}),
        ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
        ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}}),
        ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ev(
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": end_usage},
        ),
        ev("message_stop", {"type": "message_stop"}),
    ]


def plan(client_stream: bool = True, model: str | None = MODEL, mode: str = "auto") -> RequestPlan:
    body: dict[str, Any] = {"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    if model is not None:
        body["model"] = model
    if client_stream:
        body["stream"] = True
    return DIALECT.plan(orjson.dumps(body), mode, "req1")


def parse(data: bytes) -> list[Event]:
    return SSEParser().feed(data)


def relay(chunks: list[bytes], pricing: Pricing = PRICING) -> tuple[list[bytes | None], Any]:
    translator = DIALECT.stream(plan(), pricing, aggregate=False)
    out = [translator.feed(e) for e in parse(b"".join(chunks))]
    return out, translator


def aggregate(data: bytes, pricing: Pricing = PRICING, p: RequestPlan | None = None) -> Any:
    translator = DIALECT.stream(p or plan(client_stream=False), pricing, aggregate=True)
    for e in parse(data):
        assert translator.feed(e) is None
    return translator


def names_match_types(data: bytes) -> None:
    for e in parse(data):
        if e.data is not None:
            assert e.event == json.loads(e.data)["type"]


# -- relay -----------------------------------------------------------------------------------


def test_relay_passes_every_event_raw_except_the_priced_message_delta() -> None:
    chunks = worker_stream()
    out, t = relay(chunks)
    for i, (sent, got) in enumerate(zip(chunks, out, strict=True)):
        if i == 6:
            assert got is not None and got != sent
            (event,) = parse(got)
            assert event.event == "message_delta"
            obj = json.loads(event.data or "")
            assert obj["usage"] == {"output_tokens": 15, "cost": pytest.approx((25 * 3 + 15 * 15) / 1e6)}
            assert obj["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
        else:
            assert got == sent  # the same bytes, not re-encoded
    assert t.complete and not t.worker_error
    assert t.cost == Decimal(25 * 3 + 15 * 15) / Decimal(10**6)
    assert t.usage.prompt_tokens == 25 and t.usage.completion_tokens == 15 and not t.usage.estimated
    assert t.model == MODEL


def test_unpriced_model_passes_every_event_untouched() -> None:
    chunks = worker_stream()
    out, t = relay(chunks, Pricing())
    assert out == chunks
    assert t.cost is None and t.complete


def test_complete_only_after_message_stop() -> None:
    chunks = worker_stream()
    t = DIALECT.stream(plan(), PRICING, aggregate=False)
    for e in parse(b"".join(chunks[:-1])):
        t.feed(e)
    assert not t.complete  # message_delta with a stop_reason is not the end
    (stop,) = parse(chunks[-1])
    t.feed(stop)
    assert t.complete


def test_usage_largest_value_per_field_wins() -> None:
    start = {"input_tokens": 40, "output_tokens": 1, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 7}
    end = {"input_tokens": 3, "output_tokens": 50, "cache_read_input_tokens": 0}
    _, t = relay(worker_stream(usage_start=start, usage_end=end))
    u = t.usage
    assert (u.input_tokens_uncached, u.cached_tokens, u.cache_write_tokens) == (40, 100, 7)
    assert u.prompt_tokens == 147 and u.completion_tokens == 50 and u.reasoning_tokens is None
    assert t.cost == Decimal(40 * 3 * 1000 + 100 * 300 + 7 * 3750 + 50 * 15 * 1000) / Decimal(10**9)
    final = json.loads(aggregate(b"".join(worker_stream(usage_start=start, usage_end=end))).document())
    assert final["usage"]["input_tokens"] == 40 and final["usage"]["output_tokens"] == 50
    assert final["usage"]["cache_read_input_tokens"] == 100


def test_event_without_event_line_is_named() -> None:
    data = b'data: {"type":"message_start","message":{"id":"m","model":"claude-like","usage":{"input_tokens":1}}}\n\n'
    t = DIALECT.stream(plan(), PRICING, aggregate=False)
    (out,) = [t.feed(e) for e in parse(data)]
    assert out is not None
    (event,) = parse(out)
    assert event.event == "message_start" and json.loads(event.data or "")["message"]["id"] == "m"


@pytest.mark.parametrize("pricing", [PRICING, Pricing()])
def test_a_named_event_whose_data_lacks_its_type_gets_it_written_in(pricing: Pricing) -> None:
    """`event: X` over data with no `type`: the name says the type, and the Anthropic SDK
    reads the data's; every event goes out with both, equal (SPEC: `event:` = the data's
    `type`)."""
    untyped = []
    for chunk in worker_stream():
        (event,) = parse(chunk)
        obj = json.loads(event.data or "")
        del obj["type"]
        untyped.append(f"event: {event.event}\ndata: {json.dumps(obj)}\n\n".encode())
    out, t = relay(untyped, pricing)
    for frame, sent in zip(out, worker_stream(), strict=True):
        assert frame is not None
        names_match_types(frame)
        (got,), (want,) = parse(frame), parse(sent)
        assert got.event == want.event
        if want.event != "message_delta":  # (the priced one carries its cost)
            assert json.loads(got.data or "") == json.loads(want.data or "")
    assert t.complete


@pytest.mark.parametrize("data", [b'{"foo": 1}', b"{}", b'{"type": 5, "x": 1}'])
def test_an_event_with_neither_name_nor_type_is_no_event_and_is_not_passed_on(data: bytes) -> None:
    """Data with no `type` under no `event:` line names no event of the dialect: passed on,
    it would be an event not named by its type (SPEC: every event sidecar writes has an
    `event:` line equal to the data's `type`). It is dropped, as a block with no data is:
    its `id:`, `retry:` and comment lines still reach the client, without an event."""
    chunks = worker_stream()
    odd = b": note\nid: 7\nretry: 500\ndata: " + data + b"\n\n"
    out, t = relay([*chunks[:3], odd, *chunks[3:]])
    assert out[3] == b": note\nid: 7\nretry: 500\n"
    names_match_types(b"".join(frame for frame in out if frame))
    assert out[:3] == chunks[:3] and out[4:-2] == chunks[3:-2] and out[-1] == chunks[-1]
    assert t.complete
    (bare,) = parse(b"data: " + data + b"\n\n")
    assert DIALECT.stream(plan(), PRICING, aggregate=False).feed(bare) in (None, b"")


def test_comments_pass_and_after_message_stop_nothing_is_read() -> None:
    t = DIALECT.stream(plan(), PRICING, aggregate=False)
    (c,) = parse(b": keep-alive\n\n")
    assert t.feed(c) == b": keep-alive\n\n"
    for e in parse(b"".join(worker_stream())):
        t.feed(e)
    (late,) = parse(b"event: x\ndata: not json\n\n")
    assert t.feed(late) is None  # not read, and not passed on: the stream is over
    assert t.feed(c) == b": keep-alive\n\n"


def test_bad_json_is_a_protocol_error() -> None:
    t = DIALECT.stream(plan(), PRICING, aggregate=False)
    (e,) = parse(b"event: content_block_delta\ndata: {nope\n\n")
    with pytest.raises(StreamProtocolError):
        t.feed(e)


def test_worker_error_event_is_forwarded_as_is() -> None:
    chunks = worker_stream()[:4]
    err = ev("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    out, t = relay([*chunks, err, *worker_stream()[4:]])
    # the error is the last event out: no message_delta with a stop_reason, no message_stop
    assert out[4] == err and not any(out[5:])
    assert t.worker_error and not t.complete and t.ended
    agg = aggregate(b"".join([*chunks, err]))
    assert agg.worker_error
    assert json.loads(agg.document()) == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


@pytest.mark.parametrize(("name", "data"), [
    (b"", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    (b"", {"error": {"code": 500, "message": "failed", "type": "server_error"}}),  # llama.cpp's
    (b"event: ping\n", {"type": "error", "error": {"type": "api_error", "message": "x"}}),
])
def test_an_unnamed_worker_error_goes_out_named(name: bytes, data: dict) -> None:
    """The Anthropic SDK raises on events named `error` only: a worker error without an
    `event:` line, or under another name, goes out as `event: error`, its data unchanged."""
    chunks = worker_stream()[:4]
    out, t = relay([*chunks, name + b"data: " + json.dumps(data).encode() + b"\n\n"])
    (sent,) = parse(out[-1])
    assert sent.event == "error" and json.loads(sent.data) == data
    assert t.worker_error


def test_usage_estimated_from_content_deltas_when_the_worker_sends_none() -> None:
    chunks = [
        ev("message_start", {"type": "message_start", "message": {"id": "m", "model": MODEL, "content": []}}),
        ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        *[
            ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}})
            for w in ("a", "b", "c", "")
        ],
        ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}),
        ev("message_stop", {"type": "message_stop"}),
    ]
    out, t = relay(chunks)
    assert t.usage.estimated and t.usage.completion_tokens == 3
    assert t.cost == Decimal(45) / Decimal(10**6)
    assert out[-2] == chunks[-2], "an estimate is the ledger's: the client's events are the worker's"
    document = json.loads(aggregate(b"".join(chunks)).document())
    assert "usage" not in document
    assert document["content"] == [{"type": "text", "text": "abc"}]


# -- error frames and bodies -------------------------------------------------------------------


def test_error_frame() -> None:
    t = DIALECT.stream(plan(), PRICING, aggregate=False)
    for e in parse(b"".join(worker_stream()[:4])):
        t.feed(e)
    frame = t.error_frame(failures.UPSTREAM_DISCONNECTED, "the worker closed the connection")
    (event,) = parse(frame)
    assert frame.startswith(b"event: error\n")
    assert event.event == "error"
    assert json.loads(event.data or "") == {
        "type": "error",
        "error": {"type": "api_error", "message": "the worker closed the connection", "code": "upstream_disconnected"},
    }
    fresh = DIALECT.error_frame(plan(), failures.UPSTREAM_TIMEOUT, "silent")
    assert json.loads(parse(fresh)[0].data or "")["error"]["code"] == "upstream_timeout"


@pytest.mark.parametrize(
    ("status", "etype"),
    [
        (400, "invalid_request_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (408, "invalid_request_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "api_error"),
        (504, "api_error"),
    ],
)
def test_error_body(status: int, etype: str) -> None:
    body = json.loads(DIALECT.error_body(status, "some_code", "msg"))
    assert body == {"type": "error", "error": {"type": etype, "message": "msg", "code": "some_code"}}


# -- the request -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "mode", "asked"),
    [
        (True, "auto", True),
        (False, "auto", False),
        (True, "always", True),
        (False, "always", True),
        (True, "never", False),
        (False, "never", False),
    ],
)
def test_plan_sets_only_stream(client: bool, mode: str, asked: bool) -> None:
    request: dict[str, Any] = {"model": MODEL, "max_tokens": 5, "messages": [], "metadata": {"user_id": "u"}}
    if client:
        request["stream"] = True
    raw = orjson.dumps(request)
    p = DIALECT.plan(raw, mode, "rid")
    sent = json.loads(p.body)
    assert p.client_stream is client and p.asked_stream is asked
    if mode == "never":
        assert sent["stream"] is False  # said, not left out (SPEC: `stream: false`)
    assert sent.pop("stream", False) is asked
    request.pop("stream", None)
    assert sent == request and "stream_options" not in sent
    assert p.request_model == MODEL and p.request_id == "rid"
    if client == asked and mode != "never":
        assert p.body == raw  # nothing to change: the client's bytes go as they are


@pytest.mark.parametrize("body", [b"{nope", b"[1,2]", b""])
def test_plan_refuses_bad_json(body: bytes) -> None:
    with pytest.raises(BadRequest):
        DIALECT.plan(body, "auto", "rid")


# -- SSE -> JSON -------------------------------------------------------------------------------


def test_aggregate_merges_blocks_and_fills_type_and_role() -> None:
    data = b"".join(
        [
            ev("message_start", {"type": "message_start", "message": {"id": "msg_9", "model": MODEL, "usage": {"input_tokens": 4}}}),
            ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "let me "}}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "think"}}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "SIG"}}),
            ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ev("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {}}}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"city": "Par'}}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": 'is", "n": [1, 2]}'}}),
            ev("content_block_stop", {"type": "content_block_stop", "index": 1}),
            ev("content_block_start", {"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "citations_delta", "citation": {"type": "char_location", "cited_text": "x"}}}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "done"}}),
            ev("content_block_stop", {"type": "content_block_stop", "index": 2}),
            ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {"output_tokens": 9}}),
            ev("message_stop", {"type": "message_stop"}),
        ]
    )
    t = aggregate(data)
    assert t.complete
    doc = json.loads(t.document())
    assert doc == {
        "id": "msg_9",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [
            {"type": "thinking", "thinking": "let me think", "signature": "SIG"},
            {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {"city": "Paris", "n": [1, 2]}},
            {"type": "text", "text": "done", "citations": [{"type": "char_location", "cited_text": "x"}]},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 4, "output_tokens": 9, "cost": pytest.approx((4 * 3 + 9 * 15) / 1e6)},
    }


def test_aggregate_unparsable_tool_input_is_a_protocol_error() -> None:
    data = b"".join(
        [
            ev("message_start", {"type": "message_start", "message": {"id": "m", "model": MODEL}}),
            ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": '{"a": '}}),
            ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 2}}),
            ev("message_stop", {"type": "message_stop"}),
        ]
    )
    t = aggregate(data)
    assert t.complete
    with pytest.raises(StreamProtocolError, match="not valid JSON"):
        t.document()


def test_aggregate_fills_id_and_model_from_the_request() -> None:
    data = b"".join(
        [
            ev("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 1}}}),
            ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}}),
            ev("message_stop", {"type": "message_stop"}),
        ]
    )
    doc = json.loads(aggregate(data).document())
    assert doc["id"] == "msg_req1" and doc["model"] == MODEL
    assert doc["type"] == "message" and doc["role"] == "assistant" and doc["content"] == []


# -- JSON documents --------------------------------------------------------------------------


MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": MODEL,
    "content": [{"type": "text", "text": "Hi there"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 2, "cache_creation_input_tokens": 4},
}


def test_document_json_gets_cost() -> None:
    d = DIALECT.document(plan(client_stream=False), PRICING, orjson.dumps(MESSAGE))
    doc = json.loads(d.json())
    cost = (10 * 3 + 4 * 3.75 + 2 * 15) / 1e6
    assert doc["usage"] == {**MESSAGE["usage"], "cost": pytest.approx(cost)}
    assert d.cost == Decimal("0.000075") and d.model == MODEL and not d.worker_error
    assert d.usage.prompt_tokens == 14 and d.usage.cache_write_tokens == 4
    unpriced = DIALECT.document(plan(client_stream=False), Pricing(), orjson.dumps(MESSAGE))
    assert json.loads(unpriced.json()) == MESSAGE and unpriced.cost is None


def test_document_sse_is_a_complete_named_stream() -> None:
    d = DIALECT.document(plan(), PRICING, orjson.dumps(MESSAGE))
    data = d.sse()
    names_match_types(data)
    kinds = [e.event for e in parse(data)]
    assert kinds == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = json.loads(parse(data)[0].data or "")["message"]
    assert start["content"] == [] and start["usage"]["output_tokens"] == 0 and start["usage"]["input_tokens"] == 10
    assert start["stop_reason"] is None


@pytest.mark.parametrize("client_stream", [False, True])
def test_a_documents_tool_input_keeps_its_numbers_as_they_came(client_stream: bool) -> None:
    # the document is written again (cost injected, or made into a stream): integers past
    # 64 bits (orjson reads floats) and numbers past a double (orjson refuses them) are kept
    raw = b'{"n": 12345678901234567890123, "m": [-98765432109876543210], "x": 1e400, "f": 0.5}'
    message = orjson.dumps({**MESSAGE, "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]})
    body = message.replace(b'"input":{}', b'"input":' + raw)
    d = DIALECT.document(plan(client_stream=client_stream), PRICING, body)
    if client_stream:
        deltas = [json.loads(e.data or "") for e in parse(d.sse()) if e.event == "content_block_delta"]
        (partial,) = [x["delta"]["partial_json"] for x in deltas]
        assert partial == raw.replace(b" ", b"").decode()
    else:
        out = d.json()
        assert raw.replace(b" ", b"") in out.replace(b" ", b"")
        assert json.loads(out)["usage"]["cost"] > 0


def test_worker_error_document() -> None:
    err = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    d = DIALECT.document(plan(), PRICING, orjson.dumps(err))
    assert d.worker_error
    (event,) = parse(d.sse())
    assert event.event == "error" and json.loads(event.data or "") == err


def test_an_untyped_error_document_is_the_workers_error() -> None:
    """`{"error": {...}}` with no type (llama.cpp's shape) is the worker's failure, as the same
    data is in a stream: never replayed as a message (a success with no content), but the
    Anthropic error object, named `error`, and the 502 body of a non-streaming client."""
    err = {"error": {"code": 500, "message": "boom", "type": "server_error"}}
    d = DIALECT.document(plan(), PRICING, orjson.dumps(err))
    assert d.worker_error and d.cost is None
    wrapped = {"type": "error", "error": {"type": "api_error", "message": "boom", "code": 500}}
    (event,) = parse(d.sse())
    assert event.event == "error" and json.loads(event.data or "") == wrapped
    assert json.loads(d.json()) == wrapped


def test_unreadable_document() -> None:
    with pytest.raises(StreamProtocolError):
        DIALECT.document(plan(), PRICING, b"<html>")


# -- round trip ------------------------------------------------------------------------------

_text = st.text(max_size=30)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_text, children, max_size=3),
    max_leaves=8,
)
_block = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, _text),
    st.builds(lambda t, s: {"type": "thinking", "thinking": t, "signature": s}, _text, _text),
    st.builds(
        lambda i, n, inp: {"type": "tool_use", "id": i, "name": n, "input": inp},
        _text,
        _text,
        st.dictionaries(_text, _json, max_size=4),
    ),
    st.builds(lambda d: {"type": "redacted_thinking", "data": d}, _text),
)
_count = st.integers(0, 10**7)
_usage = st.fixed_dictionaries(
    {"input_tokens": _count, "output_tokens": _count},
    optional={"cache_read_input_tokens": _count, "cache_creation_input_tokens": _count, "service_tier": st.just("standard")},
)
_message = st.fixed_dictionaries(
    {
        "id": _text,
        "type": st.just("message"),
        "role": st.just("assistant"),
        "model": st.sampled_from([MODEL, "unpriced"]),
        "content": st.lists(_block, max_size=4),
        "stop_reason": st.sampled_from(["end_turn", "max_tokens", "stop_sequence", "tool_use", None]),
        "stop_sequence": st.none() | _text,
        "usage": _usage,
    }
)


@settings(max_examples=150, deadline=None)
@given(_message, st.lists(st.integers(1, 64), max_size=20))
def test_round_trip_json_sse_json(message: dict[str, Any], cuts: list[int]) -> None:
    p = plan(client_stream=True)
    d = DIALECT.document(p, PRICING, orjson.dumps(message))
    data = d.sse()
    names_match_types(data)
    # feed the synthesized stream in arbitrary pieces
    parser = SSEParser()
    t = DIALECT.stream(p, PRICING, aggregate=True)
    pos = 0
    for size in [*cuts, len(data)]:
        for e in parser.feed(data[pos : pos + size]):
            t.feed(e)
        pos += size
    for e in parser.feed(data[pos:]):
        t.feed(e)
    assert t.complete and not t.worker_error
    back = json.loads(t.document())
    expected = json.loads(d.json())  # the original plus usage.cost when priced
    assert back == expected
    if message["model"] == MODEL:
        assert "cost" in back["usage"] and t.cost == d.cost
    else:
        assert "cost" not in back["usage"] and t.cost is None
    assert t.usage == d.usage


def test_a_reencoded_event_keeps_the_workers_id() -> None:
    """An event the sidecar re-encodes (here the final message_delta, cost injected) keeps
    the `id:` line the worker gave it: a client resuming by Last-Event-ID still can."""
    chunks = [b"id: 7\n" + c if c.startswith(b"event: message_delta") else c for c in worker_stream()]
    out, _ = relay(chunks)
    (sent,) = [e for e in parse(b"".join(out)) if e.event == "message_delta"]
    assert sent.id == "7" and "cost" in json.loads(sent.data)["usage"]


# -- UTF-16 halves split across deltas (a JavaScript gateway's cut) ----------------------------

EMOJI = "\U0001f600"
HIGH, LOW = "\ud83d", "\ude00"  # its two UTF-16 halves, as a JavaScript gateway may cut it


def _text_stream(*texts: str) -> bytes:
    return b"".join(
        [
            ev("message_start", {"type": "message_start", "message": {"id": "m", "model": MODEL}}),
            ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            *(ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": t}}) for t in texts),
            ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}),
            ev("message_stop", {"type": "message_stop"}),
        ]
    )


def test_relay_passes_split_surrogate_events_byte_for_byte() -> None:
    data = _text_stream("a", HIGH, LOW, "b")
    assert b'"text": "\\ud83d"' in data
    out, t = relay([data], Pricing())
    assert b"".join(o or b"" for o in out) == data and t.complete


def test_aggregate_joins_a_surrogate_pair_split_across_deltas() -> None:
    doc = orjson.loads(aggregate(_text_stream("a", HIGH, LOW, "b")).document())
    assert doc["content"][0]["text"] == "a" + EMOJI + "b"


def test_aggregate_a_lone_surrogate_at_the_end_becomes_a_replacement_character() -> None:
    doc = orjson.loads(aggregate(_text_stream("a", HIGH)).document())
    assert doc["content"][0]["text"] == "a\ufffd"


# -- tool inputs as the worker wrote them ------------------------------------------------------


def _tool_stream(*partials: str, stop: str = "tool_use") -> bytes:
    """A message whose one tool_use block's input comes as `partials`."""
    return b"".join(
        [
            ev("message_start", {"type": "message_start", "message": {"id": "m", "model": MODEL}}),
            ev("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}}),
            *(ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "input_json_delta", "partial_json": p}})
              for p in partials),
            ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop}, "usage": {"output_tokens": 2}}),
            ev("message_stop", {"type": "message_stop"}),
        ]
    )


def test_aggregate_tool_input_keeps_integers_past_64_bits() -> None:
    # orjson reads an integer past 64 bits as a float: the input is the worker's own text
    doc = aggregate(_tool_stream('{"id": 1234567890', '1234567890123, "n": [-98765432109876543210]}')).document()
    assert b'{"id": 12345678901234567890123, "n": [-98765432109876543210]}' in doc
    assert json.loads(doc)["content"][0]["input"] == {"id": 12345678901234567890123, "n": [-98765432109876543210]}


@pytest.mark.parametrize("aggregated", [False, True])
def test_integers_past_64_bits_in_events_written_again_are_kept(aggregated: bool) -> None:
    # the message_start read into the aggregated message, and the message_delta that gets its
    # cost, are written again: their integers past 64 bits stay as they came
    big = 2**64 + 1
    events = worker_stream()
    events[0] = events[0].replace(b'"id": "msg_01"', b'"id": "msg_01", "trace": %d' % big)
    events[-2] = events[-2].replace(b'"type": "message_delta"', b'"type": "message_delta", "trace": %d' % big)
    if aggregated:
        written = aggregate(b"".join(events)).document()
        assert json.loads(written)["trace"] == big
    else:
        out, _ = relay(events)
        written = out[-2] or b""
        assert json.loads(parse(written)[0].data or "")["usage"]["cost"] > 0
    assert b'"trace":%d' % big in written


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1" + "0" * 400])
def test_aggregate_tool_input_with_a_number_past_a_double_is_kept(number: str) -> None:
    # JSON puts no range on numbers (RFC 8259): orjson refuses these, the input is kept as it came
    raw = '{"x": ' + number + ', "s": "\\u00e9"}'
    doc = aggregate(_tool_stream(raw[:7], raw[7:])).document()
    assert b'"input":' + raw.encode() in doc
    assert json.loads(doc)["content"][0]["input"]["x"] == json.loads(number)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_aggregate_tool_input_with_nan_or_infinity_is_not_json(literal: str) -> None:
    t = aggregate(_tool_stream('{"x": ' + literal + "}"))
    with pytest.raises(StreamProtocolError, match="not valid JSON"):
        t.document()


def test_aggregate_tool_input_cut_by_max_tokens_still_reads_as_far_as_it_came() -> None:
    doc = aggregate(_tool_stream('{"a": 1, "city": "Par', stop="max_tokens")).document()
    assert json.loads(doc)["content"][0]["input"] == {"a": 1}
    # what came is kept as it came: an integer past 64 bits, a number past a double
    doc = aggregate(_tool_stream('{"id": 123456789012345678901234, "x": -1e400, "s": "' + HIGH,
                                 LOW + '", "city": "Par', stop="max_tokens")).document()
    assert b'"input":{"id": 123456789012345678901234, "x": -1e400, "s": "' in doc
    assert json.loads(doc)["content"][0]["input"] == {"id": 123456789012345678901234, "x": -1e400, "s": EMOJI}
    doc = aggregate(_tool_stream('{"city": "Par', stop="max_tokens")).document()
    assert json.loads(doc)["content"][0]["input"] == {}


def test_aggregate_tool_input_with_an_emoji_split_across_deltas() -> None:
    # the tool input's text has the emoji itself; the event strings carry its halves
    doc = aggregate(_tool_stream('{"s": "x' + HIGH, LOW + '"}')).document()
    assert orjson.loads(doc)["content"][0]["input"] == {"s": "x" + EMOJI}


@settings(max_examples=60, deadline=None)
@given(st.text(st.characters(min_codepoint=0x1F300, max_codepoint=0x1F64F) | st.sampled_from('a é"\\'),
               min_size=1, max_size=10),
       st.lists(st.integers(0, 30), max_size=6), st.booleans())
def test_aggregated_document_is_json_whatever_utf16_cuts(text: str, cuts: list[int], tool: bool) -> None:
    units = (json.dumps({"s": text}, ensure_ascii=False) if tool else text).encode("utf-16-le")
    n = len(units) // 2
    bounds = sorted({0, n, *(c % (n + 1) for c in cuts)})
    pieces = [units[2 * a : 2 * b].decode("utf-16-le", "surrogatepass") for a, b in pairwise(bounds)]
    doc = orjson.loads(aggregate(_tool_stream(*pieces) if tool else _text_stream(*pieces)).document())
    assert doc["content"][0]["input" if tool else "text"] == ({"s": text} if tool else text)


def test_aggregate_a_delta_without_its_block_start_implies_the_blocks_type() -> None:
    data = b"".join([
        worker_stream()[0],
        ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                   "delta": {"type": "thinking_delta", "thinking": "hm"}}),
        ev("content_block_delta", {"type": "content_block_delta", "index": 1,
                                   "delta": {"type": "text_delta", "text": "Hi"}}),
        ev("content_block_delta", {"type": "content_block_delta", "index": 2,
                                   "delta": {"type": "input_json_delta", "partial_json": '{"a": 1}'}}),
        *worker_stream()[-2:],
    ])
    doc = json.loads(aggregate(data).document())
    assert doc["content"] == [
        {"type": "thinking", "thinking": "hm"},
        {"type": "text", "text": "Hi"},
        {"type": "tool_use", "input": {"a": 1}},
    ]


def test_document_sse_fills_the_message_start_and_prices_only_the_message_delta() -> None:
    """A worker document without id, type or role still makes a message_start a client
    reads (they are filled in); `usage.cost` is in the final message_delta only."""
    bare = {k: v for k, v in MESSAGE.items() if k not in ("id", "type", "role")}
    data = DIALECT.document(plan(), PRICING, orjson.dumps(bare)).sse()
    events = [json.loads(e.data or "") for e in parse(data)]
    start = events[0]["message"]
    assert (start["id"], start["type"], start["role"], start["model"]) == ("msg_req1", "message", "assistant", MODEL)
    assert "cost" not in start["usage"]
    (delta,) = [e for e in events if e["type"] == "message_delta"]
    assert delta["usage"]["cost"] == pytest.approx((10 * 3 + 4 * 3.75 + 2 * 15) / 1e6)


def test_document_sse_streams_a_thinking_blocks_signature() -> None:
    thinking = {"type": "thinking", "thinking": "hm", "signature": "SIG"}
    doc = {**MESSAGE, "content": [thinking, *MESSAGE["content"]]}
    data = DIALECT.document(plan(), PRICING, orjson.dumps(doc)).sse()
    deltas = [json.loads(e.data or "")["delta"] for e in parse(data) if e.event == "content_block_delta"]
    assert {"type": "signature_delta", "signature": "SIG"} in deltas
    assert json.loads(aggregate(data).document())["content"][0] == thinking


@pytest.mark.parametrize("mode", ["auto", "never"])
def test_plan_drops_a_clients_stream_options_when_the_worker_is_not_asked_to_stream(mode: str) -> None:
    """README: a client's own `stream_options` is dropped, on every dialect, whenever the
    worker is asked not to stream."""
    body = {"model": MODEL, "max_tokens": 10, "messages": [], "stream_options": {"include_usage": True}}
    sent = orjson.loads(DIALECT.plan(orjson.dumps(body), mode, "r").body)
    assert "stream_options" not in sent and sent.get("stream", False) is False
