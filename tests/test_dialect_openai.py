"""Unit tests of sidecar.dialects.openai: request plans, stream relay/aggregation, JSON -> SSE.

Pure: no sockets, no event loop. Includes hypothesis round trips
(JSON document -> SSE -> JSON document, and byte-exact relay of unchanged
events under any chunking). The same behaviour through the real daemon is in
test_e2e_openai.py.
"""

from __future__ import annotations

import json
import time
from decimal import Decimal
from itertools import pairwise
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
from sidecar.dialects.openai import (
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OpenAIDocument,
    OpenAIStream,
)
from sidecar.fastlane import template_text
from sidecar.sse import Event, SSEParser
from tests.harness import (
    CREATED,
    DONE,
    MODEL,
    USAGE,
    chat_completion,
    chat_stream_events,
    sse_data,
    sse_payloads,
    text_completion,
    text_completion_events,
)

NO_PRICES = Pricing()
PRICES = Pricing(models={MODEL: Price(prompt=Decimal(1), completion=Decimal(2))})
# 11 prompt x 1 + 3 completion x 2 = 17 per million
COST = 17e-6


def plan(body: dict[str, Any], mode: str = "auto", rid: str = "rid1", dialect=OPENAI_CHAT) -> RequestPlan:
    return dialect.plan(json.dumps(body).encode(), mode, rid)


def events(data: bytes) -> list[Event]:
    parser = SSEParser()
    out = parser.feed(data)
    assert not parser.has_partial
    return out


def relay(translator: OpenAIStream, data: bytes) -> bytes:
    return b"".join(translator.feed(e) or b"" for e in events(data))


def stream_for(body: dict[str, Any], *, aggregate: bool = False, pricing: Pricing = NO_PRICES,
               mode: str = "auto", dialect=OPENAI_CHAT) -> OpenAIStream:
    translator = dialect.stream(plan(body, mode, dialect=dialect), pricing, aggregate=aggregate)
    assert isinstance(translator, OpenAIStream)
    return translator


def payloads(data: bytes) -> list[Any]:
    return [p if p == "[DONE]" else json.loads(p) for p in sse_payloads(data)]


STREAMING = {"model": MODEL, "messages": [], "stream": True}
STREAMING_USAGE = {**STREAMING, "stream_options": {"include_usage": True}}
NON_STREAMING = {"model": MODEL, "messages": []}

# ============================================================================ plan


def test_plan_auto_streaming_client_asks_the_worker_for_usage() -> None:
    p = plan({**STREAMING, "stream_options": {"continuous_usage_stats": True}, "n": 2, "x": [1]})
    sent = orjson.loads(p.body)
    assert sent["stream"] is True
    assert sent["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    assert sent["n"] == 2 and sent["x"] == [1] and sent["messages"] == []
    assert p.client_stream is True and p.asked_stream is True
    assert p.include_usage is False  # the client did not ask to see it
    assert p.request_model == MODEL and p.request_id == "rid1"


def test_plan_auto_streaming_client_that_asked_for_usage() -> None:
    p = plan(STREAMING_USAGE)
    assert p.include_usage is True
    assert orjson.loads(p.body)["stream_options"] == {"include_usage": True}


def test_plan_auto_non_streaming_client() -> None:
    p = plan({**NON_STREAMING, "stream_options": {"include_usage": True}})
    sent = orjson.loads(p.body)
    assert sent["stream"] is False
    assert "stream_options" not in sent
    assert p.client_stream is False and p.asked_stream is False and p.include_usage is False


def test_plan_always_streams_for_a_non_streaming_client() -> None:
    p = plan(NON_STREAMING, "always")
    sent = orjson.loads(p.body)
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert p.client_stream is False and p.asked_stream is True


def test_plan_never_asks_for_one_document() -> None:
    p = plan(STREAMING_USAGE, "never")
    sent = orjson.loads(p.body)
    assert sent["stream"] is False and "stream_options" not in sent
    assert p.client_stream is True and p.asked_stream is False and p.include_usage is True


@pytest.mark.parametrize(("mode", "client_stream", "worker_streams"), [
    ("auto", True, True), ("auto", False, False), ("always", True, True), ("always", False, True),
    ("never", True, False), ("never", False, False),
])
def test_plan_completions_asks_a_streaming_worker_for_usage(mode: str, client_stream: bool,
                                                            worker_streams: bool) -> None:
    """openai-completions too: `stream_options.include_usage` whenever the worker streams,
    no `stream_options` when it is asked for one document."""
    body: dict[str, Any] = {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": False}}
    if client_stream:
        body["stream"] = True
    sent = orjson.loads(plan(body, mode, dialect=OPENAI_COMPLETIONS).body)
    assert sent["stream"] is worker_streams
    assert sent.get("stream_options") == ({"include_usage": True} if worker_streams else None)


def test_plan_keeps_other_fields_and_tolerates_missing_model() -> None:
    p = plan({"messages": [{"role": "user", "content": "\u00e9\U0001f600"}], "tools": [{"a": 1}]})
    sent = orjson.loads(p.body)
    assert sent["messages"][0]["content"] == "\u00e9\U0001f600"
    assert sent["tools"] == [{"a": 1}]
    assert p.request_model is None


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b"[1,2]", b'"s"', b"null", b"\xff\xfe"])
def test_plan_refuses_what_is_not_a_json_object(body: bytes) -> None:
    with pytest.raises(BadRequest):
        OPENAI_CHAT.plan(body, "auto", "r")
    with pytest.raises(BadRequest):
        OPENAI_COMPLETIONS.plan(body, "auto", "r")


@pytest.mark.parametrize("name", ["openai-chat", "openai-completions", "anthropic-messages", "openai-responses"])
def test_every_dialect_takes_only_a_boolean_stream_flag(name: str) -> None:
    dialect = get_dialect(name)
    for flag, streams in ((True, True), (False, False), (None, False)):
        assert dialect.plan(orjson.dumps({"model": "m", "stream": flag}), "auto", "r").client_stream is streams
    assert dialect.plan(b'{"model": "m"}', "auto", "r").client_stream is False
    for flag in ("true", "false", 1, 0, [], {}):  # a worker may read "true" as true: no guess
        with pytest.raises(BadRequest, match="stream"):
            dialect.plan(orjson.dumps({"model": "m", "stream": flag}), "always", "r")


@pytest.mark.parametrize(("body", "mode"), [
    (b'{"model": "m", "messages": [], "temperature": 0.70}', "auto"),
    (b'{"stream" : false, "model": "m", "prompt": "\\u00e9"}', "never"),
    (b'{"model": "m", "stream": true, "stream_options": {"include_usage": true, "x": 1}}', "auto"),
    (b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}', "always"),
])
def test_a_body_that_already_says_what_the_worker_is_asked_goes_as_it_came(body: bytes, mode: str) -> None:
    for dialect in (OPENAI_CHAT, OPENAI_COMPLETIONS):
        assert dialect.plan(body, mode, "r").body == body  # not re-encoded: spacing, escapes, 0.70


@pytest.mark.parametrize("name", ["openai-chat", "openai-completions", "anthropic-messages", "openai-responses"])
def test_integers_past_64_bits_reach_the_worker_exactly(name: str) -> None:
    big = 2**70 + 1  # orjson alone would make it 1.1805916207174113e+21
    body = b'{"model": "m", "seed": %d, "logit_bias": {"5": -100}, "n": -%d, "t": 0.5, "s": "\\u00e9"}' % (big, big)
    for mode in ("always", "never"):
        sent = json.loads(get_dialect(name).plan(body, mode, "r").body)
        assert sent["seed"] == big and sent["n"] == -big and sent["t"] == 0.5 and sent["s"] == "\u00e9"
        assert sent["stream"] is (mode == "always") and sent["logit_bias"] == {"5": -100}


@pytest.mark.parametrize("name", ["openai-chat", "anthropic-messages"])
def test_a_deeply_nested_body_that_must_change_is_forwarded_or_refused(name: str) -> None:
    # orjson reads 1,024 levels but writes only 254: deeper bodies are written exactly by
    # the standard library, and past what it can write the client gets a 400, not a 500
    nested = b"[" * 600 + b"]" * 600
    body = b'{"model": "m", "x": %s}' % nested
    sent = json.loads(get_dialect(name).plan(body, "always", "r").body)
    assert sent["stream"] is True and json.dumps(sent["x"]).replace(" ", "").encode() == nested
    deepest = b'{"model": "m", "x": %s}' % (b"[" * 1020 + b"]" * 1020)
    with pytest.raises(BadRequest, match="nested too deeply"):
        get_dialect(name).plan(deepest, "always", "r")


_DOCUMENTS_NAMING = {  # a worker's document naming its model with a lone surrogate escape
    "openai-chat": b'{"object":"chat.completion","model":"m\\ud83d","choices":[]}',
    "openai-completions": b'{"object":"text_completion","model":"m\\ud83d","choices":[]}',
    "anthropic-messages": b'{"type":"message","role":"assistant","model":"m\\ud83d","content":[]}',
    "openai-responses": b'{"object":"response","model":"m\\ud83d","output":[]}',
}


@pytest.mark.parametrize("name", list(_DOCUMENTS_NAMING))
def test_a_model_named_with_a_lone_surrogate_escape_is_mended(name: str) -> None:
    # the ledger, metrics and logs write UTF-8: the name they get has U+FFFD in its place
    dialect = get_dialect(name)
    body = b'{"model": "m", "stream": false}'
    document = dialect.document(dialect.plan(body, "never", "r"), NO_PRICES, _DOCUMENTS_NAMING[name])
    assert document.model == "m\ufffd"
    if name.startswith("openai-c"):
        t = stream_for(STREAMING, dialect=OPENAI_CHAT if name == "openai-chat" else OPENAI_COMPLETIONS)
        relay(t, b'data: {"id":"x","created":1,"model":"m\\ud83d","choices":[]}\n\n')
        assert t.model == "m\ufffd"


@pytest.mark.parametrize("body", [b'{"seed": 12345678901234567890123, "x": 1e400}',
                                  b'{"seed": 12345678901234567890123, "x": NaN}',
                                  b'{"seed": 12345678901234567890123, "x": "\xff"}',
                                  b'[12345678901234567890123]',
                                  b'{"seed": 12345678901234567890123, "x": "\\ud800"}'])
def test_a_body_read_exactly_is_still_only_json(body: bytes) -> None:
    with pytest.raises(BadRequest):
        OPENAI_CHAT.plan(body, "always", "r")


@pytest.mark.parametrize("wrong", [[1], "x", 5])
def test_aggregating_a_chat_message_or_delta_that_is_no_object(wrong: Any) -> None:
    t = stream_for(NON_STREAMING, aggregate=True, mode="always")
    for choice in ({"index": 0, "message": wrong}, {"index": 0, "delta": wrong},
                   {"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}):
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [choice]}
        (event,) = events(b"data: " + orjson.dumps(chunk) + b"\n\n")
        t.feed(event)
    (choice,) = orjson.loads(t.document())["choices"]
    assert choice["message"] == {"role": "assistant", "content": "hi"}


def test_error_body_shape() -> None:
    body = orjson.loads(OPENAI_CHAT.error_body(502, "upstream_unavailable", "worker down"))
    assert body == {"error": {"message": "worker down", "type": body["error"]["type"],
                              "code": "upstream_unavailable"}}
    assert isinstance(body["error"]["type"], str) and body["error"]["type"]
    assert orjson.loads(OPENAI_CHAT.error_body(400, "x", "m"))["error"]["type"] == "invalid_request_error"


# ============================================================================ stream, relay


@pytest.mark.parametrize("flavor", ["vllm", "sglang", "llamacpp", "ollama", "tgi"])
def test_relay_forwards_unchanged_events_as_their_exact_bytes(flavor: str) -> None:
    data = b"".join(chat_stream_events(flavor=flavor, id="gen-1"))
    t = stream_for(STREAMING_USAGE)
    out = relay(t, data)
    assert out == data
    assert t.complete
    assert t.usage.prompt_tokens == 11 and t.usage.completion_tokens == 3
    assert not t.usage.estimated and not t.worker_error


def test_relay_returns_the_very_bytes_object_for_a_pass_through_event() -> None:
    t = stream_for(STREAMING_USAGE)
    ev = events(chat_stream_events()[1])[0]
    assert t.feed(ev) is ev.raw


@pytest.mark.parametrize("flavor", ["vllm", "sglang", "ollama"])
def test_usage_chunk_recorded_but_hidden_from_a_client_that_did_not_ask(flavor: str) -> None:
    data = b"".join(chat_stream_events(flavor=flavor))
    t = stream_for(STREAMING)
    out = payloads(relay(t, data))
    assert out[-1] == "[DONE]"
    chunks = out[:-1]
    assert all(c["choices"] for c in chunks), "the usage-only chunk was forwarded"
    assert not any(c.get("usage") for c in chunks)
    assert t.usage.prompt_tokens == 11 and t.usage.completion_tokens == 3


@pytest.mark.parametrize("flavor", ["llamacpp", "tgi"])
def test_usage_on_the_finish_chunk_is_removed_but_the_finish_kept(flavor: str) -> None:
    data = b"".join(chat_stream_events(flavor=flavor))
    t = stream_for(STREAMING)
    out = payloads(relay(t, data))
    finish = [c for c in out[:-1] if c["choices"][0]["finish_reason"] is not None]
    assert len(finish) == 1
    assert not finish[0].get("usage")
    if flavor == "llamacpp":
        assert finish[0]["timings"]["predicted_n"] == 3  # extra fields kept
    assert t.usage.prompt_tokens == 11


@pytest.mark.parametrize("body", [STREAMING, STREAMING_USAGE])
def test_a_rewritten_chunk_keeps_the_workers_event_name_and_id(body: dict[str, Any]) -> None:
    """A chunk the sidecar writes again (usage removed, cost injected, an empty id filled in)
    keeps the `event:` and `id:` lines the worker gave it, as the typed dialects keep `id:`:
    a client that reads them (Last-Event-ID) sees the same stream with or without sidecar."""
    named = [b"event: chunk\nid: %d\n" % i + e if e != DONE else e
             for i, e in enumerate(chat_stream_events(flavor="tgi"))]
    t = stream_for(body, pricing=PRICES)
    out = relay(t, b"".join(named))
    sent = [e for e in events(out) if e.data is not None]
    assert sent[-1].data == "[DONE]"
    rewritten = [e for e in sent[:-1] if e.raw not in named]
    assert rewritten, "the TGI stream's empty ids make every chunk a rewritten one"
    for e in sent[:-1]:
        assert e.event == "chunk" and e.id is not None
        assert e.raw in named or json.loads(e.data or "")["id"] == "chatcmpl-rid1"
    ids = [int(e.id or "") for e in sent[:-1]]
    assert ids == sorted(ids)


def test_continuous_usage_largest_value_wins_and_is_hidden_unless_asked() -> None:
    evs = []
    for i, piece in enumerate(["a", "b", "c"]):
        evs.append(sse_data({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                             "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
                             "usage": {"prompt_tokens": 11, "completion_tokens": i + 1}}))
    evs.append(sse_data({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                         "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 11, "completion_tokens": 3}}))
    evs.append(sse_data({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                         "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3}}))
    evs.append(DONE)
    data = b"".join(evs)
    hidden = stream_for(STREAMING)
    out = payloads(relay(hidden, data))
    assert [c["choices"][0]["delta"].get("content") for c in out[:3]] == ["a", "b", "c"]
    assert not any("usage" in c for c in out[:-1])
    assert len(out) == 5  # 3 content, finish, [DONE]; the usage-only chunk hidden
    assert (hidden.usage.prompt_tokens, hidden.usage.completion_tokens) == (11, 3)
    shown = stream_for(STREAMING_USAGE, pricing=PRICES)
    out = payloads(relay(shown, data))
    assert out[0]["usage"] == {"prompt_tokens": 11, "completion_tokens": 1}
    assert out[-2]["usage"]["cost"] == pytest.approx(COST)


def test_usage_where_cost_is_injected_carries_the_counts_that_were_priced() -> None:
    """Reports that disagree (a larger prompt count early, a smaller one in the usage chunk):
    per field the largest wins, and the chunk carrying the cost, like the aggregated
    document, shows those counts, so its usage and its cost agree."""
    def chunk_(choices: list[Any], usage: dict[str, int]) -> bytes:
        return sse_data({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                         "choices": choices, "usage": usage})
    data = b"".join([
        chunk_([{"index": 0, "delta": {"content": "a"}, "finish_reason": None}],
               {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101,
                "prompt_tokens_details": {"cached_tokens": 40}}),
        chunk_([{"index": 0, "delta": {}, "finish_reason": "stop"}], {"prompt_tokens": 90, "completion_tokens": 2}),
        chunk_([], {"prompt_tokens": 90, "completion_tokens": 2, "total_tokens": 92}),
        DONE,
    ])
    for aggregate in (False, True):
        t = stream_for(STREAMING_USAGE if not aggregate else NON_STREAMING, pricing=PRICES,
                       aggregate=aggregate)
        out = relay(t, data)
        usage = json.loads(t.document())["usage"] if aggregate else payloads(out)[-2]["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (100, 2)
        assert usage["total_tokens"] == 101  # a field too: the largest reported
        assert usage["prompt_tokens_details"] == {"cached_tokens": 40}  # from the first report
        assert Decimal(str(usage["cost"])) == Decimal("0.000104") == t.cost  # 100 x 1 + 2 x 2
    # the same for reasoning tokens reported in an earlier chunk only
    data = data.replace(b'"prompt_tokens_details":{"cached_tokens":40}',
                        b'"completion_tokens_details":{"reasoning_tokens":1}')
    t = stream_for(STREAMING_USAGE, pricing=PRICES)
    assert payloads(relay(t, data))[-2]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 1}


def test_per_choice_usage_on_each_finish_chunk_gives_the_largest_of_each_field() -> None:
    """llama.cpp with n=2: each choice's finish chunk carries that choice's usage; the usage
    the client reads is per field the largest, total_tokens included."""
    def finish(index: int, completion: int) -> bytes:
        return sse_data({"id": "x", "object": "text_completion", "created": 1, "model": MODEL,
                         "choices": [{"index": index, "text": "", "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 100, "completion_tokens": completion,
                                   "total_tokens": 100 + completion}})
    data = finish(0, 5) + finish(1, 3) + DONE
    body = {"model": MODEL, "prompt": "x", "n": 2}
    for aggregate in (False, True):
        t = OPENAI_COMPLETIONS.stream(
            plan({**body, "stream": not aggregate, "stream_options": {"include_usage": True}},
                 dialect=OPENAI_COMPLETIONS), PRICES, aggregate)
        out = relay(t, data)
        usages = ([json.loads(t.document())["usage"]] if aggregate
                  else [c["usage"] for c in payloads(out)[:-1]])
        for usage in usages[-1:] if aggregate else usages[1:]:
            assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) \
                == (100, 5, 105), usage


def test_cost_injected_in_the_usage_chunk_when_priced() -> None:
    t = stream_for(STREAMING_USAGE, pricing=PRICES)
    out = payloads(relay(t, b"".join(chat_stream_events())))
    usage_chunk = out[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["cost"] == pytest.approx(COST)
    assert usage_chunk["usage"]["prompt_tokens"] == 11
    assert t.cost == Decimal("0.000017")


def test_unpriced_model_gets_no_cost() -> None:
    body = {**STREAMING_USAGE, "model": "other"}
    t = stream_for(body, pricing=PRICES)
    out = payloads(relay(t, b"".join(chat_stream_events(model="other"))))
    assert "cost" not in out[-2]["usage"]
    assert t.cost is None


def test_response_model_is_priced_before_the_request_model() -> None:
    t = stream_for({**STREAMING_USAGE, "model": "alias"}, pricing=PRICES)
    relay(t, b"".join(chat_stream_events(model=MODEL)))
    assert t.model == MODEL and t.cost == Decimal("0.000017")


AZURE_OPENER = sse_data({"id": "", "object": "", "created": 0, "model": "", "choices": [],
                         "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]})


@pytest.mark.parametrize("aggregate", [False, True])
def test_the_response_model_is_the_first_one_named_after_chunks_that_name_none(aggregate: bool) -> None:
    # Azure opens with a chunk whose id, created and model are empty: the response's
    # model, the one priced and written to the ledger, is the one the later chunks name
    body = NON_STREAMING if aggregate else STREAMING_USAGE
    t = stream_for({**body, "model": "alias"}, pricing=PRICES, aggregate=aggregate,
                   mode="always" if aggregate else "auto")
    out = relay(t, AZURE_OPENER + b"".join(chat_stream_events(model=MODEL)))
    assert (t.model, t.id, t.created) == (MODEL, "chatcmpl-abc123", CREATED)
    assert t.cost == Decimal("0.000017")
    if aggregate:
        document = json.loads(t.document())
        assert (document["model"], document["id"], document["created"]) == (MODEL, "chatcmpl-abc123", CREATED)
        assert document["usage"]["cost"] == pytest.approx(COST)
    else:
        chunks = payloads(out)[:-1]
        assert chunks[0]["model"] == "alias"  # the opener: nothing better was known yet
        assert {c["model"] for c in chunks[1:]} == {MODEL}
        assert chunks[-1]["usage"]["cost"] == pytest.approx(COST)


@pytest.mark.parametrize("aggregate", [False, True])
def test_integers_past_64_bits_in_chunks_are_written_again_as_they_came(aggregate: bool) -> None:
    # chunks that are written again (merged into one document, or the usage chunk that gets
    # its cost) keep their integers past 64 bits: orjson alone would read them as floats
    big, small = 2**64 + 1, -(2**63) - 1
    chunks = [json.loads(e[6:]) for e in chat_stream_events()[:-1]]
    raw = b"".join(b"data: " + orjson.dumps(c)[:-1] + b',"seed":%d,"n":[%d]}\n\n' % (big, small)
                   for c in chunks) + DONE
    body = NON_STREAMING if aggregate else STREAMING_USAGE
    t = stream_for(body, pricing=PRICES, aggregate=aggregate, mode="always" if aggregate else "auto")
    out = relay(t, raw)
    written = t.document() if aggregate else out
    assert b'"seed":%d' % big in written and b'"n":[%d]' % small in written
    parsed = [json.loads(written)] if aggregate else payloads(out)[:-1]
    assert {c["seed"] for c in parsed} == {big}
    assert parsed[-1]["usage"]["cost"] == pytest.approx(COST)
    assert t.cost == Decimal("0.000017")


def test_missing_id_created_model_are_filled_in() -> None:
    before = int(time.time())
    t = stream_for({**STREAMING_USAGE, "model": "asked-model"})
    out = payloads(relay(t, b"".join(chat_stream_events(id=None, created=None, model=None))))
    for c in out[:-1]:
        assert c["id"] == "chatcmpl-rid1"
        assert before - 1 <= c["created"] <= int(time.time()) + 1
        assert c["model"] == "asked-model"
        assert c["object"] == "chat.completion.chunk"


@pytest.mark.parametrize("key", ["id", "object", "created", "model"])
def test_a_key_only_later_chunks_leave_out_gets_the_first_chunks_value(key: str) -> None:
    events = [json.loads(e[6:]) for e in chat_stream_events()[:-1]]
    for later in events[1:]:
        later.pop(key, None)
    out = relay(stream_for(STREAMING_USAGE), b"".join(sse_data(e) for e in events) + DONE)
    assert {c[key] for c in payloads(out)[:-1]} == {events[0][key]}


def test_empty_id_is_filled_consistently() -> None:
    t = stream_for(STREAMING_USAGE)
    out = payloads(relay(t, b"".join(chat_stream_events(flavor="tgi"))))  # TGI sends "id": ""
    assert {c["id"] for c in out[:-1]} == {"chatcmpl-rid1"}
    assert out[-1] == "[DONE]"


def test_comments_and_crlf_pass_through_untouched() -> None:
    data = b": ping\r\n\r\n" + b"".join(chat_stream_events(eol=b"\r\n")) + b": bye\n\n"
    t = stream_for(STREAMING_USAGE)
    assert relay(t, data) == data
    assert t.complete


def test_nothing_after_done_is_read() -> None:
    data = b"".join(chat_stream_events()) + b"data: not json at all\n\n"
    t = stream_for(STREAMING_USAGE)
    out = relay(t, data)  # must not raise: what follows [DONE] is not parsed (nor passed on)
    assert out == b"".join(chat_stream_events())
    assert t.complete and not t.worker_error


def test_finish_reason_alone_completes_the_stream() -> None:
    t = stream_for(STREAMING_USAGE)
    relay(t, b"".join(chat_stream_events(done=False)))
    assert t.complete


def test_a_stream_without_finish_or_done_is_not_complete() -> None:
    t = stream_for(STREAMING_USAGE)
    relay(t, b"".join(chat_stream_events(finish_reason=None, done=False, include_usage=False)))
    assert not t.complete


def _choice_chunk(index: int, content: str | None, finish: str | None = None,
                  chat: bool = True, **extra: Any) -> bytes:
    choice: dict[str, Any] = {"index": index, "finish_reason": finish, **extra}
    if chat:
        choice["delta"] = {} if content is None else {"content": content}
    else:
        choice["text"] = content or ""
    return sse_data({"id": "x", "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": 1, "model": MODEL, "choices": [choice]})


@pytest.mark.parametrize("chat", [True, False])
def test_with_several_choices_the_stream_is_complete_only_when_each_finished(chat: bool) -> None:
    """n=2 cut after choice 0's finish: choice 1 never finished, so no success (neither
    relayed nor aggregated); once it finishes, or at [DONE], the stream is complete."""
    dialect = OPENAI_CHAT if chat else OPENAI_COMPLETIONS
    body = {**STREAMING_USAGE, "n": 2} if chat else {"model": MODEL, "prompt": "x", "n": 2, "stream": True}
    begun = (_choice_chunk(0, "Par", chat=chat) + _choice_chunk(1, " Lyon", chat=chat)
             + _choice_chunk(0, "is", "stop", chat=chat))
    for aggregate in (False, True):
        t = stream_for(body, aggregate=aggregate, dialect=dialect)
        relay(t, begun)
        assert not t.complete
        relay(t, _choice_chunk(0, None, chat=chat))  # said again after its finish: still done
        assert not t.complete
        relay(t, _choice_chunk(1, " is", "length", chat=chat))
        assert t.complete
        relay(t, _choice_chunk(2, "late", chat=chat))  # a choice begun after the others ended
        assert not t.complete
    t = stream_for(body, dialect=dialect)
    relay(t, begun + DONE)
    assert t.complete


def test_aggregate_replaces_what_a_choice_says_again_outside_its_delta() -> None:
    """A finish_reason repeated on the usage-carrying chunk, and content filter results on
    every chunk, are said again, not continued: never `"stopstop"` or `"safesafe"`."""
    filters = {"hate": {"filtered": False, "severity": "safe"}}
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    t = stream_for(NON_STREAMING, aggregate=True, mode="always")
    relay(t, _choice_chunk(0, "Hello", content_filter_results=filters)
          + _choice_chunk(0, " there", "stop", content_filter_results=filters)
          + sse_data({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                      "choices": [{"index": 0, "delta": {}, "finish_reason": "stop",
                                   "content_filter_results": filters}], "usage": usage})
          + DONE)
    choice = orjson.loads(t.document())["choices"][0]
    assert choice["message"]["content"] == "Hello there"
    assert choice["finish_reason"] == "stop"
    assert choice["content_filter_results"] == filters


def test_aggregate_concatenates_what_is_generated_however_a_chunk_carries_it() -> None:
    """`text` beside a chat delta, a chat worker that streams `message` for `delta`: pieces
    of the generation, concatenated; a completion chunk's stray `delta` is left out."""
    t = stream_for(NON_STREAMING, aggregate=True, mode="always")
    relay(t, _choice_chunk(0, "Hello", text="Hello") + _choice_chunk(0, " world", "stop", text=" world")
          + DONE)
    choice = orjson.loads(t.document())["choices"][0]
    assert (choice["text"], choice["message"]["content"]) == ("Hello world", "Hello world")
    t = stream_for(NON_STREAMING, aggregate=True, mode="always")
    for piece, finish in (("Hel", None), ("lo", "stop")):
        chunk = orjson.loads(_choice_chunk(0, piece, finish)[len(b"data: "):])
        chunk["choices"][0]["message"] = chunk["choices"][0].pop("delta")
        relay(t, sse_data(chunk))
    relay(t, DONE)
    assert orjson.loads(t.document())["choices"][0]["message"]["content"] == "Hello"
    body = {"model": MODEL, "prompt": "x"}
    t = stream_for(body, aggregate=True, mode="always", dialect=OPENAI_COMPLETIONS)
    relay(t, _choice_chunk(0, "Hi", "stop", chat=False, delta={"content": "Hi"}) + DONE)
    choice = orjson.loads(t.document())["choices"][0]
    assert choice["text"] == "Hi" and "delta" not in choice


def test_aggregate_leaves_out_the_chunks_obfuscation_padding() -> None:
    t = stream_for(NON_STREAMING, aggregate=True, mode="always")
    chunk = orjson.loads(_choice_chunk(0, "Hi", "stop")[len(b"data: "):])
    relay(t, sse_data({**chunk, "obfuscation": "u8", "service_tier": "default"}) + DONE)
    doc = orjson.loads(t.document())
    assert "obfuscation" not in doc
    assert doc["service_tier"] == "default"


@pytest.mark.parametrize("data", [b"data: {not json\n\n", b"data: [1, 2]\n\n", b'data: "x"\n\n',
                                  b'data: {"choices": [1]}\n\n'])
def test_data_that_is_not_a_chunk_is_a_protocol_error(data: bytes) -> None:
    t = stream_for(STREAMING_USAGE)
    with pytest.raises(StreamProtocolError):
        relay(t, data)


@pytest.mark.parametrize("index", [{"r": 1}, [0], "0", 1.5])
def test_a_choice_index_that_is_no_integer_is_a_protocol_error_when_aggregating(index: Any) -> None:
    """Aggregated choices are keyed and ordered by their index (found by the atheris fuzzer:
    a dict index crashed the aggregator with a TypeError)."""
    t = stream_for(STREAMING_USAGE, aggregate=True)
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": index, "delta": {"content": "x"}, "finish_reason": None}]}
    with pytest.raises(StreamProtocolError):
        relay(t, sse_data(chunk))


def test_worker_error_event_is_forwarded_and_noted() -> None:
    err = sse_data({"error": {"message": "overloaded", "type": "server_error", "code": 503}})
    data = chat_stream_events()[1] + err
    t = stream_for(STREAMING_USAGE)
    assert relay(t, data) == data
    assert t.worker_error


def test_nothing_but_comments_follows_the_workers_error() -> None:
    """vLLM and TGI write `data: [DONE]` after their error chunk: a client that skips error
    chunks would take that for a success, so the error is the stream's last event, whatever
    the worker sends after it (a template event included), relayed or aggregated."""
    first = chat_stream_events(["Hel", "lo", "you"])
    err = sse_data({"error": {"message": "overloaded", "type": "server_error", "code": 503}})
    t = stream_for(STREAMING_USAGE)
    assert relay(t, b"".join(first[:3])) == b"".join(first[:3])
    assert t.text_template is not None  # the content event the lane would take
    assert relay(t, err) == err and t.ended
    assert t.text_template is None
    assert relay(t, first[3] + b": keep-alive\n\n" + b"".join(first[4:]) + DONE) == b": keep-alive\n\n"


@pytest.mark.parametrize("value", [b'{"code":400,"message":"too long","type":"invalid_request_error"}',
                                   b"plain words"])
def test_llamacpp_error_line_is_the_workers_error(value: bytes) -> None:
    """llama.cpp writes a failure as an `error:` field (clients skip it) and then `[DONE]`:
    it is the worker's error, passed on as the `data: {"error": ...}` chunk clients raise on,
    and a stream that then ends with `[DONE]` is no success."""
    line = b"error: " + value + b"\n\n"
    t = stream_for(STREAMING_USAGE)
    out = relay(t, chat_stream_events()[0] + line + b"data: [DONE]\n\n")
    sent = [e for e in events(out) if e.data is not None]
    error = orjson.loads(sent[1].data)["error"]
    assert error["message"] == ("too long" if value.startswith(b"{") else "plain words")
    assert len(sent) == 2 and t.worker_error and t.ended  # its [DONE] does not follow
    aggregated = stream_for(NON_STREAMING, aggregate=True, mode="always")
    relay(aggregated, line + b"data: [DONE]\n\n")
    assert aggregated.worker_error
    assert orjson.loads(aggregated.document())["error"] == error


def test_usage_estimated_from_content_events_when_the_worker_sends_none() -> None:
    t = stream_for(STREAMING)
    relay(t, b"".join(chat_stream_events(usage=None)))
    assert t.usage.estimated
    assert t.usage.completion_tokens == 3


def test_an_estimate_made_at_one_choices_finish_counts_the_rest_of_the_stream() -> None:
    """n = 2, each finish chunk with a usage that counts nothing (an estimate is made at the
    first): the estimate at the end counts every content delta, those after it too."""
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": MODEL}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        return sse_data({**base, "choices": [{"index": index, "delta": delta,
                                              "finish_reason": finish}], **extra})

    t = stream_for(STREAMING, pricing=PRICES)
    relay(t, b"".join([chunk(0, {"content": "a"}), chunk(1, {"content": "b"}),
                       chunk(0, {}, "stop", usage={}), chunk(1, {"content": "c"}),
                       chunk(1, {"content": "d"}), chunk(1, {}, "stop", usage={}), DONE]))
    t.settle()
    assert (t.usage.completion_tokens, t.usage.estimated) == (4, True)
    assert t.cost == Decimal("0.000008")


# ============================================================================ error frame


def test_error_frame_after_worker_chunks_uses_the_workers_id() -> None:
    t = stream_for(STREAMING_USAGE)
    relay(t, chat_stream_events()[0])
    frame = t.error_frame(failures.UPSTREAM_DISCONNECTED, "gone")
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n") and frame.count(b"\n\n") == 1
    obj = payloads(frame)[0]
    assert obj == {
        "id": "chatcmpl-abc123",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "error"}],
        "error": {"message": "gone", "type": "upstream_error", "code": "upstream_disconnected"},
    }


@pytest.mark.parametrize(
    "failure",
    [failures.UPSTREAM_DISCONNECTED, failures.UPSTREAM_TIMEOUT,
     failures.UPSTREAM_PROTOCOL_ERROR, failures.UPSTREAM_INCOMPLETE],
)
def test_error_frame_before_any_chunk(failure: failures.Failure) -> None:
    before = int(time.time())
    p = plan({**STREAMING, "model": "m1"}, rid="req-9")
    obj = payloads(OPENAI_CHAT.error_frame(p, failure, "msg"))[0]
    assert obj["id"] == "chatcmpl-req-9"
    assert obj["model"] == "m1"
    assert before - 1 <= obj["created"] <= int(time.time()) + 1
    assert obj["choices"] == [{"index": 0, "delta": {}, "finish_reason": "error"}]
    assert obj["error"]["code"] == failure.code
    assert obj["error"]["type"] == "upstream_error"
    assert "[DONE]" not in sse_payloads(OPENAI_CHAT.error_frame(p, failure, "msg"))


def test_completions_error_frame() -> None:
    p = plan({**STREAMING, "prompt": "x"}, dialect=OPENAI_COMPLETIONS)
    obj = payloads(OPENAI_COMPLETIONS.error_frame(p, failures.UPSTREAM_TIMEOUT, "slow"))[0]
    assert obj["object"] == "text_completion"
    assert obj["choices"] == [{"index": 0, "delta": {}, "text": "", "finish_reason": "error"}]
    assert obj["error"]["code"] == "upstream_timeout"


# ============================================================================ stream, aggregate


def test_aggregate_two_choices_with_tool_calls_and_reasoning() -> None:
    calls = [{"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
             {"id": "call_2", "name": "get_time", "arguments": '{"tz": "Europe/Paris"}'}]
    data = b"".join(chat_stream_events(["Hel", "lo"], n=2, tool_calls=calls, reasoning=["th", "ink"]))
    t = stream_for(NON_STREAMING, aggregate=True, pricing=PRICES, mode="always")
    assert relay(t, data) == b""
    assert t.complete
    doc = orjson.loads(t.document())
    assert doc["object"] == "chat.completion"
    assert doc["id"] == "chatcmpl-abc123" and doc["created"] == 1_700_000_000 and doc["model"] == MODEL
    assert [c["index"] for c in doc["choices"]] == [0, 1]
    for i, choice in enumerate(doc["choices"]):
        msg = choice["message"]
        assert msg["role"] == "assistant"
        assert msg["content"] == f"Hel{i}lo{i}"
        assert msg["reasoning_content"] == "think"
        assert msg["tool_calls"] == [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_time", "arguments": '{"tz": "Europe/Paris"}'}},
        ]
        assert choice["finish_reason"] == "tool_calls"
    assert doc["usage"]["prompt_tokens"] == 11 and doc["usage"]["completion_tokens"] == 3
    assert doc["usage"]["cost"] == pytest.approx(COST)


@pytest.mark.parametrize("flavor", ["vllm", "sglang", "llamacpp", "ollama", "tgi"])
def test_aggregate_every_flavor(flavor: str) -> None:
    t = stream_for(NON_STREAMING, aggregate=True, mode="always")
    relay(t, b"".join(chat_stream_events(flavor=flavor)))
    doc = orjson.loads(t.document())
    assert doc["choices"][0]["message"]["content"] == "Hello!"
    assert doc["choices"][0]["message"]["role"] == "assistant"
    assert doc["choices"][0]["finish_reason"] == "stop"
    assert doc["usage"]["total_tokens"] == 14
    if flavor in ("llamacpp", "ollama", "tgi"):
        assert doc["system_fingerprint"]
    if flavor == "llamacpp":
        assert doc["timings"]["predicted_n"] == 3


def test_aggregate_concatenates_logprobs() -> None:
    def ev(tok: str, finish: str | None = None) -> bytes:
        return sse_data({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                         "choices": [{"index": 0, "delta": {"content": tok}, "finish_reason": finish,
                                      "logprobs": {"content": [{"token": tok, "logprob": -0.1}]}}]})
    t = stream_for(NON_STREAMING, aggregate=True, mode="always")
    relay(t, ev("a") + ev("b") + ev("c", "length") + DONE)
    choice = orjson.loads(t.document())["choices"][0]
    assert [e["token"] for e in choice["logprobs"]["content"]] == ["a", "b", "c"]
    assert choice["finish_reason"] == "length"


def test_aggregate_concatenates_completion_logprobs_per_choice() -> None:
    """openai-completions: each choice's `logprobs` lists (tokens, token_logprobs,
    top_logprobs, text_offset) are appended chunk by chunk, choices interleaved."""
    def ev(index: int, tok: str, offset: int, finish: str | None = None) -> bytes:
        lp = {"tokens": [tok], "token_logprobs": [-0.5], "top_logprobs": [{tok: -0.5}], "text_offset": [offset]}
        return sse_data({"id": "cmpl-x", "object": "text_completion", "created": 1, "model": MODEL,
                         "choices": [{"index": index, "text": tok, "logprobs": lp, "finish_reason": finish}]})
    t = stream_for({"model": MODEL, "prompt": "x"}, aggregate=True, mode="always", dialect=OPENAI_COMPLETIONS)
    relay(t, ev(0, "He", 0) + ev(1, "Yo", 0) + ev(0, "llo", 2, "length") + ev(1, "!", 2, "stop") + DONE)
    choices = orjson.loads(t.document())["choices"]
    assert [(c["index"], c["text"], c["finish_reason"]) for c in choices] == [(0, "Hello", "length"), (1, "Yo!", "stop")]
    assert choices[0]["logprobs"] == {"tokens": ["He", "llo"], "token_logprobs": [-0.5, -0.5],
                                      "top_logprobs": [{"He": -0.5}, {"llo": -0.5}], "text_offset": [0, 2]}
    assert choices[1]["logprobs"]["tokens"] == ["Yo", "!"]


def test_aggregate_of_a_worker_error_returns_the_error() -> None:
    err = {"error": {"message": "boom", "type": "server_error", "code": 500}}
    t = stream_for(NON_STREAMING, aggregate=True, mode="always")
    relay(t, chat_stream_events()[0] + sse_data(err))
    assert t.worker_error
    assert orjson.loads(t.document()) == err


TGI_STRING_ERROR = {"error": "Request failed during generation: Server error: CUDA out of memory",
                    "error_type": "generation"}
TGI_STRING_ERROR_BODY = {"error": {"message": TGI_STRING_ERROR["error"], "type": "upstream_error",
                                   "code": "generation"}}


def test_aggregate_of_a_worker_error_that_is_a_string_is_an_openai_error_object() -> None:
    """TGI before 2.4.1 streams `data:{"error":"...","error_type":"generation"}`: the 502 body
    of an aggregating client is SPEC's error object (`error` an object with the worker's text
    as its message), not the worker's chunk, whose `error` no client reads as an object."""
    t = stream_for(NON_STREAMING, aggregate=True, mode="always")
    relay(t, chat_stream_events()[0] + sse_data(TGI_STRING_ERROR) + DONE)
    assert t.worker_error
    assert orjson.loads(t.document()) == TGI_STRING_ERROR_BODY


def test_aggregate_completions() -> None:
    body = {"model": MODEL, "prompt": "x"}
    t = stream_for(body, aggregate=True, mode="always", dialect=OPENAI_COMPLETIONS)
    relay(t, b"".join(text_completion_events(["Hel", "lo"])))
    doc = orjson.loads(t.document())
    assert doc["object"] == "text_completion"
    assert doc["choices"][0]["text"] == "Hello"
    assert doc["choices"][0]["finish_reason"] == "stop"
    assert doc["usage"]["prompt_tokens"] == 11


# ============================================================================ document (JSON -> SSE)


def document(doc: dict[str, Any], body: dict[str, Any] = STREAMING_USAGE, *, pricing=NO_PRICES,
             dialect=OPENAI_CHAT) -> OpenAIDocument:
    d = dialect.document(plan(body, "never", dialect=dialect), pricing, orjson.dumps(doc))
    assert isinstance(d, OpenAIDocument)
    return d


def test_json_to_sse_chunk_sequence() -> None:
    doc = chat_completion("Hello!", extra={"system_fingerprint": "fp_1"})
    out = payloads(document(doc).sse())
    assert out[-1] == "[DONE]"
    chunks = out[:-1]
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert (c["id"], c["created"], c["model"]) == ("chatcmpl-doc123", 1_700_000_000, MODEL)
        assert c["system_fingerprint"] == "fp_1"
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]
    assert chunks[1]["choices"][0]["delta"]["content"] == "Hello!"
    assert chunks[1]["choices"][0]["finish_reason"] is None
    assert chunks[2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["prompt_tokens"] == 11
    assert len(chunks) == 4


def test_json_to_sse_without_usage_when_the_client_did_not_ask() -> None:
    out = payloads(document(chat_completion(), STREAMING).sse())
    assert not any(isinstance(c, dict) and "usage" in c for c in out)
    assert out[-1] == "[DONE]"


def test_json_to_sse_cost_in_usage_chunk_and_json() -> None:
    d = document(chat_completion(), pricing=PRICES)
    out = payloads(d.sse())
    assert out[-2]["usage"]["cost"] == pytest.approx(COST)
    assert orjson.loads(d.json())["usage"]["cost"] == pytest.approx(COST)
    assert d.cost == Decimal("0.000017")


def test_json_to_sse_two_choices_and_tool_calls() -> None:
    calls = [{"id": "c1", "name": "f", "arguments": "{}"}]
    out = payloads(document(chat_completion(None, n=2, tool_calls=calls)).sse())
    finishes = [c["choices"][0] for c in out[:-1] if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finishes) == [0, 1]
    assert all(f["finish_reason"] == "tool_calls" for f in finishes)
    content = [c["choices"][0]["delta"] for c in out[:-1]
               if c["choices"] and "tool_calls" in c["choices"][0].get("delta", {})]
    assert content[0]["tool_calls"] == [{"index": 0, "id": "c1", "type": "function",
                                         "function": {"name": "f", "arguments": "{}"}}]


def test_json_worker_error_document() -> None:
    err = {"error": {"message": "bad", "type": "x", "code": 1}}
    d = document(err)
    assert d.worker_error
    assert payloads(d.sse()) == [err]
    assert orjson.loads(d.json()) == err


def test_json_worker_error_document_that_is_a_string() -> None:
    """A worker's error document whose `error` is a string: the 502 body is the OpenAI error
    object with that text; a streaming client gets the worker's error as it came."""
    d = document(TGI_STRING_ERROR)
    assert d.worker_error
    assert orjson.loads(d.json()) == TGI_STRING_ERROR_BODY
    assert payloads(d.sse()) == [TGI_STRING_ERROR]


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b"nope"])
def test_unreadable_worker_document(body: bytes) -> None:
    with pytest.raises(StreamProtocolError):
        OPENAI_CHAT.document(plan(STREAMING), NO_PRICES, body)


def test_completions_json_to_sse() -> None:
    d = document(text_completion("Hello"), {"model": MODEL, "prompt": "x", "stream": True},
                 dialect=OPENAI_COMPLETIONS)
    out = payloads(d.sse())
    assert out[-1] == "[DONE]"
    assert all(c["object"] == "text_completion" for c in out[:-1])
    assert "".join(c["choices"][0]["text"] for c in out[:-1]) == "Hello"
    assert out[-2]["choices"][0]["finish_reason"] == "stop"


# ============================================================================ round trips (hypothesis)

_text = st.text(max_size=12)
_tool_call = st.fixed_dictionaries(
    {"id": st.text(min_size=1, max_size=8), "type": st.just("function"),
     "function": st.fixed_dictionaries({"name": st.text(min_size=1, max_size=8),
                                        "arguments": st.text(max_size=30)})}
)
_logprobs = st.one_of(
    st.none(),
    st.fixed_dictionaries({"content": st.lists(st.fixed_dictionaries(
        {"token": _text, "logprob": st.floats(-20, 0), "top_logprobs": st.just([])}), max_size=3)}),
)
_message = st.fixed_dictionaries(
    {"role": st.just("assistant"), "content": st.one_of(st.none(), _text)},
    optional={"reasoning_content": _text, "tool_calls": st.lists(_tool_call, min_size=1, max_size=3),
              "refusal": st.none()},
)
_usage = st.fixed_dictionaries(
    {"prompt_tokens": st.integers(0, 10**6), "completion_tokens": st.integers(0, 10**6)},
    optional={"total_tokens": st.integers(0, 10**6),
              "prompt_tokens_details": st.fixed_dictionaries({"cached_tokens": st.integers(0, 100)})},
)


@st.composite
def chat_documents(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 3))
    choices = []
    for i in range(n):
        choice: dict[str, Any] = {"index": i, "message": draw(_message),
                                  "finish_reason": draw(st.sampled_from(["stop", "length", "tool_calls"]))}
        if draw(st.booleans()):
            choice["logprobs"] = draw(_logprobs)
        if draw(st.booleans()):
            choice["stop_reason"] = draw(st.one_of(st.none(), st.integers(0, 10**5)))
        choices.append(choice)
    doc: dict[str, Any] = {
        "id": draw(st.text(min_size=1, max_size=10)),
        "object": "chat.completion",
        "created": draw(st.integers(1, 2**40)),
        "model": draw(st.text(min_size=1, max_size=10)),
        "choices": choices,
    }
    if draw(st.booleans()):
        doc["usage"] = draw(_usage)
    if draw(st.booleans()):
        doc["system_fingerprint"] = draw(st.text(min_size=1, max_size=10))
    return doc


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


@settings(max_examples=150, deadline=None)
@given(chat_documents(), st.lists(st.integers(0, 10**6), max_size=8))
def test_round_trip_json_to_sse_to_json(doc: dict[str, Any], cuts: list[int]) -> None:
    body = {"model": "requested", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
    sse = document(doc, body).sse()
    assert sse.endswith(DONE)
    t = stream_for({"model": "requested", "messages": []}, aggregate=True, mode="always")
    parser = SSEParser()
    for piece in _split(sse, cuts):
        for event in parser.feed(piece):
            assert t.feed(event) is None
    assert not parser.has_partial
    assert t.complete
    back = orjson.loads(t.document())
    assert back == doc


_completion_logprobs = st.one_of(st.none(), st.fixed_dictionaries({
    "tokens": st.lists(_text, max_size=3), "token_logprobs": st.lists(st.floats(-20, 0), max_size=3),
    "top_logprobs": st.lists(st.dictionaries(_text, st.floats(-20, 0), max_size=2), max_size=3),
    "text_offset": st.lists(st.integers(0, 100), max_size=3)}))


@st.composite
def completion_documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": draw(st.text(min_size=1, max_size=10)),
        "object": "text_completion",
        "created": draw(st.integers(1, 2**40)),
        "model": draw(st.text(min_size=1, max_size=10)),
        "choices": [{"index": i, "text": draw(_text), "logprobs": draw(_completion_logprobs),
                     "finish_reason": draw(st.sampled_from(["stop", "length"]))}
                    for i in range(draw(st.integers(1, 2)))],
    }
    if draw(st.booleans()):
        doc["usage"] = draw(_usage)
    return doc


@settings(max_examples=60, deadline=None)
@given(completion_documents())
def test_round_trip_completions(doc: dict[str, Any]) -> None:
    body = {"model": "m", "prompt": "p", "stream": True, "stream_options": {"include_usage": True}}
    sse = document(doc, body, dialect=OPENAI_COMPLETIONS).sse()
    t = stream_for({"model": "m", "prompt": "p"}, aggregate=True, mode="always",
                   dialect=OPENAI_COMPLETIONS)
    relay(t, sse)
    assert orjson.loads(t.document()) == doc


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=6),
    st.sampled_from(["vllm", "sglang", "llamacpp", "ollama", "tgi"]),
    st.lists(st.integers(0, 10**6), max_size=10),
    st.booleans(),
)
def test_relay_is_byte_exact_under_any_chunking(
    content: list[str], flavor: str, cuts: list[int], crlf: bool
) -> None:
    data = b"".join(
        chat_stream_events(content, flavor=flavor, id="gen-1", eol=b"\r\n" if crlf else b"\n")
    )
    t = stream_for(STREAMING_USAGE)
    parser = SSEParser()
    out = bytearray()
    for piece in _split(data, cuts):
        for event in parser.feed(piece):
            out += t.feed(event) or b""
    # as the relay handler does at the end: the LF of a CRLF split after the last event's
    # CR is held by the parser as the start of a next block that never comes
    tail = parser.pending
    if tail and not tail.strip(b"\r\n"):
        out += tail
    assert bytes(out) == data
    assert t.complete


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=6),
       st.sampled_from(["vllm", "sglang", "ollama"]))
def test_hidden_usage_removes_exactly_the_usage_chunk(content: list[str], flavor: str) -> None:
    evs = chat_stream_events(content, flavor=flavor)
    usage_chunk = evs[-2]
    assert b'"choices":[]' in usage_chunk
    t = stream_for(STREAMING)
    assert relay(t, b"".join(evs)) == b"".join(e for e in evs if e is not usage_chunk)
    assert t.usage.completion_tokens == USAGE["completion_tokens"]


# ============================================================================ UTF-16 escapes, tool_calls: []
# JavaScript gateways slice strings by UTF-16 unit: an emoji written as JSON escapes may come
# as `"\ud83d"` in one delta and `"\ude00"` in the next (each half valid JSON text, which
# orjson refuses alone).

EMOJI = "\U0001f600"
HIGH, LOW = "\ud83d", "\ude00"  # its two UTF-16 halves (lone surrogates as Python strings)


def _chat_chunk(delta: dict[str, Any], finish: str | None = None, **top: Any) -> bytes:
    obj = {"id": "c1", "object": "chat.completion.chunk", "created": CREATED, "model": MODEL,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **top}
    # compact, as workers write it (a template needs `"content":"`); ensure_ascii: `\ud83d`
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _split_stream(*texts: str, **top: Any) -> list[bytes]:
    """Role chunk, three template-learning "Hi " chunks, `texts` one per chunk, finish, [DONE]."""
    return [
        _chat_chunk({"role": "assistant", "content": ""}, **top),
        *(_chat_chunk({"content": "Hi "}, **top) for _ in range(3)),
        *(_chat_chunk({"content": t}, **top) for t in texts),
        _chat_chunk({}, "stop", **top),
        DONE,
    ]


def test_a_lone_surrogate_literal_is_no_template_text() -> None:
    assert template_text(b'"\\ud83d"') is None  # the general way, never a mis-joined string
    assert template_text(b'"\\ud83d\\ude00"') == EMOJI


def test_aggregate_joins_a_surrogate_pair_split_across_two_deltas() -> None:
    t = stream_for(NON_STREAMING, aggregate=True, mode="always")
    chunks = _split_stream(HIGH, LOW, " ok")
    assert b'"content":"\\ud83d"' in chunks[4]
    for i, event in enumerate(events(b"".join(chunks))):
        assert t.feed(event) is None
        if i == 3:
            assert t.text_template is not None  # the split halves meet the fast path
    doc = t.document()
    assert orjson.loads(doc)["choices"][0]["message"]["content"] == "Hi Hi Hi " + EMOJI + " ok"


def test_relay_passes_split_surrogate_events_byte_for_byte() -> None:
    data = b"".join(_split_stream(HIGH, LOW, " ok"))
    t = stream_for(STREAMING)
    assert relay(t, data) == data
    assert t.complete


def test_a_reencoded_event_keeps_a_lone_surrogate_as_its_escape() -> None:
    # no `created`: every chunk gets the request's, so each is re-encoded
    data = b"".join(
        _chat_chunk({"content": t}).replace(b'"created":%d,' % CREATED, b"")
        for t in ("a", HIGH, LOW, "b")
    )
    out = relay(stream_for(STREAMING), data)
    assert out != data
    texts = [json.loads(p)["choices"][0]["delta"]["content"] for p in sse_payloads(out)]
    # the halves as the worker sent them (a JavaScript reader joins them into the emoji)
    assert "".join(texts).encode("utf-16-le", "surrogatepass").decode("utf-16-le") == "a" + EMOJI + "b"
    assert b'"\\ud83d"' in out and b'"\\ude00"' in out


def test_aggregate_a_lone_surrogate_at_the_end_becomes_a_replacement_character() -> None:
    t = stream_for(NON_STREAMING, aggregate=True, mode="always")
    relay(t, b"".join(_split_stream("x", HIGH)))
    # (a lone surrogate is no character: U+FFFD, as a JavaScript TextEncoder writes it)
    assert orjson.loads(t.document())["choices"][0]["message"]["content"] == "Hi Hi Hi x\ufffd"


def _utf16_pieces(text: str, cuts: list[int]) -> list[str]:
    """`text` cut at UTF-16 unit offsets (a cut between a pair's halves gives lone surrogates)."""
    units = text.encode("utf-16-le")
    bounds = sorted({0, len(units) // 2, *(c % (len(units) // 2 + 1) for c in cuts)})
    return [units[2 * a : 2 * b].decode("utf-16-le", "surrogatepass") for a, b in pairwise(bounds)]


_ASTRAL = st.text(st.characters(min_codepoint=0x1F300, max_codepoint=0x1F64F) | st.sampled_from("a é\n\"\\"),
                  min_size=1, max_size=12)


@settings(max_examples=80, deadline=None)
@given(_ASTRAL, st.lists(st.integers(0, 30), max_size=8), st.booleans(), st.booleans())
def test_aggregated_document_is_json_whatever_utf16_cuts(
    text: str, cuts: list[int], lone_end: bool, missing_created: bool
) -> None:
    pieces = [p for p in _utf16_pieces(text, cuts) if p]
    if lone_end:
        pieces.append(HIGH)
    chunks = _split_stream(*pieces)
    if missing_created:  # the slow way, every event read whole
        chunks = [c.replace(b'"created":%d,' % CREATED, b"") for c in chunks]
    t = stream_for(NON_STREAMING, aggregate=True, mode="always")
    relay(t, b"".join(chunks))
    doc = orjson.loads(t.document())  # always JSON that orjson reads
    assert doc["choices"][0]["message"]["content"] == "Hi Hi Hi " + text + ("\ufffd" if lone_end else "")
    relayed = relay(stream_for(STREAMING), b"".join(chunks))
    joined = "".join(json.loads(p)["choices"][0]["delta"].get("content") or ""
                     for p in sse_payloads(relayed) if p != "[DONE]")
    assert joined.encode("utf-16-le", "surrogatepass") == "".join(["Hi Hi Hi ", *pieces]).encode(
        "utf-16-le", "surrogatepass")


def test_aggregate_leaves_out_a_tool_calls_list_no_call_came_in() -> None:
    # some workers send `"tool_calls": []` on every delta; OpenAI's own answer has no such key
    data = b"".join([
        _chat_chunk({"role": "assistant", "content": "", "tool_calls": []}),
        _chat_chunk({"content": "Hel", "tool_calls": []}),
        _chat_chunk({"content": "lo", "tool_calls": []}),
        _chat_chunk({"tool_calls": []}, "stop"),
        DONE,
    ])
    t = stream_for(NON_STREAMING, aggregate=True, mode="always")
    relay(t, data)
    message = orjson.loads(t.document())["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Hello"}


def test_aggregate_keeps_tool_calls_among_empty_lists() -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    data = b"".join([
        _chat_chunk({"role": "assistant", "content": None, "tool_calls": []}),
        _chat_chunk({"tool_calls": [call]}),
        _chat_chunk({"tool_calls": []}, "tool_calls"),
        DONE,
    ])
    t = stream_for(NON_STREAMING, aggregate=True, mode="always")
    relay(t, data)
    message = orjson.loads(t.document())["choices"][0]["message"]
    assert message["tool_calls"] == [{k: v for k, v in call.items() if k != "index"}]


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_an_event_with_nan_or_infinity_is_still_not_json(literal: bytes) -> None:
    data = b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"\\ud83d"}}],"x":' + literal + b"}\n\n"
    with pytest.raises(StreamProtocolError, match="not JSON"):
        relay(stream_for(STREAMING), data)


def test_an_event_with_a_number_past_a_double_is_kept_as_it_came() -> None:
    # (orjson refuses `1e400`; JSON puts no range on numbers: the standard library reads it)
    chunk = _chat_chunk({"content": "a"}, x=0).replace(b'"x":0', b'"x":1e400,"y":123456789012345678901234')
    data = b"".join([chunk, _chat_chunk({}, "stop"), DONE])
    assert relay(stream_for(STREAMING), data) == data
    t = stream_for(NON_STREAMING, aggregate=True, mode="always")
    relay(t, data)
    assert b'"x":1e400,"y":123456789012345678901234' in t.document()


@pytest.mark.parametrize("dialect", [OPENAI_CHAT, OPENAI_COMPLETIONS])
def test_a_documents_choices_without_index_replay_at_their_places_and_created_0_stays(dialect) -> None:
    if dialect is OPENAI_CHAT:
        choices = [{"message": {"role": "assistant", "content": c}, "finish_reason": f}
                   for c, f in (("first", "stop"), ("second", "length"))]
    else:
        choices = [{"text": c, "finish_reason": f} for c, f in (("first", "stop"), ("second", "length"))]
    doc = {"id": "x", "object": "o", "created": 0, "model": MODEL, "choices": choices}
    p = plan(STREAMING, "never", dialect=dialect)
    chunks = payloads(dialect.document(p, NO_PRICES, orjson.dumps(doc)).sse())[:-1]
    assert {c["created"] for c in chunks} == {0}
    finishes = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"]
                for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")}
    assert finishes == {0: "stop", 1: "length"}


# ============================================================================ mutation-found gaps


def _chunk(choice: dict[str, Any], obj: str = "chat.completion.chunk") -> bytes:
    return sse_data({"id": "c1", "object": obj, "created": CREATED, "model": MODEL, "choices": [choice]})


@pytest.mark.parametrize("line", [b"id: %d\n", b"event: chunk%d\n"])
def test_a_rewritten_chunk_with_only_an_id_or_only_an_event_line_keeps_it(line: bytes) -> None:
    """Usage removed from a chunk whose worker wrote an `id:` line alone, or an `event:`
    line alone: that line stays."""
    last = sse_data({"id": "c1", "object": "chat.completion.chunk", "created": CREATED, "model": MODEL,
                     "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": USAGE})
    data = line % 1 + _chunk({"index": 0, "delta": {"content": "hi"}}) + line % 2 + last + DONE
    out = relay(stream_for(STREAMING), data)
    sent = [e for e in events(out) if e.data is not None and e.data != "[DONE]"]
    assert [e.raw.split(b"\n")[0] + b"\n" for e in sent] == [line % 1, line % 2]
    assert "usage" not in json.loads(sent[1].data or "")


def test_a_model_first_named_by_a_later_chunk_fills_the_chunks_after_it() -> None:
    """An opening chunk with an empty model (Azure's prompt_filter_results), then the
    worker's model: a chunk that leaves the model out gets the worker's, not the request's."""
    def chunk_(**fields: Any) -> bytes:
        return sse_data({"id": "c1", "object": "chat.completion.chunk", "created": CREATED,
                         "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}], **fields})
    data = chunk_(model="") + chunk_(model="worker-model") + chunk_() + DONE
    out = payloads(relay(stream_for(STREAMING), data))
    assert out[2]["model"] == "worker-model"


def test_aggregating_counts_every_absorbed_character_toward_the_document_limit() -> None:
    """`absorbed` (what the handlers hold against MAX_DOCUMENT) grows with every text,
    the ones the fast lane appends included."""
    texts = ["abcd"] * 50
    t = stream_for(NON_STREAMING, aggregate=True, mode="always")
    relay(t, b"".join(chat_stream_events(texts)))
    assert t.absorbed >= 4 * 50


def test_a_named_error_event_is_the_workers_error_whatever_its_data() -> None:
    err = b'event: error\ndata: {"message": "overloaded"}\n\n'
    t = stream_for(STREAMING_USAGE)
    assert relay(t, chat_stream_events()[1] + err) == chat_stream_events()[1] + err
    assert t.worker_error


def test_a_content_event_after_done_is_not_passed_even_when_it_matches_the_lane() -> None:
    """Nothing after `[DONE]` is passed on, even a content event the lane would take (a
    `[DONE]` straight after content: no finish chunk dropped the lane's template first)."""
    first = chat_stream_events(["Hel", "lo", "you"])
    t = stream_for(STREAMING_USAGE)
    assert relay(t, b"".join(first[:4])) == b"".join(first[:4])
    assert t.text_template is not None
    relay(t, DONE)
    assert relay(t, first[2] + first[3]) == b""


def test_aggregate_completions_a_choice_that_got_no_text_has_empty_text() -> None:
    obj = "text_completion"
    data = b"".join([
        _chunk({"index": 0, "text": "hi", "finish_reason": None}, obj),
        _chunk({"index": 1, "finish_reason": "length"}, obj),
        _chunk({"index": 0, "text": "", "finish_reason": "stop"}, obj),
        DONE,
    ])
    t = stream_for({"model": MODEL, "prompt": "x", "n": 2}, aggregate=True, mode="always",
                   dialect=OPENAI_COMPLETIONS)
    relay(t, data)
    choices = orjson.loads(t.document())["choices"]
    assert [(c["index"], c["text"], c["finish_reason"]) for c in choices] == [(0, "hi", "stop"), (1, "", "length")]


@pytest.mark.parametrize("index_first", [True, False])
@pytest.mark.parametrize("aggregate", [False, True])
def test_two_choices_whose_content_events_differ_only_in_the_index_keep_their_own_text(
    aggregate: bool, index_first: bool
) -> None:
    """n=2 with tokens of one length: each event differs from the last one only in its
    index (before or after the text) and its text; each text still goes to its own choice."""
    texts = ["a", "b", "c", "d", "e", "f"]

    def choice(i: int, text: str) -> dict[str, Any]:
        if index_first:
            return {"index": i % 2, "delta": {"content": text}, "finish_reason": None}
        return {"delta": {"content": text}, "index": i % 2, "finish_reason": None}

    data = b"".join(
        [_chunk(choice(i, text)) for i, text in enumerate(texts)]
        + [_chunk({"index": i, "delta": {}, "finish_reason": "stop"}) for i in (0, 1)]
        + [DONE]
    )
    body = {**STREAMING, "n": 2}
    if aggregate:
        t = stream_for({**NON_STREAMING, "n": 2}, aggregate=True, mode="always")
        relay(t, data)
        choices = orjson.loads(t.document())["choices"]
        assert [c["message"]["content"] for c in choices] == ["ace", "bdf"]
    else:
        t = stream_for(body)
        assert relay(t, data) == data
        assert t.complete
