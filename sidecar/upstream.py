"""The worker side: h11 CLIENT connections over TCP or a unix socket, and their keep-alive pool.

I/O shell only: it moves bytes between a transport and an h11 state machine
and reports what happened; deciding what a failure means is the exchange's
job. A body consumer (the exchange's response pump) is fed synchronously from
`data_received`, so a streamed token crosses no task switch on its way out; the
read every token is (one whole chunk of the fast lane's template, sidecar.fastlane)
does not even reach the pump once the pump has armed the lane here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol, cast

import h11

from sidecar import failures
from sidecar.config import UpstreamConfig
from sidecar.deadlines import Wakeup
from sidecar.failures import UpstreamFailure
from sidecar.fastlane import TextTemplate, chunk_text
from sidecar.headers import (
    HEAD_START,
    STATUS_LINE_START_SIZE,
    Header,
    begins_status_line,
    head_read,
    splice_lines,
)

if TYPE_CHECKING:
    from sidecar.dialects.base import StreamTranslator


#: Bytes of a response kept while nobody reads it (a passthrough request body still being
#: passed on, a worker that answers early): past this, reading pauses until the head is read
PENDING_HIGH_WATER: Final = 256 * 1024
#: the event loop's timers fire to the millisecond: a deadline closer than this is reached
TIMER_RESOLUTION: Final = 0.001


class BodyConsumer(Protocol):
    """Receives a worker connection's bytes once the response head has been read."""

    paused: bool  # it holds the worker back (its client does not take what it is sent)

    def upstream_data(self, data: bytes) -> None: ...
    def upstream_eof(self) -> None: ...
    def upstream_lost(self, exc: Exception | None) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One connection to the worker with its h11 CLIENT state machine."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_head: int) -> None:
        self.loop = loop  # handed over: asyncio.get_running_loop() is a getpid() per call
        self.max_head = max_head
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)
        self.transport: asyncio.Transport | None = None
        self.consumer: BodyConsumer | None = None
        self.closed = False
        self.eof = False
        self.response_started = False  # a byte of the current response has arrived
        self.response_complete = False  # the current response's body ended cleanly
        self.keep_alive = True  # the worker did not ask to close after this response
        self.request_sent = False  # the current request went out whole, body included
        # h11 has said NEED_DATA and been given nothing since (or holds nothing, a fresh
        # cycle): `next_event` does not ask it again until bytes come (an h11 call saved
        # before and after the wait for every response head)
        self._h11_starved = True
        # the head being read is known to begin as a status line must (see `next_event`)
        self._head_begun = False
        # what the next read of the head is judged with (see `_check_head_bytes`)
        self._head_state = HEAD_START
        # an interim (1xx) response was read: what h11 holds past it is the next head's
        # start, not yet judged (see `next_event`)
        self._after_interim = False
        #: bytes h11 was given in this cycle's head phase: no head is larger than them (a
        #: head's size is measured only past `max_head` of them, see `Exchange._response_head`)
        self.head_bytes = 0
        self._pending: list[bytes] = []  # bytes before a consumer (a list: a deque is 770 B)
        self._pending_size = 0
        self._held_back = False  # reading paused: _pending reached PENDING_HIGH_WATER
        self._wakeup = Wakeup(loop)  # the head phase waits on it for bytes, EOF or a close
        #: loop time this connection went idle in the pool; None while it is not there
        self.idle_since: float | None = None
        #: its pool-idle timer, armed at the first release and kept through reuses (see
        #: `UpstreamPool._expire`); None when not armed
        self._pool_timer: asyncio.TimerHandle | None = None
        self.rx_seen = False  # a read happened since the response pump's timer last looked
        self.lane_template: TextTemplate | None = None  # see arm_lane
        self.lane_write: Callable[[bytes], object] | None = None
        self.lane_sink: StreamTranslator | None = None

    # -- asyncio.Protocol -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        # the hot path: every token of every stream passes here, keep it flat
        self.rx_seen = True
        template = self.lane_template
        if template is not None:
            # the fast lane, armed by the response pump between chunks (see arm_lane): a
            # read that is one whole chunk of the template goes as it came (or its string
            # is absorbed) without calling the pump
            text = chunk_text(data, template)
            if text is not None:
                # (armed with a template, the lane has its sink: typed so, a compiled build
                # reads and counts on it natively, not through a generic attribute look-up)
                sink: StreamTranslator = self.lane_sink  # type: ignore[assignment]
                write = self.lane_write
                if write is None:
                    if not sink.absorbed_text(text):
                        self.disarm_lane()  # past the bound: the general way says so
                else:
                    write(data)
                    if text:
                        sink.content_events += 1
                return
        self.response_started = True
        consumer = self.consumer
        if consumer is not None:
            consumer.upstream_data(data)
            return
        if self.idle_since is not None:  # idle in the pool: bytes no request asked for
            self.close()  # (a worker that sends them is not one to reuse, nor to buffer)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > PENDING_HIGH_WATER and not self._held_back:
            # nobody reads this response yet (its request body is still being passed on):
            # the worker waits, its bytes do not pile up here
            self._held_back = True
            self.pause_reading()
        self._wakeup.wake()

    def _take_pending(self) -> bytes:
        """The bytes that came before anyone read them, handed over once."""
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        return data

    def eof_received(self) -> bool:
        self.eof = True
        if self.consumer is not None:
            self.consumer.upstream_eof()
        else:
            self._wakeup.wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._pool_timer is not None:
            self._pool_timer.cancel()
        self._wakeup.close()
        if self.consumer is not None:
            self.consumer.upstream_lost(exc)
        else:
            self._wakeup.wake()

    # -- used by the exchange ------------------------------------------------------
    @property
    def reusable(self) -> bool:
        """Open, not at EOF, the request sent and the response read whole, keep-alive agreed."""
        return (
            not self.closed
            and not self.eof
            and not self._pending
            and self.response_complete
            and self.keep_alive
            and (self.request_sent or self.h11.our_state is h11.DONE)
        )

    def new_cycle(self) -> None:
        """Start a fresh h11 state machine for the next request on this connection."""
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=self.max_head)
        self.response_started = False
        self.response_complete = False
        self.keep_alive = True
        self.request_sent = False
        self._h11_starved = True
        self._head_begun = False
        self._head_state = HEAD_START
        self._after_interim = False
        self.head_bytes = 0

    def send(self, *events: h11.Event) -> None:
        """Serialize h11 events and write them at once; UpstreamFailure if the socket is gone."""
        transport = self._open_transport()
        data = b"".join(self.h11.send(event) or b"" for event in events)
        if data:
            transport.write(data)

    def send_request(self, head: h11.Request, lines: bytes, body: bytes | None) -> None:
        """Send a request head, h11's with header `lines` spliced in (see `split_for_h11`);
        UpstreamFailure if the socket is gone. With `body`, the whole body follows in the
        same write as it is, not as h11 events (the head's Content-Length must be
        `len(body)`); with None it follows as h11 events (`send`)."""
        transport = self._open_transport()
        data = self.h11.send(head)
        assert data is not None
        data = splice_lines(data, lines)
        transport.write(data + body if body else data)
        self.request_sent = body is not None

    @property
    def unflushed(self) -> bool:
        """Bytes written to the worker are still in the transport's buffer (the kernel's send
        buffer was full): see `Exchange._request_flushed`."""
        transport = self.transport
        return transport is not None and transport.get_write_buffer_size() > 0

    def _open_transport(self) -> asyncio.Transport:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise UpstreamFailure(failures.UPSTREAM_DISCONNECTED, "worker connection closed")
        return self.transport

    async def next_event(
        self, deadline: float | None = None
    ) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """The next h11 event of the response, waiting for bytes as needed (head phase);
        TimeoutError when no event is complete by `deadline` (loop time)."""
        while True:
            data = b""
            if self._pending:
                data = self._take_pending()
                self.head_bytes += len(data)
                self.h11.receive_data(data)
                self._h11_starved = False
                if self._held_back:
                    self._held_back = False
                    self.resume_reading()
            if not self._h11_starved:
                event = self.h11.next_event()
                if event is not h11.NEED_DATA:
                    if type(event) is h11.InformationalResponse:
                        self._head_begun = False  # the next head starts after it
                        self._head_state = HEAD_START
                        self._after_interim = True
                    return event
                self._h11_starved = True
                if not self._head_begun:
                    self._check_head_start()
                if self._after_interim:
                    # the bytes that came with the interim response (and any read since):
                    # all that h11 holds is the next head's, judged once
                    self._after_interim = False
                    data = self.h11.trailing_data[0]
                if data:  # (a head that came whole in one read is never looked at here)
                    self._check_head_bytes(data)
            if self.eof or self.closed:
                self.h11.receive_data(b"")
                event = self.h11.next_event()
                if event is h11.NEED_DATA:  # pragma: no cover - h11 always concludes
                    raise h11.RemoteProtocolError("connection closed")
                return event
            # (the wakeup's timer is kept across this connection's requests: see deadlines)
            if await self._wakeup.wait(deadline):
                raise TimeoutError()

    def _check_head_start(self) -> None:
        """UpstreamFailure (protocol error) when the bytes of the head h11 waits to complete
        cannot begin a status line: an HTML page, a JSON body or another protocol's greeting
        broke HTTP framing as it arrived, however long the worker then stays silent or
        whenever it closes. Checked until the head's first bytes are known to begin a status
        line (`HTTP/1.1 200 `); h11's buffer is copied only until then (a few bytes, or the
        one read that brought them)."""
        start = self.h11.trailing_data[0][:STATUS_LINE_START_SIZE]
        if not begins_status_line(start):
            if start[:5] != b"HTTP/"[: len(start)]:
                raise UpstreamFailure(
                    failures.UPSTREAM_PROTOCOL_ERROR, "the worker's answer does not begin with HTTP/"
                )
            raise UpstreamFailure(failures.UPSTREAM_PROTOCOL_ERROR, "malformed response head")
        self._head_begun = len(start) == STATUS_LINE_START_SIZE

    def _check_head_bytes(self, data: bytes) -> None:
        """UpstreamFailure (protocol error) when `data`, the read h11 has just been given and
        found no event in (all of it is head, not yet complete), holds what no head may hold
        (a control byte, a CR not followed by LF as in `HTTP/1.1 200 OK\\rname: ...`, a
        header name that ends other than at its colon): that head can never be completed,
        so it is refused as it arrives, not at `response_timeout`. Only the new read is
        looked at (in a state standing for how the read before it ended), never the whole
        head again; a head that came whole in one read is never looked at here."""
        state = head_read(self._head_state, data)
        if state is None:
            raise UpstreamFailure(failures.UPSTREAM_PROTOCOL_ERROR, "malformed response head")
        self._head_state = state

    def attach(self, consumer: BodyConsumer) -> None:
        """Hand the body over to `consumer`: buffered bytes first, then every new read."""
        self.consumer = consumer
        if self._held_back:
            self._held_back = False
            if not consumer.paused:  # (a consumer that pauses it has paused it already)
                self.resume_reading()
        if self._pending:
            consumer.upstream_data(self._take_pending())
        if self.eof and not self.closed:
            consumer.upstream_eof()
        elif self.closed:
            consumer.upstream_lost(None)

    def detach(self) -> None:
        """The response is over for its consumer: the connection reads again (a pump that
        the client held back paused it), so that in the pool it sees its EOF and its next
        response is read."""
        self.consumer = None
        self.disarm_lane()
        self.resume_reading()

    def arm_lane(
        self,
        template: TextTemplate,
        write: Callable[[bytes], object] | None,
        sink: StreamTranslator | None,
    ) -> None:
        """Take the reads that are one whole chunk of `template` in `data_received`: written
        with `write` as they came and counted by `sink` (or, with no `write`, their string
        handed to `sink.absorbed_text`). Only the response pump arms it (`arm_lane`)."""
        self.lane_template = template
        self.lane_write = write
        self.lane_sink = sink

    def disarm_lane(self) -> None:
        self.lane_template = None
        self.lane_write = None
        self.lane_sink = None

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        """Close at once (RST-free FIN); the worker sees the disconnect and stops generating."""
        self.consumer = None
        self.disarm_lane()
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


class UpstreamPool:
    """Keep-alive connections to one worker address, newest first."""

    def __init__(self, config: UpstreamConfig, max_head: int) -> None:
        self.config = config
        self.max_head = max_head
        self._idle: list[UpstreamConnection] = []
        #: the Host header of every request to this worker, encoded once
        self.host: Header = (b"host", config.host_header.encode())

    def take_idle(self) -> UpstreamConnection | None:
        """A pooled connection ready for its next request, or None (then `connect`). Not a
        coroutine: the pool has one or not, there is nothing to wait for."""
        while self._idle:
            conn = self._idle.pop()
            conn.idle_since = None  # (its timer, if armed, finds it in use: see _expire)
            if conn.reusable:
                conn.new_cycle()
                return conn
            conn.close()
        return None

    async def connect(self) -> UpstreamConnection:
        """A new connection, within connect_timeout; failures are UpstreamFailure."""
        loop = asyncio.get_running_loop()
        address = self.config.address

        def factory() -> UpstreamConnection:
            return UpstreamConnection(loop, self.max_head)

        try:
            async with asyncio.timeout(self.config.connect_timeout):
                if address.kind == "unix":
                    _, conn = await loop.create_unix_connection(factory, address.path)
                else:
                    _, conn = await loop.create_connection(factory, address.host, address.port)
        except TimeoutError:
            raise UpstreamFailure(failures.CONNECT_TIMEOUT) from None
        except OSError as exc:
            raise UpstreamFailure(
                failures.UPSTREAM_UNAVAILABLE, exc.strerror or str(exc), exc.errno
            ) from None
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Return a finished connection to the pool, or close it if it cannot be reused.
        Its response pump has detached it (`detach`) when the response ended."""
        if not conn.reusable or len(self._idle) >= self.config.max_idle_connections:
            conn.close()
            return
        conn.idle_since = conn.loop.time()
        if conn._pool_timer is None:
            conn._pool_timer = conn.loop.call_at(
                conn.idle_since + self.config.pool_idle_timeout, self._expire, conn
            )
        self._idle.append(conn)

    def _expire(self, conn: UpstreamConnection) -> None:
        """A connection's pool-idle timer: close it if it has been idle pool_idle_timeout.
        The timer is not cancelled and armed again per request (a connection taken and
        given back between two requests): when it finds the connection idle for less, or
        in use, it is armed again for when the connection's idle time will be up, or left
        for the next release to arm."""
        conn._pool_timer = None
        if conn.idle_since is None:
            return
        due = conn.idle_since + self.config.pool_idle_timeout
        if due - conn.loop.time() > TIMER_RESOLUTION:
            conn._pool_timer = conn.loop.call_at(due, self._expire, conn)
            return
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)
        conn.close()

    def close(self) -> None:
        """Close every idle connection (config reload, shutdown)."""
        while self._idle:
            self._idle.pop().close()

    @property
    def idle_count(self) -> int:
        return len(self._idle)


async def probe(config: UpstreamConfig) -> bool:
    """True when the worker accepts a connection now (for /readyz)."""
    loop = asyncio.get_running_loop()
    address = config.address
    try:
        async with asyncio.timeout(min(config.connect_timeout, 2.0)):
            if address.kind == "unix":
                transport, _ = await loop.create_unix_connection(asyncio.Protocol, address.path)
            else:
                transport, _ = await loop.create_connection(
                    asyncio.Protocol, address.host, address.port
                )
    except (OSError, TimeoutError):
        return False
    transport.close()
    return True
