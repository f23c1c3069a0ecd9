"""The process: listening sockets, signals, reloads, graceful drain, systemd, worker processes.

I/O shell. `serve` runs one event loop (uvloop) with the client listener and
the admin port (`workers: 1`). For `workers: N` `run_daemon` binds the sockets
once, and a `Supervisor` in the parent forks N worker processes (`serve_worker`:
the client listener only), replaces one that dies, relays signals, speaks
sd_notify, and serves the admin port itself, summing every worker's metrics.

It never serves a client from the supervising parent, never lets a worker
process touch the parent's event loop or admin port, and never exits 0 after a
worker process failed while stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NoReturn

import orjson
import uvloop

from sidecar.admin import AdminConnection, local_metrics
from sidecar.cli import STOP_SIGNALS
from sidecar.config import Address, Config, ConfigError, load_config
from sidecar.exchange import serve_connection
from sidecar.ledger import end_torn_line
from sidecar.logs import setup_logging
from sidecar.metrics import Metrics
from sidecar.runtime import Runtime
from sidecar.server import ClientConnection
from sidecar.systemd import Notifier, listen_fds

log = logging.getLogger("sidecar.daemon")


#: listen() backlog: a burst of clients while the loop is busy waits here, then gets an
#: answer (served or 503), instead of SYN retransmits (the kernel caps it at somaxconn).
LISTEN_BACKLOG = 4096


class StartupError(Exception):
    """A clear one-line reason the daemon cannot start (bad bind, bad config)."""


def bind(
    address: Address, reuse_port: bool = False, listen: bool = True, exclusive: bool = True
) -> socket.socket:
    """A listening socket for `address` (TCP or unix), non-blocking, backlog LISTEN_BACKLOG.

    With `listen=False` the socket only holds the address (for SO_REUSEPORT groups,
    where a bound socket that does not listen receives no connections). `exclusive`:
    an address another process holds is an error, never shared: a SO_REUSEPORT group of
    another daemon is not joined (only this daemon's own worker processes pass False),
    and a unix socket that still accepts connections is not replaced (a stale file is).
    """
    try:
        if address.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(address.path).st_mode):
                    if exclusive and _unix_socket_answers(address.path):
                        raise OSError(errno.EADDRINUSE, "Address already in use")
                    os.unlink(address.path)
            sock.bind(address.path)
            # the front server usually runs as another user: the directory decides who may
            # reach the socket, not the daemon's umask (systemd's UMask=0027)
            os.chmod(address.path, 0o666)
        else:
            infos = socket.getaddrinfo(
                address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, kind, proto, _, sockaddr = infos[0]
            if reuse_port and exclusive and sockaddr[1] != 0:
                with socket.socket(family, kind, proto) as probe:  # held by anyone, a group too?
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(sockaddr)
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(sockaddr)
        if listen:
            sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        raise StartupError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    return sock


def _unix_socket_answers(path: str) -> bool:
    """True when something accepts connections on the unix socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


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
    return Sockets(
        bind(config.listen, reuse_port, listen=not reuse_port), admin, reuse_port=reuse_port
    )


def worker_sockets(sockets: Sockets) -> Sockets:
    """The sockets one worker process serves on (its own SO_REUSEPORT listener if so set up)."""
    if not sockets.reuse_port:
        return sockets
    host, port = sockets.listen.getsockname()[:2]
    own = bind(Address("tcp", host, port), reuse_port=True, exclusive=False)  # our own group
    return Sockets(own, sockets.admin, sockets.extra)


#: parent -> worker process: reopen the ledger (a refused reload); drain (the parent was
#: told to stop); close what is in flight now (it was told twice)
REOPEN_LEDGER = signal.SIGUSR1
PARENT_STOPS = signal.SIGUSR2
PARENT_CUTS = signal.SIGQUIT
_PARENT_SIGNALS = (REOPEN_LEDGER, PARENT_STOPS, PARENT_CUTS)

def on_signal(
    loop: asyncio.AbstractEventLoop, signum: int, callback: Callable[[], object]
) -> None:
    """Call `callback` in `loop` once per delivered `signum`, through a plain handler woken
    by the loop's self-pipe (an `add_signal_handler` of the same loop).

    Not `loop.add_signal_handler`, for a signal whose count means something (a second
    SIGTERM: stop at once): uvloop can call that handler twice for one signal that arrives
    together with another (it merges its self-pipe's bytes with a set of signals caught,
    which one read may leave behind for the next). Nor for SIGCHLD, which uvloop keeps to
    itself there."""

    def handler(_signum: int, _frame: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending
            loop.call_soon_threadsafe(callback)

    signal.signal(signum, handler)


def release_stop_signals() -> None:
    """Deliver SIGTERM and SIGINT again, now that their handlers are in place (`sidecar run`
    and `demo` hold them from the start, see `cli.STOP_SIGNALS`); one that came meanwhile
    is handled now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


#: Keys a reload cannot apply: the sockets are bound and the processes forked at start.
RESTART_ONLY_KEYS = ("listen", "admin_listen", "workers")


def reload_logging(running: Config, new: Config, started: Config | None) -> None:
    """Apply a reloaded config's logging now, and (given the config the process started
    with) warn about each key that only a restart applies."""
    if (new.log_format, new.log_level) != (running.log_format, running.log_level):
        setup_logging(new.log_format, new.log_level)
    if started is None:
        return
    kept = [
        f"{key} (still {getattr(started, key)})"
        for key in RESTART_ONLY_KEYS
        if getattr(new, key) != getattr(started, key)
    ]
    if kept:
        log.warning("config reloaded; these take effect only after a restart: %s", ", ".join(kept))


class Service:
    """One event loop's worth of daemon: accepts clients, answers admin, reloads, drains.

    `supervised`: one of the processes of `workers: N`, whose parent warns about the keys
    a reload cannot apply.
    """

    def __init__(
        self, config: Config, sockets: Sockets, notifier: Notifier, supervised: bool = False
    ) -> None:
        self.started = None if supervised else config
        self.config_path = config.source
        self.sockets = sockets
        self.notifier = notifier
        self.runtime = Runtime(config)
        self.connections: set[ClientConnection] = set()
        self.stopping = asyncio.Event()
        self.terminations = 0
        self.cut_short = False  # a second termination: the drain waits no longer
        self.servers: list[asyncio.Server] = []
        self.admin_server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        runtime, connections = self.runtime, self.connections
        self.servers.append(
            await loop.create_server(
                lambda: ClientConnection(loop, runtime, connections, serve_connection),
                sock=self.sockets.listen,
                backlog=LISTEN_BACKLOG,  # create_server would listen() again with 100
            )
        )
        if self.sockets.admin is not None:
            self.admin_server = await loop.create_server(
                lambda: AdminConnection(runtime, local_metrics(runtime)),
                sock=self.sockets.admin,
                backlog=LISTEN_BACKLOG,
            )
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        on_signal(loop, signal.SIGTERM, self.terminate)
        on_signal(loop, signal.SIGINT, self.terminate)
        # from the parent of `workers: N`, which validated a reload or was told to stop
        loop.add_signal_handler(REOPEN_LEDGER, self.reopen_ledger)
        loop.add_signal_handler(PARENT_STOPS, self.stopping.set)
        loop.add_signal_handler(PARENT_CUTS, self.cut)
        interval = self.notifier.watchdog_interval()
        if interval:
            self._watchdog(interval)

    def _watchdog(self, interval: float) -> None:
        self.notifier.watchdog()
        asyncio.get_running_loop().call_later(interval, self._watchdog, interval)

    def reopen_ledger(self) -> None:
        """Reopen the ledger by its path (logrotate renamed it), config reloaded or not."""
        self.runtime.ledger.reopen()

    def reload(self) -> bool:
        """SIGHUP: load the config again; keep the old one if the new one is bad (False). While
        stopping, only the ledger is reopened (no request will start under a new config,
        and systemd is not told RELOADING/READY after STOPPING)."""
        if self.stopping.is_set():
            log.info("reload ignored while stopping; the ledger is reopened")
            self.reopen_ledger()
            return False
        self.notifier.reloading()
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", "; ".join(exc.problems))
            self.reopen_ledger()
            self.notifier.ready("reload refused: config invalid")
            return False
        reload_logging(self.runtime.config, config, self.started)
        self.runtime.reload(config)
        log.info("config reloaded from %s", self.config_path)
        self.notifier.ready("config reloaded")
        return True

    def terminate(self) -> None:
        """SIGTERM/SIGINT: drain; a second one closes what is in flight at once (ledger lines
        written), a third exits without even that.

        The parent of `workers: N` asks with its own signals (`PARENT_STOPS`, `PARENT_CUTS`),
        so a SIGTERM to the whole process group (systemd's KillMode=control-group), which
        reaches a worker process from both sides, counts once."""
        self.terminations += 1
        if self.terminations == 1:
            self.stopping.set()
        elif self.terminations == 2:
            log.warning("second termination signal: closing the requests in flight now")
            self.cut()
        else:
            os._exit(0)

    def cut(self) -> None:
        """End the drain now: what is in flight is closed (and written to the ledger)."""
        self.cut_short = True
        self.stopping.set()

    async def drain(self) -> None:
        """Stop accepting, let in-flight exchanges finish up to drain_timeout, close the rest.

        The admin port answers until the drain is over: /healthz 200 while the process
        runs, /readyz 503 while it drains."""
        self.notifier.stopping()
        runtime = self.runtime
        runtime.draining = True
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            if not conn.in_flight:
                conn.close()
        deadline = asyncio.get_running_loop().time() + runtime.config.drain_timeout
        while any(c.in_flight for c in self.connections) and not self.cut_short:
            if asyncio.get_running_loop().time() >= deadline:
                log.warning("drain timeout: closing %d connections", len(self.connections))
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort() if conn.busy else conn.close()
        runtime.current.close()
        runtime.ledger.close()
        if self.admin_server is not None:
            self.admin_server.close()


async def serve(config: Config, sockets: Sockets, notifier: Notifier, ready: bool = True) -> int:
    """Run one service until SIGTERM/SIGINT and its drain; returns the exit code."""
    service = Service(config, sockets, notifier)
    await service.start()
    release_stop_signals()
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
    if config.usage_log is not None:  # before any process of this daemon writes to it
        end_torn_line(config.usage_log)
    sockets = open_sockets(config)
    notifier = Notifier()
    if config.workers <= 1:
        return uvloop.run(serve(config, sockets, notifier))
    return supervise(config, sockets, notifier)


# -- workers: N ---------------------------------------------------------------
#
# The parent forks N worker processes and serves no client itself. Each worker
# is a `Service` without the admin port; it shares the client port with the
# others and keeps its own Runtime (pools, ledger handle, metrics). The parent
# runs its own uvloop loop: it serves the admin port, relays signals, reaps and
# replaces workers, and answers /metrics with the sum of what every worker
# counts, asked over one AF_UNIX socketpair per worker at scrape time.
#
# The socketpair carries one JSON line per message:
#   worker -> parent  {"ready": pid}                  listening; counted from now on
#   parent -> worker  {"id": n}                       a scrape asks for the metrics
#   worker -> parent  {"id": n, "metrics": snapshot}  (Metrics.snapshot())
#   worker -> parent  {"final": snapshot}             after its drain, before it exits
#   parent -> worker  {"reload": n}                   SIGHUP came, the config was valid
#   worker -> parent  {"reloaded": n, "ok": bool}     loaded it again (ok: applied)
# EOF on the parent's end: the worker process is gone. EOF on the worker's
# end: the parent is gone, and the worker drains and exits.

#: How long a scrape waits for each worker process's metrics.
SCRAPE_TIMEOUT = 1.0
#: How long a reload waits for each worker process to have loaded the config again.
RELOAD_TIMEOUT = 10.0
#: How long the worker processes may take to start listening.
START_TIMEOUT = 30.0
#: A worker process that dies younger than this counts towards the restart backoff.
QUICK_DEATH = 10.0
#: How much longer than drain_timeout a stopping worker process may take before SIGKILL.
KILL_GRACE = 10.0
#: The longest pause between attempts to replace worker processes that keep dying.
MAX_BACKOFF = 30.0

_LINE_LIMIT = 64 * 1024 * 1024
_SIGNALS = {
    signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD,
    REOPEN_LEDGER, PARENT_STOPS, PARENT_CUTS,
}

# In a forked worker process: the parent's supervisor, kept referenced so that
# nothing of the parent's event loop is ever finalized (and closes an fd) here.
_inherited: object = None


def _line(message: dict[str, object]) -> bytes:
    return orjson.dumps(message) + b"\n"


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class WorkerLink:
    """The parent's end of one worker process's socketpair (see the message list above).

    It learns when the worker listens (`ready`), asks it for its metrics on each
    scrape (`ask`), and keeps the last registry it got (`last`: the worker's
    final one after a drain), which the supervisor keeps counting once the
    process is gone so that counters never go backwards.
    """

    def __init__(self, pid: int, sock: socket.socket, supervisor: Supervisor) -> None:
        self.pid = pid
        self.sock = sock
        self.supervisor = supervisor
        self.started = time.monotonic()
        self.heard = self.started  # when the worker last sent a line (an answer, `ready`)
        self.ready = False
        self.closed = False
        self.last: Metrics | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[object]] = {}
        self._next_id = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start reading the worker's messages (in the parent's loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            reader, self._writer = await asyncio.open_unix_connection(
                sock=self.sock, limit=_LINE_LIMIT
            )
            while True:
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    break
                self._received(line)
        except (OSError, ValueError) as exc:
            log.warning("lost the link to worker process %d: %s", self.pid, exc)
        finally:
            self.closed = True
            for future in self._pending.values():
                if not future.done():
                    future.set_result(None)
            self._pending.clear()
            if self._writer is not None:
                self._writer.close()
            self.supervisor.link_closed(self)

    def _received(self, line: bytes) -> None:
        self.heard = time.monotonic()
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError:
            log.warning("worker process %d sent a line that is not JSON", self.pid)
            return
        if not isinstance(message, dict):
            return
        if "ready" in message and not self.ready:
            self.ready = True
            self.supervisor.worker_ready(self)
        elif "id" in message:
            if not self._resolve(message["id"], message.get("metrics")) and "metrics" in message:
                # a poke's answer: kept, should the process die now
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    self.last = Metrics.from_snapshot(message["metrics"])
        elif "reloaded" in message:
            self._resolve(message["reloaded"], message.get("ok") is True)
        elif "final" in message:
            with contextlib.suppress(ValueError):
                self.last = Metrics.from_snapshot(message["final"])

    def _resolve(self, ident: int, value: object) -> bool:
        """Hand `value` to whoever waits for the answer to `ident`; False when nobody does."""
        future = self._pending.pop(ident, None)
        if future is None or future.done():
            return False
        future.set_result(value)
        return True

    def _send(self, key: str) -> int:
        """Send `{key: n}` with a fresh n, and return n."""
        assert self._writer is not None
        self._next_id += 1
        self._writer.write(_line({key: self._next_id}))
        return self._next_id

    def poke(self) -> None:
        """Ask for an answer nobody waits for: it refreshes `heard` (the worker's event loop
        turns; a hung one never answers) and `last` (what a worker that is killed before the
        next scrape counted stays in the totals, as of this answer)."""
        if not self.closed and self._writer is not None:
            self._send("id")

    @property
    def connected(self) -> bool:
        """The link is open both ways (a worker just forked has no writer yet)."""
        return self._writer is not None and not self.closed

    async def _request(self, key: str, timeout: float) -> tuple[bool, object]:
        """Send `{key: n}` and wait for the worker's answer to n: (True, what it said, None
        when the link closed first), or (False, None) when none came within `timeout`."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        ident = self._send(key)
        self._pending[ident] = future
        try:
            async with asyncio.timeout(timeout):
                return True, await future
        except TimeoutError:
            self._pending.pop(ident, None)
            return False, None

    async def reload(self, timeout: float) -> bool | None:
        """Have the worker load the config again: True once it applied it, False when it
        refused it, None when it did not say within `timeout` (gone, hung). A worker whose
        link is not open yet is sent SIGHUP instead (it reloads once it listens), unawaited."""
        if self.closed:
            return None
        if self._writer is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGHUP)
            return None
        _, applied = await self._request("reload", timeout)
        return None if applied is None else applied is True

    async def ask(self, timeout: float) -> Metrics | None:
        """The worker's metrics now, or None (gone, not answering within `timeout`)."""
        if self.closed or self._writer is None:
            return None
        answered, answer = await self._request("id", timeout)
        if not answered:
            log.warning(
                "worker process %d did not answer for /metrics within %g s: "
                "its counters are those of its last answer",
                self.pid,
                timeout,
            )
            return None
        if answer is None:
            return None
        try:
            self.last = Metrics.from_snapshot(answer)
        except ValueError as exc:
            log.warning("worker process %d sent unusable metrics: %s", self.pid, exc)
            return None
        return self.last


class Supervisor:
    """The parent process of `workers: N` (N > 1).

    Forks the worker processes and replaces one that dies while the daemon is
    not stopping; serves the admin port, where /metrics sums every worker's
    registry; relays SIGHUP (after validating the config; READY=1 once every worker
    has reloaded) and SIGTERM/SIGINT to
    the workers; speaks sd_notify (READY, RELOADING, STOPPING, WATCHDOG) from
    its event loop; exits 0 after every worker drained, 1 when one failed.
    """

    def __init__(self, config: Config, sockets: Sockets, notifier: Notifier) -> None:
        self.started = config
        self.config = config
        self.sockets = sockets
        self.notifier = notifier
        self.workers = config.workers
        self.children: dict[int, WorkerLink] = {}  # live worker processes by pid
        self.links: set[WorkerLink] = set()  # links not at EOF yet (may outlive the process)
        # the model labels of /metrics (capped) as first admitted: kept across scrapes, so
        # that no model's series moves into `other` when the order of the sum changes
        self.model_labels: set[str] = set()
        # counters of workers that are gone
        self.retired = Metrics(config.pricing.currency, model_labels=self.model_labels)
        self.admin_connections: set[AdminConnection] = set()
        self.starting = True
        self.stopping = False
        self.failed = False
        self.terminations = 0
        self.quick_deaths = 0
        self.changed = asyncio.Event()
        self.done = asyncio.Event()
        self.respawns: dict[object, asyncio.Handle] = {}  # replacements not started yet
        self.reloads: set[asyncio.Task[None]] = set()  # reloads waiting on the workers

    @property
    def draining(self) -> bool:
        """True once a termination signal arrived (/readyz answers 503)."""
        return self.stopping

    # -- the run

    async def run(self) -> int:
        """Start the workers and the admin port, then wait until every worker exited."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        on_signal(loop, signal.SIGTERM, self.terminate)
        on_signal(loop, signal.SIGINT, self.terminate)
        on_signal(loop, signal.SIGCHLD, self.reap)
        release_stop_signals()
        interval = self.notifier.watchdog_interval()
        if interval:
            self._watchdog(interval)
        try:
            for _ in range(self.workers):
                self.spawn()
        except OSError as exc:
            log.error("cannot start a worker process: %s", exc)
            self.fail()
        await self._started()
        self.starting = False
        self._check_workers(self.config.worker_timeout / 4)
        server = None
        if not self.stopping:
            if self.sockets.admin is not None:
                server = await loop.create_server(
                    lambda: AdminConnection(self, self.render_metrics, self.admin_connections),
                    sock=self.sockets.admin,
                    backlog=LISTEN_BACKLOG,
                )
            log.info(
                "listening on %s%s, worker %s (%d processes)",
                bound_address(self.sockets.listen),
                f", admin on {bound_address(self.sockets.admin)}" if self.sockets.admin else "",
                self.config.upstream.url,
                self.workers,
            )
            self.notifier.ready(
                f"listening on {bound_address(self.sockets.listen)} with {self.workers} workers"
            )
        await self.done.wait()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if server is not None:
            server.close()
        log.info("stopped")
        return 1 if self.failed else 0

    async def _started(self) -> None:
        """Wait until every worker process listens, the start failed or a stop began."""
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT
        while not self.stopping and not all(link.ready for link in self.children.values()):
            self.changed.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self.changed.wait()
            except TimeoutError:
                log.error("the worker processes did not start within %g s", START_TIMEOUT)
                self.fail()

    def _watchdog(self, interval: float) -> None:
        self.notifier.watchdog()
        asyncio.get_running_loop().call_later(interval, self._watchdog, interval)

    def _check_workers(self, every: float) -> None:
        """The parent's watchdog over its workers: each ready worker is poked; one that has
        not answered for `worker_timeout` (a hung event loop: systemd's watchdog only sees
        the parent's) is killed, and `reap` replaces it."""
        if self.stopping:
            return
        now = time.monotonic()
        limit = self.config.worker_timeout
        for pid, link in list(self.children.items()):
            if not link.ready or link.closed:
                continue
            if now - link.heard > limit:
                log.error(
                    "worker process %d has not answered for %g s: killing it", pid, now - link.heard
                )
                link.heard = now  # one kill; reap replaces the process
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            else:
                link.poke()
        asyncio.get_running_loop().call_later(every, self._check_workers, every)

    # -- worker processes

    def spawn(self) -> None:
        """Fork one worker process on the current config and the shared sockets."""
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            parent_end.close()
            child_end.close()
            raise
        if pid == 0:
            self._become_worker(parent_end, child_end)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        child_end.close()
        link = WorkerLink(pid, parent_end, self)
        self.children[pid] = link
        self.links.add(link)
        link.start()

    def _become_worker(self, parent_end: socket.socket, child_end: socket.socket) -> NoReturn:
        """In the forked child: drop what belongs to the parent, serve, exit. Never returns.

        Signals stay blocked (from `spawn`) until the worker's own handlers are in place.
        """
        global _inherited
        _inherited = self
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGCHLD, *_PARENT_SIGNALS):
                signal.signal(signum, signal.SIG_DFL)
            # a terminal's Ctrl-C reaches the whole process group; the parent relays it
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            asyncio._set_running_loop(None)
            os.environ.pop("NOTIFY_SOCKET", None)
            parent_end.close()
            self._release_parent_fds(child_end)
            sockets = worker_sockets(replace(self.sockets, admin=None))
            code = uvloop.run(serve_worker(self.config, sockets, child_end))
        except StartupError as exc:
            log.error("worker process %d cannot start: %s", os.getpid(), exc)
        except BaseException:
            log.exception("worker process %d failed", os.getpid())
        finally:
            os._exit(code)

    def _release_parent_fds(self, keep: socket.socket) -> None:
        """Let go of the parent's admin port and links in a new worker process.

        Each is replaced by /dev/null rather than closed: objects of the parent's
        loop still name these numbers, and a number that stays taken can never be
        closed by mistake under something this process opens later.
        """
        fds = {link.sock.fileno() for link in self.links if not link.closed}
        if self.sockets.admin is not None:
            fds.add(self.sockets.admin.fileno())
        for conn in self.admin_connections:
            sock = conn.transport.get_extra_info("socket") if conn.transport else None
            if sock is not None:
                fds.add(sock.fileno())
        fds -= {0, 1, 2, -1, keep.fileno(), self.sockets.listen.fileno()}
        fds -= {s.fileno() for s in self.sockets.extra}
        null = os.open(os.devnull, os.O_RDWR)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.dup2(null, fd, inheritable=False)
        os.close(null)

    def worker_ready(self, link: WorkerLink) -> None:
        """A worker process listens now."""
        if not self.starting:
            log.info("worker process %d is ready", link.pid)
        self.changed.set()

    def link_closed(self, link: WorkerLink) -> None:
        """A worker's link reached EOF: its last counters stay in the daemon's totals."""
        self.links.discard(link)
        if link.last is not None:
            self.retired.add(link.last, gauges=False)

    def reap(self) -> None:
        """SIGCHLD: collect every exited worker process; replace it unless stopping."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            link = self.children.pop(pid, None)
            if link is None:
                continue
            self.changed.set()
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                if code != 0:
                    log.error("worker process %d %s while stopping", pid, _exit_text(code))
                    self.failed = True
            elif self.starting:
                log.error("worker process %d %s while starting", pid, _exit_text(code))
                self.fail()
            else:
                log.error("worker process %d %s: starting a replacement", pid, _exit_text(code))
                self._replace(link)
        if self.stopping and not self.children:
            self.done.set()

    def _replace(self, dead: WorkerLink | None) -> None:
        """Fork a replacement now, or after a pause when workers keep dying young."""
        young = dead is None or not dead.ready or time.monotonic() - dead.started < QUICK_DEATH
        self.quick_deaths = self.quick_deaths + 1 if young else 0
        delay = 0.0 if self.quick_deaths <= 1 else min(2.0 ** (self.quick_deaths - 2), MAX_BACKOFF)
        if delay:
            log.warning("worker processes keep dying: the next one starts in %g s", delay)
        token = object()
        self.respawns[token] = asyncio.get_running_loop().call_later(delay, self._respawn, token)

    def _respawn(self, token: object) -> None:
        self.respawns.pop(token, None)
        if self.stopping:
            return
        try:
            self.spawn()
        except OSError as exc:
            log.error("cannot start a replacement worker process: %s", exc)
            self._replace(None)

    def signal_workers(self, signum: int) -> None:
        """Send `signum` to every live worker process."""
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    # -- signals

    def reload(self) -> None:
        """SIGHUP: validate the config, then have every worker reload it; a bad one is refused.
        While stopping, only the ledgers are reopened (as `Service.reload`)."""
        if self.stopping:
            log.info("reload ignored while stopping; the ledgers are reopened")
            self.signal_workers(REOPEN_LEDGER)
            return
        # while the workers start, systemd is told nothing: its READY=1 waits for them all
        notifier = self.notifier if not self.starting else Notifier({})
        notifier.reloading()
        try:
            config = load_config(self.config.source)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", "; ".join(exc.problems))
            self.signal_workers(REOPEN_LEDGER)  # logrotate's rename still needs it
            notifier.ready("reload refused: config invalid")
            return
        reload_logging(self.config, config, self.started)
        self.config = config  # for /readyz and for replacement workers
        task = asyncio.get_running_loop().create_task(
            self._reload_workers(notifier, list(self.children.values()))
        )
        self.reloads.add(task)
        task.add_done_callback(self.reloads.discard)

    async def _reload_workers(self, notifier: Notifier, links: list[WorkerLink]) -> None:
        """Have every worker process load the config again, and tell systemd READY=1 once
        they all have (a `systemctl reload` returns then: every request after it is served
        by the new config), or once RELOAD_TIMEOUT passed."""
        results = await asyncio.gather(*(link.reload(RELOAD_TIMEOUT) for link in links))
        for link, applied in zip(links, results, strict=True):
            if applied is False:
                log.error("worker process %d refused the config it loaded again "
                          "(the file changed since it was checked?)", link.pid)
            elif applied is None and link.connected:
                log.warning("worker process %d did not say within %g s that it reloaded",
                            link.pid, RELOAD_TIMEOUT)
        if not self.stopping:
            notifier.ready("config reloaded")

    def terminate(self) -> None:
        """SIGTERM/SIGINT: the workers drain; a second one makes them close what is in
        flight at once (the parent still waits for them: its exit ends the workers too
        under systemd's KillMode=mixed or as a container's pid 1, before their ledger
        lines are written); a third makes the parent exit now."""
        self.terminations += 1
        if self.terminations == 1:
            self.stop()
        elif self.terminations == 2:
            log.warning("second termination signal: closing the requests in flight now")
            self.signal_workers(PARENT_CUTS)
        else:
            os._exit(0)

    def fail(self) -> None:
        """The start failed: stop what runs and exit non-zero."""
        self.failed = True
        self.stop()

    def stop(self) -> None:
        """Drain every worker process (no more replacements)."""
        if self.stopping:
            return
        self.stopping = True
        self.notifier.stopping()
        for handle in self.respawns.values():
            handle.cancel()
        self.respawns.clear()
        self.signal_workers(PARENT_STOPS)
        # The parent's copy of the client socket: a shared one (unix, socket activation)
        # still listens through it, so the kernel would queue new clients that no worker
        # takes any more, instead of refusing them. No worker is forked after this.
        self.sockets.listen.close()
        self.changed.set()
        if not self.children:
            self.done.set()
        grace = self.config.drain_timeout + KILL_GRACE
        asyncio.get_running_loop().call_later(grace, self._kill_stragglers, grace)

    def _kill_stragglers(self, grace: float) -> None:
        if self.children:
            log.error(
                "%d worker processes still run %g s after SIGTERM: killing them",
                len(self.children),
                grace,
            )
            self.signal_workers(signal.SIGKILL)

    # -- metrics

    async def render_metrics(self) -> bytes:
        """/metrics: the sum of every worker's registry, asked now.

        A worker that does not answer within SCRAPE_TIMEOUT counts with its last
        answer (counters only); workers that are gone count with their last
        counters too, so no counter of the daemon ever goes backwards.
        """
        links = sorted((link for link in self.links if link.ready), key=lambda link: link.pid)
        answers = await asyncio.gather(*(link.ask(SCRAPE_TIMEOUT) for link in links))
        merged = Metrics(self.config.pricing.currency, model_labels=self.model_labels)
        merged.add(self.retired, gauges=False)
        for link, answer in zip(links, answers, strict=True):
            if link.closed:
                continue  # its last counters are in self.retired by now
            if answer is not None:
                merged.add(answer)
            elif link.last is not None:
                merged.add(link.last, gauges=False)
        return merged.render()


async def serve_worker(config: Config, sockets: Sockets, channel: socket.socket) -> int:
    """One worker process of `workers: N`: a Service without the admin port.

    It tells the parent when it listens, answers its metrics requests over
    `channel` until it exits, sends its final registry after the drain, and
    drains by itself when the parent is gone.
    """
    service = Service(config, sockets, Notifier({}), supervised=True)
    await service.start()
    loop = asyncio.get_running_loop()
    loop.remove_signal_handler(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reader, writer = await asyncio.open_unix_connection(sock=channel)
    answering = loop.create_task(_answer_parent(service, reader, writer))
    log.info(
        "worker process %d accepting clients on %s", os.getpid(), bound_address(sockets.listen)
    )
    writer.write(_line({"ready": os.getpid()}))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    await service.stopping.wait()
    await service.drain()
    answering.cancel()
    with contextlib.suppress(OSError, TimeoutError):
        writer.write(_line({"final": service.runtime.metrics.snapshot()}))
        async with asyncio.timeout(SCRAPE_TIMEOUT):
            await writer.drain()
    writer.close()
    log.info("worker process %d stopped", os.getpid())
    return 0


async def _answer_parent(
    service: Service, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answer each `{"id": n}` with this process's metrics; at EOF (parent gone) drain."""
    while True:
        try:
            line = await reader.readline()
        except (OSError, ValueError):
            line = b""
        if not line.endswith(b"\n"):
            if not service.stopping.is_set():
                # a drain, but not a termination signal: the SIGTERM that may follow (systemd
                # stopping what is left of the unit) is the first, and drains too
                log.warning("the supervising process is gone: draining")
                service.stopping.set()
            return
        try:
            message = orjson.loads(line)
            if "reload" in message:
                writer.write(_line({"reloaded": message["reload"], "ok": service.reload()}))
                continue
            ident = message["id"]
        except (ValueError, KeyError, TypeError):
            continue
        try:
            answer = _line({"id": ident, "metrics": service.runtime.metrics.snapshot()})
        except TypeError as exc:  # a label orjson cannot encode
            answer = _line({"id": ident, "error": str(exc)})
        writer.write(answer)


def supervise(config: Config, sockets: Sockets, notifier: Notifier) -> int:
    """Run `workers` processes sharing the sockets under a supervising parent (see Supervisor)."""
    return uvloop.run(Supervisor(config, sockets, notifier).run())


def load_or_exit(path: str) -> Config:
    """Load the config, or print every problem and exit 2."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(2) from None
