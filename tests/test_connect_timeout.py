"""SPEC "Config (YAML)" `upstream.connect_timeout` and "errors before the head": a worker
that never completes the TCP handshake (its accept queue is full, so the kernel drops the
SYNs) gives a 504 with the OpenAI-shaped error body, ledger outcome `upstream_timeout`,
and /readyz 503; the real daemon on real sockets."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.harness import LOOPBACK, Daemon, chat_body, chat_route, daemon_config, post


def handshake_completes(port: int, timeout: float) -> bool:
    with socket.socket() as probe:
        probe.settimeout(timeout)
        try:
            probe.connect((LOOPBACK, port))
        except OSError:
            return False
        return True


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener never accepts and whose accept queue is full."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind((LOOPBACK, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((LOOPBACK, port))
        if handshake_completes(port, 0.5):
            pytest.skip("this kernel completes handshakes past a full accept queue")
        yield port


def test_connect_timeout_is_a_504_upstream_timeout(
    silent_port: int, make_daemon: Callable[..., Daemon]
) -> None:
    daemon = make_daemon(daemon_config(
        f"http://{LOOPBACK}:{silent_port}",
        upstream={"connect_timeout": "300ms", "response_timeout": "30s"},
        routes=[chat_route()]))
    response = post(daemon, chat_body(), headers=[("x-request-id", "connect-timeout-1")])
    assert response.status == 504, response.body
    error = response.json()["error"]
    assert error["code"] == "upstream_timeout" and error["type"] and error["message"]
    record = daemon.ledger_for("connect-timeout-1")
    assert (record["outcome"], record["status"]) == ("upstream_timeout", 504)
    assert httpx.get(daemon.admin_url + "/readyz", timeout=10).status_code == 503
