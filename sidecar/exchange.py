"""One request from head to ledger line: the only place where client and worker meet.

I/O shell. `serve_connection` runs the request cycles of one client
connection; an `Exchange` reads one request, asks its route's dialect what
to send, sends it to the worker (once more on a fresh connection if a pooled
one turns out dead), and hands the worker's body to a `ResponsePump`. The
pump runs synchronously inside the worker connection's `data_received`:
bytes -> h11 -> body handler -> SSE parser -> dialect -> client write, with
no task switch per token. Which handler runs is decided here from the route
and the worker's actual response; what a failure means comes from
`sidecar.failures`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from decimal import Decimal
from http import HTTPStatus
from typing import TYPE_CHECKING

import h11

from sidecar import failures
from sidecar.chunked import SIZE_LINES, ChunkedDecoder, ChunkedError, frame
from sidecar.dialects import get_dialect
from sidecar.dialects.base import (
    BadRequest,
    Dialect,
    DocumentTranslator,
    RequestPlan,
    StreamProtocolError,
    StreamTranslator,
)
from sidecar.failures import Failure, UpstreamFailure
from sidecar.headers import (
    Header,
    check_raw_head,
    connection_tokens,
    end_to_end,
    header_value,
    request_id_from,
    simple_response,
    without,
)
from sidecar.ledger import LedgerRecord, utc_timestamp
from sidecar.routes import match_route
from sidecar.server import ClientConnection, ClientGone, ClientTimeout, StreamListener
from sidecar.sse import Event, SSEParser, SSEProtocolError, encode_comment
from sidecar.upstream import UpstreamConnection, UpstreamPool
from sidecar.usage import Usage, cost_header_value

if TYPE_CHECKING:
    from sidecar.config import RouteConfig
    from sidecar.runtime import Generation

log = logging.getLogger("sidecar.exchange")
access_log = logging.getLogger("sidecar.access")

HEARTBEAT = encode_comment("keep-alive")
#: Largest JSON document accepted from the worker (it is held whole to translate it).
MAX_DOCUMENT = 64 * 1024 * 1024
_SSE_FIRST_BYTES = frozenset(b"deir:")


_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


def reason(status: int) -> bytes:
    """The standard reason phrase for `status` (h11 sends none unless told)."""
    return _REASONS.get(status, b"")


class TooLarge(Exception):
    """The request body is larger than max_request_body."""


class BadFraming(Exception):
    """The client's request body framing is broken."""


async def serve_connection(client: ClientConnection) -> None:
    """Run request cycles on one client connection until it closes."""
    loop = asyncio.get_running_loop()
    runtime = client.runtime
    started = loop.time()
    first = True
    try:
        while not client.closed:
            limits = runtime.config.limits
            if first:
                idle_deadline = head_deadline = started + limits.header_timeout
            else:
                if runtime.draining:
                    break
                idle_deadline, head_deadline = loop.time() + limits.keepalive_timeout, None
            try:
                head = await client.read_head(idle_deadline, head_deadline)
            except ClientTimeout as timeout:
                if timeout.args and timeout.args[0]:
                    _refuse(client, 408, "request_timeout", "the request head took too long")
                break
            except ClientGone:
                break
            if head is None:
                break
            if not head:
                _refuse(client, 431, "headers_too_large", "the request head is too large")
                break
            problem = check_raw_head(head)
            if problem is not None:
                _refuse(client, 400, "invalid_request", problem)
                break
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
            client.feed_h11(conn)
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                _refuse(client, 400, "invalid_request", str(exc) or "malformed request head")
                break
            if not isinstance(event, h11.Request):
                _refuse(client, 400, "invalid_request", "malformed request head")
                break
            exchange = Exchange(client, conn, event, runtime.current)
            client.busy = True
            try:
                await exchange.run()
            finally:
                client.busy = False
            first = False
            if (
                exchange.close_after
                or client.closed
                or conn.our_state is not h11.DONE
                or conn.their_state is not h11.DONE
            ):
                break
            leftover, _ = conn.trailing_data
            if leftover:
                client.buffer[:0] = leftover
    except Exception:  # a bug must cost one connection, never the daemon
        log.exception("connection handler failed")
    finally:
        client.close()


def _refuse(client: ClientConnection, status: int, code: str, message: str) -> None:
    """Answer outside any exchange (bad head, timeouts) and close."""
    body = get_dialect("passthrough").error_body(status, code, message)
    client.write(simple_response(status, body))
    client.close()


class Exchange(StreamListener):
    """One request/response between a client and the worker, and its ledger record."""

    def __init__(
        self,
        client: ClientConnection,
        conn: h11.Connection,
        request: h11.Request,
        generation: Generation,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.started = time.perf_counter()
        self.wall_start = time.time()
        self.client = client
        self.conn = conn
        self.request = request
        self.generation = generation
        self.runtime = client.runtime
        self.method = request.method.decode("ascii", "replace")
        # h11's Headers is a Sequence iterated in Python: read it once, as a list
        self.headers: list[Header] = list(request.headers)
        self.request_id = request_id_from(self.headers)
        self.route: RouteConfig | None = match_route(
            generation.config.routes, self.method, request.target
        )
        # with no route, errors still speak the shape of the API the path belongs to
        shape_route = self.route or match_route(generation.config.routes, None, request.target)
        self.dialect: Dialect = get_dialect(shape_route.dialect if shape_route else "passthrough")
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
        self._task: asyncio.Task[None] | None = None
        self._client_gone = False

    # -- the client side, as the pump and handlers see it ------------------------------
    def start_response(self, status: int, headers: list[Header], body: bytes | None = None) -> None:
        """Send the response head; with `body`, the whole response in one write."""
        headers = [*headers, (b"x-request-id", self.request_id.encode())]
        if self.close_after or self.runtime.draining:
            headers.append((b"connection", b"close"))
        conn = self.conn
        # _parsed: every header here came out of h11's parser or is one of our constants
        data = conn.send(
            h11.Response(status_code=status, headers=headers, reason=reason(status), _parsed=True)
        )
        if body is not None:
            if body and self.method != "HEAD":
                data += conn.send(h11.Data(data=body))
            data += conn.send(h11.EndOfMessage())
        self.client.write(data)
        self.status = status
        self.head_sent = True
        self.chunked_out = (
            self.conn.their_http_version == b"1.1"
            and self.method != "HEAD"
            and status not in (204, 304)
            and header_value(headers, b"content-length") is None
        )
        if self.ttfb is None:
            self.ttfb = time.perf_counter() - self.started

    def write_data(self, data: bytes) -> None:
        if self.chunked_out:  # h11 chose chunked for this head; frame it here, it ends it
            self.client.write(frame(data))
        else:
            self.client.write(self.conn.send(h11.Data(data=data)))

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

    def end_response(self) -> None:
        self.client.write(self.conn.send(h11.EndOfMessage()))
        self._stream_closed()

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

    def start_event_stream(self, worker_headers: list[Header]) -> None:
        headers = without(
            worker_headers, b"content-type", b"cache-control", b"x-accel-buffering", b"x-request-id"
        )
        self.streaming_client = True
        self.runtime.metrics.stream_opened()
        self.start_response(
            200,
            [
                (b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                *headers,
            ],
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
        self._task = asyncio.current_task()
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
        except UpstreamFailure as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self.runtime.out_of_fds()
            self._fail_before_head(exc.failure, exc.detail)
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
        if route is None:
            self.close_after = True  # the body is not worth reading
            self.respond_error(404, "not_found", "no route matches this request", "bad_request")
            return
        length = header_value(self.headers, b"content-length")
        if length is not None and int(length) > limits.max_request_body:
            self.close_after = True
            self.respond_error(413, "request_too_large", "request body too large", "bad_request")
            return
        body_deadline = self.loop.time() + limits.body_timeout
        dialect = self.dialect
        body_parts: list[bytes] = []
        body_complete = False
        if dialect.reads_body:
            body = await self._read_body(limits.max_request_body, body_deadline)
            try:
                self.plan = dialect.plan(body, route.upstream_stream, self.request_id)
            except BadRequest as exc:
                self.respond_error(400, "invalid_request_error", str(exc), "bad_request")
                return
            body_parts.append(self.plan.body)
            body_complete = True
        head = self._upstream_head(route)
        pool = self.generation.pool_for(route.upstream)
        response = await self._send(pool, head, body_parts, body_complete, body_deadline)
        await self._handle_response(pool, response)

    async def _read_body(self, limit: int, deadline: float) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                event = await self.client.next_request_event(self.conn, deadline)
            except h11.RemoteProtocolError as exc:
                raise BadFraming(str(exc) or "malformed request body") from None
            if type(event) is h11.Data:
                size += len(event.data)
                if size > limit:
                    raise TooLarge()
                parts.append(event.data)
            elif type(event) is h11.EndOfMessage:
                return b"".join(parts)
            else:
                raise ClientGone()

    def _upstream_head(self, route: RouteConfig) -> h11.Request:
        request = self.request
        headers = without(end_to_end(self.headers), b"x-request-id")
        if self.dialect.reads_body:
            headers = without(headers, b"accept-encoding")
            assert self.plan is not None
            headers.append((b"content-length", str(len(self.plan.body)).encode()))
        else:
            length = header_value(self.headers, b"content-length")
            if length is not None:
                headers.append((b"content-length", length))
            elif header_value(self.headers, b"transfer-encoding") is not None:
                headers.append((b"transfer-encoding", b"chunked"))
        headers.append((b"host", route.upstream.host_header.encode()))
        headers.append((b"x-request-id", self.request_id.encode()))
        # _parsed: method, target and client headers came out of h11's parser
        return h11.Request(
            method=request.method, target=request.target, headers=headers, _parsed=True
        )

    async def _send(
        self,
        pool: UpstreamPool,
        head: h11.Request,
        body_parts: list[bytes],
        body_complete: bool,
        body_deadline: float,
    ) -> h11.Response:
        """Send the request and return the worker's response head (retrying a dead pooled conn once)."""
        timeout = pool.config.response_timeout
        for attempt in (0, 1):
            conn, reused = await pool.acquire()
            self.upstream = conn
            try:
                events: list[h11.Event] = [head, *(h11.Data(data=p) for p in body_parts)]
                if body_complete:  # the common case: one write for the whole request
                    conn.send(*events, h11.EndOfMessage())
                else:
                    conn.send(*events)
                    while not body_complete:
                        body_complete = await self._forward_body_part(
                            conn, body_parts, body_deadline
                        )
                    conn.send(h11.EndOfMessage())
                async with asyncio.timeout(timeout):
                    return await self._response_head(conn)
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

    async def _forward_body_part(
        self, conn: UpstreamConnection, sent: list[bytes], deadline: float
    ) -> bool:
        """Pass one piece of a streamed (passthrough) request body on; True at its end."""
        try:
            event = await self.client.next_request_event(self.conn, deadline)
        except h11.RemoteProtocolError as exc:
            raise BadFraming(str(exc)) from None
        if type(event) is h11.Data:
            sent.append(event.data)
            if sum(map(len, sent)) > self.generation.config.limits.max_request_body:
                raise TooLarge()
            conn.send(h11.Data(data=event.data))
            return False
        if type(event) is h11.EndOfMessage:
            return True
        raise ClientGone()

    async def _response_head(self, conn: UpstreamConnection) -> h11.Response:
        while True:
            try:
                event = await conn.next_event()
            except h11.RemoteProtocolError as exc:
                if conn.eof or conn.closed:
                    raise UpstreamFailure(failures.UPSTREAM_DISCONNECTED, "closed before the response head") from None
                log.debug("worker response head refused by h11: %s", exc)
                raise UpstreamFailure(
                    failures.UPSTREAM_PROTOCOL_ERROR, "malformed response head"
                ) from None
            if type(event) is h11.Response:
                return event
            if type(event) is h11.InformationalResponse:
                continue
            raise UpstreamFailure(failures.UPSTREAM_DISCONNECTED, "closed before the response head")

    # -- the response ---------------------------------------------------------------
    async def _handle_response(self, pool: UpstreamPool, response: h11.Response) -> None:
        assert self.upstream is not None and self.route is not None
        status = response.status_code
        raw_headers: list[Header] = list(response.headers)
        self.upstream.keep_alive = (
            response.http_version == b"1.1" and b"close" not in connection_tokens(raw_headers)
        )
        chunked = header_value(raw_headers, b"transfer-encoding") is not None
        worker_headers = end_to_end(raw_headers)
        plan = self.plan
        handler: BodyHandler
        if plan is None or not 200 <= status < 300:
            if not 200 <= status < 300:
                self.outcome = "upstream_http_error"
            handler = RawHandler(self, status, worker_headers, raw_headers)
        else:
            kind = _body_kind(header_value(raw_headers, b"content-type"))
            handler = SniffHandler(self, worker_headers, kind)
        pump = ResponsePump(self, self.upstream, handler, self.route, chunked)
        self.pump = pump
        pump.start()
        await pump.done
        if pump.clean and self.upstream.reusable:
            pool.release(self.upstream)
        else:
            self.upstream.close()

    # -- the end ---------------------------------------------------------------------------
    def _finish(self) -> None:
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
            route_name, self.outcome, status, model, usage, cost, self.ttfb, duration
        )
        ledger = self.runtime.ledger
        if ledger.path is not None:
            ledger.write(self._record(model, usage, cost, status, duration))
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "%s %s %s",
                self.method,
                status,
                self.outcome,
                extra={
                    "request_id": self.request_id,
                    "route": route_name,
                    "method": self.method,
                    "path": self.request.target.partition(b"?")[0].decode("ascii", "replace"),
                    "status": status,
                    "outcome": self.outcome,
                    "code": self.failure.code if self.failure else None,
                    "ttfb_ms": None if self.ttfb is None else round(self.ttfb * 1000.0, 3),
                    "duration_ms": round(duration * 1000.0, 3),
                    "model": model,
                    "cost": None if cost is None else cost_header_value(cost),
                },
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


def _body_kind(content_type: bytes | None) -> str | None:
    """"sse", "json", or None when the first byte must decide."""
    if content_type is None:
        return None
    media = content_type.split(b";", 1)[0].strip().lower()
    if media == b"text/event-stream":
        return "sse"
    if media == b"application/json" or media.endswith(b"+json"):
        return "json"
    return None


class BodyHandler:
    """What to do with a worker's response body; the pump calls these synchronously."""

    def bind(self, pump: ResponsePump) -> None:
        """Called once by the pump that feeds this handler."""

    def data(self, chunk: bytes) -> None:
        raise NotImplementedError

    def end(self) -> bool:
        """The body ended cleanly; return False if that end is itself a failure (incomplete)."""
        raise NotImplementedError

    def fail(self, failure: Failure, message: str) -> None:
        raise NotImplementedError

    @property
    def wants_heartbeat(self) -> bool:
        return False


class RawHandler(BodyHandler):
    """Forward the worker's status, headers and body bytes untouched (passthrough, worker errors)."""

    def __init__(
        self, exchange: Exchange, status: int, headers: list[Header], raw_headers: list[Header]
    ) -> None:
        self.ex = exchange
        length = header_value(raw_headers, b"content-length")
        if length is not None:
            headers = [*headers, (b"content-length", length)]
        exchange.start_response(status, headers)

    def data(self, chunk: bytes) -> None:
        self.ex.write_data(chunk)

    def end(self) -> bool:
        self.ex.end_response()
        return True

    def fail(self, failure: Failure, message: str) -> None:
        # nothing to say in a raw body: break the client's framing so it sees the failure
        self.ex.close_after = True
        self.ex.client.abort()


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
        ex = self.ex
        plan = ex.plan
        assert plan is not None
        pricing = ex.generation.config.pricing
        ex.upstream_sse = kind == "sse"
        if kind == "sse":
            translator = ex.dialect.stream(plan, pricing, aggregate=not plan.client_stream)
            ex.outcome_source = translator
            parser = SSEParser(ex.generation.config.limits.max_event_size)
            if plan.client_stream:
                self.inner = RelayHandler(ex, self.headers, translator, parser)
            else:
                self.inner = AggregateHandler(ex, translator, parser)
        else:
            self.inner = DocumentHandler(ex, self.headers)
        if self.pump is not None:  # from now on the pump feeds the chosen handler directly
            self.pump.handler = self.inner

    def data(self, chunk: bytes) -> None:
        if self.inner is None:
            chunk = self.held + chunk
            stripped = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")
            if not stripped:
                self.held = chunk[-8:]
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

    def end(self) -> bool:
        if self.inner is None:
            return False
        return self.inner.end()

    def fail(self, failure: Failure, message: str) -> None:
        if self.inner is None:
            self.ex.respond_error(failure.status, failure.code, message, failure.outcome)
        else:
            self.inner.fail(failure, message)

    @property
    def wants_heartbeat(self) -> bool:
        return self.inner is not None and self.inner.wants_heartbeat


class RelayHandler(BodyHandler):
    """SSE worker -> SSE client, event by event; only changed events are re-encoded."""

    def __init__(
        self,
        exchange: Exchange,
        headers: list[Header],
        translator: StreamTranslator,
        parser: SSEParser,
    ) -> None:
        self.ex = exchange
        self.translator = translator
        self.parser = parser
        exchange.start_event_stream(headers)
        self.write = exchange.body_writer()

    def data(self, chunk: bytes) -> None:
        try:
            events = self.parser.feed(chunk)
        except SSEProtocolError as exc:
            self._relay(exc.events)
            raise StreamProtocolError(str(exc)) from None
        if len(events) == 1:
            out = self.translator.feed(events[0])
            if out:
                self.write(out)
            return
        self._relay(events)

    def _relay(self, events: list[Event]) -> None:
        """Translate events and write the result at once; events before a bad one still go out."""
        feed = self.translator.feed
        pieces: list[bytes] = []
        try:
            for event in events:
                out = feed(event)
                if out:
                    pieces.append(out)
        finally:
            if pieces:
                self.write(b"".join(pieces))

    def end(self) -> bool:
        translator = self.translator
        if not (translator.complete or translator.worker_error):
            return False
        if translator.worker_error:
            self.ex.outcome = "upstream_error"
        self.ex.end_response()
        return True

    def fail(self, failure: Failure, message: str) -> None:
        self.ex.write_data(self.translator.error_frame(failure, message))
        self.ex.end_response()

    @property
    def wants_heartbeat(self) -> bool:
        return True


class AggregateHandler(BodyHandler):
    """SSE worker -> one JSON document for a non-streaming client, sent when the stream is done."""

    def __init__(self, exchange: Exchange, translator: StreamTranslator, parser: SSEParser) -> None:
        self.ex = exchange
        self.translator = translator
        self.parser = parser

    def data(self, chunk: bytes) -> None:
        feed = self.translator.feed
        try:
            events = self.parser.feed(chunk)
        except SSEProtocolError as exc:
            raise StreamProtocolError(str(exc)) from None
        for event in events:
            feed(event)

    def end(self) -> bool:
        translator = self.translator
        if not (translator.complete or translator.worker_error):
            return False
        body = translator.document()
        headers: list[Header] = [(b"content-type", b"application/json")]
        if translator.worker_error:
            self.ex.outcome = "upstream_error"
            self.ex.respond(502, headers, body)
            return True
        if translator.cost is not None:
            headers.append((b"x-sidecar-cost", cost_header_value(translator.cost).encode()))
        self.ex.respond(200, headers, body)
        return True

    def fail(self, failure: Failure, message: str) -> None:
        self.ex.respond_error(failure.status, failure.code, message, failure.outcome)


class DocumentHandler(BodyHandler):
    """JSON worker -> JSON (cost injected) or a synthesized SSE stream (JSON -> SSE)."""

    def __init__(self, exchange: Exchange, headers: list[Header]) -> None:
        self.ex = exchange
        self.parts: list[bytes] = []
        self.size = 0
        assert exchange.plan is not None
        self.client_stream = exchange.plan.client_stream
        self.headers = headers
        if self.client_stream:
            exchange.start_event_stream(headers)

    def data(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > MAX_DOCUMENT:
            raise StreamProtocolError("the worker's JSON document is too large")
        self.parts.append(chunk)

    def end(self) -> bool:
        ex = self.ex
        assert ex.plan is not None
        translator = ex.dialect.document(ex.plan, ex.generation.config.pricing, b"".join(self.parts))
        ex.outcome_source = translator
        if translator.worker_error:
            ex.outcome = "upstream_error"
        if self.client_stream:
            ex.write_data(translator.sse())
            ex.end_response()
            return True
        headers = [
            *without(self.headers, b"content-type", b"x-request-id"),
            (b"content-type", b"application/json"),
        ]
        if translator.cost is not None:
            headers.append((b"x-sidecar-cost", cost_header_value(translator.cost).encode()))
        ex.respond(502 if translator.worker_error else 200, headers, translator.json())
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


class ResponsePump:
    """Moves one worker response body to the client inside the worker's data callbacks.

    Owns the idle timeout (silence while reading, never while the client is
    paused), the heartbeat, backpressure (a paused client pauses reading the
    worker) and the single decision of how the response ended.
    """

    def __init__(
        self,
        exchange: Exchange,
        upstream: UpstreamConnection,
        handler: BodyHandler,
        route: RouteConfig,
        chunked: bool,
    ) -> None:
        self.ex = exchange
        self.up = upstream
        # chunked bodies (every streamed token) skip h11's event machinery
        self.decoder = ChunkedDecoder() if chunked else None
        self.handler = handler
        handler.bind(self)
        self.loop = exchange.loop
        self._now = self.loop.time
        self.idle_timeout = route.upstream.idle_timeout
        self.heartbeat = route.heartbeat
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.finished = False
        self.clean = False
        self.eof = False
        self.paused = False
        self.last_rx = self.loop.time()
        self.last_beat = self.last_rx
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._schedule()
        if self.ex.client.paused_writing:
            self.client_paused()
        if self.decoder is not None:
            buffered, closed = self.up.h11.trailing_data
            if buffered:
                self.upstream_data(buffered)
            if closed and not self.finished:
                self.upstream_eof()
        elif not self.finished:
            self._drain()
        if not self.finished:
            self.up.attach(self)

    # -- the worker side (BodyConsumer) ---------------------------------------------
    def upstream_data(self, data: bytes) -> None:
        # the hot path: every token of every stream passes here, keep it flat
        self.last_rx = self._now()
        decoder = self.decoder
        if decoder is None:
            self.up.h11.receive_data(data)
            self._drain()
            return
        try:
            pieces = decoder.feed(data)
            if pieces:
                self.handler.data(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        except ChunkedError as exc:
            if exc.pieces:  # what arrived intact before the break still goes out
                self._deliver(b"".join(exc.pieces))
            self.fail(failures.UPSTREAM_PROTOCOL_ERROR, str(exc))
            return
        except StreamProtocolError as exc:
            self.fail(failures.UPSTREAM_PROTOCOL_ERROR, str(exc))
            return
        if decoder.done and not self.finished:
            if decoder.trailing:
                self.up.keep_alive = False
            self._end()

    def _deliver(self, payload: bytes) -> bool:
        """Hand body bytes to the handler; False (and the exchange failed) if they break it."""
        try:
            self.handler.data(payload)
        except StreamProtocolError as exc:
            self.fail(failures.UPSTREAM_PROTOCOL_ERROR, str(exc))
            return False
        return True

    def upstream_eof(self) -> None:
        if self.finished:
            return
        self.eof = True
        if self.decoder is not None:
            self.fail(failures.UPSTREAM_DISCONNECTED, "the body ended early")
            return
        self.up.h11.receive_data(b"")
        self._drain()

    def upstream_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            detail = "the connection was reset" if exc is not None else "the connection was closed"
            self.fail(failures.UPSTREAM_DISCONNECTED, detail)

    def _drain(self) -> None:
        h = self.up.h11
        while not self.finished:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                if self.eof:
                    self.fail(failures.UPSTREAM_DISCONNECTED, "the body ended early")
                else:
                    log.debug("worker response body refused by h11: %s", exc)
                    self.fail(failures.UPSTREAM_PROTOCOL_ERROR, "malformed response body")
                return
            kind = type(event)
            if kind is h11.Data:
                if not self._deliver(event.data):  # type: ignore[union-attr]
                    return
            elif kind is h11.EndOfMessage:
                self._end()
                return
            elif event is h11.NEED_DATA:
                if self.eof:  # pragma: no cover - h11 concludes at EOF
                    self.fail(failures.UPSTREAM_DISCONNECTED, "the connection was closed")
                return
            else:
                self.fail(failures.UPSTREAM_DISCONNECTED, "the connection was closed")
                return

    def _end(self) -> None:
        try:
            ok = self.handler.end()
        except StreamProtocolError as exc:
            self.fail(failures.UPSTREAM_PROTOCOL_ERROR, str(exc))
            return
        if not ok:
            self.fail(failures.UPSTREAM_INCOMPLETE, "")
            return
        self.clean = True
        self.up.response_complete = True
        self._close()

    def fail(self, failure: Failure, detail: str) -> None:
        if self.finished:
            return
        self.up.close()
        ex = self.ex
        ex.failure = failure
        ex.outcome = failure.outcome
        ex.runtime.metrics.upstream_error(failure.code)
        message = f"{failure.message}: {detail}" if detail else failure.message
        if not ex._client_gone:
            self.handler.fail(failure, message)
        ex.outcome = failure.outcome
        self._close()

    def _close(self) -> None:
        self.finished = True
        self.up.detach()
        if self._timer is not None:
            self._timer.cancel()
        if not self.done.done():
            self.done.set_result(None)

    # -- the client side (via the exchange) -----------------------------------------------
    def client_lost(self) -> None:
        if self.finished:
            return
        self.up.close()
        self.ex.outcome = "client_disconnect"
        self.ex.close_after = True
        self._close()

    def client_paused(self) -> None:
        self.paused = True
        self.up.pause_reading()

    def client_resumed(self) -> None:
        self.paused = False
        self.last_rx = self.loop.time()
        self.up.resume_reading()

    # -- time -------------------------------------------------------------------------------
    def _schedule(self) -> None:
        due = self.last_rx + self.idle_timeout
        if self.heartbeat is not None:
            due = min(due, max(self.last_rx, self.last_beat) + self.heartbeat)
        self._timer = self.loop.call_at(due, self._tick)

    def _tick(self) -> None:
        if self.finished:
            return
        now = self.loop.time()
        if self.paused:
            self.last_rx = now
        elif now - self.last_rx >= self.idle_timeout:
            self.fail(failures.UPSTREAM_TIMEOUT, "")
            return
        if (
            self.heartbeat is not None
            and now - max(self.last_rx, self.last_beat) >= self.heartbeat
            and self.handler.wants_heartbeat
        ):
            self.last_beat = now
            self.ex.client.write(self.ex.conn.send(h11.Data(data=HEARTBEAT)))
        self._schedule()

