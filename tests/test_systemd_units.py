"""Tests for deploy/systemd/: the units pass `systemd-analyze verify`, keep a low
`systemd-analyze security` exposure, carry the directives the daemon relies on, and
the runtime really works under MemoryDenyWriteExecute (the kernel's PR_SET_MDWE,
which refuses the same W+X mappings the unit's seccomp filter does)."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "deploy" / "systemd"
SERVICE = UNITS / "sidecar.service"
SOCKET = UNITS / "sidecar.socket"
INSTALLED_EXEC = "/opt/sidecar/bin/sidecar"
MAX_EXPOSURE = 2.0


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing in CI (apt-get install systemd)")
        pytest.skip("systemd-analyze not installed")
    return path


def _sidecar_executable() -> str:
    """The venv's real `sidecar` console script, else this interpreter (both exist)."""
    script = Path(sys.executable).parent / "sidecar"
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    return sys.executable


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A small unit-file reader: section -> key -> every value, in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not key=value: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """Both units in a temp dir, ExecStart pointed at an executable that exists here."""
    text = SERVICE.read_text()
    assert INSTALLED_EXEC in text
    (tmp_path / "sidecar.service").write_text(text.replace(INSTALLED_EXEC, _sidecar_executable()))
    shutil.copy(SOCKET, tmp_path / "sidecar.socket")
    return tmp_path


def test_units_pass_systemd_analyze_verify(unit_dir: Path) -> None:
    tool = _systemd_analyze()
    proc = subprocess.run(
        [tool, "verify", str(unit_dir / "sidecar.service"), str(unit_dir / "sidecar.socket")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # verify exits 0 even for unknown keys or unparsable values: those are warnings
    # on stderr naming the file, so any line about our units is a failure.
    ours = [ln for ln in (proc.stdout + proc.stderr).splitlines() if str(unit_dir) in ln]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ours == []


def test_verify_catches_a_broken_unit(unit_dir: Path) -> None:
    """The check above can fail: a typo in a directive is reported."""
    tool = _systemd_analyze()
    broken = unit_dir / "sidecar.service"
    broken.write_text(broken.read_text().replace("ProtectSystem=strict", "ProtectSystem=strikt"))
    proc = subprocess.run(
        [tool, "verify", str(broken)], capture_output=True, text=True, timeout=120
    )
    assert "strikt" in proc.stdout + proc.stderr


def test_service_security_exposure_is_low(unit_dir: Path) -> None:
    tool = _systemd_analyze()
    proc = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(unit_dir / "sidecar.service")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r"Overall exposure level for sidecar\.service: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, proc.stdout


def test_service_directives() -> None:
    unit = parse_unit(SERVICE)
    svc = {k: v[-1] for k, v in unit["Service"].items()}
    assert svc["Type"] == "notify"
    assert svc["NotifyAccess"] == "main"
    assert svc["ExecStart"] == f"{INSTALLED_EXEC} run -c /etc/sidecar/sidecar.yaml"
    assert "-HUP" in svc["ExecReload"] and "$MAINPID" in svc["ExecReload"]
    assert svc["Restart"] == "on-failure"
    assert svc["RestartPreventExitStatus"] == "2"  # `sidecar run` on a config that does not load
    assert svc["WatchdogSec"] == "30s"
    assert svc["KillSignal"] == "SIGTERM"
    assert svc["StateDirectory"] == "sidecar"
    assert svc["DynamicUser"] == "yes"
    assert svc["ProtectSystem"] == "strict"
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["MemoryDenyWriteExecute"] == "yes"
    assert svc["CapabilityBoundingSet"] == ""
    assert set(svc["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "@system-service" in unit["Service"]["SystemCallFilter"]
    assert int(svc["LimitNOFILE"]) >= 8192
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def _seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "min": 60, "m": 60, "h": 3600}
    m = re.fullmatch(r"([0-9.]+)\s*(ms|s|min|m|h)?", value)
    assert m, value
    return float(m.group(1)) * units[m.group(2) or "s"]


def test_stop_timeout_above_default_drain_timeout() -> None:
    svc = {k: v[-1] for k, v in parse_unit(SERVICE)["Service"].items()}
    stop = _seconds(svc["TimeoutStopSec"])
    from sidecar.config import Config

    drain = next(f.default for f in dataclasses.fields(Config) if f.name == "drain_timeout")
    assert isinstance(drain, float)
    assert drain < stop <= drain + 30


def test_socket_unit() -> None:
    unit = parse_unit(SOCKET)
    sock = {k: v[-1] for k, v in unit["Socket"].items()}
    assert sock["ListenStream"] == "127.0.0.1:8080"
    assert sock.get("Accept", "no") == "no"  # one daemon, fds passed via LISTEN_FDS
    assert unit["Install"]["WantedBy"] == ["sockets.target"]


_MDWE_CHILD = textwrap.dedent(
    r"""
    import ctypes, mmap, sys
    sys.path.insert(0, sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        print("PR_SET_MDWE unsupported", ctypes.get_errno())
        sys.exit(77)
    try:  # the restriction is really in force: a W+X mapping is refused
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        pass
    else:
        print("W+X mapping was allowed")
        sys.exit(3)

    import asyncio, importlib, pkgutil
    import h11, orjson, uvloop, yaml
    import sidecar
    for mod in pkgutil.walk_packages(sidecar.__path__, "sidecar."):
        if mod.name != "sidecar.__main__":  # importing it would run the CLI
            importlib.import_module(mod.name)

    assert yaml.__with_libyaml__
    doc = yaml.load("a: [1, 2, {b: c}]", Loader=yaml.CSafeLoader)
    assert orjson.loads(orjson.dumps(doc)) == {"a": [1, 2, {"b": "c"}]}

    async def main():
        async def handle(reader, writer):
            conn = h11.Connection(h11.SERVER)
            conn.receive_data(await reader.read(65536))
            conn.next_event()
            body = orjson.dumps({"ok": True})
            writer.write(conn.send(h11.Response(status_code=200, headers=[("content-length", str(len(body)))])))
            writer.write(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            await writer.drain()
            writer.close()
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        data = await reader.read()
        server.close()
        return data
    data = uvloop.run(main())
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b'{"ok":true}'), data
    print("ok")
    """
)


def test_runtime_works_under_memory_deny_write_execute() -> None:
    """MemoryDenyWriteExecute=yes is safe: uvloop, orjson, libyaml, h11 and every
    sidecar module run with the kernel refusing writable+executable memory."""
    proc = subprocess.run(
        [sys.executable, "-c", _MDWE_CHILD, str(REPO)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode == 77:
        pytest.skip(f"kernel without PR_SET_MDWE: {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "ok"


# --- the real daemon under a simulated systemd ---------------------------------------
#
# What sidecar.service + sidecar.socket give the daemon, done by hand: the listening
# socket at fd 3 with LISTEN_FDS=1 / LISTEN_PID, NOTIFY_SOCKET, WATCHDOG_USEC, and
# (where the kernel has it) PR_SET_MDWE standing in for MemoryDenyWriteExecute=yes.

_DAEMON_WRAPPER = textwrap.dedent(
    r"""
    import ctypes, runpy, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(65, 1, 0, 0, 0)  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN; harmless if refused
    sys.path.insert(0, sys.argv[1])
    sys.argv = ["sidecar", "run", "-c", sys.argv[2]]
    runpy.run_module("sidecar", run_name="__main__", alter_sys=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _next_states(sock: socket.socket, wanted: str) -> list[str]:
    """Datagrams until one has the `wanted` line, skipping watchdog pings."""
    while True:
        lines = sock.recv(4096).decode().split("\n")
        if wanted in lines:
            return lines
        assert lines == ["WATCHDOG=1"], lines


def _http_get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data


def test_daemon_speaks_notify_and_takes_the_activated_socket(tmp_path: Path) -> None:
    try:
        import sidecar.cli  # noqa: F401
    except ImportError:
        pytest.skip("sidecar.cli not written yet")
    activated = socket.socket()
    activated.bind(("127.0.0.1", 0))
    activated.listen(64)
    port = activated.getsockname()[1]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    admin_port = _free_port()
    unused_port = _free_port()  # what `listen` says; the activated socket wins
    env = dict(
        os.environ,
        NOTIFY_SOCKET=str(tmp_path / "notify"),
        WATCHDOG_USEC="200000",
        SIDECAR_LISTEN=f"127.0.0.1:{unused_port}",
        SIDECAR_ADMIN_LISTEN=f"127.0.0.1:{admin_port}",
        SIDECAR_UPSTREAM=f"http://127.0.0.1:{_free_port()}",  # nothing listens: 502
        SIDECAR_USAGE_LOG=str(tmp_path / "usage.jsonl"),
        LISTEN_FDS="1",
    )
    env.pop("LISTEN_PID", None)
    env.pop("WATCHDOG_PID", None)
    high = fcntl.fcntl(activated.fileno(), fcntl.F_DUPFD_CLOEXEC, 20)
    # bash keeps its pid across exec, so LISTEN_PID=$$ is the daemon's pid
    script = f'export LISTEN_PID=$$; exec 3<&{high} {high}<&-; exec "$0" -c "$1" "$2" "$3"'
    proc = subprocess.Popen(
        ["bash", "-c", script, sys.executable, _DAEMON_WRAPPER, str(REPO),
         str(REPO / "config" / "sidecar.yaml")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(high,),
    )
    os.close(high)
    try:
        ready = _next_states(notify, "READY=1")
        assert f"STATUS=listening on 127.0.0.1:{port}" in ready
        # the watchdog pings (every WATCHDOG_USEC/2)
        assert notify.recv(4096) == b"WATCHDOG=1"
        assert notify.recv(4096) == b"WATCHDOG=1"
        # the activated socket is served (no worker: 502); `listen`'s port is not bound
        assert _http_get(port, "/v1/models").startswith(b"HTTP/1.1 502")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", unused_port), timeout=5).close()
        assert _http_get(admin_port, "/healthz").startswith(b"HTTP/1.1 200")
        # SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1
        proc.send_signal(signal.SIGHUP)
        reloading = _next_states(notify, "RELOADING=1")
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
        _next_states(notify, "READY=1")
        # SIGTERM: STOPPING=1, then exit 0
        proc.send_signal(signal.SIGTERM)
        _next_states(notify, "STOPPING=1")
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        activated.close()
        notify.close()
