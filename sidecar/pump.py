"""The response pump: moves one worker response body to the client inside the worker's callbacks.

I/O shell. The worker connection's `data_received` calls straight into the
pump, which decodes the body (chunked fast path, else h11), hands it to the
body handler, keeps the idle timeout and heartbeat, follows the client's
backpressure, and decides once how the response ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import TYPE_CHECKING, Any, Final

import h11

from sidecar import failures
from sidecar.chunked import ChunkedError, first_chunk_end
from sidecar.dialects.jsonio import StreamProtocolError
from sidecar.failures import Failure
from sidecar.framing import BodyDecoder
from sidecar.handlers import BodyHandler
from sidecar.upstream import UpstreamConnection

if TYPE_CHECKING:
    from sidecar.config import RouteConfig
    from sidecar.exchange import Exchange
    from sidecar.server import SendStall

log = logging.getLogger("sidecar.exchange")

#: chunks of one read decoded one at a time while the fast lane waits for its template
_SPLITS_PER_READ: Final = 4
#: After the stream's last event, how long the end of its body is waited for (at most
#: idle_timeout): a worker that sends nothing more does not hold the client until then.
END_GRACE: Final = 1.0


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
        decoder: BodyDecoder | None,
    ) -> None:
        self.ex = exchange
        self.up = upstream
        # chunked and fixed-length bodies skip h11's event machinery (sidecar.framing)
        self.decoder = decoder
        self.handler = handler
        handler.bind(self)
        self.loop = exchange.loop
        self.idle_timeout = route.upstream.idle_timeout
        self.heartbeat = route.heartbeat
        #: made by `start` when the response outlasts it: set when the response is over
        self.done: asyncio.Future[None] | None = None
        self.finished = False
        self.clean = False
        self.eof = False
        self.paused = False
        self.stall: SendStall | None = None  # while the client holds the worker back
        self.send_timeout = exchange.generation.config.limits.send_timeout
        # Silence is noticed at the timer's looks, not per read: the worker connection only
        # marks that a read happened (`rx_seen`), and the timer looks at least every eighth
        # of the shortest wait, so a silence is noticed at most that much late, never early.
        self.last_rx = self.loop.time()  # when the timer last saw the worker active
        self.last_beat = self.last_rx
        self.end_due: float | None = None  # set when the stream's last event came
        upstream.rx_seen = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Feed what came with the worker's head, then take the reads to come. A body that
        ended within that feed (a non-streaming answer, sent with its head) is over here:
        it never needed a timer, nor a future to wait on (`done` stays None)."""
        if self.ex.client.paused_writing:
            self.client_paused()
        # what came with the worker's head is fed first: a held response head goes out with
        # its first write, or alone (`head_out`) before the lane can write
        if self.decoder is not None:
            buffered, closed = self.up.h11.trailing_data
            if buffered or self.decoder.done:  # done: an empty fixed-length body
                self._take(buffered)
                self.handler.head_out()
                self.arm_lane()
                self._watch_for_end()
            else:
                self.handler.head_out()
            if closed and not self.finished:
                self.upstream_eof()
        else:
            if not self.finished:
                self._drain()
                self._watch_for_end()
            self.handler.head_out()
        if not self.finished:
            self.done = self.loop.create_future()
            if self._timer is None:  # (the stream's last event may have set one: _wait_for_end)
                self._schedule()
            self.up.attach(self)

    # -- the worker side (BodyConsumer) ---------------------------------------------
    def upstream_data(self, data: bytes) -> None:
        # A read the worker connection's own lane check did not take (see arm_lane).
        self._take(data)
        self.arm_lane()
        self._watch_for_end()

    def _watch_for_end(self) -> None:
        """Once the stream's last event came, wait for the body's end `END_GRACE` at most."""
        if self.end_due is None and not self.finished and self.handler.stream_ended:
            self._wait_for_end()

    def _wait_for_end(self) -> None:
        self.end_due = self.loop.time() + min(END_GRACE, self.idle_timeout)
        if self._timer is not None:
            self._timer.cancel()
        self._schedule()

    def arm_lane(self) -> None:
        """Arm the worker connection's fast-lane check for the reads to come, or disarm it.

        The read every token is, one whole chunk of the handler's text template, is then
        taken in the connection's data callback without calling the pump: what the lane
        matches can change only here (the handler's template and parser state, the
        decoder between chunks), after a read went the general way, and disarms when the
        response ends (the connection's `detach`)."""
        decoder = self.decoder
        if self.finished or decoder is None or not decoder.at_boundary:
            self.up.disarm_lane()
            return
        handler = self.handler
        template = handler.lane_template
        if template is None:
            self.up.disarm_lane()
        else:
            self.up.arm_lane(template, handler.lane_write, handler.lane_sink)

    def _take(self, data: bytes) -> None:
        decoder = self.decoder
        if decoder is None:
            self.up.h11.receive_data(data)
            self._drain()
            return
        # Between chunks, whole template chunks take the lane. Before the lane has its
        # template, a chunk is decoded alone and the lane tried again after it (a response's
        # first events often share a read with the tokens after them), a few times per read;
        # once it has one, what it does not take goes the general way, in one write.
        split = 0
        while decoder.at_boundary:
            handler = self.handler
            if not handler.lane:
                break
            taken = handler.whole_chunks(data)
            if taken:
                if taken == len(data):
                    return
                data = data[taken:]
            if split == _SPLITS_PER_READ or handler.lane_template is not None:
                break
            split += 1
            end = first_chunk_end(data)
            if not end or end == len(data):
                break
            if not self._decode(data[:end]):
                return
            data = data[end:]
        self._decode(data)

    def _decode(self, data: bytes) -> bool:
        """Body bytes the general way: decoded, handed to the handler, the response ended at
        its last chunk. False once the response is over (ended or failed)."""
        decoder = self.decoder
        assert decoder is not None
        try:
            pieces = decoder.feed(data)
            if pieces:
                self.handler.data(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        except ChunkedError as exc:
            if exc.pieces:  # what arrived intact before the break still goes out
                self._deliver(b"".join(exc.pieces))
            self.fail(failures.UPSTREAM_PROTOCOL_ERROR, str(exc))
            return False
        except StreamProtocolError as broken:  # a name of its own: mypyc types `exc` once
            self.fail(failures.UPSTREAM_PROTOCOL_ERROR, str(broken))
            return False
        if decoder.done and not self.finished:
            if decoder.trailing:
                self.up.keep_alive = False
            self._end()
        return not self.finished

    def _deliver(self, payload: bytes | bytearray) -> bool:
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
                # Any: h11 annotates Data.data as bytes but hands out bytearray, and mypyc
                # checks an attribute read against its annotation
                event: Any = h.next_event()
            except h11.RemoteProtocolError as exc:
                if self.eof:
                    self.fail(failures.UPSTREAM_DISCONNECTED, "the body ended early")
                else:
                    log.debug("worker response body refused by h11: %s", exc)
                    self.fail(failures.UPSTREAM_PROTOCOL_ERROR, "malformed response body")
                return
            kind = type(event)
            if kind is h11.Data:
                if not self._deliver(event.data):
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
            # h11 frames only bodies without chunks or a length: those end at the close
            ok = self.handler.end(at_close=self.eof and self.decoder is None)
        except StreamProtocolError as exc:
            self.fail(failures.UPSTREAM_PROTOCOL_ERROR, str(exc))
            return
        if not ok:
            if self.eof:  # a body read until close: that close cut the stream short
                self.fail(failures.UPSTREAM_DISCONNECTED, "the connection closed mid-stream")
            else:
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
        if self.handler.stream_ended and not ex._client_gone:
            # The stream was whole: the client gets it as it ended, and nothing after it.
            log.info("the worker's stream had ended when %s (%s); it is complete",
                     failure.message, detail or failure.code)
            with contextlib.suppress(StreamProtocolError):
                if self.handler.end():
                    self._close()
                    return
        if failure is not failures.UPSTREAM_PROTOCOL_ERROR and self.handler.framing_broken:
            # a line that is no SSE field line came before the close, the silence or the
            # body's end (an HTML page with no blank line after it): that broke the stream
            failure = failures.UPSTREAM_PROTOCOL_ERROR
            detail = "a line of the event stream is not an SSE field line"
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
        done = self.done
        if done is not None and not done.done():
            done.set_result(None)

    # -- the client side (via the exchange) -----------------------------------------------
    def client_lost(self) -> None:
        if self.finished:
            return
        self.up.close()
        source = self.ex.outcome_source
        if source is not None and source.worker_error:  # it saw the worker's own error
            self.ex.outcome = "upstream_error"
        elif source is None or not source.ended or not self.ex.head_sent:
            self.ex.outcome = "client_disconnect"
        # else the stream's last event had gone out to the client (an SDK closes at [DONE],
        # maybe before the body's last chunk came): the outcome stays what it was. Not at a
        # finish_reason (the usage chunk follows it), nor while an aggregation's document,
        # the client's whole answer, was still to be written.
        self.ex.close_after = True
        self._close()

    def client_paused(self) -> None:
        if self.finished:  # the worker connection may be back in the pool already
            return
        self.paused = True
        self.stall = self.ex.client.send_stall(self.send_timeout)
        self.up.pause_reading()

    def client_resumed(self) -> None:
        if self.finished:
            return
        self.paused = False
        self.last_rx = self.loop.time()
        self.up.resume_reading()
        if self.end_due is not None:  # the grace counts while the worker is read, only
            self._wait_for_end()

    # -- time -------------------------------------------------------------------------------
    def _schedule(self) -> None:
        due = self.last_rx + self.idle_timeout
        if self.heartbeat is not None:
            due = min(due, max(self.last_rx, self.last_beat) + self.heartbeat)
        if self.end_due is not None and not self.paused:
            due = min(due, self.end_due)
        # (worked out here, not per response: most responses end before they need a timer)
        look_every = min(self.idle_timeout, self.send_timeout, self.heartbeat or math.inf) / 8
        due = min(due, self.loop.time() + look_every)
        self._timer = self.loop.call_at(due, self._tick)

    def _tick(self) -> None:
        if self.finished:
            return
        now = self.loop.time()
        up = self.up
        if self.paused and self.stall is not None and self.stall.over(self.ex.client.backlog, now):
            # backpressure is not the worker's silence, but a client that takes no byte for
            # send_timeout is gone (one that reads is not: see SendStall)
            self.ex.client.abort()
            self.client_lost()
            return
        if self.end_due is not None and now >= self.end_due and not self.paused:
            # the stream ended: the worker's silence since costs the client nothing (fail)
            self.fail(failures.UPSTREAM_TIMEOUT, "no end of the body after the stream's last event")
            return
        if up.rx_seen or self.paused:
            # bytes came since the last look, or the client held the worker back: not silence
            up.rx_seen = False
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
            self.ex.write_data(self.handler.heartbeat)
        self._schedule()
