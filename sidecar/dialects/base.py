"""The small interface every dialect implements, and the types it speaks in.

Pure: no sockets, no asyncio. The exchange drives a dialect through exactly
these methods and never tests a dialect's name, so a new API shape (Anthropic
Messages, OpenAI Responses, ...) is one new module implementing `Dialect`,
`StreamTranslator` and `DocumentTranslator`.
"""

from __future__ import annotations

import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

from sidecar.config import Price, Pricing
from sidecar.failures import Failure, error_type_for
from sidecar.fastlane import TextTemplate
from sidecar.sse import Event
from sidecar.usage import Usage, estimated_usage, openai_cost

CostFunction = Callable[[Usage, Price], Decimal]


def price_usage(
    pricing: Pricing, model: str | None, usage: Usage, cost_of: CostFunction
) -> Decimal | None:
    """The cost of `usage` at `model`'s price, or None (no usage, or no price and no default)."""
    if not usage.seen:
        return None
    price = pricing.price_for(model)
    return None if price is None else cost_of(usage, price)


def read_request(body: bytes) -> dict[str, Any]:
    """The client's JSON request body as a dict; BadRequest when it is not one."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadRequest("request body must be a JSON object")
    return obj


# orjson reads an integer past 64 bits as a float (a seed of 2**70 would be forwarded as
# 1.1805916207174113e+21): a body to re-encode that holds a run of 19 digits anywhere is
# read again, and written, by the standard library, which keeps every integer exact. The
# run is looked for only then, with every digit made a "0" (a regex is ten times slower).
_DIGITS_AS_ZERO = bytes(48 if 48 <= c <= 57 else 32 for c in range(256))
_LONG_RUN = b"0" * 19


def encode_request(
    request: dict[str, Any], body: bytes, changes: dict[str, Any], dropped: tuple[str, ...] = ()
) -> bytes:
    """The worker's body: `body` (read into `request` by `read_request`) with the top-level
    `changes` made and the `dropped` keys removed. BadRequest when it cannot be written."""
    if _LONG_RUN not in body.translate(_DIGITS_AS_ZERO):
        _change(request, changes, dropped)
        try:
            return orjson.dumps(request)
        except orjson.JSONEncodeError:
            pass  # nested deeper than orjson writes (254, it reads 1,024): the exact way
    try:
        request = json.loads(body)  # (orjson has already refused what is not JSON)
        _change(request, changes, dropped)
        return json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode()
    except RecursionError:
        raise BadRequest("request body is nested too deeply to forward") from None


def _change(request: dict[str, Any], changes: dict[str, Any], dropped: tuple[str, ...]) -> None:
    request.update(changes)
    for key in dropped:
        request.pop(key, None)


def client_stream_flag(request: dict[str, Any]) -> bool:
    """Whether the client asked to stream: `stream` true; false, null or absent say no.
    Anything else is a BadRequest, not a guess (a worker may read `"true"` as true)."""
    flag = request.get("stream")
    if flag is None or flag is False:
        return False
    if flag is True:
        return True
    raise BadRequest("`stream` must be a boolean")


def read_document(body: bytes) -> dict[str, Any]:
    """The worker's JSON document as a dict; StreamProtocolError when it is not one.

    A document with a run of 19 digits is read by `read_beyond_orjson`, which keeps integers
    past 64 bits as they came (orjson makes them floats, and the document is written again
    with its cost): an Anthropic `tool_use` input is the worker's object, numbers and all.
    """
    exact = _LONG_RUN in body.translate(_DIGITS_AS_ZERO)
    return _read_worker_json(body, "the worker's document", exact)


def stream_flag_plan(
    body: bytes, upstream_stream: str, request_id: str, streaming_only: tuple[str, ...] = ()
) -> RequestPlan:
    """The plan of a dialect whose streams always carry usage: only `stream` is set.

    The body is forwarded byte for byte when its `stream` already says what the worker
    is asked (a missing `stream` says false, but on a `never` route the worker is told
    `stream: false` in so many words); keys in `streaming_only` are dropped when the worker
    is asked not to stream.
    """
    request = read_request(body)
    client_stream = client_stream_flag(request)
    asked = stream_asked(upstream_stream, client_stream)
    if request.get("stream", None if upstream_stream == "never" else False) is not asked:
        body = encode_request(request, body, {"stream": asked}, () if asked else streaming_only)
    model = request.get("model")
    return RequestPlan(
        request_id=request_id,
        client_stream=client_stream,
        include_usage=client_stream,  # such streams carry their usage anyway
        request_model=model if isinstance(model, str) else None,
        body=body,
        asked_stream=asked,
    )


def read_event(data: str) -> dict[str, Any]:
    """One worker event's JSON data as a dict; StreamProtocolError when it is not one.

    JSON that orjson refuses is read again by `read_beyond_orjson` (only then): a JavaScript
    gateway that slices strings by UTF-16 unit may send an emoji's escaped halves in two
    events (`"\\ud83d"`, then `"\\ude00"`), each valid JSON text alone.
    """
    return _read_worker_json(data, "event data")


def _read_worker_json(data: str | bytes, what: str, exact: bool = False) -> dict[str, Any]:
    """`data` read as a JSON object: by orjson, else (or with `exact`) by `read_beyond_orjson`."""
    try:
        obj = read_beyond_orjson(data) if exact else orjson.loads(data)
    except ValueError as exc:  # (orjson.JSONDecodeError is one)
        try:
            if exact:
                raise
            obj = read_beyond_orjson(data)
        except ValueError:
            raise StreamProtocolError(f"{what} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise StreamProtocolError(f"{what} is not a JSON object")
    return obj


def _not_json(literal: str) -> Any:
    raise ValueError(f"{literal} is not JSON")


def _exact_int(text: str) -> Any:
    """An integer as orjson writes it: an int in the 64-bit range, else its text as it came."""
    if len(text) <= 21:  # (-9223372036854775808 .. 18446744073709551615)
        value = int(text)
        if -(2**63) <= value < 2**64:
            return value
    return orjson.Fragment(text)


def _exact_float(text: str) -> Any:
    """A float, or its text as it came when a double cannot hold it (`1e400`: RFC 8259 puts no
    range on numbers, and orjson would write the infinity as `null`)."""
    value = float(text)
    return value if math.isfinite(value) else orjson.Fragment(text)


def read_beyond_orjson(text: str | bytes) -> Any:
    """`text` read by the standard library, for JSON that orjson refused but is JSON all the
    same: a lone UTF-16 surrogate escape (read as a lone surrogate in a str), a number past a
    double (kept as an `orjson.Fragment` of its text, as are integers past 64 bits). Raises
    ValueError for what is not JSON (`NaN` and `Infinity` included). Only where orjson has
    failed, or would lose an integer: the standard library is several times slower."""
    try:
        return json.loads(
            text, parse_constant=_not_json, parse_int=_exact_int, parse_float=_exact_float
        )
    except RecursionError:  # nested deeper than the interpreter goes
        raise ValueError("nested too deep") from None


def joined_surrogates(text: str) -> str:
    """`text` with each pair of UTF-16 surrogates (an emoji's halves, which came in two events)
    joined into its character, and a surrogate still alone (its other half never came) made
    U+FFFD, as a JavaScript TextEncoder writes one: no str with a surrogate is UTF-8."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def model_name(value: Any) -> str | None:
    """A worker's model name: a non-empty string, else None. One read from an escaped lone
    surrogate (see `read_beyond_orjson`) gets U+FFFD in its place (`joined_surrogates`): the
    ledger, metrics and logs that name it write UTF-8."""
    if not isinstance(value, str) or not value:
        return None
    return value if value.isascii() else joined_surrogates(value)


def json_fragment(text: str) -> orjson.Fragment | None:
    """`text`, when it is JSON, to be written as it is into a document (None when it is not).

    orjson validates it; what orjson refuses is validated by `read_beyond_orjson`, after its
    surrogate halves (an emoji's, cut between two event strings) are joined. So the text is
    written unchanged even where orjson could not hold its value: an integer past 64 bits
    (orjson reads a float), a number past a double (`1e400`). (An escaped lone surrogate,
    `\\ud83d` as six characters, is kept as it came: JSON's grammar allows it.)
    """
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        text = joined_surrogates(text)
        try:
            read_beyond_orjson(text)
        except ValueError:
            return None
    return orjson.Fragment(text)


def _mended(value: Any, whole: bool) -> Any:
    """`value` with every str that holds a surrogate made one orjson writes (see
    `_dumps_worker_data`)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            if whole:
                return joined_surrogates(value)
            return orjson.Fragment(json.dumps(value))  # ASCII, `\ud83d` escapes
        return value
    if isinstance(value, dict):
        # (a key cannot be a fragment: a surrogate in a key is mended as in a document)
        return {_mended(k, True): _mended(v, whole) for k, v in value.items()}
    if isinstance(value, list):
        return [_mended(v, whole) for v in value]
    return value


def _dumps_worker_data(obj: Any, whole: bool) -> bytes:
    """`obj`, which holds a worker's text, as JSON: orjson's, and only where orjson refuses
    it, the same with its strings mended; StreamProtocolError for what cannot be written.

    orjson refuses two things a worker's JSON may hold. UTF-16 surrogates (read by
    `read_beyond_orjson` from escapes): an event (`whole` False) keeps each as the escape it
    came as (`\\ud83d`), so the half of a pair goes to the client as the worker sent it and
    the client's JSON reader joins it with the other half in the next event; a document
    (`whole` True), whose strings are joined from all the events, gets each pair as its
    character and a surrogate still alone as U+FFFD (`joined_surrogates`), so every JSON
    reader, orjson too, reads it. And nesting deeper than the 254 levels orjson writes (it
    reads 1,024): a protocol error of the worker's, not a crash.
    """
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        pass
    try:
        return orjson.dumps(_mended(obj, whole))
    except (orjson.JSONEncodeError, RecursionError):
        raise StreamProtocolError("the worker's JSON is nested too deeply to write") from None


def dumps_document(obj: Any) -> bytes:
    """A document the sidecar built from, or read as, a worker's answer, as JSON (see
    `_dumps_worker_data`)."""
    return _dumps_worker_data(obj, whole=True)


def dumps_event_data(obj: Any) -> bytes:
    """The data of one event that holds a worker's text, as JSON (see `_dumps_worker_data`)."""
    return _dumps_worker_data(obj, whole=False)


def stream_asked(upstream_stream: str, client_stream: bool) -> bool:
    """Whether the worker is asked to stream, per the route's `upstream_stream`."""
    return {"auto": client_stream, "always": True, "never": False}[upstream_stream]


def openai_error_body(status: int, code: str, message: str) -> bytes:
    """The OpenAI-shaped error body `{"error": {"message", "type", "code"}}`."""
    return orjson.dumps({"error": {"message": message, "type": error_type_for(status), "code": code}})


#: Largest JSON document the sidecar holds whole: a worker's document it translates, or the
#: one it aggregates from a worker's stream (bytes read, or what the text absorbed holds).
MAX_DOCUMENT = 64 * 1024 * 1024
#: Largest worker stream aggregated into one document, in bytes read (the lane's absorbed text
#: is held to `MAX_DOCUMENT`): most of a stream's bytes are each event's envelope, not held.
MAX_STREAM_BYTES = 4 * MAX_DOCUMENT
#: What one piece of absorbed text holds beyond its characters (a str object and its slot in
#: the list of pieces): the fast lane's `absorbed` counts both, so a stream of tiny deltas
#: is bounded by what it really holds.
PIECE_COST = 64

class BadRequest(Exception):
    """The client's request body cannot be adapted (malformed JSON): answered 400, never forwarded."""


class StreamProtocolError(Exception):
    """The worker's stream or document is not what the dialect can read (not JSON, wrong shape)."""


@dataclass(slots=True)
class RequestPlan:
    """What the dialect read from the client's request, and the body to send the worker."""

    request_id: str
    client_stream: bool
    include_usage: bool  # the client asked to see usage in its stream
    request_model: str | None
    body: bytes  # what to forward to the worker
    asked_stream: bool  # what the worker was asked for
    created: int = 0  # the request's arrival (epoch seconds), for synthesized ids

    def __post_init__(self) -> None:
        if not self.created:
            self.created = int(time.time())


class Outcome:
    """What a translator knows when the worker's response ends: usage, model, cost."""

    usage: Usage
    model: str | None
    cost: Decimal | None
    worker_error: bool  # the worker reported an error inside a 2xx body


class StreamTranslator(Outcome, ABC):
    """Reads a worker's SSE events one at a time, for a streaming or an aggregating client.

    In relay mode `feed` returns the bytes to write to the client for this event
    (the event's own raw bytes whenever nothing changes), or None to hide it.
    In aggregate mode `feed` returns None and `document()` builds the client's
    one JSON document at the end.
    """

    complete: bool  # the worker sent its success terminator (or finish)
    plan: RequestPlan
    pricing: Pricing
    content_events: int  # content-bearing deltas seen, for usage estimates
    cost_of: CostFunction = staticmethod(openai_cost)

    @property
    def ended(self) -> bool:
        """The worker sent its stream's last event (`[DONE]`, `message_stop`, a terminal
        response event) or its own error: nothing after it belongs to the stream (none of
        it reaches the client: never a success terminator after an error), so a break after
        it (in the body's framing, the connection, a silence) takes nothing from the client."""
        return self.complete or self.worker_error

    def __init__(self, plan: RequestPlan, pricing: Pricing, aggregate: bool) -> None:
        self.plan = plan
        self.pricing = pricing
        self.aggregate = aggregate
        self.usage = Usage()
        self.model: str | None = None
        self.cost: Decimal | None = None
        self.worker_error = False
        self.complete = False
        self.content_events = 0
        self.absorbed = 0  # what `absorbed_text` holds: characters + PIECE_COST per piece
        self._settled: tuple[Any, ...] | None = None  # what the current cost was worked out for
        # Kept current by dialects that have one (see sidecar.fastlane): while set, an
        # event made of this template with a JSON string in its place passes unchanged
        # (relaying) or has its string appended (aggregating), and counts as content when
        # the string is not empty, so a handler may take such an event without parsing it
        # and count it in `content_events` (relaying) or hand it to `absorbed_text`.
        self.text_template: TextTemplate | None = None

    def settle(self) -> None:
        """The stream ended, whichever way: estimate usage if none was reported, and price it.

        Called at the usage chunk, at the terminator and when the request is accounted;
        the price is worked out again only when the usage or the model changed.
        """
        usage = self.usage
        if not usage.seen and self.content_events:
            usage = self.usage = estimated_usage(self.content_events)
        model = self.model or self.plan.request_model
        key = (
            model,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
            usage.reasoning_tokens,
            usage.cache_write_tokens,
            usage.input_tokens_uncached,
            usage.estimated,
        )
        if key == self._settled:
            return
        self._settled = key
        self.cost = price_usage(self.pricing, model, usage, self.cost_of)

    def absorbed_text(self, text: str) -> bool:
        """Aggregating: an event of `text_template` with `text` in its string's place came,
        unparsed; absorb it as `feed` would have, add what it holds to `absorbed`, and say
        whether the lane may go on (False: what was absorbed passed `MAX_DOCUMENT`, the
        next read must go the general way, where the aggregation's bound is checked).
        Dialects that keep a template while aggregating implement it."""
        raise NotImplementedError

    @abstractmethod
    def feed(self, event: Event) -> bytes | None: ...

    @abstractmethod
    def document(self) -> bytes:
        """Aggregate mode: the merged JSON document (usage and cost included)."""

    @abstractmethod
    def error_frame(self, failure: Failure, message: str) -> bytes:
        """The synthetic SSE error event that ends a failed stream."""


class DocumentTranslator(Outcome, ABC):
    """A worker's one JSON document, for a non-streaming client (JSON) or a streaming one (SSE)."""

    @property
    def ended(self) -> bool:
        """The worker's document was read whole (a translator exists only for one)."""
        return True

    @abstractmethod
    def json(self) -> bytes:
        """The document as the client gets it, with `usage.cost` injected."""

    @abstractmethod
    def sse(self) -> bytes:
        """The document as a complete SSE stream (JSON -> SSE), terminator included."""


class Dialect(ABC):
    """One API shape: how to adapt its requests and translate its responses."""

    name: str
    reads_body: bool = True  # False: bytes pass through untouched (no JSON, no usage)

    @abstractmethod
    def plan(self, body: bytes, upstream_stream: str, request_id: str) -> RequestPlan:
        """Read the client's JSON body and decide what the worker is asked; raises BadRequest."""

    @abstractmethod
    def stream(self, plan: RequestPlan, pricing: Pricing, aggregate: bool) -> StreamTranslator:
        """A translator for one worker SSE response."""

    @abstractmethod
    def document(self, plan: RequestPlan, pricing: Pricing, body: bytes) -> DocumentTranslator:
        """A translator for one worker JSON response; raises StreamProtocolError if unreadable."""

    @abstractmethod
    def error_body(self, status: int, code: str, message: str) -> bytes:
        """The JSON error body for failures before the response head."""

    def error_frame(self, plan: RequestPlan, failure: Failure, message: str) -> bytes:
        """The synthetic error event for a stream that fails before any worker event was read."""
        return self.stream(plan, Pricing(), aggregate=False).error_frame(failure, message)
