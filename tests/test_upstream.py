"""Timers kept across the requests of one worker connection.

A pooled connection's idle timer is armed once and kept while the connection is reused
(`UpstreamPool._expire`): it must still close a connection exactly when it has been
idle `pool_idle_timeout`, counted from its last release, never from an earlier one. The
head phase's response_timeout timer is kept across requests too (the connection's
`Wakeup`, see `sidecar/deadlines.py`): each request's wait times out at its own deadline.
"""

from __future__ import annotations

import asyncio

import h11
import pytest

from sidecar.config import Address, UpstreamConfig
from sidecar.upstream import UpstreamConnection, UpstreamPool


def _finished(conn: UpstreamConnection) -> UpstreamConnection:
    """As a connection whose request and response went whole (what `reusable` asks)."""
    conn.request_sent = True
    conn.response_complete = True
    return conn


def test_a_reused_connection_idles_out_from_its_last_release() -> None:
    async def run() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        config = UpstreamConfig(
            url=f"http://127.0.0.1:{port}",
            address=Address(kind="tcp", host="127.0.0.1", port=port),
            host_header=f"127.0.0.1:{port}",
            pool_idle_timeout=0.4,
        )
        pool = UpstreamPool(config, 65536)
        conn = await pool.connect()
        pool.release(_finished(conn))
        await asyncio.sleep(0.25)
        again = pool.take_idle()
        assert again is conn
        pool.release(_finished(conn))  # idle from here: 0.4 s
        await asyncio.sleep(0.25)  # past the first release's 0.4 s
        assert not conn.closed and pool.idle_count == 1
        await asyncio.sleep(0.25)  # past the last release's
        assert conn.closed and pool.idle_count == 0
        # taken while its timer runs: the timer leaves it alone
        conn = await pool.connect()
        pool.release(_finished(conn))
        await asyncio.sleep(0.1)
        taken = pool.take_idle()
        assert taken is conn
        await asyncio.sleep(0.5)
        assert not conn.closed
        conn.close()
        server.close()
        await server.wait_closed()

    asyncio.run(run())


def test_each_request_on_a_connection_times_out_at_its_own_deadline() -> None:
    answered = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answered)  # the first request only: the second is never answered
        await reader.read()

    async def run() -> None:
        server = await asyncio.start_server(worker, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        config = UpstreamConfig(
            url=f"http://127.0.0.1:{port}",
            address=Address(kind="tcp", host="127.0.0.1", port=port),
            host_header="w",
        )
        loop = asyncio.get_running_loop()
        conn = await UpstreamPool(config, 65536).connect()
        request = h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"w")])
        conn.send_request(request, b"", b"")
        event = await conn.next_event(loop.time() + 0.3)
        assert isinstance(event, h11.Response)
        conn.new_cycle()
        await asyncio.sleep(0.2)
        conn.send_request(request, b"", b"")
        deadline = loop.time() + 0.3  # past the first request's at 0.1 s
        with pytest.raises(TimeoutError):
            await conn.next_event(deadline)
        assert deadline - 0.002 <= loop.time() < deadline + 1.0  # (not at the first one's)
        conn.close()
        server.close()

    asyncio.run(run())
