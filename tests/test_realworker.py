"""sidecar in front of a real worker: llama.cpp's llama-server, built from source, tiny model.

The worker is built by tests/realworker/build.sh (CI runs it first; it caches the binary
outside the repo). Without the binary every test here is skipped, unless
SIDECAR_REQUIRE_REALWORKER=1 (CI sets it), where a missing binary is a failure.

The model has random weights (tests/realworker/make_model.py): its text is gibberish, but
the protocol, framing, usage, queueing and cancellation are the real server's. Requests whose
content is compared use temperature 0, a fixed seed and cache_prompt: false.

Every daemon here runs config/llama-cpp.yaml, the shipped preset, with the worker's address,
ports, ledger path and prices given through the environment; the JSON->SSE and SSE->JSON
variants change only the chat/completions routes' upstream_stream.
"""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from realworker import worker

pytestmark = pytest.mark.realworker

PRICE_PROMPT = Decimal("0.25")
PRICE_COMPLETION = Decimal("2")
CLIENT_MODEL = "some-model-the-client-names"
USER_TEXT = "Write a long story about a motorcycle with a sidecar."
# The daemon's stream modes for the chat and completions routes: the preset's own
# (always: the worker streams, sidecar aggregates for JSON clients), never (the worker
# answers JSON, sidecar synthesizes SSE) and auto (the client's choice is forwarded).
MODES = ("preset", "never", "auto")


# ----------------------------------------------------------------------------------------
# Fixtures: processes
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def realworker_available() -> None:
    reason = worker.missing_reason()
    if reason is not None:
        if os.environ.get("SIDECAR_REQUIRE_REALWORKER") == "1":
            pytest.fail(f"SIDECAR_REQUIRE_REALWORKER=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def tiny_model(realworker_available: None) -> Path:
    """2 layers, 64 wide: several hundred tokens a second."""
    return worker.ensure_model(layers=2, width=64, seed=42)


@pytest.fixture(scope="module")
def slow_model(realworker_available: None) -> Path:
    """8 layers, 512 wide: slow enough to interrupt mid-stream."""
    return worker.ensure_model(layers=8, width=512, seed=42)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("realworker")


@pytest.fixture(scope="module")
def llama(tiny_model: Path, workdir: Path) -> Iterator[worker.LlamaServer]:
    server = worker.LlamaServer(tiny_model, workdir / "llama.log", slots=2, ctx=1024).start()
    yield server
    server.stop()


def write_config(path: Path, mode: str) -> Path:
    """The preset, with the chat and completions routes switched to `mode` (unless "preset")."""
    if mode == "preset":
        return worker.PRESET
    raw = yaml.safe_load(worker.PRESET.read_text())
    for route in raw["routes"]:
        if route["name"] in ("chat", "completions"):
            route["upstream_stream"] = mode
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class Daemon:
    """A running sidecar plus what the tests need around it."""

    def __init__(self, proc: worker.Sidecar, ledger: Path) -> None:
        self.proc = proc
        self.ledger = ledger
        self.url = proc.url
        self.client = openai.OpenAI(
            base_url=proc.url + "/v1", api_key="sk-test-secret", max_retries=0, timeout=60
        )

    def upstream_errors(self) -> float:
        """The daemon's sidecar_upstream_errors_total, summed over codes (admin /metrics)."""
        url = f"http://127.0.0.1:{self.proc.admin_port}/metrics"
        text = httpx.get(url, timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("sidecar_upstream_errors_total")
        )

    def ledger_entry(self, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """The ledger line of `request_id` (it is written when the request ends)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.ledger.exists():
                for line in self.ledger.read_text().splitlines():
                    entry = json.loads(line, parse_float=Decimal)
                    if entry.get("request_id") == request_id:
                        return entry
            if time.monotonic() > deadline:
                raise AssertionError(f"no ledger line for {request_id} in {self.ledger}")
            time.sleep(0.05)


def start_daemon(
    workdir: Path, name: str, upstream: str, mode: str = "preset", env: dict[str, str] | None = None
) -> Daemon:
    config = write_config(workdir / f"sidecar-{name}.yaml", mode)
    ledger = workdir / f"ledger-{name}.jsonl"
    full_env = {
        "SIDECAR_UPSTREAM": upstream,
        "SIDECAR_USAGE_LOG": str(ledger),
        "LLAMA_PRICE_PROMPT": str(PRICE_PROMPT),
        "LLAMA_PRICE_COMPLETION": str(PRICE_COMPLETION),
        **(env or {}),
    }
    proc = worker.Sidecar(config, full_env, workdir / f"sidecar-{name}.log").start()
    return Daemon(proc, ledger)


@pytest.fixture(scope="module")
def daemons(llama: worker.LlamaServer, workdir: Path) -> Iterator[Callable[[str], Daemon]]:
    """A daemon per stream mode in front of the shared tiny-model worker, started on demand."""
    running: dict[str, Daemon] = {}

    def get(mode: str) -> Daemon:
        if mode not in running:
            running[mode] = start_daemon(workdir, mode, llama.url, mode)
        return running[mode]

    yield get
    for daemon in running.values():
        daemon.proc.stop()


@pytest.fixture(scope="module")
def daemon(daemons: Callable[[str], Daemon]) -> Daemon:
    """The daemon on the unchanged preset."""
    return daemons("preset")


@pytest.fixture(scope="module")
def direct(llama: worker.LlamaServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=llama.url + "/v1", api_key="sk-test", max_retries=0, timeout=60)


@pytest.fixture
def slow_pair(
    slow_model: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[worker.LlamaServer, Daemon]]:
    """A fresh slow worker (it may be killed) with its own daemon; parametrize via
    indirect params: {"slots": N, "env": {...}}."""
    params: dict[str, Any] = getattr(request, "param", {}) or {}
    server = worker.LlamaServer(
        slow_model, tmp_path / "llama.log", slots=params.get("slots", 1), ctx=4096
    ).start()
    try:
        daemon = start_daemon(tmp_path, "slow", server.url, env=params.get("env"))
    except BaseException:
        server.stop()
        raise
    yield server, daemon
    daemon.proc.stop()
    server.stop()


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def chat_args(max_tokens: int = 32, text: str = USER_TEXT) -> dict[str, Any]:
    return {
        "model": CLIENT_MODEL,
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        "seed": 42,
        "max_tokens": max_tokens,
        "extra_body": {"cache_prompt": False},
    }


def completion_args(max_tokens: int = 32) -> dict[str, Any]:
    return {
        "model": CLIENT_MODEL,
        "prompt": "Once upon a time, a sidecar",
        "temperature": 0,
        "seed": 42,
        "max_tokens": max_tokens,
        "extra_body": {"cache_prompt": False},
    }


def expected_cost(prompt: int, completion: int) -> Decimal:
    return (prompt * PRICE_PROMPT + completion * PRICE_COMPLETION) / Decimal(1_000_000)


def cost_of(usage: Any) -> Any:
    extra = usage.model_extra or {}
    return extra.get("cost")


def parse_sse(body: bytes) -> list[bytes]:
    """The data fields of an SSE body, one entry per event (comments dropped)."""
    out = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
        if data:
            out.append(b"\n".join(data))
    return out


def check_usage_and_ledger(
    daemon: Daemon, request_id: str, usage: Any, ref_usage: Any, client_stream: bool
) -> None:
    assert usage is not None, "no usage reached the client"
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        ref_usage.prompt_tokens,
        ref_usage.completion_tokens,
    )
    want = expected_cost(ref_usage.prompt_tokens, ref_usage.completion_tokens)
    assert Decimal(str(cost_of(usage))) == want
    entry = daemon.ledger_entry(request_id)
    assert entry["outcome"] == "ok", entry
    assert entry["status"] == 200
    assert entry["model"] == worker.ALIAS
    assert entry["request_model"] == CLIENT_MODEL
    assert entry["client_stream"] is client_stream
    assert entry["prompt_tokens"] == ref_usage.prompt_tokens
    assert entry["completion_tokens"] == ref_usage.completion_tokens
    assert entry["cost"] == want
    assert entry["usage_estimated"] is False


# ----------------------------------------------------------------------------------------
# Same content as a direct call, usage and cost
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_reference(direct: openai.OpenAI) -> Any:
    ref = direct.chat.completions.create(**chat_args())
    # The worker itself is deterministic here (else no comparison below means anything).
    again = direct.chat.completions.create(**chat_args())
    assert ref.choices[0].message.content == again.choices[0].message.content
    assert ref.choices[0].message.content
    return ref


@pytest.fixture(scope="module")
def completion_reference(direct: openai.OpenAI) -> Any:
    ref = direct.completions.create(**completion_args())
    assert ref.choices[0].text
    return ref


@pytest.mark.parametrize("mode", MODES)
def test_chat_non_streaming_matches_direct(
    daemons: Callable[[str], Daemon], mode: str, chat_reference: Any
) -> None:
    daemon = daemons(mode)
    raw = daemon.client.chat.completions.with_raw_response.create(**chat_args())
    resp = raw.parse()
    assert resp.object == "chat.completion"
    assert resp.model == worker.ALIAS  # llama-server answers with its alias
    assert resp.choices[0].message.content == chat_reference.choices[0].message.content
    assert resp.choices[0].finish_reason == chat_reference.choices[0].finish_reason
    want = expected_cost(chat_reference.usage.prompt_tokens, chat_reference.usage.completion_tokens)
    assert Decimal(raw.headers["x-sidecar-cost"]) == want
    assert "e" not in raw.headers["x-sidecar-cost"].lower()
    check_usage_and_ledger(
        daemon, raw.headers["x-request-id"], resp.usage, chat_reference.usage, False
    )


@pytest.mark.parametrize("mode", MODES)
def test_chat_streaming_matches_direct(
    daemons: Callable[[str], Daemon], mode: str, chat_reference: Any
) -> None:
    daemon = daemons(mode)
    raw = daemon.client.chat.completions.with_raw_response.create(
        **chat_args(), stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    content, finish, usage, models = [], [], None, set()
    for chunk in raw.parse():
        assert chunk.object == "chat.completion.chunk"
        models.add(chunk.model)
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            if choice.finish_reason:
                finish.append(choice.finish_reason)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(content) == chat_reference.choices[0].message.content
    assert finish == [chat_reference.choices[0].finish_reason]
    assert models == {worker.ALIAS}
    check_usage_and_ledger(daemon, raw.headers["x-request-id"], usage, chat_reference.usage, True)


@pytest.mark.parametrize("mode", MODES)
def test_chat_stream_without_include_usage_hides_usage(
    daemons: Callable[[str], Daemon], mode: str, chat_reference: Any
) -> None:
    daemon = daemons(mode)
    raw = daemon.client.chat.completions.with_raw_response.create(**chat_args(), stream=True)
    chunks = list(raw.parse())
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == chat_reference.choices[0].message.content
    entry = daemon.ledger_entry(raw.headers["x-request-id"])
    assert entry["prompt_tokens"] == chat_reference.usage.prompt_tokens
    assert entry["completion_tokens"] == chat_reference.usage.completion_tokens


@pytest.mark.parametrize("mode", MODES)
def test_completions_match_direct(
    daemons: Callable[[str], Daemon], mode: str, completion_reference: Any
) -> None:
    daemon = daemons(mode)
    raw = daemon.client.completions.with_raw_response.create(**completion_args())
    resp = raw.parse()
    assert resp.object == "text_completion"
    assert resp.model == worker.ALIAS
    assert resp.choices[0].text == completion_reference.choices[0].text
    assert resp.choices[0].finish_reason == completion_reference.choices[0].finish_reason
    check_usage_and_ledger(
        daemon, raw.headers["x-request-id"], resp.usage, completion_reference.usage, False
    )

    raw = daemon.client.completions.with_raw_response.create(
        **completion_args(), stream=True, stream_options={"include_usage": True}
    )
    text, finish, usage = [], [], None
    for chunk in raw.parse():
        assert chunk.object == "text_completion"
        for choice in chunk.choices:
            text.append(choice.text or "")
            if choice.finish_reason:
                finish.append(choice.finish_reason)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(text) == completion_reference.choices[0].text
    assert finish == [completion_reference.choices[0].finish_reason]
    check_usage_and_ledger(
        daemon, raw.headers["x-request-id"], usage, completion_reference.usage, True
    )

    # llama-server puts usage on the completions finish chunk even when nobody asked for
    # it; the client that did not ask must not see it (the ledger still records it).
    raw = daemon.client.completions.with_raw_response.create(**completion_args(), stream=True)
    chunks = list(raw.parse())
    assert [c.usage for c in chunks] == [None] * len(chunks)
    assert "".join(c.choices[0].text for c in chunks) == completion_reference.choices[0].text
    entry = daemon.ledger_entry(raw.headers["x-request-id"])
    assert entry["completion_tokens"] == completion_reference.usage.completion_tokens


def test_direct_streams_match_direct_json(direct: openai.OpenAI, chat_reference: Any) -> None:
    """The worker's own stream and JSON answers agree (what the daemon tests rely on)."""
    stream = direct.chat.completions.create(
        **chat_args(), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat_reference.choices[0].message.content
    assert chunks[-1].usage is not None and not chunks[-1].choices


# ----------------------------------------------------------------------------------------
# Anthropic messages and OpenAI responses (llama-server serves both)
# ----------------------------------------------------------------------------------------


def anthropic_client(daemon_or_url: Daemon | str) -> Any:
    anthropic = pytest.importorskip("anthropic")
    url = daemon_or_url if isinstance(daemon_or_url, str) else daemon_or_url.url
    return anthropic.Anthropic(base_url=url, api_key="sk-ant-test", max_retries=0, timeout=60)


MESSAGES_ARGS: dict[str, Any] = {
    "model": CLIENT_MODEL,
    "max_tokens": 24,
    "messages": [{"role": "user", "content": USER_TEXT}],
    "extra_body": {"temperature": 0},  # this SDK version has no temperature argument
}


def check_anthropic_usage(
    daemon: Daemon, request_id: str, start_usage: Any, end_usage: Any, ref: Any
) -> None:
    """llama-server ignores cache_prompt on /v1/messages, so how the prompt splits into
    input_tokens and cache_read_input_tokens depends on its cache: compare the sum.
    `start_usage` has the input counts, `end_usage` the output count and the cost."""
    cache_read = start_usage.cache_read_input_tokens or 0
    prompt = start_usage.input_tokens + cache_read
    assert prompt == ref.input_tokens + (ref.cache_read_input_tokens or 0)
    assert end_usage.output_tokens == ref.output_tokens
    want = expected_cost(prompt, end_usage.output_tokens)  # cached_prompt defaults to prompt
    assert Decimal(str((end_usage.model_extra or {})["cost"])) == want
    entry = daemon.ledger_entry(request_id)
    assert entry["outcome"] == "ok"
    assert entry["dialect"] == "anthropic-messages"
    assert entry["prompt_tokens"] == prompt
    assert entry["cached_tokens"] == cache_read
    assert entry["completion_tokens"] == end_usage.output_tokens
    assert entry["cost"] == want


def test_anthropic_messages_match_direct(daemon: Daemon, llama: worker.LlamaServer) -> None:
    ref = anthropic_client(llama.url).messages.create(**MESSAGES_ARGS)
    assert ref.model == worker.ALIAS and ref.stop_reason == "max_tokens"
    client = anthropic_client(daemon)

    raw = client.messages.with_raw_response.create(**MESSAGES_ARGS)
    msg = raw.parse()
    assert msg.content[0].text == ref.content[0].text
    assert msg.stop_reason == ref.stop_reason
    check_anthropic_usage(daemon, raw.headers["x-request-id"], msg.usage, msg.usage, ref.usage)

    raw = client.messages.with_raw_response.create(**MESSAGES_ARGS, stream=True)
    text, start_usage, delta_usage, types = [], None, None, []
    for event in raw.parse():
        types.append(event.type)
        if event.type == "message_start":
            start_usage = event.message.usage
        elif event.type == "content_block_delta":
            text.append(event.delta.text)
        elif event.type == "message_delta":
            delta_usage = event.usage
            assert event.delta.stop_reason == ref.stop_reason
    assert "".join(text) == ref.content[0].text
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert start_usage is not None and delta_usage is not None
    check_anthropic_usage(daemon, raw.headers["x-request-id"], start_usage, delta_usage, ref.usage)


RESPONSES_ARGS: dict[str, Any] = {
    "model": CLIENT_MODEL,
    "input": USER_TEXT,
    "max_output_tokens": 24,
    "temperature": 0,
    "extra_body": {"cache_prompt": False},
}


def test_openai_responses_match_direct(
    daemon: Daemon, direct: openai.OpenAI, llama: worker.LlamaServer
) -> None:
    ref = direct.responses.create(**RESPONSES_ARGS)
    assert ref.output_text
    raw = daemon.client.responses.with_raw_response.create(**RESPONSES_ARGS)
    resp = raw.parse()
    assert resp.output_text == ref.output_text
    assert resp.model == worker.ALIAS
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (
        ref.usage.input_tokens,
        ref.usage.output_tokens,
    )
    want = expected_cost(ref.usage.input_tokens, ref.usage.output_tokens)
    assert Decimal(str((resp.usage.model_extra or {})["cost"])) == want
    assert Decimal(raw.headers["x-sidecar-cost"]) == want

    raw = daemon.client.responses.with_raw_response.create(**RESPONSES_ARGS, stream=True)
    deltas, completed, numbers = [], None, []
    for event in raw.parse():
        numbers.append(event.sequence_number)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type == "response.completed":
            completed = event.response
    # llama-server does not number its events: the daemon numbers them from 0.
    assert numbers == list(range(len(numbers)))
    assert "".join(deltas) == ref.output_text
    assert completed is not None and completed.status == "completed"
    assert completed.usage.output_tokens == ref.usage.output_tokens
    assert Decimal(str((completed.usage.model_extra or {})["cost"])) == want
    entry = daemon.ledger_entry(raw.headers["x-request-id"])
    assert entry["dialect"] == "openai-responses"
    assert entry["prompt_tokens"] == ref.usage.input_tokens
    assert entry["completion_tokens"] == ref.usage.output_tokens
    assert entry["cost"] == want


# ----------------------------------------------------------------------------------------
# Raw bytes through the daemon
# ----------------------------------------------------------------------------------------


def test_raw_stream_framing(daemon: Daemon, llama: worker.LlamaServer) -> None:
    body = {
        "model": CLIENT_MODEL,
        "messages": [{"role": "user", "content": USER_TEXT}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "cache_prompt": False,
    }
    with httpx.Client(timeout=60) as http:
        r = http.post(
            daemon.url + "/v1/chat/completions",
            json=body,
            headers={"x-request-id": "rw-raw-1", "authorization": "Bearer sk-secret-xyz"},
        )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "rw-raw-1"
    events = parse_sse(r.content)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not r.content.startswith(b"\xef\xbb\xbf")
    assert all(c["choices"] for c in chunks), "usage chunk forwarded without include_usage"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1
    assert "sk-secret-xyz" not in daemon.proc.log_text()
    assert "sk-secret-xyz" not in daemon.ledger.read_text()


def test_bad_json(daemon: Daemon, llama: worker.LlamaServer) -> None:
    bad = b'{"model": "x", "messages": ['
    with httpx.Client(timeout=30) as http:
        # The worker itself answers malformed JSON with a 500 ...
        direct = http.post(
            llama.url + "/v1/chat/completions",
            content=bad,
            headers={"content-type": "application/json"},
        )
        assert direct.status_code == 500
        # ... the daemon refuses it with a 400 and never forwards it ...
        r = http.post(
            daemon.url + "/v1/chat/completions",
            content=bad,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "invalid_request_error"
        # ... but a passthrough route forwards it, and the worker's 500 comes back as it is.
        passed = http.post(
            daemon.url + "/completion", content=bad, headers={"content-type": "application/json"}
        )
        assert passed.status_code == direct.status_code
        assert passed.json() == direct.json()


def test_passthrough_body_arriving_after_head(daemon: Daemon) -> None:
    """A passthrough request whose body arrives a moment after its head (two writes, as
    httpx sends them) is forwarded whole at once, not when the client gives up. The body
    is malformed JSON: llama-server answers 500 and closes, so every try needs a new
    worker connection (the window where the daemon is still connecting to it)."""
    body = b'{"prompt": "Once upon a time", "n_predict": '
    head = (
        b"POST /completion HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    stuck = []
    for gap in (0.0, 0.0003, 0.0005, 0.0008, 0.001, 0.0015, 0.002, 0.005) * 5:
        with socket.create_connection(("127.0.0.1", daemon.proc.port), timeout=30) as sock:
            sock.sendall(head)
            if gap:
                time.sleep(gap)
            sock.sendall(body)
            readable, _, _ = select.select([sock], [], [], 3)
            if not readable:
                stuck.append(gap)
                if len(stuck) == 2:
                    break
                continue
            assert sock.recv(12) == b"HTTP/1.1 500"
    assert not stuck, f"no answer within 3 s when the body followed the head after {stuck} s"


# ----------------------------------------------------------------------------------------
# JSON -> SSE and SSE -> JSON
# ----------------------------------------------------------------------------------------


def test_json_to_sse_route(daemons: Callable[[str], Daemon], chat_reference: Any) -> None:
    """upstream_stream: never: the worker answers one document, the client gets SSE."""
    daemon = daemons("never")
    body = {**chat_args(), **chat_args()["extra_body"], "stream": True}
    body.pop("extra_body")
    body["stream_options"] = {"include_usage": True}
    with httpx.Client(timeout=60) as http:
        r = http.post(daemon.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.content)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == chat_reference.choices[0].message.content
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert [f for f in finish if f] == [chat_reference.choices[0].finish_reason]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == chat_reference.usage.completion_tokens
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {worker.ALIAS}


def test_sse_to_json_route(daemon: Daemon, chat_reference: Any) -> None:
    """upstream_stream: always (the preset): the worker streams, the client gets one document."""
    body = {**chat_args(), **chat_args()["extra_body"]}
    body.pop("extra_body")
    with httpx.Client(timeout=60) as http:
        r = http.post(daemon.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert doc["object"] == "chat.completion"
    assert doc["choices"][0]["message"]["role"] == "assistant"
    assert doc["choices"][0]["message"]["content"] == chat_reference.choices[0].message.content
    assert doc["usage"]["prompt_tokens"] == chat_reference.usage.prompt_tokens
    assert int(r.headers["content-length"]) == len(r.content)


# ----------------------------------------------------------------------------------------
# Worker errors
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_context_overflow_passes_through(
    daemon: Daemon, llama: worker.LlamaServer, stream: bool
) -> None:
    """A prompt over the slot's context: the worker's 400 and body reach the client as is."""
    body = {
        "model": CLIENT_MODEL,
        "messages": [{"role": "user", "content": "sidecar " * 3000}],
        "max_tokens": 4,
        "stream": stream,
    }
    with httpx.Client(timeout=60) as http:
        want = http.post(llama.url + "/v1/chat/completions", json=body)
        got = http.post(daemon.url + "/v1/chat/completions", json=body)
    assert want.status_code == 400, want.text
    assert got.status_code == want.status_code
    assert got.json() == want.json()
    entry = daemon.ledger_entry(got.headers["x-request-id"])
    assert entry["outcome"] == "upstream_http_error"
    assert entry["status"] == 400
    with pytest.raises(openai.BadRequestError) as info:
        daemon.client.chat.completions.create(
            model=CLIENT_MODEL, messages=body["messages"], max_tokens=4, stream=stream
        )
    assert info.value.status_code == 400


# ----------------------------------------------------------------------------------------
# The pool against llama-server's keep-alive
# ----------------------------------------------------------------------------------------


def test_request_after_worker_keepalive_expired(daemon: Daemon, chat_reference: Any) -> None:
    """llama-server closes idle connections after 5 s; the next request must still work."""
    errors_before = daemon.upstream_errors()
    first = daemon.client.chat.completions.create(**chat_args())
    assert first.choices[0].message.content == chat_reference.choices[0].message.content
    time.sleep(6)
    for _ in range(2):
        again = daemon.client.chat.completions.create(**chat_args())
        assert again.choices[0].message.content == chat_reference.choices[0].message.content
    assert daemon.upstream_errors() == errors_before


@pytest.mark.parametrize("mode", MODES)
def test_requests_right_after_streams(
    daemons: Callable[[str], Daemon], mode: str, chat_reference: Any
) -> None:
    """llama-server closes the connection after every streamed answer without saying
    Connection: close; requests right after a stream must not fail."""
    daemon = daemons(mode)
    want = chat_reference.choices[0].message.content
    errors_before = daemon.upstream_errors()
    for _ in range(4):
        stream = daemon.client.chat.completions.create(**chat_args(), stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
        resp = daemon.client.chat.completions.create(**chat_args())
        assert resp.choices[0].message.content == want
        comp = daemon.client.completions.create(**completion_args(max_tokens=4))
        assert comp.choices[0].text
    assert daemon.upstream_errors() == errors_before


# ----------------------------------------------------------------------------------------
# Slow worker: kill, disconnect, queueing
# ----------------------------------------------------------------------------------------


def long_chat_body(max_tokens: int = 3000) -> dict[str, Any]:
    return {
        "model": CLIENT_MODEL,
        "messages": [{"role": "user", "content": USER_TEXT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }


def test_worker_killed_mid_stream_sdk_raises(
    slow_pair: tuple[worker.LlamaServer, Daemon],
) -> None:
    server, daemon = slow_pair
    stream = daemon.client.chat.completions.create(
        model=CLIENT_MODEL,
        messages=[{"role": "user", "content": USER_TEXT}],
        max_tokens=3000,
        temperature=0,
        stream=True,
    )
    seen = 0
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                seen += 1
            if seen == 3:
                server.kill()
            assert not (chunk.choices and chunk.choices[0].finish_reason in ("stop", "length"))
    assert seen >= 3
    assert info.value.body is not None
    assert info.value.body["code"] == "upstream_disconnected"
    assert info.value.body["type"] == "upstream_error"


def test_worker_killed_mid_stream_raw_bytes(
    slow_pair: tuple[worker.LlamaServer, Daemon],
) -> None:
    server, daemon = slow_pair
    body = b""
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST",
            daemon.url + "/v1/chat/completions",
            json=long_chat_body(),
            headers={"x-request-id": "rw-kill-1"},
        ) as r,
    ):
        assert r.status_code == 200
        killed = False
        for piece in r.iter_bytes():
            body += piece
            if not killed and body.count(b"\n\n") >= 4:
                server.kill()
                killed = True
    events = parse_sse(body)
    assert b"[DONE]" not in events
    last = json.loads(events[-1])
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "error"}]
    assert last["error"]["type"] == "upstream_error"
    assert last["error"]["code"] == "upstream_disconnected"
    first = json.loads(events[0])
    assert (last["id"], last["model"], last["created"]) == (
        first["id"],
        first["model"],
        first["created"],
    )
    for event in events[:-1]:
        chunk = json.loads(event)
        assert chunk["choices"][0]["finish_reason"] is None
    entry = daemon.ledger_entry("rw-kill-1")
    assert entry["outcome"] == "upstream_error"
    assert entry["completion_tokens"] >= 1
    assert entry["usage_estimated"] is True


def read_some_events(pieces: Iterator[bytes], n: int) -> bytes:
    """Read from `pieces` (an r.iter_bytes() the caller keeps: a dropped httpx byte
    iterator closes the connection) until `n` events have arrived."""
    got = b""
    while got.count(b"\n\n") < n:
        got += next(pieces)
    return got


def wait_for_log(server: worker.LlamaServer, offset: int, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = server.log_since(offset)
        if needle in text:
            return text
        time.sleep(0.1)
    return server.log_since(offset)


def slot_busy(server: worker.LlamaServer) -> bool:
    with httpx.Client(timeout=10) as http:
        slots = http.get(server.url + "/slots").json()
    return any(s.get("is_processing") for s in slots)


def test_client_disconnect_cancels_generation(
    slow_pair: tuple[worker.LlamaServer, Daemon],
) -> None:
    server, daemon = slow_pair
    offset = server.log_offset()
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST",
            daemon.url + "/v1/chat/completions",
            json=long_chat_body(),
            headers={"x-request-id": "rw-gone-1"},
        ) as r,
    ):
        assert r.status_code == 200
        pieces = r.iter_bytes()
        read_some_events(pieces, 3)
        assert slot_busy(server)
    # The client has gone: the daemon closes the worker connection, llama-server cancels.
    log = wait_for_log(server, offset, "cancel task", 15)
    assert "cancel task" in log, log[-2000:]
    deadline = time.monotonic() + 10
    while slot_busy(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not slot_busy(server)
    entry = daemon.ledger_entry("rw-gone-1")
    assert entry["outcome"] == "client_disconnect"


def test_conversation_id_keeps_generation_after_disconnect(
    slow_pair: tuple[worker.LlamaServer, Daemon],
) -> None:
    """llama-server's X-Conversation-Id (stream replay) turns off its cancel-on-disconnect:
    the daemon forwards the header, closes the worker connection, and generation goes on."""
    server, daemon = slow_pair
    offset = server.log_offset()
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST",
            daemon.url + "/v1/chat/completions",
            json=long_chat_body(max_tokens=2000),
            headers={"x-conversation-id": "conv-rw-1"},
        ) as r,
    ):
        assert r.status_code == 200
        pieces = r.iter_bytes()
        read_some_events(pieces, 3)
        assert slot_busy(server)
    time.sleep(3)
    assert slot_busy(server)
    assert "cancel task" not in server.log_since(offset)
    server.kill()  # else its shutdown waits for the orphaned generation


@pytest.mark.parametrize(
    "slow_pair", [{"slots": 2, "env": {"LLAMA_IDLE_TIMEOUT": "2s"}}], indirect=True
)
def test_queued_request_waits_for_slot_without_timeout(
    slow_pair: tuple[worker.LlamaServer, Daemon],
) -> None:
    """Both slots busy: llama-server sends no head for a third request until one frees up.
    The wait (longer than idle_timeout here) is not silence inside a body: no timeout."""
    server, daemon = slow_pair
    with httpx.Client(timeout=60) as http:
        blockers = []
        for _ in range(2):
            cm = http.stream("POST", server.url + "/v1/chat/completions", json=long_chat_body())
            r = cm.__enter__()
            assert r.status_code == 200
            pieces = r.iter_bytes()
            read_some_events(pieces, 1)
            blockers.append((cm, pieces))

        # The queued request, on a raw socket so nothing is hidden.
        payload = json.dumps(long_chat_body(max_tokens=16)).encode()
        sock = socket.create_connection(("127.0.0.1", daemon.proc.port), timeout=60)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\nx-request-id: rw-queued-1\r\n"
            b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
        )
        readable, _, _ = select.select([sock], [], [], 3.5)
        assert not readable, "a head arrived while both slots were busy"

        assert all(s["is_processing"] for s in http.get(server.url + "/slots").json())
        for cm, _ in blockers:
            cm.__exit__(None, None, None)

        response = b""
        sock.settimeout(60)
        while not response.endswith(b"\r\n0\r\n\r\n"):  # the last chunk, not a head ending in 0
            piece = sock.recv(65536)
            if not piece:
                break
            response += piece
        sock.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"upstream_timeout" not in body
    assert b"data: [DONE]" in body
    assert b'"finish_reason":"length"' in body.replace(b" ", b"")
    entry = daemon.ledger_entry("rw-queued-1")
    assert entry["outcome"] == "ok"
    assert entry["completion_tokens"] == 16


def test_concurrent_requests_through_two_slots(daemon: Daemon, chat_reference: Any) -> None:
    """More concurrent clients than slots: every one completes with the same text."""
    results: list[str] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            stream = daemon.client.chat.completions.create(**chat_args(), stream=True)
            results.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 5
