"""Differential tests: sidecar's translations against the real SDKs' own stream accumulators.

The official clients accumulate a stream into a final object themselves
(`openai`'s `chat.completions.stream(...).get_final_completion()` and
`responses.stream(...).get_final_response()`, `anthropic`'s
`messages.stream(...).get_final_message()`); that is an oracle for SPEC's merge
rules written by someone else. Hypothesis draws valid worker streams and
documents of all four dialects (n > 1 choices interleaved, text cut anywhere,
also inside a UTF-8 sequence on the wire, reasoning, tool calls in pieces,
logprobs, usage in its own chunk / on the last chunk / on every chunk growing):

- SSE -> JSON: the same worker stream goes (a) straight from the fake worker to
  the SDK's accumulator and (b) through sidecar to a non-streaming SDK client;
  the two must agree on everything SPEC says is merged, sidecar adding only
  `usage.cost` (exact from the price table, also as `x-sidecar-cost`).
- JSON -> SSE: a worker document goes through sidecar to the SDK's streaming
  accumulator; what it rebuilds must be the document (plus the cost), with
  SPEC's event order (anthropic) and `sequence_number`s (openai-responses).
- Raw: the same streams read by `httpx` + `httpx-sse`: every event is JSON, on
  the typed dialects its `event:` is its data's `type`, no byte-order mark, no
  event with empty data, `[DONE]` last on the OpenAI dialects.

`openai-completions` has no SDK accumulator; its oracle is the SDK's own parsed
chunks merged here as SPEC says (text concatenated, logprobs lists appended, the
last finish_reason, the usage of the stream).

One daemon and one fake worker serve the whole module; each example queues the
worker's answers (the same bytes for every request of the example).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import httpx_sse
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import (
    LAST_CHUNK,
    Daemon,
    FakeWorker,
    Reset,
    Send,
    Step,
    chunk,
    json_reply,
    response_head,
)

#: a modest example count so the module runs in well under a minute; SDK_EXAMPLES=500 for a hunt
PROFILE = settings(max_examples=int(os.environ.get("SDK_EXAMPLES", "40")), deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.function_scoped_fixture])

CHAT_MODEL = "chat-priced"
CLAUDE_MODEL = "claude-priced"
UNPRICED = "unpriced-model"
PRICES = {
    CHAT_MODEL: {"prompt": 1.25, "completion": 2.5, "cached_prompt": 0.5, "reasoning": 3.75},
    CLAUDE_MODEL: {"prompt": 3.0, "completion": 15.0, "cached_prompt": 0.3, "cache_write": 3.75},
}
D = {m: {k: Decimal(str(v)) for k, v in p.items()} for m, p in PRICES.items()}

TAILS = {"openai-chat": "chat/completions", "openai-completions": "completions",
         "anthropic-messages": "messages", "openai-responses": "responses"}
ROUTES = [
    {"name": f"{dialect}-{mode}", "match": {"path": f"{prefix}/v1/{tail}", "methods": ["POST"]},
     "dialect": dialect, "upstream_stream": mode}
    for dialect, tail in TAILS.items()
    for mode, prefix in (("auto", ""), ("always", "/always"), ("never", "/never"))
]


@pytest.fixture(scope="module")
def daemon(module_worker: FakeWorker, make_module_daemon: Callable[..., Daemon]) -> Daemon:
    return make_module_daemon(worker=module_worker, routes=ROUTES, pricing={"models": PRICES})


@pytest.fixture
def worker(module_worker: FakeWorker) -> Iterator[FakeWorker]:
    module_worker.reset()
    yield module_worker
    assert not module_worker.errors, module_worker.errors


def fresh(worker: FakeWorker) -> None:
    """One example's start: nothing queued or recorded from the one before."""
    assert not worker.errors, worker.errors
    worker.reset()


# =============================================================================================
# Strategies
# =============================================================================================

SPECIAL = ["é", "ß", "日", "本", "語", "€", "😀", "🇫🇷", "👩\u200d👩\u200d👧", "e\u0301", "\u2028", "\t",
           "\n", '"', "\\", "/", "<", "\x00", "\x7f", "\ufeff", "a", "b", " ", "{", "}", "𝄞"]
CHARS = st.one_of(st.sampled_from(SPECIAL), st.characters(codec="utf-8"))
TEXT = st.lists(CHARS, max_size=14).map("".join)
NONEMPTY = st.lists(CHARS, min_size=1, max_size=14).map("".join)
IDENT = st.text("abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=10)
JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.integers(-(10**25), 10**25),
                        st.floats(allow_nan=False, allow_infinity=False), TEXT)
JSON_OBJ = st.dictionaries(IDENT, st.one_of(JSON_SCALAR, st.lists(JSON_SCALAR, max_size=3)), max_size=4)


def split(draw: st.DrawFn, text: str, most: int = 5) -> list[str]:
    """`text` cut at up to `most` random code point boundaries (no empty piece)."""
    if not text:
        return []
    cuts = sorted(set(draw(st.lists(st.integers(1, len(text)), max_size=most))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def wire_cuts(draw: st.DrawFn, body: bytes) -> list[bytes]:
    """`body` cut into pieces, some of them inside a UTF-8 sequence (each goes out as one write)."""
    inside = [i for i, b in enumerate(body) if 0x80 <= b < 0xC0]
    cuts = set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=6)))
    if inside:
        cuts |= set(draw(st.lists(st.sampled_from(inside), max_size=4)))
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(body)), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds)]


def dumps(obj: Any, ascii_only: bool) -> str:
    return json.dumps(obj, ensure_ascii=ascii_only, separators=(",", ":"))


def encode_stream(draw: st.DrawFn, events: list[tuple[str | None, str]], named: bool = True) -> bytes:
    """The events (`event:` name or None, data) as SSE the way workers differ in writing it: LF,
    CRLF or CR line ends, `data:` with or without its space, the name before or after the data,
    `id:` lines, and comment lines (`: ping`) between events; `named=False` leaves out every
    `event:` line (workers whose typed events carry their type in the data only)."""
    eol = draw(st.sampled_from(["\n", "\n", "\r\n", "\r"]))
    space = draw(st.sampled_from([" ", " ", ""]))
    name_last = draw(st.integers(0, 4)) == 0
    with_ids = draw(st.integers(0, 4)) == 0
    out = []
    for i, (name, data) in enumerate(events):
        lines = [f"data:{space}{data}"]
        if name is not None and named:
            lines.insert(len(lines) if name_last else 0, f"event:{space}{name}")
        if with_ids:
            lines.append(f"id: {i}")
        if not with_ids and draw(st.integers(0, 7)) == 0:
            # (not after an id: the SDK reads a blank line then as an event with empty data)
            out.append(": ping" + eol + eol)
        out.append(eol.join(lines) + eol + eol)
    return "".join(out).encode()


def sse_steps(pieces: list[bytes]) -> list[Step]:
    head = response_head(200, [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")])
    return [Send(head), *(Send(chunk(p)) for p in pieces), Send(LAST_CHUNK)]


def openai_usage(draw: st.DrawFn) -> dict[str, Any]:
    prompt = draw(st.integers(0, 5000))
    cached = draw(st.integers(0, prompt))
    completion = draw(st.integers(0, 5000))
    reasoning = draw(st.integers(0, completion))
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    details = draw(st.sampled_from(["dicts", "dicts", "null", "absent"]))  # vLLM writes nulls
    if details == "dicts":
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    elif details == "null":
        usage["prompt_tokens_details"] = usage["completion_tokens_details"] = None
    return usage


def detail(usage: dict[str, Any], key: str, field: str) -> int:
    return (usage.get(key) or {}).get(field) or 0


def scaled_usage(usage: dict[str, Any], k: int, total: int) -> dict[str, Any]:
    """The usage of chunk `k` of `total` in vLLM's continuous usage stats: counts growing to the final."""
    completion = usage["completion_tokens"] * (k + 1) // total
    out = {**usage, "completion_tokens": completion, "total_tokens": usage["prompt_tokens"] + completion}
    if usage.get("completion_tokens_details"):
        reasoning = usage["completion_tokens_details"]["reasoning_tokens"] * (k + 1) // total
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


def openai_cost(model: str, usage: dict[str, Any] | None) -> Decimal | None:
    """SPEC's openai-chat cost formula, exact."""
    if usage is None or model not in D:
        return None
    p = D[model]
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    cached = detail(usage, "prompt_tokens_details", "cached_tokens")
    reasoning = detail(usage, "completion_tokens_details", "reasoning_tokens")
    return ((prompt - cached) * p["prompt"] + cached * p.get("cached_prompt", p["prompt"])
            + (completion - reasoning) * p["completion"]
            + reasoning * p.get("reasoning", p["completion"])) / Decimal(10**6)


def place_usage(draw: st.DrawFn, chunks: list[dict[str, Any]], base: dict[str, Any],
                usage: dict[str, Any] | None, mode: str) -> None:
    """Usage where a worker puts it: `own` chunk (choices []), on the `last` chunk, on `every` chunk
    (growing; `every+own`: and its own chunk after them)."""
    if usage is None:
        return
    if mode == "own":
        if draw(st.booleans()):  # SGLang / TGI: `usage: null` on ordinary chunks
            for c in chunks:
                c["usage"] = None
        chunks.append({**base, "choices": [], "usage": usage})
    elif mode == "last":
        chunks[-1]["usage"] = usage
    else:
        for k, c in enumerate(chunks):
            c["usage"] = scaled_usage(usage, k, len(chunks))
        if mode == "every+own":  # vLLM's continuous usage stats, then its usage-only chunk
            chunks.append({**base, "choices": [], "usage": usage})


def interleave(draw: st.DrawFn, seqs: list[list[Any]]) -> list[tuple[int, Any]]:
    """The per-choice sequences merged in a random order that keeps each one's own order."""
    tags = [i for i, seq in enumerate(seqs) for _ in seq]
    order = draw(st.permutations(tags))
    its = [iter(seq) for seq in seqs]
    return [(i, next(its[i])) for i in order]


def batch(draw: st.DrawFn, items: list[tuple[int, dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """Consecutive choices of different indices sometimes go out in one chunk."""
    out: list[list[dict[str, Any]]] = []
    for index, choice in items:
        if out and index not in {c["index"] for c in out[-1]} and draw(st.integers(0, 3)) == 0:
            out[-1].append(choice)
        else:
            out.append([choice])
    return out


# ---------------------------------------------------------------------------- openai-chat


def tool_calls_strategy() -> st.SearchStrategy[list[dict[str, str]]]:
    call = st.fixed_dictionaries({"id": IDENT.map(lambda s: "call_" + s), "name": IDENT,
                                  "arguments": st.tuples(JSON_OBJ, st.booleans()).map(
                                      lambda t: dumps(t[0], t[1]))})
    return st.lists(call, max_size=2)


@st.composite
def chat_plans(draw: st.DrawFn) -> dict[str, Any]:
    """A chat completion as a worker would stream it, and the same as one document."""
    n = draw(st.integers(1, 3))
    model = draw(st.sampled_from([CHAT_MODEL, CHAT_MODEL, UNPRICED]))
    with_logprobs = draw(st.booleans())
    reasoning_key = draw(st.sampled_from(["reasoning_content", "reasoning"]))  # vLLM's old and new name
    base = {"id": "chatcmpl-" + draw(IDENT), "object": "chat.completion.chunk",
            "created": draw(st.integers(1, 2**31)), "model": model}
    choices, seqs = [], []
    for i in range(n):
        content = draw(TEXT)
        reasoning = draw(st.one_of(st.none(), NONEMPTY))
        refusal = draw(st.one_of(st.none(), st.none(), NONEMPTY))
        calls = draw(tool_calls_strategy())
        finish = draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"]))
        seq: list[dict[str, Any]] = []

        def put(delta: dict[str, Any], logprobs: Any = None, finish_reason: str | None = None,
                i: int = i, seq: list[dict[str, Any]] = seq) -> None:
            c: dict[str, Any] = {"index": i, "delta": delta}
            if with_logprobs:
                c["logprobs"] = logprobs
            c["finish_reason"] = finish_reason
            seq.append(c)

        for piece in split(draw, reasoning or ""):
            put({reasoning_key: piece})
        entries, refusal_entries = [], []
        for piece in split(draw, content):
            entry = {"token": piece, "logprob": -draw(st.integers(0, 1000)) / 64,
                     "bytes": list(piece.encode()), "top_logprobs": []}
            entries.append(entry)
            put({"content": piece}, {"content": [entry], "refusal": None} if with_logprobs else None)
        for piece in split(draw, refusal or ""):
            entry = {"token": piece, "logprob": -1.5, "bytes": None, "top_logprobs": []}
            refusal_entries.append(entry)
            put({"refusal": piece}, {"content": None, "refusal": [entry]} if with_logprobs else None)
        # tool calls: each one's id/type/name first, then its arguments in pieces; the calls one
        # after the other, or every head first (in index order) and the pieces interleaved, and
        # sometimes entries of different calls in one delta
        # later pieces as workers write them: bare, or with the head's keys null or empty (TGI's
        # `"id": ""`); not `"type": null`, which the SDK's accumulator itself cannot take
        filler, name_filler = draw(st.sampled_from([
            ({}, {}), ({"id": None}, {"name": None}), ({"id": ""}, {})]))
        per_call = [[{"index": k, "id": c["id"], "type": "function",
                      "function": {"name": c["name"], "arguments": ""}}]
                    + [{"index": k, **filler, "function": {**name_filler, "arguments": p}}
                       for p in split(draw, c["arguments"])]
                    for k, c in enumerate(calls)]
        if draw(st.booleans()):
            entries_order = [e for seq_ in per_call for e in seq_]
        else:
            entries_order = [seq_[0] for seq_ in per_call]
            entries_order += [e for _, e in interleave(draw, [seq_[1:] for seq_ in per_call])]
        deltas: list[list[dict[str, Any]]] = []
        for e in entries_order:
            if deltas and e["index"] not in {x["index"] for x in deltas[-1]} and draw(st.integers(0, 2)) == 0:
                deltas[-1].append(e)
            else:
                deltas.append([e])
        with_null_content = draw(st.booleans())  # OpenAI: `"content": null` beside tool calls
        for d in deltas:
            put({"content": None, "tool_calls": d} if with_null_content else {"tool_calls": d})
        last = seq[-1] if seq else None
        if (last is not None and set(last["delta"]) == {"content"} and not calls and refusal is None
                and draw(st.booleans())):
            last["finish_reason"] = finish  # the last piece and the finish in one chunk (llama.cpp)
        else:
            put(draw(st.sampled_from([{}, {"content": ""}])), None, finish)
        seqs.append(seq)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning is not None:
            message[reasoning_key] = reasoning
        if refusal is not None:
            message["refusal"] = refusal
        if calls:
            message["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["name"], "arguments": c["arguments"]}}
                                     for c in calls]
        choices.append({"index": i, "message": message,
                        "logprobs": {"content": entries, "refusal": refusal_entries or None}
                        if with_logprobs else None,
                        "finish_reason": finish})
    opening = draw(st.sampled_from([{"role": "assistant", "content": ""}, {"role": "assistant"},
                                    {"role": "assistant", "content": None}]))  # vLLM, OpenAI, llama.cpp
    roles = [{"index": i, "delta": dict(opening), "finish_reason": None} for i in range(n)]
    chunks = [{**base, "choices": [r]} for r in roles]  # every choice opens in index order
    chunks += [{**base, "choices": cs} for cs in batch(draw, interleave(draw, seqs))]
    usage = openai_usage(draw) if draw(st.integers(0, 3)) else None
    mode = draw(st.sampled_from(["own", "last", "every", "every+own"]))
    place_usage(draw, chunks, base, usage, mode)
    ascii_only = draw(st.booleans())
    body = encode_stream(draw, [(None, dumps(c, ascii_only)) for c in chunks] + [(None, "[DONE]")])
    doc = {"id": base["id"], "object": "chat.completion", "created": base["created"], "model": model,
           "choices": choices}
    if usage is not None:
        doc["usage"] = usage
    return {"n": n, "model": model, "body": body, "pieces": wire_cuts(draw, body), "doc": doc,
            "usage": usage, "usage_mode": mode, "logprobs": with_logprobs}


def chat_view(doc: dict[str, Any]) -> dict[str, Any]:
    """What SPEC says an aggregated chat completion carries, normalized (no content == "")."""
    choices = []
    for c in sorted(doc["choices"], key=lambda c: c["index"]):
        message = c.get("message") or {}
        choices.append({
            "index": c["index"],
            "finish_reason": c.get("finish_reason"),
            "role": message.get("role"),
            "content": message.get("content") or "",
            "reasoning_content": message.get("reasoning_content") or "",
            "reasoning": message.get("reasoning") or "",
            "refusal": message.get("refusal") or "",
            "tool_calls": [(t.get("id"), t.get("type"), t["function"].get("name"),
                            t["function"].get("arguments")) for t in message.get("tool_calls") or []],
            "logprobs": ((c.get("logprobs") or {}).get("content") or []),
            "refusal_logprobs": ((c.get("logprobs") or {}).get("refusal") or []),
        })
    return {"id": doc["id"], "created": doc["created"], "model": doc["model"], "choices": choices}


# ---------------------------------------------------------------------------- openai-completions


@st.composite
def completion_plans(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 3))
    model = draw(st.sampled_from([CHAT_MODEL, UNPRICED]))
    with_logprobs = draw(st.booleans())
    base = {"id": "cmpl-" + draw(IDENT), "object": "text_completion",
            "created": draw(st.integers(1, 2**31)), "model": model}
    seqs, choices = [], []
    for i in range(n):
        text = draw(TEXT)
        finish = draw(st.sampled_from(["stop", "length"]))
        seq = []
        lp: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        for piece in split(draw, text):
            one = {"tokens": [piece], "token_logprobs": [-draw(st.integers(0, 500)) / 32],
                   "top_logprobs": [{piece: -0.5}], "text_offset": [offset]}
            offset += len(piece)
            for key in lp:
                lp[key] += one[key]
            seq.append({"index": i, "text": piece, "logprobs": one if with_logprobs else None,
                        "finish_reason": None})
        seq.append({"index": i, "text": "", "logprobs": None, "finish_reason": finish})
        seqs.append(seq)
        choices.append({"index": i, "text": text, "logprobs": lp if with_logprobs else None,
                        "finish_reason": finish})
    chunks = [{**base, "choices": [s[0]]} for s in seqs]  # every choice opens in index order
    chunks += [{**base, "choices": cs} for cs in batch(draw, interleave(draw, [s[1:] for s in seqs]))]
    usage = openai_usage(draw) if draw(st.integers(0, 3)) else None
    if usage is not None:  # completions workers report no details
        usage.pop("prompt_tokens_details", None)
        usage.pop("completion_tokens_details", None)
    place_usage(draw, chunks, base, usage, draw(st.sampled_from(["own", "last", "every", "every+own"])))
    ascii_only = draw(st.booleans())
    body = encode_stream(draw, [(None, dumps(c, ascii_only)) for c in chunks] + [(None, "[DONE]")])
    doc = {**base, "object": "text_completion", "choices": choices}
    if usage is not None:
        doc["usage"] = usage
    return {"n": n, "model": model, "body": body, "pieces": wire_cuts(draw, body), "doc": doc,
            "usage": usage}


def merge_completion_chunks(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """SPEC's SSE -> JSON merge for `/v1/completions`, on chunks the SDK parsed."""
    first = chunks[0]
    merged: dict[int, dict[str, Any]] = {}
    usage = None
    for c in chunks:
        if c.get("usage"):
            usage = c["usage"]
        for choice in c["choices"]:
            m = merged.setdefault(choice["index"], {"index": choice["index"], "text": "", "logprobs": None,
                                                    "finish_reason": None})
            m["text"] += choice.get("text") or ""
            if choice.get("logprobs"):
                if m["logprobs"] is None:
                    m["logprobs"] = {k: [] for k in choice["logprobs"]}
                for key, values in choice["logprobs"].items():
                    m["logprobs"].setdefault(key, []).extend(values or [])
            if choice.get("finish_reason"):
                m["finish_reason"] = choice["finish_reason"]
    out = {"id": first["id"], "created": first["created"], "model": first["model"],
           "choices": [merged[i] for i in sorted(merged)]}
    if usage is not None:
        out["usage"] = usage
    return out


def completion_view(doc: dict[str, Any]) -> dict[str, Any]:
    return {"id": doc["id"], "created": doc["created"], "model": doc["model"],
            "choices": [{"index": c["index"], "text": c.get("text") or "", "finish_reason": c.get("finish_reason"),
                         "logprobs": {k: v for k, v in (c.get("logprobs") or {}).items() if v}}
                        for c in sorted(doc["choices"], key=lambda c: c["index"])]}


# ---------------------------------------------------------------------------- anthropic-messages




@st.composite
def anthropic_plans(draw: st.DrawFn, named: bool = True) -> dict[str, Any]:
    model = draw(st.sampled_from([CLAUDE_MODEL, CLAUDE_MODEL, UNPRICED]))
    kinds = draw(st.lists(st.sampled_from(["text", "text", "thinking", "tool_use", "redacted_thinking",
                                           "server_tool_use", "web_search_tool_result"]), max_size=4))
    stop = draw(st.sampled_from(["end_turn", "max_tokens", "tool_use", "stop_sequence"]))
    stop_sequence = draw(NONEMPTY) if stop == "stop_sequence" else None
    usage = {"input_tokens": draw(st.integers(0, 5000)), "output_tokens": draw(st.integers(1, 5000)),
             "cache_read_input_tokens": draw(st.integers(0, 5000)),
             "cache_creation_input_tokens": draw(st.integers(0, 5000))}
    message = {"id": "msg_" + draw(IDENT), "type": "message", "role": "assistant", "model": model,
               "content": [], "stop_reason": stop, "stop_sequence": stop_sequence, "usage": usage}
    ascii_only = draw(st.booleans())
    start_usage = {**usage, "output_tokens": draw(st.integers(0, usage["output_tokens"]))}
    opening = {**message, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}
    if draw(st.integers(0, 3)) == 0:  # some workers leave them out; SPEC: SSE -> JSON fills them in
        del opening["type"], opening["role"]
    events = [("message_start", {"type": "message_start", "message": opening})]
    for index, kind in enumerate(kinds):
        def delta(d: dict[str, Any], index: int = index) -> None:
            events.append(("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}))

        if kind == "text":
            text = draw(TEXT)
            block: dict[str, Any] = {"type": "text", "text": text}
            events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": {"type": "text", "text": ""}}))
            citations = []
            for piece in split(draw, text):
                delta({"type": "text_delta", "text": piece})
                if draw(st.integers(0, 5)) == 0:  # a citation after a piece (web search, documents)
                    citation = {"type": "char_location", "cited_text": piece, "document_index": 0,
                                "document_title": draw(st.one_of(st.none(), IDENT)),
                                "start_char_index": 0, "end_char_index": len(piece)}
                    citations.append(citation)
                    delta({"type": "citations_delta", "citation": citation})
            if citations:
                block["citations"] = citations
        elif kind == "web_search_tool_result":
            block = {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_" + draw(IDENT),
                     "content": [{"type": "web_search_result", "url": "https://example.com/" + draw(IDENT),
                                  "title": draw(TEXT), "encrypted_content": draw(IDENT), "page_age": None}]}
            events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": dict(block)}))
        elif kind == "redacted_thinking":
            block = {"type": "redacted_thinking", "data": draw(IDENT)}
            events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": dict(block)}))
        elif kind == "thinking":
            thinking, signature = draw(TEXT), draw(IDENT)
            block = {"type": "thinking", "thinking": thinking, "signature": signature}
            events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": {"type": "thinking", "thinking": "",
                                                                     "signature": ""}}))
            for piece in split(draw, thinking):
                delta({"type": "thinking_delta", "thinking": piece})
            delta({"type": "signature_delta", "signature": signature})
        else:
            tool_input = draw(JSON_OBJ)
            if kind == "tool_use":
                block = {"type": "tool_use", "id": "toolu_" + draw(IDENT), "name": draw(IDENT),
                         "input": tool_input}
            else:
                block = {"type": "server_tool_use", "id": "srvtoolu_" + draw(IDENT), "name": "web_search",
                         "input": tool_input}
            events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": {**block, "input": {}}}))
            raw = dumps(tool_input, draw(st.booleans()))
            if not tool_input and draw(st.booleans()):  # the API sends no input, or "" for no input
                raw = ""
                if draw(st.booleans()):
                    delta({"type": "input_json_delta", "partial_json": ""})
            for piece in split(draw, raw, 8):
                delta({"type": "input_json_delta", "partial_json": piece})
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        message["content"].append(block)
    final_usage: dict[str, Any] = {"output_tokens": usage["output_tokens"]}
    if draw(st.booleans()):  # newer API: cumulative input counts repeated on message_delta
        final_usage.update({k: usage[k] for k in usage if k != "output_tokens"})
    events.append(("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": stop, "stop_sequence": stop_sequence},
                                     "usage": final_usage}))
    events.append(("message_stop", {"type": "message_stop"}))
    for at in sorted(draw(st.lists(st.integers(1, len(events) - 1), max_size=2)), reverse=True):
        events.insert(at, ("ping", {"type": "ping"}))
    body = encode_stream(draw, [(k, dumps(o, ascii_only)) for k, o in events], named)
    return {"model": model, "body": body, "pieces": wire_cuts(draw, body), "doc": message, "usage": usage}


def anthropic_cost(model: str, usage: dict[str, Any]) -> Decimal | None:
    if model not in D:
        return None
    p = D[model]
    return (usage["input_tokens"] * p["prompt"]
            + usage["cache_read_input_tokens"] * p.get("cached_prompt", p["prompt"])
            + usage["cache_creation_input_tokens"] * p.get("cache_write", p["prompt"])
            + usage["output_tokens"] * p["completion"]) / Decimal(10**6)


def anthropic_view(doc: dict[str, Any]) -> dict[str, Any]:
    usage = doc["usage"]
    return {"id": doc["id"], "type": doc.get("type"), "role": doc.get("role"), "model": doc["model"],
            "content": doc["content"], "stop_reason": doc["stop_reason"],
            "stop_sequence": doc.get("stop_sequence"),
            "usage": {k: usage.get(k) for k in ("input_tokens", "output_tokens", "cache_read_input_tokens",
                                                "cache_creation_input_tokens")}}


# ---------------------------------------------------------------------------- openai-responses


@st.composite
def responses_plans(draw: st.DrawFn, named: bool = True) -> dict[str, Any]:
    model = draw(st.sampled_from([CHAT_MODEL, CHAT_MODEL, UNPRICED]))
    kinds = draw(st.lists(st.sampled_from(["reasoning", "message", "message", "function_call",
                                           "web_search_call"]), max_size=3))
    inp = draw(st.integers(0, 5000))
    out = draw(st.integers(0, 5000))
    usage = {"input_tokens": inp, "input_tokens_details": {"cached_tokens": draw(st.integers(0, inp))},
             "output_tokens": out, "output_tokens_details": {"reasoning_tokens": draw(st.integers(0, out))},
             "total_tokens": inp + out}
    doc: dict[str, Any] = {
        "id": "resp_" + draw(IDENT), "object": "response", "created_at": draw(st.integers(1, 2**31)),
        "model": model, "status": "completed", "error": None, "incomplete_details": None,
        "instructions": None, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "output": [], "usage": usage,
    }
    pending = {**doc, "status": "in_progress", "output": [], "usage": None}
    events: list[dict[str, Any]] = [{"type": "response.created", "response": pending},
                                    {"type": "response.in_progress", "response": pending}]
    for index, kind in enumerate(kinds):
        if kind == "reasoning":
            text = draw(TEXT)
            item: dict[str, Any] = {"id": f"rs_{index}", "type": "reasoning",
                                    "summary": [{"type": "summary_text", "text": text}]}
            at = {"item_id": item["id"], "output_index": index, "summary_index": 0}
            events.append({"type": "response.output_item.added", "output_index": index,
                           "item": {**item, "summary": []}})
            events.append({"type": "response.reasoning_summary_part.added", **at,
                           "part": {"type": "summary_text", "text": ""}})
            events += [{"type": "response.reasoning_summary_text.delta", **at, "delta": p}
                       for p in split(draw, text)]
            events.append({"type": "response.reasoning_summary_text.done", **at, "text": text})
            events.append({"type": "response.reasoning_summary_part.done", **at,
                           "part": {"type": "summary_text", "text": text}})
        elif kind == "message":
            texts = draw(st.lists(TEXT, min_size=1, max_size=2))  # one or two output_text parts
            parts: list[dict[str, Any]] = [{"type": "output_text", "text": t, "annotations": [], "logprobs": []}
                                           for t in texts]
            if draw(st.integers(0, 3)) == 0:
                parts.append({"type": "refusal", "refusal": draw(NONEMPTY)})
            item = {"id": f"msg_{index}", "type": "message", "status": "completed", "role": "assistant",
                    "content": parts}
            events.append({"type": "response.output_item.added", "output_index": index,
                           "item": {**item, "status": "in_progress", "content": []}})
            for ci, part in enumerate(parts):
                at = {"item_id": item["id"], "output_index": index, "content_index": ci}
                if part["type"] == "refusal":
                    events.append({"type": "response.content_part.added", **at,
                                   "part": {**part, "refusal": ""}})
                    events += [{"type": "response.refusal.delta", **at, "delta": p}
                               for p in split(draw, part["refusal"])]
                    events.append({"type": "response.refusal.done", **at, "refusal": part["refusal"]})
                else:
                    events.append({"type": "response.content_part.added", **at, "part": {**part, "text": ""}})
                    events += [{"type": "response.output_text.delta", **at, "delta": p, "logprobs": []}
                               for p in split(draw, part["text"])]
                    events.append({"type": "response.output_text.done", **at, "text": part["text"],
                                   "logprobs": []})
                events.append({"type": "response.content_part.done", **at, "part": part})
        elif kind == "web_search_call":
            item = {"id": f"ws_{index}", "type": "web_search_call", "status": "completed",
                    "action": {"type": "search", "query": draw(TEXT)}}
            events.append({"type": "response.output_item.added", "output_index": index,
                           "item": {**item, "status": "in_progress"}})
        else:
            arguments = dumps(draw(JSON_OBJ), draw(st.booleans()))
            item = {"id": f"fc_{index}", "type": "function_call", "status": "completed",
                    "call_id": f"call_{index}_" + draw(IDENT), "name": draw(IDENT), "arguments": arguments}
            events.append({"type": "response.output_item.added", "output_index": index,
                           "item": {**item, "status": "in_progress", "arguments": ""}})
            events += [{"type": "response.function_call_arguments.delta", "item_id": item["id"],
                        "output_index": index, "delta": p} for p in split(draw, arguments, 8)]
            events.append({"type": "response.function_call_arguments.done", "item_id": item["id"],
                           "output_index": index, "arguments": arguments})
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
        doc["output"].append(item)
    terminal = draw(st.sampled_from(["response.completed", "response.completed", "response.incomplete"]))
    if terminal == "response.incomplete":
        doc["status"] = "incomplete"
        doc["incomplete_details"] = {"reason": "max_output_tokens"}
    events.append({"type": terminal, "response": doc})
    numbered = draw(st.booleans())
    ascii_only = draw(st.booleans())
    body = encode_stream(draw, [(e["type"], dumps({**e, "sequence_number": i} if numbered else e, ascii_only))
                                for i, e in enumerate(events)], named)
    return {"model": model, "body": body, "pieces": wire_cuts(draw, body), "doc": doc, "usage": usage,
            "numbered": numbered, "count": len(events), "terminal": terminal}


def responses_final(stream: Any) -> tuple[dict[str, Any], list[Any]]:
    """The SDK stream helper's final response (`get_final_response()`; for a stream that ends with
    `response.incomplete`, which that refuses, the response its terminal event carries), and the events."""
    events = list(stream)
    if events[-1].type == "response.completed":
        return strip_parsed(stream.get_final_response().to_dict()), events
    assert events[-1].type == "response.incomplete", events[-1].type
    return strip_parsed(events[-1].response.to_dict()), events


def responses_cost(model: str, usage: dict[str, Any]) -> Decimal | None:
    return openai_cost(model, {
        "prompt_tokens": usage["input_tokens"], "completion_tokens": usage["output_tokens"],
        "prompt_tokens_details": {"cached_tokens": detail(usage, "input_tokens_details", "cached_tokens")},
        "completion_tokens_details": {
            "reasoning_tokens": detail(usage, "output_tokens_details", "reasoning_tokens")}})


def strip_parsed(obj: Any) -> Any:
    """An SDK object's dict without the SDK's own `parsed*` helpers (None unless a format is given)."""
    if isinstance(obj, dict):
        return {k: strip_parsed(v) for k, v in obj.items() if k not in ("parsed", "parsed_arguments")}
    if isinstance(obj, list):
        return [strip_parsed(v) for v in obj]
    return obj


# =============================================================================================
# Clients and checks
# =============================================================================================

def chat_final(stream: Any) -> dict[str, Any]:
    """The SDK stream helper's accumulated completion (its `get_final_completion()` without the
    parse step, which raises on `length` / `content_filter` finishes)."""
    stream.until_done()
    return stream.current_completion_snapshot.to_dict()


FIXED_POINT = re.compile(r"^\d+(\.\d+)?$")


def oai(url: str) -> openai.OpenAI:
    return openai.OpenAI(api_key="sk-test", base_url=url + "/v1", max_retries=0, timeout=10)


def claude(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="sk-ant-test", base_url=url, max_retries=0, timeout=10)


def check_cost(usage: dict[str, Any] | None, expected: Decimal | None, header: str | None = None, *,
               json_doc: bool = False) -> None:
    """`usage.cost` is SPEC's cost (none for an unpriced model); a JSON answer's header says it exactly."""
    if expected is None:
        assert usage is None or "cost" not in usage, usage
        assert header is None
        return
    assert usage is not None
    assert usage["cost"] == pytest.approx(float(expected), rel=1e-12, abs=1e-18), (usage, expected)
    if json_doc:
        assert header is not None and FIXED_POINT.match(header), header
        assert abs(Decimal(header) - expected) <= Decimal("1e-10"), (header, expected)


def read_raw(daemon: Daemon, path: str, body: dict[str, Any]) -> tuple[bytes, list[httpx_sse.ServerSentEvent]]:
    """One streaming request read by httpx; its body bytes and its events as httpx-sse parses them."""
    response = httpx.post(daemon.url + path, json=body, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    raw = response.content
    assert not raw.startswith(b"\xef\xbb\xbf")
    events = list(httpx_sse.EventSource(response).iter_sse())
    assert events
    for event in events:
        assert event.data != "", event  # an event with empty data crashes the openai SDK
    return raw, events


def raw_openai(events: list[httpx_sse.ServerSentEvent]) -> list[dict[str, Any]]:
    """The chunks of an OpenAI-dialect stream that succeeded: JSON objects, `[DONE]` last and once."""
    datas = [e.data for e in events]
    assert datas[-1] == "[DONE]" and datas.count("[DONE]") == 1, datas[-3:]
    chunks = [json.loads(d) for d in datas[:-1]]
    assert all(isinstance(c, dict) and "error" not in c for c in chunks)
    return chunks


def raw_typed(events: list[httpx_sse.ServerSentEvent]) -> list[dict[str, Any]]:
    """The events of a typed-dialect stream: JSON, `event:` equal to the data's `type`, no `[DONE]`."""
    out = []
    for event in events:
        obj = json.loads(event.data)
        assert event.event == obj["type"], (event.event, obj)
        out.append(obj)
    return out


def check_anthropic_order(kinds: list[tuple[str, int | None]], blocks: int) -> None:
    """SPEC's event order: message_start, each block started, its deltas, stopped (in index order),
    one message_delta, message_stop last; pings anywhere in between."""
    kinds = [k for k in kinds if k[0] != "ping"]
    assert kinds[0][0] == "message_start" and kinds[-1][0] == "message_stop"
    assert kinds[-2][0] == "message_delta"
    body = kinds[1:-2]
    expected_index = 0
    open_block: int | None = None
    for kind, index in body:
        if kind == "content_block_start":
            assert open_block is None and index == expected_index
            open_block = index
        elif kind == "content_block_delta":
            assert open_block is not None and index == open_block
        elif kind == "content_block_stop":
            assert index == open_block
            open_block, expected_index = None, expected_index + 1
        else:
            raise AssertionError(kind)
    assert open_block is None and expected_index == blocks


def check_sequence_numbers(events: list[Any], worker_numbered: bool, worker_count: int) -> None:
    """Numbered worker events pass unchanged, sidecar's own continue; unnumbered: 0, 1, 2, ..."""
    numbers = [e["sequence_number"] if isinstance(e, dict) else e.sequence_number for e in events]
    assert numbers == list(range(len(numbers))), numbers
    if worker_numbered:
        assert len(numbers) == worker_count


# =============================================================================================
# SSE -> JSON: the worker streams, the client asked for one document
# =============================================================================================


@PROFILE
@given(plan=chat_plans(), prefix=st.sampled_from(["", "/always"]), include_usage=st.booleans())
def test_chat_sse_to_json_agrees_with_the_sdk_accumulator(
    daemon: Daemon, worker: FakeWorker, plan: dict[str, Any], prefix: str, include_usage: bool
) -> None:
    fresh(worker)
    steps = sse_steps(plan["pieces"])
    worker.reply(steps, steps, steps)
    ask = {"model": plan["model"], "messages": [{"role": "user", "content": "hi"}], "n": plan["n"]}
    # (a) the SDK's own accumulator on the worker's stream
    with oai(worker.url).chat.completions.stream(**ask) as stream:
        oracle = chat_final(stream)
    # (b) the same stream aggregated by sidecar, parsed by the SDK
    raw = oai(daemon.url + prefix).chat.completions.with_raw_response.create(**ask)
    parsed = raw.parse()
    got = parsed.to_dict()
    assert parsed.object == "chat.completion"
    assert raw.headers["content-type"].startswith("application/json")
    assert chat_view(got) == chat_view(oracle)
    assert chat_view(got) == chat_view(plan["doc"])
    expected_cost = openai_cost(plan["model"], plan["usage"])
    if plan["usage"] is None:
        assert got.get("usage") is None and oracle.get("usage") is None
    else:
        usage = dict(got["usage"])
        cost = usage.pop("cost", None)
        assert usage == oracle["usage"] == plan["usage"]
        check_cost({**usage, **({"cost": cost} if cost is not None else {})}, expected_cost,
                   raw.headers.get("x-sidecar-cost"), json_doc=True)
    if plan["usage"] is None:
        assert raw.headers.get("x-sidecar-cost") is None
    # (c) the stream as a streaming client reads it, raw (usage asked for, or not)
    stream_body: dict[str, Any] = {**ask, "stream": True}
    if include_usage:
        stream_body["stream_options"] = {"include_usage": True}
    _, events = read_raw(daemon, "/v1/chat/completions", stream_body)
    chunks = raw_openai(events)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    state = openai.lib.streaming.chat.ChatCompletionStreamState()
    for c in chunks:
        state.handle_chunk(openai.types.chat.ChatCompletionChunk.model_validate(c))
    streamed = state.current_completion_snapshot.to_dict()
    assert chat_view(streamed) == chat_view(oracle)
    if not include_usage:
        assert not [c for c in chunks if c.get("usage")], "usage the client did not ask for"
        assert all(c["choices"] for c in chunks), "the usage-only chunk was forwarded"
    elif plan["usage"] is not None:
        with_usage = [c for c in chunks if c.get("usage")]
        assert with_usage
        final_usage = dict(with_usage[-1]["usage"])
        check_cost(final_usage, expected_cost)
        final_usage.pop("cost", None)
        assert final_usage == plan["usage"]
        costs = [c["usage"]["cost"] for c in with_usage if "cost" in c["usage"]]
        assert costs == sorted(costs)  # priced where final, from the largest counts so far
    assert len(worker.requests) == 3


@PROFILE
@given(plan=completion_plans(), prefix=st.sampled_from(["", "/always"]))
def test_completions_sse_to_json_agrees_with_the_sdk_chunks(
    daemon: Daemon, worker: FakeWorker, plan: dict[str, Any], prefix: str
) -> None:
    fresh(worker)
    steps = sse_steps(plan["pieces"])
    worker.reply(steps, steps, steps)
    ask = {"model": plan["model"], "prompt": "hi", "n": plan["n"]}
    oracle = merge_completion_chunks([c.to_dict() for c in oai(worker.url).completions.create(**ask, stream=True)])
    raw = oai(daemon.url + prefix).completions.with_raw_response.create(**ask)
    parsed = raw.parse()
    got = parsed.to_dict()
    assert parsed.object == "text_completion"
    assert completion_view(got) == completion_view(oracle) == completion_view(plan["doc"])
    expected_cost = openai_cost(plan["model"], plan["usage"])
    if plan["usage"] is None:
        assert got.get("usage") is None and raw.headers.get("x-sidecar-cost") is None
    else:
        usage = dict(got["usage"])
        cost = usage.pop("cost", None)
        assert usage == oracle["usage"] == plan["usage"]
        check_cost({**usage, **({"cost": cost} if cost is not None else {})}, expected_cost,
                   raw.headers.get("x-sidecar-cost"), json_doc=True)
    _, events = read_raw(daemon, "/v1/completions", {**ask, "stream": True})
    chunks = raw_openai(events)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert all("usage" not in c or c["usage"] is None for c in chunks)  # not asked for
    assert completion_view(merge_completion_chunks(chunks)) == completion_view(oracle)


@PROFILE
@given(plan=anthropic_plans(), prefix=st.sampled_from(["", "/always"]))
def test_anthropic_sse_to_json_agrees_with_the_sdk_accumulator(
    daemon: Daemon, worker: FakeWorker, plan: dict[str, Any], prefix: str
) -> None:
    fresh(worker)
    steps = sse_steps(plan["pieces"])
    worker.reply(steps, steps, steps)
    ask = {"model": plan["model"], "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    with claude(worker.url).messages.stream(**ask) as stream:
        oracle = stream.get_final_message().to_dict()
    raw = claude(daemon.url + prefix).messages.with_raw_response.create(**ask)
    got = raw.parse().to_dict()
    assert raw.headers["content-type"].startswith("application/json")
    assert anthropic_view(strip_parsed(got)) == anthropic_view(plan["doc"])
    oracle_view = anthropic_view(strip_parsed(oracle))
    assert {**anthropic_view(got), "type": oracle_view["type"], "role": oracle_view["role"]} == oracle_view
    expected_cost = anthropic_cost(plan["model"], plan["usage"])
    check_cost(got["usage"], expected_cost, raw.headers.get("x-sidecar-cost"), json_doc=True)
    _, events = read_raw(daemon, "/v1/messages", {**ask, "stream": True})
    objs = raw_typed(events)
    assert objs[-1]["type"] == "message_stop"
    state = None
    bufs: dict[int, bytes] = {}
    for obj in objs:
        state = anthropic.lib.streaming._messages.accumulate_event(
            event=obj, current_snapshot=state, json_bufs=bufs)  # type: ignore[arg-type]
    assert state is not None
    assert anthropic_view(strip_parsed(state.to_dict())) == oracle_view
    (delta,) = [o for o in objs if o["type"] == "message_delta"]
    check_cost(delta["usage"], expected_cost)


@PROFILE
@given(plan=responses_plans(), prefix=st.sampled_from(["", "/always"]))
def test_responses_sse_to_json_agrees_with_the_sdk_accumulator(
    daemon: Daemon, worker: FakeWorker, plan: dict[str, Any], prefix: str
) -> None:
    fresh(worker)
    steps = sse_steps(plan["pieces"])
    worker.reply(steps, steps, steps)
    with oai(worker.url).responses.stream(model=plan["model"], input="hi") as stream:
        oracle, _ = responses_final(stream)
    raw = oai(daemon.url + prefix).responses.with_raw_response.create(model=plan["model"], input="hi")
    got = strip_parsed(raw.parse().to_dict())
    usage = dict(got["usage"])
    expected_cost = responses_cost(plan["model"], plan["usage"])
    check_cost(usage, expected_cost, raw.headers.get("x-sidecar-cost"), json_doc=True)
    usage.pop("cost", None)
    assert {**got, "usage": usage} == oracle
    assert oracle["output"] == plan["doc"]["output"] and oracle["usage"] == plan["usage"]
    _, events = read_raw(daemon, "/v1/responses", {"model": plan["model"], "input": "hi", "stream": True})
    objs = raw_typed(events)
    check_sequence_numbers(objs, plan["numbered"], plan["count"])
    assert objs[0]["type"] == "response.created" and objs[-1]["type"] == plan["terminal"]
    check_cost(objs[-1]["response"]["usage"], expected_cost)
    assert [e["type"] for e in objs].count(plan["terminal"]) == 1


# =============================================================================================
# JSON -> SSE: the worker answers one document, the client streams
# =============================================================================================


@PROFILE
@given(plan=chat_plans(), prefix=st.sampled_from(["", "/never"]), include_usage=st.booleans())
def test_chat_json_to_sse_rebuilds_the_document_in_the_sdk(
    daemon: Daemon, worker: FakeWorker, plan: dict[str, Any], prefix: str, include_usage: bool
) -> None:
    fresh(worker)
    doc = plan["doc"]
    reply = json_reply(doc)
    worker.reply(reply, reply)
    ask: dict[str, Any] = {"model": plan["model"], "messages": [{"role": "user", "content": "hi"}], "n": plan["n"]}
    if include_usage:
        ask["stream_options"] = {"include_usage": True}
    with oai(daemon.url + prefix).chat.completions.stream(**ask) as stream:
        final = chat_final(stream)
    assert chat_view(final) == chat_view(doc)
    expected_cost = openai_cost(plan["model"], plan["usage"])
    if include_usage and plan["usage"] is not None:
        usage = dict(final["usage"])
        check_cost(usage, expected_cost)
        usage.pop("cost", None)
        assert usage == plan["usage"]
    else:
        assert final.get("usage") is None
    _, events = read_raw(daemon, prefix + "/v1/chat/completions", {**ask, "stream": True})
    chunks = raw_openai(events)
    assert {(c["id"], c["created"], c["model"], c["object"]) for c in chunks} == {
        (doc["id"], doc["created"], doc["model"], "chat.completion.chunk")}
    usage_chunks = [c for c in chunks if c.get("usage")]
    if include_usage and plan["usage"] is not None:
        assert len(usage_chunks) == 1 and usage_chunks[0]["choices"] == [] and chunks[-1] is usage_chunks[0]
    else:
        assert usage_chunks == []
    for index in range(plan["n"]):
        mine = [c for chunk_ in chunks for c in chunk_["choices"] if c["index"] == index]
        assert mine[0]["delta"].get("role") == "assistant"
        finishes = [c["finish_reason"] for c in mine if c.get("finish_reason")]
        assert finishes == [doc["choices"][index]["finish_reason"]]
        assert mine[-1].get("finish_reason")  # the finish chunk is the choice's last


@PROFILE
@given(plan=completion_plans(), prefix=st.sampled_from(["", "/never"]), include_usage=st.booleans())
def test_completions_json_to_sse_rebuilds_the_document(
    daemon: Daemon, worker: FakeWorker, plan: dict[str, Any], prefix: str, include_usage: bool
) -> None:
    fresh(worker)
    doc = plan["doc"]
    reply = json_reply(doc)
    worker.reply(reply, reply)
    ask: dict[str, Any] = {"model": plan["model"], "prompt": "hi", "n": plan["n"]}
    if include_usage:
        ask["stream_options"] = {"include_usage": True}
    chunks = [c.to_dict() for c in oai(daemon.url + prefix).completions.create(**ask, stream=True)]
    merged = merge_completion_chunks(chunks)
    assert completion_view(merged) == completion_view(doc)
    if include_usage and plan["usage"] is not None:
        usage = dict(merged["usage"])
        check_cost(usage, openai_cost(plan["model"], plan["usage"]))
        usage.pop("cost", None)
        assert usage == plan["usage"]
    else:
        assert merged.get("usage") is None
    _, events = read_raw(daemon, prefix + "/v1/completions", {**ask, "stream": True})
    raw_chunks = raw_openai(events)
    assert {(c["id"], c["created"], c["model"], c["object"]) for c in raw_chunks} == {
        (doc["id"], doc["created"], doc["model"], "text_completion")}
    assert completion_view(merge_completion_chunks(raw_chunks)) == completion_view(doc)


@PROFILE
@given(plan=anthropic_plans(), prefix=st.sampled_from(["", "/never"]))
def test_anthropic_json_to_sse_rebuilds_the_message_in_the_sdk(
    daemon: Daemon, worker: FakeWorker, plan: dict[str, Any], prefix: str
) -> None:
    fresh(worker)
    doc = plan["doc"]
    reply = json_reply(doc)
    worker.reply(reply, reply)
    ask = {"model": plan["model"], "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    kinds = []
    with claude(daemon.url + prefix).messages.stream(**ask) as stream:
        for event in stream:
            if event.type in ("message_start", "content_block_start", "content_block_delta",
                              "content_block_stop", "message_delta", "message_stop", "ping"):
                kinds.append((event.type, getattr(event, "index", None)))
        final = stream.get_final_message().to_dict()
    assert anthropic_view(strip_parsed(final)) == anthropic_view(doc)
    check_anthropic_order(kinds, len(doc["content"]))
    _, events = read_raw(daemon, prefix + "/v1/messages", {**ask, "stream": True})
    objs = raw_typed(events)
    check_anthropic_order([(o["type"], o.get("index")) for o in objs], len(doc["content"]))
    (delta,) = [o for o in objs if o["type"] == "message_delta"]
    assert delta["delta"]["stop_reason"] == doc["stop_reason"]
    check_cost(delta["usage"], anthropic_cost(plan["model"], plan["usage"]))
    assert objs[0]["message"]["id"] == doc["id"] and objs[0]["message"]["model"] == doc["model"]


@PROFILE
@given(plan=responses_plans(), prefix=st.sampled_from(["", "/never"]))
def test_responses_json_to_sse_rebuilds_the_response_in_the_sdk(
    daemon: Daemon, worker: FakeWorker, plan: dict[str, Any], prefix: str
) -> None:
    fresh(worker)
    doc = plan["doc"]
    reply = json_reply(doc)
    worker.reply(reply, reply)
    with oai(daemon.url + prefix).responses.stream(model=plan["model"], input="hi") as stream:
        final, events = responses_final(stream)
    expected_cost = responses_cost(plan["model"], plan["usage"])
    usage = dict(final["usage"])
    check_cost(usage, expected_cost)
    usage.pop("cost", None)
    assert {**final, "usage": usage} == doc
    check_sequence_numbers(events, False, 0)
    # what the deltas rebuild, as the SDK's delta events carry it (`snapshot`), is the document
    rebuilt: dict[tuple[int, int], str] = {}
    for e in events:
        if e.type == "response.output_text.delta":
            rebuilt[(e.output_index, e.content_index)] = e.snapshot
        elif e.type == "response.function_call_arguments.delta":
            rebuilt[(e.output_index, -1)] = e.snapshot
    for index, item in enumerate(doc["output"]):
        for ci, part in enumerate(item.get("content") or []):
            if part["type"] == "output_text" and part["text"]:
                assert rebuilt.pop((index, ci)) == part["text"]
        if item["type"] == "function_call" and item["arguments"]:
            assert rebuilt.pop((index, -1)) == item["arguments"]
    assert not rebuilt
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    done = [strip_parsed(e.item.to_dict()) for e in events if e.type == "response.output_item.done"]
    assert added == list(range(len(doc["output"]))) and done == doc["output"]
    _, raw_events = read_raw(daemon, prefix + "/v1/responses", {"model": plan["model"], "input": "hi",
                                                               "stream": True})
    objs = raw_typed(raw_events)
    check_sequence_numbers(objs, False, 0)
    assert objs[0]["type"] == "response.created" and objs[-1]["type"] == plan["terminal"]
    assert objs[0]["response"]["id"] == doc["id"] and objs[0]["response"]["created_at"] == doc["created_at"]


# =============================================================================================
# A stream cut short is never a success, whatever reads it
# =============================================================================================

PLANS = {"openai-chat": chat_plans(), "openai-completions": completion_plans(),
         "anthropic-messages": anthropic_plans(), "openai-responses": responses_plans()}
CODES = {"upstream_disconnected", "upstream_protocol_error", "upstream_incomplete", "upstream_timeout"}


def ask_for(dialect: str, model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": stream}
    if dialect == "openai-chat":
        body["messages"] = [{"role": "user", "content": "hi"}]
    elif dialect == "openai-completions":
        body["prompt"] = "hi"
    elif dialect == "anthropic-messages":
        body.update(max_tokens=64, messages=[{"role": "user", "content": "hi"}])
    else:
        body["input"] = "hi"
    return body


@PROFILE
@given(dialect=st.sampled_from(list(PLANS)), data=st.data())
def test_a_stream_cut_anywhere_is_never_a_success(
    daemon: Daemon, worker: FakeWorker, dialect: str, data: st.DataObject
) -> None:
    """The worker dies anywhere before its stream's last byte: the streaming client gets the
    dialect's error frame last (every event before it whole and JSON, no `[DONE]`, no
    `message_stop`, no `response.completed`), the aggregating one a 502 with the dialect's
    error object and no cost."""
    fresh(worker)
    plan = data.draw(PLANS[dialect])
    n = plan.get("n", 1)
    body = plan["body"]
    # before the stream's last line end: a CR alone already ends a line (WHATWG), so a
    # stream cut between the CR and LF of its last CRLF is whole, not cut short
    whole_at = len(body) - 1 if body.endswith(b"\r\n") else len(body)
    cut = data.draw(st.integers(0, whole_at - 1), label="cut")
    head = response_head(200, [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")])
    steps: list[Step] = [Send(head), *([Send(chunk(body[:cut]))] if cut else []), Reset()]
    worker.reply(steps, steps)
    tail = TAILS[dialect]
    ask = ask_for(dialect, plan["model"], True)
    if n > 1:
        ask["n"] = n
    _, events = read_raw(daemon, f"/v1/{tail}", ask)
    if dialect.startswith("openai-c"):
        datas = [e.data for e in events]
        assert "[DONE]" not in datas
        chunks = [json.loads(d) for d in datas]
        last = chunks[-1]
        assert last["error"]["code"] in CODES and last["error"]["type"] == "upstream_error"
        assert last["choices"][0]["finish_reason"] == "error"
        assert all("error" not in c for c in chunks[:-1])
    else:
        objs = raw_typed(events)
        kinds = [o["type"] for o in objs]
        if dialect == "anthropic-messages":
            assert kinds[-1] == "error" and objs[-1]["error"]["code"] in CODES
            assert "message_stop" not in kinds and "error" not in kinds[:-1]
        else:
            assert kinds[-1] == "response.failed" and objs[-1]["response"]["status"] == "failed"
            assert objs[-1]["response"]["error"]["code"] in CODES
            assert not {"response.completed", "response.incomplete"} & set(kinds)
            check_sequence_numbers(objs, False, 0)  # the worker's own, then sidecar's next
    response = httpx.post(f"{daemon.url}/always/v1/{tail}", json={**ask, "stream": False}, timeout=10)
    assert response.status_code == 502, response.text
    assert "x-sidecar-cost" not in response.headers
    error = response.json()
    if dialect == "anthropic-messages":
        assert error["type"] == "error" and error["error"]["type"] == "api_error"
        assert error["error"]["code"] in CODES
    else:
        assert error["error"]["code"] in CODES


@PROFILE
@given(data=st.data(), dialect=st.sampled_from(["anthropic-messages", "openai-responses"]))
def test_typed_events_without_names_reach_the_sdk_named(
    daemon: Daemon, worker: FakeWorker, data: st.DataObject, dialect: str
) -> None:
    """A worker that writes its typed events with no `event:` line (the type in the data
    only): the SDKs, which go by the name, get every event named as its type, and rebuild
    the worker's message or response from them; an aggregating client gets it too."""
    fresh(worker)
    anthropic_side = dialect == "anthropic-messages"
    plan = data.draw(anthropic_plans(named=False) if anthropic_side else responses_plans(named=False))
    assert b"event:" not in plan["body"]
    steps = sse_steps(plan["pieces"])
    worker.reply(steps, steps, steps)
    doc = plan["doc"]
    _, events = read_raw(daemon, f"/v1/{TAILS[dialect]}", ask_for(dialect, plan["model"], True))
    raw_typed(events)
    if anthropic_side:
        ask = ask_for(dialect, plan["model"], False)
        del ask["stream"]
        with claude(daemon.url).messages.stream(**ask) as stream:
            final = anthropic_view(strip_parsed(stream.get_final_message().to_dict()))
        # (a streamed message_start is the worker's: with no type and role if it sent none)
        assert {**final, "type": "message", "role": "assistant"} == anthropic_view(doc)
        got = claude(daemon.url + "/always").messages.create(**ask).to_dict()
        assert anthropic_view(got) == anthropic_view(doc)
    else:
        with oai(daemon.url).responses.stream(model=plan["model"], input="hi") as stream:
            final, _ = responses_final(stream)
        assert final["output"] == doc["output"] and final["status"] == doc["status"]
        got = oai(daemon.url + "/always").responses.create(model=plan["model"], input="hi").to_dict()
        assert got["output"] == doc["output"] and got["status"] == doc["status"]
