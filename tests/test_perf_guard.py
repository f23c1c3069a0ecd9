"""Loose CPU-per-event regression guard for the daemon (marked `perf`; not the benchmark).

Pushes a fixed number of SSE events from bench/fakeworker.py through a real `sidecar run` to
bench/loadgen.py, and the same number without any proxy, in the same test run. It fails when the
daemon's on-CPU time per forwarded event (all its threads and processes, from
/proc/PID/task/*/schedstat) exceeds 3x the CPU per event that the fake worker and the load
generator spend on the direct path: a guard against accidental O(n^2) or per-event blocking
work, loose enough for a busy CI box. The real figures come from bench/run.sh.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.perf

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
STREAMS = 16
TOKENS = 400  # long streams: per-event work that grows with the stream shows up
TICK_MS = 2
EVENTS = STREAMS * (TOKENS + 3)  # content chunks + finish + usage + [DONE]
MAX_RATIO = 3.0


def _procstat() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_procstat", BENCH / "procstat.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


procstat = _procstat()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "process exited before listening"
        with socket.socket() as s:
            try:
                s.connect(("127.0.0.1", port))
                return
            except OSError:
                time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} after {timeout}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _load(port: int, worker_pid: int, proxy_pid: int | None) -> dict[str, float]:
    """Run the fixed load against port; CPU of load generator, worker and proxy, in ns."""
    w0 = procstat.tree_cpu_ns(worker_pid)
    p0 = procstat.tree_cpu_ns(proxy_pid) if proxy_pid else 0
    out = subprocess.run(
        [
            sys.executable,
            str(BENCH / "loadgen.py"),
            "--port",
            str(port),
            "--conns",
            str(STREAMS),
            "--tokens",
            str(TOKENS),
            "--requests",
            "1",
            "--duration",
            "60",
            "--check-events",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    w1 = procstat.tree_cpu_ns(worker_pid)
    p1 = procstat.tree_cpu_ns(proxy_pid) if proxy_pid else 0
    res = json.loads(out.stdout)
    assert res["errors"] == 0, res["error_samples"]
    assert res["responses"] == STREAMS, res
    assert res["events"] == EVENTS, res
    return {"loadgen": res["cpu_ns"], "worker": w1 - w0, "proxy": p1 - p0}


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_daemon_cpu_per_event_within_3x_of_direct(tmp_path: Path) -> None:
    worker = subprocess.Popen(
        [sys.executable, str(BENCH / "fakeworker.py"), "--port", "0", "--tick-ms", str(TICK_MS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    daemon: subprocess.Popen[bytes] | None = None
    try:
        assert worker.stdout is not None
        line = worker.stdout.readline().decode()
        assert line.startswith("READY "), line
        wport = int(line.split()[1])

        direct = _load(wport, worker.pid, None)

        port = _free_port()
        cfg = tmp_path / "sidecar.yaml"
        cfg.write_text(
            f"listen: 127.0.0.1:{port}\n"
            f"upstream: {{url: 'http://127.0.0.1:{wport}'}}\n"
            "pricing: {currency: USD, models: {m: {prompt: 0.1, completion: 0.3}}}\n"
            "routes:\n"
            "  - name: chat\n"
            "    match: {path: /v1/chat/completions, methods: [POST]}\n"
            "    dialect: openai-chat\n"
        )
        daemon = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "-c", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        _wait_port(port, daemon)
        _load(port, worker.pid, daemon.pid)  # warm-up: imports, pools, caches
        proxied = _load(port, worker.pid, daemon.pid)
    finally:
        if daemon is not None:
            _stop(daemon)
        _stop(worker)

    direct_per_event = (direct["loadgen"] + direct["worker"]) / EVENTS
    daemon_per_event = proxied["proxy"] / EVENTS
    ratio = daemon_per_event / direct_per_event
    print(
        f"perf guard: daemon {daemon_per_event / 1000:.1f} us/event, direct path (worker + "
        f"load generator) {direct_per_event / 1000:.1f} us/event, ratio {ratio:.2f}x"
    )
    assert proxied["proxy"] > 0, "no CPU time read for the daemon: /proc accounting broken?"
    assert ratio <= MAX_RATIO, (
        f"daemon CPU per event {daemon_per_event / 1000:.1f} us is {ratio:.2f}x the direct "
        f"path's {direct_per_event / 1000:.1f} us (limit {MAX_RATIO}x): a hot-path regression?"
    )
