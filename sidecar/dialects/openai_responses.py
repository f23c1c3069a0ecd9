"""The `openai-responses` dialect: OpenAI Responses (`POST /v1/responses`).

Pure: no sockets, no asyncio. Knows the typed Responses stream
(`response.created`, `response.output_item.added`, `response.output_text.delta`,
..., `response.completed` / `response.incomplete` / `response.failed`), where
it carries usage (`response.usage` of the terminal event), how to take one
`response` object out of a stream and to replay one as a stream, and the
SPEC's synthetic `response.failed` frame.

`sequence_number`: an event the worker numbered passes through unchanged and
the sidecar's own events continue after the last number seen; an event the
worker did not number gets the next number (from 0), so with an unnumbered
worker every event is re-encoded. Otherwise pass-through events are returned
as the exact bytes they arrived as; only the terminal event that gets
`usage.cost`, and an event whose `event:` line is missing or differs from its
data's `type`, are re-encoded. It never adds `stream_options` to a request.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sidecar.config import Pricing
from sidecar.dialects.base import (
    Dialect,
    DocumentTranslator,
    RequestPlan,
    StreamTranslator,
    openai_error_body,
    price_usage,
    stream_flag_plan,
)
from sidecar.dialects.jsonio import dumps_document, json_int, model_name, read_document
from sidecar.dialects.merge import copy_json
from sidecar.dialects.typed import TypedEventStream, named_event
from sidecar.failures import Failure
from sidecar.usage import Usage, cost_json_number, openai_cost, usage_from_responses

#: Events that end a stream; their `response` is the final response object.
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_LIFECYCLE = frozenset({"response.created", "response.queued", "response.in_progress"})
#: Delta events folded into the output so far: type -> (container key, index key, field).
_DELTAS: dict[str, tuple[str | None, str | None, str]] = {
    "response.output_text.delta": ("content", "content_index", "text"),
    "response.refusal.delta": ("content", "content_index", "refusal"),
    "response.reasoning_text.delta": ("content", "content_index", "text"),
    "response.reasoning_summary_text.delta": ("summary", "summary_index", "text"),
    "response.function_call_arguments.delta": (None, None, "arguments"),
    "response.custom_tool_call_input.delta": (None, None, "input"),
}
#: Part-added events: type -> (container key, index key).
_PARTS = {
    "response.content_part.added": ("content", "content_index"),
    "response.reasoning_summary_part.added": ("summary", "summary_index"),
}


def _with_cost(response: dict[str, Any], cost: Decimal | None) -> bool:
    """Put `cost` into `response.usage` in place; True when the response changed."""
    usage = response.get("usage")
    if cost is None or not isinstance(usage, dict):
        return False
    response["usage"] = {**usage, "cost": cost_json_number(cost)}
    return True


def worker_error_document(err: Any) -> bytes:
    """The 502 body of a non-streaming client whose worker reported its own failure: the
    OpenAI error object with the worker's message, code and param."""
    if not isinstance(err, dict):
        err = {}
    return dumps_document(
        {
            "error": {
                "message": err.get("message") or "the worker's response failed",
                "type": "upstream_error",
                "code": err.get("code"),
                "param": err.get("param"),
            }
        }
    )


_MAX_PART_GAP = 64  # a content part announced this far past the last one is ignored


class OutputSoFar:
    """The response's output items as the stream builds them (deltas kept as lists of pieces)."""

    def __init__(self) -> None:
        self.items: dict[int, dict[str, Any]] = {}
        self.done: set[int] = set()
        #: per output index, the pieces of each of its delta fields (container, sub, field):
        #: an item's done drops its own in one step, whatever the number of items still open
        self.pieces: dict[int, dict[tuple[str | None, int | None, str], list[str]]] = {}

    def read(self, kind: str, obj: dict[str, Any]) -> None:
        """Fold one output event in (events it does not know are ignored)."""
        index = obj.get("output_index")
        if not isinstance(index, int):
            return
        if kind == "response.output_item.added" or kind == "response.output_item.done":
            item = obj.get("item")
            if isinstance(item, dict):
                self.items[index] = copy_json(item)
                if kind == "response.output_item.done":
                    self.done.add(index)
                    self.pieces.pop(index, None)
            return
        if index in self.done:
            return
        where = _DELTAS.get(kind)
        if where is not None:
            delta = obj.get("delta")
            if isinstance(delta, str) and delta:
                container, index_key, field = where
                sub = obj.get(index_key) if index_key is not None else None
                key = (container, sub if isinstance(sub, int) else None, field)
                self.pieces.setdefault(index, {}).setdefault(key, []).append(delta)
            return
        part_where = _PARTS.get(kind)
        if part_where is not None:
            item = self.items.get(index)
            part, sub = obj.get("part"), obj.get(part_where[1])
            if item is None or not isinstance(part, dict) or type(sub) is not int or sub < 0:
                return
            parts = item.get(part_where[0])
            if not isinstance(parts, list):
                parts = item[part_where[0]] = []
            if sub > len(parts) + _MAX_PART_GAP:  # no list of a million empty parts
                return
            while len(parts) <= sub:
                parts.append({})
            parts[sub] = copy_json(part)

    def output(self) -> list[dict[str, Any]]:
        """Every item seen, in output order, with its deltas applied."""
        items = {i: copy_json(item) for i, item in self.items.items()}
        for index, fields in self.pieces.items():
            item = items.get(index)
            for (container, sub, field), pieces in fields.items():
                target: Any = item
                if target is not None and container is not None:
                    parts = target.get(container)
                    target = parts[sub] if isinstance(parts, list) and sub is not None and 0 <= sub < len(parts) else None
                if isinstance(target, dict):
                    start = target.get(field)
                    target[field] = (start if isinstance(start, str) else "") + "".join(pieces)
        return [items[i] for i in sorted(items)]


class ResponsesStream(TypedEventStream):
    """One worker Responses stream, relayed event by event or reduced to its final response."""

    failure_events = frozenset({"error", "response.failed"})

    def __init__(self, plan: RequestPlan, pricing: Pricing, aggregate: bool) -> None:
        super().__init__(plan, pricing, aggregate)
        self.last_sequence = -1  # the last sequence_number written (the worker's or ours)
        self._created: dict[str, Any] | None = None  # response.created's response
        self._latest: dict[str, Any] | None = None  # the latest lifecycle response
        self._final: dict[str, Any] | None = None  # the terminal event's response
        self._output = OutputSoFar()

    # -- reading events ---------------------------------------------------------
    def read(self, kind: str, obj: dict[str, Any]) -> bool:
        changed = False
        seq = obj.get("sequence_number")
        if type(seq) is int:
            self.last_sequence = seq
        else:
            self.last_sequence += 1
            obj["sequence_number"] = json_int(self.last_sequence)
            changed = True
        if kind.endswith(".delta"):
            if obj.get("delta"):
                self.content_events += 1
            self._output.read(kind, obj)
        elif kind in _TERMINAL:
            changed = self._read_terminal(kind, obj) or changed
        elif kind in _LIFECYCLE:
            self._read_lifecycle(obj)
        elif kind != "error":
            self._output.read(kind, obj)
        return changed

    def _read_lifecycle(self, obj: dict[str, Any]) -> None:
        response = obj.get("response")
        if not isinstance(response, dict):
            return
        if self._created is None:
            self._created = response
        self._latest = response
        self._note_model(response)

    def _note_model(self, response: dict[str, Any]) -> None:
        model = model_name(response.get("model"))
        if model is not None:
            self.model = model

    def _read_terminal(self, kind: str, obj: dict[str, Any]) -> bool:
        """A terminal event: usage, cost and completion (True: cost injected, re-encode)."""
        self.complete = True
        response = obj.get("response")
        if not isinstance(response, dict):
            response = obj["response"] = {}
        self._final = response
        self._note_model(response)
        usage = response.get("usage")
        if isinstance(usage, dict):
            self.usage.merge_max(usage_from_responses(usage))
        self.settle()
        if kind == "response.failed":
            self.worker_error = True  # forwarded as it is
            return False
        return not self.aggregate and _with_cost(response, self.stated_cost)

    # -- results ------------------------------------------------------------------
    def _base(self) -> dict[str, Any]:
        """The stream's response object so far (a synthesized one if the worker sent none)."""
        base = dict(self._latest) if self._latest is not None else {
            "id": "resp_" + self.plan.request_id,
            "object": "response",
            "created_at": self.plan.created,
            "model": self.model or self.plan.request_model,
            "status": "in_progress",
            "error": None,
            "incomplete_details": None,
            "output": [],
            "usage": None,
            # required by the SDKs' Response type; the request's own values are not kept
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
        }
        if self._created is not None:
            for key in ("id", "model", "created_at"):
                if key in self._created:
                    base[key] = self._created[key]
        return base

    def document(self) -> bytes:
        if self.worker_error:  # its `error` event, or the error of its `response.failed`
            err: Any = self._error_obj  # (then the failed response's `error`: any JSON value)
            if err is not None and isinstance(err.get("error"), dict):
                err = err["error"]  # an unnamed `{"error": {...}}` (llama.cpp's)
            if err is None and self._final is not None:
                err = self._final.get("error")
            return worker_error_document(err)
        if self._final is None:
            self.settle()
        base = self._base()
        doc = dict(self._final) if self._final is not None else base
        for key in ("id", "object", "created_at", "model"):
            if doc.get(key) is None and base.get(key) is not None:
                doc[key] = base[key]
        if not isinstance(doc.get("output"), list):
            doc["output"] = self._output.output()
        _with_cost(doc, self.stated_cost)
        return dumps_document(doc)

    def error_frame(self, failure: Failure, message: str) -> bytes:
        """`response.failed` with the stream's own response and its output so far; when the
        client never got a `response.created` (the worker failed before its first event, or
        its JSON answer broke on the way to a streaming client), a synthesized one first:
        clients that follow the stream's state (the openai SDK's `responses.stream()`)
        refuse a `response.failed` for a response they never saw created."""
        response = self._base()
        created = b""
        if self._created is None:
            self._created = {**response, "status": "in_progress"}
            self.last_sequence += 1
            created = named_event(
                {"type": "response.created", "response": self._created,
                 "sequence_number": json_int(self.last_sequence)},
                "response.created",
            )
        response["status"] = "failed"
        response["error"] = {"code": failure.code, "message": message}
        response["output"] = self._output.output()
        self.last_sequence += 1
        obj = {"type": "response.failed", "response": response,
               "sequence_number": json_int(self.last_sequence)}
        return created + named_event(obj, "response.failed")


class ResponsesDocument(DocumentTranslator):
    """One worker `response` document, returned as JSON or replayed as a Responses stream."""

    def __init__(self, plan: RequestPlan, pricing: Pricing, body: bytes) -> None:
        doc = read_document(body)
        self.plan = plan
        self.doc = doc
        self.worker_error = doc.get("error") is not None or doc.get("status") == "failed"
        self.model = model_name(doc.get("model"))
        usage_obj = doc.get("usage")
        self.usage = usage_from_responses(usage_obj) if isinstance(usage_obj, dict) else Usage()
        self.cost = price_usage(pricing, self.model or plan.request_model, self.usage, openai_cost)
        if not self.worker_error:
            _with_cost(doc, self.stated_cost)

    def json(self) -> bytes:
        doc = self.doc
        if self.worker_error and _is_response(doc):
            # a `response` whose status says it failed: its client gets a 502 (as when the
            # worker streams it and it is aggregated) with the error object, not the response
            return worker_error_document(doc.get("error"))
        return dumps_document(doc)

    def sse(self) -> bytes:
        doc = self.doc
        writer = _Writer()
        if self.worker_error and not _is_response(doc):
            found = doc.get("error")
            err = found if isinstance(found, dict) else {}
            writer.emit(
                "error",
                {"code": err.get("code"), "message": err.get("message") or "", "param": err.get("param")},
            )
            return writer.bytes()
        start = dict(doc)
        start.setdefault("id", "resp_" + self.plan.request_id)
        start.setdefault("object", "response")
        start.setdefault("created_at", self.plan.created)
        start.setdefault("model", self.model or self.plan.request_model)
        start["status"] = "in_progress"
        start["output"] = []
        for key in ("usage", "error", "incomplete_details", "completed_at"):
            if key in start:
                start[key] = None
        writer.emit("response.created", {"response": start})
        writer.emit("response.in_progress", {"response": start})
        output = doc.get("output")
        for index, item in enumerate(output if isinstance(output, list) else []):
            if isinstance(item, dict):
                _item_events(writer, index, item)
        final = {**start, **doc}
        status = doc.get("status")
        kind = {"incomplete": "response.incomplete", "failed": "response.failed"}.get(
            status if isinstance(status, str) else "", "response.completed"
        )
        if status is None:  # (start's "in_progress" is no status of a finished response)
            final["status"] = "completed"
        writer.emit(kind, {"response": final})
        return writer.bytes()


def _is_response(doc: dict[str, Any]) -> bool:
    """Whether a worker's document is a `response` object (else a bare error object)."""
    return doc.get("object") == "response" or "output" in doc


class _Writer:
    """Named, numbered events for a synthesized stream (sequence_number from 0)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.sequence = 0

    def emit(self, kind: str, fields: dict[str, Any]) -> None:
        self.parts.append(named_event({"type": kind, **fields, "sequence_number": self.sequence}, kind))
        self.sequence += 1

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def _empty_part(part: dict[str, Any]) -> dict[str, Any]:
    empty = dict(part)
    for key, value in part.items():
        if key in ("text", "refusal"):
            empty[key] = ""
        elif key in ("annotations", "logprobs") and isinstance(value, list):
            empty[key] = []
    return empty


def _item_events(w: _Writer, index: int, item: dict[str, Any]) -> None:
    """output_item.added, the item's part and delta events, output_item.done."""
    itype = item.get("type")
    item_id = item.get("id") or ""
    ids = {"item_id": item_id, "output_index": index}
    added = dict(item)
    if "status" in added:
        added["status"] = "in_progress"
    content = item.get("content") if isinstance(item.get("content"), list) else None
    summary = item.get("summary") if isinstance(item.get("summary"), list) else None
    if content is not None and itype in ("message", "reasoning"):
        added["content"] = []
    if summary is not None:
        added["summary"] = []
    if itype == "function_call" and isinstance(item.get("arguments"), str):
        added["arguments"] = ""
    w.emit("response.output_item.added", {"output_index": index, "item": added})
    for sub, part in enumerate(summary or []):
        if not isinstance(part, dict):
            continue
        at = {**ids, "summary_index": sub}
        w.emit("response.reasoning_summary_part.added", {**at, "part": _empty_part(part)})
        text = part.get("text")
        if isinstance(text, str):
            if text:
                w.emit("response.reasoning_summary_text.delta", {**at, "delta": text})
            w.emit("response.reasoning_summary_text.done", {**at, "text": text})
        w.emit("response.reasoning_summary_part.done", {**at, "part": part})
    if content is not None and itype in ("message", "reasoning"):
        for sub, part in enumerate(content):
            if isinstance(part, dict):
                _part_events(w, {**ids, "content_index": sub}, part)
    if itype == "function_call" and isinstance(item.get("arguments"), str):
        arguments = item["arguments"]
        if arguments:
            w.emit("response.function_call_arguments.delta", {**ids, "delta": arguments})
        done: dict[str, Any] = {**ids, "arguments": arguments}
        if "name" in item:
            done["name"] = item["name"]
        w.emit("response.function_call_arguments.done", done)
    w.emit("response.output_item.done", {"output_index": index, "item": item})


def _part_events(w: _Writer, at: dict[str, Any], part: dict[str, Any]) -> None:
    ptype = part.get("type")
    w.emit("response.content_part.added", {**at, "part": _empty_part(part)})
    if ptype in ("output_text", "reasoning_text") and isinstance(part.get("text"), str):
        text = part["text"]
        prefix = "response.output_text" if ptype == "output_text" else "response.reasoning_text"
        extra: dict[str, Any] = {}
        if ptype == "output_text":
            logprobs = part.get("logprobs")
            extra["logprobs"] = logprobs if isinstance(logprobs, list) else []
        if text:
            w.emit(prefix + ".delta", {**at, "delta": text, **extra})
        w.emit(prefix + ".done", {**at, "text": text, **extra})
    elif ptype == "refusal" and isinstance(part.get("refusal"), str):
        refusal = part["refusal"]
        if refusal:
            w.emit("response.refusal.delta", {**at, "delta": refusal})
        w.emit("response.refusal.done", {**at, "refusal": refusal})
    w.emit("response.content_part.done", {**at, "part": part})


class ResponsesDialect(Dialect):
    """`openai-responses`: only the request's `stream` flag is ever changed."""

    name = "openai-responses"

    def plan(self, body: bytes, upstream_stream: str, request_id: str) -> RequestPlan:
        return stream_flag_plan(body, upstream_stream, request_id, ("stream_options",))

    def stream(self, plan: RequestPlan, pricing: Pricing, aggregate: bool) -> StreamTranslator:
        return ResponsesStream(plan, pricing, aggregate)

    def document(self, plan: RequestPlan, pricing: Pricing, body: bytes) -> DocumentTranslator:
        return ResponsesDocument(plan, pricing, body)

    def error_body(self, status: int, code: str, message: str) -> bytes:
        return openai_error_body(status, code, message)


OPENAI_RESPONSES = ResponsesDialect()
