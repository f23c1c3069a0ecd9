"""How real workers fail, replayed byte for byte through the real daemon.

tests/harness.py replays the *successful* streams of vLLM, SGLang, llama.cpp,
Ollama and TGI; this file replays the bytes each of them writes when a
generation fails, as read in their sources (file and place given with each
shape below), and checks what SPEC and README promise for them:

- a worker's own error event goes out as it came, is the last event the client
  gets (no `[DONE]` after it, even when the worker writes one; no error frame of
  sidecar's added; never a `finish_reason: "stop"` that the worker did not
  send), and the ledger says `upstream_error`, with the usage seen before it;
- a stream that breaks (the worker's process dies, the body ends with no
  terminator) gets SPEC's synthetic error frame with its code;
- a non-streaming client whose aggregated stream failed gets a 502 with the
  dialect's error object (the worker's own error, when it sent one);
- a worker's non-2xx answer passes through with its status and body, whatever
  the client's `stream`, and the ledger says `upstream_http_error`;
- the openai SDK raises instead of returning a normal completion.

Each shape runs for streaming and non-streaming clients on every
`upstream_stream` mode (the worker replays the same bytes whatever it was asked:
SPEC says the worker's actual response decides).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest

from tests.harness import (
    LAST_CHUNK,
    MODEL,
    Close,
    Daemon,
    FakeWorker,
    Send,
    chat_body,
    chat_stream_events,
    chunk,
    http_response,
    post,
    response_head,
    sse_events,
    sse_reply,
)

MODES = ("auto", "always", "never")
TAILS = {"openai-chat": "chat/completions", "openai-completions": "completions",
         "anthropic-messages": "messages"}
ROUTES = [
    {"name": f"{dialect}-{mode}", "match": {"path": f"/{mode}/v1/{tail}", "methods": ["POST"]},
     "dialect": dialect, "upstream_stream": mode}
    for dialect, tail in TAILS.items() for mode in MODES
]
_ids = itertools.count(1)

#: usage carried on the chunks before the failure (vLLM's continuous usage stats)
EARLY_USAGE = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}


@pytest.fixture(scope="module")
def proxy(module_worker: FakeWorker, make_module_daemon: Callable[..., Daemon]) -> Daemon:
    return make_module_daemon(worker=module_worker, routes=ROUTES)


def request_id() -> str:
    return f"req-fail-{next(_ids)}"


def target(dialect: str, mode: str) -> str:
    return f"/{mode}/v1/{TAILS[dialect]}"


def body_for(dialect: str, stream: bool) -> dict[str, Any]:
    if dialect == "openai-chat":
        return chat_body(stream=stream)
    if dialect == "anthropic-messages":
        out: dict[str, Any] = {"model": MODEL, "max_tokens": 16,
                               "messages": [{"role": "user", "content": "hi"}]}
    else:
        out = {"model": MODEL, "prompt": "hi"}
    if stream:
        out["stream"] = True
    return out


# =============================================================================================
# What the workers write when a generation fails after their 200 head
# =============================================================================================


def chat_prefix(flavor: str, *, usage: bool = False) -> list[bytes]:
    """The role chunk and one content chunk of a chat stream in `flavor`'s shape."""
    events = chat_stream_events(("Hel",), flavor=flavor, finish_reason=None, done=False,
                                include_usage=usage, usage_on_every_chunk=usage,
                                usage=EARLY_USAGE if usage else None)
    return events[:2]


def completions_prefix(space: bool = True) -> list[bytes]:
    base = {"id": "cmpl-abc123", "object": "text_completion", "created": 1_700_000_000, "model": MODEL}
    chunk_obj = {**base, "choices": [{"index": 0, "text": "Hel", "logprobs": None, "finish_reason": None}]}
    return [(b"data: " if space else b"data:") + json.dumps(chunk_obj, separators=(",", ":")).encode() + b"\n\n"]


@dataclass
class Shape:
    """One failure as a worker writes it after its head.

    `error` is the event that carries the worker's own error (None: the worker
    sends none and sidecar must write its frame, with `code`); `after` what the
    worker writes after it; `cut` ends the body without its last chunk and closes
    (a process that died), else the chunked body ends cleanly.
    """

    name: str
    dialect: str
    prefix: list[bytes]
    error: bytes | None
    message: str = ""
    after: list[bytes] = field(default_factory=list)
    cut: bool = False
    code: str = ""  # sidecar's code when the worker sends no error of its own
    usage: dict[str, int] | None = None  # usage the ledger must hold

    def steps(self) -> list[Any]:
        events = [*self.prefix, *([self.error] if self.error else []), *self.after]
        steps = sse_reply(events, end=not self.cut)
        return [*steps, Close()] if self.cut else steps


def dumps_py(obj: Any) -> bytes:
    """Python's `json.dumps` with its default separators (`", "`, `": "`), as vLLM and SGLang
    write their error chunks."""
    return json.dumps(obj).encode()


def dumps_compact(obj: Any) -> bytes:
    """Compact JSON, as nlohmann::json::dump (llama.cpp), Go's encoding/json (Ollama) and
    serde_json (TGI) write it."""
    return json.dumps(obj, separators=(",", ":")).encode()


VLLM_V1_ERROR = {"error": {"message": "Internal server error", "type": "InternalServerError",
                           "param": None, "code": 500}}
VLLM_ENGINE_DEAD = {"error": {"message": "EngineCore encountered an issue. See stack trace (above) "
                                         "for the root cause.",
                              "type": "InternalServerError", "param": None, "code": 500}}
OBJECT_ERROR = {"error": {"object": "error", "message": "The decoder prompt (length 9000) is longer "
                                                       "than the maximum model length of 8192.",
                          "type": "BadRequestError", "param": None, "code": 400}}
LLAMACPP_ERROR = {"code": 500, "message": "failed to decode the batch", "type": "server_error"}
TGI_ERROR = {"error": {"message": "Request failed during generation: Server error: CUDA out of memory",
                       "http_status_code": 422}}
TGI_OLD_ERROR = {"error": "Request failed during generation: Server error: CUDA out of memory",
                 "error_type": "generation"}
TGI_VALIDATION = {"error": {"message": "Input validation error: `inputs` tokens + `max_new_tokens` "
                                       "must be <= 4096. Given: 4000 `inputs` tokens and 200 "
                                       "`max_new_tokens`",
                            "http_status_code": 422}}

SHAPES = [
    # vLLM >= 0.10.2, vllm/entrypoints/openai/chat_completion/serving.py,
    # chat_completion_stream_generator's `except GenerationError` (a finish_reason "error" from
    # the engine) then `yield "data: [DONE]\n\n"`; engine/serving.py create_streaming_error_response
    # = json.dumps(ErrorResponse(error=ErrorInfo(message, type, param, code)).model_dump()).
    Shape("vllm-generation-error", "openai-chat", chat_prefix("vllm", usage=True),
          b"data: " + dumps_py(VLLM_V1_ERROR) + b"\n\n", "Internal server error",
          after=[b"data: [DONE]\n\n"], usage=EARLY_USAGE),
    # vLLM, the same generator's `except Exception` when the engine core died (EngineDeadError).
    Shape("vllm-engine-dead", "openai-chat", chat_prefix("vllm"),
          b"data: " + dumps_py(VLLM_ENGINE_DEAD) + b"\n\n", "EngineCore encountered an issue",
          after=[b"data: [DONE]\n\n"]),
    # vLLM <= 0.10.1 and SGLang (python/sglang/srt/entrypoints/openai/serving_base.py
    # create_streaming_error_response: json.dumps({"error": ErrorResponse(object="error", ...)}),
    # serving_chat.py `except ValueError` then `yield "data: [DONE]\n\n"`).
    Shape("sglang-object-error", "openai-chat", chat_prefix("sglang"),
          b"data: " + dumps_py(OBJECT_ERROR) + b"\n\n", "longer than the maximum model length",
          after=[b"data: [DONE]\n\n"]),
    Shape("sglang-object-error-completions", "openai-completions", completions_prefix(),
          b"data: " + dumps_py(OBJECT_ERROR) + b"\n\n", "longer than the maximum model length",
          after=[b"data: [DONE]\n\n"]),
    # SGLang, a scheduler abort with status 500/503: tokenizer_manager raises HTTPException inside
    # the streaming generator after the head went out; uvicorn closes the connection mid-body.
    Shape("sglang-abort-500", "openai-chat", chat_prefix("sglang"), None, cut=True,
          code="upstream_disconnected"),
    # llama.cpp before the server-context.cpp split (2024-10 .. 2025-10, tools/server/server.cpp):
    # server_sent_event(sink, "error", error_data) -> `error: {json}\n\n`, then the
    # `data: [DONE]\n\n` written for every OAI-compatible stream.
    Shape("llamacpp-error-line", "openai-chat", chat_prefix("llamacpp"),
          b"error: " + dumps_compact(LLAMACPP_ERROR) + b"\n\n", "failed to decode the batch",
          after=[b"data: [DONE]\n\n"]),
    Shape("llamacpp-error-line-completions", "openai-completions", completions_prefix(),
          b"error: " + dumps_compact(LLAMACPP_ERROR) + b"\n\n", "failed to decode the batch",
          after=[b"data: [DONE]\n\n"]),
    # llama.cpp since 2025-11 (tools/server/server-context.cpp, handle_completions_impl's
    # res->next: `output = format_oai_sse(json {{ "error", res_json }}); return false;`):
    # `data: {"error":{...}}\n\n` and the body ends, no [DONE].
    Shape("llamacpp-data-error", "openai-chat", chat_prefix("llamacpp"),
          b"data: " + dumps_compact({"error": LLAMACPP_ERROR}) + b"\n\n", "failed to decode the batch"),
    Shape("llamacpp-data-error-completions", "openai-completions", completions_prefix(),
          b"data: " + dumps_compact({"error": LLAMACPP_ERROR}) + b"\n\n", "failed to decode the batch"),
    # Ollama (server/routes.go streamResponse: a mid-stream error is `{"error": "..."}` on the
    # native stream; middleware/openai.go ChatWriter.writeResponse unmarshals it into an empty
    # ChatResponse and writes an empty chunk; the stream then ends with no finish and no [DONE]).
    Shape("ollama-midstream", "openai-chat", chat_prefix("ollama"),
          None, after=[b'data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1700000000,'
                       b'"model":"","system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{},'
                       b'"finish_reason":null}]}\n\n'],
          code="upstream_incomplete"),
    # TGI >= 2.4.1 (router/src/server.rs chat_completions: `Err(err) => yield
    # Ok(err.into_openai_event())`, router/src/infer/mod.rs into_openai_event; axum's json_data
    # writes `data:` with no space; then `Event::default().data("[DONE]")`).
    Shape("tgi-error-event", "openai-chat", chat_prefix("tgi"),
          b"data:" + dumps_compact(TGI_ERROR) + b"\n\n", "CUDA out of memory",
          after=[b"data:[DONE]\n\n"]),
    # TGI: a streaming request that fails validation gets its 200 head, then the error, then [DONE].
    Shape("tgi-validation-first", "openai-chat", [],
          b"data:" + dumps_compact(TGI_VALIDATION) + b"\n\n", "Input validation error",
          after=[b"data:[DONE]\n\n"]),
    Shape("tgi-error-event-completions", "openai-completions", completions_prefix(space=False),
          b"data:" + dumps_compact(TGI_ERROR) + b"\n\n", "CUDA out of memory",
          after=[b"data:[DONE]\n\n"]),
    # TGI 2.0 .. 2.4.0 /v1/completions (server.rs `Err(err) => yield Ok(Event::from(err))`,
    # impl From<InferError> for Event: ErrorResponse {error: String, error_type}): the error is a
    # string, then [DONE].
    Shape("tgi-old-string-error-completions", "openai-completions", completions_prefix(space=False),
          b"data:" + dumps_compact(TGI_OLD_ERROR) + b"\n\n", "CUDA out of memory",
          after=[b"data:[DONE]\n\n"]),
]
SHAPE_IDS = [s.name for s in SHAPES]


def error_payload(shape: Shape) -> str | None:
    """The data of the worker's error event, as the client must see it (an `error:` field line
    is llama.cpp's own event, which README says goes out as `data: {"error": ...}`)."""
    if shape.error is None:
        return None
    text = shape.error.decode()
    if text.startswith("error: "):
        return json.dumps({"error": json.loads(text[7:].strip())}, separators=(",", ":"))
    return text.removeprefix("data:").removeprefix(" ").strip()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_a_failed_stream_reaches_a_streaming_client_as_a_failure(
    w: FakeWorker, proxy: Daemon, shape: Shape, mode: str
) -> None:
    w.default = lambda request: shape.steps()
    rid = request_id()
    response = post(proxy, body_for(shape.dialect, True), target(shape.dialect, mode),
                    headers=[("x-request-id", rid)])
    assert response.status == 200 and response.complete
    payloads = response.sse()
    assert "[DONE]" not in payloads, payloads
    objects = [json.loads(p) for p in payloads]
    finishes = [c.get("finish_reason") for o in objects for c in o.get("choices") or []]
    assert "stop" not in finishes, payloads
    expected = error_payload(shape)
    if expected is not None:
        # the worker's own error: out as it came, the last event, nothing of sidecar's after it
        assert payloads[-1] == expected, payloads
        assert b"upstream_error" not in response.body
    else:
        last = objects[-1]
        assert last["error"]["code"] == shape.code and last["error"]["type"] == "upstream_error"
        assert last["choices"][0]["finish_reason"] == "error"
        first = objects[0]  # SPEC: the frame carries the worker's id, created and model
        assert [last[k] for k in ("id", "created", "model")] == [first[k] for k in ("id", "created", "model")]
    line = proxy.ledger_for(rid)
    assert (line["outcome"], line["status"]) == ("upstream_error", 200), line
    if shape.usage is not None:
        assert (line["prompt_tokens"], line["completion_tokens"]) == (
            shape.usage["prompt_tokens"], shape.usage["completion_tokens"]), line


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_a_failed_stream_reaches_a_non_streaming_client_as_a_502(
    w: FakeWorker, proxy: Daemon, shape: Shape, mode: str
) -> None:
    w.default = lambda request: shape.steps()
    rid = request_id()
    response = post(proxy, body_for(shape.dialect, False), target(shape.dialect, mode),
                    headers=[("x-request-id", rid)])
    assert response.status == 502, response.raw
    assert (response.header("content-type") or "").startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error, dict) and isinstance(error["message"], str), response.body
    if shape.error is not None:
        assert shape.message in error["message"], response.body
    else:
        assert error["code"] == shape.code and error["type"] == "upstream_error"
    assert response.header("x-sidecar-cost") is None
    line = proxy.ledger_for(rid)
    assert (line["outcome"], line["status"]) == ("upstream_error", 502), line
    if shape.usage is not None:
        assert (line["prompt_tokens"], line["completion_tokens"]) == (
            shape.usage["prompt_tokens"], shape.usage["completion_tokens"]), line


def sdk(proxy: Daemon, mode: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/{mode}/v1", api_key="sk-test", max_retries=0, timeout=10)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_the_openai_sdk_raises_on_every_failed_stream(w: FakeWorker, proxy: Daemon, shape: Shape) -> None:
    w.default = lambda request: shape.steps()
    client = sdk(proxy, "auto")
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.APIError) as info:
        if shape.dialect == "openai-chat":
            list(client.chat.completions.create(model=MODEL, messages=messages, stream=True))
        else:
            list(client.completions.create(model=MODEL, prompt="hi", stream=True))
    if shape.error is not None and isinstance(json.loads(error_payload(shape) or "{}")["error"], dict):
        assert shape.message in info.value.message
    # (an error that is a string, as TGI before 2.4.1 writes it, goes out as it came: the SDK
    # then raises with its own "An error occurred during streaming")
    with pytest.raises(openai.APIStatusError) as failed:
        if shape.dialect == "openai-chat":
            client.chat.completions.create(model=MODEL, messages=messages)
        else:
            client.completions.create(model=MODEL, prompt="hi")
    assert failed.value.status_code == 502
    if shape.error is not None:
        assert shape.message in failed.value.message


# =============================================================================================
# Non-2xx answers: the worker's status and body, whatever the client's stream flag
# =============================================================================================


@dataclass
class HttpError:
    name: str
    status: int
    body: bytes
    content_type: str = "application/json"
    chunked: bool = False


HTTP_ERRORS = [
    # vLLM >= 0.10.2: create_error_response -> ErrorResponse(error=ErrorInfo(...)), a starlette
    # JSONResponse (compact, application/json) with status error.code; a streaming request that
    # fails validation gets it too (the generator is never started).
    HttpError("vllm-400", 400, b'{"error":{"message":"max_tokens must be at least 1, got 0.",'
                               b'"type":"BadRequestError","param":"max_tokens","code":400}}'),
    # vLLM, a non-streaming request whose generation failed (GenerationError ->
    # _convert_generation_error_to_response) or whose engine died.
    HttpError("vllm-500-generation", 500, b'{"error":{"message":"Internal server error",'
                                          b'"type":"InternalServerError","param":null,"code":500}}'),
    HttpError("vllm-404-model", 404, b'{"error":{"message":"The model `nope` does not exist.",'
                                     b'"type":"NotFoundError","param":"model","code":404}}'),
    # vLLM <= 0.10.1 and SGLang (serving_base.py create_error_response: ORJSONResponse of
    # ErrorResponse(object="error", ...)).
    HttpError("sglang-400", 400, b'{"object":"error","message":"The input (9000 tokens) is longer than '
                                 b'the model\'s context length (8192 tokens).","type":"BadRequestError",'
                                 b'"param":null,"code":400}'),
    # llama.cpp (server_res_generator::error: status from the error's code, body
    # {"error": format_error_response(...)}, `application/json; charset=utf-8`); also for
    # stream: true, where the first result is an error (server-context.cpp, "the first error
    # must be treated as non-stream response").
    HttpError("llamacpp-400-context", 400,
              b'{"error":{"code":400,"message":"the request exceeds the available context size, try '
              b'increasing it","n_ctx":4096,"n_prompt_tokens":5000,"type":"exceed_context_size_error"}}',
              "application/json; charset=utf-8"),
    HttpError("llamacpp-503-loading", 503, b'{"error":{"code":503,"message":"Loading model",'
                                           b'"type":"unavailable_error"}}',
              "application/json; charset=utf-8"),
    # Ollama (middleware/openai.go BaseWriter.writeError: json.NewEncoder(...).Encode(
    # openai.NewError(status, msg)), a trailing newline; Go's server chunks it).
    HttpError("ollama-404-model", 404, b'{"error":{"message":"model \\"nope\\" not found, try pulling it '
                                       b'first","type":"not_found_error","param":null,"code":null}}\n',
              "application/json", chunked=True),
    HttpError("ollama-500", 500, b'{"error":{"message":"llama runner process has terminated: exit '
                                 b'status 2","type":"api_error","param":null,"code":null}}\n',
              "application/json", chunked=True),
    # TGI (router/src/server.rs impl From<InferError> for (StatusCode, Json<ErrorResponse>)).
    HttpError("tgi-422-validation", 422, b'{"error":"Input validation error: `temperature` must be '
                                         b'strictly positive","error_type":"validation"}'),
    HttpError("tgi-424-generation", 424, b'{"error":"Request failed during generation: Server error: '
                                         b'CUDA out of memory","error_type":"generation"}'),
    HttpError("tgi-500-incomplete", 500, b'{"error":"Incomplete generation","error_type":'
                                         b'"incomplete_generation"}'),
    HttpError("tgi-429-overloaded", 429, b'{"error":"Model is overloaded","error_type":"overloaded"}'),
]

MESSAGES_HTTP_ERRORS = [
    # Ollama, middleware/anthropic.go AnthropicWriter.writeError: anthropic.NewError(status, msg)
    # encoded by json.NewEncoder (a trailing newline), with a request_id.
    HttpError("ollama-messages-404", 404, b'{"type":"error","error":{"type":"not_found_error","message":'
                                          b'"model \\"nope\\" not found, try pulling it first"},'
                                          b'"request_id":"req_0123456789"}\n', chunked=True),
    # llama.cpp answers its Messages endpoint's errors in its OpenAI shape (res->error).
    HttpError("llamacpp-messages-400", 400, b'{"error":{"code":400,"message":"the request exceeds the '
                                            b'available context size, try increasing it","n_ctx":4096,'
                                            b'"n_prompt_tokens":5000,"type":"exceed_context_size_error"}}',
              "application/json; charset=utf-8"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize(
    ("dialect", "shape"),
    [*(("openai-chat", s) for s in HTTP_ERRORS),
     *(("anthropic-messages", s) for s in MESSAGES_HTTP_ERRORS)],
    ids=[*(s.name for s in HTTP_ERRORS), *(f"messages-{s.name}" for s in MESSAGES_HTTP_ERRORS)],
)
def test_a_workers_non_2xx_passes_through(
    w: FakeWorker, proxy: Daemon, dialect: str, shape: HttpError, stream: bool, mode: str
) -> None:
    w.default = lambda request: [Send(http_response(shape.status, shape.body,
                                                    [("content-type", shape.content_type)],
                                                    chunked=shape.chunked))]
    rid = request_id()
    response = post(proxy, body_for(dialect, stream), target(dialect, mode),
                    headers=[("x-request-id", rid)])
    assert (response.status, response.body) == (shape.status, shape.body)
    assert response.header("content-type") == shape.content_type
    assert response.header("x-sidecar-cost") is None
    line = proxy.ledger_for(rid)
    assert (line["outcome"], line["status"]) == ("upstream_http_error", shape.status), line


@pytest.mark.parametrize("shape", HTTP_ERRORS, ids=[s.name for s in HTTP_ERRORS])
def test_the_openai_sdk_raises_the_workers_status(w: FakeWorker, proxy: Daemon, shape: HttpError) -> None:
    w.default = lambda request: [Send(http_response(shape.status, shape.body,
                                                    [("content-type", shape.content_type)],
                                                    chunked=shape.chunked))]
    with pytest.raises(openai.APIStatusError) as failed:
        sdk(proxy, "auto").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                   stream=True)
    assert failed.value.status_code == shape.status


@pytest.mark.parametrize("mode", ["auto", "never"])
def test_a_2xx_error_document_with_a_string_error_is_a_502_with_an_error_object(
    w: FakeWorker, proxy: Daemon, mode: str
) -> None:
    """The same failure as one JSON document (a worker answering `{"error": "..."}` with a 2xx):
    a non-streaming client gets the OpenAI error object with the worker's text, never the
    worker's body whose `error` is no object; the ledger says `upstream_error`."""
    w.default = lambda request: [Send(http_response(200, dumps_compact(TGI_OLD_ERROR)))]
    rid = request_id()
    response = post(proxy, body_for("openai-chat", False), target("openai-chat", mode),
                    headers=[("x-request-id", rid)])
    assert response.status == 502
    assert response.json() == {"error": {"message": TGI_OLD_ERROR["error"], "type": "upstream_error",
                                         "code": "generation"}}
    assert proxy.ledger_for(rid)["outcome"] == "upstream_error"


# =============================================================================================
# The Anthropic Messages endpoints of the same workers
# =============================================================================================


def named(kind: str, obj: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + dumps_compact(obj) + b"\n\n"


MESSAGES_PREFIX = [
    named("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": MODEL, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 0}}}),
    named("content_block_start", {"type": "content_block_start", "index": 0,
                                  "content_block": {"type": "text", "text": ""}}),
    named("content_block_delta", {"type": "content_block_delta", "index": 0,
                                  "delta": {"type": "text_delta", "text": "Hel"}}),
]

MESSAGES_SHAPES = [
    # vLLM, vllm/entrypoints/anthropic/serving_messages.py message_stream_converter's
    # `except Exception`: AnthropicStreamEvent(type="error", error=AnthropicError(
    # type="internal_error", message=str(e))).model_dump_json(exclude_unset=True) wrapped by
    # wrap_data_with_event (`event: error\ndata: ...\n\n`), then `yield "data: [DONE]\n\n"`.
    Shape("vllm-messages-error-then-done", "anthropic-messages", MESSAGES_PREFIX,
          named("error", {"type": "error", "error": {"type": "internal_error",
                                                      "message": "1 validation error for ChatCompletionStreamResponse"}}),
          "1 validation error", after=[b"data: [DONE]\n\n"]),
    # llama.cpp, server-context.cpp: format_anthropic_sse({{"event", "error"}, {"data", res_json}})
    # with res_json = format_error_response(...): no Anthropic envelope; the body then ends.
    Shape("llamacpp-messages-error", "anthropic-messages", MESSAGES_PREFIX,
          named("error", LLAMACPP_ERROR), "failed to decode the batch"),
    # Ollama, middleware/anthropic.go: a mid-stream `{"error": ...}` of the native stream becomes an
    # empty ChatResponse, for which the StreamConverter writes nothing; the body ends, no message_stop.
    Shape("ollama-messages-midstream", "anthropic-messages", MESSAGES_PREFIX, None,
          code="upstream_incomplete"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", MESSAGES_SHAPES, ids=[s.name for s in MESSAGES_SHAPES])
def test_a_failed_messages_stream_reaches_a_streaming_client_as_a_failure(
    w: FakeWorker, proxy: Daemon, shape: Shape, mode: str
) -> None:
    w.default = lambda request: shape.steps()
    rid = request_id()
    response = post(proxy, body_for(shape.dialect, True), target(shape.dialect, mode),
                    headers=[("x-request-id", rid)])
    assert response.status == 200 and response.complete
    events = sse_events(response.body)
    names = [name for name, _ in events]
    assert "message_stop" not in names and "[DONE]" not in [d for _, d in events], events
    assert not any(json.loads(d).get("delta", {}).get("stop_reason") for _, d in events), events
    assert names[-1] == "error"
    if shape.error is not None:
        assert response.body.endswith(shape.error), response.body
        assert names.count("error") == 1
    else:
        error = json.loads(events[-1][1])
        assert error["type"] == "error" and error["error"]["code"] == shape.code
    line = proxy.ledger_for(rid)
    assert (line["outcome"], line["status"], line["prompt_tokens"]) == ("upstream_error", 200, 11), line


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", MESSAGES_SHAPES, ids=[s.name for s in MESSAGES_SHAPES])
def test_a_failed_messages_stream_reaches_a_non_streaming_client_as_a_502(
    w: FakeWorker, proxy: Daemon, shape: Shape, mode: str
) -> None:
    w.default = lambda request: shape.steps()
    rid = request_id()
    response = post(proxy, body_for(shape.dialect, False), target(shape.dialect, mode),
                    headers=[("x-request-id", rid)])
    assert response.status == 502, response.raw
    body = response.json()
    assert body["type"] == "error" and isinstance(body["error"]["message"], str), body
    if shape.error is not None:
        assert shape.message in body["error"]["message"]
    else:
        assert body["error"]["code"] == shape.code
    line = proxy.ledger_for(rid)
    assert (line["outcome"], line["status"], line["prompt_tokens"]) == ("upstream_error", 502, 11), line


# =============================================================================================
# A long stream, then the error: the per-token fast lane must still see it
# =============================================================================================

LONG_ERRORS = {
    "vllm": (b"data: " + dumps_py(VLLM_V1_ERROR) + b"\n\n", b"data: [DONE]\n\n"),
    "tgi": (b"data:" + dumps_compact(TGI_ERROR) + b"\n\n", b"data:[DONE]\n\n"),
    "llamacpp": (b"error: " + dumps_compact(LLAMACPP_ERROR) + b"\n\n", b"data: [DONE]\n\n"),
}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("coalesced", [False, True], ids=["event-per-write", "one-write"])
@pytest.mark.parametrize("flavor", list(LONG_ERRORS))
def test_an_error_after_a_long_stream_is_still_the_workers_error(
    w: FakeWorker, proxy: Daemon, flavor: str, coalesced: bool, stream: bool
) -> None:
    """200 content events (the fast lane has long learnt the content event's template), then
    the worker's error and its [DONE], each in its own write or all in one: the error is the
    last event (or the 502), the ledger `upstream_error` with the content counted."""
    error, done = LONG_ERRORS[flavor]
    events = chat_stream_events([f"t{i} " for i in range(200)], flavor=flavor, finish_reason=None,
                                done=False, include_usage=False)
    if coalesced:
        whole = b"".join([*events, error, done])
        steps = [Send(response_head(200, [("content-type", "text/event-stream"),
                                          ("transfer-encoding", "chunked")]) + chunk(whole) + LAST_CHUNK)]
    else:
        steps = sse_reply([*events, error, done])
    w.default = lambda request: steps
    rid = request_id()
    response = post(proxy, body_for("openai-chat", stream), target("openai-chat", "auto" if stream else "always"),
                    headers=[("x-request-id", rid)])
    message = json.loads(error.split(b":", 1)[1])
    message = (message.get("error") or message)["message"]
    if stream:
        payloads = response.sse()
        assert response.status == 200 and "[DONE]" not in payloads
        assert json.loads(payloads[-1])["error"]["message"] == message
        assert "".join(json.loads(p)["choices"][0]["delta"].get("content") or "" for p in payloads[:-1]) == \
            "".join(f"t{i} " for i in range(200))
    else:
        assert response.status == 502 and response.json()["error"]["message"] == message
    line = proxy.ledger_for(rid)
    assert line["outcome"] == "upstream_error"
    assert (line["completion_tokens"], line["usage_estimated"]) == (200, True), line
