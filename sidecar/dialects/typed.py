"""What the typed-event dialects share: streams whose events are named by their data's `type`.

Pure: no sockets, no asyncio. Anthropic Messages and OpenAI Responses both write
typed events (`event:` line = the data's `type`, SPEC's "other dialects"): the
reading around one event is the same for both and lives here, so a dialect says
only what one event of its own means (`TypedEventStream.read`).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from sidecar.config import Pricing
from sidecar.dialects.base import RequestPlan, StreamTranslator
from sidecar.dialects.jsonio import dumps_event_data, read_event
from sidecar.sse import Event, encode_event, undispatched_lines


def named_event(obj: dict[str, Any], kind: str, id: str | None = None) -> bytes:
    """One event written by the sidecar: `event: <type>`, the worker's `id:` when it is a
    worker's event re-encoded, and the JSON data."""
    return encode_event(dumps_event_data(obj), event=kind, id=id)


def event_type(obj: dict[str, Any], event: Event) -> tuple[str | None, bool]:
    """A typed event's `type`, taken from its `event:` line when the data lacks it (and then
    written into the data); None when neither names it. The flag says the type was written
    into the data: a relayed event must then be re-encoded (SDKs read the data's `type`).

    A worker's own error is `error` whatever its data says: an `event: error` line (llama.cpp
    writes `{"type": "server_error", ...}` under it), or unnamed data with an `error` object
    and no type (llama.cpp's Responses failure)."""
    kind = obj.get("type")
    if event.event == "error" or (kind is None and not event.event and "error" in obj):
        return "error", False
    if isinstance(kind, str):
        return kind, False
    if not event.event:
        return None, False
    obj["type"] = event.event
    return event.event, True


class TypedEventStream(StreamTranslator):
    """A worker stream of typed events, relayed event by event or aggregated.

    Comments pass unchanged (relaying); an event that nothing names (no `type` in its data,
    no `event:` line) is dropped, but for its `id:`, `retry:` and comment lines; events
    after the stream's terminal event are
    dropped, and after the worker's error all but its further failure events
    (`failure_events`: they say the same failure, and may carry its usage); each
    event's type is read (or written
    into its data from its `event:` line); a worker `error` event is kept for the
    outcome; a relayed event is re-encoded, with an `event:` line equal to its type,
    only when it changed, was not named, or its data lacked the type its name gave, else
    its own bytes go out.
    """

    #: event types that report the worker's failure (its error, a failed terminal event)
    failure_events: frozenset[str] = frozenset({"error"})

    def __init__(self, plan: RequestPlan, pricing: Pricing, aggregate: bool) -> None:
        super().__init__(plan, pricing, aggregate)
        self._error_obj: dict[str, Any] | None = None  # the worker's own error event

    def feed(self, event: Event) -> bytes | None:
        data = event.data
        if data is None:  # comments pass
            return None if self.aggregate else (event.raw or None)
        if self.complete:  # nothing after the terminal event
            return None
        obj = read_event(data)
        kind, typed_here = event_type(obj, event)
        if self.worker_error and kind not in self.failure_events:
            return None  # after the worker's error, never a success (nor more of the stream)
        if kind is None:
            # nothing names it (no `type`, no `event:` line): no event of the dialect, and
            # passed on it would be an event not named by its type; dropped as a block with
            # no data is, its `id:`, `retry:` and comment lines kept for the next event
            return None if self.aggregate else (undispatched_lines(event.raw) or None)
        changed = self.read(kind, obj)
        if kind == "error":  # the worker's own error: forwarded as it is, named if it was not
            self.worker_error = True
            self._error_obj = obj
        if self.aggregate:
            return None
        if changed or typed_here or event.event != kind:
            return named_event(obj, kind, event.id)
        return event.raw

    @abstractmethod
    def read(self, kind: str, obj: dict[str, Any]) -> bool:
        """Take one event of type `kind` in; True when `obj` was changed in place (cost
        injected, a sequence number written) and must be re-encoded."""
