"""The OpenAI dialects: `openai-chat` (/v1/chat/completions) and `openai-completions` (/v1/completions).

Pure: no sockets, no asyncio. Knows where OpenAI-compatible workers (vLLM,
SGLang, llama.cpp, Ollama, TGI) put usage and finish_reason, how to turn one
`chat.completion` / `text_completion` document into chunks and back, and the
SPEC's synthetic error frame. Pass-through events are returned as the exact
bytes they arrived as; only events that must change are re-encoded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import orjson
from orjson import JSONDecodeError
from orjson import dumps as _orjson_dumps
from orjson import loads as _loads

from sidecar.config import Pricing
from sidecar.dialects.base import (
    MAX_DOCUMENT,
    PIECE_COST,
    Dialect,
    DocumentTranslator,
    RequestPlan,
    StreamTranslator,
    client_stream_flag,
    openai_error_body,
    price_usage,
    stream_asked,
)
from sidecar.dialects.jsonio import (
    StreamProtocolError,
    dumps_document,
    dumps_event_data,
    encode_request,
    model_name,
    read_document,
    read_event,
    read_request,
)
from sidecar.dialects.merge import REPLACED_KEYS, TextParts, finished, merge_into, merge_value
from sidecar.failures import Failure
from sidecar.fastlane import TextTemplate, ends_overlap, template_text
from sidecar.sse import Event, encode_event
from sidecar.usage import Usage, cost_json_number, openai_cost, usage_from_openai

DONE: Final = b"data: [DONE]\n\n"
_CHUNK_KEYS: Final = ("id", "object", "created", "model", "choices", "usage")
_CHUNK_KEY_SET: Final = frozenset(_CHUNK_KEYS)
#: a document's choice keys its JSON -> SSE replay places; any other goes on the finish chunk
_REPLAYED_CHOICE_KEYS: Final = frozenset(("index", "message", "text", "logprobs", "finish_reason"))
#: chunk keys that mean nothing in a document: OpenAI's random padding of each chunk
_CHUNK_ONLY_KEYS: Final = ("obfuscation",)
#: a choice's keys whose strings are pieces of what is generated (a chat worker may stream
#: `message` for `delta`, or send `text` beside it), concatenated when aggregating
_GENERATED: Final = frozenset({"delta", "message", "text"})
#: delta keys whose strings are generated text (a template's text is one of them)
_TEXT_KEYS: Final = ("content", "reasoning_content", "reasoning")


def worker_error_document(obj: dict[str, Any]) -> dict[str, Any]:
    """A worker's own error (chunk or document) as the 502 body of a non-streaming client:
    as it came when its `error` is an object (vLLM, SGLang, llama.cpp, TGI >= 2.4.1), else
    the OpenAI error object with the worker's text as its message (TGI before 2.4.1 writes
    `{"error": "Request failed during generation: ...", "error_type": "generation"}`)."""
    error = obj.get("error")
    if isinstance(error, dict):
        return obj
    kind = obj.get("error_type")
    message = error if isinstance(error, str) and error else "the worker reported an error"
    return {"error": {"message": message, "type": "upstream_error",
                      "code": kind if isinstance(kind, str) else None}}


@dataclass(frozen=True, slots=True)
class Shape:
    """What differs between chat completions and legacy completions."""

    chunk_object: str
    document_object: str
    id_prefix: str
    chat: bool  # choices carry `delta`/`message` (chat) rather than `text`


CHAT: Final = Shape("chat.completion.chunk", "chat.completion", "chatcmpl-", chat=True)
# SPEC: an id the worker did not give is `chatcmpl-` + the request id, on both dialects
# (llama.cpp's completion ids start with it too)
COMPLETIONS: Final = Shape("text_completion", "text_completion", "chatcmpl-", chat=False)


def _dumps_event(obj: dict[str, Any]) -> bytes:
    return b"data: " + dumps_event_data(obj) + b"\n\n"



def _usage_with_cost(usage_obj: dict[str, Any], cost: Decimal | None) -> dict[str, Any]:
    if cost is None:
        return usage_obj
    return {**usage_obj, "cost": cost_json_number(cost)}


def _absorbs_idempotently(obj: dict[str, Any], *skip: str) -> bool:
    """True when merging `obj` (minus `skip`) into an accumulator again changes nothing:
    every field null, or a name that is replaced rather than appended."""
    for key, value in obj.items():  # (a loop: no generator made per template learnt)
        if value is not None and key not in skip and not (
            key in REPLACED_KEYS and type(value) is str
        ):
            return False
    return True


def _choice_index(choice: dict[str, Any]) -> int:
    """A choice's `index` (missing or null: 0); aggregated choices are keyed and ordered
    by it, so anything but an integer is a protocol error."""
    index = choice.get("index")
    if index is None:
        return 0
    if type(index) is not int:
        raise StreamProtocolError("a choice index is not an integer")
    return index


def _content_bearing(part: Any, but: str = "") -> bool:
    """A chat `delta` or a completions `text` that carries generated content; `but`: a text
    key of the delta (`_TEXT_KEYS`) whose content is not counted."""
    if type(part) is dict:
        return bool(
            (but != "content" and part.get("content"))
            or (but != "reasoning_content" and part.get("reasoning_content"))
            or (but != "reasoning" and part.get("reasoning"))
            or part.get("tool_calls")
        )
    return bool(part) and type(part) is str


class OpenAIStream(StreamTranslator):
    """One worker SSE response in an OpenAI shape, relayed or aggregated."""

    def __init__(self, shape: Shape, plan: RequestPlan, pricing: Pricing, aggregate: bool) -> None:
        self.shape = shape
        super().__init__(plan, pricing, aggregate)
        self.id: str | None = None
        self.created: int | None = None
        self._done = False
        self._usage_obj: dict[str, Any] | None = None
        self._choices: dict[int, dict[str, Any]] = {}
        # choice indexes seen, and those that got a finish_reason: the stream is complete
        # only when every choice it began finished (n > 1: one choice's finish is not all)
        self._begun: set[int] = set()
        self._finished: set[int] = set()
        self._extras: dict[str, Any] = {}
        self._error_obj: Any = None
        self._content_key = "delta" if shape.chat else "text"
        self._fill: dict[str, Any] = {}  # what a chunk without them gets: see _learn_identity
        self._identity_open = True  # some of id/created/model not yet seen
        # the last plain content event, cut around its text: see _learn_template
        self._tpl_learns = 0  # attempts; kept under a quarter of the content events (+16)
        #: aggregating: the pieces the template's text is appended to (see `absorbed_text`)
        self._tpl_parts: TextParts | None = None
        #: an event to learn the template from once it was written (`defer_learning`)
        self._learn_later: tuple[bytes, dict[str, Any], dict[str, Any]] | None = None

    @property
    def ended(self) -> bool:
        """Only `[DONE]` (or the worker's error) ends the stream: a finish_reason may still
        be followed by usage."""
        return self._done or self.worker_error

    def _worker_error_field(self, value: str) -> bytes | None:
        """llama.cpp's `error: {...}` line (a field SSE does not define, so clients skip it,
        and the `data: [DONE]` it writes next would end the stream as a success): the
        worker's own error, passed on as the `data: {"error": ...}` chunk clients raise on
        (vLLM's and current llama.cpp's shape)."""
        try:
            error = _loads(value)
        except JSONDecodeError:
            error = None
        if not isinstance(error, dict):
            error = {"message": value or "the worker reported an error", "type": "upstream_error"}
        obj = {"error": error}
        self.worker_error = True
        self.text_template = None
        self._error_obj = obj
        return None if self.aggregate else encode_event(dumps_event_data(obj))

    def _learn_identity(self, obj: dict[str, Any]) -> None:
        """Take each of id/created/model from the first chunk that carries it (non-empty):
        what every chunk that lacks one gets. Azure's opening `prompt_filter_results` chunk
        and TGI's chunks carry empty ones, and the response's model is the one priced."""
        known = (self.id, self.created, self.model)
        if self.id is None:
            ident = obj.get("id")
            self.id = ident if isinstance(ident, str) and ident else None
        if self.created is None:
            created = obj.get("created")
            # (an integer: `true` is none, though Python's bool is an int and mypyc makes it 1)
            self.created = created if type(created) is int and created else None
        if self.model is None:
            self.model = model_name(obj.get("model"))
        if self._fill and known == (self.id, self.created, self.model):
            return  # nothing new (a worker that never sends one of them: every slow event)
        self._identity_open = self.id is None or self.created is None or self.model is None
        # (made once per stream, in this order; the id and object are strings)
        fill: dict[str, Any] = {
            "id": self.id or self.shape.id_prefix + self.plan.request_id,
            "object": self.shape.chunk_object,
        }
        created = self.created or self.plan.created
        if created is not None:
            fill["created"] = created
        model = self.model or self.plan.request_model
        if model is not None:
            fill["model"] = model
        self._fill = fill

    # -- reading events ---------------------------------------------------------
    def feed(self, event: Event) -> bytes | None:
        if self._learn_later is not None:  # (an event of the same read, not written yet)
            self.learn_now()
        template = self.text_template
        if template is not None:
            # Fast path for the event every token is: byte for byte the template (the
            # last plain content event) except for its text literal. It then means what
            # the template meant with another text, so it passes as it came (or its text
            # is appended); only the literal is parsed, to validate it.
            raw = event.raw
            if raw[: template.start] == template.prefix and raw[template.cut :] == template.suffix:
                text = template_text(raw[template.start : template.cut])
                if text is not None:
                    if self.aggregate:
                        self.absorbed_text(text)
                        return None
                    if text:
                        self.content_events += 1
                    return raw
        data = event.data
        # nothing after [DONE] or the worker's error (`ended`, read inline); comments pass
        if self._done or self.worker_error:
            return None if self.aggregate or data is not None else (event.raw or None)
        if event.error is not None:
            return self._worker_error_field(event.error)
        if data is None:  # comments and keep-alives pass
            return None if self.aggregate else (event.raw or None)
        if data == "[DONE]":
            self.text_template = None
            self._done = True
            self.complete = True
            self.settle()
            return None if self.aggregate else event.raw
        obj = read_event(data)
        if obj.get("error") is not None or event.event == "error":
            self.worker_error = True
            self.text_template = None
            self._error_obj = obj
            return None if self.aggregate else event.raw
        rewrite = False
        if self._identity_open:
            self._learn_identity(obj)
        fill = self._fill
        if not all(map(obj.get, fill)):  # (one C loop for the chunk that has them all)
            for key in fill:  # left out of any chunk (TGI's empty id, a key only the first has)
                if not obj.get(key):
                    obj[key] = fill[key]
                    rewrite = True
        choices = obj.get("choices")
        if type(choices) is not list:
            choices = []
        final = not choices
        content_key = self._content_key
        for choice in choices:
            if type(choice) is not dict:
                raise StreamProtocolError("a choice is not a JSON object")
            index = choice.get("index")
            if type(index) is not int:
                index = 0  # as `_choice_index` reads it, without refusing it here
            self._begun.add(index)
            if choice.get("finish_reason") is not None:
                self._finished.add(index)
                final = True
            if _content_bearing(choice.get(content_key)):
                self.content_events += 1
        if choices and self._finished:
            self.complete = self._begun <= self._finished
        usage_obj = obj.get("usage")
        if type(usage_obj) is dict:
            self.usage.merge_max(usage_from_openai(usage_obj))
            self._usage_obj = usage_obj
            if final:
                self.settle()
        if self.aggregate:
            self._absorb(obj, choices)
            self._maybe_learn(event.raw, obj, choices, final)
            return None
        if type(usage_obj) is dict:
            if not self.plan.include_usage:
                if not choices:
                    return None  # the usage chunk we asked for on the client's behalf
                del obj["usage"]
                rewrite = True
            elif final and (cost := self.stated_cost) is not None:
                obj["usage"] = _usage_with_cost(self._merged_usage(usage_obj), cost)
                rewrite = True
        if rewrite:
            if event.event is None and event.id is None:
                return _dumps_event(obj)
            # the worker's own `event:` and `id:` lines stay (Last-Event-ID), as on typed events
            return encode_event(dumps_event_data(obj), event=event.event, id=event.id)
        self._maybe_learn(event.raw, obj, choices, final, self.defer_learning)
        return event.raw

    def learn_now(self) -> None:
        pending = self._learn_later
        if pending is not None:
            self._learn_later = None
            self._learn_template(*pending)

    def absorbed_text(self, text: str) -> bool:
        # what _absorb would do with the template's event: merge_value appends its text to
        # the pieces of the text so far (made a TextParts when the template was learnt)
        if text:
            self.content_events += 1
        self.absorbed += len(text) + PIECE_COST
        parts = self._tpl_parts
        assert parts is not None  # set with the template when aggregating
        parts.append(text)
        return self.absorbed <= MAX_DOCUMENT

    def _maybe_learn(
        self, raw: bytes, obj: dict[str, Any], choices: list[Any], final: bool, later: bool = False
    ) -> None:
        """After an event went the slow way: learn it as the next template (`later`: at
        `learn_now`), or drop the template (kept from trying on more than a quarter of the
        content events, +16)."""
        self.text_template = None
        if final or len(choices) != 1 or self._tpl_learns > self.content_events // 4 + 16:
            return
        self._tpl_learns += 1
        if later:
            self._learn_later = (raw, obj, choices[0])
        else:
            self._learn_template(raw, obj, choices[0])

    def _learn_template(self, raw: bytes, obj: dict[str, Any], choice: dict[str, Any]) -> None:
        """Make `raw` (a one-choice event, no finish, no usage, no error, no fill-in, passed
        through or absorbed) the template of the fast path in `feed`, cut around its text.

        Only when the cut is proven: the text's JSON encoding occurs once in the bytes, and
        another string in that place parses to the same object with only the text changed.
        When aggregating, also only when absorbing the event again would change nothing but
        the text (every other field null or a replaced name).
        """
        if type(obj.get("usage")) is dict:
            return
        holder: dict[str, Any] = choice
        key = "text"
        if self.shape.chat:
            # the one text field of the delta (content, or reasoning); every other field
            # that carries content empty, so the event carries content iff its text does
            delta = choice.get("delta")
            if type(delta) is not dict:
                return
            if len(delta) == 1 and "content" in delta:
                # `{"content": ...}`, the delta most workers send: nothing beside the text
                holder, key = delta, "content"
            else:
                found = None
                for text_key in _TEXT_KEYS:
                    if type(delta.get(text_key)) is str:
                        if found is not None:
                            return
                        found = text_key
                if found is None:
                    return
                holder, key = delta, found
                if _content_bearing(delta, but=key):  # content beside the text
                    return
        text = holder.get(key)
        if type(text) is not str or not text:
            # an empty text is the role announcement, not a token: its bytes never repeat
            return
        target: dict[str, Any] | None = None
        if self.aggregate:
            if not _absorbs_idempotently(choice, key, "delta", "index"):
                return
            if holder is not choice and not _absorbs_idempotently(holder, key):
                return
            acc = self._choices.get(_choice_index(choice))  # absorbed: a valid index
            if acc is None:
                return
            target = acc.get("message") if self.shape.chat else acc
            if type(target) is not dict or not isinstance(target.get(key), (str, TextParts)):
                return
        try:
            literal = orjson.dumps(text)
        except orjson.JSONEncodeError:  # half of a surrogate pair: its bytes are an escape
            return
        needle = b'"' + key.encode() + b'":' + literal
        at = raw.find(needle)
        if at < 0 or raw.find(needle, at + 1) >= 0:
            return
        end = at + len(needle)
        start = end - len(literal)
        prefix, suffix = raw[:start], raw[end:]
        if not prefix.startswith(b"data: ") or not suffix or ends_overlap(prefix, suffix):
            return
        probe_line = prefix[6:] + b'"\\u0001"' + suffix
        try:
            probe = _loads(probe_line.partition(b"\n")[0].rstrip(b"\r"))
        except JSONDecodeError:
            return
        holder[key] = "\x01"
        try:
            if probe != obj:
                return
        except RecursionError:  # nested deeper than compares go: no template, the general way
            return
        finally:
            holder[key] = text
        if target is not None:
            # the text so far as pieces to append to: a str would become them at the next
            # piece anyway (merge_value: the text keys are continued, never replaced)
            parts = target[key]
            if type(parts) is not TextParts:
                parts = target[key] = TextParts((parts,))
            self._tpl_parts = parts
        self.text_template = TextTemplate(prefix, suffix)

    def _absorb(self, obj: dict[str, Any], choices: list[Any]) -> None:
        for key, value in obj.items():
            if key not in _CHUNK_KEYS and key not in _CHUNK_ONLY_KEYS and value is not None:
                self._extras[key] = value
        chat = self.shape.chat
        for choice in choices:
            index = _choice_index(choice)
            acc = self._choices.setdefault(index, {"index": index})
            for key, value in choice.items():
                if key == "index":
                    continue
                if key in _GENERATED:  # the pieces of what is generated: concatenated
                    if key == "text":
                        acc[key] = merge_value(key, acc.get(key), value)
                    elif chat:  # a delta (or a message) to merge; one that is no object says nothing
                        if isinstance(value, dict):
                            merge_into(acc.setdefault("message", {}), value)
                    elif key == "message":  # a completion's: as it came, merged
                        acc[key] = merge_value(key, acc.get(key), value)
                    # (a completion chunk's `delta` is not part of a text_completion)
                else:
                    # the rest is said again, not continued (a finish_reason repeated on the
                    # usage chunk, content filter results): strings replaced, lists appended
                    acc[key] = merge_value(key, acc.get(key), value, replace_strings=True)

    # -- results ------------------------------------------------------------------
    def document(self) -> bytes:
        if not self.usage.seen:
            self.settle()
        if self._error_obj is not None:
            return dumps_document(worker_error_document(self._error_obj))
        doc: dict[str, Any] = {
            "id": self.id or self.shape.id_prefix + self.plan.request_id,
            "object": self.shape.document_object,
            "created": self.created or self.plan.created,
            "model": self.model or self.plan.request_model,
            "choices": [self._final_choice(self._choices[i]) for i in sorted(self._choices)],
        }
        doc.update(self._extras)
        if self._usage_obj is not None:
            # an estimate (the worker's usage counted nothing) is the ledger's alone: the
            # client gets the worker's usage object as it came
            doc["usage"] = self._usage_obj if self.usage.estimated else _usage_with_cost(
                self._merged_usage(self._usage_obj), self.cost
            )
        return dumps_document(doc)

    def _merged_usage(self, usage_obj: dict[str, Any]) -> dict[str, Any]:
        """The worker's usage object with the counts the sidecar settled on (per field the
        largest seen), so the usage a client reads agrees with its cost."""
        merged = dict(usage_obj)
        usage = self.usage
        if usage.prompt_tokens is not None:
            merged["prompt_tokens"] = usage.prompt_tokens
        if usage.completion_tokens is not None:
            merged["completion_tokens"] = usage.completion_tokens
        if usage.total_tokens is not None:  # the worker's total: it may count what we do not
            merged["total_tokens"] = usage.total_tokens
        for details, key, count in (
            ("prompt_tokens_details", "cached_tokens", usage.cached_tokens),
            ("completion_tokens_details", "reasoning_tokens", usage.reasoning_tokens),
        ):
            if count is not None:  # (reported in an earlier chunk, maybe not in this one)
                known = merged.get(details)
                merged[details] = {**(known if type(known) is dict else {}), key: count}
        return merged

    def _final_choice(self, acc: dict[str, Any]) -> dict[str, Any]:
        choice: dict[str, Any] = finished(acc)
        if self.shape.chat:
            message = choice.setdefault("message", {})
            message.setdefault("role", "assistant")
            message.setdefault("content", None)
            calls = message.get("tool_calls")
            if isinstance(calls, list):
                if calls:
                    message["tool_calls"] = [
                        {k: v for k, v in call.items() if k != "index"}
                        # (merge_indexed made every entry a dict with an integer index)
                        for call in sorted(calls, key=lambda call: call["index"])
                    ]
                else:  # `"tool_calls": []` on every delta (some workers): no call came, and
                    del message["tool_calls"]  # OpenAI's own answer then has no such key
        else:
            choice.setdefault("text", "")
        choice.setdefault("finish_reason", None)
        return choice

    def error_frame(self, failure: Failure, message: str) -> bytes:
        # SPEC's frame has `delta`; a completion's choice also gets the `text` its readers take
        choice: dict[str, Any] = {"index": 0, "delta": {}, "finish_reason": "error"}
        if not self.shape.chat:
            choice["text"] = ""
        return _dumps_event(
            {
                "id": self.id or self.shape.id_prefix + self.plan.request_id,
                "object": self.shape.chunk_object,
                "created": self.created or int(time.time()),
                "model": self.model or self.plan.request_model,
                "choices": [choice],
                "error": {"message": message, "type": "upstream_error", "code": failure.code},
            }
        )


class OpenAIDocument(DocumentTranslator):
    """One worker JSON document in an OpenAI shape, returned as JSON or replayed as SSE."""

    def __init__(self, shape: Shape, plan: RequestPlan, pricing: Pricing, body: bytes) -> None:
        doc = read_document(body)
        self.shape = shape
        self.plan = plan
        self.doc = doc
        self.worker_error = doc.get("error") is not None
        self.model = model_name(doc.get("model"))
        usage_obj = doc.get("usage")
        self.usage = usage_from_openai(usage_obj) if isinstance(usage_obj, dict) else Usage()
        self.cost = price_usage(pricing, self.model or plan.request_model, self.usage, openai_cost)
        if isinstance(usage_obj, dict) and self.cost is not None:
            doc["usage"] = _usage_with_cost(usage_obj, self.cost)

    def json(self) -> bytes:
        return dumps_document(worker_error_document(self.doc) if self.worker_error else self.doc)

    def sse(self) -> bytes:
        doc = self.doc
        if self.worker_error:
            return _dumps_event(doc)
        shape, plan = self.shape, self.plan
        chat = shape.chat
        base: dict[str, Any] = {
            "id": doc.get("id") or shape.id_prefix + plan.request_id,
            "object": shape.chunk_object,
            # the worker's `created`, 0 included: only a missing or non-integer one is filled
            "created": created if type(created := doc.get("created")) is int else plan.created,
            "model": doc.get("model") or plan.request_model,
        }
        if not doc.keys() <= _CHUNK_KEY_SET:  # (most documents have none of their own)
            for key, value in doc.items():
                if key not in _CHUNK_KEY_SET:
                    base[key] = value
        parts: list[dict[str, Any]] = []  # each chunk's own members, after the base's
        choices = doc.get("choices")
        for position, choice in enumerate(choices if isinstance(choices, list) else []):
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", position)  # a choice without one: its place in the list
            # what the choice says beyond its content, said again on its finish
            extras = None if choice.keys() <= _REPLAYED_CHOICE_KEYS else {
                k: v for k, v in choice.items() if k not in _REPLAYED_CHOICE_KEYS
            }
            if chat:
                found = choice.get("message")
                message = dict(found) if isinstance(found, dict) else {}
                role = message.pop("role", "assistant")
                calls = message.get("tool_calls")
                if isinstance(calls, list):
                    message["tool_calls"] = [
                        {"index": i, **call} if isinstance(call, dict) else call
                        for i, call in enumerate(calls)
                    ]
                parts.append(
                    {"choices": [{"index": index, "delta": {"role": role}, "finish_reason": None}]}
                )
                content: dict[str, Any] = {"index": index, "delta": message}
            else:
                content = {"index": index, "text": choice.get("text", "")}
            if "logprobs" in choice:
                content["logprobs"] = choice["logprobs"]
            content["finish_reason"] = None
            parts.append({"choices": [content]})
            reason = choice.get("finish_reason")
            finish: dict[str, Any] = (
                {"index": index, "delta": {}, "finish_reason": reason} if chat
                else {"index": index, "text": "", "finish_reason": reason}
            )
            if extras:
                finish.update(extras)
            parts.append({"choices": [finish]})
        usage_obj = doc.get("usage")
        if plan.include_usage and isinstance(usage_obj, dict):
            parts.append({"choices": [], "usage": usage_obj})
        return _chunk_events(base, parts)


def _chunk_events(base: dict[str, Any], parts: list[dict[str, Any]]) -> bytes:
    """The stream of one event per part, each the chunk `{**base, **part}` (no key in both)
    as `_dumps_event` writes it, then `[DONE]`: the base is written once and put in place
    of each part's opening brace. (A part alone nests as deep as its chunk: what orjson
    refuses to write in the chunk, it refuses in the part. A large part is copied once
    into its event and once into the stream, as when each chunk was written whole.)"""
    try:
        head = b"data: " + _orjson_dumps(base)[:-1] + b","  # (the base is never empty)
        events = [_orjson_dumps(part).replace(b"{", head, 1) for part in parts]
    except orjson.JSONEncodeError:  # mended, or refused, as in a whole chunk
        head = b"data: " + dumps_event_data(base)[:-1] + b","
        events = [dumps_event_data(part).replace(b"{", head, 1) for part in parts]
    events.append(DONE)
    return b"\n\n".join(events)


class OpenAIDialect(Dialect):
    """`openai-chat` or `openai-completions`, depending on its `Shape`."""

    def __init__(self, name: str, shape: Shape) -> None:
        self.name = name
        self.shape = shape

    def plan(self, body: bytes, upstream_stream: str, request_id: str) -> RequestPlan:
        request = read_request(body)
        client_stream = client_stream_flag(request)
        options = request.get("stream_options")
        include_usage = (
            client_stream and isinstance(options, dict) and options.get("include_usage") is True
        )
        model = request.get("model")
        asked = stream_asked(upstream_stream, client_stream)
        if asked:
            if not (client_stream and include_usage):  # else the body says it already
                opts = dict(options) if isinstance(options, dict) else {}
                opts["include_usage"] = True
                body = encode_request(request, body, {"stream": True, "stream_options": opts})
        elif "stream_options" in request or (
            # a missing `stream` says false, but a `never` route says it in so many words
            request.get("stream", None if upstream_stream == "never" else False) is not False
        ):
            body = encode_request(request, body, {"stream": False}, ("stream_options",))
        return RequestPlan(
            request_id=request_id,
            client_stream=client_stream,
            include_usage=include_usage,
            request_model=model if isinstance(model, str) else None,
            body=body,
            asked_stream=asked,
        )

    def stream(self, plan: RequestPlan, pricing: Pricing, aggregate: bool) -> StreamTranslator:
        return OpenAIStream(self.shape, plan, pricing, aggregate)

    def document(self, plan: RequestPlan, pricing: Pricing, body: bytes) -> DocumentTranslator:
        return OpenAIDocument(self.shape, plan, pricing, body)

    def error_body(self, status: int, code: str, message: str) -> bytes:
        return openai_error_body(status, code, message)


OPENAI_CHAT = OpenAIDialect("openai-chat", CHAT)
OPENAI_COMPLETIONS = OpenAIDialect("openai-completions", COMPLETIONS)
