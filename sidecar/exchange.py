"""One request from head to ledger line: the only place where client and worker meet.

I/O shell. `serve_connection` runs the request cycles of one client
connection; an `Exchange` reads one request, asks its route's dialect what
to send, sends it to the worker (once more on a fresh connection if a pooled
one turns out dead), picks a body handler (`handlers.py`) from the route and
the worker's actual response, and lets a `ResponsePump` (`pump.py`) move the
body. What a failure means comes from `sidecar.failures`; the ledger line,
metrics and access log are written once, when the request ends.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, cast

import h11

from sidecar import failures
from sidecar.chunked import SIZE_LINES, frame
from sidecar.dialects import get_dialect
from sidecar.dialects.base import Dialect, DocumentTranslator, RequestPlan, StreamTranslator
from sidecar.dialects.jsonio import BadRequest
from sidecar.failures import Failure, UpstreamFailure
from sidecar.framing import body_decoder, head_size, keep_body_piece
from sidecar.handlers import BodyHandler, RawHandler, body_kind, read_answer_handler
from sidecar.headers import (
    H11_RESPONSE_HEADERS,
    Header,
    check_and_read_request_head,
    connection_tokens,
    content_codings,
    data_event,
    end_to_end,
    end_to_end_lines,
    h11_headers,
    has_control_byte,
    header_list,
    header_value,
    raw_method_and_path,
    raw_request_id,
    request_event,
    request_id_for,
    response_event,
    simple_response,
    splice_lines,
    split_for_h11,
    without,
)
from sidecar.ledger import LedgerRecord, utc_timestamp
from sidecar.logs import access_enabled, log_access, round_ms
from sidecar.pump import ResponsePump
from sidecar.routes import match_route
from sidecar.server import (
    ClientConnection,
    ClientGone,
    ClientTimeout,
    MalformedHead,
    StreamListener,
    TooLarge,
)
from sidecar.sse import SSEParser
from sidecar.upstream import UpstreamConnection, UpstreamPool
from sidecar.usage import Usage, cost_header_value

if TYPE_CHECKING:
    from sidecar.config import RouteConfig
    from sidecar.runtime import Generation

log = logging.getLogger("sidecar.exchange")



#: h11 events are immutable: one end-of-message serves every request
END_OF_MESSAGE: Final = h11.EndOfMessage()
#: h11 states of a client whose request was read to its end
_REQUEST_READ: Final = (h11.DONE, h11.MIGHT_SWITCH_PROTOCOL)
#: worker response headers that sidecar's own replace: x-request-id always, x-sidecar-cost on
#: routes whose dialect reads (and prices) the body
_WORKER_DROPPED: Final = (b"x-request-id", b"x-sidecar-cost")
#: and on a 2xx answer those routes read, Content-Encoding too (see `_start_response_pump`)
_READ_ANSWER_DROPPED: Final = (*_WORKER_DROPPED, b"content-encoding")
#: how often a request the worker is still reading is looked at (see `_request_flushed`)
FLUSH_POLL: Final = 0.02
#: the events that are a worker's response head (interim ones included)
_HEADS: Final = (h11.Response, h11.InformationalResponse)
#: bytes written as they are rather than joined to their head or chunk framing (a copy)
LARGE_WRITE: Final = 1024 * 1024


class BadFraming(Exception):
    """The client's request body framing is broken."""


async def serve_connection(client: ClientConnection) -> None:
    """Run request cycles on one client connection until it closes."""
    loop = client.loop
    runtime = client.runtime
    started = loop.time()
    first = True
    unread = False  # the connection ends with the client's input not read to its end
    try:
        while not client.closed:
            limits = runtime.config.limits
            if first:
                idle_deadline = head_deadline = started + limits.header_timeout
            else:
                if runtime.draining and not client.request_pending:
                    break  # (a request already received, pipelined, is still answered)
                # the next (pipelined) request waits until the client reads what it has
                # been sent: answers the sidecar writes itself never pile up unread
                if client.paused_writing and not await client.drained(limits.send_timeout):
                    client.abort()
                    break
                now = loop.time()
                idle_deadline = now + limits.keepalive_timeout
                head_deadline = now + limits.header_timeout
            try:
                head = await client.read_head(idle_deadline, head_deadline)
            except ClientTimeout as timeout:
                if timeout.args and timeout.args[0]:  # a head had begun: a request refused
                    _refuse(client, 408, "request_timeout", "the request head took too long",
                            client.buffer)
                elif first:  # silent since the connection's start: a 408 still fits
                    _refuse(client, 408, "request_timeout", "no request head in time", None)
                break  # (an idle keep-alive connection is closed quietly)
            except MalformedHead:  # bytes no head may hold: refused as they arrive
                _refuse(client, 400, "invalid_request", "malformed request head", client.buffer)
                break
            except ClientGone:
                break
            if head is None:
                break
            if not head:
                _refuse(client, 431, "headers_too_large", "the request head is too large",
                        client.buffer)
                break
            # the refusals of `check_raw_head`, and the head read for h11 (below), in one pass
            problem, read = check_and_read_request_head(head)
            if problem is not None:
                _refuse(client, 400, "invalid_request", problem, head)
                break
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
            # h11 gets the head only: a Content-Length body is read past it by the exchange
            # (ClientConnection.read_body), anything else h11 is fed as it needs it. Of the
            # head, only the request line and the header lines it acts on, when every other
            # line is one it would take (their list is read here, `read_request_head`); else
            # the whole head, which it refuses
            conn.receive_data(head if read is None else read[1])
            del client.buffer[: len(head)]
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                _refuse(client, 400, "invalid_request", str(exc) or "malformed request head", head)
                break
            if not isinstance(event, h11.Request):
                _refuse(client, 400, "invalid_request", "malformed request head", head)
                break
            if not event.http_version.startswith(b"1."):  # `HTTP/2.0` (RFC 9110 15.6.6)
                _refuse(client, 505, "http_version_not_supported",
                        f"HTTP/{event.http_version.decode()} is not supported: sidecar speaks HTTP/1.1",
                        head)
                break
            exchange = Exchange(
                client, conn, event, runtime.current, None if read is None else read[0]
            )
            del event, head, read  # not held for as long as the exchange lasts
            client.busy = True
            try:
                await exchange.run()
            finally:
                client.busy = False
            first = False
            reuse = not (
                exchange.close_after
                or client.closed
                or conn.our_state is not h11.DONE
                or not exchange.request_read
            )
            if not reuse:
                unread = not exchange.request_read or bool(client.buffer)
                break
            leftover, _ = conn.trailing_data
            if leftover:
                client.buffer[:0] = leftover
            del exchange, conn  # an idle keep-alive connection holds nothing of its last request
    except Exception:  # a bug must cost one connection, never the daemon
        log.exception("connection handler failed")
    finally:
        client.close(discard_input=unread)


def _path_dialect(routes: Sequence[RouteConfig], target: bytes) -> Dialect:
    """The dialect whose error objects a request no route takes speaks: the one of the first
    route its path matches, methods ignored; else passthrough's (the OpenAI shape). Only the
    answer's shape: the request still matched no route (ledger `route`/`dialect` null)."""
    route = match_route(routes, None, target)
    return get_dialect(route.dialect if route is not None else "passthrough")


def _refusal_dialect(client: ClientConnection, head: bytes | bytearray | None) -> Dialect:
    """The dialect whose error object a refused head gets (`_path_dialect`), once its
    request line is whole; else passthrough's."""
    if head is not None:
        line = bytes(head[:2048]).partition(b"\n")
        if line[1]:
            _, path = raw_method_and_path(line[0])
            if path != "-":
                return _path_dialect(client.runtime.current.config.routes, path.encode("ascii"))
    return get_dialect("passthrough")


def _refuse(
    client: ClientConnection,
    status: int,
    code: str,
    message: str,
    head: bytes | bytearray | None,
) -> None:
    """Answer a request refused at its head (or a connection that sent none) and close.

    A refused head is a finished request like any other (outcome `bad_request`): it has a
    request id (the client's `x-request-id` if the raw head has a sane one), a ledger line,
    metrics and an access-log line. `head` is None when no byte of a request arrived:
    then there is only the answer.
    """
    body = _refusal_dialect(client, head).error_body(status, code, message)
    if head is None:
        client.write(simple_response(status, body))
        client.close()
        return
    request_id = raw_request_id(head)
    runtime = client.runtime
    duration = max(client.loop.time() - client.head_began, 0.0)
    runtime.metrics.request_finished("", "bad_request", status, None, Usage(), None, duration, duration)
    if runtime.ledger.path is not None:
        runtime.ledger.write(
            LedgerRecord(
                ts=utc_timestamp(time.time() - duration),
                request_id=request_id,
                outcome="bad_request",
                status=status,
                ttfb_ms=duration * 1000.0,
                duration_ms=duration * 1000.0,
            )
        )
    if access_enabled():
        method, path = raw_method_and_path(head[:2048])
        _log_request(
            request_id, "", method, path, status, "bad_request", code, duration, duration,
            None, None,
        )
    # accounted (above) before the client can have its answer, as every request is
    client.write(simple_response(status, body, request_id=request_id))
    client.close(discard_input=True)  # the rest of the head, a body: read and dropped


def _log_request(
    request_id: str,
    route: str,
    method: str,
    path: str,
    status: int,
    outcome: str,
    code: str | None,
    ttfb: float | None,
    duration: float,
    model: str | None,
    cost: Decimal | None,
) -> None:
    """The access-log line of one finished request (times in seconds)."""
    # the fields that are set, in the order of the line (see log_access)
    fields: dict[str, object] = {
        "request_id": request_id,
        "route": route,
        "method": method,
        "path": path,
        "status": status,
        "outcome": outcome,
    }
    if code is not None:
        fields["code"] = code
    if ttfb is not None:
        fields["ttfb_ms"] = round_ms(ttfb * 1000.0)
    fields["duration_ms"] = round_ms(duration * 1000.0)
    if model is not None:
        fields["model"] = model
    if cost is not None:
        fields["cost"] = cost_header_value(cost)
    log_access(f"{method} {status} {outcome}", fields)

class Exchange(StreamListener):
    """One request/response between a client and the worker, and its ledger record."""

    # one per request: thirty attributes set in slots, not a dict
    __slots__ = (
        "_client_gone", "_finished", "_task", "body_read", "chunked_out", "client",
        "close_after", "conn", "dialect", "failure", "first_values", "generation", "head_sent",
        "headers", "loop", "method", "outcome", "outcome_source", "plan", "premade", "pump",
        "raw_method", "request_id", "route", "runtime", "started", "status",
        "streaming_client", "target", "ttfb", "upstream", "upstream_sse", "wall_start",
    )

    def __init__(
        self,
        client: ClientConnection,
        conn: h11.Connection,
        request: h11.Request,
        generation: Generation,
        headers: list[Header] | None = None,
    ) -> None:
        """`headers`: the request's header list, when read from its raw head
        (`read_request_head`: h11 was given only the lines it acts on); else h11's."""
        self.loop = client.loop
        self.started = time.perf_counter()
        self.wall_start = time.time()
        self.client = client
        self.conn = conn
        self.target = request.target  # the event itself (and its headers) is not kept
        self.raw_method = request.method
        self.generation = generation
        self.runtime = client.runtime
        self.method = request.method.decode("ascii", "replace")
        self.headers: list[Header] = header_list(request.headers) if headers is None else headers
        #: the first value of each request header by name (h11's names are lower-case): one
        #: look-up, where `header_value` scans the list (a bytes call per header) each time
        self.first_values: dict[bytes, bytes] = dict(reversed(self.headers))
        self.request_id = request_id_for(self.first_values.get(b"x-request-id"))
        self.route: RouteConfig | None = match_route(
            generation.config.routes, self.method, request.target
        )
        # with no route, errors still speak the shape of the API the path belongs to
        self.dialect: Dialect = (
            get_dialect(self.route.dialect) if self.route is not None
            else _path_dialect(generation.config.routes, request.target)
        )
        self.plan: RequestPlan | None = None
        self.upstream: UpstreamConnection | None = None
        self.pump: ResponsePump | None = None
        self.head_sent = False
        self.chunked_out = False
        self.close_after = False
        self.status: int | None = None
        self.outcome = "ok"
        self.failure: Failure | None = None
        self.ttfb: float | None = None
        self.upstream_sse: bool | None = None
        self.outcome_source: StreamTranslator | DocumentTranslator | None = None
        self.streaming_client = False
        #: a stream's translator and parser made while the worker worked (`_prepare`)
        self.premade: tuple[StreamTranslator, SSEParser] | None = None
        self._task: asyncio.Task[None] | None = None
        self._client_gone = False
        self._finished = False
        # the request body was read to its end: past h11 (Content-Length), or streamed on
        # (passthrough) up to its end, which a retry must then not wait for again
        self.body_read = False

    @property
    def request_read(self) -> bool:
        """The request was read to its end (else the connection cannot take another).

        A request that asked to upgrade the connection (`Upgrade`, which is never passed
        on) is whole at its end too: h11 waits there for the answer, and the answer,
        never a 101, declines the upgrade and keeps the connection HTTP/1.1."""
        return self.body_read or self.conn.their_state in _REQUEST_READ

    # -- the client side, as the pump and handlers see it ------------------------------
    def start_response(
        self, status: int, headers: list[Header], body: bytes | None = None, hold: bool = False
    ) -> bytes | None:
        """Send the response head; with `body`, the whole response in one write. With `hold`
        (and no body), the head is returned instead of written: the caller writes it, before
        any byte of the body, and may join it to the body's first write."""
        headers = [*headers, (b"x-request-id", self.request_id.encode())]
        if (
            self.close_after
            or self.runtime.draining
            # a request body not read to its end: the connection closes after this answer
            or not self.request_read
        ):
            headers.append((b"connection", b"close"))
        conn = self.conn
        # h11 sees only the headers that decide framing and keep-alive (it rewrites and
        # re-validates every header it is given, up to three times for a chunked head)
        framing, lines = split_for_h11(headers, H11_RESPONSE_HEADERS)
        head = conn.send(response_event(status, framing))
        assert head is not None
        data = splice_lines(head, lines)
        held: bytes | None = None
        self.status = status
        if self.ttfb is None:
            self.ttfb = time.perf_counter() - self.started
        if body is not None:
            framed = conn.send(data_event(body)) if body and self.method != "HEAD" else b""
            end = conn.send(END_OF_MESSAGE)
            self._finish()  # accounted before the client can see the end
            if len(framed) >= LARGE_WRITE:
                # a document (up to MAX_DOCUMENT) goes out as it is, not copied once more
                # behind its head
                self.client.write(data)
                self.client.write(framed)
                data = end
            else:
                data += framed + end
        elif hold:
            held, data = data, b""
        if data:
            self.client.write(data)
        self.head_sent = True
        self.chunked_out = (
            self.conn.their_http_version == b"1.1"
            and self.method != "HEAD"
            and status not in (204, 304)
            # (the list, not h11's `Headers` made of it: that one iterates in Python)
            and header_value(headers, b"content-length") is None
        )
        return held

    def write_data(self, data: bytes | bytearray) -> None:
        if self.chunked_out:  # h11 chose chunked for this head; frame it here, it ends it
            if len(data) >= LARGE_WRITE:  # a synthesized stream: not copied into its chunk
                self.client.write(b"%x\r\n" % len(data))
                self.client.write(data)
                self.client.write(b"\r\n")
                return
            self.client.write(frame(data))
        else:
            self.client.write(self.conn.send(data_event(data)))

    def body_writer(self) -> Callable[[bytes], None]:
        """`write_data` for the hot path: once the head is out, one call per event batch.

        Writes go straight to the transport (after the client is gone the pump stops
        feeding, and a closed transport drops writes).
        """
        transport = self.client.transport
        if not self.chunked_out or transport is None:
            return self.write_data
        write = transport.write
        lines = SIZE_LINES

        def write_chunk(data: bytes) -> None:
            n = len(data)
            write((lines[n] if n < 4096 else b"%x\r\n" % n) + data + b"\r\n")

        return write_chunk

    def framed_writer(self) -> Callable[[bytes], None] | None:
        """Once the head is out: a writer for bytes already framed as chunks of the client's
        chunked body (the worker's chunks passed as they came), or None when the client's
        body is not chunked."""
        transport = self.client.transport
        if not self.chunked_out or transport is None:
            return None
        return transport.write

    def account(self) -> None:
        """Account the request now (ledger line, metrics, access log): the next write gives
        the client its whole answer. Once: `end_response` then only ends the answer."""
        self._finish()

    def end_response(self) -> None:
        data = self.conn.send(END_OF_MESSAGE)
        self._finish()  # ledger, metrics and log before the client can see the end
        self.client.write(data)

    def stream_opened(self) -> None:
        """The client's response is an event stream: counted in active streams until it ends."""
        if not self.streaming_client:
            self.streaming_client = True
            self.runtime.metrics.stream_opened()

    def _stream_closed(self) -> None:
        """The client's stream is over: the active-streams gauge drops before anyone can look."""
        if self.streaming_client:
            self.streaming_client = False
            self.runtime.metrics.stream_closed()

    def respond(self, status: int, headers: list[Header], body: bytes) -> None:
        self.start_response(status, [*headers, (b"content-length", str(len(body)).encode())], body)

    def respond_error(self, status: int, code: str, message: str, outcome: str) -> None:
        """An error answered by the sidecar itself, before any response head went out."""
        self.outcome = outcome
        body = self.dialect.error_body(status, code, message)
        self.respond(status, [(b"content-type", b"application/json")], body)

    def start_event_stream(self, worker_headers: list[Header], hold: bool = False) -> bytes | None:
        """The head of an event stream (held and returned with `hold`: see `start_response`)."""
        headers = without(
            worker_headers, b"content-type", b"cache-control", b"x-accel-buffering"
        )
        self.stream_opened()
        return self.start_response(
            200,
            [
                (b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                *headers,
            ],
            hold=hold,
        )

    # -- StreamListener: the client while the exchange waits or streams -------------------
    def client_lost(self) -> None:
        self._client_gone = True
        if self.pump is not None:
            self.pump.client_lost()
        elif self._task is not None and not self._task.done():
            self._task.cancel()

    def client_paused(self) -> None:
        if self.pump is not None:
            self.pump.client_paused()

    def client_resumed(self) -> None:
        if self.pump is not None:
            self.pump.client_resumed()

    # -- the request ---------------------------------------------------------------
    async def run(self) -> None:
        self._task = asyncio.current_task(self.loop)
        self.client.listener = self
        try:
            await self._run()
        except asyncio.CancelledError:
            if not self._client_gone:
                raise
            self._client_disconnected()
        except ClientGone:
            self._client_disconnected()
        except TooLarge:
            self.close_after = True
            self.respond_error(413, "request_too_large", "request body too large", "bad_request")
        except BadFraming as exc:
            self.close_after = True
            self.respond_error(400, "invalid_request", str(exc), "bad_request")
        except ClientTimeout:
            self.close_after = True
            if not self.head_sent:
                self.respond_error(408, "request_timeout", "the request body took too long", "bad_request")
            self.outcome = "bad_request"
        except UpstreamFailure as upstream:  # a name of its own: mypyc types `exc` once
            if upstream.errno in (errno.EMFILE, errno.ENFILE):
                self.runtime.out_of_fds()
            self._fail_before_head(upstream.failure, upstream.detail)
        except Exception:
            log.exception("exchange %s failed", self.request_id)
            self.close_after = True
            if not self.head_sent:
                self.respond_error(500, "internal_error", "internal error", "upstream_error")
        finally:
            self.client.listener = None
            if self.upstream is not None and self.pump is None:
                self.upstream.close()
            self._finish()
            # the pump and its handler point back here: with this one edge gone the whole
            # request is freed by reference counting as soon as the connection lets it go,
            # not kept (with its bodies) until a cyclic collection
            self.pump = None

    def _client_disconnected(self) -> None:
        self.outcome = "client_disconnect"
        self.close_after = True
        if self.upstream is not None:
            self.upstream.close()

    def _fail_before_head(self, failure: Failure, detail: str) -> None:
        self.failure = failure
        self.runtime.metrics.upstream_error(failure.code)
        if self.upstream is not None:
            self.upstream.close()
        message = failure.message if not detail else f"{failure.message}: {detail}"
        if self.head_sent:  # pragma: no cover - pumps handle failures after the head
            self.close_after = True
            self.client.abort()
            self.outcome = failure.outcome
            return
        self.respond_error(failure.status, failure.code, message, failure.outcome)

    async def _run(self) -> None:
        route = self.route
        limits = self.generation.config.limits
        first_values = self.first_values
        length = first_values.get(b"content-length")
        if route is None:
            # a body is not worth reading: the connection closes after the 404 when there
            # is one, and stays open for the next request when there is none
            if length not in (None, b"0") or first_values.get(b"transfer-encoding"):
                self.close_after = True
            else:
                self.conn.next_event()  # the (empty) body's end: h11 can start the next cycle
            self.respond_error(404, "not_found", "no route matches this request", "bad_request")
            return
        if length is not None and int(length) > limits.max_request_body:
            self.close_after = True
            self.respond_error(413, "request_too_large", "request body too large", "bad_request")
            return
        body_deadline = self.loop.time() + limits.body_timeout
        dialect = self.dialect
        body_parts: list[bytes | bytearray] = []
        body_complete = False
        if dialect.reads_body:
            if length is not None and b"transfer-encoding" not in first_values:
                # (most often it came with the head: taken as it is, without a wait)
                body = self.client.body_at_hand(int(length))
                if body is None:
                    body = await self.client.read_body(int(length), self.conn, body_deadline)
                self.body_read = True
            else:
                body = await self._read_body(limits.max_request_body, body_deadline)
            codings = content_codings(self.headers) if b"content-encoding" in first_values else []
            if codings:  # not JSON as it is (nor forwarded re-encoded under a coding it lacks)
                self.respond_error(
                    400, "invalid_request_error",
                    "the request body has Content-Encoding: " + b", ".join(codings).decode("latin-1")
                    + "; this route reads the JSON body and takes it uncompressed",
                    "bad_request",
                )
                return
            try:
                self.plan = dialect.plan(body, route.upstream_stream, self.request_id)
            except BadRequest as exc:
                self.respond_error(400, "invalid_request_error", str(exc), "bad_request")
                return
            body_parts.append(self.plan.body)
            body_complete = True
        pool = self.generation.route_pools[route.name]
        head = self._upstream_head(pool)
        response = await self._send(pool, head, body_parts, body_complete, body_deadline)
        # The worker answered, so the request will not be sent again: neither it nor a long
        # prompt stays in memory for as long as its stream lasts.
        del head, body_parts
        body = b""
        self.headers = []
        self.first_values = {}
        if self.plan is not None:
            self.plan.body = b""
        pump = self._start_response_pump(response)
        if pump.done is not None:  # (None: the whole answer came with the worker's head)
            await pump.done
        self._response_over(pool, pump)

    async def _read_body(self, limit: int, deadline: float) -> bytes:
        """A request body read through h11 (chunked), whole; TooLarge past `limit`."""
        parts: list[bytes | bytearray] = []
        size = 0
        while (part := await self._next_body_part(deadline, limit - size)) is not None:
            size += len(part)
            if size + self.client.chunk_left(self.conn) > limit:  # counting what a chunk declared
                raise TooLarge()
            keep_body_piece(parts, part)
        return b"".join(parts)

    async def _next_body_part(self, deadline: float, room: int) -> bytes | bytearray | None:
        """The next piece of a request body read through h11; None at its end; TooLarge
        when a chunk declares more than `room` (what `max_request_body` leaves)."""
        try:
            event = await self.client.next_request_event(self.conn, deadline, room)
        except h11.RemoteProtocolError as exc:
            raise BadFraming(str(exc) or "malformed request body") from None
        if type(event) is h11.Data:
            # cast: h11 annotates Data.data as bytes but hands out bytearray (mypyc checks)
            return cast(Any, event).data
        if type(event) is h11.EndOfMessage:
            return None
        raise ClientGone()

    def _upstream_head(self, pool: UpstreamPool) -> tuple[h11.Request, bytes]:
        """The worker's request head: what h11 writes and the header lines spliced into it.

        h11 sees only the framing headers and Host (`split_for_h11`); the client's
        end-to-end headers and the request id go in as lines."""
        if self.dialect.reads_body:  # the sidecar reads the answer: no compressed one
            lines = end_to_end_lines(self.headers, b"x-request-id", b"accept-encoding")
            assert self.plan is not None
            framing = [(b"content-length", str(len(self.plan.body)).encode()), pool.host]
        else:
            lines = end_to_end_lines(self.headers, b"x-request-id")
            length = self.first_values.get(b"content-length")
            if length is not None:
                framing = [(b"content-length", length), pool.host]
            elif b"transfer-encoding" in self.first_values:
                framing = [(b"transfer-encoding", b"chunked"), pool.host]
            else:
                framing = [pool.host]
        lines += b"x-request-id: " + self.request_id.encode() + b"\r\n"
        # method and target came out of h11's parser, the framing is the sidecar's own
        return request_event(self.raw_method, self.target, h11_headers(framing)), lines

    async def _send(
        self,
        pool: UpstreamPool,
        head: tuple[h11.Request, bytes],
        body_parts: list[bytes | bytearray],
        body_complete: bool,
        body_deadline: float,
    ) -> h11.Response:
        """Send the request and return the worker's response head (retrying a dead pooled conn once)."""
        timeout = pool.config.response_timeout
        streamed = not body_complete  # framed by h11 (chunked or a length), sent as it comes
        for attempt in (0, 1):
            # a pooled connection first (only those are retried); the one retry goes to a
            # new connection (SPEC), never to another pooled one, which the worker may have
            # dropped the same way
            conn = pool.take_idle() if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await pool.connect()
            self.upstream = conn
            try:
                if not streamed:  # the common case: one write for the whole request
                    conn.send_request(*head, b"".join(body_parts))
                    self._prepare()  # while the worker works
                else:  # a retry sends again, framed again, what was read so far, then the rest
                    conn.send_request(*head, None)
                    body_complete = await self._stream_body(
                        conn, body_parts, body_complete or self.body_read, body_deadline
                    )
                if conn.unflushed:  # (a small request left in the write itself)
                    await self._request_flushed(conn, timeout)
                deadline = None if timeout is None else self.loop.time() + timeout
                return await self._response_head(conn, deadline)
            except TimeoutError:
                raise UpstreamFailure(failures.RESPONSE_TIMEOUT) from None
            except UpstreamFailure as exc:
                dead_before_response = not conn.response_started
                conn.close()
                if (
                    attempt == 0
                    and reused
                    and dead_before_response
                    and exc.failure is failures.UPSTREAM_DISCONNECTED
                ):
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _prepare(self) -> None:
        """What the answer will likely need, made while the worker works on the request
        rather than after its head came: a stream's translator and parser, when the client
        streams and the worker is asked to (`chosen_handler` takes them if it is SSE)."""
        plan = self.plan
        if plan is not None and plan.client_stream and plan.asked_stream and self.premade is None:
            config = self.generation.config
            self.premade = (
                self.dialect.stream(plan, config.pricing, aggregate=False),
                SSEParser(config.limits.max_event_size, strict=True),
            )

    async def _stream_body(
        self, conn: UpstreamConnection, body_parts: list[bytes | bytearray], whole: bool,
        deadline: float,
    ) -> bool:
        """Pass a streamed (passthrough) request body on as it arrives; True once whole.

        `body_parts` is what was read of it so far (sent first, framed again: this may be
        a retry), and each new piece is added to it; `whole`: nothing is left to read.
        A worker may answer before it has the whole body (a 413, a 401) and close: then
        the rest is not sent (nor read from the client, whose connection closes after the
        answer) and that answer is passed on, as HTTP/1.1 says (RFC 9112 9.5), never
        turned into a 502 by the write that found the connection closed. (A worker that
        answers early and stays open gets the whole body, as it reads on.)"""
        limit = self.generation.config.limits.max_request_body
        size = sum(map(len, body_parts))
        try:
            conn.send(*(h11.Data(data=bytes(p)) for p in body_parts))  # (a retry: rare)
            while not whole:
                part = await self._next_body_part(deadline, limit - size)
                if part is None:
                    self.body_read = True  # before the write that may find the worker gone
                    break
                size += len(part)
                if size + self.client.chunk_left(self.conn) > limit:  # what a chunk declared
                    raise TooLarge()
                keep_body_piece(body_parts, part)  # kept before the write: a retry sends it again
                conn.send(h11.Data(data=part))  # type: ignore[arg-type]  # h11 takes bytearray
            conn.send(END_OF_MESSAGE)
            return True
        except UpstreamFailure:
            if not conn.response_started:
                raise
        self.close_after = True  # the client's body was not read to its end
        return False

    async def _request_flushed(self, conn: UpstreamConnection, timeout: float | None) -> None:
        """Wait until the request has left the write buffer: response_timeout counts from
        the request sent (SPEC), not from a write a worker is still reading (a large body,
        a busy worker). A worker that takes none of it for response_timeout is that
        timeout (TimeoutError). An answer that comes before the whole request went out
        (an early 413) ends the wait. Awaited only for a request not all written at once
        (`UpstreamConnection.unflushed`): small requests leave in the write itself."""
        transport = conn.transport
        if transport is None:
            return
        left = transport.get_write_buffer_size()
        progress = self.loop.time()
        while left and not (conn.response_started or conn.eof or conn.closed):
            await asyncio.sleep(FLUSH_POLL)
            now, before, left = self.loop.time(), left, transport.get_write_buffer_size()
            if left < before:
                progress = now
            elif timeout is not None and now - progress >= timeout:
                raise TimeoutError()

    async def _response_head(self, conn: UpstreamConnection, deadline: float | None) -> h11.Response:
        while True:
            try:
                event = await conn.next_event(deadline)
            except h11.RemoteProtocolError as exc:
                if conn.eof or conn.closed:
                    raise UpstreamFailure(failures.UPSTREAM_DISCONNECTED, "closed before the response head") from None
                log.debug("worker response head refused by h11: %s", exc)
                raise UpstreamFailure(
                    failures.UPSTREAM_PROTOCOL_ERROR, "malformed response head"
                ) from None
            if (
                conn.head_bytes > conn.max_head
                and isinstance(event, _HEADS)
                and head_size(event.reason, event.headers) > conn.max_head
            ):
                # h11 bounds only a head still incomplete: the same head that came whole in
                # one read is refused too, not served or refused by how the bytes arrived
                raise UpstreamFailure(
                    failures.UPSTREAM_PROTOCOL_ERROR, "response head larger than max_header_bytes"
                )
            if type(event) is h11.Response:
                return event
            if type(event) is h11.InformationalResponse:
                # an interim answer is no response head: a worker that keeps sending them
                # (never waited on, so the wait's own timer never fires) still times out
                if deadline is not None and self.loop.time() >= deadline:
                    raise TimeoutError()
                continue
            raise UpstreamFailure(failures.UPSTREAM_DISCONNECTED, "closed before the response head")

    # -- the response ---------------------------------------------------------------
    def _start_response_pump(self, response: h11.Response) -> ResponsePump:
        """Pick the body handler for the worker's response and start the pump that feeds it
        (not a coroutine: the caller awaits `pump.done` only when the body outlasts the start)."""
        assert self.upstream is not None and self.route is not None
        status = response.status_code
        raw_headers: list[Header] = header_list(response.headers)
        if has_control_byte(raw_headers):
            raise UpstreamFailure(failures.UPSTREAM_PROTOCOL_ERROR, "malformed response head")
        tokens = connection_tokens(raw_headers)
        self.upstream.keep_alive = response.http_version == b"1.1" and b"close" not in tokens
        # the worker's own x-request-id (vLLM echoes one) gives way to the one sidecar sends;
        # where sidecar prices the answer, so does a worker's x-sidecar-cost (another
        # sidecar's, in front of the worker): the header states this one's cost, or is absent
        plan = self.plan
        handler: BodyHandler
        if plan is None or not 200 <= status < 300:
            if not 200 <= status < 300:
                self.outcome = "upstream_http_error"
                if plan is not None:  # the error answer, passed on as it is, is what came
                    content_type = header_value(raw_headers, b"content-type")
                    self.upstream_sse = body_kind(content_type) == "sse"
            dropped = _WORKER_DROPPED if self.dialect.reads_body else _WORKER_DROPPED[:1]
            worker_headers = end_to_end(raw_headers, *dropped, tokens=tokens)
            handler = RawHandler(self, status, worker_headers, raw_headers)
        else:
            kind = body_kind(header_value(raw_headers, b"content-type"))
            # what the client gets here is sidecar's own bytes (decoded, parsed, written
            # again), never the worker's coded ones: its Content-Encoding does not apply
            # (Accept-Encoding was not forwarded; a worker that compresses anyway sent a body
            # sidecar cannot read, and the client must be able to read the error frame)
            # (a plan: the dialect reads the body)
            worker_headers = end_to_end(raw_headers, *_READ_ANSWER_DROPPED, tokens=tokens)
            handler = read_answer_handler(self, worker_headers, kind)
        decoder = body_decoder(self.raw_method, status, raw_headers)
        pump = ResponsePump(self, self.upstream, handler, self.route, decoder)
        self.pump = pump
        pump.start()
        return pump

    def _response_over(self, pool: UpstreamPool, pump: ResponsePump) -> None:
        """The worker's connection once the pump is done: back to the pool, or closed."""
        assert self.upstream is not None
        if pump.clean and pump.decoder is None and self.upstream.h11.trailing_data[0]:
            # h11 framed this answer (204, 304, a HEAD's, after a 1xx) and bytes came after
            # its end, a body the answer cannot have: the worker and sidecar no longer agree
            # where its answers end, so the connection is not one to reuse (a new cycle would
            # drop those bytes, and the rest of them would be the next request's answer)
            self.upstream.keep_alive = False
        if pump.clean:  # (release closes a connection that cannot be reused)
            pool.release(self.upstream)
        else:
            self.upstream.close()

    # -- the end ---------------------------------------------------------------------------
    def _finish(self) -> None:
        """Account the request once: ledger line, metrics, access log (whichever way it ended)."""
        if self._finished:
            return
        self._finished = True
        duration = time.perf_counter() - self.started
        route_name = self.route.name if self.route else ""
        source = self.outcome_source
        if isinstance(source, StreamTranslator):
            source.settle()  # a failed or cut stream is recorded with what was seen
        usage = source.usage if source is not None else Usage()
        model = (source.model if source is not None else None) or (
            self.plan.request_model if self.plan else None
        )
        cost = source.cost if source is not None else None
        status = self.status if self.status is not None else 499
        self._stream_closed()
        self.runtime.metrics.request_finished(
            route_name, self.outcome, status, model, usage, cost, self.ttfb, duration,
            self.generation.config.pricing.currency,
        )
        ledger = self.runtime.ledger
        if ledger.path is not None:
            ledger.write(self._record(model, usage, cost, status, duration))
        if access_enabled():
            _log_request(
                self.request_id, route_name, self.method,
                self.target.partition(b"?")[0].decode("ascii", "replace"), status, self.outcome,
                self.failure.code if self.failure else None, self.ttfb, duration, model, cost,
            )

    def _record(
        self,
        model: str | None,
        usage: Usage,
        cost: Decimal | None,
        status: int,
        duration: float,
    ) -> LedgerRecord:
        """This request's ledger line."""
        route_name = self.route.name if self.route else ""
        return LedgerRecord(
            ts=utc_timestamp(self.wall_start),
            request_id=self.request_id,
            route=route_name or None,
            model=model,
            request_model=self.plan.request_model if self.plan else None,
            client_stream=self.plan.client_stream if self.plan else None,
            upstream_stream=self.upstream_sse,
            outcome=self.outcome,
            status=status,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            cost=cost,
            ttfb_ms=None if self.ttfb is None else self.ttfb * 1000.0,
            duration_ms=duration * 1000.0,
            usage_estimated=usage.estimated,
            dialect=self.route.dialect if self.route else None,
        )
