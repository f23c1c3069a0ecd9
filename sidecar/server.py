"""The client side: one asyncio protocol per client connection, one h11 SERVER state per request.

I/O shell only. It enforces the connection limits of SPEC's "The client side"
(raw-head checks before h11 sees a byte, header/body/keep-alive timeouts,
sizes, max_connections) and hands each request to an `Exchange`. A fresh h11
connection per request cycle keeps pipelined bytes in order: what h11 did not
consume is carried over to the next cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import sys
import termios
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, cast

import h11

from sidecar.deadlines import Waiter, Wakeup
from sidecar.dialects import get_dialect
from sidecar.headers import REQUEST_START, find_head_end, request_head_read, simple_response

if TYPE_CHECKING:
    from sidecar.runtime import Runtime

log = logging.getLogger("sidecar.server")
_YIELD_EVERY: Final = 256  # request body events handed out before other connections get a turn
#: Request body pieces h11 has ready are joined up to this size (or _YIELD_EVERY chunks):
#: a body of tiny chunks is held and forwarded as its bytes, not as an object per chunk
_BODY_PIECE: Final = 64 * 1024

#: Read no more from a client while this much of its input waits unprocessed.
_INPUT_HIGH_WATER: Final = 256 * 1024
_CR_LF: Final = (ord("\r"), ord("\n"))
_CLIENT_WRITE_HIGH_WATER: Final = 64 * 1024
#: How long a connection closed with its client still sending (a refused head, a request
#: body not read) reads and drops that input after its answer, waiting for the client's own
#: close: closing a socket with input unread makes the kernel answer with a reset, which can
#: reach the client before it has read the answer (nginx's lingering close, lingering_time)
DISCARD_TIME: Final = 5.0


class ClientGone(Exception):
    """The client closed its connection."""


class ClientTimeout(Exception):
    """The client did not send its head or body in time."""


class MalformedHead(Exception):
    """The request head, not yet complete, holds bytes no request head may hold
    (`request_head_read`): it can never become one that is served."""


class TooLarge(Exception):
    """The request body is larger than max_request_body."""


class StreamListener:
    """What an exchange that is streaming wants to hear about its client."""

    __slots__ = ()

    def client_paused(self) -> None: ...
    def client_resumed(self) -> None: ...
    def client_lost(self) -> None: ...


class SendStall:
    """Whether a client has taken nothing of what it was sent for `timeout`: its backlog
    (`ClientConnection.backlog`) has not shrunk since `since`. The rule of `send_timeout`,
    for a stream held back, a pipelined request waiting and a close lingering alike."""

    __slots__ = ("backlog", "since", "timeout")

    def __init__(self, backlog: int, now: float, timeout: float) -> None:
        self.backlog = backlog
        self.since = now
        self.timeout = timeout

    def over(self, backlog: int, now: float) -> bool:
        """Look at the backlog now: True once it has not shrunk for `timeout`."""
        if backlog < self.backlog:
            self.backlog, self.since = backlog, now
            return False
        return now - self.since >= self.timeout


class ClientConnection(asyncio.Protocol):
    """One client connection: reads requests, runs exchanges, writes responses."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        runtime: Runtime,
        connections: set[ClientConnection],
        serve: Callable[[ClientConnection], Coroutine[Any, Any, None]],
    ) -> None:
        # the loop is handed over, not looked up: asyncio.get_running_loop() costs a getpid()
        # syscall per call in CPython 3.11, and every wait of every request needs it
        self.loop = loop
        self.runtime = runtime
        self.head_began = loop.time()  # the connection's start, then each head's first byte
        self.serve = serve
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.closed = False
        self.paused_writing = False
        self.listener: StreamListener | None = None
        self.busy = False  # inside an exchange (for graceful drain)
        self._reading_paused = False
        self._wakeup = Wakeup(loop)  # the reading task waits on it for bytes, EOF or a close
        self._drain_waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._events_in_a_row = 0  # body events handed out without waiting for the socket
        #: what h11 gave after the body data `_join_data` took (an event or its error), with
        #: the request's h11 connection: handed out by the next `next_request_event`
        self._held: tuple[h11.Connection, h11.Event | h11.RemoteProtocolError] | None = None
        self._linger_timer: asyncio.TimerHandle | None = None  # a close waiting on the client
        self.discarding = False  # closed for writing; what the client still sends is dropped

    # -- asyncio.Protocol -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = client_transport = cast(asyncio.Transport, transport)
        runtime = self.runtime
        runtime.check_fd_limit()
        if runtime.lingering and runtime.connections < runtime.max_connections:
            _trim_lingering(runtime, 1)  # this client may need its fd and a worker's
        if runtime.connections >= runtime.max_connections or runtime.draining:
            if not runtime.draining:
                runtime.shedding()
            self._refuse(503, "too many connections" if not runtime.draining else "shutting down")
            return
        runtime.connections += 1
        runtime.metrics.connection_opened()
        self.connections.add(self)
        client_transport.set_write_buffer_limits(high=_CLIENT_WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._task = self.loop.create_task(self.serve(self))

    def _refuse(self, status: int, message: str) -> None:
        body = get_dialect("passthrough").error_body(status, "overloaded", message)
        assert self.transport is not None
        self.transport.write(simple_response(status, body))
        self.transport.close()
        self.closed = True

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        self.buffer += data
        if len(self.buffer) > _INPUT_HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wakeup.wake()

    def eof_received(self) -> bool:
        self.eof = True
        if self.discarding:  # the client closed too: so does the connection
            self._stop_discarding()
            return True  # (closed there, after what is left of the answer)
        self._wakeup.wake()
        # During an exchange a client's FIN means it went away, as nginx takes it: the
        # worker connection is closed now (not once our unsent bytes have drained), and so
        # is this one. Between requests the connection stays open so buffered pipelined
        # requests are answered.
        listener = self.listener
        if listener is None:
            return True
        self.listener = None
        listener.client_lost()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.runtime.lingering.pop(self, None)
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self.closed = True
        self._release_slot()
        self._wakeup.wake()
        self._wakeup.close()  # its timer is not left to go off for nobody
        self._wake_drain()
        listener = self.listener
        if listener is not None:
            self.listener = None
            listener.client_lost()

    def _release_slot(self) -> None:
        """No longer one of the `max_connections` (closed, or only dropping input)."""
        if self in self.connections:
            self.connections.discard(self)
            self.runtime.connections -= 1
            self.runtime.metrics.connection_closed()

    def pause_writing(self) -> None:
        self.paused_writing = True
        if self.listener is not None:
            self.listener.client_paused()

    def resume_writing(self) -> None:
        self.paused_writing = False
        self._wake_drain()
        if self.listener is not None:
            self.listener.client_resumed()

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- reading ------------------------------------------------------------------------
    def _more(self, deadline: float | None) -> Waiter:
        """What to await for new bytes (or EOF): True when `deadline` passed first (the
        caller raises ClientTimeout). A future, not a coroutine: see sidecar.deadlines."""
        if self._reading_paused:
            self._reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return self._wakeup.wait(deadline)

    async def read_head(self, idle_deadline: float, head_deadline: float) -> bytes | None:
        """The next raw request head (up to and including its blank line), or None at a clean EOF.

        Waits for the first byte until `idle_deadline` (ClientTimeout(False): close quietly),
        then for the whole head until `head_deadline` (header_timeout after the connection's
        start or the previous response's end), or header_timeout after that first byte when
        it came later than that, on a connection kept idle under keepalive_timeout
        (ClientTimeout(True): answer 408). Returns b"" when the head grows past
        max_header_bytes, and raises ClientGone on EOF inside a head. While the head is not
        complete, each read is judged as it arrives (`request_head_read`, the new bytes
        only): MalformedHead as soon as they hold what no head may hold (answer 400), not
        at the timeout; a head that comes whole in one read is never looked at here.
        """
        loop = self.loop
        limits = self.runtime.config.limits
        buffer = self.buffer
        started = False
        deadline = idle_deadline
        scanned = 0  # the bytes of the buffer looked at: searched for the blank line, judged
        state = REQUEST_START  # what the next read of the head is judged with
        while True:
            # RFC 9112 2.2: ignore empty lines before a request line (looked for only when
            # the buffer starts with CR or LF: slices and compares cost a request each)
            if buffer and buffer[0] in _CR_LF:
                while buffer[:1] == b"\n" or buffer[:2] == b"\r\n":
                    del buffer[: 1 if buffer[:1] == b"\n" else 2]
                scanned, state = 0, REQUEST_START  # the head starts afresh past them
            if buffer:  # (nothing to look for a head in, an idle connection's usual wait)
                if not started:
                    started = True
                    now = self.head_began = loop.time()
                    deadline = head_deadline if now < head_deadline else now + limits.header_timeout
                end = find_head_end(buffer, max(0, scanned - 3))
                if end >= 0:
                    return b"" if end > limits.max_header_bytes else bytes(buffer[:end])
                if len(buffer) > limits.max_header_bytes:
                    return b""
                judged = request_head_read(state, bytes(buffer[scanned:]))
                if judged is None:
                    raise MalformedHead()
                state = judged
                scanned = len(buffer)
            if self.eof or self.closed:
                if buffer:
                    raise ClientGone()
                return None
            if await self._more(deadline):
                raise ClientTimeout(started)

    def feed_h11(self, conn: h11.Connection) -> None:
        """Move everything buffered into `conn`."""
        if self.buffer:
            conn.receive_data(bytes(self.buffer))
            self.buffer.clear()
        if self.eof:
            conn.receive_data(b"")

    def body_at_hand(self, length: int) -> bytes | None:
        """A `Content-Length` body of `length` bytes taken from the buffer when it is all
        there (else None: `read_body` waits for it), without a coroutine."""
        buffer = self.buffer
        if len(buffer) < length:
            return None
        body = bytes(buffer[:length])
        del buffer[:length]
        return body

    async def read_body(self, length: int, conn: h11.Connection, deadline: float) -> bytes:
        """A `Content-Length` request body, read here rather than through h11 (which was fed
        only the head); sends 100 Continue when the client waits. ClientGone if it leaves."""
        while (body := self.body_at_hand(length)) is None:
            if self.closed or self.eof:
                raise ClientGone()
            self._continue(conn)
            if await self._more(deadline):
                raise ClientTimeout()
        return body

    def _continue(self, conn: h11.Connection) -> None:
        """`100 Continue` when the client waits for it before sending its body."""
        if conn.they_are_waiting_for_100_continue:
            self.write(conn.send(
                h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")))

    async def next_request_event(
        self, conn: h11.Connection, deadline: float, room: int | None = None
    ) -> h11.Event | type[h11.PAUSED]:
        """The next h11 event of the request body; sends 100 Continue when the client waits.

        One read can hold tens of thousands of tiny chunks: the body data h11 has ready comes
        as one `Data` (see `_join_data`), and every `_YIELD_EVERY` events in a row, the other
        connections get a turn. `room`: how much more of the body `max_request_body` allows;
        a chunk whose size line declares more is TooLarge before any wait for its data (see
        `chunk_left`), not at `body_timeout`."""
        held = self._held
        if held is not None:
            self._held = None
            if held[0] is conn:
                if isinstance(held[1], h11.RemoteProtocolError):
                    raise held[1]
                return held[1]
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                self._events_in_a_row += 1
                # cast: h11 annotates Data.data as bytes but hands out bytearray, and mypyc
                # checks a read against its annotation (free there; a call in pure Python)
                if type(event) is h11.Data and len(cast(Any, event).data) < _BODY_PIECE:
                    event = self._join_data(conn, event)
                if self._events_in_a_row >= _YIELD_EVERY:
                    self._events_in_a_row = 0
                    await asyncio.sleep(0)
                return cast("h11.Event | type[h11.PAUSED]", event)
            self._events_in_a_row = 0
            if self.closed:
                raise ClientGone()
            if room is not None and self.chunk_left(conn) > room:
                raise TooLarge()
            self._continue(conn)
            if self.buffer:  # bytes that arrived while nobody was reading
                self.feed_h11(conn)
                continue
            if self.eof:
                conn.receive_data(b"")
                continue
            if await self._more(deadline):
                raise ClientTimeout()
            self.feed_h11(conn)

    @staticmethod
    def chunk_left(conn: h11.Connection) -> int:
        """Bytes of the chunk `conn` is reading that have not come yet: its size line's
        value less the data h11 gave (0 outside a chunk, and for a `Content-Length` body).
        A chunk declared past `max_request_body` is too large as soon as its size line
        is read, as a `Content-Length` past it is at the head: nothing waits for bytes
        that can only be refused (h11 keeps the count in its chunked reader, the same
        in 0.14-0.16, as pinned)."""
        return getattr(getattr(conn, "_reader", None), "_bytes_in_chunk", 0)

    def _join_data(self, conn: h11.Connection, first: Any) -> h11.Data:
        """`first` and the body data h11 has ready after it, as one `Data` of up to
        `_BODY_PIECE` bytes (and `_YIELD_EVERY` events in a row): a chunked body of 1-byte
        chunks would otherwise cost an object (~100 bytes) per byte, held whole on a route
        that reads JSON and written to the worker one chunk at a time on a passthrough one.
        The event (or error) that ends the run is held for the next call."""
        pieces = [first.data]
        size = len(first.data)
        while size < _BODY_PIECE and self._events_in_a_row < _YIELD_EVERY:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._held = (conn, exc.with_traceback(None))  # after the data before it
                break
            if event is h11.NEED_DATA:
                break
            self._events_in_a_row += 1
            if type(event) is not h11.Data:
                self._held = (conn, event)  # type: ignore[assignment]
                break
            data = cast(Any, event).data  # see next_request_event
            pieces.append(data)
            size += len(data)
        return first if len(pieces) == 1 else h11.Data(data=b"".join(pieces))

    # -- writing ------------------------------------------------------------------------
    def write(self, data: bytes | bytearray) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    @property
    def in_flight(self) -> bool:
        """What a graceful drain waits for: a request being answered, one received and not
        yet answered (pipelined, or arrived as the drain began), or an answer written but
        still in this process's buffers (a client that reads slowly)."""
        return self.busy or self.request_pending or self.unsent

    @property
    def request_pending(self) -> bool:
        """Bytes of a request have arrived and wait to be read (blank lines, which RFC 9112
        lets a client send between requests, are none)."""
        return bool(self.buffer) and bool(self.buffer.lstrip(b"\r\n"))

    @property
    def unsent(self) -> bool:
        """Bytes of an answer still in this process (the transport's buffer), not yet handed
        to the kernel: lost if the process exits now (the kernel's send queue is not)."""
        transport = self.transport
        return transport is not None and not self.closed and transport.get_write_buffer_size() > 0

    @property
    def backlog(self) -> int:
        """Bytes written to the client that it has not taken yet: in the transport's buffer
        and in the kernel's send queue (SIOCOUTQ). While it shrinks the client reads, however
        slowly: the measure of `send_timeout`. A syscall: for a client held back only."""
        transport = self.transport
        if transport is None:
            return 0
        queued = transport.get_write_buffer_size()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                out = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                queued += int.from_bytes(out, sys.byteorder, signed=True)
        return queued

    async def drained(self, timeout: float) -> bool:
        """Wait until the transport's write buffer is below its high-water mark: False when
        the client takes nothing of it for `timeout` (it does not read) or it closed. Its
        backlog is looked at every eighth of `timeout`, as the response pump does."""
        stall = self.send_stall(timeout)
        while self.paused_writing and not self.closed:
            self._drain_waiter = self.loop.create_future()
            try:
                async with asyncio.timeout(timeout / 8):
                    await self._drain_waiter
            except TimeoutError:
                if stall.over(self.backlog, self.loop.time()):
                    return False
            finally:
                self._drain_waiter = None
        return not self.closed

    def send_stall(self, timeout: float) -> SendStall:
        """A watch, from now, on whether this client takes nothing for `timeout`."""
        return SendStall(self.backlog, self.loop.time(), timeout)

    def close(self, discard_input: bool = False) -> None:
        """Close after what was written. With `discard_input` (the client may still be sending:
        a head refused, a request body not read), first only for writing: the answer ends with
        a FIN, and what the client sends is read and dropped until it closes too, at most
        DISCARD_TIME, so that it can read the answer before the close (see DISCARD_TIME).
        Such a connection no longer counts towards `max_connections`."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.discarding:
            return
        if discard_input and not self.eof and transport.can_write_eof():
            self.discarding = True
            self.closed = True  # for everything but dropping input: its slot is free now
            self._release_slot()
            self.buffer.clear()
            if self._reading_paused:
                self._reading_paused = False
                transport.resume_reading()
            transport.write_eof()
            self._linger_timer = self.loop.call_later(DISCARD_TIME, self._stop_discarding)
            self.runtime.lingering[self] = None
            _trim_lingering(self.runtime, 0)
            return
        self._close_transport(transport)

    def _stop_discarding(self) -> None:
        self.runtime.lingering.pop(self, None)
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self._close_transport(self.transport)

    def _close_transport(self, transport: asyncio.Transport) -> None:
        transport.close()
        if transport.get_write_buffer_size():
            # what is left goes out as the client reads it; a client that takes none of
            # it for send_timeout is not waited on for ever
            self._linger(self.send_stall(self.runtime.config.limits.send_timeout))

    def _linger(self, stall: SendStall) -> None:
        """Look at a closed connection's backlog again an eighth of send_timeout later."""
        self._linger_timer = self.loop.call_later(stall.timeout / 8, self._linger_look, stall)

    def _linger_look(self, stall: SendStall) -> None:
        if self.transport is None:  # (connection_lost cancels the look)
            return
        if stall.over(self.backlog, self.loop.time()):
            self.transport.abort()
        else:
            self._linger(stall)

    def abort(self) -> None:
        """Drop the connection without finishing the response (the client sees the break)."""
        if self.transport is not None:
            self.transport.abort()


def _trim_lingering(runtime: Runtime, new: int) -> None:
    """Drop the oldest lingering closes (`ClientConnection.close` with `discard_input`) while
    they hold more than their share of descriptors: they count towards no connection limit,
    so clients refused while they kept sending could otherwise fill the fd table, and then
    neither a new client nor a worker connection would get a descriptor (no 503 either:
    accept() fails). At most `max_connections` of them, and never a descriptor that the
    open connections and `new` more (each with a worker connection) need within the fd
    limit's cap. A dropped one may lose the end of its answer to the reset."""
    lingering = runtime.lingering
    room = 2 * (runtime.fd_cap - runtime.connections - new)
    while lingering and (len(lingering) > room or len(lingering) > runtime.max_connections):
        conn = next(iter(lingering))
        del lingering[conn]
        if conn._linger_timer is not None:
            conn._linger_timer.cancel()
            conn._linger_timer = None
        if conn.transport is not None:
            conn.transport.abort()
