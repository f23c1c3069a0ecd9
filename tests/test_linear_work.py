"""Work that grows with the stream grows linearly: legal input in an unlucky shape (thousands
of tool calls, logprobs on every token, many output items open at once) must not make an
aggregation quadratic, since the sidecar sits on every byte of every stream.

Never timed: the work is counted, deterministically, as the lines of sidecar's own code a
run executes (`sys.settrace` line events, which a loop pays on every turn), at n and 4n; or,
for work done in C (a list copied per delta), by what the code keeps.
"""

from __future__ import annotations

import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import FrameType, SimpleNamespace
from typing import Any

import orjson

from sidecar.config import Pricing
from sidecar.dialects import get_dialect
from sidecar.dialects.merge import finished, merge_into, partial_json_text
from sidecar.dialects.openai_responses import OutputSoFar
from sidecar.framing import SMALL_BODY_PIECE, keep_body_piece
from sidecar.sse import Event
from tests.builds import pure_only

SIDECAR = str(Path(__file__).resolve().parent.parent / "sidecar")
#: linear work at 4n is at most 4 times the work at n (plus the constant part, which only
#: lowers the ratio); quadratic work approaches 16 times
LINEAR = 4.5


def lines_run(work: Callable[[], object]) -> int:
    """How many lines of sidecar's own code `work()` executes."""
    count = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def start(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename.startswith(SIDECAR) else None

    previous = sys.gettrace()
    sys.settrace(start)
    try:
        work()
    finally:
        sys.settrace(previous)
    return count


def c_calls(work: Callable[[], object], name: str) -> int:
    """How many times `work()` calls a built-in function or method named `name`."""
    count = 0

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal count
        if event == "c_call" and getattr(arg, "__name__", None) == name:
            count += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        work()
    finally:
        sys.setprofile(previous)
    return count


def growth(work: Callable[[int], object], n: int) -> float:
    """The work at 4n over the work at n."""
    return lines_run(lambda: work(4 * n)) / lines_run(lambda: work(n))


def chunk_event(choices: list[Any]) -> Event:
    data = orjson.dumps(
        {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": choices}
    )
    return Event(data.decode(), raw=b"data: " + data + b"\n\n")


def aggregate_chat(events: list[Event]) -> dict[str, Any]:
    dialect = get_dialect("openai-chat")
    body = orjson.dumps({"model": "m", "messages": [], "stream": False})
    translator = dialect.stream(dialect.plan(body, "always", "rid"), Pricing(), aggregate=True)
    for event in events:
        translator.feed(event)
    translator.feed(Event("[DONE]", raw=b"data: [DONE]\n\n"))
    result: dict[str, Any] = orjson.loads(translator.document())
    return result


def tool_call_events(calls: int) -> list[Event]:
    """`calls` tool calls, each named in one delta and its arguments in three more."""
    events = []
    for k in range(calls):
        first = {"index": k, "id": f"call_{k}", "type": "function",
                 "function": {"name": "f", "arguments": ""}}
        events.append(chunk_event([{"index": 0, "delta": {"tool_calls": [first]}}]))
        for piece in ('{"a"', ": ", "1}"):
            more = {"index": k, "function": {"arguments": piece}}
            events.append(chunk_event([{"index": 0, "delta": {"tool_calls": [more]}}]))
    return events


def test_many_tool_calls_aggregate_in_linear_work() -> None:
    # each delta used to rebuild the map from index to call: work quadratic in the calls
    assert growth(lambda n: aggregate_chat(tool_call_events(n)), 200) < LINEAR
    calls = aggregate_chat(tool_call_events(3))["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == ['{"a": 1}'] * 3
    assert [c["id"] for c in calls] == ["call_0", "call_1", "call_2"]


def test_tool_call_deltas_without_an_index_take_free_indexes_in_linear_work() -> None:
    # calls at n..2n-1, then n without an index: each takes the first free index from the
    # number of calls on, which a fresh search from there finds only after n steps
    def work(n: int) -> None:
        acc: dict[str, Any] = {}
        merge_into(acc, {"tool_calls": [{"index": n + k, "id": str(k)} for k in range(n)]})
        for k in range(n):
            merge_into(acc, {"tool_calls": [{"id": f"x{k}"}]})

    assert growth(work, 100) < LINEAR
    acc: dict[str, Any] = {}
    merge_into(acc, {"tool_calls": [{"index": 2, "id": "a"}, {"index": 3, "id": "b"}]})
    for k in range(3):
        merge_into(acc, {"tool_calls": [{"id": f"x{k}"}]})
    assert [(c["index"], c["id"]) for c in finished(acc)["tool_calls"]] == [
        (2, "a"), (3, "b"), (4, "x0"), (5, "x1"), (6, "x2")
    ]


def test_a_list_streamed_one_entry_per_delta_is_grown_in_place() -> None:
    # logprobs come one entry per token: a new list per delta (old + new) copies the whole
    # list every token, quadratic in the tokens
    acc: dict[str, Any] = {}
    kept = []
    for i in range(5):
        merge_into(acc, {"logprobs": {"content": [{"token": str(i)}], "tokens": [str(i)]}})
        kept.append((acc["logprobs"]["content"], acc["logprobs"]["tokens"]))
    assert all(lists[0] is kept[1][0] and lists[1] is kept[1][1] for lists in kept[1:])
    done = finished(acc)
    assert done == {"logprobs": {"content": [{"token": str(i)} for i in range(5)],
                                 "tokens": [str(i) for i in range(5)]}}
    assert type(done["logprobs"]["content"]) is list  # what orjson writes as it is


def test_a_workers_own_list_is_never_grown() -> None:
    # the first list an accumulator holds may be one of a worker event's objects
    # (a field that was a string before): growing it would change that event
    first: list[Any] = ["a"]
    acc: dict[str, Any] = {"x": "text"}
    merge_into(acc, {"x": first}, replace_strings=True)
    merge_into(acc, {"x": ["b"]}, replace_strings=True)
    assert first == ["a"] and finished(acc) == {"x": ["a", "b"]}


def test_logprobs_of_every_token_aggregate_into_one_list() -> None:
    events = [
        chunk_event([{"index": 0, "delta": {"content": "t"},
                      "logprobs": {"content": [{"token": "t", "logprob": -i, "top_logprobs": []}]},
                      "finish_reason": None}])
        for i in range(4)
    ]
    choice = aggregate_chat(events)["choices"][0]
    assert [e["logprob"] for e in choice["logprobs"]["content"]] == [0, -1, -2, -3]
    assert choice["message"]["content"] == "tttt"


def test_responses_items_done_with_many_items_open_take_linear_work() -> None:
    # every item's done used to look at the pieces of every item still open
    def work(n: int) -> list[dict[str, Any]]:
        out = OutputSoFar()
        for k in range(n):
            out.read("response.output_item.added", {"output_index": k, "item": {
                "type": "function_call", "call_id": f"c{k}", "name": "f", "arguments": ""}})
            out.read("response.function_call_arguments.delta", {"output_index": k, "delta": "{}"})
        for k in range(n):
            out.read("response.output_item.done", {"output_index": k, "item": {
                "type": "function_call", "call_id": f"c{k}", "name": "f", "arguments": "{}"}})
        return out.output()

    assert growth(work, 200) < LINEAR
    assert [item["arguments"] for item in work(3)] == ["{}"] * 3


def test_a_deeply_nested_cut_json_closes_what_is_open_once() -> None:
    # a tool input cut by max_tokens: what closes it used to be written again at every
    # bracket, each time as long as the nesting (40 kB of `[` took twenty seconds)
    for text, whole in (("[" * 1000, "[" * 1000 + "]" * 1000),
                        ('{"a":' * 500 + "1", '{"a":' * 499 + "{}" + "}" * 499),
                        ('[{"a": [1, {"b": "c"}], "d": [[2', '[{"a": [1, {"b": "c"}], "d": [[]]}]')):
        joins = c_calls(lambda text=text: partial_json_text(text), "join")  # type: ignore[misc]
        assert joins <= 1
        assert partial_json_text(text) == whole


def test_a_name_streamed_in_pieces_is_not_rebuilt_per_piece() -> None:
    # a tool call's name is continued piece by piece (unless said again whole): the name so
    # far was concatenated anew for every piece, quadratic in its length
    acc: dict[str, Any] = {}
    merge_into(acc, {"tool_calls": [{"index": 0, "function": {"name": "get"}}]})
    held = []
    for piece in ("_", "wea", "ther", "", "get_weather", "s"):
        merge_into(acc, {"tool_calls": [{"index": 0, "function": {"name": piece}}]})
        held.append(acc["tool_calls"][0]["function"]["name"])
    assert all(name is held[0] for name in held)
    assert finished(acc)["tool_calls"][0]["function"]["name"] == "get_weathers"


@pure_only
def test_a_document_dripped_a_byte_per_read_is_held_at_about_its_size() -> None:
    # a worker's JSON document that comes a few bytes per read: each read was kept as its own
    # bytes object, ~20 bytes for each byte of 2-byte reads (64 MiB allowed: over 1 GB held)
    from sidecar.handlers import DocumentHandler

    exchange = SimpleNamespace(plan=SimpleNamespace(client_stream=False))
    handler = DocumentHandler(exchange, [])  # type: ignore[arg-type]
    reads = 100_000
    tracemalloc.start()
    try:
        for _ in range(reads):
            handler.data(bytes(2))  # a new object per read, as a socket's reads are
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2 * reads


def test_a_body_read_a_byte_at_a_time_is_held_at_about_its_size() -> None:
    """A request body of 1-byte chunks, one per read (or a worker's document dripped), was
    kept as one bytes object per read: ~40 bytes held per byte (a 10 MiB body: 400 MiB)."""
    reads = 100_000
    pieces: list[bytes | bytearray] = []
    tracemalloc.start()
    try:
        for i in range(reads):
            keep_body_piece(pieces, bytes((i % 256,)))  # a new object per read, as a socket's
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * reads
    assert b"".join(pieces) == bytes(i % 256 for i in range(reads))


def test_large_body_pieces_are_kept_as_they_came() -> None:
    big = bytes(SMALL_BODY_PIECE)
    pieces: list[bytes | bytearray] = []
    for piece in (b"a", b"b", big, b"c", big):
        keep_body_piece(pieces, piece)
    assert pieces[1] is big and pieces[3] is big  # not copied
    assert b"".join(pieces) == b"ab" + big + b"c" + big

