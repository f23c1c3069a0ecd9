"""The admin port: GET /healthz, /readyz and /metrics over a minimal h11 server.

I/O shell only. It answers one request per connection and never touches the
client-facing traffic; /readyz asks every worker the routes send to for a TCP connection. It is
served by the one process with `workers: 1`, and by the supervising parent
with `workers: N`, where /metrics is the sum over every worker process (the
caller passes how metrics are rendered, see `local_metrics`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, cast

import h11

from sidecar.headers import reason
from sidecar.metrics import CONTENT_TYPE
from sidecar.upstream import probe

if TYPE_CHECKING:
    from sidecar.config import Address, Config
    from sidecar.runtime import Runtime

_MAX_HEAD = 16 * 1024

#: Renders the Prometheus text of a scrape (may ask other processes first).
RenderMetrics = Callable[[], Awaitable[bytes]]


class AdminState(Protocol):
    """What the admin port reads: the running config (for /readyz's probe of the
    worker) and whether the daemon is draining (then /readyz answers 503)."""

    @property
    def config(self) -> Config: ...

    @property
    def draining(self) -> bool: ...


def local_metrics(runtime: Runtime) -> RenderMetrics:
    """/metrics of one process: its own registry (the `workers: 1` daemon)."""

    async def render() -> bytes:
        return runtime.metrics.render()

    return render


class AdminConnection(asyncio.Protocol):
    """One admin connection: reads one request head, answers, closes.

    `live`, when given, holds the connections open right now (the supervising
    process closes its copies of them in a worker process it forks).
    """

    def __init__(
        self,
        state: AdminState,
        render_metrics: RenderMetrics,
        live: set[AdminConnection] | None = None,
    ) -> None:
        self.state = state
        self.render_metrics = render_metrics
        self.live = live
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        self.transport: asyncio.Transport | None = None
        self.handled = False
        self._task: asyncio.Task[None] | None = None  # the answer being written
        self.head_only = False  # the request is a HEAD: the answer has no body

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.live is not None:
            self.live.add(self)
        asyncio.get_running_loop().call_later(10.0, self._expire)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.live is not None:
            self.live.discard(self)

    def eof_received(self) -> bool:
        """The client closed its sending side: a request already read is still answered
        (`printf 'GET /readyz ...' | nc -N`), so the transport stays open for writing."""
        return self.handled

    def _expire(self) -> None:
        if self.transport is not None and not self.handled:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.handled:
            return
        self.conn.receive_data(data)
        try:
            event = self.conn.next_event()
        except h11.RemoteProtocolError:
            self._reply(400, b"bad request\n")
            return
        if isinstance(event, h11.Request):
            self.handled = True
            # held: the loop keeps only a weak reference to a task
            self._task = asyncio.get_running_loop().create_task(self._answer(event))

    async def _answer(self, request: h11.Request) -> None:
        path = request.target.partition(b"?")[0]
        self.head_only = request.method == b"HEAD"
        if request.method not in (b"GET", b"HEAD"):
            self._reply(405, b"method not allowed\n", extra=[(b"allow", b"GET, HEAD")])
        elif path == b"/healthz":
            self._reply(200, b"ok\n")
        elif path == b"/readyz":
            unreachable = await unreachable_workers(self.state.config)
            if self.state.draining:
                self._reply(503, b"draining\n")
            elif unreachable:
                listed = ", ".join(str(address) for address in unreachable)
                self._reply(503, f"worker unreachable: {listed}\n".encode())
            else:
                self._reply(200, b"ready\n")
        elif path == b"/metrics":
            self._reply(200, await self.render_metrics(), CONTENT_TYPE.encode())
        else:
            self._reply(404, b"not found\n")

    def _reply(
        self,
        status: int,
        body: bytes,
        content_type: bytes = b"text/plain",
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *(extra or ()),
        ]
        try:
            head = self.conn.send(h11.Response(status_code=status, headers=headers, reason=reason(status)))
        except h11.LocalProtocolError:
            head = b"HTTP/1.1 %d x\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (
                status,
                len(body),
            )
        # a HEAD answer is the GET answer's head alone (RFC 9110 9.3.2)
        self.transport.write(head if self.head_only else head + body)
        self.transport.close()


async def unreachable_workers(config: Config) -> list[Address]:
    """The workers that accept no TCP connection now, of all the routes send to (each
    route's own `upstream:` or the top-level one), each probed once and all at once."""
    workers = {route.upstream.address: route.upstream for route in config.routes}
    if not workers:
        workers[config.upstream.address] = config.upstream
    answers = await asyncio.gather(*(probe(upstream) for upstream in workers.values()))
    return [address for address, up in zip(workers, answers, strict=True) if not up]
