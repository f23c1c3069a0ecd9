"""What to do with a worker's response body: the handlers the response pump feeds.

I/O shell, but no sockets of its own: a handler writes through its exchange.
`read_answer_handler` makes the one a successful answer's content type calls for, or
a `SniffHandler` that decides SSE or JSON from its first byte and steps aside;
`RelayHandler` (SSE -> SSE, event by event), `AggregateHandler`
(SSE -> one JSON document), `DocumentHandler` (JSON -> JSON or SSE) and
`RawHandler` (bytes untouched) do the work, each asking the route's dialect
and never testing its name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from sidecar.chunked import LONGEST_PAYLOAD, frame
from sidecar.dialects.base import (
    MAX_DOCUMENT,
    MAX_STREAM_BYTES,
    DocumentTranslator,
    StreamTranslator,
)
from sidecar.dialects.jsonio import StreamProtocolError
from sidecar.failures import Failure
from sidecar.fastlane import TextTemplate, template_chunks
from sidecar.framing import keep_body_piece
from sidecar.headers import Header, header_value, without
from sidecar.sse import (
    BOM,
    Event,
    SSEParser,
    SSEProtocolError,
    encode_comment,
    undispatched_lines,
    without_bom,
)
from sidecar.usage import cost_header_value

if TYPE_CHECKING:
    from sidecar.exchange import Exchange
    from sidecar.pump import ResponsePump

_SSE_FIRST_BYTES: Final = frozenset(b"deir:")

#: The heartbeat a silent worker's event stream gets: a comment block, `: keep-alive` and a
#: blank line (clients ignore it) ...
HEARTBEAT: Final = encode_comment("keep-alive")
#: ... except once an event set a last event ID (`id:`): from then on the openai SDK (and
#: httpx-sse) dispatch every blank line as an event, and one with empty data is JSON the SDK
#: fails to parse. There the heartbeat is the comment line alone, still between two events.
HEARTBEAT_LINE: Final = HEARTBEAT[:-1]
#: the bytes that end a line (an output starting with one starts with a blank line)
_LINE_ENDS: Final = (10, 13)


def _sets_id(data: bytes | bytearray) -> bool:
    """Whether `data` may hold an `id:` line (a false positive only costs a blank line)."""
    return b"\nid:" in data or b"\rid:" in data


def body_kind(content_type: bytes | None) -> str | None:
    """"sse", "json", or None when the first byte must decide."""
    if content_type is None:
        return None
    media = content_type.split(b";", 1)[0].strip().lower()
    if media == b"text/event-stream":
        return "sse"
    if media == b"application/json" or media.endswith(b"+json"):
        return "json"
    return None


def cost_header(source: StreamTranslator | DocumentTranslator) -> list[Header]:
    """`x-sidecar-cost` for a whole answer: the cost its body carries as `usage.cost` (none
    for an estimate: see `Outcome.stated_cost`)."""
    cost = source.stated_cost
    if cost is None:
        return []
    return [(b"x-sidecar-cost", cost_header_value(cost).encode())]


class BodyHandler:
    """What to do with a worker's response body; the pump calls these synchronously."""

    #: True for handlers that can take whole chunks of a chunked body at once, bypassing
    #: the decoder (`whole_chunks`; the pump calls it only between chunks). A flag, not a
    #: bound method kept on the handler, which would make a cycle only the collector frees.
    lane: bool = False
    #: With a lane: where a chunk of the template goes as it came (the client's chunked
    #: body), or None when its string is handed to the translator's `absorbed_text`.
    lane_write: Callable[[bytes], object] | None = None
    #: With a lane: the translator that counts (or absorbs) what the lane takes.
    lane_sink: StreamTranslator | None = None

    @property
    def lane_template(self) -> TextTemplate | None:
        """What the lane matches chunks against right now, or None: no lane, no template
        yet, or the parser holds part of an event (see `ResponsePump.arm_lane`)."""
        return None

    def whole_chunks(self, data: bytes) -> int:
        """With `lane`: how many bytes of whole chunks at the start of `data` it dealt with
        (0: none; the rest goes the general way)."""
        return 0

    def bind(self, pump: ResponsePump) -> None:
        """Called once by the pump that feeds this handler."""

    def head_out(self) -> None:
        """Write the response head now if it is still held (see `RelayHandler`): the pump
        calls it once it has fed what arrived with the worker's head."""

    def data(self, chunk: bytes | bytearray) -> None:
        raise NotImplementedError

    def end(self, at_close: bool = False) -> bool:
        """The body ended cleanly; return False if that end is itself a failure (incomplete).

        `at_close`: the body was framed by the connection's close, where nothing tells a
        clean end from a crash: an event stream has then ended only after its last event."""
        raise NotImplementedError

    def fail(self, failure: Failure, message: str) -> None:
        raise NotImplementedError

    @property
    def wants_heartbeat(self) -> bool:
        return False

    @property
    def heartbeat(self) -> bytes:
        """The comment to write now, when `wants_heartbeat`."""
        return HEARTBEAT

    @property
    def stream_ended(self) -> bool:
        """The worker's event stream sent its last event; what breaks after it (the body's
        framing, the connection, a silence) is not the stream's failure (see `end`)."""
        return False

    @property
    def framing_broken(self) -> bool:
        """What is held of an unfinished event already breaks SSE framing (asked only when
        the response failed or ended without its terminator, never per read)."""
        return False


#: How an SSE stream ends when its last line is blank (two line ends in a row: LF, CR or
#: CRLF each): between events, where a comment line can go.
_BETWEEN_EVENTS: Final = (b"\n\n", b"\r\r", b"\n\r", b"\n\r\n", b"\r\r\n")


class RawHandler(BodyHandler):
    """Forward the worker's status, headers and body bytes untouched (passthrough, worker errors).

    A successful event stream whose length the client is not told gets the route's
    heartbeat comments while the worker is silent, only ever between two events.
    """

    def __init__(
        self, exchange: Exchange, status: int, headers: list[Header], raw_headers: list[Header]
    ) -> None:
        self.ex = exchange
        length = header_value(raw_headers, b"content-length")
        # with Transfer-Encoding too, the body is chunked and the length meaningless: a proxy
        # must not forward it (RFC 9112 6.3)
        if header_value(raw_headers, b"transfer-encoding") is not None:
            length = None
        if length is not None and status != 204:  # RFC 9110 8.6: a 204 has no Content-Length
            headers = [*headers, (b"content-length", length)]
        #: body bytes still to come while the client is told the body's length (none after a
        #: HEAD, a 204 or a 304): the request is accounted (ledger line, metrics) before the
        #: write that completes its answer, as a chunked answer is before its last chunk
        self.left: int | None = None
        if exchange.method == "HEAD" or status in (204, 304):
            self.left = 0
        elif length is not None:
            self.left = int(length)
        event_stream = (
            200 <= status < 300
            and exchange.method != "HEAD"
            and body_kind(header_value(raw_headers, b"content-type")) == "sse"
        )
        unframed_stream = event_stream and header_value(headers, b"content-length") is None
        route = exchange.route
        #: the last bytes passed on, while they can tell whether a heartbeat fits: None when
        #: one never does (no heartbeat on the route, not a successful event stream, or a
        #: length-framed body), and then nothing is kept per read
        self.tail: bytes | None = (
            b"\n\n" if unframed_stream and route is not None and route.heartbeat is not None
            else None
        )
        #: an `id:` line went by (looked for only while `tail` is kept)
        self.ids = False
        #: an event stream's first bytes, while they may still be a byte-order mark: it is
        #: dropped (SPEC: never written), unless the length the client is told counts it
        self.lead: bytes | None = b"" if unframed_stream else None
        if event_stream:
            exchange.stream_opened()
        #: the head is the whole answer: it was ended (and accounted) with it
        self.whole_at_head = self.left == 0
        exchange.start_response(status, headers, b"" if self.whole_at_head else None)

    def data(self, chunk: bytes | bytearray) -> None:
        if self.lead is not None:
            self.lead, chunk = without_bom(self.lead, chunk)
            if not chunk:
                return
        if self.tail is not None:
            if not self.ids and (_sets_id(chunk) or _sets_id(self.tail + chunk[:3])):
                self.ids = True
            self.tail = (self.tail + chunk[-3:])[-3:]
        if self.left is not None:
            self.left -= len(chunk)
            if self.left <= 0:  # these bytes complete the answer the client was told
                self.ex.account()
        self.ex.write_data(chunk)

    @property
    def wants_heartbeat(self) -> bool:
        return self.tail is not None and not self.lead and self.tail.endswith(_BETWEEN_EVENTS)

    @property
    def heartbeat(self) -> bytes:
        return HEARTBEAT_LINE if self.ids else HEARTBEAT

    def end(self, at_close: bool = False) -> bool:
        if self.whole_at_head:
            return True
        if self.lead:  # a body shorter than a byte-order mark, and the start of one
            self.ex.write_data(self.lead)
        self.ex.end_response()
        return True

    def fail(self, failure: Failure, message: str) -> None:
        # nothing to say in a raw body: break the client's framing so it sees the failure
        self.ex.close_after = True
        self.ex.client.abort()


def read_answer_handler(exchange: Exchange, headers: list[Header], kind: str | None) -> BodyHandler:
    """The handler of a successful answer the dialect reads: the one its content type's
    `kind` ("sse" or "json") calls for, made now, or with no kind a `SniffHandler`, which
    lets the body's first byte decide (a SniffHandler made with a kind would only hand its
    chosen handler to the pump, an object per answer for nothing)."""
    if kind is None:
        return SniffHandler(exchange, headers, None)
    return chosen_handler(exchange, headers, kind)


def chosen_handler(ex: Exchange, headers: list[Header], kind: str) -> BodyHandler:
    """The handler for a successful answer of this `kind`, "sse" or "json"."""
    plan = ex.plan
    assert plan is not None
    ex.upstream_sse = kind == "sse"
    if kind != "sse":
        return DocumentHandler(ex, headers)
    if plan.client_stream and ex.premade is not None:  # made while the worker worked
        translator, parser = ex.premade
        ex.premade = None
    else:
        config = ex.generation.config
        translator = ex.dialect.stream(plan, config.pricing, aggregate=not plan.client_stream)
        # strict: garbage in the stream (an HTML error page, binary junk) breaks SSE
        # framing (upstream_protocol_error), it is not ignored and passed through
        parser = SSEParser(config.limits.max_event_size, strict=True)
    ex.outcome_source = translator
    if plan.client_stream:
        return RelayHandler(ex, headers, translator, parser)
    return AggregateHandler(ex, translator, parser)


class SniffHandler(BodyHandler):
    """Decides SSE or JSON (content type, else first non-blank byte), then delegates."""

    def __init__(self, exchange: Exchange, headers: list[Header], kind: str | None) -> None:
        self.ex = exchange
        self.headers = headers
        self.inner: BodyHandler | None = None
        self.pump: ResponsePump | None = None
        self.held = b""
        if kind is not None:
            self._choose(kind)

    def bind(self, pump: ResponsePump) -> None:
        self.pump = pump
        if self.inner is not None:
            pump.handler = self.inner

    def _choose(self, kind: str) -> None:
        self.inner = chosen_handler(self.ex, self.headers, kind)
        if self.pump is not None:  # from now on the pump feeds the chosen handler directly
            self.pump.handler = self.inner

    def data(self, chunk: bytes | bytearray) -> None:
        if self.inner is None:
            chunk = self.held + chunk
            stripped = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")
            if not stripped:
                # blanks only, so far: the last few are held (a CR whose LF may follow), and
                # a byte-order mark that starts them whole (never cut: the rest of one is
                # no BOM, and no JSON or SSE either)
                bom = BOM if chunk.startswith(BOM) else b""
                self.held = bom + chunk[len(bom) :][-8:]
                return
            first = stripped[0]
            if first == ord("{"):
                self._choose("json")
            elif first in _SSE_FIRST_BYTES:
                self._choose("sse")
            else:
                raise StreamProtocolError("the worker's body is neither SSE nor JSON")
        assert self.inner is not None
        self.inner.data(chunk)

    def end(self, at_close: bool = False) -> bool:
        if self.inner is None:
            return False
        return self.inner.end(at_close)

    def fail(self, failure: Failure, message: str) -> None:
        if self.inner is None:
            self.ex.respond_error(failure.status, failure.code, message, failure.outcome)
        else:
            self.inner.fail(failure, message)

    @property
    def wants_heartbeat(self) -> bool:
        return self.inner is not None and self.inner.wants_heartbeat

    @property
    def heartbeat(self) -> bytes:
        return HEARTBEAT if self.inner is None else self.inner.heartbeat


class EventHandler(BodyHandler):
    """An SSE body read event by event by a stream translator, with the fast lane
    (sidecar.fastlane) for the chunks of the translator's text template."""

    def __init__(self, exchange: Exchange, translator: StreamTranslator, parser: SSEParser) -> None:
        self.ex = exchange
        self.translator = translator
        self.lane_sink = translator
        self.parser = parser

    @property
    def stream_ended(self) -> bool:
        return self.translator.ended

    @property
    def framing_broken(self) -> bool:
        return self.parser.pending_garbage()

    def whole(self, at_close: bool) -> bool:
        """Whether the stream ended as a stream may end (see `BodyHandler.end`): the
        worker's own error, or its success terminator (or finish), or at a close its last
        event."""
        translator = self.translator
        return translator.worker_error or (translator.ended if at_close else translator.complete)

    @property
    def lane_template(self) -> TextTemplate | None:
        if not self.lane or self.parser.busy:
            return None
        translator = self.translator
        if translator.absorbed > MAX_DOCUMENT:
            return None  # an aggregation past its bound: the general way refuses it
        return translator.text_template

    @property
    def lane_fits(self) -> bool:
        """Whether every chunk the lane could take is an event the parser would take too:
        not with a `max_event_size` below the longest payload the lane knows (it would
        pass events the parser refuses)."""
        return self.parser.max_event_size >= LONGEST_PAYLOAD

    def whole_chunks(self, data: bytes) -> int:
        """The lane: chunks carrying one event of the translator's text template each go to
        the client as they came (`lane_write`), or have their strings appended as the
        translator would append them (no `lane_write`), without decoding, parsing or
        building events. Returns how many bytes at the start of `data` it took (0: none)."""
        template = self.lane_template
        if template is None:
            return 0
        texts, taken = template_chunks(data, template)
        if taken:
            write = self.lane_write
            if write is None:
                for text in texts:
                    self.translator.absorbed_text(text)
            else:
                self.translator.content_events += len(texts) - texts.count("")
                write(data[:taken] if taken < len(data) else data)
        return taken


class RelayHandler(EventHandler):
    """SSE worker -> SSE client, event by event; only changed events are re-encoded."""

    def __init__(
        self,
        exchange: Exchange,
        headers: list[Header],
        translator: StreamTranslator,
        parser: SSEParser,
    ) -> None:
        super().__init__(exchange, translator, parser)
        #: the client's last event ID (WHATWG): the last `id:` of an event passed on
        self.last_id = ""
        #: the last byte the client got is a CR: an LF now is the rest of its line end
        self.after_cr = False
        # Made before the pump starts, the head is held: the events that came with the
        # worker's head go out in the same write as it (`_write_first`); else it is written
        # when the pump is done with them (`head_out`). Made later (sniffed), it goes now.
        translator.defer_learning = True  # see data
        self.head = exchange.start_event_stream(headers, hold=exchange.pump is None)
        self.write = self.body_write = exchange.body_writer()
        # when the client's body is chunked too, a chunk passed unchanged is written as it came
        write_framed = self.framed_write = exchange.framed_writer()
        if write_framed is not None:
            self.lane_write = write_framed
            self.lane = self.lane_fits
        if self.head is not None:
            # until the head is out, the writers put it first (then they are the plain ones
            # again: nothing is checked per event)
            self.write = self._write_first
            if write_framed is not None:
                self.lane_write = self._framed_first

    def head_out(self) -> None:
        head = self.head
        if head is not None:
            self._release()
            self.ex.client.write(head)

    def _release(self) -> None:
        """The head is out (or going out in this write): the plain writers from now on."""
        self.head = None
        self.write = self.body_write
        if self.framed_write is not None:
            self.lane_write = self.framed_write

    def _write_first(self, data: bytes) -> None:
        """The body's first write while the head is held: both in one write."""
        head = self.head
        assert head is not None
        self._release()
        write_framed = self.framed_write
        if write_framed is not None:
            write_framed(head + frame(data))
        else:
            self.ex.client.write(head)
            self.write(data)

    def _framed_first(self, data: bytes) -> None:
        """The lane's first write (chunks as they came) while the head is held."""
        head = self.head
        assert head is not None and self.framed_write is not None
        self._release()
        self.framed_write(head + data)

    def data(self, chunk: bytes | bytearray) -> None:
        try:
            events = self.parser.feed(chunk)
        except SSEProtocolError as exc:
            self._relay(exc.events)
            raise StreamProtocolError(str(exc)) from None
        translator = self.translator
        if len(events) == 1:
            event = events[0]
            out = translator.feed(event)
            if out and (out[0] in _LINE_ENDS or event.data is None):
                out = self._harmless(event, out)
            if out:
                self.write(out)
                self.after_cr = out[-1] == 13
                if event.id is not None:
                    self.last_id = event.id
            translator.learn_now()  # the template, once the event is out (defer_learning)
            return
        self._relay(events)
        translator.learn_now()

    def _relay(self, events: list[Event]) -> None:
        """Translate events and write the result at once; events before a bad one still go out."""
        feed = self.translator.feed
        pieces: list[bytes] = []
        try:
            for event in events:
                out = feed(event)
                if out and (out[0] in _LINE_ENDS or event.data is None):
                    out = self._harmless(event, out)
                if out:
                    pieces.append(out)
                    self.after_cr = out[-1] == 13
                    if event.id is not None:
                        self.last_id = event.id
        finally:
            if pieces:
                self.write(b"".join(pieces))

    def _harmless(self, event: Event, out: bytes) -> bytes:
        """`out` without the blank lines a client would read as the end of an event of its
        own: after an `id:` the openai SDK and httpx-sse dispatch an event with empty data
        on every blank line (the SDK then fails), which WHATWG never dispatches.

        The line ends `out` starts with go: the worker's stray blank lines (a block of its
        own each), or the LF half of a CRLF split across reads (the start of the next
        block's bytes); kept is an LF right after the CR the client got last, which only
        ends that line. And once the client has a last event ID, a block of comments alone
        (the worker's own keep-alive) goes without its blank line, as sidecar's heartbeat
        does then. A block with no `data` that is not only comments (`event: x` alone, an
        `id:` or a `retry:` alone) is dispatched by those clients with empty data whether or
        not an id came before: it goes as `undispatched_lines`."""
        if out is event.raw and event.data is None:
            if not event.comment_only:
                out = undispatched_lines(out)
                if not out:
                    return out
            elif self.last_id:
                out = out[:-2] if out.endswith(b"\r\n") else out[:-1]
        if out[0] in _LINE_ENDS:
            keep = 1 if self.after_cr and out[0] == 10 else 0
            out = out[:keep] + out[keep:].lstrip(b"\r\n")
        return out

    def end(self, at_close: bool = False) -> bool:
        translator = self.translator
        if not self.whole(at_close):
            return False
        if translator.worker_error:
            self.ex.outcome = "upstream_error"
        tail = self.parser.pending
        if tail and self.after_cr and not tail.strip(b"\r\n"):
            # the LF of a CRLF split across reads, whose CR the client got: forward it,
            # byte-exact (after a CR the client did not get, it would be a blank line)
            self.write(tail)
        self.head_out()
        self.ex.end_response()
        return True

    def fail(self, failure: Failure, message: str) -> None:
        self.head_out()
        self.ex.write_data(self.translator.error_frame(failure, message))
        self.ex.end_response()

    @property
    def wants_heartbeat(self) -> bool:
        return not self.translator.ended  # nothing after [DONE]

    @property
    def heartbeat(self) -> bytes:
        self.after_cr = False  # (what is asked for is written: the client's last byte is LF)
        return HEARTBEAT_LINE if self.last_id else HEARTBEAT


class AggregateHandler(EventHandler):
    """SSE worker -> one JSON document for a non-streaming client, sent when the stream is done."""

    def __init__(self, exchange: Exchange, translator: StreamTranslator, parser: SSEParser) -> None:
        super().__init__(exchange, translator, parser)
        self.lane = self.lane_fits
        self.size = 0  # body bytes read the general way (the lane's text is `absorbed`)

    def data(self, chunk: bytes | bytearray) -> None:
        self.size += len(chunk)
        # what is held is the text, not each event's envelope: the stream's bytes get four
        # times the document's bound (a 560k-token stream of 76 MiB folds into 1 MiB)
        if self.size > MAX_STREAM_BYTES or self.translator.absorbed > MAX_DOCUMENT:
            raise StreamProtocolError("the worker's stream is too large to aggregate")
        feed = self.translator.feed
        try:
            events = self.parser.feed(chunk)
        except SSEProtocolError as exc:
            for event in exc.events:  # read as when they come before the bad one's read
                feed(event)
            raise StreamProtocolError(str(exc)) from None
        for event in events:
            feed(event)

    def end(self, at_close: bool = False) -> bool:
        translator = self.translator
        if not self.whole(at_close):
            return False
        body = translator.document()
        headers: list[Header] = [(b"content-type", b"application/json")]
        if translator.worker_error:
            self.ex.outcome = "upstream_error"
            self.ex.respond(502, headers, body)
            return True
        self.ex.respond(200, [*headers, *cost_header(translator)], body)
        return True

    def fail(self, failure: Failure, message: str) -> None:
        self.ex.respond_error(failure.status, failure.code, message, failure.outcome)


class DocumentHandler(BodyHandler):
    """JSON worker -> JSON (cost injected) or a synthesized SSE stream (JSON -> SSE)."""

    def __init__(self, exchange: Exchange, headers: list[Header]) -> None:
        self.ex = exchange
        self.parts: list[bytes | bytearray] = []  # see keep_body_piece
        self.size = 0
        assert exchange.plan is not None
        self.client_stream = exchange.plan.client_stream
        self.headers = headers
        if self.client_stream:
            exchange.start_event_stream(headers)

    def data(self, chunk: bytes | bytearray) -> None:
        self.size += len(chunk)
        if self.size > MAX_DOCUMENT:
            raise StreamProtocolError("the worker's JSON document is too large")
        keep_body_piece(self.parts, chunk)

    def end(self, at_close: bool = False) -> bool:
        ex = self.ex
        assert ex.plan is not None
        document = b"".join(self.parts)
        self.parts = []  # held once, not twice, while it is translated
        if document.startswith(BOM):  # dropped, as from an event stream
            document = document[len(BOM) :]
        translator = ex.dialect.document(ex.plan, ex.generation.config.pricing, document)
        del document  # parsed: not held as well while the answer is made and written
        ex.outcome_source = translator
        if translator.worker_error:
            ex.outcome = "upstream_error"
        if self.client_stream:
            ex.write_data(translator.sse())
            ex.end_response()
            return True
        headers = [
            *without(self.headers, b"content-type"),
            (b"content-type", b"application/json"),
        ]
        if translator.worker_error:  # an error object carries no cost (as an aggregated one)
            ex.respond(502, headers, translator.json())
        else:
            ex.respond(200, [*headers, *cost_header(translator)], translator.json())
        return True

    def fail(self, failure: Failure, message: str) -> None:
        ex = self.ex
        if self.client_stream:
            assert ex.plan is not None
            ex.write_data(ex.dialect.error_frame(ex.plan, failure, message))
            ex.end_response()
        else:
            ex.respond_error(failure.status, failure.code, message, failure.outcome)

    @property
    def wants_heartbeat(self) -> bool:
        return self.client_stream
