"""The openai-responses dialect, driven with real SSE bytes through sidecar's own parser."""

from __future__ import annotations

import json
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.responses import ResponseCreatedEvent, ResponseFailedEvent

from sidecar import failures
from sidecar.config import Price, Pricing
from sidecar.dialects import get_dialect
from sidecar.dialects.base import RequestPlan
from sidecar.dialects.jsonio import BadRequest, StreamProtocolError
from sidecar.dialects.openai_responses import OutputSoFar
from sidecar.sse import Event, SSEParser

DIALECT = get_dialect("openai-responses")
MODEL = "gpt-like"
PRICING = Pricing(
    models=MappingProxyType(
        {MODEL: Price(Decimal("1"), Decimal("2"), cached_prompt=Decimal("0.5"), reasoning=Decimal("4"))}
    )
)
USAGE = {
    "input_tokens": 10,
    "input_tokens_details": {"cached_tokens": 4},
    "output_tokens": 6,
    "output_tokens_details": {"reasoning_tokens": 2},
    "total_tokens": 16,
}
#: (10-4)*1 + 4*0.5 + (6-2)*2 + 2*4 = 24 per million
COST = Decimal(24) / Decimal(10**6)


def response(status: str = "in_progress", output: list[Any] | None = None, usage: Any = None) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1_700_000_000,
        "model": MODEL,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "output": output if output is not None else [],
        "usage": usage,
    }


MESSAGE_ITEM = {
    "id": "msg_1",
    "type": "message",
    "status": "completed",
    "role": "assistant",
    "content": [{"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}],
}


def worker_events(*, numbered: bool = True, terminal: str = "response.completed") -> list[dict[str, Any]]:
    """A Responses stream as OpenAI sends it (sequence numbers when `numbered`)."""
    added = {**MESSAGE_ITEM, "status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    at = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    final_status = {"response.completed": "completed", "response.incomplete": "incomplete"}.get(terminal, "failed")
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": response()},
        {"type": "response.in_progress", "response": response()},
        {"type": "response.output_item.added", "output_index": 0, "item": added},
        {"type": "response.content_part.added", **at, "part": part},
        {"type": "response.output_text.delta", **at, "delta": "Hel", "logprobs": []},
        {"type": "response.output_text.delta", **at, "delta": "lo", "logprobs": []},
        {"type": "response.output_text.done", **at, "text": "Hello", "logprobs": []},
        {"type": "response.content_part.done", **at, "part": {**part, "text": "Hello"}},
        {"type": "response.output_item.done", "output_index": 0, "item": MESSAGE_ITEM},
        {"type": terminal, "response": response(final_status, [MESSAGE_ITEM], USAGE)},
    ]
    if numbered:
        for i, e in enumerate(events):
            e["sequence_number"] = i
    return events


def encode(events: list[dict[str, Any]], named: bool = True) -> list[bytes]:
    out = []
    for e in events:
        head = f"event: {e['type']}\n" if named else ""
        out.append(f"{head}data: {json.dumps(e)}\n\n".encode())
    return out


def plan(client_stream: bool = True, mode: str = "auto") -> RequestPlan:
    body: dict[str, Any] = {"model": MODEL, "input": "hi"}
    if client_stream:
        body["stream"] = True
    return DIALECT.plan(orjson.dumps(body), mode, "req1")


def parse(data: bytes) -> list[Event]:
    return SSEParser().feed(data)


def loads(frame: bytes | None) -> tuple[str | None, dict[str, Any]]:
    assert frame is not None
    (event,) = parse(frame)
    return event.event, json.loads(event.data or "")


def relay(chunks: list[bytes], pricing: Pricing = PRICING) -> tuple[list[bytes | None], Any]:
    t = DIALECT.stream(plan(), pricing, aggregate=False)
    return [t.feed(e) for e in parse(b"".join(chunks))], t


def aggregate(chunks: list[bytes], pricing: Pricing = PRICING) -> Any:
    t = DIALECT.stream(plan(client_stream=False), pricing, aggregate=True)
    for e in parse(b"".join(chunks)):
        assert t.feed(e) is None
    return t


# -- relay -------------------------------------------------------------------------------------


def test_numbered_stream_passes_raw_except_the_completed_event() -> None:
    chunks = encode(worker_events())
    out, t = relay(chunks)
    assert out[:-1] == chunks[:-1]  # the same bytes, sequence numbers untouched
    name, obj = loads(out[-1])
    assert name == "response.completed" and obj["sequence_number"] == 9
    assert obj["response"]["usage"] == {**USAGE, "cost": pytest.approx(float(COST))}
    assert t.complete and not t.worker_error and t.cost == COST and t.model == MODEL
    u = t.usage
    assert (u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.reasoning_tokens) == (10, 6, 4, 2)


def test_unpriced_stream_is_untouched() -> None:
    chunks = encode(worker_events())
    out, t = relay(chunks, Pricing())
    assert out == chunks and t.cost is None and t.complete


def test_unnumbered_stream_is_numbered_from_zero() -> None:
    events = worker_events(numbered=False)
    out, t = relay(encode(events, named=False))
    for i, (frame, sent) in enumerate(zip(out, events, strict=True)):
        name, obj = loads(frame)
        assert name == sent["type"] == obj["type"]
        assert obj["sequence_number"] == i
    frame = t.error_frame(failures.UPSTREAM_DISCONNECTED, "x")  # after the end: still continues
    assert loads(frame)[1]["sequence_number"] == len(events)


def test_missing_event_line_is_added_without_renumbering() -> None:
    events = worker_events()
    out, _ = relay(encode(events, named=False))
    for frame, sent in zip(out[:-1], events, strict=False):
        name, obj = loads(frame)
        assert name == sent["type"] and obj == sent


def test_a_named_event_whose_data_lacks_its_type_gets_it_written_in() -> None:
    """`event: X` over data with no `type`: the name says the type, and the client reads the
    data's (the openai SDK builds each event from it); the event goes out with both."""
    events = worker_events()
    untyped = [{k: v for k, v in e.items() if k != "type"} for e in events]
    chunks = [f"event: {e['type']}\ndata: {json.dumps(u)}\n\n".encode()
              for e, u in zip(events, untyped, strict=True)]
    out, t = relay(chunks, Pricing())
    for frame, sent in zip(out, events, strict=True):
        name, obj = loads(frame)
        assert name == obj["type"] == sent["type"] and obj == sent
    assert t.complete


@pytest.mark.parametrize("numbered", [True, False])
@pytest.mark.parametrize("data", [b'{"foo": 1}', b"{}"])
def test_an_event_with_neither_name_nor_type_is_not_passed_on(numbered: bool, data: bytes) -> None:
    """Data with no `type` under no `event:` line is no Responses event: passed on, it would
    go out unnamed (SPEC: every event sidecar writes is named by its `type`) and, from a
    worker that numbers nothing, unnumbered (SPEC: sidecar then numbers every event it
    writes from 0; the openai SDK would yield it as an event whose type is None). It is
    dropped, its `id:` line kept for the next event, as a block with no data is."""
    events = worker_events(numbered=numbered)
    chunks = encode(events, named=numbered)
    out, t = relay([*chunks[:4], b"id: 9\ndata: " + data + b"\n\n", *chunks[4:]])
    assert out[4] == b"id: 9\n"
    frames = [frame for i, frame in enumerate(out) if frame and i != 4]
    written = [loads(frame) for frame in frames]
    assert [name for name, _ in written] == [obj["type"] for _, obj in written] == [e["type"] for e in events]
    assert [obj["sequence_number"] for _, obj in written] == list(range(len(events)))
    assert t.complete


@pytest.mark.parametrize("numbered", [True, False])
def test_error_frame_mid_stream(numbered: bool) -> None:
    events = worker_events(numbered=numbered)
    first = 6 if numbered else 0
    if numbered:  # a worker whose numbers do not start at 0
        for e in events:
            e["sequence_number"] += first
    t = DIALECT.stream(plan(), PRICING, aggregate=False)
    for e in parse(b"".join(encode(events[:5]))):  # up to the first text delta
        t.feed(e)
    name, obj = loads(t.error_frame(failures.UPSTREAM_DISCONNECTED, "the worker went away"))
    assert name == "response.failed" == obj["type"]
    assert obj["sequence_number"] == first + 5
    failed = obj["response"]
    created = events[0]["response"]
    assert (failed["id"], failed["model"], failed["created_at"]) == (created["id"], created["model"], created["created_at"])
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "upstream_disconnected", "message": "the worker went away"}
    (item,) = failed["output"]
    assert item["id"] == "msg_1" and item["content"][0]["text"] == "Hel"  # the output so far
    assert not t.complete


def test_error_frame_before_any_event() -> None:
    """With nothing sent yet, a synthesized response.created comes first (a client following
    the stream's state refuses a failure of a response it never saw created)."""
    frame = DIALECT.error_frame(plan(), failures.UPSTREAM_TIMEOUT, "silent")
    (created_name, created), (name, obj) = [
        (e.event, json.loads(e.data)) for e in parse(frame) if e.data is not None
    ]
    assert created_name == "response.created" == created["type"] and created["sequence_number"] == 0
    assert created["response"]["status"] == "in_progress"
    assert name == "response.failed" and obj["sequence_number"] == 1
    r = obj["response"]
    assert r["id"] == "resp_req1" and r["model"] == MODEL and r["status"] == "failed"
    assert r["error"] == {"code": "upstream_timeout", "message": "silent"} and r["output"] == []
    assert isinstance(r["created_at"], int)
    assert {k: created["response"][k] for k in ("id", "model", "created_at")} == {
        k: r[k] for k in ("id", "model", "created_at")}
    # both are whole objects of the SDK's types (the failure's code is SPEC's, which the
    # SDK's closed list of codes does not have, so it is checked without it)
    ResponseCreatedEvent.model_validate(created)
    ResponseFailedEvent.model_validate({**obj, "response": {**r, "error": None}})


def test_worker_response_failed_is_forwarded_as_is() -> None:
    events = worker_events(terminal="response.failed")
    events[-1]["response"]["error"] = {"code": "server_error", "message": "boom"}
    chunks = encode(events)
    out, t = relay(chunks)
    assert out == chunks
    assert t.worker_error and t.complete
    # a worker that goes on to a response.completed after it: never passed on
    late, _ = relay([*chunks, *encode(worker_events())[-2:]])
    assert late[: len(chunks)] == chunks and not any(late[len(chunks) :])
    agg = aggregate(chunks)
    assert agg.worker_error
    # aggregated (a 502), it is the dialect's error object, as for the worker's `error` event
    assert json.loads(agg.document()) == {"error": {
        "message": "boom", "type": "upstream_error", "code": "server_error", "param": None}}


def test_worker_error_event() -> None:
    chunks = [*encode(worker_events()[:3]), b'event: error\ndata: {"type":"error","code":"server_error","message":"bad","param":null,"sequence_number":3}\n\n']
    out, t = relay([*chunks, *encode(worker_events())[3:]])
    assert out[:4] == chunks and not any(out[4:]) and t.worker_error and not t.complete
    doc = json.loads(aggregate(chunks).document())
    assert doc == {"error": {"message": "bad", "type": "upstream_error", "code": "server_error", "param": None}}


def test_a_response_failed_after_the_workers_error_still_goes_out_with_its_usage() -> None:
    """Some gateways write `error` and then `response.failed`: both say the failure (SPEC
    forwards each as it is), and the failed response carries the usage that is billed;
    a success after them never goes out."""
    failed = worker_events(terminal="response.failed")[-1]
    failed["response"]["error"] = {"code": "server_error", "message": "bad"}
    failed["response"]["usage"] = {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}
    err = b'event: error\ndata: {"type":"error","code":"server_error","message":"bad","param":null,"sequence_number":5}\n\n'
    head = encode(worker_events()[:5])
    (late,) = encode([failed])
    out, t = relay([*head, err, late, *encode(worker_events())[-1:]])
    assert out[:6] == [*head, err]
    assert out[6] is not None and loads(out[6])[0] == "response.failed"
    assert out[7] is None
    assert (t.usage.prompt_tokens, t.usage.completion_tokens) == (10, 5) and not t.usage.estimated
    agg = aggregate([*head, err, late])
    assert (agg.usage.prompt_tokens, agg.usage.completion_tokens) == (10, 5)


def test_incomplete_is_a_terminal_event_with_cost() -> None:
    out, t = relay(encode(worker_events(terminal="response.incomplete")))
    name, obj = loads(out[-1])
    assert name == "response.incomplete" and obj["response"]["usage"]["cost"] == pytest.approx(float(COST))
    assert t.complete and not t.worker_error


def test_usage_estimated_when_the_worker_sends_none() -> None:
    events = worker_events()
    events[-1]["response"]["usage"] = None
    out, t = relay(encode(events))
    assert t.usage.estimated and t.usage.completion_tokens == 2
    assert t.cost == Decimal(4) / Decimal(10**6)
    assert out[-1] == encode(events)[-1]  # no usage object to put a cost in


def test_bad_json_is_a_protocol_error() -> None:
    t = DIALECT.stream(plan(), PRICING, aggregate=False)
    (e,) = parse(b"event: response.created\ndata: {\n\n")
    with pytest.raises(StreamProtocolError):
        t.feed(e)


# -- SSE -> JSON -------------------------------------------------------------------------------


def test_aggregate_returns_the_completed_response_with_cost() -> None:
    t = aggregate(encode(worker_events()))
    assert t.complete
    doc = json.loads(t.document())
    assert doc == {**response("completed", [MESSAGE_ITEM], {**USAGE, "cost": pytest.approx(float(COST))})}


def test_aggregate_builds_output_from_items_when_completed_has_none() -> None:
    events = worker_events(numbered=False)
    del events[-1]["response"]["output"]
    doc = json.loads(aggregate(encode(events)).document())
    assert doc["output"] == [MESSAGE_ITEM] and doc["status"] == "completed"


# -- JSON documents ----------------------------------------------------------------------------

FUNCTION_ITEM = {
    "id": "fc_1",
    "type": "function_call",
    "call_id": "call_1",
    "name": "lookup",
    "arguments": '{"q": 1}',
    "status": "completed",
}
REASONING_ITEM = {
    "id": "rs_1",
    "type": "reasoning",
    "summary": [{"type": "summary_text", "text": "thought"}],
    "content": [{"type": "reasoning_text", "text": "deep"}],
}


def test_document_json_and_sse() -> None:
    doc = response("completed", [REASONING_ITEM, MESSAGE_ITEM, FUNCTION_ITEM], USAGE)
    d = DIALECT.document(plan(), PRICING, orjson.dumps(doc))
    assert json.loads(d.json()) == {**doc, "usage": {**USAGE, "cost": pytest.approx(float(COST))}}
    assert d.cost == COST and not d.worker_error
    events = parse(d.sse())
    objs = [json.loads(e.data or "") for e in events]
    assert [e.event for e in events] == [o["type"] for o in objs]
    assert [o["sequence_number"] for o in objs] == list(range(len(objs)))
    kinds = [o["type"] for o in objs]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.completed"
    assert objs[0]["response"]["status"] == "in_progress" and objs[0]["response"]["output"] == []
    assert objs[0]["response"]["usage"] is None
    deltas = [o["delta"] for o in objs if o["type"].endswith(".delta")]
    assert deltas == ["thought", "deep", "Hello", '{"q": 1}']
    assert "response.output_text.done" in kinds and "response.content_part.done" in kinds
    assert objs[-1]["response"] == json.loads(d.json())


@pytest.mark.parametrize(("status", "terminal", "final_status"), [
    ("incomplete", "response.incomplete", "incomplete"),
    ("completed", "response.completed", "completed"),
    (None, "response.completed", "completed"),  # a document with no status: no "in_progress"
])
def test_document_status_picks_the_terminal_event(status: str | None, terminal: str, final_status: str) -> None:
    doc = response("incomplete", [MESSAGE_ITEM], USAGE)
    doc["incomplete_details"] = {"reason": "max_output_tokens"} if status == "incomplete" else None
    if status is None:
        del doc["status"]
    else:
        doc["status"] = status
    last = parse(DIALECT.document(plan(), PRICING, orjson.dumps(doc)).sse())[-1]
    assert last.event == terminal
    assert json.loads(last.data or "")["response"]["status"] == final_status


def test_worker_error_documents() -> None:
    failed = response("failed", [], None)
    failed["error"] = {"code": "server_error", "message": "boom"}
    d = DIALECT.document(plan(), PRICING, orjson.dumps(failed))
    assert d.worker_error
    assert parse(d.sse())[-1].event == "response.failed"
    plain = DIALECT.document(plan(), PRICING, b'{"error": {"message": "nope", "type": "x", "code": "c"}}')
    assert plain.worker_error
    (event,) = parse(plain.sse())
    assert event.event == "error"
    assert json.loads(event.data or "") == {"type": "error", "code": "c", "message": "nope", "param": None, "sequence_number": 0}


def test_error_body() -> None:
    assert json.loads(DIALECT.error_body(502, "upstream_unavailable", "down")) == {
        "error": {"message": "down", "type": "upstream_error", "code": "upstream_unavailable"}
    }
    assert json.loads(DIALECT.error_body(400, "invalid_request_error", "bad"))["error"]["type"] == "invalid_request_error"


# -- the request -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "mode", "asked"),
    [(True, "auto", True), (False, "auto", False), (False, "always", True), (True, "never", False),
     (False, "never", False)],
)
def test_plan_sets_only_stream(client: bool, mode: str, asked: bool) -> None:
    request: dict[str, Any] = {"model": MODEL, "input": "hi"}
    if client:
        request["stream"] = True
        request["stream_options"] = {"include_obfuscation": False}
    raw = orjson.dumps(request)
    p = DIALECT.plan(raw, mode, "rid")
    sent = json.loads(p.body)
    assert p.client_stream is client and p.asked_stream is asked
    assert sent.get("stream", False) is asked
    if mode == "never":
        assert sent["stream"] is False  # said, not left out (SPEC: `stream: false`)
    if asked:
        assert sent.get("stream_options") == request.get("stream_options")  # never added, never changed
    else:
        assert "stream_options" not in sent
    if client == asked and mode != "never":
        assert p.body == raw


def test_plan_refuses_bad_json() -> None:
    with pytest.raises(BadRequest):
        DIALECT.plan(b"{", "auto", "rid")


# -- round trip --------------------------------------------------------------------------------

_text = st.text(max_size=20)
_part = st.one_of(
    st.builds(lambda t: {"type": "output_text", "text": t, "annotations": [], "logprobs": []}, _text),
    st.builds(lambda t: {"type": "refusal", "refusal": t}, _text),
)
_item = st.one_of(
    st.builds(
        lambda i, parts: {"id": i, "type": "message", "status": "completed", "role": "assistant", "content": parts},
        _text,
        st.lists(_part, max_size=3),
    ),
    st.builds(
        lambda i, a: {"id": i, "type": "function_call", "call_id": "c" + i, "name": "f", "arguments": a, "status": "completed"},
        _text,
        _text,
    ),
    st.builds(
        lambda i, s: {"id": i, "type": "reasoning", "summary": [{"type": "summary_text", "text": x} for x in s]},
        _text,
        st.lists(_text, max_size=2),
    ),
)
_count = st.integers(0, 10**6)
_usage = st.none() | st.builds(
    lambda i, c, o, r: {
        "input_tokens": i,
        "input_tokens_details": {"cached_tokens": min(c, i)},
        "output_tokens": o,
        "output_tokens_details": {"reasoning_tokens": min(r, o)},
        "total_tokens": i + o,
    },
    _count,
    _count,
    _count,
    _count,
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(_item, max_size=4),
    _usage,
    st.sampled_from(["completed", "incomplete"]),
    st.sampled_from([MODEL, "unpriced"]),
)
def test_round_trip_json_sse_json(output: list[Any], usage: Any, status: str, model: str) -> None:
    doc = {**response(status, output, usage), "model": model}
    p = plan()
    d = DIALECT.document(p, PRICING, orjson.dumps(doc))
    data = d.sse()
    t = DIALECT.stream(p, PRICING, aggregate=True)
    numbers = []
    for e in parse(data):
        obj = json.loads(e.data or "")
        assert e.event == obj["type"]
        numbers.append(obj["sequence_number"])
        t.feed(e)
    assert numbers == list(range(len(numbers)))
    assert t.complete and not t.worker_error
    back = json.loads(t.document())
    assert back == json.loads(d.json())
    if usage is not None:
        assert t.cost == d.cost and t.usage == d.usage
    else:  # a document without usage reports none; its stream is counted (an estimate)
        assert d.cost is None and not d.usage.seen and (t.usage.estimated or not t.usage.seen)
    # the relayed stream gives the same final response too
    r = DIALECT.stream(p, PRICING, aggregate=False)
    frames = [r.feed(e) for e in parse(data)]
    assert loads(frames[-1])[1]["response"] == back


# -- UTF-16 halves split across deltas (a JavaScript gateway's cut) ----------------------------


def _split_emoji_events() -> list[dict[str, Any]]:
    """An unnumbered stream (every event re-encoded when relayed) whose text deltas are the
    two UTF-16 halves of an emoji, and whose completed response carries no output."""
    events = worker_events(numbered=False)
    events[4]["delta"], events[5]["delta"] = "\ud83d", "\ude00"
    del events[-1]["response"]["output"]
    return events[:6] + events[-1:]  # no `.done` events: the output is the deltas


def test_a_reencoded_event_keeps_a_lone_surrogate_as_its_escape() -> None:
    out, t = relay(encode(_split_emoji_events()))
    assert b'"delta":"\\ud83d"' in (out[4] or b"") and b'"delta":"\\ude00"' in (out[5] or b"")
    halves = loads(out[4])[1]["delta"] + loads(out[5])[1]["delta"]  # as the worker sent them
    assert halves.encode("utf-16-le", "surrogatepass").decode("utf-16-le") == "\U0001f600"
    assert t.complete


def test_aggregate_joins_a_surrogate_pair_split_across_deltas() -> None:
    doc = orjson.loads(aggregate(encode(_split_emoji_events())).document())
    assert doc["output"][0]["content"][0]["text"] == "\U0001f600"


def test_output_so_far_folds_refusal_and_summary_deltas_into_their_own_parts() -> None:
    """The output a failed (or output-less) response carries: each delta lands in the part
    its content_index / summary_index names."""
    out = OutputSoFar()
    message = {"type": "message", "role": "assistant", "content": []}
    out.read("response.output_item.added", {"output_index": 0, "item": message})
    for sub, part in enumerate([{"type": "output_text", "text": ""}, {"type": "refusal", "refusal": ""}]):
        out.read("response.content_part.added", {"output_index": 0, "content_index": sub, "part": part})
    out.read("response.output_text.delta", {"output_index": 0, "content_index": 0, "delta": "Hi"})
    out.read("response.refusal.delta", {"output_index": 0, "content_index": 1, "delta": "no"})
    out.read("response.output_item.added", {"output_index": 1, "item": {"type": "reasoning", "summary": []}})
    for sub in (0, 1):
        out.read("response.reasoning_summary_part.added",
                 {"output_index": 1, "summary_index": sub, "part": {"type": "summary_text", "text": ""}})
    out.read("response.reasoning_summary_text.delta", {"output_index": 1, "summary_index": 1, "delta": "why"})
    for sub in (0, 1):
        out.read("response.content_part.added",
                 {"output_index": 1, "content_index": sub, "part": {"type": "reasoning_text", "text": ""}})
    out.read("response.reasoning_text.delta", {"output_index": 1, "content_index": 1, "delta": "deep"})
    assert out.output() == [
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Hi"}, {"type": "refusal", "refusal": "no"}]},
        {"type": "reasoning",
         "summary": [{"type": "summary_text", "text": ""}, {"type": "summary_text", "text": "why"}],
         "content": [{"type": "reasoning_text", "text": ""}, {"type": "reasoning_text", "text": "deep"}]},
    ]


def test_document_sse_events_carry_item_ids_statuses_names_and_refusals() -> None:
    """The events replayed from a worker's document are the ones OpenAI streams: every part,
    delta and done event names its item (`item_id`), an item is added `in_progress` (a
    function call with empty arguments), the arguments' done event names the function,
    and a refusal part is streamed as refusal events."""
    refusing = {**MESSAGE_ITEM, "id": "msg_2", "content": [{"type": "refusal", "refusal": "no"}]}
    doc = response("completed", [REASONING_ITEM, MESSAGE_ITEM, FUNCTION_ITEM, refusing], USAGE)
    objs = [json.loads(e.data or "") for e in parse(DIALECT.document(plan(), PRICING, orjson.dumps(doc)).sse())]
    ids = [item["id"] for item in doc["output"]]
    for o in objs:
        if "output_index" in o and o["type"] not in ("response.output_item.added", "response.output_item.done"):
            assert o["item_id"] == ids[o["output_index"]], o
    added = {o["output_index"]: o["item"] for o in objs if o["type"] == "response.output_item.added"}
    assert [added[i].get("status") for i in range(4)] == [None, "in_progress", "in_progress", "in_progress"]
    assert added[2]["arguments"] == ""
    (args_done,) = [o for o in objs if o["type"] == "response.function_call_arguments.done"]
    assert (args_done["name"], args_done["arguments"]) == ("lookup", '{"q": 1}')
    refusal = [(o["type"], o.get("delta", o.get("refusal"))) for o in objs if o["type"].startswith("response.refusal")]
    assert refusal == [("response.refusal.delta", "no"), ("response.refusal.done", "no")]


def test_a_document_that_says_it_is_a_response_is_one_without_an_output_key() -> None:
    doc = {k: v for k, v in response("completed", None, USAGE).items() if k != "output"}
    d = DIALECT.document(plan(), PRICING, orjson.dumps(doc))
    assert not d.worker_error
    kinds = [e.event for e in parse(d.sse())]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"


def test_error_frame_carries_the_workers_own_response_and_the_created_identity() -> None:
    """SPEC: response.failed carries the stream's own response (the worker's fields kept)
    with the id, model and created_at of its response.created, even when a later lifecycle
    event leaves them out."""
    events = worker_events()
    events[0]["response"]["instructions"] = "be brief"
    events[1]["response"] = {k: v for k, v in response().items() if k not in ("id", "model", "created_at")}
    events[1]["response"]["instructions"] = "be brief"
    t = DIALECT.stream(plan(), PRICING, aggregate=False)
    for e in parse(b"".join(encode(events[:5]))):
        t.feed(e)
    _, obj = loads(t.error_frame(failures.UPSTREAM_DISCONNECTED, "gone"))
    failed = obj["response"]
    assert failed["instructions"] == "be brief"
    assert (failed["id"], failed["model"], failed["created_at"]) == ("resp_1", MODEL, 1_700_000_000)


def test_aggregate_fills_what_the_final_response_leaves_out_from_the_created_one() -> None:
    events = worker_events()
    events[-1]["response"] = {k: v for k, v in events[-1]["response"].items()
                              if k not in ("id", "model", "created_at")}
    doc = json.loads(aggregate(encode(events)).document())
    assert (doc["id"], doc["model"], doc["created_at"]) == ("resp_1", MODEL, 1_700_000_000)
    assert doc["output"] == [MESSAGE_ITEM] and doc["usage"]["cost"] == pytest.approx(float(COST))


def test_a_failed_response_document_without_output_is_still_a_failed_response() -> None:
    """`object: "response"` makes it a response (not a bare error object) even with no
    `output` key: a streaming client gets its response.failed, a JSON one the error."""
    failed = {k: v for k, v in response("failed", [], None).items() if k != "output"}
    failed["error"] = {"code": "server_error", "message": "boom"}
    d = DIALECT.document(plan(), PRICING, orjson.dumps(failed))
    assert d.worker_error
    assert [e.event for e in parse(d.sse())][-1] == "response.failed"
    assert json.loads(d.json())["error"]["message"] == "boom"


def test_document_sse_adds_each_part_empty_and_finishes_it_whole() -> None:
    part = {"type": "output_text", "text": "Hi", "annotations": [{"type": "url_citation", "url": "u"}],
            "logprobs": [{"token": "Hi", "logprob": -0.1}]}
    item = {**MESSAGE_ITEM, "content": [part]}
    doc = {k: v for k, v in response("completed", [item, REASONING_ITEM], USAGE).items() if k != "model"}
    objs = [json.loads(e.data or "") for e in parse(DIALECT.document(plan(), PRICING, orjson.dumps(doc)).sse())]
    by_type: dict[str, Any] = {}
    for o in objs:  # the first event of each type
        by_type.setdefault(o["type"], o)
    assert by_type["response.content_part.added"]["part"] == {
        "type": "output_text", "text": "", "annotations": [], "logprobs": []}
    assert by_type["response.content_part.done"]["part"] == part
    assert by_type["response.reasoning_summary_part.added"]["part"] == {"type": "summary_text", "text": ""}
    assert by_type["response.reasoning_summary_part.done"]["part"] == REASONING_ITEM["summary"][0]
    # a document without a model: the request's names the response
    assert by_type["response.created"]["response"]["model"] == MODEL


@pytest.mark.parametrize(
    "event",
    [
        {"output_index": 0, "content_index": -1, "part": {"type": "output_text", "text": "x"}},
        {"output_index": 0, "content_index": 0, "part": "not a part"},
        {"output_index": 0, "content_index": "0", "part": {"type": "output_text", "text": "x"}},
        {"output_index": 7, "content_index": 0, "part": {"type": "output_text", "text": "x"}},
    ],
)
def test_output_so_far_ignores_a_part_it_cannot_place(event: dict[str, Any]) -> None:
    out = OutputSoFar()
    out.read("response.output_item.added", {"output_index": 0, "item": {"type": "message", "content": []}})
    out.read("response.content_part.added", event)
    assert out.output() == [{"type": "message", "content": []}]
