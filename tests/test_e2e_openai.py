"""End-to-end tests of the OpenAI dialects (issue 3) through the real daemon.

Clients are the real `openai` SDK, `httpx` + `httpx-sse`, and raw sockets for
byte-level checks; the worker is `tests.harness.FakeWorker` speaking the
stream flavours of vLLM, SGLang, llama.cpp, Ollama and TGI. Failure paths
(error frames, retries) are in test_failures.py.
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Callable
from typing import Any

import httpx
import httpx_sse
import openai
import pytest

from tests.harness import (
    DEFAULT_ROUTES,
    DONE,
    FLAVORS,
    LAST_CHUNK,
    MODEL,
    Daemon,
    Drip,
    FakeWorker,
    RawClient,
    Send,
    Sleep,
    Stall,
    chat_body,
    chat_completion,
    chat_route,
    chat_stream_events,
    http_response,
    json_reply,
    openai_handler,
    post,
    request_bytes,
    response_head,
    sse_data,
    sse_reply,
    text_completion,
    text_completion_events,
)
from tests.harness import chunk as frame_chunk

COST = 17e-6  # 11 prompt x 1.0 + 3 completion x 2.0, per million
WEATHER = {"id": "call_w1", "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}
CLOCK = {"id": "call_c2", "name": "get_time", "arguments": '{"tz": "Europe/Paris"}'}
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
         for n in ("get_weather", "get_time")]
MESSAGES = [{"role": "user", "content": "hi"}]

ROUTES = [
    DEFAULT_ROUTES[0],
    DEFAULT_ROUTES[1],
    chat_route("always", match={"path": "/always/v1/chat/completions"}, upstream_stream="always"),
    chat_route("never", match={"path": "/never/v1/chat/completions"}, upstream_stream="never"),
    chat_route("beat", match={"path": "/beat/v1/chat/completions"}, heartbeat="150ms",
               upstream={"idle_timeout": "3s"}),
    {"name": "beat-raw", "match": {"path_prefix": "/beat/v1/"}, "dialect": "passthrough",
     "heartbeat": "150ms", "upstream": {"idle_timeout": "3s"}},
    {"name": "completions-always", "match": {"path": "/always/v1/completions"},
     "dialect": "openai-completions", "upstream_stream": "always"},
    DEFAULT_ROUTES[2],
]


@pytest.fixture(scope="module")
def proxy(module_worker: FakeWorker, make_module_daemon: Callable[..., Daemon]) -> Daemon:
    return make_module_daemon(worker=module_worker, routes=ROUTES)



def sdk(proxy: Daemon, prefix: str = "") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}{prefix}/v1", api_key="sk-test", max_retries=0,
                         timeout=10)


def content_of(chunks: list[Any], index: int = 0) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks
                   if c.choices and c.choices[0].index == index)


def finish_of(chunks: list[Any]) -> list[str]:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


# ============================================================================ JSON -> SSE


@pytest.mark.parametrize("prefix", ["", "/never"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_json_worker_streamed_to_an_sdk_client(
    w: FakeWorker, proxy: Daemon, prefix: str, include_usage: bool
) -> None:
    w.reply(openai_handler(mode="json"))
    kwargs: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = sdk(proxy, prefix).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                                        **kwargs)
    chunks = list(stream)
    assert content_of(chunks) == "Hello!"
    assert finish_of(chunks) == ["stop"]
    assert {c.id for c in chunks} == {"chatcmpl-doc123"}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert {c.model for c in chunks} == {MODEL} and {c.created for c in chunks} == {1_700_000_000}
    assert chunks[0].choices[0].delta.role == "assistant"
    usage_chunks = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usage_chunks) == 1 and usage_chunks[0].choices == []
        usage = usage_chunks[0].usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (11, 3)
        assert usage.model_extra["cost"] == pytest.approx(COST)
    else:
        assert usage_chunks == []
    rid = stream.response.headers["x-request-id"]
    record = proxy.ledger_for(rid)
    assert record["client_stream"] is True and record["upstream_stream"] is False
    assert record["outcome"] == "ok" and record["prompt_tokens"] == 11
    assert record["cost"] == pytest.approx(COST)


def test_json_to_sse_raw_bytes(w: FakeWorker, proxy: Daemon) -> None:
    w.reply(json_reply(chat_completion(extra={"system_fingerprint": "fp_x"})))
    response = post(proxy, chat_body(stream=True, include_usage=True))
    assert response.status == 200
    assert response.header("content-type").startswith("text/event-stream")
    assert response.header("x-sidecar-cost") is None  # the cost is in the usage chunk
    assert response.body.endswith(DONE)
    assert b"\xef\xbb\xbf" not in response.body
    payloads = response.sse_json()
    assert payloads[-1] == "[DONE]"
    for chunk in payloads[:-1]:
        assert chunk["system_fingerprint"] == "fp_x"
    assert payloads[-2]["usage"]["cost"] == pytest.approx(COST)


def test_json_to_sse_two_choices_with_tool_calls(w: FakeWorker, proxy: Daemon) -> None:
    w.reply(json_reply(chat_completion(None, n=2, tool_calls=[WEATHER, CLOCK])))
    chunks = list(sdk(proxy, "/never").chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, n=2, tools=TOOLS))
    for index in (0, 1):
        calls: dict[int, dict[str, str]] = {}
        for c in chunks:
            if c.choices and c.choices[0].index == index and c.choices[0].delta.tool_calls:
                for call in c.choices[0].delta.tool_calls:
                    entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                    entry["id"] += call.id or ""
                    entry["name"] += call.function.name or ""
                    entry["arguments"] += call.function.arguments or ""
        assert calls == {0: {k: WEATHER[k] for k in ("id", "name", "arguments")},
                         1: {k: CLOCK[k] for k in ("id", "name", "arguments")}}
    assert sorted(finish_of(chunks)) == ["tool_calls", "tool_calls"]


def test_completions_json_worker_streamed(w: FakeWorker, proxy: Daemon) -> None:
    w.reply(json_reply(text_completion("Hello there")))
    chunks = list(sdk(proxy).completions.create(model=MODEL, prompt="x", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello there"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] \
        == ["stop"]


# ============================================================================ SSE -> JSON


@pytest.mark.parametrize("flavor", FLAVORS)
def test_streaming_worker_aggregated_for_a_non_streaming_sdk_client(
    w: FakeWorker, proxy: Daemon, flavor: str
) -> None:
    w.reply(openai_handler(flavor, mode="sse", tool_calls=[WEATHER, CLOCK], reasoning=["Let me ", "see"]))
    raw = sdk(proxy, "/always").chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, n=2, tools=TOOLS)
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    assert [c.index for c in completion.choices] == [0, 1]
    for choice in completion.choices:
        i = choice.index
        assert choice.message.role == "assistant"
        assert choice.message.content == f"Hel{i}lo{i}!{i}"
        assert choice.message.model_extra["reasoning_content"] == "Let me see"
        assert [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
            (WEATHER["id"], WEATHER["name"], WEATHER["arguments"]),
            (CLOCK["id"], CLOCK["name"], CLOCK["arguments"]),
        ]
        assert choice.finish_reason == "tool_calls"
    assert completion.usage.prompt_tokens == 11 and completion.usage.completion_tokens == 3
    assert completion.usage.model_extra["cost"] == pytest.approx(COST)
    assert raw.headers["x-sidecar-cost"] == "0.000017"
    assert raw.headers["content-type"] == "application/json"
    (request,) = w.wait_requests(1)
    assert request.json()["stream"] is True
    record = proxy.ledger_for(raw.headers["x-request-id"])
    assert record["client_stream"] is False and record["upstream_stream"] is True
    assert record["outcome"] == "ok" and record["completion_tokens"] == 3


def test_aggregated_document_keeps_extra_fields(w: FakeWorker, proxy: Daemon) -> None:
    w.reply(openai_handler("llamacpp", mode="sse"))
    response = post(proxy, chat_body(), target="/always/v1/chat/completions")
    doc = response.json()
    assert doc["system_fingerprint"] == "b4000-abc"
    assert doc["timings"]["predicted_n"] == 3
    assert doc["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}
    assert int(response.header("content-length")) == len(response.body)


def test_completions_aggregated(w: FakeWorker, proxy: Daemon) -> None:
    w.reply(openai_handler(mode="sse"))
    completion = sdk(proxy, "/always").completions.create(model=MODEL, prompt="x")
    assert completion.choices[0].text == "Hello!"
    assert completion.usage.total_tokens == 14


# ============================================================================ byte by byte


def test_worker_writing_one_byte_per_send_streaming(w: FakeWorker, proxy: Daemon) -> None:
    steps = sse_reply(chat_stream_events(flavor="vllm"))
    whole = b"".join(s.data for s in steps)  # type: ignore[attr-defined]
    w.reply([Drip(whole, size=1)])
    chunks = list(sdk(proxy).chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert content_of(chunks) == "Hello!"
    assert finish_of(chunks) == ["stop"]
    assert chunks[-1].usage.prompt_tokens == 11


def test_worker_writing_one_byte_per_send_aggregated_and_json(w: FakeWorker, proxy: Daemon) -> None:
    sse = b"".join(s.data for s in sse_reply(chat_stream_events(flavor="sglang")))  # type: ignore[attr-defined]
    doc = http_response(200, json.dumps(chat_completion("Bytewise")).encode())
    w.reply([Drip(sse, size=1)], [Drip(doc, size=1)])
    completion = sdk(proxy, "/always").chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello!"
    chunks = list(sdk(proxy).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert content_of(chunks) == "Bytewise"


# ============================================================================ upstream_stream


@pytest.mark.parametrize(
    ("prefix", "stream", "include_usage", "asked"),
    [
        ("", True, None, True),
        ("", True, False, True),
        ("", True, True, True),
        ("", False, None, False),
        ("/always", False, None, True),
        ("/always", True, False, True),
        ("/never", True, True, False),
        ("/never", True, None, False),
        ("/never", False, None, False),
    ],
)
def test_upstream_stream_modes(
    w: FakeWorker, proxy: Daemon, prefix: str, stream: bool, include_usage: bool | None, asked: bool
) -> None:
    w.reply(openai_handler())  # honours what it is asked, like a real worker
    body = chat_body(stream=stream, include_usage=include_usage, temperature=0.1)
    response = post(proxy, body, target=f"{prefix}/v1/chat/completions")
    assert response.status == 200
    (request,) = w.wait_requests(1)
    sent = request.json()
    # auto forwards the client's own flag, none when it sent none; never says false outright
    assert sent.get("stream", False if prefix == "" else None) is asked
    if asked:
        assert sent["stream_options"]["include_usage"] is True
    else:
        assert "stream_options" not in sent
    assert sent["temperature"] == 0.1 and sent["messages"] == body["messages"]
    if stream:
        assert response.header("content-type").startswith("text/event-stream")
        payloads = response.sse_json()
        assert payloads[-1] == "[DONE]"
        text = "".join(p["choices"][0]["delta"].get("content") or ""
                       for p in payloads[:-1] if p["choices"])
        assert text == "Hello!"
        has_usage_chunk = any(p["choices"] == [] and p.get("usage") for p in payloads[:-1])
        assert has_usage_chunk is bool(include_usage)
    else:
        doc = response.json()
        assert doc["object"] == "chat.completion"
        assert doc["choices"][0]["message"]["content"] == "Hello!"
        assert doc["usage"]["cost"] == pytest.approx(COST)


# ============================================================================ usage


@pytest.mark.parametrize("flavor", FLAVORS)
def test_usage_hidden_from_clients_that_did_not_ask(w: FakeWorker, proxy: Daemon, flavor: str) -> None:
    w.reply(openai_handler(flavor))
    response = post(proxy, chat_body(stream=True), headers=[("x-request-id", f"hide-{flavor}")])
    payloads = response.sse_json()
    assert payloads[-1] == "[DONE]"
    for chunk in payloads[:-1]:
        assert chunk["choices"], f"usage-only chunk forwarded: {chunk}"
        assert not chunk.get("usage"), f"usage forwarded: {chunk}"
    (request,) = w.wait_requests(1)
    assert request.json()["stream_options"] == {"include_usage": True}
    record = proxy.ledger_for(f"hide-{flavor}")
    assert (record["prompt_tokens"], record["completion_tokens"]) == (11, 3)
    assert record["cost"] == pytest.approx(COST) and record["usage_estimated"] is False


@pytest.mark.parametrize("flavor", FLAVORS)
def test_usage_and_cost_shown_to_clients_that_asked(w: FakeWorker, proxy: Daemon, flavor: str) -> None:
    w.reply(openai_handler(flavor))
    chunks = list(sdk(proxy).chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert content_of(chunks) == "Hello!"
    with_usage = [c for c in chunks if c.usage is not None]
    assert with_usage, "no usage reached the client"
    last = with_usage[-1]
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (11, 3)
    assert last.usage.model_extra["cost"] == pytest.approx(COST)


def test_continuous_usage_stats_hidden_unless_asked(w: FakeWorker, proxy: Daemon) -> None:
    events = chat_stream_events(usage_on_every_chunk=True)
    w.reply(sse_reply(events), sse_reply(events))
    hidden = post(proxy, chat_body(stream=True)).sse_json()
    assert not any(p.get("usage") for p in hidden[:-1])
    shown = post(proxy, chat_body(stream=True, include_usage=True)).sse_json()
    assert all(p.get("usage") for p in shown[:-1])


def test_no_usage_from_the_worker_is_estimated(w: FakeWorker, proxy: Daemon) -> None:
    w.reply(sse_reply(chat_stream_events(usage=None)))
    response = post(proxy, chat_body(stream=True), headers=[("x-request-id", "estimated-1")])
    assert response.sse_json()[-1] == "[DONE]"
    record = proxy.ledger_for("estimated-1")
    assert record["usage_estimated"] is True
    assert record["completion_tokens"] == 3
    # aggregated for a non-streaming client: the estimate stays the ledger's (no usage was
    # reported to carry a cost, so no x-sidecar-cost either), priced there all the same
    w.reply(sse_reply(chat_stream_events(usage=None)))
    response = post(proxy, chat_body(), "/always/v1/chat/completions",
                    headers=[("x-request-id", "estimated-2")])
    assert response.status == 200 and "usage" not in response.json()
    assert response.header("x-sidecar-cost") is None
    record = proxy.ledger_for("estimated-2")
    assert record["usage_estimated"] is True and record["cost"] == pytest.approx(6e-6)


def test_a_usage_that_comes_after_an_estimate_is_the_usage(w: FakeWorker, proxy: Daemon) -> None:
    """A finish chunk whose usage counts nothing (`{}`: priced from an estimate then), then
    the worker's usage chunk: the client, the header and the ledger all get the worker's
    counts (2 completion tokens for its 5 deltas), never the estimate's larger count."""
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
    events = [sse_data({**base, "choices": [{"index": 0, "delta": {"content": c},
                                             "finish_reason": None}]}) for c in "abcde"]
    events += [
        sse_data({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                  "usage": {}}),
        sse_data({**base, "choices": [], "usage": USAGE_2}),
        DONE,
    ]
    w.reply(sse_reply(events), sse_reply(events))
    relayed = post(proxy, chat_body(stream=True, include_usage=True),
                   headers=[("x-request-id", "after-estimate-1")])
    usage = relayed.sse_json()[-2]["usage"]
    aggregated = post(proxy, chat_body(), headers=[("x-request-id", "after-estimate-2")])
    assert aggregated.header("x-sidecar-cost") == "0.000015"  # 11 x 1 + 2 x 2 per million
    for shown in (usage, aggregated.json()["usage"]):
        assert shown == {**USAGE_2, "cost": pytest.approx(15e-6)}
    for rid in ("after-estimate-1", "after-estimate-2"):
        record = proxy.ledger_for(rid)
        assert (record["completion_tokens"], record["usage_estimated"]) == (2, False)
        assert record["cost"] == pytest.approx(15e-6)


USAGE_2 = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}


@pytest.mark.parametrize("model", [MODEL, "no-price"])
def test_x_sidecar_cost_is_only_ever_this_sidecars(w: FakeWorker, proxy: Daemon, model: str) -> None:
    """A worker that sends an `x-sidecar-cost` of its own (another sidecar in front of it):
    the client gets one header, the cost this sidecar worked out, or none (a stream, a model
    with no price), never the worker's."""
    own = [("x-sidecar-cost", "123.45")]
    w.reply(json_reply(chat_completion(model=model), headers=own),
            json_reply(chat_completion(model=model), headers=own),
            sse_reply(chat_stream_events(model=model), headers=own))
    document = post(proxy, chat_body(model=model))
    synthesized = post(proxy, chat_body(stream=True, model=model))
    relayed = post(proxy, chat_body(stream=True, model=model))
    assert [v for k, v in document.headers if k == "x-sidecar-cost"] == (
        ["0.000017"] if model == MODEL else [])
    for response in (synthesized, relayed):
        assert response.status == 200 and response.header("x-sidecar-cost") is None


@pytest.mark.parametrize("usage", [{}, {"prompt_tokens": None, "completion_tokens": None}])
def test_a_usage_object_without_counts_is_estimated_for_the_ledger_alone(
    w: FakeWorker, proxy: Daemon, usage: dict[str, Any]
) -> None:
    """A worker whose usage object counts nothing (`{}`, nulls) reported no usage: the
    estimate prices the ledger line, and the client's body carries neither counts nor a cost
    made from it (as when the worker sends no usage object), nor an `x-sidecar-cost`."""
    w.reply(sse_reply(chat_stream_events(usage=usage)), sse_reply(chat_stream_events(usage=usage)))
    relayed = post(proxy, chat_body(stream=True, include_usage=True),
                   headers=[("x-request-id", f"countless-relay-{len(usage)}")])
    (usage_chunk,) = [p for p in relayed.sse_json()[:-1] if p.get("usage") is not None]
    assert usage_chunk["usage"] == usage
    aggregated = post(proxy, chat_body(), "/always/v1/chat/completions",
                      headers=[("x-request-id", f"countless-agg-{len(usage)}")])
    assert aggregated.status == 200 and aggregated.header("x-sidecar-cost") is None
    assert aggregated.json()["usage"] == usage
    for rid in (f"countless-relay-{len(usage)}", f"countless-agg-{len(usage)}"):
        record = proxy.ledger_for(rid)
        assert record["usage_estimated"] is True and record["completion_tokens"] == 3
        assert record["cost"] == pytest.approx(6e-6)


def test_invalid_utf8_from_the_worker_reaches_clients_mended(w: FakeWorker, proxy: Daemon) -> None:
    """A worker that cuts a character's UTF-8 bytes across two events: clients get U+FFFD
    for them (as an event-stream decoder reads them), never invalid UTF-8, which the SDK
    raises on, whether the stream is relayed or aggregated."""
    def event(content: bytes, finish: str | None = None) -> bytes:
        choice = b'{"index":0,"delta":{"content":"' + content + b'"},"finish_reason":' + (
            b"null" if finish is None else b'"' + finish.encode() + b'"') + b"}"
        return (b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"'
                + MODEL.encode() + b'","choices":[' + choice + b"]}\n\n")
    events = [event(b"ok "), event(b"bad \xf0\x9f"), event(b"\x98\x80 end"), event(b"", "stop"), DONE]
    w.reply(sse_reply(events), sse_reply(events))
    text = "".join(
        c.choices[0].delta.content or ""
        for c in sdk(proxy).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        if c.choices
    )
    assert text == "ok bad \ufffd\ufffd\ufffd end"
    aggregated = post(proxy, chat_body(), "/always/v1/chat/completions")
    assert aggregated.json()["choices"][0]["message"]["content"] == "ok bad \ufffd\ufffd\ufffd end"


# ============================================================================ heartbeats


def test_heartbeat_comments_while_the_worker_is_silent(w: FakeWorker, proxy: Daemon) -> None:
    events = chat_stream_events()
    w.reply([*sse_reply(events[:2], end=False), Sleep(0.8), *sse_reply(events[2:])[1:]])
    with RawClient(proxy.address) as client:
        client.send(request_bytes("POST", "/beat/v1/chat/completions", chat_body(stream=True)))
        response = client.read_response()
    body = response.body
    beats = body.count(b": keep-alive\n\n")
    assert beats >= 2, body
    assert body.endswith(DONE)
    first, _, _ = body.partition(b": keep-alive\n\n")
    assert b'"content":"Hel"' in first and b'"content":"lo"' not in first
    assert b"data: \n" not in body and b"data:\n" not in body  # never an empty data event
    text = "".join(p["choices"][0]["delta"].get("content") or ""
                   for p in response.sse_json()[:-1] if p["choices"])
    assert text == "Hello!"


@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_passthrough_event_stream_gets_heartbeats_between_events_only(
    w: FakeWorker, proxy: Daemon, framing: str
) -> None:
    # silent after a whole event: comments go there; silent inside an event (its blank line
    # not yet sent): none, it would become part of the event; a length-framed body: none
    pieces = [b"data: one\n\n", b"event: x\r\ndata: two\r\n", b"\r\n", b"data: three\n\n"]
    whole = b"".join(pieces)
    framing_header = (("transfer-encoding", "chunked") if framing == "chunked"
                      else ("content-length", str(len(whole))))
    wrap = frame_chunk if framing == "chunked" else bytes
    w.reply([Send(response_head(200, [("content-type", "text/event-stream"), framing_header])),
             Send(wrap(pieces[0])), Sleep(0.6), Send(wrap(pieces[1])), Sleep(0.6),
             Send(wrap(pieces[2])), Send(wrap(pieces[3])),
             *([Send(LAST_CHUNK)] if framing == "chunked" else [])])
    with RawClient(proxy.address) as client:
        client.send(request_bytes("POST", "/beat/v1/stream", chat_body(stream=True)))
        body = client.read_response().body
    beat = b": keep-alive\n\n"
    assert body.replace(beat, b"") == whole
    if framing == "length":
        assert beat not in body
        return
    first, _, rest = body.partition(pieces[1])
    assert first.startswith(pieces[0] + beat) and first.count(beat) >= 2, body
    assert beat not in rest, body


def test_heartbeats_are_harmless_to_sdk_and_httpx_sse(w: FakeWorker, proxy: Daemon) -> None:
    events = chat_stream_events()
    w.reply([*sse_reply(events[:1], end=False), Sleep(0.4), *sse_reply(events[1:])[1:]],
            [*sse_reply(events[:1], end=False), Sleep(0.4), *sse_reply(events[1:])[1:]])
    chunks = list(sdk(proxy, "/beat").chat.completions.create(model=MODEL, messages=MESSAGES,
                                                              stream=True))
    assert content_of(chunks) == "Hello!"
    with httpx.Client(timeout=10) as client, httpx_sse.connect_sse(
        client, "POST", proxy.url + "/beat/v1/chat/completions", json=chat_body(stream=True)
    ) as source:
        data = [event.data for event in source.iter_sse()]
    assert data[-1] == "[DONE]"
    assert all(d for d in data), "an event with empty data reached the client"


def with_ids(events: list[bytes]) -> list[bytes]:
    """The events with an `id:` line each (as some workers and gateways write them)."""
    return [b"id: %d\n%s" % (i, e) for i, e in enumerate(events)]


@pytest.mark.parametrize("route", ["relay", "passthrough"])
def test_heartbeats_after_an_event_with_an_id_are_harmless_to_the_sdk(
    w: FakeWorker, proxy: Daemon, route: str
) -> None:
    """After an `id:` line, the openai SDK and httpx-sse keep a last event ID and then
    dispatch every blank line as an event: `: keep-alive` + a blank line would be an event
    with empty data, which the SDK fails to parse. There the heartbeat is the comment line
    alone, still between two events."""
    if route == "relay":
        events = with_ids(chat_stream_events())
    else:  # no completions route under /beat/: its passthrough route takes it
        events = with_ids(text_completion_events(("Hel", "lo", "!")))
    script = [*sse_reply(events[:1], end=False), Sleep(0.4), *sse_reply(events[1:])[1:]]
    w.reply(script, script)
    client = sdk(proxy, "/beat")
    if route == "relay":
        text = content_of(list(client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                              stream=True)))
        path = "/beat/v1/chat/completions"
    else:
        text = "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt="hi", stream=True) if c.choices)
        path = "/beat/v1/completions"
    assert text == "Hello!"
    with RawClient(proxy.address) as raw:
        raw.send(request_bytes("POST", path, chat_body(stream=True)))
        body = raw.read_response().body
    assert b": keep-alive\n" in body and b": keep-alive\n\n" not in body, body
    assert body.replace(b": keep-alive\n", b"").startswith(events[0]), body


def _crlf(events: list[bytes]) -> list[bytes]:
    return [e.replace(b"\n", b"\r\n") for e in events]


def _cut_after_each_cr(body: bytes) -> list[bytes]:
    """The body in reads that each end with a block's last CR: every CRLF that ends a block
    is split, its LF the start of the next read."""
    cuts = [0]
    at = body.find(b"\r\n\r\n")
    while at >= 0:
        cuts.append(at + 3)
        at = body.find(b"\r\n\r\n", at + 4)
    cuts.append(len(body))
    return [body[a:b] for a, b in itertools.pairwise(cuts) if b > a]


def _sdk_httpx_sse_and_raw(proxy: Daemon) -> tuple[list[httpx_sse.ServerSentEvent], bytes]:
    """One chat stream (the worker's next three answers) read by the openai SDK (which parses
    every event it dispatches: the content and the cost arrive), by httpx-sse (no event with
    empty data, `[DONE]` last: its events returned) and raw (the body's bytes returned)."""
    stream = sdk(proxy).chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert content_of(chunks) == "Hello!"
    assert chunks[-1].usage is not None and chunks[-1].usage.cost == pytest.approx(COST)
    response = httpx.post(f"{proxy.url}/v1/chat/completions", json=chat_body(stream=True), timeout=10)
    dispatched = list(httpx_sse.EventSource(response).iter_sse())
    assert [e for e in dispatched if not e.data] == [], dispatched
    assert dispatched[-1].data == "[DONE]", dispatched
    with RawClient(proxy.address) as raw:
        raw.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=True)))
        return dispatched, raw.read_response().body


@pytest.mark.parametrize(
    "case", ["stray-blank-lines", "split-crlf", "split-crlf-only-usage-re-encoded", "worker-keep-alives"]
)
def test_no_blank_line_of_the_worker_becomes_an_empty_event_after_an_id(
    w: FakeWorker, proxy: Daemon, case: str
) -> None:
    """Once an event set a last event ID, the openai SDK and httpx-sse dispatch an event on
    every blank line, and one with empty data fails the SDK. A worker's stray blank line
    between events, and the LF of a CRLF split across reads when the CR before it went out
    re-encoded (the usage chunk, cost injected; each event, on a typed dialect), reached
    the client as such a blank line (hypothesis found it: test_sdk_accumulators). Now the
    client gets neither; an LF after a CR the client got still goes, byte-exact. The
    worker's own keep-alive comments after an id go without their blank line, as sidecar's
    heartbeat does."""
    events = with_ids(chat_stream_events())
    if case == "stray-blank-lines":
        body = b"\n".join(events) + b"\n\r\n"
    elif case == "worker-keep-alives":
        body = b"".join(e + b": ping\n\n" for e in events)
    else:
        body = b"".join(_crlf(events))
    pieces = [body] if case in ("stray-blank-lines", "worker-keep-alives") else _cut_after_each_cr(body)
    if case == "split-crlf-only-usage-re-encoded":  # only the usage chunk's CRLF is cut
        at = body.index(b'"usage"')
        at = body.index(b"\r\n\r\n", at) + 3
        pieces = [body[:at], body[at:]]
    assert b"".join(pieces) == body
    script = [Send(response_head(200, [("content-type", "text/event-stream"),
                                       ("transfer-encoding", "chunked")])),
              *(Send(frame_chunk(p)) for p in pieces), Send(LAST_CHUNK)]
    w.reply(script, script, script)
    _, sent = _sdk_httpx_sse_and_raw(proxy)
    if case == "worker-keep-alives":
        assert sent.count(b": ping\n") == len(events) and b": ping\n\n" not in sent, sent
    elif case != "stray-blank-lines":  # the events passed on as they came: CRLF, whole
        assert sent.startswith(b"".join(_crlf(events[:2]))), sent
        assert sent.endswith(b"data: [DONE]\r\n\r\n"), sent


def test_a_worker_block_without_data_reaches_no_client_as_an_event(
    w: FakeWorker, proxy: Daemon
) -> None:
    """A block with no `data` (an `event:` line alone, a `retry:` or an `id:` alone) is no
    event to WHATWG, but the openai SDK and httpx-sse dispatch it with empty data, and the
    SDK fails to parse that. Its `event:` line and its blank line go; its `retry:` and
    `id:` lines reach the client with the next event."""
    events = chat_stream_events()
    data_less = [b"event: progress\n\n", b"retry: 1500\n\n", b"id: 41\r\n\r\n"]
    body = b"".join(e + extra for e, extra in zip(events, itertools.cycle(data_less)))
    w.reply(*[sse_reply([body])] * 3)
    dispatched, sent = _sdk_httpx_sse_and_raw(proxy)
    assert {e.event for e in dispatched} == {"message"}, dispatched
    assert dispatched[-1].id == "41", dispatched
    assert b"event:" not in sent and b"retry: 1500\n" in sent and b"id: 41\r\n" in sent, sent


# ============================================================================ worker variety


def test_missing_id_created_model_are_filled(w: FakeWorker, proxy: Daemon) -> None:
    w.reply(sse_reply(chat_stream_events(id=None, created=None, model=None)))
    stream = sdk(proxy).chat.completions.create(model="asked-model", messages=MESSAGES, stream=True)
    chunks = list(stream)
    rid = stream.response.headers["x-request-id"]
    assert {c.id for c in chunks} == {f"chatcmpl-{rid}"}
    assert {c.model for c in chunks} == {"asked-model"}
    assert all(isinstance(c.created, int) and c.created > 1_600_000_000 for c in chunks)
    assert content_of(chunks) == "Hello!"


def test_extra_fields_are_kept(w: FakeWorker, proxy: Daemon) -> None:
    w.reply(sse_reply(chat_stream_events(flavor="llamacpp")), sse_reply(chat_stream_events(flavor="vllm")))
    payloads = post(proxy, chat_body(stream=True)).sse_json()
    assert all(p["system_fingerprint"] == "b4000-abc" for p in payloads[:-1])
    assert payloads[-2]["timings"]["predicted_n"] == 3
    payloads = post(proxy, chat_body(stream=True)).sse_json()
    finish = [p for p in payloads[:-1] if p["choices"][0]["finish_reason"]]
    assert "stop_reason" in finish[0]["choices"][0]


def test_ping_comments_crlf_and_bom(w: FakeWorker, proxy: Daemon) -> None:
    events = chat_stream_events(eol=b"\r\n")
    body = [b"\xef\xbb\xbf: ping\r\n\r\n", *events[:2], b": ping\r\n\r\n", *events[2:]]
    w.reply(sse_reply(body), sse_reply(body))
    response = post(proxy, chat_body(stream=True))
    assert b"\xef\xbb\xbf" not in response.body
    assert response.body.count(b"data:") == len(events) - 1  # the usage chunk is hidden
    chunks = list(sdk(proxy).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert content_of(chunks) == "Hello!"
    assert finish_of(chunks) == ["stop"]


@pytest.mark.parametrize("split", [0, 1, 2, 3, 5])
def test_passthrough_event_stream_drops_the_workers_bom(w: FakeWorker, proxy: Daemon, split: int) -> None:
    """SPEC: the sidecar never writes a byte-order mark and drops one sent by the worker;
    a passthrough event stream too, however the worker's writes cut it."""
    body = b"\xef\xbb\xbfdata: {\"a\":1}\n\n"
    pieces = [p for p in (body[:split], body[split:]) if p]
    w.reply([Send(response_head(200, [("content-type", "text/event-stream"),
                                      ("transfer-encoding", "chunked")])),
             *(step for p in pieces for step in (Send(frame_chunk(p)), Sleep(0.05))),
             Send(LAST_CHUNK)])
    with RawClient(proxy.address) as client:
        client.send(request_bytes("GET", "/v1/something/stream"))
        response = client.read_response()
    assert response.status == 200 and response.body == body[3:]


def test_bom_before_a_json_document_is_dropped(w: FakeWorker, proxy: Daemon) -> None:
    doc = b"\xef\xbb\xbf" + json.dumps(chat_completion("Hello!")).encode()
    w.reply(*([Send(http_response(200, doc))] for _ in range(3)))
    completion = sdk(proxy).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello!"
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    chunks = list(sdk(proxy).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert content_of(chunks) == "Hello!"
    assert finish_of(chunks) == ["stop"]
    response = post(proxy, chat_body())
    assert response.status == 200 and not response.body.startswith(b"\xef\xbb\xbf")


@pytest.mark.parametrize("kind", ["json", "sse"])
def test_worker_compressing_unasked_never_labels_sidecar_bytes_compressed(
    w: FakeWorker, proxy: Daemon, kind: str
) -> None:
    """Accept-Encoding is not forwarded where sidecar reads the body, so a compressed 2xx
    body is one it cannot read: the client's event stream (sidecar's own bytes, ending in
    the error frame) must not carry the worker's `Content-Encoding`, or no client can read
    the frame (httpx raises DecodingError)."""
    if kind == "json":
        body, ctype = gzip.compress(json.dumps(chat_completion()).encode()), "application/json"
    else:
        body, ctype = gzip.compress(b"".join(chat_stream_events())), "text/event-stream"
    w.reply([Send(http_response(200, body, [("content-type", ctype), ("content-encoding", "gzip")]))])
    with httpx.Client(timeout=10) as client:
        response = client.post(f"{proxy.url}/v1/chat/completions", json=chat_body(stream=True))
    assert response.status_code == 200
    assert "content-encoding" not in response.headers
    frames = [json.loads(line[6:]) for line in response.text.split("\n") if line.startswith("data: ")]
    # (a compressed event stream with no line break in it is one unfinished event)
    assert frames[-1]["error"]["code"] in ("upstream_protocol_error", "upstream_incomplete")
    assert frames[-1]["choices"][0]["finish_reason"] == "error"
    assert proxy.ledger_for(response.headers["x-request-id"])["outcome"] == "upstream_error"


def test_data_without_space_and_empty_id(w: FakeWorker, proxy: Daemon) -> None:
    w.reply(sse_reply(chat_stream_events(flavor="tgi", finish_reason="eos_token")))
    chunks = list(sdk(proxy).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert content_of(chunks) == "Hello!"
    assert finish_of(chunks) == ["eos_token"]
    assert all(c.id for c in chunks)


def test_worker_content_type_missing_first_byte_decides(w: FakeWorker, proxy: Daemon) -> None:
    sse = b"".join(chat_stream_events())
    doc = json.dumps(chat_completion("Sniffed")).encode()
    w.reply(
        [Send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(sse) + sse)],
        [Send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n"
              % (len(doc) + 3) + b" \n\n" + doc)],
    )
    chunks = list(sdk(proxy).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert content_of(chunks) == "Hello!"
    chunks = list(sdk(proxy).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert content_of(chunks) == "Sniffed"


@pytest.mark.parametrize("blank", [b"", b"\n", b"\n" * 6, b"\r\n" * 6, b"\n" * 7])
def test_with_no_content_type_a_bom_and_blanks_in_a_read_of_their_own_are_dropped(
    w: FakeWorker, proxy: Daemon, blank: bytes
) -> None:
    """No Content-Type: the first non-blank byte decides, whatever reads the blank bytes
    before it come in; a BOM that starts them is dropped whole, never cut (a read of only a
    BOM and blanks is held until that byte comes)."""
    sse = b"".join(chat_stream_events())
    doc = json.dumps(chat_completion("Sniffed")).encode()
    lead = b"\xef\xbb\xbf" + blank
    head = response_head(200, [("content-length", str(len(lead) + len(doc)))])
    w.reply([Send(response_head(200, [("transfer-encoding", "chunked")])), Send(frame_chunk(lead)), Sleep(0.05),
             Send(frame_chunk(sse)), Send(LAST_CHUNK)],
            [Send(head + lead), Sleep(0.05), Send(doc)])
    chunks = list(sdk(proxy).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert content_of(chunks) == "Hello!" and finish_of(chunks) == ["stop"]
    completion = sdk(proxy).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content == "Sniffed"


def test_worker_error_event_is_forwarded(w: FakeWorker, proxy: Daemon) -> None:
    err = {"error": {"message": "out of memory", "type": "server_error", "code": 500}}
    w.reply(sse_reply([chat_stream_events()[0], sse_data(err)]))
    stream = sdk(proxy).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError) as info:
        list(stream)
    assert "out of memory" in info.value.message
    rid = stream.response.headers["x-request-id"]
    assert proxy.ledger_for(rid)["outcome"] == "upstream_error"


def test_llamacpp_error_line_then_done_is_no_success(w: FakeWorker, proxy: Daemon) -> None:
    """llama.cpp (2025 builds) writes a failure as an `error:` line, then `data: [DONE]`:
    the SDK raises with the worker's message, the ledger says `upstream_error`, and an
    aggregating client gets a 502 carrying the worker's error."""
    line = b'error: {"code":400,"message":"the prompt is too long","type":"invalid_request_error"}\n\n'
    w.reply(sse_reply([chat_stream_events()[0], line, b"data: [DONE]\n\n"]))
    stream = sdk(proxy).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError) as info:
        list(stream)
    assert "the prompt is too long" in info.value.message
    assert proxy.ledger_for(stream.response.headers["x-request-id"])["outcome"] == "upstream_error"
    w.reply(sse_reply([line, b"data: [DONE]\n\n"]))
    with pytest.raises(openai.InternalServerError) as failed:
        sdk(proxy, "/always").chat.completions.create(model=MODEL, messages=MESSAGES)
    assert failed.value.status_code == 502
    assert failed.value.body["message"] == "the prompt is too long"


def test_many_events_in_one_write_and_one_event_over_many_writes(w: FakeWorker, proxy: Daemon) -> None:
    events = chat_stream_events([f"t{i} " for i in range(200)])
    whole = b"".join(events)
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n"
            % len(whole))
    w.reply([Send(head + whole)], [Send(head), Drip(whole, size=7)])
    expected = "".join(f"t{i} " for i in range(200))
    for _ in range(2):
        chunks = list(sdk(proxy).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
        assert content_of(chunks) == expected


def test_client_head_is_sent_when_the_worker_head_arrives(w: FakeWorker, proxy: Daemon) -> None:
    w.reply([*sse_reply([], end=False), Stall()])
    with RawClient(proxy.address) as client:
        client.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=True)))
        head = client.read_until(b"\r\n\r\n", timeout=2.0)  # the worker has sent no event yet
        assert head.startswith(b"HTTP/1.1 200")
        assert b"text/event-stream" in head
    (request,) = w.requests
    assert w.wait_connection_closed(request, 1.0)


def test_a_worker_document_nested_deeper_than_can_be_written_is_a_clear_error(
    w: FakeWorker, proxy: Daemon
) -> None:
    """orjson reads 1,024 levels and writes 254: a worker's document (cost injected, or made
    into SSE) nested between the two is the worker's protocol error, never a crash."""
    doc = chat_completion("deep")
    doc["choices"][0]["extra"] = json.loads("[" * 300 + "]" * 300)
    w.reply(json_reply(doc))
    with pytest.raises(openai.InternalServerError) as failed:
        sdk(proxy).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert failed.value.status_code == 502
    assert failed.value.body["code"] == "upstream_protocol_error"
    assert "nested too deeply" in failed.value.body["message"]
    w.reply(json_reply(doc))
    stream = sdk(proxy, "/never").chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError) as info:
        list(stream)
    assert "nested too deeply" in info.value.message
    assert proxy.ledger_for(stream.response.headers["x-request-id"])["outcome"] == "upstream_error"
