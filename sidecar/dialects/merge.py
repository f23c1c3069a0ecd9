"""Merging streamed deltas back into one object: strings concatenated, lists by index.

Pure: no I/O. Shared by every dialect that aggregates a stream into a
document (OpenAI choices and tool calls, Anthropic content blocks, ...).
A worker's JSON nested deeper than the interpreter recurses (orjson reads 1,024 levels)
is a StreamProtocolError here, as it is where such JSON is written (`jsonio`).
"""

from __future__ import annotations

from typing import Any

# mypyc_attr tells mypyc to leave a class a plain Python class; a runtime import (mypyc
# compiles an `if TYPE_CHECKING: ... else: <fallback>` fallback into a RuntimeError)
from mypy_extensions import mypyc_attr

from sidecar.dialects.jsonio import StreamProtocolError

_TOO_DEEP = "the worker's JSON is nested too deeply to merge"

#: Keys whose repeated value is the same thing said again, not a continuation.
REPLACED_KEYS = frozenset({"role", "id", "type", "index", "object"})


@mypyc_attr(native_class=False)  # mypyc: a list subclass cannot be a native class
class TextParts(list[str]):
    """The pieces of a string still being streamed: each delta appended in O(1), joined
    once by `finished` (concatenating as they come is quadratic in the output's length)."""


@mypyc_attr(native_class=False)  # mypyc: a list subclass cannot be a native class
class NameParts(list[str]):
    """A name streamed in pieces (a tool call's `function.name`), which is continued unless
    a piece says the whole name again: each piece appended in O(its length), the name so far
    joined only to compare it with a piece as long as it, and once by `finished`
    (concatenating as they come is quadratic in the name's length)."""

    __slots__ = ("length",)

    def __init__(self, pieces: tuple[str, ...]) -> None:
        super().__init__(pieces)
        self.length = sum(map(len, pieces))

    def add(self, piece: str) -> None:
        """Continue the name with `piece`, unless `piece` is the name so far said again."""
        if piece and not (len(piece) == self.length and piece == "".join(self)):
            self.append(piece)
            self.length += len(piece)


@mypyc_attr(native_class=False)  # mypyc: a list subclass cannot be a native class
class GrownList(list[Any]):
    """A list streamed in pieces (logprobs, one entry per token), owned by the accumulator:
    each delta's entries are appended in place (a new list per delta, `old + new`, is
    quadratic in the list's length). `finished` makes it a plain list again."""


@mypyc_attr(native_class=False)  # mypyc: a list subclass cannot be a native class
class IndexedList(list[Any]):
    """The entries merged by index so far (tool calls), owned by the accumulator, with the
    map from each index to its entry kept as entries come (rebuilding it for each delta is
    quadratic in the number of entries). `finished` makes it a plain list again."""

    __slots__ = ("by_index", "free_from")

    def __init__(self, entries: list[Any]) -> None:
        super().__init__(entries)
        self.by_index: dict[int, Any] = {item["index"]: item for item in entries}
        #: no index below this one, at or past len(by_index), is free (see merge_indexed)
        self.free_from = 0


def merge_value(key: str, old: Any, new: Any, replace_strings: bool = False) -> Any:
    """How one field of an accumulated delta absorbs the same field of the next delta.
    `replace_strings`: every string (in dicts within too) is said again, not continued."""
    if new is None:
        return old
    if key == "tool_calls" and isinstance(new, list):
        return merge_indexed(old if isinstance(old, list) else [], new)
    if old is None:
        return copy_json(new)
    if type(old) is TextParts:
        if isinstance(new, str):
            old.append(new)
            return old
        return new
    if type(old) is NameParts:
        if isinstance(new, str):
            old.add(new)
            return old
        return new
    if isinstance(old, str) and isinstance(new, str):
        if replace_strings or key in REPLACED_KEYS or (key == "name" and old == new):
            return new or old  # an empty one (TGI's `"id": ""` on later deltas) says nothing
        if key == "name":
            return NameParts((old, new))
        return TextParts((old, new))
    if isinstance(old, dict) and isinstance(new, dict):
        merge_into(old, new, replace_strings)
        return old
    if isinstance(old, list) and isinstance(new, list):
        if type(old) is not GrownList:
            old = GrownList(old)  # (one copy: `old` may be a worker event's own list)
        old.extend(new)
        return old
    return new


def merge_into(acc: dict[str, Any], delta: dict[str, Any], replace_strings: bool = False) -> None:
    """Merge `delta` into `acc` in place, field by field (`replace_strings`: see merge_value)."""
    try:
        for key, value in delta.items():
            acc[key] = merge_value(key, acc.get(key), value, replace_strings)
    except RecursionError:
        raise StreamProtocolError(_TOO_DEEP) from None


def merge_indexed(acc: list[Any], deltas: list[Any]) -> list[Any]:
    """Merge a list of `{"index": i, ...}` deltas into `acc`, every entry a dict with an
    integer `index` (a delta with none, or with one that is not an integer, is a new entry
    at the next index: the first free one from the number of entries on; an entry that is
    not a dict is dropped). Returns `acc` itself when it is an `IndexedList`, else an
    `IndexedList` of its entries and the new ones."""
    if type(acc) is not IndexedList:
        acc = IndexedList(acc)
    by_index = acc.by_index
    for delta in deltas:
        if not isinstance(delta, dict):
            continue
        index = delta.get("index")
        if type(index) is not int:
            # The first free index from len(by_index) on. Entries are only ever added, so
            # it never goes down: the search resumes past the one it found last time.
            index = max(len(by_index), acc.free_from)
            while index in by_index:
                index += 1
            acc.free_from = index + 1
        if index in by_index:
            merge_into(by_index[index], delta)
        else:
            entry = copy_json(delta)
            entry["index"] = index
            by_index[index] = entry
            acc.append(entry)
    return acc


def copy_json(value: Any) -> Any:
    """A deep copy of a JSON value (so merging never mutates a worker event's objects)."""
    try:
        if isinstance(value, dict):
            return {k: copy_json(v) for k, v in value.items()}
        if isinstance(value, list):
            return [copy_json(v) for v in value]
    except RecursionError:
        raise StreamProtocolError(_TOO_DEEP) from None
    return value


def finished(value: Any) -> Any:
    """A copy of an accumulated value with every `TextParts` and `NameParts` joined into its
    string."""
    if type(value) is TextParts or type(value) is NameParts:
        return "".join(value)
    try:
        if isinstance(value, dict):
            return {k: finished(v) for k, v in value.items()}
        if isinstance(value, list):
            return [finished(v) for v in value]
    except RecursionError:
        raise StreamProtocolError(_TOO_DEEP) from None
    return value


def partial_json_text(text: str) -> str:
    """What a JSON text cut short holds so far, as JSON text: its longest prefix that ends a
    whole value (or opens an object or array), with what is open closed. A member or element
    cut in its middle is left out, as the anthropic SDK reads a tool input that `max_tokens`
    cut off: `{"a": 1, "city": "Par` -> `{"a": 1}`; "" when nothing whole came. The text is
    the worker's own (its numbers as they came); it is JSON when `text` began as JSON."""
    closers: list[str] = []  # what closes each object and array open at this point
    # The longest prefix known to end whole. Every push and pop of `closers` moves it, so
    # what closes it is what is open at the end: written once (not at every cut, which is
    # quadratic in the nesting: `[[[[...`)
    cut = 0
    in_string = escaped = key = False
    last = ""  # the last character outside strings that is not white space
    for i, c in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if not key:
                    cut = i + 1
                last = '"'
            continue
        if c in " \t\r\n":
            continue
        if c == '"':
            in_string = True
            key = bool(closers) and closers[-1] == "}" and last in "{,"
        elif c in "{[":
            closers.append("}" if c == "{" else "]")
            cut = i + 1
        elif c in "}]":
            if not closers:
                break
            closers.pop()
            cut = i + 1
        elif c == "," and last not in '"}]{[,:':
            cut = i  # a number or literal ended
        last = c
    return text[:cut] + "".join(reversed(closers))
