"""Merging streamed deltas: pieces are kept as parts and joined once, same result as
concatenating them as they come (which is quadratic in the length of the output)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.dialects.merge import REPLACED_KEYS, TextParts, finished, merge_into


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
                acc[key] = value
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


def test_text_is_kept_in_parts_until_finished() -> None:
    acc: dict[str, Any] = {}
    for piece in ["a", "b", "c"]:
        merge_into(acc, {"content": piece, "role": "assistant"})
    assert type(acc["content"]) is TextParts and acc["role"] == "assistant"
    assert finished({"choices": [acc]}) == {"choices": [{"content": "abc", "role": "assistant"}]}
