"""The `anthropic-messages` dialect: Anthropic Messages (`POST /v1/messages`).

Pure: no sockets, no asyncio. Knows the Messages stream (`message_start`,
`content_block_start`, `content_block_delta`, `content_block_stop`,
`message_delta`, `message_stop`, `ping`, `error`), where it carries usage
(`message_start.message.usage` and `message_delta.usage`, the largest value
per field wins), how to fold a stream into one `message` and to replay one
`message` as a stream, and the SPEC's `event: error` frame.

Pass-through events are returned as the exact bytes they arrived as. Only the
`message_delta` that gets `usage.cost`, and an event whose `event:` line is
missing or differs from its data's `type`, are re-encoded (every event the
sidecar writes has an `event:` line equal to its `type`: the Anthropic SDKs
ignore unnamed events). It never adds `stream_options` to a request:
Anthropic streams always carry usage (a client's own is dropped when the worker is
asked not to stream, as SPEC's `never` says).
"""

from __future__ import annotations

from typing import Any

import orjson

from sidecar.config import Pricing
from sidecar.dialects.base import (
    Dialect,
    DocumentTranslator,
    RequestPlan,
    StreamTranslator,
    price_usage,
    stream_flag_plan,
)
from sidecar.dialects.jsonio import (
    StreamProtocolError,
    dumps_document,
    json_fragment,
    model_name,
    read_document,
)
from sidecar.dialects.merge import finished, merge_into, partial_json_text
from sidecar.dialects.typed import TypedEventStream, named_event
from sidecar.failures import Failure
from sidecar.usage import Usage, anthropic_cost, cost_json_number, usage_from_anthropic

#: Content block types whose `input` is streamed as `input_json_delta` fragments.
_JSON_INPUT_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})
#: Delta types that are generated content (counted when the worker reports no usage).
_CONTENT_DELTAS = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}
#: Message fields a `message_delta` carries (set when generation ends), not `message_start`.
_DELTA_FIELDS = ("stop_reason", "stop_sequence", "stop_details", "container")
#: What message_start's message leaves out of the document (a module constant: mypyc cannot
#: compile the starred tuple inline in a comprehension).
_NOT_IN_MESSAGE_START = ("content", "usage", *_DELTA_FIELDS)
#: Block types implied by a delta when a worker sends a delta without its block start.
_DELTA_BLOCK_TYPE = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "tool_use"}


def merge_usage(acc: dict[str, Any], report: dict[str, Any]) -> None:
    """Fold one `usage` report into `acc`: integer counts keep the largest, others the latest."""
    for key, value in report.items():
        if value is None:
            continue
        old = acc.get(key)
        if type(value) is int and type(old) is int:
            if value > old:
                acc[key] = value
        else:
            acc[key] = value


def error_object(error_type: str, message: str, code: str) -> dict[str, Any]:
    """An Anthropic error object carrying the sidecar's code."""
    return {"type": "error", "error": {"type": error_type, "message": message, "code": code}}


def worker_error_object(obj: dict[str, Any]) -> dict[str, Any]:
    """A worker's error event as the Anthropic error object a client's 502 carries: as it
    came when it is one (`{"type": "error", "error": {...}}`), else its message and code in
    one (llama.cpp writes `{"code": 500, "message": ..., "type": "server_error"}`)."""
    if obj.get("type") == "error" and isinstance(obj.get("error"), dict):
        return obj
    inner = obj.get("error")
    source = inner if isinstance(inner, dict) else obj
    message = source.get("message")
    wrapped = error_object("api_error", message if isinstance(message, str) and message
                           else "the worker reported an error", "upstream_error")
    code = source.get("code")
    if code is not None:
        wrapped["error"]["code"] = code
    return wrapped


def error_type_for(status: int) -> str:
    """Anthropic `error.type` for a status the sidecar answers itself."""
    if status == 404:
        return "not_found_error"
    if status == 413:
        return "request_too_large"
    if status >= 500:
        return "api_error"
    return "invalid_request_error"


class AnthropicStream(TypedEventStream):
    """One worker Messages stream, relayed event by event or folded into one `message`."""

    cost_of = staticmethod(anthropic_cost)


    def __init__(self, plan: RequestPlan, pricing: Pricing, aggregate: bool) -> None:
        super().__init__(plan, pricing, aggregate)
        self._usage_obj: dict[str, Any] | None = None
        self._message: dict[str, Any] = {}
        self._delta: dict[str, Any] = {}
        self._blocks: dict[int, dict[str, Any]] = {}
        self._pieces: dict[tuple[int, str], list[str]] = {}

    # -- reading events ---------------------------------------------------------
    def read(self, kind: str, obj: dict[str, Any]) -> bool:
        if kind == "content_block_delta":
            self._read_delta(obj)
        elif kind == "message_delta":
            return self._read_message_delta(obj)
        elif kind == "message_start":
            self._read_message_start(obj)
        elif kind == "content_block_start":
            if self.aggregate:
                index, block = obj.get("index"), obj.get("content_block")
                if isinstance(index, int) and isinstance(block, dict):
                    self._blocks[index] = dict(block)
        elif kind == "message_stop":
            self.complete = True
            self.settle()
        return False

    def _read_message_start(self, obj: dict[str, Any]) -> None:
        message = obj.get("message")
        if not isinstance(message, dict):
            raise StreamProtocolError("message_start carries no message object")
        self._message = message
        model = model_name(message.get("model"))
        if model is not None:
            self.model = model
        usage = message.get("usage")
        if isinstance(usage, dict):
            self._add_usage(usage)

    def _read_delta(self, obj: dict[str, Any]) -> None:
        delta = obj.get("delta")
        if not isinstance(delta, dict):
            return
        dtype = delta.get("type")
        if not isinstance(dtype, str):
            dtype = ""  # (a list would not even be a key to look up)
        field = _CONTENT_DELTAS.get(dtype)
        if field is not None and delta.get(field):
            self.content_events += 1
        if not self.aggregate:
            return
        index = obj.get("index")
        if not isinstance(index, int):
            raise StreamProtocolError("content_block_delta has no integer index")
        block = self._blocks.get(index)
        if block is None:
            block = self._blocks[index] = {"type": _DELTA_BLOCK_TYPE.get(dtype, "text")}
        if field is not None:
            value = delta.get(field)
            if isinstance(value, str) and value:
                self._pieces.setdefault((index, field), []).append(value)
        elif dtype == "signature_delta":
            block["signature"] = delta.get("signature")
        elif dtype == "citations_delta":
            if not isinstance(block.get("citations"), list):
                block["citations"] = []
            block["citations"].append(delta.get("citation"))
        else:
            merge_into(block, {k: v for k, v in delta.items() if k != "type"})

    def _read_message_delta(self, obj: dict[str, Any]) -> bool:
        """Record stop fields and usage; in relay mode inject the cost (True: re-encode)."""
        delta = obj.get("delta")
        if isinstance(delta, dict):
            self._delta.update(delta)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._add_usage(usage)
        self.settle()
        cost = self.stated_cost
        if self.aggregate or cost is None:
            return False
        out = dict(usage) if isinstance(usage, dict) else {}
        if "output_tokens" not in out and self.usage.completion_tokens is not None:
            out["output_tokens"] = self.usage.completion_tokens
        out["cost"] = cost_json_number(cost)
        obj["usage"] = out
        return True

    def _add_usage(self, report: dict[str, Any]) -> None:
        if self._usage_obj is None:
            self._usage_obj = {}
        merge_usage(self._usage_obj, report)
        self.usage = usage_from_anthropic(self._usage_obj)

    # -- results ------------------------------------------------------------------
    def document(self) -> bytes:
        """The folded `message`; raises StreamProtocolError for a tool input that is not JSON."""
        if self._error_obj is not None:
            return dumps_document(worker_error_object(self._error_obj))
        self.settle()
        doc: dict[str, Any] = {
            "id": None,
            "type": "message",
            "role": "assistant",
            "model": None,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }
        doc.update((k, v) for k, v in self._message.items() if v is not None or k not in doc)
        # (type and role are never None here: a worker's null never replaces a default)
        for key, fill in (
            ("id", "msg_" + self.plan.request_id),
            ("model", self.model or self.plan.request_model),
        ):
            if doc[key] is None:
                doc[key] = fill
        doc["content"] = [self._final_block(i) for i in sorted(self._blocks)]
        doc.update(self._delta)
        usage = dict(self._usage_obj) if self._usage_obj is not None else None
        if usage is not None:
            cost = self.stated_cost
            if cost is not None:
                usage["cost"] = cost_json_number(cost)
            doc["usage"] = usage
        return dumps_document(doc)

    def _final_block(self, index: int) -> dict[str, Any]:
        block: dict[str, Any] = finished(self._blocks[index])
        for field in ("text", "thinking"):
            pieces = self._pieces.get((index, field))
            if pieces:
                start = block.get(field)
                block[field] = (start if isinstance(start, str) else "") + "".join(pieces)
        pieces = self._pieces.get((index, "partial_json"))
        if pieces:
            raw = "".join(pieces)
            # the worker's text as it came, not orjson's reading of it (which makes integers
            # past 64 bits floats, and refuses `1e400`): see json_fragment
            fragment = json_fragment(raw)
            if fragment is not None:
                block["input"] = fragment
            elif self._delta.get("stop_reason") != "max_tokens":
                raise StreamProtocolError(
                    f"the tool input of content block {index} is not valid JSON"
                )
            else:
                # cut off by max_tokens, a normal end: what had come of it, as SDKs read it
                block["input"] = json_fragment(partial_json_text(raw)) or {}
        return block

    def error_frame(self, failure: Failure, message: str) -> bytes:
        return named_event(error_object("api_error", message, failure.code), "error")


class AnthropicDocument(DocumentTranslator):
    """One worker `message` document, returned as JSON or replayed as a Messages stream."""

    def __init__(self, plan: RequestPlan, pricing: Pricing, body: bytes) -> None:
        doc = read_document(body)
        self.plan = plan
        self.doc = doc
        # its own failure: an Anthropic error object, or (as in a stream, see `event_type`)
        # an `error` object with no type (llama.cpp's shape)
        kind = doc.get("type")
        self.worker_error = kind == "error" or (kind is None and doc.get("error") is not None)
        self.model = model_name(doc.get("model"))
        usage_obj = doc.get("usage")
        self.usage = usage_from_anthropic(usage_obj) if isinstance(usage_obj, dict) else Usage()
        self.cost = price_usage(pricing, self.model or plan.request_model, self.usage, anthropic_cost)
        if isinstance(usage_obj, dict) and self.cost is not None:
            doc["usage"] = {**usage_obj, "cost": cost_json_number(self.cost)}

    def json(self) -> bytes:
        return dumps_document(worker_error_object(self.doc) if self.worker_error else self.doc)

    def sse(self) -> bytes:
        doc = self.doc
        if self.worker_error:
            return named_event(worker_error_object(doc), "error")
        message = {k: v for k, v in doc.items() if k not in _NOT_IN_MESSAGE_START}
        message.setdefault("id", "msg_" + self.plan.request_id)
        message.setdefault("type", "message")
        message.setdefault("role", "assistant")
        message.setdefault("model", self.model or self.plan.request_model)
        message["content"] = []
        for key in ("stop_reason", "stop_sequence"):
            if key in doc:
                message[key] = None
        usage = doc.get("usage")
        if not isinstance(usage, dict):
            # the events require one (SDKs read `usage.output_tokens` of both): a worker
            # that reported none gets zero counts there, never a made-up estimate
            usage = {"input_tokens": 0, "output_tokens": 0}
        start_usage = {k: v for k, v in usage.items() if k != "cost"}
        if "output_tokens" in start_usage:
            start_usage["output_tokens"] = 0
        message["usage"] = start_usage
        out = [named_event({"type": "message_start", "message": message}, "message_start")]
        content = doc.get("content")
        for index, block in enumerate(content if isinstance(content, list) else []):
            if isinstance(block, dict):
                out.extend(_block_events(index, block))
        delta = {"stop_reason": doc.get("stop_reason"), "stop_sequence": doc.get("stop_sequence")}
        delta.update((k, doc[k]) for k in _DELTA_FIELDS[2:] if k in doc)
        final: dict[str, Any] = {"type": "message_delta", "delta": delta}
        final["usage"] = usage
        out.append(named_event(final, "message_delta"))
        out.append(named_event({"type": "message_stop"}, "message_stop"))
        return b"".join(out)


def _block_events(index: int, block: dict[str, Any]) -> list[bytes]:
    """content_block_start / _delta(s) / _stop replaying one finished content block."""
    start = dict(block)
    deltas: list[dict[str, Any]] = []
    btype = block.get("type")
    if btype == "text" and isinstance(block.get("text"), str):
        start["text"] = ""
        if block["text"]:
            deltas.append({"type": "text_delta", "text": block["text"]})
    elif btype == "thinking":
        if isinstance(block.get("thinking"), str):
            start["thinking"] = ""
            if block["thinking"]:
                deltas.append({"type": "thinking_delta", "thinking": block["thinking"]})
        if isinstance(block.get("signature"), str):
            start["signature"] = ""
            if block["signature"]:
                deltas.append({"type": "signature_delta", "signature": block["signature"]})
    elif isinstance(btype, str) and btype in _JSON_INPUT_BLOCKS and "input" in block:
        start["input"] = {}
        if block["input"] != {}:
            deltas.append({"type": "input_json_delta", "partial_json": dumps_document(block["input"]).decode()})
    out = [named_event({"type": "content_block_start", "index": index, "content_block": start}, "content_block_start")]
    out.extend(
        named_event({"type": "content_block_delta", "index": index, "delta": d}, "content_block_delta")
        for d in deltas
    )
    out.append(named_event({"type": "content_block_stop", "index": index}, "content_block_stop"))
    return out


class AnthropicDialect(Dialect):
    """`anthropic-messages`: only the request's `stream` flag is ever changed."""

    name = "anthropic-messages"

    def plan(self, body: bytes, upstream_stream: str, request_id: str) -> RequestPlan:
        return stream_flag_plan(body, upstream_stream, request_id, ("stream_options",))

    def stream(self, plan: RequestPlan, pricing: Pricing, aggregate: bool) -> StreamTranslator:
        return AnthropicStream(plan, pricing, aggregate)

    def document(self, plan: RequestPlan, pricing: Pricing, body: bytes) -> DocumentTranslator:
        return AnthropicDocument(plan, pricing, body)

    def error_body(self, status: int, code: str, message: str) -> bytes:
        return orjson.dumps(error_object(error_type_for(status), message, code))


ANTHROPIC_MESSAGES = AnthropicDialect()
