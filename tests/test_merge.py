"""Merging streamed deltas: pieces are kept as parts and joined once, same result as
concatenating them as they come (which is quadratic in the length of the output)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import Pricing
from sidecar.dialects import get_dialect
from sidecar.dialects.jsonio import StreamProtocolError
from sidecar.dialects.merge import (
    REPLACED_KEYS,
    TextParts,
    copy_json,
    finished,
    merge_into,
    partial_json_text,
)
from sidecar.sse import Event


def concatenating(acc: dict[str, Any], delta: dict[str, Any]) -> None:
    """The reference: strings concatenated on arrival (replaced keys replaced)."""
    for key, value in delta.items():
        if key not in acc:
            acc[key] = value
            continue
        old = acc[key]
        if value is None:
            continue
        if old is None:
            acc[key] = value
        elif isinstance(old, str) and isinstance(value, str):
            if key in REPLACED_KEYS or (key == "name" and old == value):
                acc[key] = value or old
            else:
                acc[key] = old + value
        else:
            acc[key] = value


deltas = st.lists(
    st.dictionaries(
        st.sampled_from(["content", "reasoning_content", "role", "name", "refusal"]),
        st.one_of(st.none(), st.text(max_size=5), st.sampled_from(["get_", "weather", "get_weather"])),
        max_size=3,
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(deltas)
def test_parts_join_to_what_concatenation_gives(seq: list[dict[str, Any]]) -> None:
    acc: dict[str, Any] = {}
    ref: dict[str, Any] = {}
    for delta in seq:
        merge_into(acc, delta)
        concatenating(ref, delta)
    assert finished(acc) == ref


def test_an_empty_id_on_a_later_tool_call_delta_keeps_the_real_one() -> None:
    # TGI-style: the first delta names the call, later ones repeat "id": "" and "type": ""
    acc: dict[str, Any] = {}
    merge_into(acc, {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                     "function": {"name": "get", "arguments": ""}}]})
    for piece in ['{"a"', ": 1}"]:
        merge_into(acc, {"tool_calls": [{"index": 0, "id": "", "type": "",
                                         "function": {"name": "", "arguments": piece}}]})
    assert finished(acc) == {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                             "function": {"name": "get", "arguments": '{"a": 1}'}}]}


def test_text_is_kept_in_parts_until_finished() -> None:
    acc: dict[str, Any] = {}
    for piece in ["a", "b", "c"]:
        merge_into(acc, {"content": piece, "role": "assistant"})
    assert type(acc["content"]) is TextParts and acc["role"] == "assistant"
    assert finished({"choices": [acc]}) == {"choices": [{"content": "abc", "role": "assistant"}]}


def indexed_reference(acc: list[Any], deltas: list[Any]) -> list[Any]:
    """The reference for a list of `{"index": i, ...}` deltas: the map from index to entry
    built afresh for each list, a delta without an integer index the first free index from
    the number of entries on."""
    by_index = {item["index"]: item for item in acc}
    for delta in deltas:
        if not isinstance(delta, dict):
            continue
        index = delta.get("index")
        if type(index) is not int:
            index = len(by_index)
            while index in by_index:
                index += 1
        if index in by_index:
            merge_into(by_index[index], delta)
        else:
            entry = copy_json(delta)
            entry["index"] = index
            by_index[index] = entry
            acc.append(entry)
    return acc


tool_call_lists = st.lists(
    st.lists(
        st.one_of(
            st.fixed_dictionaries(
                {"index": st.one_of(st.none(), st.integers(0, 6), st.just("1"))},
                optional={"id": st.sampled_from(["", "a", "b"]),
                          "function": st.fixed_dictionaries({"arguments": st.text("{}a", max_size=2)})},
            ),
            st.just("not a call"),
        ),
        max_size=3,
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(tool_call_lists, st.lists(st.lists(st.integers(0, 3), max_size=2), max_size=6))
def test_lists_merge_as_they_did_when_each_delta_made_a_new_one(
    calls: list[list[Any]], entries: list[list[int]]
) -> None:
    # tool calls (by index) and other lists (appended, e.g. logprobs) are merged in place
    # now, with the map from index to call kept: the same result as building anew per delta
    acc: dict[str, Any] = {}
    ref_calls: list[Any] = []
    ref_list: list[int] | None = None
    for delta_calls, delta_list in zip(calls, entries + [[]] * len(calls), strict=False):
        merge_into(acc, {"tool_calls": copy_json(delta_calls), "logprobs": {"content": list(delta_list)}})
        ref_calls = indexed_reference(ref_calls, copy_json(delta_calls))
        ref_list = list(delta_list) if ref_list is None else ref_list + delta_list
    if calls:
        assert finished(acc) == finished(
            {"tool_calls": ref_calls, "logprobs": {"content": ref_list}}
        )


# -- partial_json_text: a tool input cut off by max_tokens -------------------------------------


def partial_json(text: str) -> Any:
    whole = partial_json_text(text)
    return json.loads(whole) if whole else {}


def test_partial_json_keeps_what_is_whole() -> None:
    assert partial_json('{"a": 1, "city": "Par') == {"a": 1}
    assert partial_json('{"city": "Par') == {}
    assert partial_json('{"a": [1, 2') == {"a": [1]}  # 2 may go on: 25
    assert partial_json('{"a": {"b": "c"}, "d') == {"a": {"b": "c"}}
    assert partial_json('{"k\\"": "v\\"", "z": ') == {'k"': 'v"'}
    assert partial_json_text("") == "" and partial_json('{"a": tru') == {}
    assert partial_json_text("{") == "{}"


def test_partial_json_text_keeps_the_numbers_as_they_came() -> None:
    assert partial_json_text('{"id": 123456789012345678901234, "x": 1e400, "city": "Par') == (
        '{"id": 123456789012345678901234, "x": 1e400}'
    )


def _is_part_of(part: Any, whole: Any) -> bool:
    if isinstance(whole, dict):
        return isinstance(part, dict) and all(k in whole and _is_part_of(v, whole[k]) for k, v in part.items())
    if isinstance(whole, list):
        return (isinstance(part, list) and len(part) <= len(whole)
                and all(_is_part_of(p, w) for p, w in zip(part, whole, strict=False)))
    return part == whole


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=4), st.booleans())
def test_partial_json_of_every_cut_is_part_of_the_whole(value: dict[str, Any], spaced: bool) -> None:
    text = orjson.dumps(value, option=orjson.OPT_INDENT_2 if spaced else None).decode()
    for i in range(len(text) + 1):
        part = partial_json(text[:i])
        assert _is_part_of(part, value), (text[:i], part)
    assert partial_json(text) == value


# -- a worker's JSON nested deeper than the interpreter recurses -------------------------------

DEEP = 1000  # orjson reads up to 1,024 levels; the interpreter recurses 1,000 frames


def _deep_json(levels: int) -> str:
    return '{"a":' * levels + "1" + "}" * levels


def _event(data: str, name: str | None = None) -> Event:
    head = b"" if name is None else b"event: " + name.encode() + b"\n"
    return Event(data, name, raw=head + b"data: " + data.encode() + b"\n\n")


def _chunk(choice_extra: str) -> Event:
    return _event('{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":'
                  '[{"index":0,"delta":{"content":"t"},"finish_reason":null,"x":' + choice_extra + "}]}")


def test_merging_json_nested_too_deeply_is_a_protocol_error() -> None:
    deep = orjson.loads(_deep_json(DEEP))
    with pytest.raises(StreamProtocolError):
        copy_json(deep)
    with pytest.raises(StreamProtocolError):
        merge_into({"x": orjson.loads(_deep_json(DEEP))}, {"x": deep})
    with pytest.raises(StreamProtocolError):
        finished({"x": deep})
    assert finished(copy_json(orjson.loads(_deep_json(100)))) == orjson.loads(_deep_json(100))


@pytest.mark.parametrize("levels", [600, DEEP])
def test_aggregating_a_chat_stream_nested_too_deeply_is_a_protocol_error(levels: int) -> None:
    # it was a RecursionError out of the worker connection's data_received (the client told
    # the worker reset the connection, an error logged) or an internal error
    dialect = get_dialect("openai-chat")
    body = orjson.dumps({"model": "m", "messages": [], "stream": False})
    translator = dialect.stream(dialect.plan(body, "always", "rid"), Pricing(), aggregate=True)
    with pytest.raises(StreamProtocolError):
        translator.feed(_chunk(_deep_json(levels)))
        translator.feed(_chunk(_deep_json(levels)))
        translator.feed(_event("[DONE]"))
        translator.document()


def test_aggregating_anthropic_and_responses_streams_nested_too_deeply_is_a_protocol_error() -> None:
    anthropic = get_dialect("anthropic-messages")
    body = orjson.dumps({"model": "m", "messages": [], "max_tokens": 5, "stream": False})
    translator = anthropic.stream(anthropic.plan(body, "always", "rid"), Pricing(), aggregate=True)
    with pytest.raises(StreamProtocolError):
        translator.feed(_event('{"type":"content_block_delta","index":0,"delta":{"type":"x_delta",'
                               '"x":' + _deep_json(DEEP) + "}}", "content_block_delta"))
    responses = get_dialect("openai-responses")
    body = orjson.dumps({"model": "m", "input": "x", "stream": True})
    translator = responses.stream(responses.plan(body, "always", "rid"), Pricing(), aggregate=False)
    with pytest.raises(StreamProtocolError):
        translator.feed(_event('{"type":"response.output_item.added","output_index":0,"item":'
                               + _deep_json(DEEP) + "}", "response.output_item.added"))


def test_relaying_a_chat_stream_nested_too_deeply_is_no_internal_error() -> None:
    dialect = get_dialect("openai-chat")
    body = orjson.dumps({"model": "m", "messages": [], "stream": True})
    translator = dialect.stream(dialect.plan(body, "auto", "rid"), Pricing(), aggregate=False)
    event = _chunk(_deep_json(DEEP))
    assert translator.feed(event) == event.raw  # passed on as it came, as at 300 levels
    assert translator.feed(event) == event.raw
