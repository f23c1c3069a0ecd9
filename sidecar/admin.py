"""The admin port: GET /healthz, /readyz and /metrics over a minimal h11 server.

I/O shell only. It answers one request per connection and never touches the
client-facing traffic; /readyz asks the worker for a TCP connection.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import h11

from sidecar.metrics import CONTENT_TYPE
from sidecar.upstream import probe

if TYPE_CHECKING:
    from sidecar.runtime import Runtime

_MAX_HEAD = 16 * 1024


class AdminConnection(asyncio.Protocol):
    """One admin connection: reads one request head, answers, closes."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        self.transport: asyncio.Transport | None = None
        self.handled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        asyncio.get_running_loop().call_later(10.0, self._expire)

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
            asyncio.get_running_loop().create_task(self._answer(event))

    async def _answer(self, request: h11.Request) -> None:
        path = request.target.partition(b"?")[0]
        if request.method not in (b"GET", b"HEAD"):
            self._reply(405, b"method not allowed\n")
        elif path == b"/healthz":
            self._reply(200, b"ok\n")
        elif path == b"/readyz":
            ready = await probe(self.runtime.config.upstream)
            if self.runtime.draining:
                self._reply(503, b"draining\n")
            else:
                self._reply(200 if ready else 503, b"ready\n" if ready else b"worker unreachable\n")
        elif path == b"/metrics":
            self._reply(200, self.runtime.metrics.render(), CONTENT_TYPE.encode())
        else:
            self._reply(404, b"not found\n")

    def _reply(self, status: int, body: bytes, content_type: bytes = b"text/plain") -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            head = self.conn.send(
                h11.Response(
                    status_code=status,
                    headers=[
                        (b"content-type", content_type),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                )
            )
        except h11.LocalProtocolError:
            head = b"HTTP/1.1 %d x\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (
                status,
                len(body),
            )
        self.transport.write(head + body)
        self.transport.close()
