"""`sidecar demo`: the bundled demo worker and the daemon in front of it, in one process.

Ports come from the environment (SIDECAR_LISTEN, SIDECAR_ADMIN_LISTEN,
SIDECAR_DEMO_WORKER_PORT) or are free ones. The daemon's URL is printed
before any other URL, then a curl line to try. Ctrl-C or SIGTERM stops both.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys

import uvloop

from sidecar.daemon import StartupError, bound_address, load_or_exit, open_sockets, serve
from sidecar.demo_worker import start_demo_worker
from sidecar.logs import setup_logging
from sidecar.systemd import Notifier


def demo_worker_port() -> int:
    """`$SIDECAR_DEMO_WORKER_PORT` (unset or empty: 0, a free port)."""
    text = os.environ.get("SIDECAR_DEMO_WORKER_PORT", "").strip()
    if not text:
        return 0
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise StartupError(
            f"SIDECAR_DEMO_WORKER_PORT must be a port number from 0 to 65535, got {text!r}"
        )
    return int(text)


async def _demo(path: str) -> int:
    port = demo_worker_port()
    try:
        worker = await start_demo_worker(port=port)
    except OSError as exc:
        raise StartupError(
            f"cannot listen on 127.0.0.1:{port} for the demo worker:"
            f" {os.strerror(exc.errno) if exc.errno else exc}"
        ) from None
    worker_port = worker.sockets[0].getsockname()[1]
    os.environ["SIDECAR_UPSTREAM"] = f"http://127.0.0.1:{worker_port}"
    os.environ.setdefault("SIDECAR_LISTEN", "127.0.0.1:0")
    os.environ.setdefault("SIDECAR_ADMIN_LISTEN", "127.0.0.1:0")
    config = load_or_exit(path)
    setup_logging(config.log_format, config.log_level)
    sockets = open_sockets(config)
    url, curl = _reach(sockets.listen)
    out = sys.stdout
    out.write(f"sidecar demo: the daemon is at {url}\n")
    out.write(f"  demo worker: http://127.0.0.1:{worker_port}\n")
    if sockets.admin is not None:
        admin_url, admin_curl = _reach(sockets.admin)
        if admin_url == admin_curl:
            out.write(f"  admin:       {admin_url}/metrics\n")
        else:
            out.write(f"  admin:       {admin_url} (curl {admin_curl}/metrics)\n")
    if config.usage_log:
        out.write(f"  ledger:      {config.usage_log}\n")
    out.write(
        "try:\n"
        f"  curl -N {curl}/v1/chat/completions -H 'content-type: application/json' "
        '-d \'{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}\'\n'
        "Ctrl-C stops both.\n"
    )
    out.flush()
    try:
        return await serve(config, sockets, Notifier())
    finally:
        worker.close()


def _reach(sock: socket.socket) -> tuple[str, str]:
    """How to name a listening socket, and how curl reaches it: `http://host:port` for
    both, or for a unix socket `unix:/path` and `--unix-socket /path http://localhost`."""
    address = bound_address(sock)
    if address.startswith("unix:"):
        path = address.removeprefix("unix:")
        return address, f"--unix-socket {shlex.quote(path)} http://localhost"
    return "http://" + address, "http://" + address


def run_demo(path: str) -> int:
    return uvloop.run(_demo(path))
