"""The process: listening sockets, signals, reloads, graceful drain, systemd, worker processes.

I/O shell. `serve` runs one event loop (uvloop) with the client listener and
the admin port; `run_daemon` binds the sockets once and, for `workers: N`,
forks N such processes that share them, supervising them from the parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import sys
from dataclasses import dataclass, field

import uvloop

from sidecar.admin import AdminConnection
from sidecar.config import Address, Config, ConfigError, load_config
from sidecar.exchange import serve_connection
from sidecar.runtime import Runtime
from sidecar.server import ClientConnection
from sidecar.systemd import Notifier, listen_fds

log = logging.getLogger("sidecar.daemon")


class StartupError(Exception):
    """A clear one-line reason the daemon cannot start (bad bind, bad config)."""


def bind(address: Address, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A listening socket for `address` (TCP or unix), non-blocking, backlog 1024.

    With `listen=False` the socket only holds the address (for SO_REUSEPORT groups,
    where a bound socket that does not listen receives no connections).
    """
    try:
        if address.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(address.path).st_mode):
                    os.unlink(address.path)
            sock.bind(address.path)
        else:
            infos = socket.getaddrinfo(
                address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, kind, proto, _, sockaddr = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(sockaddr)
        if listen:
            sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        raise StartupError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    return sock


def bound_address(sock: socket.socket) -> str:
    """`host:port` or `unix:/path` of a listening socket (after port 0 was resolved)."""
    name = sock.getsockname()
    if isinstance(name, str):
        return f"unix:{name}"
    host = name[0]
    return f"[{host}]:{name[1]}" if ":" in host else f"{host}:{name[1]}"


@dataclass
class Sockets:
    """The listening sockets, bound once before any worker process starts."""

    listen: socket.socket
    admin: socket.socket | None
    extra: list[socket.socket] = field(default_factory=list)
    reuse_port: bool = False  # listen only reserves the port; each worker binds its own


def open_sockets(config: Config) -> Sockets:
    """Bind `listen` (or take systemd's socket) and `admin_listen`.

    With several TCP workers the parent only reserves the port (SO_REUSEPORT, not
    listening) and each worker process listens on its own socket in the group, so the
    kernel spreads connections evenly across them.
    """
    admin = bind(config.admin_listen) if config.admin_listen else None
    inherited = listen_fds()
    if inherited:
        for sock in inherited:
            sock.setblocking(False)
        return Sockets(inherited[0], admin, inherited[1:], reuse_port=False)
    reuse_port = config.workers > 1 and config.listen.kind == "tcp"
    return Sockets(bind(config.listen, reuse_port, listen=not reuse_port), admin, reuse_port=reuse_port)


def worker_sockets(sockets: Sockets) -> Sockets:
    """The sockets one worker process serves on (its own SO_REUSEPORT listener if so set up)."""
    if not sockets.reuse_port:
        return sockets
    host, port = sockets.listen.getsockname()[:2]
    own = bind(Address("tcp", host, port), reuse_port=True)
    return Sockets(own, sockets.admin, sockets.extra)


class Service:
    """One event loop's worth of daemon: accepts clients, answers admin, reloads, drains."""

    def __init__(self, config: Config, sockets: Sockets, notifier: Notifier) -> None:
        self.config_path = config.source
        self.sockets = sockets
        self.notifier = notifier
        self.runtime = Runtime(config)
        self.connections: set[ClientConnection] = set()
        self.stopping = asyncio.Event()
        self.terminations = 0
        self.servers: list[asyncio.Server] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        runtime, connections = self.runtime, self.connections
        self.servers.append(
            await loop.create_server(
                lambda: ClientConnection(runtime, connections, serve_connection), sock=self.sockets.listen
            )
        )
        if self.sockets.admin is not None:
            self.servers.append(
                await loop.create_server(lambda: AdminConnection(runtime), sock=self.sockets.admin)
            )
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGTERM, self.terminate)
        loop.add_signal_handler(signal.SIGINT, self.terminate)
        interval = self.notifier.watchdog_interval()
        if interval:
            self._watchdog(interval)

    def _watchdog(self, interval: float) -> None:
        self.notifier.watchdog()
        asyncio.get_running_loop().call_later(interval, self._watchdog, interval)

    def reload(self) -> None:
        """SIGHUP: load the config again; keep the old one if the new one is bad."""
        self.notifier.reloading()
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            log.error(
                "reload refused, keeping the running config: %s", "; ".join(exc.problems)
            )
            self.notifier.ready("reload refused: config invalid")
            return
        old = self.runtime.config
        if config.listen != old.listen or config.admin_listen != old.admin_listen:
            log.warning("listen and admin_listen changes take effect only after a restart")
        self.runtime.reload(config)
        log.info("config reloaded from %s", self.config_path)
        self.notifier.ready("config reloaded")

    def terminate(self) -> None:
        """SIGTERM/SIGINT: drain; a second one exits at once."""
        self.terminations += 1
        if self.terminations > 1:
            log.warning("second termination signal: exiting now")
            os._exit(0)
        self.stopping.set()

    async def drain(self) -> None:
        """Stop accepting, let in-flight exchanges finish up to drain_timeout, close the rest."""
        self.notifier.stopping()
        runtime = self.runtime
        runtime.draining = True
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
        deadline = asyncio.get_running_loop().time() + runtime.config.drain_timeout
        while any(c.busy for c in self.connections):
            if asyncio.get_running_loop().time() >= deadline:
                log.warning("drain timeout: closing %d connections", len(self.connections))
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort() if conn.busy else conn.close()
        runtime.current.close()
        runtime.ledger.close()


async def serve(config: Config, sockets: Sockets, notifier: Notifier, ready: bool = True) -> int:
    """Run one service until SIGTERM/SIGINT and its drain; returns the exit code."""
    service = Service(config, sockets, notifier)
    await service.start()
    log.info(
        "listening on %s%s, worker %s",
        bound_address(sockets.listen),
        f", admin on {bound_address(sockets.admin)}" if sockets.admin else "",
        config.upstream.url,
    )
    if ready:
        notifier.ready(f"listening on {bound_address(sockets.listen)}")
    await service.stopping.wait()
    await service.drain()
    log.info("stopped")
    return 0


def run_daemon(config: Config) -> int:
    """Bind, then serve in this process (workers: 1) or in N forked processes."""
    sockets = open_sockets(config)
    notifier = Notifier()
    if config.workers <= 1:
        return uvloop.run(serve(config, sockets, notifier))
    return supervise(config, sockets, notifier)


def supervise(config: Config, sockets: Sockets, notifier: Notifier) -> int:
    """Fork `workers` processes sharing the sockets; relay signals; exit when they all have."""
    children: set[int] = set()
    for _ in range(config.workers):
        pid = os.fork()
        if pid == 0:
            os.environ.pop("NOTIFY_SOCKET", None)
            code = 1
            try:
                code = uvloop.run(serve(config, worker_sockets(sockets), Notifier({}), ready=False))
            finally:
                os._exit(code)
        children.add(pid)
    notifier.ready(f"listening on {bound_address(sockets.listen)} with {config.workers} workers")
    terminations = 0

    def relay(signum: int, _frame: object) -> None:
        nonlocal terminations
        if signum == signal.SIGHUP:
            notifier.reloading()
            try:
                load_config(config.source)
            except ConfigError as exc:
                log.error("reload refused, keeping the running config: %s", "; ".join(exc.problems))
                notifier.ready("reload refused")
                return
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)
            notifier.ready("config reloaded")
            return
        terminations += 1
        if terminations == 1:
            notifier.stopping()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, relay)
    interval = notifier.watchdog_interval()
    if interval:
        signal.signal(signal.SIGALRM, lambda *_: notifier.watchdog())
        signal.setitimer(signal.ITIMER_REAL, interval, interval)
    worst = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        children.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and terminations == 0:
            log.error("worker process %d exited with %d", pid, code)
        worst = max(worst, abs(code))
    return 0 if terminations else worst


def load_or_exit(path: str) -> Config:
    """Load the config, or print every problem and exit 2."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(2) from None
