"""`sidecar demo` (SPEC "Command line"): the real command in a subprocess, used by real clients.

It runs from a directory that is not the checkout, with `$SIDECAR_CONFIG` pointing at
nothing (the demo fronts its own worker with the bundled config whatever the
environment says), prints the daemon's URL before any other URL and a curl line,
serves the openai SDK and a client that leaves mid-stream, and stops on SIGTERM.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

URL = re.compile(r"http://[\w.\-]+:\d+")


class Demo:
    def __init__(self, proc: subprocess.Popen[str], lines: list[str]) -> None:
        self.proc = proc
        self.lines = lines

    @property
    def url(self) -> str:
        match = URL.search(self.lines[0])
        assert match, self.lines
        return match.group(0)


def read_banner(proc: subprocess.Popen[str], timeout: float = 20.0) -> list[str]:
    """stdout up to and including "Ctrl-C stops both." (read in a thread: a pipe read
    blocks, and select() does not see lines already buffered by the text wrapper)."""
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    stdout = proc.stdout
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    banner: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        banner.append(line)
        if line.startswith("Ctrl-C"):
            return banner
    raise AssertionError(f"no banner from sidecar demo: {banner}")


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    env = {**os.environ, "SIDECAR_CONFIG": str(tmp_path / "no-such.yaml")}
    for name in ("SIDECAR_LISTEN", "SIDECAR_ADMIN_LISTEN", "SIDECAR_UPSTREAM"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "demo"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield Demo(proc, read_banner(proc))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_demo_prints_its_url_first_and_serves_real_clients(demo: Demo) -> None:
    urls = [u for line in demo.lines for u in URL.findall(line)]
    assert urls[0] == demo.url and demo.lines[0].rstrip().endswith(demo.url)
    assert any(line.strip().startswith(f"curl -N {demo.url}/v1/chat/completions") for line in demo.lines)
    client = openai.OpenAI(base_url=f"{demo.url}/v1", api_key="demo", max_retries=0, timeout=10)
    chunks = list(client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    completion = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == text


def test_a_client_leaving_mid_stream_and_sigterm(demo: Demo) -> None:
    body = {"model": "demo", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", f"{demo.url}/v1/chat/completions", json=body, timeout=10) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # one event, then leave
    with httpx.stream("POST", f"{demo.url}/v1/chat/completions", json=body, timeout=10) as response:
        assert b"data: [DONE]" in response.read()  # and the demo still serves
    port = int(demo.url.rsplit(":", 1)[1])
    demo.proc.send_signal(signal.SIGTERM)
    assert demo.proc.wait(15) == 0
    assert demo.proc.stderr is not None
    errors = demo.proc.stderr.read()
    assert "Traceback" not in errors and '"level":"error"' not in errors, errors
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def demo_with_worker_port(cwd: Path, port: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SIDECAR_DEMO_WORKER_PORT": port}
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "demo"], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=30, check=False,
    )


@pytest.mark.parametrize("port", ["abc", "-1", "99999", "8080x"])
def test_a_bad_demo_worker_port_is_one_clear_line(tmp_path: Path, port: str) -> None:
    result = demo_with_worker_port(tmp_path, port)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"sidecar: SIDECAR_DEMO_WORKER_PORT must be a port number from 0 to 65535, got {port!r}\n"
    )


def test_a_busy_demo_worker_port_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = demo_with_worker_port(tmp_path, str(port))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"sidecar: cannot listen on 127.0.0.1:{port} for the demo worker: Address already in use\n"
    )


def test_demo_on_a_unix_socket_prints_a_curl_line_that_works(tmp_path: Path) -> None:
    """With `SIDECAR_LISTEN=unix:/path` the daemon's address is the socket's, and the curl
    line reaches it through `--unix-socket` (curl, the real one, runs the printed line)."""
    sock = tmp_path / "demo.sock"
    env = {**os.environ, "SIDECAR_CONFIG": str(tmp_path / "no-such.yaml"),
           "SIDECAR_LISTEN": f"unix:{sock}"}
    env.pop("SIDECAR_ADMIN_LISTEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "demo"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = read_banner(proc)
        assert lines[0].rstrip().endswith(f"unix:{sock}")
        curl = next(line.strip() for line in lines if line.strip().startswith("curl "))
        assert "--unix-socket" in curl
        result = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=30,
                                check=False)
        assert result.returncode == 0 and "data: [DONE]" in result.stdout, result
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
