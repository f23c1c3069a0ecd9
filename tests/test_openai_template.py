"""The OpenAI translator's template fast path changes nothing but speed.

`OpenAIStream` passes (or, aggregating, absorbs) a content event without parsing
it whole when its bytes equal the last plain event's except for the text
literal. Every property here runs the same worker stream through a translator
with the fast path and one without it (its template learning switched off) and
requires the same bytes out, the same errors, the same counts, usage, cost and
aggregated document.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import Price, Pricing
from sidecar.dialects.base import MAX_DOCUMENT, PIECE_COST
from sidecar.dialects.jsonio import StreamProtocolError
from sidecar.dialects.openai import COMPLETIONS, OPENAI_CHAT, OPENAI_COMPLETIONS, OpenAIStream
from sidecar.sse import SSEParser

PRICING = Pricing(models={"m": Price(prompt=1, completion=2)})


def _no_learning(self: OpenAIStream, *args: Any) -> None:
    self.text_template = None


def translators(chat: bool, aggregate: bool, include_usage: bool) -> tuple[OpenAIStream, OpenAIStream]:
    dialect = OPENAI_CHAT if chat else OPENAI_COMPLETIONS
    body: dict[str, Any] = {"model": "m", "stream": True}
    body["messages" if chat else "prompt"] = [{"role": "user", "content": "hi"}] if chat else "hi"
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    plan = dialect.plan(orjson.dumps(body), "auto", "rid")
    fast = dialect.stream(plan, PRICING, aggregate)
    slow = dialect.stream(plan, PRICING, aggregate)
    slow._maybe_learn = _no_learning.__get__(slow)  # type: ignore[method-assign]
    return fast, slow


def run(translator: OpenAIStream, raw: bytes) -> list[Any]:
    """Feed `raw` through an SSE parser into the translator: what came out, per event."""
    parser = SSEParser()
    out: list[Any] = []
    for event in parser.feed(raw):
        try:
            out.append(translator.feed(event))
        except StreamProtocolError as exc:
            out.append(("error", str(exc)))
            break
    return out


def state(translator: OpenAIStream) -> dict[str, Any]:
    translator.settle()
    seen: dict[str, Any] = {
        "content_events": translator.content_events,
        "complete": translator.complete,
        "worker_error": translator.worker_error,
        "usage": translator.usage,
        "cost": translator.cost,
    }
    if translator.aggregate:
        seen["document"] = orjson.loads(translator.document())
    return seen


# -- worker streams -------------------------------------------------------------------------

texts = st.one_of(
    st.sampled_from(["tok", "", " the", '"quoted"', "back\\slash", "line\nbreak", "\x01", "é😀"]),
    st.text(max_size=12),
)


@st.composite
def chunk_objects(draw: st.DrawFn, chat: bool) -> dict[str, Any]:
    """One chunk object, mostly a plain content delta, sometimes anything else a worker sends."""
    kind = draw(
        st.sampled_from(
            ["plain"] * 5
            + ["reasoning"] * 3
            + ["role", "null", "tools", "finish", "usage", "extra", "two", "error"]
        )
    )
    text = draw(texts)
    created = draw(st.sampled_from([1, 1, 1, 2]))
    obj: dict[str, Any] = {
        "id": "chatcmpl-1" if chat else "cmpl-1",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": "m",
    }
    if chat:
        delta: dict[str, Any] = {"content": text}
        if kind == "role":
            delta = {"role": "assistant", "content": text}
        elif kind == "null":
            delta = {"content": None}
        elif kind == "reasoning":
            delta = draw(
                st.sampled_from(
                    [
                        {"reasoning_content": text},
                        {"role": None, "content": None, "reasoning_content": text, "tool_calls": None},
                        {"reasoning": text},
                        {"content": "", "reasoning_content": text},
                    ]
                )
            )
        elif kind == "tools":
            delta = {"content": text, "tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
    if kind == "finish":
        choice["finish_reason"] = "stop"
    obj["choices"] = [choice]
    if kind == "two":
        obj["choices"] = [choice, {**choice, "index": 1}]
    if kind == "usage":
        obj["choices"] = []
        obj["usage"] = {"prompt_tokens": 3, "completion_tokens": draw(st.integers(0, 50))}
    if kind == "error":
        return {"error": {"message": text, "type": "server_error"}}
    if kind == "extra":
        obj["system_fingerprint"] = draw(st.sampled_from(["fp", None]))
    return obj


@st.composite
def event_bytes(draw: st.DrawFn, chat: bool) -> bytes:
    """One SSE block: encoded like orjson or json.dumps, sometimes damaged or decorated."""
    obj = draw(chunk_objects(chat))
    encoding = draw(st.sampled_from(["orjson"] * 4 + ["spaced", "ascii"]))
    if encoding == "orjson":
        data = orjson.dumps(obj)
    else:
        data = json.dumps(obj, ensure_ascii=encoding == "ascii", separators=None).encode()
    damage = draw(st.sampled_from([None] * 8 + ["cut", "number", "newline", "two_strings", "tail"]))
    key = b'"content":' if chat else b'"text":'
    at = data.find(key)
    if damage and at >= 0:
        head = data[: at + len(key)]
        end = data.find(b"}", at) if chat else data.find(b',"logprobs"', at)
        tail = data[end:] if end >= 0 else b"}"
        data = head + {
            "cut": b'"abc',
            "number": b"123",
            "newline": b'"a"\n',
            "two_strings": b'"a","x":"b"',
            "tail": b'"a"',
        }[damage] + (b"" if damage == "tail" else tail)
    block = b"data: " + data + b"\n"
    if draw(st.booleans()) and draw(st.booleans()):
        block += b"id: 7\n"
    return block + b"\n"


@st.composite
def worker_streams(draw: st.DrawFn, chat: bool) -> bytes:
    blocks = draw(st.lists(event_bytes(chat), max_size=14))
    if draw(st.booleans()):
        blocks.append(b"data: [DONE]\n\n")
    return b"".join(blocks)


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
@pytest.mark.parametrize("aggregate", [False, True], ids=["relay", "aggregate"])
@pytest.mark.parametrize("include_usage", [True, False], ids=["usage", "no-usage"])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fast_path_is_the_slow_path(
    chat: bool, aggregate: bool, include_usage: bool, data: st.DataObject
) -> None:
    raw = data.draw(worker_streams(chat))
    fast, slow = translators(chat, aggregate, include_usage)
    assert run(fast, raw) == run(slow, raw)
    assert state(fast) == state(slow)


def test_the_fast_path_is_taken_for_a_plain_stream() -> None:
    """Guard for the property above: the template does get learned and used."""
    fast, _ = translators(chat=True, aggregate=False, include_usage=True)
    plain = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":%s},"finish_reason":null}]}\n\n'
    raw = b"".join(plain % orjson.dumps(t) for t in ["a", "b", "", "c"])
    assert run(fast, raw) == [plain % b'"a"', plain % b'"b"', plain % b'""', plain % b'"c"']
    assert fast.text_template is not None and fast._tpl_learns == 1
    assert fast.content_events == 3


def test_an_empty_text_is_not_learned() -> None:
    """The role announcement (`"content": ""`) never repeats: learning it would cost a cut and
    a probe parse per stream for nothing, so the first token event is the one learned."""
    fast, _ = translators(chat=True, aggregate=False, include_usage=True)
    head = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":'
    tail = b',"finish_reason":null}]}\n\n'
    role = head + b'{"role":"assistant","content":""}' + tail
    run(fast, role)
    assert fast.text_template is None
    token = head + b'{"content":"a"}' + tail
    assert run(fast, token + token) == [token, token]
    assert fast.text_template is not None and fast._tpl_learns == 2  # one try on each shape


def test_the_fast_path_aggregates_completions() -> None:
    fast, _ = translators(chat=False, aggregate=True, include_usage=False)
    plain = b'data: {"id":"c","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":%s,"logprobs":null,"finish_reason":null}]}\n\n'
    raw = b"".join(plain % orjson.dumps(t) for t in ["a", "b", "c"])
    run(fast, raw)
    assert fast._tpl_parts is fast._choices[0]["text"]  # the choice's text, as pieces
    assert orjson.loads(fast.document())["choices"][0]["text"] == "abc"
    assert COMPLETIONS.chat is False


def test_the_fast_path_is_taken_for_reasoning_deltas() -> None:
    """SGLang-style reasoning deltas (the other fields null) also get a template."""
    fast, _ = translators(chat=True, aggregate=True, include_usage=True)
    plain = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":'
        b'[{"index":0,"delta":{"role":null,"content":null,"reasoning_content":%s,'
        b'"tool_calls":null},"finish_reason":null}]}\n\n'
    )
    raw = b"".join(plain % orjson.dumps(t) for t in ["a", "b", "", "c"])
    run(fast, raw)
    assert fast.text_template is not None
    assert fast._tpl_parts is fast._choices[0]["message"]["reasoning_content"]
    assert fast.content_events == 3
    message = orjson.loads(fast.document())["choices"][0]["message"]
    assert message["reasoning_content"] == "abc" and message["content"] is None


@pytest.mark.parametrize(
    "delta",
    [
        {"content": "T", "tool_calls": [{"index": 0, "function": {"arguments": "{"}}]},
        {"content": "T", "reasoning_content": "r"},
        {"reasoning_content": "T", "content": "c"},
        {"content": "T", "role": "assistant"},
    ],
    ids=["tool-calls", "reasoning-too", "content-too", "role"],
)
@pytest.mark.parametrize("aggregate", [False, True], ids=["relay", "aggregate"])
def test_runs_of_one_shape_with_empty_texts(delta: dict[str, Any], aggregate: bool) -> None:
    """The same delta shape again and again, its text sometimes empty: whatever else the
    delta carries decides the content count exactly as the full parse does."""
    fast, slow = translators(chat=True, aggregate=aggregate, include_usage=False)
    key = next(k for k, v in delta.items() if v == "T")
    events = []
    for text in ["a", "b", "", "c", ""]:
        choice = {"index": 0, "delta": {**delta, key: text}, "finish_reason": None}
        obj = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
        events.append(b"data: " + orjson.dumps(obj) + b"\n\n")
    raw = b"".join(events)
    assert run(fast, raw) == run(slow, raw)
    assert state(fast) == state(slow)


def test_what_the_lane_absorbs_is_bounded_by_what_it_holds() -> None:
    """Aggregating, the lane's `absorbed_text` says stop once the pieces it holds (their
    characters and each piece's own cost) pass the document's bound: a stream of tiny
    deltas is bounded by what it holds, not only by its characters."""
    fast, _ = translators(chat=True, aggregate=True, include_usage=False)
    plain = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":%s},"finish_reason":null}]}\n\n'
    run(fast, b"".join(plain % orjson.dumps(t) for t in ["a", "b"]))
    assert fast.text_template is not None
    pieces = MAX_DOCUMENT // (2 + PIECE_COST)
    assert all(fast.absorbed_text("ab") for _ in range(pieces - 2))
    assert not all(fast.absorbed_text("ab") for _ in range(4))
