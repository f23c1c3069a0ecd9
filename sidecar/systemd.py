"""systemd integration: the sd_notify protocol and socket activation (LISTEN_FDS).

What it is for: telling the service manager that the daemon is ready, reloading,
stopping or still alive (``READY=1``, ``RELOADING=1``, ``STOPPING=1``,
``WATCHDOG=1``), and taking over listening sockets that systemd passed in.

What it must never do: raise into the daemon (a failed notification is logged
at debug and forgotten), block (datagrams are sent non-blocking), import
asyncio, or depend on anything beyond the standard library.  With
``NOTIFY_SOCKET`` unset every call is a no-op, so the daemon calls it
unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

__all__ = ["SD_LISTEN_FDS_START", "Notifier", "listen_fds"]

log = logging.getLogger("sidecar.systemd")

SD_LISTEN_FDS_START = 3
"""The first file descriptor systemd passes (``SD_LISTEN_FDS_START`` in sd-daemon.h)."""


def _socket_address(name: str) -> str | bytes | None:
    """Turn ``$NOTIFY_SOCKET`` into an address for ``sendto``; None when unusable.

    A leading ``@`` names a socket in the abstract namespace (a NUL byte on the wire).
    Only absolute paths and abstract names are valid (sd_notify(3)); ``vsock:`` is not
    supported.
    """
    if name.startswith("@"):
        if len(name) < 2:
            return None
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None


class Notifier:
    """sd_notify over the AF_UNIX datagram socket named by $NOTIFY_SOCKET.

    ``NOTIFY_SOCKET`` may be a path or an abstract ``@name``.  When it is unset (or
    unusable) ``enabled`` is False and every method does nothing.  No method raises.
    """

    enabled: bool

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env: Mapping[str, str] = os.environ if env is None else env
        self._address = _socket_address(self._env.get("NOTIFY_SOCKET", ""))
        self.enabled = self._address is not None
        self._sock: socket.socket | None = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            self._sock = sock
        return self._sock

    def notify(self, *states: str) -> None:
        """Send the given ``KEY=VALUE`` lines as one datagram; never raises."""
        if not self.enabled or not states:
            return
        message = "\n".join(states).encode()
        try:
            self._socket().sendto(message, self._address)  # type: ignore[arg-type]
        except OSError as exc:
            log.debug("sd_notify %r to %r failed: %s", states, self._address, exc)

    def ready(self, status: str = "") -> None:
        """``READY=1``, with ``STATUS=...`` when a status text is given."""
        if status:
            self.notify("READY=1", f"STATUS={status}")
        else:
            self.notify("READY=1")

    def reloading(self) -> None:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (required by Type=notify-reload)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """``STOPPING=1``: the daemon has begun its shutdown (drain)."""
        self.notify("STOPPING=1")

    def watchdog(self) -> None:
        """``WATCHDOG=1``: keep-alive ping for WatchdogSec=."""
        self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None.

        None when the watchdog is not enabled for this process: ``WATCHDOG_USEC`` is
        unset, not a positive integer, or ``WATCHDOG_PID`` is set to another pid.
        """
        raw = self._env.get("WATCHDOG_USEC", "")
        try:
            usec = int(raw)
        except ValueError:
            return None
        if usec <= 0:
            return None
        pid = self._env.get("WATCHDOG_PID")
        if pid is not None and pid != "":
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        return usec / 2_000_000

    def close(self) -> None:
        """Close the datagram socket (it is reopened on the next notify)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def listen_fds(env: Mapping[str, str] | None = None, unset: bool = True) -> list[socket.socket]:
    """Sockets passed by systemd socket activation, as ``socket.socket`` objects.

    Follows sd_listen_fds(3): only when ``LISTEN_PID`` equals this process's pid,
    ``LISTEN_FDS`` = n means fds 3..3+n-1.  Each fd is marked close-on-exec.  The
    names from ``LISTEN_FDNAMES`` are not needed by sidecar (it takes the first
    stream socket for ``listen``) and are ignored.  With ``unset`` the variables are
    removed from ``env`` (``os.environ`` by default) so child processes do not
    inherit them.  Returns [] when nothing was passed.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    try:
        result = _listen_fds(environ)
    finally:
        if unset and isinstance(environ, MutableMapping):
            for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                environ.pop(key, None)
    return result


def _listen_fds(environ: Mapping[str, str]) -> list[socket.socket]:
    try:
        pid = int(environ.get("LISTEN_PID", ""))
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if pid != os.getpid() or count <= 0:
        return []
    sockets: list[socket.socket] = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        try:
            os.set_inheritable(fd, False)
            sockets.append(socket.socket(fileno=fd))
        except OSError as exc:
            log.warning("LISTEN_FDS: fd %d is not a usable socket: %s", fd, exc)
    return sockets
