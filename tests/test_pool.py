"""The worker connection pool's idle timeout, with a connection taken and given back.

A pooled connection's timer is armed once and kept while the connection is reused
(`UpstreamPool._expire`): it must still close a connection exactly when it has been
idle `pool_idle_timeout`, counted from its last release, never from an earlier one.
"""

from __future__ import annotations

import asyncio

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
        again, reused = await pool.acquire()
        assert (again, reused) == (conn, True)
        pool.release(_finished(conn))  # idle from here: 0.4 s
        await asyncio.sleep(0.25)  # past the first release's 0.4 s
        assert not conn.closed and pool.idle_count == 1
        await asyncio.sleep(0.25)  # past the last release's
        assert conn.closed and pool.idle_count == 0
        # taken while its timer runs: the timer leaves it alone
        conn = await pool.connect()
        pool.release(_finished(conn))
        await asyncio.sleep(0.1)
        taken, _ = await pool.acquire()
        assert taken is conn
        await asyncio.sleep(0.5)
        assert not conn.closed
        conn.close()
        server.close()
        await server.wait_closed()

    asyncio.run(run())
