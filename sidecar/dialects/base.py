"""The small interface every dialect implements, and the types it speaks in.

Pure: no sockets, no asyncio. The exchange drives a dialect through exactly
these methods and never tests a dialect's name, so a new API shape (Anthropic
Messages, OpenAI Responses, ...) is one new module implementing `Dialect`,
`StreamTranslator` and `DocumentTranslator`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import orjson

from sidecar.config import Price, Pricing
from sidecar.dialects.jsonio import BadRequest, encode_request, read_request
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


def client_stream_flag(request: dict[str, Any]) -> bool:
    """Whether the client asked to stream: `stream` true; false, null or absent say no.
    Anything else is a BadRequest, not a guess (a worker may read `"true"` as true)."""
    flag = request.get("stream")
    if flag is None or flag is False:
        return False
    if flag is True:
        return True
    raise BadRequest("`stream` must be a boolean")


def stream_flag_plan(
    body: bytes, upstream_stream: str, request_id: str, streaming_only: tuple[str, ...] = ()
) -> RequestPlan:
    """The plan of a dialect whose streams always carry usage: only `stream` is set.

    The body is forwarded byte for byte when its `stream` already says what the worker
    is asked (a missing `stream` says false, but on a `never` route the worker is told
    `stream: false` in so many words); keys in `streaming_only` are dropped when the worker
    is asked not to stream, also from a body whose `stream` already says false.
    """
    request = read_request(body)
    client_stream = client_stream_flag(request)
    asked = stream_asked(upstream_stream, client_stream)
    if request.get("stream", None if upstream_stream == "never" else False) is not asked or (
        not asked and any(key in request for key in streaming_only)
    ):
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


def stream_asked(upstream_stream: str, client_stream: bool) -> bool:
    """Whether the worker is asked to stream, per the route's `upstream_stream`."""
    return {"auto": client_stream, "always": True, "never": False}[upstream_stream]


def openai_error_body(status: int, code: str, message: str) -> bytes:
    """The OpenAI-shaped error body `{"error": {"message", "type", "code"}}`."""
    return orjson.dumps({"error": {"message": message, "type": error_type_for(status), "code": code}})


#: Largest JSON document the sidecar holds whole: a worker's document it translates, or the
#: one it aggregates from a worker's stream (bytes read, or what the text absorbed holds).
MAX_DOCUMENT: Final = 64 * 1024 * 1024
#: Largest worker stream aggregated into one document, in bytes read (the lane's absorbed text
#: is held to `MAX_DOCUMENT`): most of a stream's bytes are each event's envelope, not held.
MAX_STREAM_BYTES: Final = 4 * MAX_DOCUMENT
#: What one piece of absorbed text holds beyond its characters (a str object and its slot in
#: the list of pieces): the fast lane's `absorbed` counts both, so a stream of tiny deltas
#: is bounded by what it really holds.
PIECE_COST: Final = 64

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

    @property
    def stated_cost(self) -> Decimal | None:
        """The cost the client is told (`usage.cost`, `x-sidecar-cost`): None for an estimate
        (the worker reported no usage), which only the ledger and metrics price."""
        return None if self.usage.estimated else self.cost


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
        # Set by a relaying handler that calls `learn_now` after each write: an event's
        # template is then learnt once its bytes are out (the client's first event sooner),
        # not before `feed` returns (dialects with a template only)
        self.defer_learning = False

    def learn_now(self) -> None:
        """Learn the template a `feed` left to learn (see `defer_learning`); nothing when
        none is pending. Must be called before the next read is matched against it."""

    def settle(self) -> None:
        """The stream ended, whichever way: estimate usage if none was reported, and price it.

        Called at the usage chunk, at the terminator and when the request is accounted;
        the price is worked out again only when the usage or the model changed.
        """
        usage = self.usage
        if (usage.estimated or not usage.seen) and self.content_events:
            # (an estimate made at an earlier final chunk counts the deltas since, too)
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
