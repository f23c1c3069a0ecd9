"""Tests for sidecar.systemd: sd_notify over real AF_UNIX datagram sockets, the
watchdog interval arithmetic, and LISTEN_FDS with real sockets passed to a child."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.systemd import Notifier, listen_fds

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    name = f"sidecar-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    yield sock, "@" + name
    sock.close()


def _nothing_pending(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(5)
    return False


def test_path_socket_receives_each_state_exactly(path_socket: tuple[socket.socket, str]) -> None:
    sock, path = path_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    n.ready("listening on 127.0.0.1:8080")
    assert sock.recv(4096) == b"READY=1\nSTATUS=listening on 127.0.0.1:8080"
    n.ready()
    assert sock.recv(4096) == b"READY=1"
    n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.notify("STATUS=draining 3 streams", "EXTEND_TIMEOUT_USEC=5000000")
    assert sock.recv(4096) == b"STATUS=draining 3 streams\nEXTEND_TIMEOUT_USEC=5000000"
    assert _nothing_pending(sock)
    n.close()


def test_abstract_socket(abstract_socket: tuple[socket.socket, str]) -> None:
    sock, name = abstract_socket
    n = Notifier({"NOTIFY_SOCKET": name})
    assert n.enabled
    n.ready()
    assert sock.recv(4096) == b"READY=1"
    n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_reloading_carries_monotonic_usec(path_socket: tuple[socket.socket, str]) -> None:
    sock, path = path_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = sock.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert len(lines) == 2


def test_disabled_without_notify_socket() -> None:
    n = Notifier({})
    assert not n.enabled
    # all no-ops, none raise
    n.ready("x")
    n.reloading()
    n.stopping()
    n.watchdog()
    n.notify("READY=1")


@pytest.mark.parametrize("value", ["", "relative/path", "@"])
def test_unusable_notify_socket_disables(value: str) -> None:
    assert not Notifier({"NOTIFY_SOCKET": value}).enabled


def test_default_env_is_os_environ(
    path_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    Notifier().ready()
    assert sock.recv(4096) == b"READY=1"


def test_notify_never_raises_when_socket_gone(tmp_path: Path) -> None:
    # a path nobody listens on: sendto fails with ENOENT / ECONNREFUSED, swallowed
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing.sock")})
    assert n.enabled
    n.ready()
    n.watchdog()
    n.stopping()


def test_watchdog_interval_math() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval() == 15.0
    assert Notifier({"WATCHDOG_USEC": "1000"}).watchdog_interval() == 0.0005
    me = str(os.getpid())
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}).watchdog_interval() == 15.0
    other = str(os.getpid() + 1)
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": other}).watchdog_interval() is None
    assert Notifier({}).watchdog_interval() is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval() is None
    assert Notifier({"WATCHDOG_USEC": "-5"}).watchdog_interval() is None
    assert Notifier({"WATCHDOG_USEC": "soon"}).watchdog_interval() is None
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}).watchdog_interval() is None


def test_listen_fds_nothing_passed() -> None:
    env = {"LISTEN_FDS": "2"}  # no LISTEN_PID: not for us
    assert listen_fds(env) == []
    assert env == {}  # unset=True clears it anyway
    env2 = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert listen_fds(env2, unset=False) == []
    assert env2 == {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) == []


_CHILD = r"""
import json, os, socket, sys
sys.path.insert(0, sys.argv[1])
from sidecar.systemd import listen_fds
os.environ["LISTEN_PID"] = str(os.getpid())
socks = listen_fds()
out = {
    "left": [k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ],
    "socks": [],
}
for s in socks:
    info = {"fd": s.fileno(), "type": int(s.type), "family": int(s.family),
            "inheritable": os.get_inheritable(s.fileno())}
    if s.type == socket.SOCK_STREAM:
        conn, _ = s.accept()
        conn.sendall(b"hello from fd %d" % s.fileno())
        conn.close()
    else:
        info["addr"] = s.getsockname()
    out["socks"].append(info)
print(json.dumps(out))
"""


def test_listen_fds_real_sockets_in_child() -> None:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    port = tcp.getsockname()[1]
    # Place the sockets at fds 3 and 4 exactly as systemd does: copy them to high fds
    # first (so neither placement clobbers the other), then let bash dup them down
    # and exec the child.
    hi_tcp = fcntl.fcntl(tcp.fileno(), fcntl.F_DUPFD_CLOEXEC, 20)
    hi_udp = fcntl.fcntl(udp.fileno(), fcntl.F_DUPFD_CLOEXEC, 20)
    script = f'exec 3<&{hi_tcp} 4<&{hi_udp} {hi_tcp}<&- {hi_udp}<&-; exec "$0" -c "$1" "$2"'
    env = dict(os.environ, LISTEN_FDS="2", LISTEN_FDNAMES="http:extra")
    env.pop("LISTEN_PID", None)
    proc = subprocess.Popen(
        ["bash", "-c", script, sys.executable, _CHILD, str(REPO)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(hi_tcp, hi_udp),
    )
    os.close(hi_tcp)
    os.close(hi_udp)
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    greeting = client.recv(100)
    client.close()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["left"] == []
    socks = result["socks"]
    assert [s["fd"] for s in socks] == [3, 4]
    assert socks[0]["type"] == int(socket.SOCK_STREAM)
    assert socks[0]["family"] == int(socket.AF_INET)
    assert socks[1]["type"] == int(socket.SOCK_DGRAM)
    assert socks[1]["addr"] == list(udp.getsockname())
    assert not socks[0]["inheritable"] and not socks[1]["inheritable"]
    assert greeting == b"hello from fd 3"
    tcp.close()
    udp.close()
